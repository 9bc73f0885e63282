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
//! Multifd in the same run (a helper source's RAM written by its parent before the helper
//! gets it and mapped ahead before the clock, as QEMU's and the floor's are): QEMU->QEMU
//! and helper->helper with the `multifd` capability and
//! the same number of channels (over a `unix:` listener: QEMU 10.0 refuses multifd on
//! `fd:`), beside the floor: a plain program in this process (threads, one Unix socketpair
//! per channel, writing from the source's memory and reading into the destination's, no
//! protocol) moving the same bytes over as many connections. It prints the ratios
//! helper/floor (wall, CPU) and helper against QEMU->QEMU multifd, and the helper
//! destination's peak RSS (VmHWM) with 4 channels.
//!
//! TLS (x509, TLS 1.3, certificates made by `support::tls` before the clock) in the same
//! run: QEMU->QEMU and helper->helper (and QEMU->helper, helper->QEMU), one channel and
//! multifd, each against the same case in clear text: "TLS costs at most 30%" is the
//! wall-time ratio printed as "TLS cost".
//!
//! Environment: QMH_BENCH_SIZE (default 2G), QMH_BENCH_REPEAT (default 3),
//! QMH_BENCH_CASES (default "qq,hh,qh,hq,qqm,hhm,floor"; qqm/hhm/qhm/hqm: QEMU->QEMU,
//! helper->helper, QEMU->helper and helper->QEMU multifd, floor: the plain program; with TLS:
//! qqt, hht, qht, hqt (one channel), qqtm, hhtm (multifd), each bringing its clear-text
//! case along), QMH_BENCH_CHANNELS (multifd channels,
//! a list such as "1,2,4"; default "2"), QMH_BENCH_DEST (default "fresh,prealloc"),
//! QMH_BENCH_RSS_SIZES (default "2G,4G"; empty skips), QMH_BENCH_LOAD_THREADS (the helper
//! destinations' `load-threads`; default: the helper's own default), QMH_BENCH_ZPD (the
//! multifd cases' `zero-page-detection` on every end, QEMU's too; default: theirs).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use qemu_migration_helper::demo::parse_size;
use qemu_migration_helper::demo::process_cpu_secs;
use serde_json::{json, Value};

use support::end::End;
use support::helper::{HelperVm, Memfd};
use support::map::RamMap;
use support::migrate::{pass_socketpair, socketpair, start_fd_migration};
use support::qemu::{require_qemu, Accel, Qemu, QemuVm, VmOpts};
use support::stats::{bench_requested, env_size, median, repeat};
use support::tls::{tls_destination, tls_source, Pki, ServerCert};
use support::util::{fill_mixed, peak_rss_kib, TempDir, GIB};

const TIMEOUT: Duration = Duration::from_secs(600);

/// With `mapped` (the multifd cases), a helper source gets RAM its parent has written
/// already and has mapped it ahead before the clock starts, as QEMU's own RAM and the
/// floor's source are mapped; otherwise the parent writes it after adding it, and the
/// helper maps its pages as it sends them.
fn source(qemu: bool, size: u64, seed: u64, mapped: bool) -> End {
    if qemu {
        let vm = QemuVm::start(Qemu::V10, size, &VmOpts::default());
        fill_mixed(&mut vm.ram_mmap(), seed, 0.0);
        End::Qemu(vm)
    } else {
        let mut h = HelperVm::spawn_quiet();
        if mapped {
            h.add_written_block("ram", size, |m| {
                fill_mixed(m, seed, 0.0);
            });
        } else {
            h.add_block("ram", size, false);
            fill_mixed(&mut h.blocks[0].mem.map(), seed, 0.0);
        }
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

/// With `channels`, both ends have the `multifd` capability and that many channels, and
/// the migration goes over a `unix:` listener of the destination's (QEMU 10.0 refuses
/// multifd on `fd:`); otherwise over a socketpair.
fn migrate_once(
    src_qemu: bool,
    dst_qemu: bool,
    size: u64,
    seed: u64,
    prealloc: bool,
    channels: Option<u8>,
    tls: bool,
) -> Timing {
    let (t, _, _) = migrate_measured(src_qemu, dst_qemu, size, seed, prealloc, channels, tls);
    t
}

/// `migrate_once`, also returning both ends (still running) for a look at their memory.
fn migrate_measured(
    src_qemu: bool,
    dst_qemu: bool,
    size: u64,
    seed: u64,
    prealloc: bool,
    channels: Option<u8>,
    tls: bool,
) -> (Timing, End, End) {
    let mut src = source(src_qemu, size, seed, channels.is_some());
    let mut dst = destination(dst_qemu, size, prealloc);
    let dir = TempDir::new("qmh-bench");
    // Certificates made (and loaded by both ends) before the clock starts; the handshake
    // itself is timed, as it is part of every migration.
    let _pki = tls.then(|| {
        let pki = Pki::new();
        tls_source(src.client(), &pki.client_dir());
        tls_destination(dst.client(), &pki.server_dir(ServerCert::Good), None);
        pki
    });
    let uri = match channels {
        Some(n) => {
            for end in [&mut src, &mut dst] {
                let c = end.client();
                c.set_capabilities(&[("multifd", true)]).expect("multifd");
                c.set_parameters(json!({ "multifd-channels": n }))
                    .expect("multifd-channels");
                if let Ok(z) = std::env::var("QMH_BENCH_ZPD") {
                    c.set_parameters(json!({ "zero-page-detection": z }))
                        .expect("zero-page-detection");
                }
            }
            format!("unix:{}", dir.join("mig.sock").display())
        }
        None => {
            pass_socketpair(src.client(), dst.client(), "mig");
            "fd:mig".to_string()
        }
    };
    dst.client().migrate_incoming(&uri).expect("incoming");
    let params = match src {
        End::Qemu(_) => json!({"max-bandwidth": 100 * GIB, "downtime-limit": 300}),
        End::Helper(_) => json!({"max-bandwidth": 0}),
    };
    src.client().set_parameters(params).expect("params");
    let cpu0 = (process_cpu_secs(src.pid()), process_cpu_secs(dst.pid()));
    let t0 = Instant::now();
    src.client().migrate(&uri).expect("migrate");
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
    if channels.is_some() {
        for end in [&mut src, &mut dst] {
            if let End::Helper(_) = end {
                let v = end.client().query_migrate().expect("query-migrate");
                let b = v["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
                assert!(b >= size / 2, "multifd-bytes {b} for {size} bytes: {v}");
            }
        }
    }
    (timing, src, dst)
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

/// CPU seconds the calling thread has used.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The floor: `channels` writer threads each send their share of `size` bytes straight
/// from the source's memory (a memfd, as the helper's parent holds it) into a Unix
/// socketpair, and as many reader threads read it straight into the destination's memory
/// (a fresh memfd, or one preallocated as the helper's parent does); no protocol, no
/// copies. Wall time from the start line until every reader has its share; CPU seconds of
/// the writers (source) and of the readers (destination).
fn floor_once(size: u64, channels: u8, seed: u64, prealloc: bool) -> Timing {
    // One mapping each, written before the clock: the pages are in this process's page
    // tables, as the helper's are after it mapped a preallocated block ahead.
    let src = Memfd::new("floor-src", size);
    let mut smap = src.map();
    fill_mixed(&mut smap, seed, 0.0);
    let dst = Memfd::new("floor-dst", size);
    let mut dmap = dst.map();
    if prealloc {
        dmap.fill(0);
    }
    let (smap, dmap) = (Arc::new(smap), Arc::new(dmap));
    let n = channels as u64;
    let pages = size / 4096;
    // Channel k moves pages [k * pages / n, (k + 1) * pages / n).
    let range = move |k: u64| (k * pages / n * 4096, (k + 1) * pages / n * 4096);
    let start = Arc::new(Barrier::new(2 * channels as usize + 1));
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for k in 0..n {
        let (a, b) = socketpair();
        let (lo, hi) = range(k);
        let (smap, start_w) = (smap.clone(), start.clone());
        writers.push(std::thread::spawn(move || {
            let mut s = std::fs::File::from(a);
            start_w.wait();
            let c0 = thread_cpu_secs();
            s.write_all(&smap[lo as usize..hi as usize])
                .expect("floor write");
            thread_cpu_secs() - c0
        }));
        let (dmap, start_r) = (dmap.clone(), start.clone());
        readers.push(std::thread::spawn(move || {
            let mut s = std::fs::File::from(b);
            let base = dmap.as_ptr() as *mut u8;
            // SAFETY: [lo, hi) lies inside the mapping, which `dmap` keeps alive for this
            // thread; each reader writes only its own range and nothing else reads or
            // writes the destination until every reader is joined.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(base.add(lo as usize), (hi - lo) as usize)
            };
            start_r.wait();
            let c0 = thread_cpu_secs();
            s.read_exact(buf).expect("floor read");
            thread_cpu_secs() - c0
        }));
    }
    start.wait();
    let t0 = Instant::now();
    let dst_cpu: f64 = readers.into_iter().map(|h| h.join().expect("reader")).sum();
    let secs = t0.elapsed().as_secs_f64();
    let src_cpu: f64 = writers.into_iter().map(|h| h.join().expect("writer")).sum();
    assert!(
        smap[..] == dmap[..],
        "floor: the destination differs from the source"
    );
    Timing {
        secs,
        src_cpu,
        dst_cpu,
    }
}

/// What one benchmark case runs.
#[derive(Clone, Copy)]
enum Kind {
    Migrate {
        src_qemu: bool,
        dst_qemu: bool,
        channels: Option<u8>,
        tls: bool,
    },
    Floor {
        channels: u8,
    },
}

struct Case {
    name: String,
    kind: Kind,
}

fn run_case(kind: Kind, size: u64, seed: u64, prealloc: bool) -> Timing {
    match kind {
        Kind::Migrate {
            src_qemu,
            dst_qemu,
            channels,
            tls,
        } => migrate_once(src_qemu, dst_qemu, size, seed, prealloc, channels, tls),
        Kind::Floor { channels } => floor_once(size, channels, seed, prealloc),
    }
}

/// The helper destination after a helper->helper multifd migration of `size` with
/// `channels` channels into fresh memory, still running: its peak resident memory (VmHWM,
/// the kernel's high-water mark, which counts the guest's shared pages it mapped) and its
/// RssAnon and RssShmem then, in KiB.
fn multifd_rss(size: u64, channels: u8) -> (u64, u64, u64) {
    let (_, _src, dst) = migrate_measured(false, false, size, 7, false, Some(channels), false);
    let hwm = peak_rss_kib(dst.pid());
    let status = std::fs::read_to_string(format!("/proc/{}/status", dst.pid())).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (hwm, kib("RssAnon:"), kib("RssShmem:"))
}

fn main() {
    if !bench_requested("migration") || require_qemu(Qemu::V10, "bench").is_none() {
        return;
    }
    let size = env_size("QMH_BENCH_SIZE", "2G", parse_size);
    let repeat = repeat();
    println!(
        "precopy benchmark: {} MiB of incompressible RAM, Unix socketpair (multifd: unix: listener), {repeat} runs each, QEMU accel {:?}",
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
    // QMH_BENCH_CASES picks cases. QEMU->QEMU is the baseline of the plain cases and runs
    // with any of them; QEMU->QEMU multifd (qqm) runs with helper->helper multifd (hhm).
    let pick =
        std::env::var("QMH_BENCH_CASES").unwrap_or_else(|_| "qq,hh,qh,hq,qqm,hhm,floor".into());
    let picked: Vec<&str> = pick.split(',').map(str::trim).collect();
    const KNOWN: [&str; 15] = [
        "qq", "hh", "qh", "hq", "qqm", "hhm", "qhm", "hqm", "floor", "qqt", "hht", "qht", "hqt",
        "qqtm", "hhtm",
    ];
    for k in &picked {
        assert!(
            KNOWN.contains(k),
            "QMH_BENCH_CASES: unknown case {k:?} ({})",
            KNOWN.join(", ")
        );
    }
    // A TLS case brings its clear-text case along (qqt: qq, hhtm: hhm), for the ratio.
    let has = |k: &str| {
        picked.contains(&k)
            || (k.len() == 2 && picked.contains(&format!("{k}t").as_str()))
            || (k.ends_with('m') && picked.contains(&format!("{}tm", &k[..2]).as_str()))
    };
    let channel_list: Vec<u8> = std::env::var("QMH_BENCH_CHANNELS")
        .unwrap_or_else(|_| "2".into())
        .split(',')
        .map(|c| {
            c.trim()
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or_else(|| panic!("QMH_BENCH_CHANNELS: {c:?} is not 1 to 255"))
        })
        .collect();
    let mut cases: Vec<Case> = Vec::new();
    let plain = [
        ("qq", "QEMU->QEMU", true, true, false),
        ("hh", "helper->helper", false, false, false),
        ("qh", "QEMU->helper", true, false, false),
        ("hq", "helper->QEMU", false, true, false),
        ("qqt", "QEMU->QEMU TLS", true, true, true),
        ("hht", "helper->helper TLS", false, false, true),
        ("qht", "QEMU->helper TLS", true, false, true),
        ("hqt", "helper->QEMU TLS", false, true, true),
    ];
    let any_plain = plain.iter().any(|p| has(p.0));
    for (i, (key, name, sq, dq, tls)) in plain.iter().enumerate() {
        if (i == 0 && any_plain) || has(key) {
            cases.push(Case {
                name: name.to_string(),
                kind: Kind::Migrate {
                    src_qemu: *sq,
                    dst_qemu: *dq,
                    channels: None,
                    tls: *tls,
                },
            });
        }
    }
    let n_plain = cases.len();
    for &c in &channel_list {
        if ["qqm", "hhm", "qhm", "hqm"].iter().any(|k| has(k)) {
            cases.push(Case {
                name: format!("QEMU->QEMU multifd {c}"),
                kind: Kind::Migrate {
                    src_qemu: true,
                    dst_qemu: true,
                    channels: Some(c),
                    tls: false,
                },
            });
        }
        if has("hhm") {
            cases.push(Case {
                name: format!("helper->helper multifd {c}"),
                kind: Kind::Migrate {
                    src_qemu: false,
                    dst_qemu: false,
                    channels: Some(c),
                    tls: false,
                },
            });
        }
        for (k, name, qemu) in [
            ("qqtm", "QEMU->QEMU TLS multifd", true),
            ("hhtm", "helper->helper TLS multifd", false),
        ] {
            if has(k) {
                cases.push(Case {
                    name: format!("{name} {c}"),
                    kind: Kind::Migrate {
                        src_qemu: qemu,
                        dst_qemu: qemu,
                        channels: Some(c),
                        tls: true,
                    },
                });
            }
        }
        for (k, name, src_qemu) in [
            ("qhm", "QEMU->helper multifd", true),
            ("hqm", "helper->QEMU multifd", false),
        ] {
            if has(k) {
                cases.push(Case {
                    name: format!("{name} {c}"),
                    kind: Kind::Migrate {
                        src_qemu,
                        dst_qemu: !src_qemu,
                        channels: Some(c),
                        tls: false,
                    },
                });
            }
        }
        if has("floor") {
            cases.push(Case {
                name: format!("floor {c} socketpairs"),
                kind: Kind::Floor { channels: c },
            });
        }
    }
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
                let case = &cases[i];
                let t = run_case(case.kind, size, 1000 + r as u64, prealloc);
                let mode = if prealloc { "prealloc" } else { "fresh" };
                println!(
                    "  run {r} {mode:<8} {:<30} {:7.3} s   CPU s: source {:6.3} destination {:6.3}",
                    case.name, t.secs, t.src_cpu, t.dst_cpu
                );
                times[di][i].push(t);
            }
        }
    }
    for (di, &prealloc) in dests.iter().enumerate() {
        let times = &times[di];
        let col =
            |i: usize, f: fn(&Timing) -> f64| median(&times[i].iter().map(f).collect::<Vec<_>>());
        println!(
            "\ndestination RAM {}",
            if prealloc {
                "preallocated before the clock starts (QEMU prealloc=on; the helper's parent filled its memfd before adding it, and the helper mapped it ahead; the floor's destination memfd written once)"
            } else {
                "fresh: every page allocated (and, on a VM, backed by the host) as it is written"
            }
        );
        if n_plain > 0 {
            let base = col(0, |t| t.secs);
            println!(
                "{:<20} {:>9} {:>9} {:>13} {:>9} {:>9} {:>9} {:>10}",
                "case",
                "median s",
                "MB/s",
                "vs QEMU->QEMU",
                "src CPU s",
                "dst CPU s",
                "floor s",
                "best ratio"
            );
            for (i, case) in cases.iter().enumerate().take(n_plain) {
                let m = col(i, |t| t.secs);
                // The least wall time this much CPU work allows on this machine's CPUs, and
                // the ratio that would give.
                let (sc, dc) = (col(i, |t| t.src_cpu), col(i, |t| t.dst_cpu));
                let floor = (sc + dc) / cpus;
                println!(
                    "{:<20} {m:9.3} {:9.0} {:>12.2}x {sc:9.3} {dc:9.3} {floor:9.3} {:>9.2}x",
                    case.name,
                    size as f64 / m / 1e6,
                    base / m,
                    base / floor
                );
            }
        }
        if cases.len() > n_plain {
            println!(
                "\n{:<30} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "multifd case", "median s", "MB/s", "src CPU s", "dst CPU s", "CPU s"
            );
        }
        for (i, case) in cases.iter().enumerate().skip(n_plain) {
            let (m, sc, dc) = (
                col(i, |t| t.secs),
                col(i, |t| t.src_cpu),
                col(i, |t| t.dst_cpu),
            );
            println!(
                "{:<30} {m:9.3} {:9.0} {sc:9.3} {dc:9.3} {:9.3}",
                case.name,
                size as f64 / m / 1e6,
                sc + dc
            );
        }
        // TLS against clear text, the same case in the same run.
        let mut tls_lines = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let clear_name = case.name.replace(" TLS", "");
            if clear_name == case.name {
                continue;
            }
            if let Some(j) = cases.iter().position(|k| k.name == clear_name) {
                let wall = |i: usize| col(i, |t| t.secs);
                let cpu = |i: usize, f: fn(&Timing) -> f64| col(i, f);
                tls_lines.push(format!(
                    "TLS cost: {:<28} wall {:.2}x ({:.0} vs {:.0} MB/s), CPU source {:.2}x destination {:.2}x",
                    case.name,
                    wall(i) / wall(j),
                    size as f64 / wall(i) / 1e6,
                    size as f64 / wall(j) / 1e6,
                    cpu(i, |t| t.src_cpu) / cpu(j, |t| t.src_cpu).max(1e-9),
                    cpu(i, |t| t.dst_cpu) / cpu(j, |t| t.dst_cpu).max(1e-9),
                ));
            }
        }
        if !tls_lines.is_empty() {
            println!();
            for l in &tls_lines {
                println!("{l}");
            }
            println!("TLS cost target: wall <= 1.30x the clear-text case (TLS over clear)");
        }
        for &c in &channel_list {
            let find = |prefix: &str| {
                cases.iter().position(|k| {
                    k.name == format!("{prefix} {c}")
                        || k.name == format!("{prefix} {c} socketpairs")
                })
            };
            let (qq, hh, fl) = (
                find("QEMU->QEMU multifd"),
                find("helper->helper multifd"),
                find("floor"),
            );
            let wall = |i: usize| col(i, |t| t.secs);
            let cpu = |i: usize| col(i, |t| t.src_cpu + t.dst_cpu);
            if let (Some(h), Some(f)) = (hh, fl) {
                println!(
                    "{c} channels: helper/floor wall {:.2}x, CPU {:.2}x",
                    wall(h) / wall(f),
                    cpu(h) / cpu(f)
                );
            }
            if let (Some(q), Some(h)) = (qq, hh) {
                println!(
                    "{c} channels: helper->helper multifd vs QEMU->QEMU multifd {:.2}x (QEMU's wall over the helper's), CPU {:.2}x (the helper's over QEMU's)",
                    wall(q) / wall(h),
                    cpu(h) / cpu(q)
                );
            }
            // A helper at one end, against QEMU at both.
            for one in ["QEMU->helper multifd", "helper->QEMU multifd"] {
                if let (Some(q), Some(o)) = (qq, find(one)) {
                    println!(
                        "{c} channels: {one} vs QEMU->QEMU multifd {:.2}x (QEMU's wall over it), CPU {:.2}x",
                        wall(q) / wall(o),
                        cpu(o) / cpu(q)
                    );
                }
            }
            if let (Some(q), Some(f)) = (qq, fl) {
                println!(
                    "{c} channels: QEMU->QEMU multifd/floor wall {:.2}x, CPU {:.2}x",
                    wall(q) / wall(f),
                    cpu(q) / cpu(f)
                );
            }
        }
    }
    if n_plain > 0 {
        println!("targets: helper->helper >= 2.00x; QEMU->helper and helper->QEMU >= 1.00x");
        println!(
            "floor: (source + destination CPU seconds) / {cpus} CPUs, the least wall time that much work \
             allows here if both CPUs were busy all the time; best ratio: QEMU->QEMU's median over it"
        );
    }
    if cases.len() > n_plain {
        println!(
            "multifd floor: a plain program moving the same bytes over the same number of Unix \
             socketpairs (a thread per end and channel, no protocol); CPU s: source + destination"
        );
    }
    if has("hhm") {
        let (hwm, anon, shmem) = multifd_rss(size, 4);
        println!(
            "\nhelper destination after helper->helper multifd, 4 channels, {} MiB fresh: VmHWM {hwm} KiB (RssAnon {anon} KiB, RssShmem {shmem} KiB: the guest's own shared pages, mapped)",
            size >> 20
        );
    }

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
