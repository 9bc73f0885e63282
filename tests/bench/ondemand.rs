//! On-demand restore from a mapped-ram file: `cargo bench --bench ondemand`.
//!
//! QEMU 10.0 saves an incompressible guest with mapped-ram; then, in each round, the same
//! file is restored by QEMU in full (`-incoming defer`, `migrate-incoming file:`), and by a
//! helper on demand with the bench as the parent (a userfaultfd over memfd mappings, see
//! `support::uffd`): time from `migrate-incoming` to `postcopy-active` (runnable), fault
//! latency p50/p99 (the helper's `x-postcopy-latency`) while reader threads touch random
//! pages during the background fill, and time to `completed` (every page in place) against
//! QEMU's full restore. Prints medians and each end's CPU seconds.
//!
//! Environment: QMH_BENCH_SIZE (default 4G), QMH_BENCH_REPEAT (default 3), QMH_BENCH_DIR
//! (where the file goes, default /var/tmp).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_migration_helper::demo::{parse_size, process_cpu_secs};
use serde_json::{json, Value};
use support::helper::HelperVm;
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::stats::{bench_requested, env_size, median, repeat};
use support::uffd::{Readers, UffdGuest};
use support::util::{fill_mixed, GIB};

const TIMEOUT: Duration = Duration::from_secs(900);

fn save(file: &Path, size: u64) -> Arc<Vec<u8>> {
    let mut q = QemuVm::start(Qemu::V10, size, &VmOpts::default());
    fill_mixed(&mut q.ram_mmap(), 0x0d0d, 0.0);
    q.qmp()
        .set_capabilities(&[("mapped-ram", true)])
        .expect("caps");
    q.qmp()
        .set_parameters(json!({"max-bandwidth": 100 * GIB}))
        .expect("params");
    q.qmp()
        .migrate(&format!("file:{}", file.display()))
        .expect("migrate file:");
    q.wait_migration(&["completed"], TIMEOUT)
        .expect("QEMU saves");
    Arc::new(q.ram_mmap().to_vec())
}

/// QEMU restores the whole file: (wall, CPU).
fn qemu_restore(file: &Path, size: u64) -> (f64, f64) {
    let mut q = QemuVm::start(Qemu::V10, size, &VmOpts::incoming());
    q.qmp()
        .set_capabilities(&[("mapped-ram", true)])
        .expect("caps");
    let (c0, t0) = (process_cpu_secs(q.pid()), Instant::now());
    q.qmp()
        .migrate_incoming(&format!("file:{}", file.display()))
        .expect("migrate-incoming");
    q.wait_migration(&["completed"], TIMEOUT)
        .expect("QEMU restores");
    (t0.elapsed().as_secs_f64(), process_cpu_secs(q.pid()) - c0)
}

fn status(h: &mut HelperVm) -> Value {
    h.client.query_migrate().expect("query-migrate")
}

fn wait(h: &mut HelperVm, guest: &mut UffdGuest, wanted: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let v = status(h);
        if v["status"] == wanted {
            return v;
        }
        if v["status"] == "failed" || t0.elapsed() > TIMEOUT {
            guest.release();
            panic!("waiting for {wanted}: {v}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One on-demand restore: (runnable s, completed s, CPU s, p50 us, p99 us, faults).
fn helper_restore(file: &Path, size: u64, expected: &Arc<Vec<u8>>) -> [f64; 6] {
    let mut guest = UffdGuest::new(size);
    let dir = file
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let mut h = HelperVm::spawn_with_args(&["--log-level", "warn", "--sandbox-allow-path", &dir]);
    guest.attach(&mut h, "ram");
    h.client
        .set_capabilities(&[("postcopy-ram", true), ("mapped-ram", true)])
        .expect("caps");
    let (c0, t0) = (process_cpu_secs(h.pid()), Instant::now());
    h.client
        .migrate_incoming(&format!("file:{}", file.display()))
        .expect("migrate-incoming");
    wait(&mut h, &mut guest, "postcopy-active");
    let runnable = t0.elapsed().as_secs_f64();
    let readers = Readers::start(&guest, expected.clone(), 2, 0x0d0d);
    let done = wait(&mut h, &mut guest, "completed");
    let completed = t0.elapsed().as_secs_f64();
    readers.finish();
    let cpu = process_cpu_secs(h.pid()) - c0;
    let lat = &done["x-postcopy-latency"];
    [
        runnable,
        completed,
        cpu,
        lat["p50-us"].as_f64().unwrap_or(f64::NAN),
        lat["p99-us"].as_f64().unwrap_or(f64::NAN),
        lat["count"].as_f64().unwrap_or(0.0),
    ]
}

fn main() {
    if !bench_requested("ondemand") || require_qemu(Qemu::V10, "ondemand bench").is_none() {
        return;
    }
    let size = env_size("QMH_BENCH_SIZE", "4G", parse_size);
    let dir = std::env::var("QMH_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let file = Path::new(&dir).join(format!("qmh-ondemand-{}.mig", std::process::id()));
    let t = Instant::now();
    let expected = save(&file, size);
    println!(
        "QEMU 10.0 saved {} MiB with mapped-ram in {:.2} s",
        size >> 20,
        t.elapsed().as_secs_f64()
    );
    let (mut q_wall, mut q_cpu) = (Vec::new(), Vec::new());
    let mut h: [Vec<f64>; 6] = Default::default();
    for round in 0..repeat() {
        let (w, c) = qemu_restore(&file, size);
        println!("  round {round}: QEMU full restore {w:.3} s ({c:.2} CPU s)");
        q_wall.push(w);
        q_cpu.push(c);
        let r = helper_restore(&file, size, &expected);
        println!(
            "  round {round}: helper runnable after {:.2} ms, completed {:.3} s ({:.2} CPU s), \
             {} faults, p50 {:.1} us, p99 {:.1} us",
            r[0] * 1e3,
            r[1],
            r[2],
            r[5],
            r[3],
            r[4]
        );
        for (v, x) in h.iter_mut().zip(r) {
            v.push(x);
        }
    }
    let _ = std::fs::remove_file(&file);
    let (qw, hr, hc) = (median(&q_wall), median(&h[0]), median(&h[1]));
    println!("\n{} MiB, medians of {} rounds:", size >> 20, q_wall.len());
    println!(
        "  QEMU 10.0 full restore      {qw:.3} s   {:.2} CPU s",
        median(&q_cpu)
    );
    println!(
        "  helper runnable (on demand) {:.2} ms   ({:.4}x QEMU's full restore)",
        hr * 1e3,
        hr / qw
    );
    println!(
        "  helper every page placed    {hc:.3} s   {:.2} CPU s   ({:.2}x QEMU)",
        median(&h[2]),
        hc / qw
    );
    println!(
        "  fault latency during the fill: p50 {:.1} us, p99 {:.1} us ({} faults)",
        median(&h[3]),
        median(&h[4]),
        median(&h[5])
    );
}
