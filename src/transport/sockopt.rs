//! What a channel asks of its fd (owner: transport): its kind, that a socket is a byte
//! stream, blocking mode, timeouts, buffer sizes and shutdown.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::{io_err, BadFd, TransportError};

pub(super) fn fd_kind(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok(st.st_mode & libc::S_IFMT)
}

/// A socket's type (SOCK_STREAM, ...) and address family.
fn socket_type(fd: &OwnedFd) -> io::Result<(i32, i32)> {
    let get = |opt: libc::c_int| -> io::Result<i32> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(v)
    };
    Ok((get(libc::SO_TYPE)?, get(libc::SO_DOMAIN)?))
}

/// Only byte streams carry a migration: a datagram or seqpacket socket would cut it.
pub(super) fn check_stream(name: &str, fd: &OwnedFd) -> Result<i32, TransportError> {
    let (ty, domain) = socket_type(fd).map_err(io_err("getsockopt", name))?;
    if ty != libc::SOCK_STREAM {
        return Err(TransportError::BadFd {
            name: name.into(),
            why: BadFd::NotStream,
        });
    }
    Ok(domain)
}

pub(super) fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(|_| ())
}

/// Read and write timeouts on the socket behind `fd` (a duplicate shares them).
pub(crate) fn set_socket_timeouts(fd: &OwnedFd, t: Option<std::time::Duration>) {
    // SAFETY: borrowed for the duration of the calls only; ManuallyDrop keeps the fd open.
    let s = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd.as_raw_fd()) });
    let _ = s.set_read_timeout(t);
    let _ = s.set_write_timeout(t);
}

/// The receive buffer of the socket behind `fd` (a duplicate shares it); the kernel
/// doubles the value for its bookkeeping. A Unix stream socket's queue is bounded by the
/// sender's send buffer instead: there this changes nothing.
pub(crate) fn set_recv_buffer(fd: &OwnedFd, bytes: usize) {
    let _ = nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::RcvBuf, &bytes);
}

/// Shuts a socket down in both directions so that blocked reads and writes return.
pub(crate) fn shutdown_fd(fd: &OwnedFd) {
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, setsockopt, sockopt::RcvBuf};

    #[test]
    fn the_recv_buffer_set_through_a_duplicate_is_the_sockets() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = OwnedFd::from(l.accept().unwrap().0);
        setsockopt(&s, RcvBuf, &(4usize << 20)).unwrap();
        let big = getsockopt(&s, RcvBuf).unwrap();
        set_recv_buffer(&s.try_clone().unwrap(), 256 << 10);
        let small = getsockopt(&s, RcvBuf).unwrap();
        // The kernel doubles what it is given, capped by net.core.rmem_max.
        assert!(small <= 2 * (256 << 10), "{small}");
        assert!(small < big || big <= 2 * (256 << 10), "{small} vs {big}");
    }
}
