//! Postcopy recovery time: `cargo bench --bench recovery`.
//!
//! A postcopy migration of a guest (default 4 GiB) over a Unix socketpair is paused with
//! migrate-pause on the source; the time from the source's `migrate resume=true` with a fresh
//! socket to both ends reporting postcopy-active is measured, helper<->helper,
//! helper<->QEMU 10.0 (both directions) and QEMU<->QEMU, in the same run, repeated.
//!
//! Environment: QMH_BENCH_RECOVERY_SIZE (default 4G), QMH_BENCH_REPEAT (default 3).

#[path = "../interop/helper.rs"]
mod helper;
#[path = "../interop/postcopy.rs"]
#[allow(dead_code)]
mod postcopy;
#[path = "../interop/qemu.rs"]
mod qemu;
#[path = "../interop/util.rs"]
#[allow(unused_imports)]
mod util;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use helper::{socketpair, HelperVm};
use postcopy::UffdGuest;
use qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use util::{GIB, MIB};

const TIMEOUT: Duration = Duration::from_secs(300);

enum End {
    Qemu(QemuVm),
    // The destination's guest is only held: it must live as long as its helper.
    Helper(HelperVm, #[allow(dead_code)] Option<UffdGuest>),
}

impl End {
    fn query(&mut self) -> Value {
        match self {
            End::Qemu(q) => q.qmp().query_migrate().expect("query"),
            End::Helper(h, _) => h.client.query_migrate().expect("query"),
        }
    }
    fn exec(&mut self, cmd: &str, args: Value) {
        match self {
            End::Qemu(q) => {
                q.qmp().execute(cmd, args).expect(cmd);
            }
            End::Helper(h, _) => {
                h.client.execute(cmd, args).expect(cmd);
            }
        }
    }
    fn getfd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) {
        match self {
            End::Qemu(q) => q.qmp().getfd(name, fd).expect("getfd"),
            End::Helper(h, _) => h.client.getfd(name, fd).expect("getfd"),
        }
    }
    fn wait(&mut self, want: &[&str]) {
        let t0 = Instant::now();
        loop {
            let v = self.query();
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
}

fn source(qemu: bool, size: u64) -> End {
    if qemu {
        let mut q = QemuVm::start(Qemu::V10, size, &VmOpts::default());
        q.qmp()
            .set_capabilities(&[("postcopy-ram", true)])
            .expect("caps");
        End::Qemu(q)
    } else {
        let mut h = HelperVm::spawn_quiet();
        h.add_block("ram", size, false);
        h.client
            .set_capabilities(&[("postcopy-ram", true)])
            .expect("caps");
        End::Helper(h, None)
    }
}

fn destination(qemu: bool, size: u64) -> End {
    if qemu {
        let mut q = QemuVm::start(Qemu::V10, size, &VmOpts::incoming());
        q.qmp()
            .set_capabilities(&[("postcopy-ram", true)])
            .expect("caps");
        End::Qemu(q)
    } else {
        let guest = UffdGuest::new(size);
        let mut h = HelperVm::spawn_quiet();
        guest.attach(&mut h, "ram");
        h.client
            .set_capabilities(&[("postcopy-ram", true)])
            .expect("caps");
        End::Helper(h, Some(guest))
    }
}

/// Returns the milliseconds from `migrate resume=true` to postcopy-active on both ends.
fn one(src_qemu: bool, dst_qemu: bool, size: u64) -> f64 {
    let mut src = source(src_qemu, size);
    let mut dst = destination(dst_qemu, size);
    src.exec(
        "migrate-set-parameters",
        json!({"max-bandwidth": MIB, "max-postcopy-bandwidth": 64 * MIB}),
    );
    let (a, b) = socketpair();
    src.getfd("mig", a.as_fd());
    dst.getfd("mig", b.as_fd());
    drop((a, b));
    dst.exec("migrate-incoming", json!({"uri": "fd:mig"}));
    src.exec("migrate", json!({"uri": "fd:mig"}));
    std::thread::sleep(Duration::from_millis(100));
    src.exec("migrate-start-postcopy", json!({}));
    src.wait(&["postcopy-active"]);
    dst.wait(&["postcopy-active"]);
    std::thread::sleep(Duration::from_millis(200));
    src.exec("migrate-pause", json!({}));
    src.wait(&["postcopy-paused"]);
    dst.wait(&["postcopy-paused"]);
    let (a, b) = socketpair();
    dst.getfd("rec", b.as_fd());
    dst.exec("migrate-recover", json!({"uri": "fd:rec"}));
    src.getfd("rec", a.as_fd());
    drop((a, b));
    let t0 = Instant::now();
    src.exec("migrate", json!({"uri": "fd:rec", "resume": true}));
    src.wait(&["postcopy-active", "completed"]);
    dst.wait(&["postcopy-active", "completed"]);
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    src.exec(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    );
    src.wait(&["completed"]);
    dst.wait(&["completed"]);
    ms
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("recovery benchmark: run it with `cargo bench --bench recovery` (not part of the tests)");
        return;
    }
    if require_qemu(Qemu::V10, "bench").is_none() {
        return;
    }
    let size = qemu_migration_helper::demo::parse_size(
        &std::env::var("QMH_BENCH_RECOVERY_SIZE").unwrap_or_else(|_| "4G".into()),
    )
    .unwrap_or(4 * GIB);
    let repeat: usize = std::env::var("QMH_BENCH_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
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
    let base = median(times[0].clone());
    println!(
        "\n{:<15} {:>10} {:>14}",
        "case", "median ms", "vs QEMU->QEMU"
    );
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let m = median(times[i].clone());
        println!("{name:<15} {m:10.2} {:>13.2}x", m / base);
    }
    println!("target: at most QEMU's (ratio <= 1.00)");
}
