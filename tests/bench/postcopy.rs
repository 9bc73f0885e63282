//! Postcopy page-fault latency as the parent's vCPUs would see it: `cargo bench --bench
//! postcopy`.
//!
//! helper->helper and QEMU 10.0->helper, each without and with postcopy-preempt (over a Unix
//! socketpair, or a `unix:` listener for preempt's second channel), a guest of random
//! content (no zero pages), 4 KiB pages, 200 ms of precopy at 16 MiB/s and then the
//! background push at full speed (max-postcopy-bandwidth 0). The bench is the destination's
//! parent VMM: from postcopy-active until the destination completes, reader threads touch
//! random pages of its userfaultfd-registered mapping. A touch is timed when mincore(2)
//! found the page missing just before (a touch of a present page costs nothing and is not
//! one of the faults asked about), in two patterns:
//! - dense: QMH_BENCH_DENSE_THREADS threads (default 3), each touching the next missing page
//!   as soon as the last one came;
//! - sparse: one thread, QMH_BENCH_SPARSE_GAP_US (default 500) between touches.
//!
//! Per case: p50/p99 over the whole postcopy and per quarter of the touches (in the order
//! they were made, all runs pooled); beside them the helper's own figures (fault read ->
//! page placed: `x-postcopy-latency` and the upper bounds of the `postcopy-latency-dist`
//! buckets holding its p50/p99, medians over runs), the CPU seconds each end used during
//! the postcopy phase, and the destination's drain rate (MiB/s placed) per quarter of that
//! phase, from mincore(2) over the whole guest every 250 ms, with the mean bytes waiting in
//! the destination's end of the socketpair (FIONREAD on a copy of it; not with preempt,
//! whose `unix:` listener the bench has no end of). QEMU->QEMU is measured the only way QEMU 10.0 allows from outside
//! without running a guest: the monitor's `xp` on a missing page minus `xp` on the same page
//! once present, over the whole postcopy phase too (one reader, paced by the monitor).
//!
//! Beside them, the host's scheduling floor over the same phase: how late a thread that
//! sleeps 500 us wakes (p50/p99); every fault needs several such wake-ups.
//!
//! Environment: QMH_BENCH_PC_ZERO_PCT (default 0: no zero pages), QMH_BENCH_PC_SIZE (default
//! 1G), QMH_BENCH_REPEAT (default 3), the two above, and QMH_BENCH_PC_BW: the source's
//! max-postcopy-bandwidth in MiB/s (default 0, unlimited; the targets are for that). A limit
//! leaves the 2 CPUs partly idle, which shows how much of the latency is CPU contention
//! between the background push, the placing and the faulting threads. QMH_BENCH_PC_CASES:
//! comma-separated parts of the case names to run (default: all), for A/B runs.
//! Smoke run (checks the bench, measures nothing): QMH_BENCH_PC_SIZE=64M QMH_BENCH_REPEAT=1.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qemu_migration_helper::client::HelperClient;
use qemu_migration_helper::demo::{parse_size, process_cpu_secs};
use serde_json::{json, Value};

use support::end::End;
use support::helper::HelperVm;
use support::map::RamMap;
use support::migrate::{socketpair, start_fd_migration_over, start_migration};
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::stats::{
    bench_requested, dist_quantile_us, env_size, env_u64, latency_dist, median, percentile, repeat,
};
use support::uffd::UffdGuest;
use support::util::{fill_mixed, xorshift, TempDir, MIB};

const TIMEOUT: Duration = Duration::from_secs(600);
const PAGE: usize = 4096;

/// How the parent's threads touch the guest.
#[derive(Clone, Copy)]
enum Pattern {
    /// This many threads, back to back.
    Dense(usize),
    /// One thread, this long between touches.
    Sparse(Duration),
}

impl Pattern {
    fn label(&self) -> String {
        match self {
            Pattern::Dense(n) => format!("dense x{n}"),
            Pattern::Sparse(g) => format!("sparse {}us", g.as_micros()),
        }
    }
}

/// Timed touches: when (since the readers started) and how long, in microseconds.
type Touches = Vec<(Duration, f64)>;

/// Whether `page` of the mapping is in the memfd (received or placed). One that is not
/// faults into the helper when touched.
fn resident(map: &RamMap, page: usize) -> bool {
    let mut v = 0u8;
    // SAFETY: one page inside the mapping; mincore only reports, it faults nothing in.
    let r = unsafe { libc::mincore(map.as_ptr().add(page * PAGE) as *mut _, PAGE, &mut v) };
    r == 0 && v & 1 == 1
}

/// A random page still missing, if one of a few thousand tries finds one.
fn missing_page(map: &RamMap, x: &mut u64) -> Option<usize> {
    let pages = (map.len() / PAGE) as u64;
    (0..4096)
        .map(|_| (xorshift(x) % pages) as usize)
        .find(|&p| !resident(map, p))
}

/// How many pages of the mapping are in place.
fn resident_pages(map: &RamMap) -> usize {
    let mut v = vec![0u8; map.len() / PAGE];
    // SAFETY: the whole mapping, one status byte per page in `v`; mincore faults nothing in.
    let r = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().filter(|b| *b & 1 == 1).count()
}

/// How often [`Drain`] samples the socket's queue (FIONREAD, cheap).
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// Every how many of those samples [`Drain`] also counts the pages in place: a mincore(2)
/// over a 1 GiB guest took 1-31 ms during the runs (5 ms median), so every 50 ms it took
/// about a tenth of one of the 2 CPUs that the measured threads share.
const RESIDENT_EVERY: usize = 5;

/// Bytes waiting in the receive queue of socket `fd` (FIONREAD).
fn queued_bytes(fd: &OwnedFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// The destination's drain rate as the postcopy goes on: with `probe` (a copy of the
/// destination's end of a socketpair) a thread samples the bytes queued for it every
/// [`DRAIN_EVERY`], and counts the pages in place every [`RESIDENT_EVERY`] samples and at
/// the end, until stopped (a sampler, so it wakes on a period).
struct Drain {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<DrainSample>>,
}

/// When, the pages in place (when counted), the bytes queued (with a probe).
type DrainSample = (Duration, Option<usize>, Option<usize>);

/// Per quarter of the time: MiB/s placed, and the mean KiB queued in the socket.
struct Drained {
    rate: [f64; 4],
    queued: Option<[f64; 4]>,
}

impl Drain {
    fn start(map: Arc<RamMap>, probe: Option<OwnedFd>) -> Drain {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut samples: Vec<DrainSample> = Vec::new();
            loop {
                let done = s.load(Ordering::Relaxed);
                let q = probe.as_ref().map(queued_bytes);
                let count = done || samples.len() % RESIDENT_EVERY == 0;
                let placed = count.then(|| resident_pages(&map));
                samples.push((t0.elapsed(), placed, q));
                if done {
                    // Drops the probe: the socket closes when both ends' owners are done.
                    return samples;
                }
                std::thread::sleep(DRAIN_EVERY);
            }
        });
        Drain { stop, thread }
    }

    fn finish(self) -> Drained {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.thread.join().expect("drain sampler");
        let total = samples.last().map_or(Duration::ZERO, |s| s.0);
        let bound = |q: usize| total * q as u32 / 4;
        // Pages in place at `t`: interpolated between the counts around it.
        let counted: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|s| s.1.map(|n| (s.0.as_secs_f64(), n as f64)))
            .collect();
        let at = |t: Duration| {
            let t = t.as_secs_f64();
            let after = counted.iter().position(|c| c.0 >= t);
            let v = match after {
                Some(0) => counted[0].1,
                Some(i) => {
                    let ((t0, n0), (t1, n1)) = (counted[i - 1], counted[i]);
                    n0 + (n1 - n0) * (t - t0) / (t1 - t0).max(f64::EPSILON)
                }
                None => counted.last().map_or(0.0, |c| c.1),
            };
            v as usize
        };
        let rate = std::array::from_fn(|q| {
            let pages = at(bound(q + 1)).saturating_sub(at(bound(q)));
            (pages * PAGE) as f64 / MIB as f64 / (bound(q + 1) - bound(q)).as_secs_f64()
        });
        let queued = samples.iter().all(|s| s.2.is_some()).then(|| {
            std::array::from_fn(|q| {
                let v: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.0 >= bound(q) && (s.0 < bound(q + 1) || q == 3))
                    .filter_map(|s| s.2)
                    .map(|b| b as f64 / 1024.0)
                    .collect();
                v.iter().sum::<f64>() / v.len() as f64
            })
        });
        Drained { rate, queued }
    }
}

/// The share of zero pages in the guest: QMH_BENCH_PC_ZERO_PCT (default 0: random content).
/// A mostly-zero guest sends 9-byte records, so the destination's buffer holds far more of
/// them, each placed on its own.
/// The QEMU->QEMU rows.
const QQ: &str = "QEMU->QEMU (xp)";
const QQ_PREEMPT: &str = "QEMU->QEMU preempt (xp)";

/// Whether QMH_BENCH_PC_CASES selects the case `name` (all when unset).
fn selected(name: &str) -> bool {
    match std::env::var("QMH_BENCH_PC_CASES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|p| name.contains(p.trim())),
        _ => true,
    }
}

/// max-postcopy-bandwidth, bytes/s (0: unlimited).
fn postcopy_bw() -> u64 {
    env_u64("QMH_BENCH_PC_BW", 0).saturating_mul(MIB)
}

fn zero_fraction() -> f64 {
    env_u64("QMH_BENCH_PC_ZERO_PCT", 0).min(100) as f64 / 100.0
}

/// The machine's own floor while a postcopy runs: a thread that sleeps 500 us over and
/// over records how late each wake-up is (us). Every fault needs several wake-ups (the
/// helper's fault thread, the source, the destination's loader, the faulting thread), so
/// on a busy 2-CPU host their tail bounds the faults' tail.
struct Wakeups {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<f64>>,
}

impl Wakeups {
    const GAP: Duration = Duration::from_micros(500);

    fn start() -> Wakeups {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut late = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                std::thread::sleep(Self::GAP);
                late.push(t.elapsed().saturating_sub(Self::GAP).as_secs_f64() * 1e6);
            }
            late
        });
        Wakeups { stop, thread }
    }

    fn finish(self) -> Vec<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("wake-up sampler")
    }
}

/// Connects `src` to `dst` as `start_migration` does; over a socketpair (no `preempt`)
/// returns a copy of the destination's end, to see what waits in it.
fn connect(
    src: &mut HelperClient,
    dst: &mut HelperClient,
    dir: &TempDir,
    preempt: bool,
) -> Option<OwnedFd> {
    if preempt {
        start_migration(src, dst, dir, true);
        return None;
    }
    let (s, d) = socketpair();
    let probe = d.try_clone().expect("dup");
    start_fd_migration_over(src, dst, (s, d));
    Some(probe)
}

/// Reader threads touching missing pages until stopped.
struct Readers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Touches>>,
}

impl Readers {
    fn start(guest: &UffdGuest, pattern: Pattern) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let (n, gap) = match pattern {
            Pattern::Dense(n) => (n, None),
            Pattern::Sparse(g) => (1, Some(g)),
        };
        let t0 = Instant::now();
        let threads = (0..n)
            .map(|t| {
                let (map, stop) = (guest.map.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 7);
                    let mut mine = Touches::new();
                    while !stop.load(Ordering::Relaxed) {
                        let Some(p) = missing_page(&map, &mut x) else {
                            // Nearly every page is here: the end is close.
                            std::thread::sleep(Duration::from_micros(100));
                            continue;
                        };
                        let t = Instant::now();
                        // SAFETY: inside the mapping; volatile so the read happens.
                        let _v = unsafe {
                            std::ptr::read_volatile(map.as_ptr().add(p * PAGE) as *const u64)
                        };
                        mine.push((t - t0, t.elapsed().as_secs_f64() * 1e6));
                        if let Some(g) = gap {
                            std::thread::sleep(g);
                        }
                    }
                    mine
                })
            })
            .collect();
        Readers { stop, threads }
    }

    /// Stops the readers; their touches in the order they were made.
    fn finish(self) -> Touches {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Touches = self
            .threads
            .into_iter()
            .flat_map(|h| h.join().expect("reader"))
            .collect();
        all.sort_by_key(|t| t.0);
        all
    }
}

/// One run's figures.
struct Run {
    touches: Touches,
    /// The destination's final `query-migrate` (None for QEMU).
    dst: Option<Value>,
    /// CPU seconds of the source and the destination during the postcopy phase.
    cpu: (f64, f64),
    postcopy_secs: f64,
    /// Per quarter of the postcopy phase.
    drain: Drained,
    /// How late a 500 us sleep woke during the postcopy phase (us).
    wakeups: Vec<f64>,
}

/// One postcopy run into a helper destination. With `preempt` both sides use
/// postcopy-preempt over a `unix:` listener instead of a socketpair.
fn into_helper(from_qemu: bool, preempt: bool, pattern: Pattern, size: u64) -> Run {
    let guest = UffdGuest::new(size);
    let mut dst = HelperVm::spawn_quiet();
    guest.attach(&mut dst, "ram");
    let caps = [("postcopy-ram", true), ("postcopy-preempt", preempt)];
    dst.client.set_capabilities(&caps).expect("caps");
    let mut src = if from_qemu {
        let q = QemuVm::start(Qemu::V10, size, &VmOpts::default());
        fill_mixed(&mut q.ram_mmap(), 5, zero_fraction());
        End::Qemu(q)
    } else {
        let mut h = HelperVm::spawn_quiet();
        h.add_block("ram", size, false);
        fill_mixed(&mut h.blocks[0].mem.map(), 5, zero_fraction());
        End::Helper(h)
    };
    src.client().set_capabilities(&caps).expect("caps");
    src.client()
        .set_parameters(json!({"max-bandwidth": 16 * MIB, "max-postcopy-bandwidth": postcopy_bw()}))
        .expect("params");
    let dir = TempDir::new("qmh-bench");
    let probe = connect(src.client(), &mut dst.client, &dir, preempt);
    std::thread::sleep(Duration::from_millis(200));
    src.client().migrate_start_postcopy().expect("postcopy");
    dst.wait(&["postcopy-active", "completed"], TIMEOUT);
    let cpu0 = (process_cpu_secs(src.pid()), process_cpu_secs(dst.pid()));
    let t0 = Instant::now();
    let drain = Drain::start(guest.map.clone(), probe);
    let wakeups = Wakeups::start();
    let readers = Readers::start(&guest, pattern);
    let v = dst.wait(&["completed"], TIMEOUT);
    let postcopy_secs = t0.elapsed().as_secs_f64();
    let drain = drain.finish();
    let wakeups = wakeups.finish();
    let touches = readers.finish();
    src.wait(&["completed"], TIMEOUT);
    let cpu = (
        process_cpu_secs(src.pid()) - cpu0.0,
        process_cpu_secs(dst.pid()) - cpu0.1,
    );
    Run {
        touches,
        dst: Some(v),
        cpu,
        postcopy_secs,
        drain,
        wakeups,
    }
}

/// QEMU->QEMU: `xp` round trips on missing pages (mincore on QEMU's shared RAM file) minus
/// those on the same page once present (their median), in us, from postcopy-active until
/// the destination completes.
fn qemu_to_qemu(size: u64, preempt: bool) -> Run {
    let src = QemuVm::start(Qemu::V10, size, &VmOpts::default());
    fill_mixed(&mut src.ram_mmap(), 5, zero_fraction());
    let mut src = src;
    let mut dst = QemuVm::start(Qemu::V10, size, &VmOpts::incoming());
    for q in [&mut src, &mut dst] {
        q.qmp()
            .set_capabilities(&[("postcopy-ram", true), ("postcopy-preempt", preempt)])
            .expect("caps");
    }
    src.qmp()
        .set_parameters(json!({"max-bandwidth": 16 * MIB, "max-postcopy-bandwidth": postcopy_bw()}))
        .expect("params");
    let dir = TempDir::new("qmh-bench");
    let probe = connect(src.qmp(), dst.qmp(), &dir, preempt);
    std::thread::sleep(Duration::from_millis(200));
    src.qmp().migrate_start_postcopy().expect("postcopy");
    dst.wait_migration(&["postcopy-active", "completed"], TIMEOUT)
        .expect("active");
    let cpu0 = (process_cpu_secs(src.pid()), process_cpu_secs(dst.pid()));
    let map = Arc::new(dst.ram_mmap());
    let drain = Drain::start(map.clone(), probe);
    let wakeups = Wakeups::start();
    let (mut missing, mut present) = (Touches::new(), Vec::new());
    let mut x = 12345u64;
    let t0 = Instant::now();
    loop {
        let st = dst.qmp().query_migrate().expect("query-migrate");
        if st["status"] != "postcopy-active" {
            break;
        }
        let Some(p) = missing_page(&map, &mut x) else {
            continue;
        };
        let addr = p * PAGE;
        let t = Instant::now();
        dst.hmp(&format!("xp /1xg {addr:#x}")).expect("xp");
        missing.push((t - t0, t.elapsed().as_secs_f64() * 1e6));
        // The same page again: now present.
        let t = Instant::now();
        dst.hmp(&format!("xp /1xg {addr:#x}")).expect("xp");
        present.push(t.elapsed().as_secs_f64() * 1e6);
    }
    dst.wait_migration(&["completed"], TIMEOUT)
        .expect("completes");
    let postcopy_secs = t0.elapsed().as_secs_f64();
    let drain = drain.finish();
    let wakeups = wakeups.finish();
    src.wait_migration(&["completed"], TIMEOUT)
        .expect("completes");
    let cpu = (
        process_cpu_secs(src.pid()) - cpu0.0,
        process_cpu_secs(dst.pid()) - cpu0.1,
    );
    let base = median(&present);
    Run {
        touches: missing
            .into_iter()
            .map(|(at, us)| (at, (us - base).max(0.0)))
            .collect(),
        dst: None,
        cpu,
        postcopy_secs,
        drain,
        wakeups,
    }
}

/// What a case gathered over its runs.
#[derive(Default)]
struct Pooled {
    all: Vec<f64>,
    quarters: [Vec<f64>; 4],
    /// Per run: the helper's p50, p99, the `postcopy-latency-dist` bounds of both, count.
    helper: Vec<[f64; 5]>,
    cpu_src: Vec<f64>,
    cpu_dst: Vec<f64>,
    secs: Vec<f64>,
    drain: Vec<[f64; 4]>,
    queued: Vec<[f64; 4]>,
    wakeups: Vec<f64>,
}

impl Pooled {
    fn add(&mut self, r: &Run) {
        let n = r.touches.len();
        for (i, (_, us)) in r.touches.iter().enumerate() {
            self.all.push(*us);
            self.quarters[i * 4 / n.max(1)].push(*us);
        }
        if let Some(d) = &r.dst {
            let l = &d["x-postcopy-latency"];
            let f = |k: &str| l[k].as_f64().unwrap_or(f64::NAN);
            let dist = latency_dist(d);
            self.helper.push([
                f("p50-us"),
                f("p99-us"),
                dist_quantile_us(&dist, 0.5),
                dist_quantile_us(&dist, 0.99),
                f("count"),
            ]);
        }
        self.cpu_src.push(r.cpu.0);
        self.cpu_dst.push(r.cpu.1);
        self.secs.push(r.postcopy_secs);
        self.drain.push(r.drain.rate);
        self.queued.extend(r.drain.queued);
        self.wakeups.extend(&r.wakeups);
    }

    fn row(&self, name: &str) -> String {
        let q = |p: f64| -> String {
            self.quarters
                .iter()
                .map(|v| format!("{:.0}", percentile(v, p)))
                .collect::<Vec<_>>()
                .join("/")
        };
        let h = |i: usize| median(&self.helper.iter().map(|x| x[i]).collect::<Vec<_>>());
        let helper = if self.helper.is_empty() {
            format!("{:>46}", "-")
        } else {
            format!(
                "{:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>9.0}",
                h(4),
                h(0),
                h(1),
                h(2),
                h(3)
            )
        };
        let quarters = |v: &[[f64; 4]]| -> String {
            if v.is_empty() {
                return "-".into();
            }
            (0..4)
                .map(|q| format!("{:.0}", median(&v.iter().map(|d| d[q]).collect::<Vec<_>>())))
                .collect::<Vec<_>>()
                .join("/")
        };
        let (drain, queued) = (quarters(&self.drain), quarters(&self.queued));
        format!(
            "{name:<34} {:>7} {:>7.0} {:>7.0} {:>23} {:>27}  {helper} {:>7.2} {:>7.2} {:>6.2} {drain:>23} {queued:>23} {:>6.0} {:>6.0}",
            self.all.len(),
            percentile(&self.all, 0.5),
            percentile(&self.all, 0.99),
            q(0.5),
            q(0.99),
            median(&self.cpu_src),
            median(&self.cpu_dst),
            median(&self.secs),
            percentile(&self.wakeups, 0.5),
            percentile(&self.wakeups, 0.99),
        )
    }
}

fn main() {
    if !bench_requested("postcopy") || require_qemu(Qemu::V10, "bench").is_none() {
        return;
    }
    let size = env_size("QMH_BENCH_PC_SIZE", "1G", parse_size);
    let repeat = repeat();
    let dense = Pattern::Dense(env_u64("QMH_BENCH_DENSE_THREADS", 3).max(1) as usize);
    let sparse = Pattern::Sparse(Duration::from_micros(env_u64(
        "QMH_BENCH_SPARSE_GAP_US",
        500,
    )));
    println!(
        "postcopy fault latency: {} MiB guest of random content ({}% zero pages), 4 KiB pages, background push \
         {}, touches from postcopy-active to completed, {repeat} runs each",
        size >> 20,
        env_u64("QMH_BENCH_PC_ZERO_PCT", 0).min(100),
        match postcopy_bw() {
            0 => "unlimited".to_string(),
            b => format!("limited to {} MiB/s (max-postcopy-bandwidth)", b / MIB),
        }
    );
    // Helper destinations: (source, QEMU source, postcopy-preempt), each in both patterns.
    let ends = [
        ("helper->helper", false, false),
        ("helper->helper preempt", false, true),
        ("QEMU->helper", true, false),
        ("QEMU->helper preempt", true, true),
    ];
    let cases: Vec<(String, bool, bool, Pattern)> = ends
        .iter()
        .flat_map(|&(n, q, p)| {
            [dense, sparse]
                .into_iter()
                .map(move |pat| (format!("{n} {}", pat.label()), q, p, pat))
        })
        .filter(|(name, ..)| selected(name))
        .collect();
    let mut pooled: Vec<Pooled> = cases.iter().map(|_| Pooled::default()).collect();
    let (mut qq, mut qqp) = (Pooled::default(), Pooled::default());
    for r in 0..repeat {
        for (i, (name, from_qemu, preempt, pattern)) in cases.iter().enumerate() {
            let run = into_helper(*from_qemu, *preempt, *pattern, size);
            let d = run.dst.as_ref().expect("helper destination");
            println!(
                "  run {r} {name}: {} touches timed in {:.2} s; helper: requests {}, \
                 x-postcopy-latency {}, postcopy-latency-dist {}",
                run.touches.len(),
                run.postcopy_secs,
                d["ram"]["postcopy-requests"],
                d["x-postcopy-latency"],
                d["postcopy-latency-dist"]
            );
            pooled[i].add(&run);
        }
        for (name, preempt, p) in [(QQ, false, &mut qq), (QQ_PREEMPT, true, &mut qqp)] {
            if !selected(name) {
                continue;
            }
            let run = qemu_to_qemu(size, preempt);
            println!(
                "  run {r} QEMU->QEMU preempt={preempt}: {} xp reads of missing pages in {:.2} s",
                run.touches.len(),
                run.postcopy_secs
            );
            p.add(&run);
        }
    }
    println!(
        "\nparent side: p50/p99 in us, all runs pooled, and per quarter of the touches (q1/q2/q3/q4); \
         helper: its own figures (fault read -> page placed), medians over runs, `dist` the \
         upper bound of the postcopy-latency-dist bucket; CPU seconds in the postcopy phase and its \
         length; per quarter of its time, the pages placed (mincore over the whole guest) and the \
         mean bytes waiting in the destination's socket (FIONREAD on a socketpair: not with preempt); \
         wake50/wake99: how late (us) a 500 us sleep woke meanwhile, the host's scheduling floor"
    );
    println!(
        "{:<34} {:>7} {:>7} {:>7} {:>23} {:>27}  {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7} {:>6} {:>23} {:>23} {:>6} {:>6}",
        "case",
        "touches",
        "p50",
        "p99",
        "p50 by quarter",
        "p99 by quarter",
        "h.count",
        "h.p50",
        "h.p99",
        "dist p50",
        "dist p99",
        "cpu src",
        "cpu dst",
        "secs",
        "MiB/s placed by quarter",
        "KiB queued by quarter",
        "wake50",
        "wake99"
    );
    for ((name, ..), p) in cases.iter().zip(&pooled) {
        println!("{}", p.row(name));
    }
    for (name, p) in [(QQ, &qq), (QQ_PREEMPT, &qqp)] {
        if selected(name) {
            println!("{}", p.row(name));
        }
    }
    println!(
        "targets (issue 16), sparse and dense: QEMU->helper p50 <= 300 us, p99 <= 2000 us; \
         with preempt, and helper->helper: p50 <= 100 us, p99 <= 1000 us"
    );
}
