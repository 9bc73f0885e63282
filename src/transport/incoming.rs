//! The destination side of a channel before the peer connects: a ready channel (`fd:` of
//! a connected socket, pipe or file; `file:`), or a listener (`unix:`, `tcp:`, `fd:` of a
//! listening socket) that accepts while waiting on the cancel token too.

use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;

use super::cancel::{wait_fd, Interrupt, Woke};
use super::{check_stream, io_err, open, BadFd, Channel, TransportError, Uri};

/// The destination side before a connection arrives.
pub(crate) enum Incoming {
    Ready(Channel),
    /// A Unix listener: its label (`unix:PATH` or `fd:NAME`), and the path it bound, which
    /// it removes when done (none for a passed fd).
    Unix(UnixListener, String, Option<open::BoundPath>),
    Tcp(TcpListener, String),
}

impl Incoming {
    pub(crate) fn open(
        uri: &Uri,
        take_fd: impl FnOnce(&str) -> Option<OwnedFd>,
    ) -> Result<Self, TransportError> {
        match uri {
            Uri::Fd(name) => {
                let fd = take_fd(name).ok_or_else(|| TransportError::NoSuchFd(name.clone()))?;
                let listening: Result<bool, _> =
                    nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn);
                if !listening.unwrap_or(false) {
                    return Ok(Incoming::Ready(Channel::from_fd(name, fd)?));
                }
                // A listening socket: accept from it with the listener of its family.
                let label = format!("fd:{name}");
                match check_stream(name, &fd)? {
                    libc::AF_UNIX => Ok(Incoming::Unix(UnixListener::from(fd), label, None)),
                    libc::AF_INET | libc::AF_INET6 => {
                        Ok(Incoming::Tcp(TcpListener::from(fd), label))
                    }
                    other => Err(TransportError::BadFd {
                        name: name.clone(),
                        why: BadFd::ListenerFamily(other),
                    }),
                }
            }
            Uri::Unix(p) => {
                let label = uri.to_string();
                open::clear_socket_path(p, &label)?;
                let l = UnixListener::bind(p).map_err(io_err("listen on", uri))?;
                let bound = open::BoundPath::new(p.clone());
                Ok(Incoming::Unix(l, label, Some(bound)))
            }
            Uri::Tcp(a) => {
                let l = TcpListener::bind(a.as_str()).map_err(io_err("listen on", uri))?;
                Ok(Incoming::Tcp(l, uri.to_string()))
            }
            Uri::File(super::FileUri { path: p, offset }) => {
                let label = uri.to_string();
                let (f, kind) = open::open_input(p, &label, *offset)?;
                Ok(Incoming::Ready(match kind {
                    // A FIFO is opened non-blocking (never waits for a writer) and polled.
                    open::FileKind::Fifo => Channel::from_fd(&label, f.into())?,
                    open::FileKind::Regular => Channel::from_file(f, label),
                }))
            }
        }
    }

    /// Removes a `unix:` listener's path once no more connections are expected.
    pub(crate) fn done_listening(&self) {
        if let Incoming::Unix(_, _, Some(bound)) = self {
            bound.remove();
        }
    }

    /// Whether a peer can open more than one connection here (a listening socket), as
    /// postcopy-preempt needs.
    pub(crate) fn is_listener(&self) -> bool {
        !matches!(self, Incoming::Ready(_))
    }

    /// Waits for one connection and keeps listening, for a second channel from the same
    /// peer (postcopy-preempt). Ends on `cancel` as [`Incoming::accept`] does.
    pub(crate) fn accept_another(
        &self,
        cancel: &(impl Interrupt + ?Sized),
    ) -> Result<Channel, TransportError> {
        match self {
            Incoming::Ready(c) => Err(TransportError::BadFd {
                name: c.peer.clone(),
                why: BadFd::SingleChannel,
            }),
            Incoming::Unix(l, what, _) => {
                wait_readable(l.as_fd(), cancel, what)?;
                self.accept_now()
            }
            Incoming::Tcp(l, what) => {
                wait_readable(l.as_fd(), cancel, what)?;
                self.accept_now()
            }
        }
    }

    /// The listening socket, to poll it with other fds (None for a ready channel).
    pub(super) fn listener_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Incoming::Ready(_) => None,
            Incoming::Unix(l, _, _) => Some(l.as_fd()),
            Incoming::Tcp(l, _) => Some(l.as_fd()),
        }
    }

    /// What is listened on (`unix:PATH`, `tcp:...`, `fd:NAME`), or the ready channel's peer.
    pub(super) fn label(&self) -> &str {
        match self {
            Incoming::Ready(c) => &c.peer,
            Incoming::Unix(_, what, _) | Incoming::Tcp(_, what) => what,
        }
    }

    /// Accepts a connection that poll(2) said is waiting.
    pub(super) fn accept_now(&self) -> Result<Channel, TransportError> {
        match self {
            Incoming::Ready(c) => Err(TransportError::BadFd {
                name: c.peer.clone(),
                why: BadFd::SingleChannel,
            }),
            Incoming::Unix(l, what, _) => {
                let (s, _) = l.accept().map_err(io_err("accept on", what))?;
                Ok(Channel::from_unix(s, what.clone()))
            }
            Incoming::Tcp(l, what) => {
                let (s, peer) = l.accept().map_err(io_err("accept on", what))?;
                Ok(Channel::from_tcp(s, format!("tcp:{peer}")))
            }
        }
    }

    /// Waits for the connection, or for `cancel` (so that a cancel never waits on a peer),
    /// and stops listening.
    pub(crate) fn accept(
        self,
        cancel: &(impl Interrupt + ?Sized),
    ) -> Result<Channel, TransportError> {
        match self {
            Incoming::Ready(c) => Ok(c),
            listener => {
                let c = listener.accept_another(cancel)?;
                listener.done_listening();
                Ok(c)
            }
        }
    }
}

/// Sleeps until `fd` has input or `cancel` is set.
fn wait_readable(
    fd: BorrowedFd<'_>,
    cancel: &(impl Interrupt + ?Sized),
    what: &str,
) -> Result<(), TransportError> {
    match wait_fd(fd, nix::poll::PollFlags::POLLIN, cancel, None) {
        Ok(Woke::Ready) => Ok(()),
        Ok(Woke::Interrupted | Woke::TimedOut) => Err(TransportError::Cancelled(what.to_string())),
        Err(e) => Err(io_err("poll", what)(e)),
    }
}
