//! Commands from the control channel to the migration thread. The control thread posts
//! ([`Mailbox::post`]); the migration thread takes them where it can act on them, blocking
//! on a condvar ([`Mailbox::wait_continue`], [`Mailbox::wait_recovery`]) or checking
//! between two parts ([`Mailbox::postcopy_requested`]); threads that sleep in poll(2) put
//! the [`CancelToken`] in their poll set. No wait here has a tick: a command wakes the
//! waiter, and the only timeouts are the caller's deadlines.
//!
//! The commands are latches or a slot rather than a queue, as QEMU's: `migrate-continue`
//! opens a gate that stays open, `migrate-start-postcopy` is asked once, a newer recovery
//! replaces one not yet taken, and cancel stays set until the next migration.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::transport::CancelToken;

/// What a paused migration gets to go on with.
pub(crate) enum Recovery {
    /// Source: where to connect.
    Source(crate::transport::Uri, Option<OwnedFd>),
    /// Destination: the listening (or ready) channel.
    Destination(crate::transport::Incoming),
}

/// A command for the migration thread.
pub(crate) enum Command {
    /// `migrate-continue`: leave `pre-switchover`.
    Continue,
    /// `migrate-start-postcopy`: the source switches at its next check.
    StartPostcopy,
    /// `migrate resume=true` / `migrate-recover`: a paused migration's new channel.
    Recover(Recovery),
    /// `migrate-pause` (and a parent gone in postcopy): shut the live channel down; the
    /// I/O failure pauses both sides, as in QEMU. Not latched.
    Pause,
    /// `migrate_cancel`, `quit`, the end of an orphan's wait: latched until the next
    /// migration; shuts the live channel down so that blocked I/O returns at once.
    Cancel,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Refused {
    #[error("Postcopy already started")]
    PostcopyAlreadyStarted,
}

/// How [`Mailbox::wait_continue`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GateWait {
    Opened,
    Cancelled,
    /// The caller's deadline (a keepalive to send) came first.
    TimedOut,
}

/// The commands' state, shared by the control thread and the migration thread.
pub(crate) struct Mailbox {
    slots: Mutex<Slots>,
    /// Notified on every post; waiters re-check their slot under the lock.
    posted: Condvar,
    cancel: CancelToken,
    postcopy: AtomicBool,
    /// A duplicate of the live channel's fd, shut down by cancel and pause.
    channel: Mutex<Option<OwnedFd>>,
    /// Duplicates of the other channels (multifd), shut down with the main one.
    extra: Mutex<Vec<OwnedFd>>,
}

#[derive(Default)]
struct Slots {
    /// `migrate-continue` came (the pre-switchover gate is open).
    go_on: bool,
    recovery: Option<Recovery>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain flags and slots: a panicking holder cannot leave them half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mailbox {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Mailbox {
            slots: Mutex::default(),
            posted: Condvar::new(),
            cancel: CancelToken::new()?,
            postcopy: AtomicBool::new(false),
            channel: Mutex::new(None),
            extra: Mutex::new(Vec::new()),
        })
    }

    /// Clears the latches for a new migration (the previous thread was joined). A
    /// recovery stays: an adopting helper offers it before it starts the thread.
    pub(crate) fn reset(&self) {
        lock(&self.slots).go_on = false;
        self.postcopy.store(false, Ordering::Release);
        self.cancel.reset();
    }

    /// Posts `cmd`; only a second `StartPostcopy` is refused.
    pub(crate) fn post(&self, cmd: Command) -> Result<(), Refused> {
        match cmd {
            Command::Continue => lock(&self.slots).go_on = true,
            Command::StartPostcopy => {
                if self.postcopy.swap(true, Ordering::AcqRel) {
                    return Err(Refused::PostcopyAlreadyStarted);
                }
            }
            Command::Recover(r) => lock(&self.slots).recovery = Some(r),
            Command::Pause => self.shutdown_channel(),
            Command::Cancel => {
                self.cancel.cancel();
                self.shutdown_channel();
                // Under the lock, so that a waiter between its check and its wait cannot
                // miss the notification.
                drop(lock(&self.slots));
            }
        }
        self.posted.notify_all();
        Ok(())
    }

    /// The cancel signal, for poll sets, `Channel::with_cancel` and accepts.
    pub(crate) fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Whether `migrate-start-postcopy` came (the source checks between parts).
    pub(crate) fn postcopy_requested(&self) -> bool {
        self.postcopy.load(Ordering::Acquire)
    }

    /// Waits in `pre-switchover` for `migrate-continue` or cancel, at most `max` (None:
    /// no limit).
    pub(crate) fn wait_continue(&self, max: Option<Duration>) -> GateWait {
        let deadline = max.and_then(|m| Instant::now().checked_add(m));
        let mut g = lock(&self.slots);
        loop {
            if g.go_on {
                return GateWait::Opened;
            }
            if self.cancelled() {
                return GateWait::Cancelled;
            }
            g = match deadline {
                None => self.posted.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return GateWait::TimedOut;
                    }
                    self.posted
                        .wait_timeout(g, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Waits in `postcopy-paused` for a recovery; None when cancelled (the helper is
    /// quitting).
    pub(crate) fn wait_recovery(&self) -> Option<Recovery> {
        let mut g = lock(&self.slots);
        loop {
            if let Some(r) = g.recovery.take() {
                return Some(r);
            }
            if self.cancelled() {
                return None;
            }
            g = self.posted.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Registers the live main channel so that cancel and pause can shut it down; None
    /// (the migration thread is done) forgets the extra channels too.
    pub(crate) fn set_channel(&self, fd: Option<OwnedFd>) {
        let mut g = lock(&self.channel);
        // The SIGBUS handler shuts the main channel down too (memory_guard), which ends
        // the migration; it forgets the old fd before that is closed.
        crate::memory::guard::set_channel(fd.as_ref());
        if fd.is_none() {
            lock(&self.extra).clear();
        }
        *g = fd;
    }

    /// Registers one more channel of the migration (a multifd channel), shut down with the
    /// main one by cancel and pause. A cancel that came first shuts it down at once.
    pub(crate) fn add_channel(&self, fd: OwnedFd) {
        let mut extra = lock(&self.extra);
        if self.cancelled() {
            crate::transport::shutdown_fd(&fd);
        }
        extra.push(fd);
    }

    fn shutdown_channel(&self) {
        if let Some(fd) = lock(&self.channel).as_ref() {
            crate::transport::shutdown_fd(fd);
        }
        for fd in lock(&self.extra).iter() {
            crate::transport::shutdown_fd(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn continue_and_cancel_wake_at_once() {
        let m = Arc::new(Mailbox::new().unwrap());
        assert_eq!(
            m.wait_continue(Some(Duration::from_millis(20))),
            GateWait::TimedOut
        );
        let m2 = m.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            m2.post(Command::Continue).unwrap();
        });
        let start = Instant::now();
        assert_eq!(m.wait_continue(None), GateWait::Opened);
        assert!(start.elapsed() < Duration::from_secs(2));
        t.join().unwrap();

        m.reset();
        let m2 = m.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            m2.post(Command::Cancel).unwrap();
        });
        assert!(m.wait_recovery().is_none());
        assert!(m.cancel_token().is_cancelled());
        t.join().unwrap();
        assert_eq!(
            m.wait_continue(Some(Duration::from_secs(60))),
            GateWait::Cancelled
        );
    }

    #[test]
    fn postcopy_is_asked_once_and_reset_clears() {
        let m = Mailbox::new().unwrap();
        assert!(!m.postcopy_requested());
        m.post(Command::StartPostcopy).unwrap();
        assert!(m.postcopy_requested());
        assert_eq!(
            m.post(Command::StartPostcopy),
            Err(Refused::PostcopyAlreadyStarted)
        );
        m.post(Command::Cancel).unwrap();
        m.post(Command::Continue).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let chan = crate::transport::Channel::from_unix(a, "t".into());
        m.post(Command::Recover(Recovery::Destination(
            crate::transport::Incoming::Ready(chan),
        )))
        .unwrap();
        m.reset();
        assert!(!m.postcopy_requested() && !m.cancelled());
        assert_eq!(
            m.wait_continue(Some(Duration::from_millis(1))),
            GateWait::TimedOut
        );
        // Offered before an adopting helper's thread starts: kept.
        assert!(m.wait_recovery().is_some());
    }

    #[test]
    fn cancel_shuts_down_every_registered_channel() {
        use std::io::Read;
        let m = Mailbox::new().unwrap();
        let (main, mut main_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (extra, mut extra_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        m.set_channel(Some(OwnedFd::from(main)));
        m.add_channel(OwnedFd::from(extra));
        m.post(Command::Cancel).unwrap();
        let mut b = [0u8; 1];
        // Shut down: the peers read EOF although the fds are still open.
        assert_eq!(main_peer.read(&mut b).unwrap(), 0);
        assert_eq!(extra_peer.read(&mut b).unwrap(), 0);
        // Registered after the cancel: shut down at once.
        let (late, mut late_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        m.add_channel(OwnedFd::from(late));
        assert_eq!(late_peer.read(&mut b).unwrap(), 0);
        m.set_channel(None);
        assert!(lock(&m.extra).is_empty());
    }

    #[test]
    fn a_recovery_wakes_the_paused_thread() {
        let m = Arc::new(Mailbox::new().unwrap());
        let m2 = m.clone();
        let t = std::thread::spawn(move || m2.wait_recovery().is_some());
        std::thread::sleep(Duration::from_millis(50));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let chan = crate::transport::Channel::from_unix(a, "t".into());
        m.post(Command::Recover(Recovery::Destination(
            crate::transport::Incoming::Ready(chan),
        )))
        .unwrap();
        assert!(t.join().unwrap());
    }
}
