//! Precopy throughput benchmark: `cargo bench --bench migration`.
//!
//! In one run, migrates the same amount of incompressible RAM over a Unix socketpair
//! QEMU->QEMU, helper->helper, QEMU->helper and helper->QEMU, several times each, and prints
//! the median seconds, MB/s and the ratio against QEMU->QEMU measured in the same run (QEMU
//! on KVM where /dev/kvm exists). Then reports the helpers' peak memory at two guest sizes.
//!
//! Both with the destination's RAM fresh (allocated as it is written) and preallocated
//! before the clock starts: on a VM whose host takes back freed memory (this machine has a
//! balloon with free-page reporting), a first touch of a page costs the host a fault, and
//! that cost, the same for every destination, otherwise dominates the run.
//!
//! Environment: QMH_BENCH_SIZE (default 2G), QMH_BENCH_REPEAT (default 3),
//! QMH_BENCH_CASES (default "qq,hh,qh,hq"), QMH_BENCH_DEST (default "fresh,prealloc"),
//! QMH_BENCH_RSS_SIZES (default "2G,4G"; empty skips), QMH_BENCH_LOAD_THREADS (the helper
//! destinations' `load-threads`; default: the helper's own default).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_migration_helper::demo::parse_size;
use qemu_migration_helper::demo::process_cpu_secs;
use serde_json::{json, Value};

use support::end::End;
use support::helper::HelperVm;
use support::map::RamMap;
use support::migrate::{pass_socketpair, start_fd_migration};
use support::qemu::{require_qemu, Accel, Qemu, QemuVm, VmOpts};
use support::stats::{bench_requested, env_size, median, repeat};
use support::util::{fill_mixed, GIB};

const TIMEOUT: Duration = Duration::from_secs(600);

fn source(qemu: bool, size: u64, seed: u64) -> End {
    if qemu {
        let vm = QemuVm::start(Qemu::V10, size, &VmOpts::default());
        fill_mixed(&mut vm.ram_mmap(), seed, 0.0);
        End::Qemu(vm)
    } else {
        let mut h = HelperVm::spawn_quiet();
        h.add_block("ram", size, false);
        fill_mixed(&mut h.blocks[0].mem.map(), seed, 0.0);
        End::Helper(h)
    }
}

/// With `prealloc`, the destination's RAM is allocated and touched before the clock
/// starts: QEMU with `prealloc=on`, the helper's parent by writing every page of its
/// memfd before adding it (what a VMM that preallocates guest memory does), and the
/// helper has mapped those pages (`mapped-ahead`), as QEMU has mapped its own.
fn destination(qemu: bool, size: u64, prealloc: bool) -> End {
    if qemu {
        let opts = VmOpts {
            prealloc,
            ..VmOpts::incoming()
        };
        End::Qemu(QemuVm::start(Qemu::V10, size, &opts))
    } else {
        let mut h = HelperVm::spawn_quiet();
        if prealloc {
            // As a VMM that preallocates guest RAM does: allocated before the helper
            // gets it, and (like QEMU's prealloc at start-up) mapped before the clock.
            h.add_preallocated_block("ram", size, 0);
        } else {
            h.add_block("ram", size, false);
        }
        if let Ok(n) = std::env::var("QMH_BENCH_LOAD_THREADS") {
            let n: u64 = n.parse().expect("QMH_BENCH_LOAD_THREADS: a number");
            h.client
                .set_parameters(json!({ "load-threads": n }))
                .expect("load-threads");
        }
        End::Helper(h)
    }
}

/// One timed migration: wall seconds from `migrate` until both ends report `completed`,
/// and the CPU seconds each end's process used meanwhile.
#[derive(Clone, Copy)]
struct Timing {
    secs: f64,
    src_cpu: f64,
    dst_cpu: f64,
}

fn migrate_once(src_qemu: bool, dst_qemu: bool, size: u64, seed: u64, prealloc: bool) -> Timing {
    let mut src = source(src_qemu, size, seed);
    let mut dst = destination(dst_qemu, size, prealloc);
    pass_socketpair(src.client(), dst.client(), "mig");
    dst.client().migrate_incoming("fd:mig").expect("incoming");
    let params = match src {
        End::Qemu(_) => json!({"max-bandwidth": 100 * GIB, "downtime-limit": 300}),
        End::Helper(_) => json!({"max-bandwidth": 0}),
    };
    src.client().set_parameters(params).expect("params");
    let cpu0 = (process_cpu_secs(src.pid()), process_cpu_secs(dst.pid()));
    let t0 = Instant::now();
    src.client().migrate("fd:mig").expect("migrate");
    let (mut src_done, mut dst_done) = (false, false);
    while !(src_done && dst_done) {
        for (done, end) in [(&mut src_done, &mut src), (&mut dst_done, &mut dst)] {
            if !*done {
                let v: Value = end.client().query_migrate().expect("query-migrate");
                match v["status"].as_str() {
                    Some("completed") => *done = true,
                    Some("failed") | Some("cancelled") => panic!("migration failed: {v}"),
                    _ => {}
                }
            }
        }
        assert!(t0.elapsed() < TIMEOUT, "migration took too long");
        std::thread::sleep(Duration::from_millis(2));
    }
    let secs = t0.elapsed().as_secs_f64();
    let timing = Timing {
        secs,
        src_cpu: process_cpu_secs(src.pid()) - cpu0.0,
        dst_cpu: process_cpu_secs(dst.pid()) - cpu0.1,
    };
    // Spot-check the content: a benchmark of a broken migration means nothing.
    let (s, d) = (sample(&src.ram()), sample(&dst.ram()));
    assert_eq!(s, d, "destination differs from source");
    timing
}

/// Every 97th page's first and last 64 bytes of `ram`.
fn sample(ram: &RamMap) -> Vec<u8> {
    let mut v = Vec::new();
    for p in (0..ram.len() / 4096).step_by(97) {
        let o = p * 4096;
        v.extend_from_slice(&ram[o..o + 64]);
        v.extend_from_slice(&ram[o + 4032..o + 4096]);
    }
    v
}

/// Peak private (anonymous) and shared resident memory of a process, sampled.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, u64)>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut anon, mut shmem) = (0u64, 0u64);
            while !s.load(Ordering::Relaxed) {
                if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    for l in st.lines() {
                        let kb = |l: &str| {
                            l.split_whitespace()
                                .nth(1)
                                .and_then(|n| n.parse::<u64>().ok())
                                .unwrap_or(0)
                        };
                        if l.starts_with("RssAnon:") {
                            anon = anon.max(kb(l));
                        } else if l.starts_with("RssShmem:") {
                            shmem = shmem.max(kb(l));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (anon, shmem)
        });
        RssSampler { stop, handle }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or((0, 0))
    }
}

/// helper->helper at `size`, sampling both helpers' memory; returns KiB peaks.
fn rss_run(size: u64) -> [(u64, u64); 2] {
    let mut src = HelperVm::spawn_quiet();
    src.add_block("ram", size, false);
    fill_mixed(&mut src.blocks[0].mem.map(), 7, 0.0);
    let mut dst = HelperVm::spawn_quiet();
    dst.add_block("ram", size, false);
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let samplers = [RssSampler::start(src.pid()), RssSampler::start(dst.pid())];
    start_fd_migration(&mut src.client, &mut dst.client);
    src.wait(&["completed"], TIMEOUT);
    dst.wait(&["completed"], TIMEOUT);
    let [s, d] = samplers;
    [s.finish(), d.finish()]
}

fn main() {
    if !bench_requested("migration") || require_qemu(Qemu::V10, "bench").is_none() {
        return;
    }
    let size = env_size("QMH_BENCH_SIZE", "2G", parse_size);
    let repeat = repeat();
    println!(
        "precopy benchmark: {} MiB of incompressible RAM, Unix socketpair, {repeat} runs each, QEMU accel {:?}",
        size >> 20,
        Accel::detect()
    );
    // Warm the machine's memory first: on a VM whose host backs guest memory lazily, the
    // first touch of a page costs far more than later ones, and whichever case ran first
    // would pay for it. Touch (and free) as much as the largest case uses, for all cases.
    // Off by default: measured here, touching 8 GiB of fresh memory took 17.8 s, and the
    // runs that followed were no steadier (freed memory seems to go back to the host).
    let warm = std::env::var("QMH_BENCH_WARM").is_ok_and(|v| v == "1");
    if warm {
        let t = Instant::now();
        let n = (size * 4) as usize;
        // Zeroed by the allocator without touching the pages (fresh mmap); written below.
        let mut v: Vec<u8> = vec![0u8; n];
        for p in v.chunks_mut(4096) {
            p[0] = 1;
        }
        drop(v);
        println!(
            "warmed {} MiB of memory in {:.1} s (QMH_BENCH_WARM=1)",
            (size * 4) >> 20,
            t.elapsed().as_secs_f64()
        );
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cases = [
        ("QEMU->QEMU", true, true),
        ("helper->helper", false, false),
        ("QEMU->helper", true, false),
        ("helper->QEMU", false, true),
    ];
    // QMH_BENCH_CASES=qq,hh,qh,hq picks cases (QEMU->QEMU is the baseline and always runs).
    let pick = std::env::var("QMH_BENCH_CASES").unwrap_or_else(|_| "qq,hh,qh,hq".into());
    let keys = ["qq", "hh", "qh", "hq"];
    // QMH_BENCH_DEST=fresh,prealloc picks how the destination's RAM starts: untouched
    // (each page allocated as the migration writes it) or preallocated before the clock.
    let dests: Vec<bool> = std::env::var("QMH_BENCH_DEST")
        .unwrap_or_else(|_| "fresh,prealloc".into())
        .split(',')
        .map(|d| match d {
            "fresh" => false,
            "prealloc" => true,
            other => panic!("QMH_BENCH_DEST: {other:?} is neither fresh nor prealloc"),
        })
        .collect();
    // Interleave the cases so that machine noise spreads over all of them.
    let mut times: Vec<Vec<Vec<Timing>>> = vec![vec![Vec::new(); cases.len()]; dests.len()];
    for r in 0..repeat {
        for (di, &prealloc) in dests.iter().enumerate() {
            // Each run starts with another case: how costly a first touch is depends on
            // what the machine freed just before (a host takes freed memory back after a
            // while), so no case should always run in the same place.
            for k in 0..cases.len() {
                let i = (k + r) % cases.len();
                let (name, sq, dq) = &cases[i];
                if i > 0 && !pick.split(',').any(|k| k == keys[i]) {
                    continue;
                }
                let t = migrate_once(*sq, *dq, size, 1000 + r as u64, prealloc);
                let mode = if prealloc { "prealloc" } else { "fresh" };
                println!(
                    "  run {r} {mode:<8} {name:<15} {:7.3} s   CPU s: source {:6.3} destination {:6.3}",
                    t.secs, t.src_cpu, t.dst_cpu
                );
                times[di][i].push(t);
            }
        }
    }
    for (di, &prealloc) in dests.iter().enumerate() {
        let times = &times[di];
        let col =
            |i: usize, f: fn(&Timing) -> f64| median(&times[i].iter().map(f).collect::<Vec<_>>());
        let base = col(0, |t| t.secs);
        println!(
            "\ndestination RAM {}",
            if prealloc {
                "preallocated before the clock starts (QEMU prealloc=on; the helper's parent filled its memfd before adding it, and the helper mapped it ahead)"
            } else {
                "fresh: every page allocated (and, on a VM, backed by the host) as it is written"
            }
        );
        println!(
            "{:<15} {:>9} {:>9} {:>13} {:>9} {:>9} {:>9} {:>10}",
            "case",
            "median s",
            "MB/s",
            "vs QEMU->QEMU",
            "src CPU s",
            "dst CPU s",
            "floor s",
            "best ratio"
        );
        for (i, (name, _, _)) in cases.iter().enumerate() {
            if times[i].is_empty() {
                continue;
            }
            let m = col(i, |t| t.secs);
            // The least wall time this much CPU work allows on this machine's CPUs, and
            // the ratio that would give.
            let (sc, dc) = (col(i, |t| t.src_cpu), col(i, |t| t.dst_cpu));
            let floor = (sc + dc) / cpus;
            println!(
                "{name:<15} {m:9.3} {:9.0} {:>12.2}x {sc:9.3} {dc:9.3} {floor:9.3} {:>9.2}x",
                size as f64 / m / 1e6,
                base / m,
                base / floor
            );
        }
    }
    println!("targets: helper->helper >= 2.00x; QEMU->helper and helper->QEMU >= 1.00x");
    println!(
        "floor: (source + destination CPU seconds) / {cpus} CPUs, the least wall time that much work \
         allows here if both CPUs were busy all the time; best ratio: QEMU->QEMU's median over it"
    );

    let sizes = std::env::var("QMH_BENCH_RSS_SIZES").unwrap_or_else(|_| "2G,4G".into());
    if sizes.is_empty() {
        return;
    }
    println!("\nhelper memory during helper->helper (peak RssAnon = private; RssShmem = the guest's own shared pages, mapped, not copied)");
    for s in sizes.split(',') {
        let sz = parse_size(s).unwrap_or_else(|e| panic!("QMH_BENCH_RSS_SIZES: {e}"));
        let [src, dst] = rss_run(sz);
        println!(
            "  guest {:>5} MiB: source RssAnon {:>7} KiB RssShmem {:>8} KiB | destination RssAnon {:>7} KiB RssShmem {:>8} KiB",
            sz >> 20,
            src.0,
            src.1,
            dst.0,
            dst.1
        );
    }
}
