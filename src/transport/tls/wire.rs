//! The socket during a TLS handshake (owner: transport TLS), shared by the rustls
//! handshake (x509) and OpenSSL's (PSK): non-blocking, every wait a poll that a cancel or
//! the deadline ends; the first bytes checked for TLS; a failure lingers after its alert.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

use super::TlsError;
use crate::transport::{wait_fd, CancelToken, Channel, Woke};

/// Handshake bytes buffered at most: a certificate chain larger than this is hostile.
pub(super) const MAX_HANDSHAKE_INPUT: usize = 1 << 20;
/// The first read of the handshake: a flight with a certificate chain fits.
pub(super) const FIRST_BUF: usize = 32 << 10;

/// TLS runs on sockets only (a handshake needs both directions).
pub(super) fn check_socket(chan: &Channel) -> Result<(), TlsError> {
    if chan.is_socket {
        Ok(())
    } else {
        Err(TlsError::NotSocket {
            chan: chan.peer.clone(),
            what: "TLS",
        })
    }
}

/// The socket during the handshake: non-blocking, every wait bounded by the cancel and the
/// deadline.
pub(super) struct Wire<'a> {
    pub(super) fd: BorrowedFd<'a>,
    pub(super) chan: &'a Channel,
    cancel: &'a CancelToken,
    deadline: Option<Instant>,
    timeout: Duration,
}

impl<'a> Wire<'a> {
    pub(super) fn new(
        chan: &'a Channel,
        cancel: &'a CancelToken,
        timeout: Option<Duration>,
    ) -> Result<Self, TlsError> {
        set_nonblocking(chan.fd.as_fd(), true).map_err(|e| io_err(chan, e))?;
        Ok(Wire {
            fd: chan.fd.as_fd(),
            chan,
            cancel,
            deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
            timeout: timeout.unwrap_or_default(),
        })
    }

    /// Restores blocking I/O, whatever the handshake's outcome.
    pub(super) fn finish<T>(&self, r: Result<T, TlsError>) -> Result<T, TlsError> {
        let restored = set_nonblocking(self.fd, false).map_err(|e| io_err(self.chan, e));
        let v = r?;
        restored?;
        Ok(v)
    }

    fn wait(&self, events: PollFlags) -> Result<(), TlsError> {
        match wait_fd(self.fd, events, self.cancel, self.deadline) {
            Ok(Woke::Ready) => Ok(()),
            Ok(Woke::Interrupted) => Err(TlsError::Cancelled {
                chan: self.chan.peer.clone(),
            }),
            Ok(Woke::TimedOut) => Err(TlsError::Timeout {
                chan: self.chan.peer.clone(),
                timeout: self.timeout,
            }),
            Err(e) => Err(io_err(self.chan, e)),
        }
    }

    pub(super) fn send(&self, mut data: &[u8]) -> Result<(), TlsError> {
        while !data.is_empty() {
            match nix::unistd::write(self.fd, data) {
                Ok(n) => data = &data[n..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => self.wait(PollFlags::POLLOUT)?,
                Err(e) => return Err(io_err(self.chan, e.into())),
            }
        }
        Ok(())
    }

    pub(super) fn recv(&self, buf: &mut [u8]) -> Result<usize, TlsError> {
        loop {
            match nix::unistd::read(self.fd.as_raw_fd(), buf) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => self.wait(PollFlags::POLLIN)?,
                Err(e) => return Err(io_err(self.chan, e.into())),
            }
        }
    }

    /// [`Wire::recv`] of handshake bytes: the peer's first bytes must start a TLS record
    /// (else it speaks clear text: TLS is not set on both ends). 0 at EOF.
    pub(super) fn recv_handshake(
        &self,
        buf: &mut [u8],
        first: &mut bool,
    ) -> Result<usize, TlsError> {
        let n = self.recv(buf)?;
        if n > 0 && std::mem::take(first) && !looks_like_tls(&buf[..n]) {
            return Err(TlsError::ClearText {
                chan: self.chan.peer.clone(),
            });
        }
        Ok(n)
    }

    pub(super) fn failed(&self, reason: String) -> TlsError {
        TlsError::Handshake {
            chan: self.chan.peer.clone(),
            reason,
        }
    }
}

fn io_err(chan: &Channel, source: std::io::Error) -> TlsError {
    TlsError::Io {
        chan: chan.peer.clone(),
        source,
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Whether `b` can start a TLS record: a content type (change_cipher_spec, alert,
/// handshake, application data) and a 3.x version.
fn looks_like_tls(b: &[u8]) -> bool {
    matches!(b.first(), Some(20..=23)) && b.get(1).is_none_or(|v| *v == 3)
}

/// How long a failed handshake keeps reading what the peer still sends.
const LINGER: Duration = Duration::from_secs(1);

/// Ends the sending side and reads (dropping it) what the peer still sends until it closes,
/// for at most [`LINGER`] (and within the handshake's deadline and the cancel): a peer in
/// the middle of its own flight then reads the alert, and reports the reason, instead of
/// failing its write on a closed socket ("Broken pipe", "Connection reset").
pub(super) fn linger(w: &Wire<'_>) {
    let _ = nix::sys::socket::shutdown(w.fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    let until = Instant::now() + LINGER;
    let deadline = w.deadline.map_or(until, |d| d.min(until));
    let mut buf = [0u8; 4096];
    loop {
        if !matches!(
            wait_fd(w.fd, PollFlags::POLLIN, w.cancel, Some(deadline)),
            Ok(Woke::Ready)
        ) {
            return;
        }
        match nix::unistd::read(w.fd.as_raw_fd(), &mut buf) {
            Ok(0) => return,
            Ok(_) | Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
            Err(_) => return,
        }
    }
}
