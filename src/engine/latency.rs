//! Page-fault service latency on a postcopy (or on-demand restore) destination: from the
//! fault read to the requested page placed, once per requested page. `query-migrate` shows
//! it as `postcopy-latency` (the helper's summary) and `postcopy-latency-dist` (QEMU 10.1's
//! histogram).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Buckets of `postcopy-latency-dist`, as QEMU 10.1 (`BLOCKTIME_LATENCY_BUCKET_N` in
/// migration/postcopy-ram.c).
pub(crate) const LATENCY_BUCKETS: usize = 24;

/// QEMU 10.1's bucket of a latency: N for [2^N us, 2^(N+1) us) in whole microseconds, so
/// bucket 0 also takes anything under 1 us and the last one anything from 2^23 us (~8 s).
pub(crate) fn latency_bucket(d: Duration) -> usize {
    match d.as_micros() {
        0 => 0,
        us => (us.ilog2() as usize).min(LATENCY_BUCKETS - 1),
    }
}

#[derive(Default)]
pub(crate) struct Latency {
    /// `postcopy-latency-dist`: atomics, so that the threads placing pages never wait on
    /// each other or on `query-migrate` for it.
    dist: [AtomicU64; LATENCY_BUCKETS],
    inner: Mutex<LatencyInner>,
}

#[derive(Default)]
struct LatencyInner {
    count: u64,
    sum_ns: u64,
    max_ns: u64,
    /// Samples for percentiles, capped so a long run cannot grow memory without bound.
    samples: Vec<u32>,
}

impl Latency {
    const MAX_SAMPLES: usize = 1 << 20;

    pub(crate) fn record(&self, d: Duration) {
        self.dist[latency_bucket(d)].fetch_add(1, Ordering::Relaxed);
        let ns = d.as_nanos().min(u32::MAX as u128) as u64;
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.count += 1;
        g.sum_ns += ns;
        g.max_ns = g.max_ns.max(ns);
        if g.samples.len() < Self::MAX_SAMPLES {
            g.samples.push(ns as u32);
        }
    }

    pub(crate) fn reset(&self) {
        for b in &self.dist {
            b.store(0, Ordering::Relaxed);
        }
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = LatencyInner::default();
    }

    /// `postcopy-latency-dist`: the count of each bucket (see [`latency_bucket`]).
    pub(crate) fn dist_json(&self) -> serde_json::Value {
        self.dist
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// QEMU 10.1's `postcopy-latency`: the mean in nanoseconds (0 before the first fault).
    pub(crate) fn mean_ns(&self) -> u64 {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.sum_ns.checked_div(g.count).unwrap_or(0)
    }

    /// `{count, mean-us, p50-us, p99-us, max-us}`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = g.samples.clone();
        drop(g);
        s.sort_unstable();
        let pct = |p: f64| -> f64 {
            if s.is_empty() {
                return 0.0;
            }
            let i = ((s.len() as f64 - 1.0) * p).round() as usize;
            s[i.min(s.len() - 1)] as f64 / 1000.0
        };
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "count": g.count,
            "mean-us": if g.count > 0 { g.sum_ns as f64 / g.count as f64 / 1000.0 } else { 0.0 },
            "p50-us": pct(0.50),
            "p99-us": pct(0.99),
            "max-us": g.max_ns as f64 / 1000.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_qemus_log2_microseconds() {
        let us = Duration::from_micros;
        for (d, b) in [
            (Duration::ZERO, 0),
            (Duration::from_nanos(999), 0),
            (us(1), 0),
            (Duration::from_nanos(1999), 0),
            (us(2), 1),
            (us(3), 1),
            (us(4), 2),
            (us(255), 7),
            (us(256), 8),
            (us(511), 8),
            (us(512), 9),
            (us(1000), 9),
            (us(1024), 10),
            (us((1 << 23) - 1), 22),
            (us(1 << 23), 23),
            (us(1 << 30), 23),
            (Duration::from_secs(u64::MAX), 23),
        ] {
            assert_eq!(latency_bucket(d), b, "{d:?}");
        }
    }

    #[test]
    fn the_histogram_counts_every_record_and_resets() {
        let l = Latency::default();
        for us in [0, 1, 300, 300, 700, 5_000_000, 60_000_000] {
            l.record(Duration::from_micros(us));
        }
        let d = l.dist_json();
        let d: Vec<u64> = d
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(d.len(), LATENCY_BUCKETS);
        assert_eq!(d[0], 2);
        assert_eq!(d[8], 2);
        assert_eq!(d[9], 1);
        assert_eq!(d[22], 1, "5 s is in [2^22, 2^23) us");
        assert_eq!(d[23], 1, "a minute is in the last bucket");
        assert_eq!(
            d.iter().sum::<u64>(),
            l.to_json()["count"].as_u64().unwrap()
        );
        l.reset();
        assert!(l.dist_json().as_array().unwrap().iter().all(|v| v == 0));
        assert_eq!(l.to_json()["count"], 0);
    }
}
