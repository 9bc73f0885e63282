//! Connecting `unix:` and `tcp:` so that a cancel always gets through: connect(2) on a
//! non-blocking socket, polled together with the cancel token (a blocking connect to a
//! silent TCP host waits for the kernel's SYN retries, about two minutes; to a Unix
//! listener whose backlog is full, until it accepts).

use std::net::ToSocketAddrs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrLike, SockaddrStorage};

use super::cancel::{wait_fd, CancelToken, Woke};
use super::{TransportError, RETRY};

fn io_err(what: &'static str, label: &str, e: impl Into<std::io::Error>) -> TransportError {
    TransportError::Io {
        what,
        target: label.to_string(),
        source: e.into(),
    }
}

/// Connects a stream socket of `family` to `addr`, giving up when `cancel` is set.
fn connect_one(
    family: AddressFamily,
    addr: &dyn SockaddrLike,
    cancel: &CancelToken,
    label: &str,
) -> Result<OwnedFd, TransportError> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    loop {
        let fd = socket::socket(family, SockType::Stream, flags, None)
            .map_err(|e| io_err("socket for", label, e))?;
        match socket::connect(fd.as_raw_fd(), addr) {
            Ok(()) => return blocking(fd, label),
            Err(Errno::EINPROGRESS) | Err(Errno::EINTR) => {
                wait_writable(&fd, cancel, label)?;
                let err = socket::getsockopt(&fd, socket::sockopt::SocketError)
                    .map_err(|e| io_err("connect to", label, e))?;
                if err != 0 {
                    return Err(io_err("connect to", label, Errno::from_raw(err)));
                }
                return blocking(fd, label);
            }
            // A Unix listener's backlog is full, and nothing tells when it has room: try
            // again shortly (a cancel ends the wait at once).
            Err(Errno::EAGAIN) if family == AddressFamily::Unix => {
                let cancelled = cancel
                    .wait_timeout(Some(RETRY))
                    .map_err(|e| io_err("poll", label, e))?;
                if cancelled {
                    return Err(TransportError::Cancelled(label.to_string()));
                }
            }
            Err(e) => return Err(io_err("connect to", label, e)),
        }
    }
}

fn wait_writable(fd: &OwnedFd, cancel: &CancelToken, label: &str) -> Result<(), TransportError> {
    match wait_fd(fd.as_fd(), nix::poll::PollFlags::POLLOUT, cancel, None) {
        Ok(Woke::Ready) => Ok(()),
        Ok(Woke::Interrupted | Woke::TimedOut) => Err(TransportError::Cancelled(label.to_string())),
        Err(e) => Err(io_err("poll", label, e)),
    }
}

/// The engines use blocking I/O with socket timeouts on a connected channel.
fn blocking(fd: OwnedFd, label: &str) -> Result<OwnedFd, TransportError> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| io_err("fcntl", label, e))?;
    fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK),
    )
    .map_err(|e| io_err("fcntl", label, e))?;
    Ok(fd)
}

pub(super) fn unix(
    path: &std::path::Path,
    cancel: &CancelToken,
    label: &str,
) -> Result<OwnedFd, TransportError> {
    let addr = socket::UnixAddr::new(path).map_err(|e| io_err("connect to", label, e))?;
    connect_one(AddressFamily::Unix, &addr, cancel, label)
}

/// Tries each address HOST:PORT resolves to, in order, as `TcpStream::connect` does.
pub(super) fn tcp(
    hostport: &str,
    cancel: &CancelToken,
    label: &str,
) -> Result<OwnedFd, TransportError> {
    let addrs = hostport
        .to_socket_addrs()
        .map_err(|e| io_err("resolve", label, e))?;
    let mut last = None;
    for a in addrs {
        let (family, addr) = sockaddr(&a);
        let addr = addr.ok_or_else(|| {
            io_err(
                "connect to",
                label,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad address"),
            )
        })?;
        match connect_one(family, &addr, cancel, label) {
            Ok(fd) => return Ok(fd),
            Err(e @ TransportError::Cancelled(_)) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io_err(
            "resolve",
            label,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        )
    }))
}

/// A socket address for connect(2) (nix's conversions need its `net` feature).
fn sockaddr(a: &std::net::SocketAddr) -> (AddressFamily, Option<SockaddrStorage>) {
    match a {
        std::net::SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a complete sockaddr_in, and its exact length.
            let s = unsafe {
                SockaddrStorage::from_raw(
                    &sin as *const libc::sockaddr_in as *const libc::sockaddr,
                    Some(std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t),
                )
            };
            (AddressFamily::Inet, s)
        }
        std::net::SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: a complete sockaddr_in6, and its exact length.
            let s = unsafe {
                SockaddrStorage::from_raw(
                    &sin6 as *const libc::sockaddr_in6 as *const libc::sockaddr,
                    Some(std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t),
                )
            };
            (AddressFamily::Inet6, s)
        }
    }
}
