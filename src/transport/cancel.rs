//! Waking threads that wait in poll(2): a [`CancelToken`] is a latched flag with an
//! eventfd that becomes readable when the flag is set, so a thread blocked on a socket, a
//! listener or a userfaultfd puts it in its poll set and returns at once on cancel, with no
//! timed poll. [`wait_fd`] is that poll: the only timeout it takes is a real deadline.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

/// A latched "stop" signal that can be polled: [`CancelToken::cancel`] sets it and makes
/// its fd readable until [`CancelToken::reset`]. Clones share the signal.
#[derive(Clone, Debug)]
pub(crate) struct CancelToken(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    set: AtomicBool,
    /// Non-blocking eventfd: readable (count > 0) exactly while `set` is true, outside
    /// `cancel` and `reset`.
    efd: OwnedFd,
    /// Serialises `cancel` and `reset`, so that the flag and the counter never disagree
    /// once both return (a readable fd with the flag clear would make pollers spin).
    change: Mutex<()>,
}

impl CancelToken {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) takes no pointers; a non-negative return is a new fd that
        // nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created above and is owned by nothing else.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(CancelToken(Arc::new(Inner {
            set: AtomicBool::new(false),
            efd,
            change: Mutex::new(()),
        })))
    }

    /// Sets the signal and wakes every poll that has the token's fd in its set.
    pub(crate) fn cancel(&self) {
        let _g = self.0.change.lock().unwrap_or_else(|e| e.into_inner());
        self.0.set.store(true, Ordering::Release);
        // The counter only saturates after 2^64-2 writes; EAGAIN there still leaves the
        // fd readable, which is all a waiter needs.
        let _ = nix::unistd::write(&self.0.efd, &1u64.to_ne_bytes());
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.0.set.load(Ordering::Acquire)
    }

    /// Clears the signal for the next migration (no thread of the previous one may still
    /// be waiting on it: the caller joined them).
    pub(crate) fn reset(&self) {
        let _g = self.0.change.lock().unwrap_or_else(|e| e.into_inner());
        self.0.set.store(false, Ordering::Release);
        let mut b = [0u8; 8];
        // Reading an eventfd resets its counter to 0; EAGAIN means it already was.
        let _ = nix::unistd::read(self.0.efd.as_raw_fd(), &mut b);
    }

    /// Blocks until cancelled or `max` passed (None: no limit); true when cancelled. For
    /// a retry interval that must still end at once on cancel.
    pub(crate) fn wait_timeout(&self, max: Option<Duration>) -> io::Result<bool> {
        let deadline = max.and_then(|m| Instant::now().checked_add(m));
        loop {
            if self.is_cancelled() {
                return Ok(true);
            }
            let mut pfd = [PollFd::new(self.0.efd.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut pfd, poll_timeout(deadline)) {
                Ok(0) => return Ok(self.is_cancelled()),
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for CancelToken {
    /// Readable once cancelled (POLLIN): put it in a poll set next to the fd waited on.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.efd.as_fd()
    }
}

/// What interrupts a wait in [`wait_fd`]: a [`CancelToken`], or [`Never`].
pub(crate) trait Interrupt {
    fn is_set(&self) -> bool;
    /// The fd that becomes readable when set (None: it has none).
    fn wake_fd(&self) -> Option<BorrowedFd<'_>>;
}

/// Nothing interrupts the wait (only the fd or the deadline end it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Never;

impl Interrupt for Never {
    fn is_set(&self) -> bool {
        false
    }
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl Interrupt for CancelToken {
    fn is_set(&self) -> bool {
        self.is_cancelled()
    }
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

/// How a [`wait_fd`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woke {
    /// `fd` has one of the events asked for (or an error or hang-up, which the next
    /// syscall on it reports).
    Ready,
    Interrupted,
    TimedOut,
}

/// Waits until `fd` has `events`, `stop` is set, or `deadline` passes (None: no limit).
/// Sleeps in poll(2) the whole time when `stop` has a wake fd.
pub(crate) fn wait_fd(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    stop: &(impl Interrupt + ?Sized),
    deadline: Option<Instant>,
) -> io::Result<Woke> {
    loop {
        if stop.is_set() {
            return Ok(Woke::Interrupted);
        }
        let wake = stop.wake_fd();
        let timeout = poll_timeout(deadline);
        let mut pfds = vec![PollFd::new(fd, events)];
        if let Some(w) = wake {
            pfds.push(PollFd::new(w, PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut pfds, timeout) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(Woke::TimedOut);
                }
            }
            Ok(_) => {
                let got = pfds[0].revents().unwrap_or(PollFlags::empty());
                if stop.is_set() {
                    return Ok(Woke::Interrupted);
                }
                if !got.is_empty() {
                    return Ok(Woke::Ready);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A poll(2) timeout that ends at `deadline` (rounded up to whole milliseconds, so that
/// a wake-up never comes before it), or never.
pub(super) fn poll_timeout(deadline: Option<Instant>) -> PollTimeout {
    match deadline {
        None => PollTimeout::NONE,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_wakes_a_poll_at_once_and_reset_rearms() {
        let t = CancelToken::new().unwrap();
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            t2.cancel();
        });
        let start = Instant::now();
        let woke = wait_fd(r.as_fd(), PollFlags::POLLIN, &t, None).unwrap();
        assert_eq!(woke, Woke::Interrupted);
        assert!(start.elapsed() < Duration::from_secs(2));
        h.join().unwrap();
        t.reset();
        assert!(!t.is_cancelled());
        let woke = wait_fd(
            r.as_fd(),
            PollFlags::POLLIN,
            &t,
            Some(Instant::now() + Duration::from_millis(30)),
        )
        .unwrap();
        assert_eq!(woke, Woke::TimedOut);
        assert!(!t.wait_timeout(Some(Duration::from_millis(10))).unwrap());
        t.cancel();
        assert!(t.wait_timeout(None).unwrap());
    }
}
