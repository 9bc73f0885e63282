//! The scheduling priority of the threads a vCPU waits on in postcopy: on the destination
//! the fault thread, and the postcopy-preempt reader or, without preempt, the loader; on a
//! helper source the return-path reader and the postcopy-preempt sender.

/// The nice value those threads ask for.
const NICE: libc::c_int = -10;

/// Asks for this thread to be scheduled ahead of the threads that push and place background
/// pages: on a small host those keep every CPU busy, and a vCPU waits while a fault-path
/// thread waits for a CPU. Needs CAP_SYS_NICE (or RLIMIT_NICE); without it the thread stays
/// at the default priority and the tail latency is higher.
pub(crate) fn raise(log: &slog::Logger, thread: &str) {
    // SAFETY: a plain syscall on this thread's own id.
    let raised =
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) } == 0;
    slog::debug!(log, "thread priority"; "thread" => thread, "nice" => NICE, "raised" => raised);
}
