//! What a `--control-fd` helper does when its parent goes away (the control connection
//! reads EOF: the parent exited, crashed or closed it). Precopy is cancelled: a source only
//! ever read the guest, which stays whole in the parent's memfds, and a destination's
//! source sees the channel close and fails. Postcopy cannot be cancelled (neither side has
//! the whole guest): the helper pauses it, as `migrate-pause` does, and waits
//! `orphan-timeout` for a new helper to adopt it (the guest-memory fds stay open meanwhile,
//! so a supervisor of the same user can still reopen them through /proc/PID/fd), then
//! stops and the helper exits.

use std::time::{Duration, Instant};

use crate::engine::migration::MigrationCtx;
use crate::engine::state::MigrationStatus;

/// How long a cancelled or paused migration may take to get there.
const SETTLE: Duration = Duration::from_secs(10);

fn in_postcopy(s: MigrationStatus) -> bool {
    matches!(
        s,
        MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecoverSetup
            | MigrationStatus::PostcopyRecover
    )
}

/// Acts on the parent's departure; returns once the migration thread was told to stop.
pub(super) fn parent_gone(ctx: &MigrationCtx, log: &slog::Logger) {
    let st = ctx.state.status();
    if st.is_finished() {
        return;
    }
    if !in_postcopy(st) {
        slog::warn!(log, "parent gone during precopy: cancelling the migration"; "status" => st.as_str());
        let _ = ctx.state.transition(MigrationStatus::Cancelling);
        ctx.request_cancel();
        ctx.state.wait_for(SETTLE, |s| s.is_finished());
        return;
    }
    if st != MigrationStatus::PostcopyPaused {
        // As migrate-pause: the I/O failure pauses this side, and the peer with it.
        ctx.shutdown_channel();
        ctx.state.wait_for(SETTLE, |s| {
            s.is_finished() || s == MigrationStatus::PostcopyPaused
        });
    }
    let grace = Duration::from_millis(ctx.params().orphan_timeout);
    let t = Instant::now();
    slog::warn!(log, "parent gone during postcopy: paused; waiting for a new helper to adopt the migration, then exiting";
        "status" => ctx.state.status().as_str(), "orphan_timeout_ms" => grace.as_millis() as u64);
    let end = ctx.state.wait_for(grace, |s| s.is_finished());
    if !end.is_finished() {
        slog::warn!(log, "orphan-timeout passed: stopping (the guest stays in the memfds for a new helper to adopt)";
            "waited_ms" => t.elapsed().as_millis() as u64);
    }
    // Wakes a paused migration thread out of its wait for a recovery.
    ctx.request_cancel();
}

/// Waits up to [`SETTLE`] for the migration thread to end: the helper exits either way.
/// A joiner thread turns the join into a message, so the wait sleeps on a channel instead
/// of checking `is_finished` in a loop; when the migration thread does not stop, the
/// joiner stays blocked with it and ends with the process, which exits next.
pub(super) fn join_bounded(h: std::thread::JoinHandle<()>, log: &slog::Logger) {
    let (tx, rx) = std::sync::mpsc::channel();
    let joiner = std::thread::Builder::new()
        .name("qmh-join".into())
        .spawn(move || {
            let _ = h.join();
            let _ = tx.send(());
        });
    let joiner = match joiner {
        Ok(j) => j,
        Err(e) => {
            slog::warn!(log, "cannot start a thread to wait for the migration thread; exiting anyway"; "error" => %e);
            return;
        }
    };
    match rx.recv_timeout(SETTLE) {
        Ok(()) => {
            let _ = joiner.join();
        }
        Err(_) => slog::warn!(log, "the migration thread did not stop; exiting anyway"),
    }
}
