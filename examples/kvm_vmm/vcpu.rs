//! The vCPU threads: run the guest, handle its I/O ports, honour stop and throttle
//! requests, and on stop leave each vCPU in a state that can be saved.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::error::{join, kvm, VmmError};
use crate::guest::{self, PROGRESS_PORT, SLOW_PORT, VIOLATION_PORT};
use crate::progress::{Progress, VcpuControl};

/// QEMU's throttle timeslice: while throttled, the vCPUs are kicked out of the guest this
/// often and then sleep their share of the slice.
const THROTTLE_TIMESLICE: Duration = Duration::from_millis(10);

/// Runs vCPU `index` until a stop is requested. `pace` is slept after each pass, so the
/// guest leaves CPU time to the helpers. Returns with any pending I/O completed.
fn run(vcpu: &mut VcpuFd, index: usize, ctl: &VcpuControl, pace: Duration) -> Result<(), VmmError> {
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    ctl.started(index, guest::page_index(&regs), regs.rbp);
    let mut running_since = Instant::now();
    while !ctl.stopping() {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PROGRESS_PORT, data)) => {
                ctl.pass_done(index, port_value(data));
                pause(ctl, pace, running_since.elapsed());
                running_since = Instant::now();
            }
            Ok(VcpuExit::IoOut(VIOLATION_PORT, data)) => {
                let page = port_value(data);
                eprintln!("kvm-vmm: vCPU {index}: guest check failed at page {page} of its slice");
                ctl.violation();
            }
            Ok(VcpuExit::IoOut(SLOW_PORT, data)) => ctl.slow_step(port_value(data)),
            Ok(exit) => return Err(VmmError::Guest(format!("unexpected exit {exit:?}"))),
            Err(e) if e.errno() == libc::EINTR => {
                // A kick (a stop, or the throttle's timeslice); the handler set
                // immediate_exit so that a kick just before KVM_RUN is not lost.
                vcpu.set_kvm_immediate_exit(0);
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
    let n = u32::from(ctl.throttle());
    let total = pace + ran * n / (100 - n);
    if total.is_zero() {
        return;
    }
    let guard = ctl.lock();
    let _ = ctl
        .changed
        .wait_timeout_while(guard, total, |_| !ctl.stopping());
}

/// The value of an `out` to one of the guest's ports (the guest writes 32 bits).
fn port_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// The vCPU threads and their throttle ticker, and how to stop them.
pub(crate) struct VcpuThreads {
    handles: Vec<JoinHandle<Result<VcpuFd, VmmError>>>,
    ticker: JoinHandle<()>,
    ctl: Arc<VcpuControl>,
}

/// Runs each vCPU (index = position) on its own thread until [`VcpuThreads::stop`].
pub(crate) fn spawn(
    vcpus: Vec<VcpuFd>,
    ctl: &Arc<VcpuControl>,
    pace: Duration,
) -> Result<VcpuThreads, VmmError> {
    install_kick_handler()?;
    let handles: Vec<_> = vcpus
        .into_iter()
        .enumerate()
        .map(|(index, mut vcpu)| {
            let ctl = Arc::clone(ctl);
            std::thread::spawn(move || {
                arm_kick(&mut vcpu);
                let result = run(&mut vcpu, index, &ctl, pace);
                disarm_kick();
                // Whoever waits on the progress must not wait for a vCPU that has gone.
                ctl.request_stop();
                result.map(|()| vcpu)
            })
        })
        .collect();
    let threads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
    let ticker_ctl = Arc::clone(ctl);
    let ticker = std::thread::spawn(move || tick(&ticker_ctl, &threads));
    Ok(VcpuThreads {
        handles,
        ticker,
        ctl: Arc::clone(ctl),
    })
}

/// While a throttle is in force, kicks the vCPUs once a timeslice, so that they sleep
/// their share of every slice rather than of a whole pass (a pass can take long). Idle, on
/// the condition variable, while there is no throttle.
fn tick(ctl: &VcpuControl, vcpus: &[libc::pthread_t]) {
    let idle = |_: &mut Progress| ctl.throttle() == 0 && !ctl.stopping();
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
        vcpus.iter().for_each(|&t| kick(t));
    }
}

/// Makes a vCPU thread's KVM_RUN return EINTR (now, or at its next entry).
fn kick(vcpu: libc::pthread_t) {
    // SAFETY: vCPU threads are joined only after the ticker (VcpuThreads::stop) and after
    // their own kick, so the pthread_t is valid. An error (ESRCH: it already ended) needs
    // no kick anyway.
    let _ = unsafe { libc::pthread_kill(vcpu, libc::SIGUSR1) };
}

impl VcpuThreads {
    /// Stops the guest and returns its vCPUs in order, ready to be saved. The flag alone
    /// would wait for each guest's next exit (a whole pass); the signal (the "kick") makes
    /// KVM_RUN return at once with EINTR, or, if it lands before the thread enters
    /// KVM_RUN, makes that entry return at once (the handler sets `immediate_exit`).
    pub(crate) fn stop(self) -> Result<Vec<VcpuFd>, VmmError> {
        self.ctl.request_stop();
        // The ticker first: it kicks the vCPU threads, which must not be joined before.
        let ticker = self.ticker.join();
        for h in &self.handles {
            kick(h.as_pthread_t());
        }
        let vcpus: Result<Vec<_>, _> = self.handles.into_iter().map(|h| join("vCPU", h)).collect();
        ticker.map_err(|_| VmmError::Panicked("throttle ticker"))?;
        vcpus
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick handler (null: no vCPU here).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Lets a kick on this thread set its vCPU's `immediate_exit`.
fn arm_kick(vcpu: &mut VcpuFd) {
    let flag = std::ptr::addr_of_mut!(vcpu.get_kvm_run().immediate_exit);
    IMMEDIATE_EXIT.with(|c| c.set(flag));
}

fn disarm_kick() {
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
}

/// The kick's handler: KVM_RUN returns EINTR if it is running; if the thread is about to
/// enter it, `immediate_exit` makes that entry return EINTR at once.
extern "C" fn on_kick(_: libc::c_int) {
    // A const-initialised thread local without destructor is plain TLS: safe to read here.
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: set by arm_kick to this thread's kvm_run mapping, which lives as long as
        // the VcpuFd the thread owns; cleared (disarm_kick) before the thread gives it up.
        unsafe { flag.write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), VmmError> {
    let action = SigAction::new(
        SigHandler::Handler(on_kick),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only writes one byte through a pointer its thread set, so it is
    // async-signal-safe, and nothing else in this process uses SIGUSR1.
    unsafe { sigaction(Signal::SIGUSR1, &action) }
        .map_err(|e| VmmError::Io("installing the vCPU kick handler", e.into()))?;
    Ok(())
}
