//! Postcopy recovery time: `cargo bench --bench recovery`.
//!
//! A postcopy migration of a guest (default 4 GiB) over a Unix socketpair is paused with
//! migrate-pause on the source; the time from the source's `migrate resume=true` with a fresh
//! socket to both ends reporting postcopy-active is measured, helper<->helper,
//! helper<->QEMU 10.0 (both directions) and QEMU<->QEMU, in the same run, repeated.
//!
//! Environment: QMH_BENCH_RECOVERY_SIZE (default 4G), QMH_BENCH_REPEAT (default 3).

use std::time::{Duration, Instant};

use qemu_migration_helper::demo::parse_size;
use serde_json::{json, Value};

use support::end::End;
use support::helper::HelperVm;
use support::migrate::{pass_socketpair, start_fd_migration};
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::stats::{bench_requested, env_size, median, repeat};
use support::uffd::UffdGuest;
use support::util::MIB;

const TIMEOUT: Duration = Duration::from_secs(300);

/// A source, or with `incoming` a destination, with postcopy-ram on. A helper
/// destination's guest is a userfaultfd-registered memfd, as its parent VMM would hold it;
/// it is returned to be held as long as the helper runs.
fn start(qemu: bool, size: u64, incoming: bool) -> (End, Option<UffdGuest>) {
    let (mut end, guest) = match (qemu, incoming) {
        (true, false) => {
            let q = QemuVm::start(Qemu::V10, size, &VmOpts::default());
            (End::Qemu(q), None)
        }
        (true, true) => {
            let q = QemuVm::start(Qemu::V10, size, &VmOpts::incoming());
            (End::Qemu(q), None)
        }
        (false, false) => {
            let mut h = HelperVm::spawn_quiet();
            h.add_block("ram", size, false);
            (End::Helper(h), None)
        }
        (false, true) => {
            let guest = UffdGuest::new(size);
            let mut h = HelperVm::spawn_quiet();
            guest.attach(&mut h, "ram");
            (End::Helper(h), Some(guest))
        }
    };
    end.client()
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("caps");
    (end, guest)
}

fn exec(end: &mut End, cmd: &str, args: Value) {
    end.client().execute(cmd, args).expect(cmd);
}

/// Waits for one of `want`, asking every 0.5 ms: the time to the state is what the
/// benchmark measures. (QEMU answers `{}` before a migration starts: no status yet.)
fn wait(end: &mut End, want: &[&str]) {
    let t0 = Instant::now();
    loop {
        let v = end.client().query_migrate().expect("query");
        let st = v["status"].as_str().unwrap_or("");
        if want.contains(&st) {
            return;
        }
        assert!(st != "failed", "{v}");
        assert!(
            t0.elapsed() < TIMEOUT,
            "timed out waiting for {want:?}: {v}"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Returns the milliseconds from `migrate resume=true` to postcopy-active on both ends.
fn one(src_qemu: bool, dst_qemu: bool, size: u64) -> f64 {
    let (mut src, _) = start(src_qemu, size, false);
    let (mut dst, dst_guest) = start(dst_qemu, size, true);
    exec(
        &mut src,
        "migrate-set-parameters",
        json!({"max-bandwidth": MIB, "max-postcopy-bandwidth": 64 * MIB}),
    );
    start_fd_migration(src.client(), dst.client());
    std::thread::sleep(Duration::from_millis(100));
    exec(&mut src, "migrate-start-postcopy", json!({}));
    wait(&mut src, &["postcopy-active"]);
    wait(&mut dst, &["postcopy-active"]);
    std::thread::sleep(Duration::from_millis(200));
    exec(&mut src, "migrate-pause", json!({}));
    wait(&mut src, &["postcopy-paused"]);
    wait(&mut dst, &["postcopy-paused"]);
    pass_socketpair(src.client(), dst.client(), "rec");
    exec(&mut dst, "migrate-recover", json!({"uri": "fd:rec"}));
    let t0 = Instant::now();
    exec(
        &mut src,
        "migrate",
        json!({"uri": "fd:rec", "resume": true}),
    );
    wait(&mut src, &["postcopy-active", "completed"]);
    wait(&mut dst, &["postcopy-active", "completed"]);
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    exec(
        &mut src,
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    );
    wait(&mut src, &["completed"]);
    wait(&mut dst, &["completed"]);
    // The helpers quit first: the destination's guest must outlive its helper.
    drop((src, dst));
    drop(dst_guest);
    ms
}

fn main() {
    if !bench_requested("recovery") || require_qemu(Qemu::V10, "bench").is_none() {
        return;
    }
    let size = env_size("QMH_BENCH_RECOVERY_SIZE", "4G", parse_size);
    let repeat = repeat();
    println!(
        "postcopy recovery time (new socket -> postcopy-active on both ends), {} MiB guest, {repeat} runs each",
        size >> 20
    );
    let cases = [
        ("QEMU->QEMU", true, true),
        ("helper->helper", false, false),
        ("helper->QEMU", false, true),
        ("QEMU->helper", true, false),
    ];
    let mut times = vec![Vec::new(); cases.len()];
    for r in 0..repeat {
        for (i, (name, s, d)) in cases.iter().enumerate() {
            let ms = one(*s, *d, size);
            println!("  run {r} {name:<15} {ms:8.2} ms");
            times[i].push(ms);
        }
    }
    let base = median(&times[0]);
    println!(
        "\n{:<15} {:>10} {:>14}",
        "case", "median ms", "vs QEMU->QEMU"
    );
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let m = median(&times[i]);
        println!("{name:<15} {m:10.2} {:>13.2}x", m / base);
    }
    println!("target: at most QEMU's (ratio <= 1.00)");
}
