//! What the guest reports (passes, failed checks, slow page steps), shared between the
//! vCPU threads and the thread that drives the migration, and the figures made from it.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where the migration is, as far as the guest's reports go: each report is filed under
/// the phase it arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No migration yet (the source before `migrate`).
    Before = 0,
    /// Precopy running (source).
    Precopy = 1,
    /// The destination runs the guest while pages still arrive.
    Postcopy = 2,
    /// The migration completed (destination).
    After = 3,
}

const PHASES: usize = 4;
/// Samples kept per phase: the guest decides how many it sends, memory must not.
const MAX_SAMPLES: usize = 1 << 20;

/// One vCPU's passes.
#[derive(Debug, Default, Clone)]
pub(crate) struct VcpuPasses {
    /// The first pass this VMM saw finish (on a destination: the first after migration).
    pub(crate) first: Option<u32>,
    /// The last pass the guest finished.
    pub(crate) last: Option<u32>,
    pub(crate) seen: u64,
    /// When the last pass finished (or the vCPU started).
    since: Option<Instant>,
    /// Pages of this vCPU's slice, and where in it the current pass started (a vCPU that
    /// resumes after migration resumes mid-pass).
    slice_pages: u64,
    first_page: u64,
}

/// What the guest reported so far.
#[derive(Debug, Default, Clone)]
pub(crate) struct Progress {
    pub(crate) vcpus: Vec<VcpuPasses>,
    pub(crate) violations: u64,
    /// Per phase: TSC cycles of each slow page step.
    slow: [Vec<u32>; PHASES],
    /// Per phase: each pass's progress (each vCPU's), in pages written per second.
    rates: [Vec<f64>; PHASES],
}

impl Progress {
    /// Passes every vCPU has finished (the slowest's count).
    pub(crate) fn passes(&self) -> u64 {
        self.vcpus.iter().map(|v| v.seen).min().unwrap_or(0)
    }

    /// Slow page steps reported in `phase`, in microseconds (`tsc_khz`: cycles per ms).
    pub(crate) fn slow_us(&self, phase: Phase, tsc_khz: u32) -> Vec<f64> {
        let per_us = f64::from(tsc_khz.max(1)) / 1000.0;
        self.slow[phase as usize]
            .iter()
            .map(|&c| f64::from(c) / per_us)
            .collect()
    }

    /// The progress of each vCPU's passes that ended in `phase`, in pages per second
    /// (a pass that spans two phases counts in the one it ended in).
    pub(crate) fn rates(&self, phase: Phase) -> &[f64] {
        &self.rates[phase as usize]
    }
}

/// Shared by the vCPU threads, their throttle ticker and the migration driver.
pub(crate) struct VcpuControl {
    progress: Mutex<Progress>,
    /// Signalled on every report from the guest and every stop or throttle request.
    pub(crate) changed: Condvar,
    stop: AtomicBool,
    /// Percentage of time the vCPUs must not run (auto-converge's CPU_THROTTLE).
    throttle: AtomicU8,
    phase: AtomicU8,
}

impl VcpuControl {
    pub(crate) fn new(vcpus: usize, phase: Phase) -> VcpuControl {
        VcpuControl {
            progress: Mutex::new(Progress {
                vcpus: vec![VcpuPasses::default(); vcpus],
                ..Progress::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            phase: AtomicU8::new(phase as u8),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Progress> {
        // A poisoned lock only means another thread panicked; the counters are still valid.
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn progress(&self) -> Progress {
        self.lock().clone()
    }

    /// Reports from now on are filed under `phase`.
    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    fn phase(&self) -> usize {
        usize::from(self.phase.load(Ordering::Relaxed)).min(PHASES - 1)
    }

    /// Blocks until `done(progress)` holds, the vCPUs stop or `timeout` passes; returns the
    /// last progress.
    pub(crate) fn wait(&self, timeout: Duration, done: impl Fn(&Progress) -> bool) -> Progress {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |p| !done(p) && !self.stopping())
            .unwrap_or_else(|p| p.into_inner());
        guard.clone()
    }

    /// Asks the vCPU threads to return at their next exit (see `VcpuThreads::stop`).
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(crate) fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent.min(99), Ordering::Relaxed);
        // Wakes the ticker (see vcpu.rs).
        self.changed.notify_all();
    }

    pub(crate) fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }

    /// vCPU `index` starts running now, at page `first_page` of its `slice_pages` (its
    /// first pass is timed from here).
    pub(crate) fn started(&self, index: usize, first_page: u64, slice_pages: u64) {
        if let Some(v) = self.lock().vcpus.get_mut(index) {
            v.since = Some(Instant::now());
            (v.first_page, v.slice_pages) = (first_page.min(slice_pages), slice_pages);
        }
    }

    pub(crate) fn pass_done(&self, index: usize, pass: u32) {
        let phase = self.phase();
        let mut p = self.lock();
        let Some(v) = p.vcpus.get_mut(index) else {
            return;
        };
        let now = Instant::now();
        let took = v.since.map(|t| now.duration_since(t).as_secs_f64());
        let pages = v.slice_pages - v.first_page;
        (v.since, v.first_page) = (Some(now), 0);
        v.first.get_or_insert(pass);
        v.last = Some(pass);
        v.seen += 1;
        if let Some(secs) = took.filter(|&t| t > 0.0 && pages > 0) {
            push_bounded(&mut p.rates[phase], pages as f64 / secs);
        }
        drop(p);
        self.changed.notify_all();
    }

    pub(crate) fn violation(&self) {
        self.lock().violations += 1;
        self.changed.notify_all();
    }

    pub(crate) fn slow_step(&self, cycles: u32) {
        let phase = self.phase();
        push_bounded(&mut self.lock().slow[phase], cycles);
    }
}

fn push_bounded<T>(v: &mut Vec<T>, x: T) {
    if v.len() < MAX_SAMPLES {
        v.push(x);
    }
}

/// The `q` quantile (0..=1) of `samples` (nearest rank), or 0 for none.
pub(crate) fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// CLOCK_MONOTONIC in microseconds: the same clock in every process of the host, so that
/// the source's stop and the destination's start can be compared (downtime).
pub(crate) fn monotonic_us() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

/// CPU seconds (user + system) of the helpers this VMM started and reaped: the helper's
/// cost beside the figures.
pub(crate) fn children_cpu_s() -> f64 {
    // SAFETY: an all-zero rusage is valid for getrusage to fill.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid rusage to write.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}
