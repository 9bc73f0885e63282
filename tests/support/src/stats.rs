//! What the benchmarks share: whether cargo asked for a benchmark run, their environment
//! knobs, and the statistics they print.

/// Whether the binary runs as a benchmark (`cargo bench` passes `--bench`). `cargo test
/// --all-targets` also runs the bench binaries, without it: then this says how to run
/// bench `name` and the benchmark returns at once.
pub fn bench_requested(name: &str) -> bool {
    if std::env::args().any(|a| a == "--bench") {
        return true;
    }
    println!("{name} benchmark: run it with `cargo bench --bench {name}` (not part of the tests)");
    false
}

/// A size from the environment variable `var` (`2G`, `512M`, ...), else `default`, read
/// with `parse` (the helper's own `demo::parse_size`, which the client-only build lacks).
pub fn env_size<E: std::fmt::Display>(
    var: &str,
    default: &str,
    parse: impl Fn(&str) -> Result<u64, E>,
) -> u64 {
    let s = std::env::var(var).unwrap_or_else(|_| default.into());
    parse(&s).unwrap_or_else(|e| panic!("{var}={s:?}: {e}"))
}

/// How many times each case runs: `QMH_BENCH_REPEAT`, default 3.
pub fn repeat() -> usize {
    env_u64("QMH_BENCH_REPEAT", 3) as usize
}

/// A number from the environment variable `var`, else `default`.
pub fn env_u64(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s:?}: want a number")),
        Err(_) => default,
    }
}

/// The `p` quantile (0.0 to 1.0) of `v`, nearest rank; NaN when `v` is empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

/// The median of `v` (the upper one of an even count); NaN when `v` is empty.
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// A destination's `postcopy-latency-dist` (QEMU 10.1's histogram of fault latency: bucket
/// N counts [2^N, 2^(N+1)) us); panics naming the reply if it is missing or malformed.
pub fn latency_dist(v: &serde_json::Value) -> Vec<u64> {
    v["postcopy-latency-dist"]
        .as_array()
        .unwrap_or_else(|| panic!("no postcopy-latency-dist in {v}"))
        .iter()
        .map(|b| {
            b.as_u64()
                .unwrap_or_else(|| panic!("postcopy-latency-dist: {b} in {v}"))
        })
        .collect()
}

/// The `p` quantile (0.0 to 1.0) of a `postcopy-latency-dist` histogram, as the upper
/// bound of its bucket in microseconds (2^(N+1)); NaN when it is empty.
pub fn dist_quantile_us(dist: &[u64], p: f64) -> f64 {
    let n: u64 = dist.iter().sum();
    if n == 0 {
        return f64::NAN;
    }
    let want = ((n as f64 * p).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in dist.iter().enumerate() {
        seen += c;
        if seen >= want {
            return (1u64 << (i + 1)) as f64;
        }
    }
    f64::INFINITY
}
