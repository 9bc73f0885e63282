//! `analyze` speed: `cargo bench --bench analyze`.
//!
//! Writes a stream file of incompressible RAM with a helper (`migrate file:`), then times, side
//! by side and repeated, `cp FILE OUT` (page cache warm), `analyze FILE` and
//! `analyze --extract-ram DIR FILE`, and prints the ratios.
//!
//! Environment: QMH_BENCH_ANALYZE_SIZE (default 4G), QMH_BENCH_REPEAT (default 3),
//! QMH_BENCH_DIR (default the system temp dir; needs about 3x the size free).

use std::process::Command;
use std::time::{Duration, Instant};

use qemu_migration_helper::demo::parse_size;
use serde_json::json;

use support::helper::{helper_bin, HelperVm};
use support::stats::{bench_requested, env_size, median, repeat};
use support::util::fill_mixed;

fn time(cmd: &mut Command) -> f64 {
    let t0 = Instant::now();
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t0.elapsed().as_secs_f64()
}

fn main() {
    if !bench_requested("analyze") {
        return;
    }
    let size = env_size("QMH_BENCH_ANALYZE_SIZE", "4G", parse_size);
    let repeat = repeat();
    let base = std::env::var_os("QMH_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("qmh-analyze-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let file = dir.join("stream.bin");
    {
        let mut src = HelperVm::spawn_quiet();
        src.add_block("pc.ram", size, false);
        fill_mixed(&mut src.blocks[0].mem.map(), 3, 0.0);
        src.client
            .set_parameters(json!({"max-bandwidth": 0}))
            .expect("params");
        src.client
            .migrate(&format!("file:{}", file.display()))
            .expect("migrate");
        src.wait(&["completed"], Duration::from_secs(600));
    }
    let gib = size as f64 / (1u64 << 30) as f64;
    println!(
        "analyze benchmark: {} MiB stream of incompressible RAM, {repeat} runs each",
        size >> 20
    );
    // Warm the page cache.
    let _ = time(
        Command::new("cat")
            .arg(&file)
            .stdout(std::process::Stdio::null()),
    );
    let (mut cp, mut an, mut ex) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..repeat {
        let copy = dir.join("copy.bin");
        let t = time(Command::new("cp").arg(&file).arg(&copy));
        let _ = std::fs::remove_file(&copy);
        cp.push(t);
        let t = time(
            Command::new(helper_bin())
                .arg("analyze")
                .arg(&file)
                .stdout(std::process::Stdio::null()),
        );
        an.push(t);
        let out = dir.join("ram");
        let t = time(
            Command::new(helper_bin())
                .arg("analyze")
                .arg("--extract-ram")
                .arg(&out)
                .arg(&file)
                .stdout(std::process::Stdio::null()),
        );
        let _ = std::fs::remove_dir_all(&out);
        ex.push(t);
        println!(
            "  run {r}: cp {:.3} s, analyze {:.3} s, analyze --extract-ram {:.3} s",
            cp[r], an[r], ex[r]
        );
    }
    let (c, a, e) = (median(&cp), median(&an), median(&ex));
    println!("\ncp FILE OUT              {c:8.3} s");
    println!(
        "analyze --extract-ram    {e:8.3} s   {:.2}x the copy (target <= 1.5x)",
        e / c
    );
    println!(
        "analyze                  {a:8.3} s   {:.3} s per GiB (target <= 0.1)",
        a / gib
    );
    let _ = std::fs::remove_dir_all(&dir);
}
