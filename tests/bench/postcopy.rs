//! Postcopy page-fault service latency: `cargo bench --bench postcopy`.
//!
//! helper->helper and QEMU 10.0->helper over a Unix socketpair, and both with
//! postcopy-preempt over a `unix:` listener (the second channel needs one), 4 KiB pages, the background
//! push at full speed (max-postcopy-bandwidth 0). The test is the destination's parent VMM:
//! reader threads touch random pages through its userfaultfd-registered mapping and time
//! each first touch (the latency a vCPU sees); the helper's own figures (fault read -> page
//! placed) are printed beside them. QEMU->QEMU is measured the only way QEMU 10.0 allows from
//! outside without running a guest: the monitor's `xp` on a missing page versus on a present
//! page (the difference is the fault service time).
//!
//! Environment: QMH_BENCH_PC_SIZE (default 1G), QMH_BENCH_REPEAT (default 3).

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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use helper::{socketpair, HelperVm};
use postcopy::UffdGuest;
use qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use util::{fill_mixed, GIB, MIB};

const TIMEOUT: Duration = Duration::from_secs(600);

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

/// Reader threads timing first touches of random pages; returns microseconds per touch of
/// pages that were still missing. A touch under 5 us hit a page already there (at most a
/// minor fault) and is not counted.
fn touch_pages(guest: &UffdGuest, stop: Arc<AtomicBool>, threads: usize) -> Vec<f64> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let pages = guest.mem.size / 4096;
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (map, stop, out) = (guest.map.clone(), stop.clone(), out.clone());
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 7);
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = (x % pages) as usize;
                    let t0 = Instant::now();
                    // SAFETY: inside the mapping; volatile so the read happens.
                    let _v = unsafe {
                        std::ptr::read_volatile(map.as_ptr().add(p * 4096) as *const u64)
                    };
                    let us = t0.elapsed().as_secs_f64() * 1e6;
                    if us >= 5.0 {
                        mine.push(us);
                    }
                }
                out.lock().unwrap().extend(mine);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    let v = std::mem::take(&mut *out.lock().unwrap());
    v
}

/// One postcopy run into a helper destination; returns (parent-side touch latencies in us,
/// the helper's reported postcopy-latency). With `preempt` both sides use postcopy-preempt
/// over a `unix:` listener instead of a socketpair.
fn into_helper(from_qemu: bool, preempt: bool, size: u64) -> (Vec<f64>, serde_json::Value) {
    let guest = UffdGuest::new(size);
    let mut dst = HelperVm::spawn_quiet();
    guest.attach(&mut dst, "ram");
    let caps = [("postcopy-ram", true), ("postcopy-preempt", preempt)];
    dst.client.set_capabilities(&caps).expect("caps");
    let dir = util::TempDir::new("qmh-bench");
    let (a, b) = socketpair();
    let uri = if preempt {
        format!("unix:{}", dir.join("mig.sock").display())
    } else {
        dst.client.getfd("mig", b.as_fd()).expect("getfd");
        "fd:mig".to_string()
    };
    dst.client.migrate_incoming(&uri).expect("incoming");
    let mut qsrc = None;
    let mut hsrc = None;
    if from_qemu {
        let mut q = QemuVm::start(Qemu::V10, size, &VmOpts::default());
        fill_mixed(&mut q.ram_mmap(), 5, 0.0);
        q.qmp().set_capabilities(&caps).expect("caps");
        q.qmp()
            .set_parameters(json!({"max-bandwidth": 16 * MIB, "max-postcopy-bandwidth": 0}))
            .expect("params");
        if !preempt {
            q.qmp().getfd("mig", a.as_fd()).expect("getfd");
        }
        q.qmp()
            .execute("migrate", json!({"uri": uri}))
            .expect("migrate");
        std::thread::sleep(Duration::from_millis(200));
        q.qmp()
            .execute("migrate-start-postcopy", json!({}))
            .expect("postcopy");
        qsrc = Some(q);
    } else {
        let mut h = HelperVm::spawn_quiet();
        h.add_block("ram", size, false);
        fill_mixed(&mut h.blocks[0].mem.map(), 5, 0.0);
        h.client.set_capabilities(&caps).expect("caps");
        h.client
            .set_parameters(json!({"max-bandwidth": 16 * MIB, "max-postcopy-bandwidth": 0}))
            .expect("params");
        if !preempt {
            h.client.getfd("mig", a.as_fd()).expect("getfd");
        }
        h.client.migrate(&uri).expect("migrate");
        std::thread::sleep(Duration::from_millis(200));
        h.client.migrate_start_postcopy().expect("postcopy");
        hsrc = Some(h);
    }
    drop((a, b));
    dst.wait(&["postcopy-active", "completed"], TIMEOUT);
    let lat = touch_pages(&guest, Arc::new(AtomicBool::new(false)), 2);
    let v = dst.wait(&["completed"], TIMEOUT);
    if let Some(mut q) = qsrc {
        q.wait_migration(&["completed"], TIMEOUT)
            .expect("qemu completes");
    }
    if let Some(mut h) = hsrc {
        h.wait(&["completed"], TIMEOUT);
    }
    (lat, v["postcopy-latency"].clone())
}

/// QEMU->QEMU: `xp` round trips on missing pages minus those on present pages, in us.
fn qemu_to_qemu(size: u64, preempt: bool) -> (Vec<f64>, f64) {
    let src = QemuVm::start(Qemu::V10, size, &VmOpts::default());
    fill_mixed(&mut src.ram_mmap(), 5, 0.0);
    let mut src = src;
    let mut dst = QemuVm::start(Qemu::V10, size, &VmOpts::incoming());
    for q in [&mut src, &mut dst] {
        q.qmp()
            .set_capabilities(&[("postcopy-ram", true), ("postcopy-preempt", preempt)])
            .expect("caps");
    }
    src.qmp()
        .set_parameters(json!({"max-bandwidth": 16 * MIB, "max-postcopy-bandwidth": 0}))
        .expect("params");
    let dir = util::TempDir::new("qmh-bench");
    let uri = if preempt {
        format!("unix:{}", dir.join("mig.sock").display())
    } else {
        let (a, b) = socketpair();
        src.qmp().getfd("mig", a.as_fd()).expect("getfd");
        dst.qmp().getfd("mig", b.as_fd()).expect("getfd");
        "fd:mig".to_string()
    };
    dst.qmp()
        .execute("migrate-incoming", json!({"uri": uri}))
        .expect("incoming");
    src.qmp()
        .execute("migrate", json!({"uri": uri}))
        .expect("migrate");
    std::thread::sleep(Duration::from_millis(200));
    src.qmp()
        .execute("migrate-start-postcopy", json!({}))
        .expect("postcopy");
    dst.wait_migration(&["postcopy-active", "completed"], TIMEOUT)
        .expect("active");
    let pages = size / 4096;
    let mut missing = Vec::new();
    let mut present = Vec::new();
    let mut x = 12345u64;
    let t_end = Instant::now() + Duration::from_millis(800);
    while Instant::now() < t_end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let addr = (x % pages) * 4096;
        let t0 = Instant::now();
        dst.qmp().hmp(&format!("xp /1xg {addr:#x}")).expect("xp");
        missing.push(t0.elapsed().as_secs_f64() * 1e6);
        // The same page again: now present.
        let t1 = Instant::now();
        dst.qmp().hmp(&format!("xp /1xg {addr:#x}")).expect("xp");
        present.push(t1.elapsed().as_secs_f64() * 1e6);
    }
    let base = pct(&mut present, 0.5);
    src.wait_migration(&["completed"], TIMEOUT)
        .expect("completes");
    dst.wait_migration(&["completed"], TIMEOUT)
        .expect("completes");
    (missing.iter().map(|m| (m - base).max(0.0)).collect(), base)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("postcopy latency benchmark: run it with `cargo bench --bench postcopy` (not part of the tests)");
        return;
    }
    if require_qemu(Qemu::V10, "bench").is_none() {
        return;
    }
    let size = qemu_migration_helper::demo::parse_size(
        &std::env::var("QMH_BENCH_PC_SIZE").unwrap_or_else(|_| "1G".into()),
    )
    .unwrap_or(GIB);
    let repeat: usize = std::env::var("QMH_BENCH_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!(
        "postcopy fault latency: {} MiB guest, 4 KiB pages, Unix socketpair, background push unlimited, {repeat} runs each",
        size >> 20
    );
    let mut hh = Vec::new();
    let mut hp = Vec::new();
    let mut qh = Vec::new();
    let mut qp = Vec::new();
    let mut qq = Vec::new();
    let mut qqp = Vec::new();
    let mut own: [Vec<(f64, f64)>; 4] = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for r in 0..repeat {
        let (l, o) = into_helper(false, false, size);
        println!(
            "  run {r} helper->helper: {} faults timed by the parent; helper's own: {o}",
            l.len()
        );
        own[0].push((
            o["p50-us"].as_f64().unwrap_or(f64::NAN),
            o["p99-us"].as_f64().unwrap_or(f64::NAN),
        ));
        hh.extend(l);
        let (l, o) = into_helper(false, true, size);
        println!(
            "  run {r} helper->helper, postcopy-preempt over unix: {} faults timed by the parent; helper's own: {o}",
            l.len()
        );
        own[3].push((
            o["p50-us"].as_f64().unwrap_or(f64::NAN),
            o["p99-us"].as_f64().unwrap_or(f64::NAN),
        ));
        hp.extend(l);
        let (l, o) = into_helper(true, false, size);
        println!(
            "  run {r} QEMU->helper:   {} faults timed by the parent; helper's own: {o}",
            l.len()
        );
        own[1].push((
            o["p50-us"].as_f64().unwrap_or(f64::NAN),
            o["p99-us"].as_f64().unwrap_or(f64::NAN),
        ));
        qh.extend(l);
        let (l, o) = into_helper(true, true, size);
        println!(
            "  run {r} QEMU->helper, postcopy-preempt over unix: {} faults timed by the parent; helper's own: {o}",
            l.len()
        );
        own[2].push((
            o["p50-us"].as_f64().unwrap_or(f64::NAN),
            o["p99-us"].as_f64().unwrap_or(f64::NAN),
        ));
        qp.extend(l);
        let (l, base) = qemu_to_qemu(size, false);
        println!("  run {r} QEMU->QEMU:     {} xp reads of missing pages (present-page xp: {base:.0} us)", l.len());
        qq.extend(l);
        let (l, base) = qemu_to_qemu(size, true);
        println!("  run {r} QEMU->QEMU, postcopy-preempt over unix: {} xp reads of missing pages (present-page xp: {base:.0} us)", l.len());
        qqp.extend(l);
    }
    println!("\nas the parent's threads see it (all runs pooled):");
    println!(
        "{:<24} {:>8} {:>10} {:>10}",
        "case", "faults", "p50 us", "p99 us"
    );
    for (name, v) in [
        ("helper->helper", &mut hh),
        ("helper->helper preempt", &mut hp),
        ("QEMU->helper", &mut qh),
        ("QEMU->helper preempt", &mut qp),
        ("QEMU->QEMU (xp)", &mut qq),
        ("QEMU->QEMU preempt (xp)", &mut qqp),
    ] {
        let n = v.len();
        println!(
            "{name:<24} {n:>8} {:>10.1} {:>10.1}",
            pct(v, 0.5),
            pct(v, 0.99)
        );
    }
    println!("as the helper reports it (fault read -> page placed; median over runs):");
    for (name, v) in [
        ("helper->helper", &own[0]),
        ("helper->helper preempt", &own[3]),
        ("QEMU->helper", &own[1]),
        ("QEMU->helper preempt", &own[2]),
    ] {
        let mut p50: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut p99: Vec<f64> = v.iter().map(|x| x.1).collect();
        println!(
            "{name:<24} {:>8} {:>10.1} {:>10.1}",
            "",
            pct(&mut p50, 0.5),
            pct(&mut p99, 0.5)
        );
    }
    println!("targets: p50 <= 100 us, p99 <= 1000 us (helper destinations)");
}
