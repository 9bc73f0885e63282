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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qemu_migration_helper::demo::parse_size;
use serde_json::json;

use support::end::End;
use support::helper::HelperVm;
use support::migrate::start_migration;
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::stats::{bench_requested, env_size, median, percentile, repeat};
use support::uffd::UffdGuest;
use support::util::{fill_mixed, xorshift, TempDir, MIB};

const TIMEOUT: Duration = Duration::from_secs(600);

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
                    let p = (xorshift(&mut x) % pages) as usize;
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
    let mut src = if from_qemu {
        let q = QemuVm::start(Qemu::V10, size, &VmOpts::default());
        fill_mixed(&mut q.ram_mmap(), 5, 0.0);
        End::Qemu(q)
    } else {
        let mut h = HelperVm::spawn_quiet();
        h.add_block("ram", size, false);
        fill_mixed(&mut h.blocks[0].mem.map(), 5, 0.0);
        End::Helper(h)
    };
    src.client().set_capabilities(&caps).expect("caps");
    src.client()
        .set_parameters(json!({"max-bandwidth": 16 * MIB, "max-postcopy-bandwidth": 0}))
        .expect("params");
    let dir = TempDir::new("qmh-bench");
    start_migration(src.client(), &mut dst.client, &dir, preempt);
    std::thread::sleep(Duration::from_millis(200));
    src.client().migrate_start_postcopy().expect("postcopy");
    dst.wait(&["postcopy-active", "completed"], TIMEOUT);
    let lat = touch_pages(&guest, Arc::new(AtomicBool::new(false)), 2);
    let v = dst.wait(&["completed"], TIMEOUT);
    src.wait(&["completed"], TIMEOUT);
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
    let dir = TempDir::new("qmh-bench");
    start_migration(src.qmp(), dst.qmp(), &dir, preempt);
    std::thread::sleep(Duration::from_millis(200));
    src.qmp().migrate_start_postcopy().expect("postcopy");
    dst.wait_migration(&["postcopy-active", "completed"], TIMEOUT)
        .expect("active");
    let pages = size / 4096;
    let mut missing = Vec::new();
    let mut present = Vec::new();
    let mut x = 12345u64;
    let t_end = Instant::now() + Duration::from_millis(800);
    while Instant::now() < t_end {
        let addr = (xorshift(&mut x) % pages) * 4096;
        let t0 = Instant::now();
        dst.hmp(&format!("xp /1xg {addr:#x}")).expect("xp");
        missing.push(t0.elapsed().as_secs_f64() * 1e6);
        // The same page again: now present.
        let t1 = Instant::now();
        dst.hmp(&format!("xp /1xg {addr:#x}")).expect("xp");
        present.push(t1.elapsed().as_secs_f64() * 1e6);
    }
    let base = median(&present);
    src.wait_migration(&["completed"], TIMEOUT)
        .expect("completes");
    dst.wait_migration(&["completed"], TIMEOUT)
        .expect("completes");
    (missing.iter().map(|m| (m - base).max(0.0)).collect(), base)
}

fn main() {
    if !bench_requested("postcopy") || require_qemu(Qemu::V10, "bench").is_none() {
        return;
    }
    let size = env_size("QMH_BENCH_PC_SIZE", "1G", parse_size);
    let repeat = repeat();
    println!(
        "postcopy fault latency: {} MiB guest, 4 KiB pages, Unix socketpair, background push unlimited, {repeat} runs each",
        size >> 20
    );
    // Helper destinations: (label, QEMU source, postcopy-preempt).
    let into = [
        ("helper->helper", false, false),
        ("helper->helper preempt", false, true),
        ("QEMU->helper", true, false),
        ("QEMU->helper preempt", true, true),
    ];
    // Per case: the parent's timed faults (all runs pooled) and the helper's own p50/p99.
    let mut parent: Vec<Vec<f64>> = vec![Vec::new(); into.len()];
    let mut own: Vec<Vec<(f64, f64)>> = vec![Vec::new(); into.len()];
    let (mut qq, mut qqp) = (Vec::new(), Vec::new());
    for r in 0..repeat {
        for (i, (name, from_qemu, preempt)) in into.iter().enumerate() {
            let (l, o) = into_helper(*from_qemu, *preempt, size);
            println!(
                "  run {r} {name}: {} faults timed by the parent; helper's own: {o}",
                l.len()
            );
            own[i].push((
                o["p50-us"].as_f64().unwrap_or(f64::NAN),
                o["p99-us"].as_f64().unwrap_or(f64::NAN),
            ));
            parent[i].extend(l);
        }
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
    let names = into.iter().map(|c| c.0);
    for (name, v) in names
        .zip(&parent)
        .chain([("QEMU->QEMU (xp)", &qq), ("QEMU->QEMU preempt (xp)", &qqp)])
    {
        println!(
            "{name:<24} {:>8} {:>10.1} {:>10.1}",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    }
    println!("as the helper reports it (fault read -> page placed; median over runs):");
    for ((name, _, _), v) in into.iter().zip(&own) {
        let p50: Vec<f64> = v.iter().map(|x| x.0).collect();
        let p99: Vec<f64> = v.iter().map(|x| x.1).collect();
        println!(
            "{name:<24} {:>8} {:>10.1} {:>10.1}",
            "",
            median(&p50),
            median(&p99)
        );
    }
    println!("targets: p50 <= 100 us, p99 <= 1000 us (helper destinations)");
}
