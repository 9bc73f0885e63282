//! The vCPU thread: runs the guest, handles its two I/O ports, honours stop and throttle
//! requests, and on stop leaves the vCPU in a state that can be saved.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::error::{join, VmmError};
use crate::guest::{PROGRESS_PORT, VIOLATION_PORT};

/// What the guest reported so far.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Progress {
    /// The first pass this VMM saw finish (on a destination: the first after migration).
    pub(crate) first_pass: Option<u32>,
    /// The last pass the guest finished.
    pub(crate) last_pass: Option<u32>,
    pub(crate) passes_seen: u64,
    pub(crate) violations: u64,
}

/// Shared between the vCPU thread and the thread that drives the migration.
#[derive(Default)]
pub(crate) struct VcpuControl {
    progress: Mutex<Progress>,
    /// Signalled on every report from the guest.
    changed: Condvar,
    stop: AtomicBool,
    /// Percentage of time the vCPU must not run (auto-converge's CPU_THROTTLE).
    throttle: AtomicU8,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // A poisoned lock only means the other thread panicked; the counters are still valid.
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn progress(&self) -> Progress {
        *self.lock()
    }

    /// Blocks until `done(progress)` holds, the vCPU stops or `timeout` passes; returns the
    /// last progress.
    pub(crate) fn wait(&self, timeout: Duration, done: impl Fn(&Progress) -> bool) -> Progress {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |p| {
                !done(p) && !self.stop.load(Ordering::Acquire)
            })
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// Asks the vCPU thread to return at its next exit (see [`VcpuThread::stop`]).
    fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    pub(crate) fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent.min(99), Ordering::Relaxed);
        // Wakes the ticker (see `tick`).
        self.changed.notify_all();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn report(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// Runs the vCPU until a stop is requested (checked before each entry; a kick, see
/// [`VcpuThread::stop`], makes KVM_RUN return EINTR). `pace` is slept after each pass, so the guest
/// leaves CPU time to the helpers. Returns with any pending I/O completed (see below).
fn run(vcpu: &mut VcpuFd, ctl: &VcpuControl, pace: Duration) -> Result<(), VmmError> {
    let mut running_since = Instant::now();
    while !ctl.stop.load(Ordering::Acquire) {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PROGRESS_PORT, data)) => {
                let pass = port_value(data);
                ctl.report(|p| {
                    p.first_pass.get_or_insert(pass);
                    p.last_pass = Some(pass);
                    p.passes_seen += 1;
                });
                pause(ctl, pace, running_since.elapsed());
                running_since = Instant::now();
            }
            Ok(VcpuExit::IoOut(VIOLATION_PORT, data)) => {
                let page = port_value(data);
                eprintln!("kvm-vmm: guest check failed at region page {page}");
                ctl.report(|p| p.violations += 1);
            }
            Ok(exit) => return Err(VmmError::Guest(format!("unexpected exit {exit:?}"))),
            Err(e) if e.errno() == libc::EINTR => {
                // A kick: a stop (the loop ends) or the throttle's timeslice.
                pause(ctl, Duration::ZERO, running_since.elapsed());
                running_since = Instant::now();
            }
            Err(e) => return Err(VmmError::Kvm("KVM_RUN", e)),
        }
    }
    complete_pending_io(vcpu)
}

/// KVM finishes an `out` (advances RIP past it) only when the vCPU is entered again; saved
/// before that, the destination would run the `out` twice. KVM's documented way: enter with
/// `immediate_exit` set, which completes the I/O and returns EINTR without running the guest.
fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<(), VmmError> {
    vcpu.set_kvm_immediate_exit(1);
    let result = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(VmmError::Kvm("KVM_RUN (immediate exit)", e)),
        Ok(exit) => Err(VmmError::Guest(format!(
            "the vCPU ran despite immediate_exit: {exit:?}"
        ))),
    };
    vcpu.set_kvm_immediate_exit(0);
    result
}

/// Waits `pace`, plus what the throttle asks: a vCPU throttled N% sleeps N/(100-N) of the
/// time it ran (as QEMU's cpu_throttle does per timeslice). A stop request ends the wait.
fn pause(ctl: &VcpuControl, pace: Duration, ran: Duration) {
    let n = u32::from(ctl.throttle.load(Ordering::Relaxed));
    let total = pace + ran * n / (100 - n);
    let guard = ctl.lock();
    let _ = ctl
        .changed
        .wait_timeout_while(guard, total, |_| !ctl.stop.load(Ordering::Acquire));
}

/// The value of an `out` to one of the guest's ports (the guest writes 32 bits).
fn port_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// QEMU's throttle timeslice: while throttled, the vCPU is kicked out of the guest this
/// often and then sleeps its share of the slice.
const THROTTLE_TIMESLICE: Duration = Duration::from_millis(10);

/// The vCPU's thread and its throttle ticker, and how to stop them.
pub(crate) struct VcpuThread {
    handle: JoinHandle<Result<VcpuFd, VmmError>>,
    ticker: JoinHandle<()>,
    ctl: Arc<VcpuControl>,
}

/// Runs the vCPU on its own thread until [`VcpuThread::stop`].
pub(crate) fn spawn(
    mut vcpu: VcpuFd,
    ctl: Arc<VcpuControl>,
    pace: Duration,
) -> Result<VcpuThread, VmmError> {
    install_kick_handler()?;
    let thread_ctl = Arc::clone(&ctl);
    let handle = std::thread::spawn(move || {
        let result = run(&mut vcpu, &thread_ctl, pace);
        // Whoever waits on the progress must not wait for a thread that has gone.
        thread_ctl.request_stop();
        result.map(|()| vcpu)
    });
    let (ticker_ctl, vcpu_pthread) = (Arc::clone(&ctl), handle.as_pthread_t());
    let ticker = std::thread::spawn(move || tick(&ticker_ctl, vcpu_pthread));
    Ok(VcpuThread {
        handle,
        ticker,
        ctl,
    })
}

/// While a throttle is in force, kicks the vCPU once a timeslice, so that it sleeps its
/// share of every slice rather than of a whole pass (a pass can take long). Idle, on the
/// condition variable, while there is no throttle.
fn tick(ctl: &VcpuControl, vcpu: libc::pthread_t) {
    let idle = |_: &mut Progress| ctl.throttle.load(Ordering::Relaxed) == 0 && !ctl.stopping();
    let mut guard = ctl.lock();
    loop {
        guard = ctl
            .changed
            .wait_while(guard, idle)
            .unwrap_or_else(|p| p.into_inner());
        guard = ctl
            .changed
            .wait_timeout_while(guard, THROTTLE_TIMESLICE, |_| !ctl.stopping())
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if ctl.stopping() {
            return;
        }
        kick(vcpu);
    }
}

/// Makes the vCPU thread's KVM_RUN return EINTR.
fn kick(vcpu: libc::pthread_t) {
    // SAFETY: the vCPU thread is joined only after the ticker (VcpuThread::stop), so its
    // pthread_t is valid. An error (ESRCH: it already ended) needs no kick anyway.
    let _ = unsafe { libc::pthread_kill(vcpu, libc::SIGUSR1) };
}

impl VcpuThread {
    /// Stops the guest and returns its vCPU, ready to be saved. The flag alone would wait
    /// for the guest's next exit (a whole pass); the signal (the "kick") makes KVM_RUN
    /// return at once with EINTR. A kick that lands just before the thread enters KVM_RUN
    /// is lost and the stop waits for the next exit: a production VMM closes that window
    /// by setting `immediate_exit` from the handler or with KVM_SET_SIGNAL_MASK.
    pub(crate) fn stop(self) -> Result<VcpuFd, VmmError> {
        self.ctl.request_stop();
        // The ticker first: it kicks the vCPU thread, which must not be joined before.
        let ticker = self.ticker.join();
        kick(self.handle.as_pthread_t());
        let vcpu = join("vCPU", self.handle);
        ticker.map_err(|_| VmmError::Panicked("throttle ticker"))?;
        vcpu
    }
}

/// The kick's handler does nothing: its only effect is that KVM_RUN returns EINTR.
extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() -> Result<(), VmmError> {
    let action = SigAction::new(
        SigHandler::Handler(on_kick),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe, and nothing else in
    // this process uses SIGUSR1.
    unsafe { sigaction(Signal::SIGUSR1, &action) }
        .map_err(|e| VmmError::Io("installing the vCPU kick handler", e.into()))?;
    Ok(())
}
