//! Migration channels: the URIs `fd:NAME`, `unix:PATH`, `tcp:HOST:PORT` and `file:PATH`,
//! and the byte I/O the engines use (reads into a buffer, gathered writes).

mod cancel;
mod connect;
mod incoming;
pub(crate) mod multifd;
pub(crate) mod open;
mod sockopt;
mod timer;
pub(crate) mod tls;
mod uri;

pub(crate) use cancel::CancelToken;
pub(crate) use cancel::{wait_fd, Never, Woke};
pub(crate) use incoming::Incoming;
use sockopt::{check_stream, fd_kind, set_nonblocking};
pub(crate) use sockopt::{set_recv_buffer, set_socket_timeouts, shutdown_fd};
pub(crate) use timer::{IoTimer, TimeoutParam};
pub(crate) use uri::{FileUri, Uri};

use std::fs::{File, OpenOptions};
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Socket buffer size asked for (the kernel caps it at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 4 << 20;

/// How often an output FIFO without a reader, or a full Unix listener backlog, is tried
/// again: neither has an fd that tells when it would succeed.
const RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error(
        "unsupported migration URI {0:?} (use fd:NAME, unix:PATH, tcp:HOST:PORT or file:PATH)"
    )]
    BadUri(String),
    #[error("no fd named {0:?} (pass one with getfd first)")]
    NoSuchFd(String),
    #[error("fd {name:?} cannot carry a migration: {why}")]
    BadFd { name: String, why: BadFd },
    #[error("{what} {target}: {source}")]
    Io {
        what: &'static str,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("cancelled while waiting for a connection on {0}")]
    Cancelled(String),
    #[error("{uri}: {why}")]
    Refused { uri: String, why: open::Refusal },
    /// Boxed: the largest of these errors, and rare.
    #[error(transparent)]
    Multifd(Box<multifd::MultifdError>),
    #[error(transparent)]
    Tls(Box<tls::TlsError>),
}

impl From<tls::TlsError> for TransportError {
    fn from(e: tls::TlsError) -> Self {
        TransportError::Tls(Box::new(e))
    }
}

impl From<multifd::MultifdError> for TransportError {
    fn from(e: multifd::MultifdError) -> Self {
        TransportError::Multifd(Box::new(e))
    }
}

/// Why a passed fd (or a channel) cannot carry a migration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum BadFd {
    #[error("it is not a stream socket (SOCK_STREAM)")]
    NotStream,
    #[error("not a socket, pipe or regular file")]
    WrongType,
    #[error("it is a listening socket, not a connected one")]
    Listening,
    #[error("a listening socket of address family {0}, not AF_UNIX, AF_INET or AF_INET6")]
    ListenerFamily(i32),
    #[error("a single connected channel cannot take a second connection")]
    SingleChannel,
}

/// An established migration channel.
pub struct Channel {
    fd: OwnedFd,
    /// Sockets carry a return path and can be shut down to unblock I/O; files and pipes not.
    pub(crate) is_socket: bool,
    /// Pipes (and FIFOs) are non-blocking and polled with the cancel token, so that a
    /// cancel never waits on them.
    is_pipe: bool,
    cancel: Option<CancelToken>,
    /// How long I/O may make no progress, and which parameter set it. Polled fds (pipes)
    /// enforce it here (counting only once data has moved, so that a FIFO whose writer has
    /// not come yet waits as a listener does); sockets by SO_RCVTIMEO/SO_SNDTIMEO.
    timer: Arc<IoTimer>,
    moved: AtomicBool,
    pub(crate) peer: String,
    /// The TLS session once a handshake ran: all I/O then goes through it. Shared with the
    /// channel's clones (a return path), so both directions use the one session.
    tls: Option<Arc<tls::session::Session>>,
}

fn io_err(
    what: &'static str,
    target: impl std::fmt::Display,
) -> impl FnOnce(io::Error) -> TransportError {
    let target = target.to_string();
    move |source| TransportError::Io {
        what,
        source: crate::sandbox::explain(&target, source),
        target,
    }
}

impl Channel {
    fn new(fd: OwnedFd, is_socket: bool, is_pipe: bool, peer: String) -> Self {
        Channel {
            fd,
            is_socket,
            is_pipe,
            cancel: None,
            timer: Arc::default(),
            moved: AtomicBool::new(false),
            peer,
            tls: None,
        }
    }

    /// What the TLS handshake agreed, when the channel runs under TLS.
    pub(crate) fn tls_info(&self) -> Option<&tls::TlsInfo> {
        self.tls.as_deref().map(|s| &s.info)
    }

    /// A second handle on the same channel (a return path): same socket, same TLS session,
    /// same timeouts and cancel token.
    pub(crate) fn try_clone(&self, peer: &str) -> io::Result<Channel> {
        let mut c = Channel::new(
            self.fd.try_clone()?,
            self.is_socket,
            self.is_pipe,
            peer.into(),
        );
        c.cancel = self.cancel.clone();
        c.timer = self.timer.clone();
        c.tls = self.tls.clone();
        Ok(c)
    }

    /// Wraps a passed fd after checking it is a stream socket, pipe or regular file.
    pub(crate) fn from_fd(name: &str, fd: OwnedFd) -> Result<Self, TransportError> {
        let kind = fd_kind(fd.as_fd()).map_err(io_err("fstat", name))?;
        let is_socket = match kind {
            libc::S_IFSOCK => true,
            libc::S_IFIFO | libc::S_IFREG => false,
            _ => {
                return Err(TransportError::BadFd {
                    name: name.into(),
                    why: BadFd::WrongType,
                })
            }
        };
        if is_socket {
            check_stream(name, &fd)?;
            // A listening socket would fail every read with ENOTCONN; say so now.
            let listening: Result<bool, _> =
                nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn);
            if listening.unwrap_or(false) {
                return Err(TransportError::BadFd {
                    name: name.into(),
                    why: BadFd::Listening,
                });
            }
        }
        let is_pipe = kind == libc::S_IFIFO;
        if is_pipe {
            set_nonblocking(&fd).map_err(|e| io_err("fcntl", name)(e.into()))?;
        }
        Ok(Channel::new(fd, is_socket, is_pipe, format!("fd:{name}")))
    }

    pub(crate) fn from_unix(s: UnixStream, peer: String) -> Self {
        Channel::new(s.into(), true, false, peer)
    }

    fn from_tcp(s: TcpStream, peer: String) -> Self {
        let _ = s.set_nodelay(true);
        Channel::new(s.into(), true, false, peer)
    }

    pub(crate) fn from_file(f: File, peer: String) -> Self {
        Channel::new(f.into(), false, false, peer)
    }

    /// The token a cancel sets; pipe I/O waits on it next to the pipe.
    pub(crate) fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// For a pipe: waits until `events` or a cancel, or fails once no data has moved for
    /// the stall timeout (the poll's only deadline). Sockets block in the syscall instead
    /// (unblocked by shutdown(2), bounded by SO_RCVTIMEO/SO_SNDTIMEO).
    fn wait_pipe(&self, events: nix::poll::PollFlags) -> io::Result<()> {
        let stall = self.timer.ms.load(Ordering::Relaxed);
        let deadline = (stall > 0 && self.moved.load(Ordering::Relaxed))
            .then(|| std::time::Instant::now() + Duration::from_millis(stall));
        let woke = match &self.cancel {
            Some(c) => wait_fd(self.fd.as_fd(), events, c, deadline)?,
            None => wait_fd(self.fd.as_fd(), events, &Never, deadline)?,
        };
        match woke {
            Woke::Ready => Ok(()),
            Woke::Interrupted => Err(io::Error::other("cancelled")),
            Woke::TimedOut => {
                let what = if events.contains(nix::poll::PollFlags::POLLIN) {
                    "no data"
                } else {
                    "could not send"
                };
                Err(self.timer.error(what))
            }
        }
    }

    /// Connects the source side.
    pub(crate) fn connect(
        uri: &Uri,
        take_fd: impl FnOnce(&str) -> Option<OwnedFd>,
        cancel: &CancelToken,
    ) -> Result<Self, TransportError> {
        match uri {
            Uri::Fd(name) => {
                let fd = take_fd(name).ok_or_else(|| TransportError::NoSuchFd(name.clone()))?;
                Channel::from_fd(name, fd)
            }
            Uri::Unix(p) => {
                let label = uri.to_string();
                let s = UnixStream::from(connect::unix(p, cancel, &label)?);
                Ok(Channel::from_unix(s, label))
            }
            Uri::Tcp(a) => {
                let label = uri.to_string();
                let s = TcpStream::from(connect::tcp(a, cancel, &label)?);
                Ok(Channel::from_tcp(s, label))
            }
            Uri::File(FileUri { path: p, offset }) => {
                let label = uri.to_string();
                if open::output_kind(p, &label)? != Some(open::FileKind::Fifo) {
                    let f = open::create_output(p, &label, *offset)?;
                    return Ok(Channel::from_file(f, label));
                }
                if *offset != 0 {
                    return Err(open::refused(&label, open::Refusal::FifoOffset));
                }
                // A FIFO's open for writing blocks until a reader comes, and no fd tells
                // when one does: retry every 50 ms (only while waiting for the reader; a
                // cancel ends the wait at once).
                loop {
                    match OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                        .open(p)
                    {
                        Ok(f) => return Channel::from_fd(&label, f.into()),
                        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                            let cancelled = cancel
                                .wait_timeout(Some(RETRY))
                                .map_err(io_err("poll", &label))?;
                            if cancelled {
                                return Err(TransportError::Cancelled(label));
                            }
                        }
                        Err(e) => return Err(io_err("open", uri)(e)),
                    }
                }
            }
        }
    }

    /// Larger socket buffers let the source run ahead of the destination instead of
    /// switching back and forth every 200 KiB (the Unix socket default).
    pub(crate) fn tune_buffers(&self) {
        if self.is_socket {
            use nix::sys::socket::{setsockopt, sockopt};
            let _ = setsockopt(&self.fd, sockopt::SndBuf, &SOCKET_BUFFER);
            let _ = setsockopt(&self.fd, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
    }

    pub(crate) fn set_send_buffer(&self, bytes: usize) {
        if self.is_socket {
            let _ =
                nix::sys::socket::setsockopt(&self.fd, nix::sys::socket::sockopt::SndBuf, &bytes);
        }
    }

    /// Read and write timeouts (None: block): a silently dead peer then shows as an I/O
    /// error instead of a hang. Sockets get SO_RCVTIMEO/SO_SNDTIMEO; pipes a stall timeout.
    /// Set from `link-timeout` (postcopy).
    pub(crate) fn set_timeouts(&self, t: Option<std::time::Duration>) {
        self.timer.set(t, TimeoutParam::Link);
        if self.is_socket {
            set_socket_timeouts(&self.fd, t);
        }
    }

    /// Set from `precopy-timeout`: reads and writes (a destination), or only writes (a
    /// source: its return path may be idle for long).
    pub(crate) fn set_precopy_timeouts(&self, t: Option<Duration>, reads_too: bool) {
        if reads_too {
            self.set_timeouts(t);
            self.timer.set(t, TimeoutParam::Precopy);
            return;
        }
        self.timer.set(t, TimeoutParam::Precopy);
        if self.is_socket {
            // SAFETY: borrowed for the duration of the call only; ManuallyDrop keeps the fd.
            let s = std::mem::ManuallyDrop::new(unsafe {
                UnixStream::from_raw_fd(self.fd.as_raw_fd())
            });
            let _ = s.set_write_timeout(t);
        }
    }

    /// The socket's send buffer as the kernel counts it (twice what was set), or None
    /// (not a socket).
    pub(crate) fn send_buffer(&self) -> Option<usize> {
        if !self.is_socket {
            return None;
        }
        nix::sys::socket::getsockopt(&self.fd, nix::sys::socket::sockopt::SndBuf).ok()
    }

    /// The bytes the socket holds that the peer has not taken yet (SIOCOUTQ: for a Unix
    /// socket those in the peer's queue, for TCP those not yet acknowledged), or None.
    pub(crate) fn unsent(&self) -> Option<usize> {
        if !self.is_socket {
            return None;
        }
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer, which points to
        // `n`, alive for the call; the fd is open (owned by self).
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        (r == 0).then_some(n.max(0) as usize)
    }

    /// Waits until the socket can take more without blocking (or fails), `bell` rings, or
    /// `deadline` passes. Not a socket: writable at once.
    pub(crate) fn wait_writable(
        &self,
        bell: &CancelToken,
        deadline: std::time::Instant,
    ) -> io::Result<Woke> {
        if !self.is_socket {
            return Ok(Woke::Ready);
        }
        wait_fd(
            self.fd.as_fd(),
            nix::poll::PollFlags::POLLOUT,
            bell,
            Some(deadline),
        )
    }

    /// Shuts a socket down (both directions) so that blocked I/O on it returns.
    pub(crate) fn shutdown(&self) {
        if self.is_socket {
            shutdown_fd(&self.fd);
        }
    }

    /// A second handle to the same channel (for a return path or for shutdown).
    pub(crate) fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    fn timed_out(&self, what: &str) -> io::Error {
        self.timer.error(what)
    }

    /// The channel's timeout record, for an engine that re-arms the socket's timeouts
    /// through a cloned fd (so that its errors name the right parameter).
    pub(crate) fn timer(&self) -> Arc<IoTimer> {
        self.timer.clone()
    }

    /// The fd and timeout record the TLS session does its raw I/O with.
    fn tls_io(&self) -> tls::session::Io<'_> {
        tls::session::Io {
            fd: self.fd.as_fd(),
            timer: &self.timer,
        }
    }

    /// Under TLS: sends close_notify, so that the peer reads a clean end of the stream (the
    /// end of each multifd channel). Without TLS: nothing.
    pub(crate) fn close_notify(&self) -> io::Result<()> {
        match &self.tls {
            Some(t) => t.close_notify(&self.tls_io()),
            None => Ok(()),
        }
    }

    /// Under TLS: whether the peer closing without close_notify is an error (multifd toward
    /// QEMU >= 10.0) rather than a plain end of stream.
    pub(crate) fn set_tls_strict_eof(&self, strict: bool) {
        if let Some(t) = &self.tls {
            t.set_strict_eof(strict);
        }
    }

    /// Reads into `buf`; 0 means the peer closed. Retries EINTR.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(t) = &self.tls {
            return t.read(&self.tls_io(), buf);
        }
        if self.is_pipe {
            // Poll first: a FIFO whose writer has not come yet reads as EOF, but polls as
            // not ready (it reports POLLHUP only once a writer has been and gone).
            self.wait_pipe(nix::poll::PollFlags::POLLIN)?;
        }
        loop {
            match nix::unistd::read(self.fd.as_raw_fd(), buf) {
                Ok(n) => {
                    if n > 0 && self.is_pipe {
                        self.moved.store(true, Ordering::Relaxed);
                    }
                    return Ok(n);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) if self.is_pipe => {
                    self.wait_pipe(nix::poll::PollFlags::POLLIN)?
                }
                Err(nix::errno::Errno::EAGAIN) => return Err(self.timed_out("no data")),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads only what has already arrived: 0 when nothing has (or the peer closed, which
    /// the next [`Channel::read`] reports). Regular files always read 0 here.
    pub(crate) fn read_ready(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(t) = &self.tls {
            return t.read_ready(&self.tls_io(), buf);
        }
        let fd = self.fd.as_raw_fd();
        loop {
            let r = if self.is_socket {
                nix::sys::socket::recv(fd, buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
            } else if self.is_pipe {
                nix::unistd::read(fd, buf)
            } else {
                return Ok(0);
            };
            match r {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Ok(0),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes all of `bufs`, in order, with as few syscalls as it can.
    pub(crate) fn write_all_vectored(&self, bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
        if let Some(t) = &self.tls {
            return t.write_vectored(&self.tls_io(), bufs);
        }
        let mut bufs = &mut bufs[..];
        while !bufs.is_empty() {
            let n = match nix::sys::uio::writev(self.fd.as_fd(), &bufs[..bufs.len().min(1024)]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) if self.is_pipe => {
                    self.wait_pipe(nix::poll::PollFlags::POLLOUT)?;
                    continue;
                }
                Err(nix::errno::Errno::EAGAIN) => return Err(self.timed_out("could not send")),
                Err(e) => return Err(e.into()),
            };
            if self.is_pipe {
                self.moved.store(true, Ordering::Relaxed);
            }
            io::IoSlice::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    /// Writes all of `bufs` (the process's bytes and guest pages), in order, with as few
    /// `writev` calls as it can; as [`Channel::write_all_vectored`].
    pub(crate) fn write_all_iovecs(
        &self,
        bufs: &mut crate::memory::page::IoVecs<'_>,
    ) -> io::Result<()> {
        if let Some(t) = &self.tls {
            return t.write_iovecs(&self.tls_io(), bufs);
        }
        while !bufs.is_empty() {
            match bufs.writev(self.fd.as_fd()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && self.is_pipe => {
                    self.wait_pipe(nix::poll::PollFlags::POLLOUT)?;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    return Err(self.timed_out("could not send"))
                }
                Err(e) => return Err(e),
            }
            if self.is_pipe {
                self.moved.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Fills all of `bufs` (guest pages) from the channel, in order, with as few `readv`
    /// calls as it can. The peer closing first is UnexpectedEof; `bufs` then tells how
    /// much is missing.
    pub(crate) fn read_exact_iovecs(
        &self,
        bufs: &mut crate::memory::page::IoVecs<'_>,
    ) -> io::Result<()> {
        if let Some(t) = &self.tls {
            return t.read_exact_iovecs(&self.tls_io(), bufs);
        }
        while !bufs.is_empty() {
            match bufs.readv(self.fd.as_fd()) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && self.is_pipe => {
                    self.wait_pipe(nix::poll::PollFlags::POLLIN)?;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    return Err(self.timed_out("no data"))
                }
                Err(e) => return Err(e),
            }
            if self.is_pipe {
                self.moved.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub(crate) fn write_all(&self, data: &[u8]) -> io::Result<()> {
        self.write_all_vectored(&mut [io::IoSlice::new(data)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parse_uris() {
        assert_eq!("fd:mig".parse::<Uri>().unwrap(), Uri::Fd("mig".into()));
        assert_eq!(
            "unix:/tmp/x".parse::<Uri>().unwrap(),
            Uri::Unix("/tmp/x".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Uri>().unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "file:/tmp/f".parse::<Uri>().unwrap(),
            Uri::File(FileUri::new("/tmp/f"))
        );
        for (uri, path, offset, fdset) in [
            ("file:/x,offset=4", "/x", 4, None),
            ("file:/x,offset=0x1000", "/x", 4096, None),
            ("file:/x,offset=2M", "/x", 2 << 20, None),
            ("file:/dev/fdset/3,offset=1k", "/dev/fdset/3", 1024, Some(3)),
            ("file:/dev/fdset/7", "/dev/fdset/7", 0, Some(7)),
        ] {
            let u = uri.parse::<Uri>().unwrap();
            let Uri::File(f) = &u else { panic!("{uri}") };
            assert_eq!(
                (f.path.to_str().unwrap(), f.offset, f.fdset()),
                (path, offset, fdset)
            );
            assert_eq!(u.to_string().parse::<Uri>().unwrap(), u, "{uri} round trip");
        }
        for bad in [
            "",
            "fd:",
            "exec:cat",
            "tcp:host",
            "tcp:host:99999",
            "nothing",
            "file:/x,offset=",
            "file:/x,offset=4Q",
            "file:/x,offset=-1",
            "file:/x,offset=99999999999E",
            "file:,offset=4",
        ] {
            assert!(bad.parse::<Uri>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_wrong_fds() {
        let dir = std::fs::File::open("/").unwrap();
        assert!(matches!(
            Channel::from_fd("d", dir.into()),
            Err(TransportError::BadFd { .. })
        ));
        let l =
            UnixListener::bind(std::env::temp_dir().join(format!("qmh-t-{}", std::process::id())))
                .unwrap();
        assert!(matches!(
            Channel::from_fd("l", l.into()),
            Err(TransportError::BadFd { .. })
        ));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(Channel::from_fd("s", a.into()).unwrap().is_socket);
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("qmh-tr-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }

    #[test]
    fn unix_listen_never_removes_what_is_not_a_socket() {
        let d = tmp("unix");
        let p = d.join("f");
        std::fs::write(&p, b"keep me").unwrap();
        let uri = Uri::Unix(p.clone());
        let e = Incoming::open(&uri, |_| None).err().expect("refused");
        assert!(
            e.to_string().contains("is a regular file, not a socket"),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        // A stale socket is replaced, and removed after the connection.
        std::fs::remove_file(&p).unwrap();
        drop(UnixListener::bind(&p).unwrap());
        let inc = Incoming::open(&uri, |_| None).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        inc.accept(&Never).unwrap();
        assert!(!p.exists());
        // A path replaced after the bind is not removed.
        let inc = Incoming::open(&uri, |_| None).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"new").unwrap();
        inc.done_listening();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn file_output_is_private_truncated_and_never_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp("fileout");
        let never = CancelToken::new().unwrap();
        let p = d.join("out");
        let c = Channel::connect(&Uri::File(FileUri::new(p.clone())), |_| None, &never).unwrap();
        c.write_all(b"abc").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(c);
        let c = Channel::connect(&Uri::File(FileUri::new(p.clone())), |_| None, &never).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0, "truncated");
        drop(c);
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = Channel::connect(&Uri::File(FileUri::new(link)), |_| None, &never)
            .err()
            .expect("symlink refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        for bad in ["/dev/null", "/dev/ptmx"] {
            let e = Channel::connect(&Uri::File(FileUri::new(bad)), |_| None, &never)
                .err()
                .expect("device refused");
            assert!(e.to_string().contains("character device"), "{bad}: {e}");
        }
        let e = Channel::connect(&Uri::File(FileUri::new(d.clone())), |_| None, &never)
            .err()
            .expect("directory refused");
        assert!(e.to_string().contains("directory"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn file_input_takes_only_files_and_fifos() {
        for bad in ["/dev/ptmx", "/dev/zero", "/"] {
            let e = Incoming::open(&Uri::File(FileUri::new(bad)), |_| None)
                .err()
                .expect("refused");
            assert!(matches!(e, TransportError::Refused { .. }), "{bad}: {e}");
        }
        let d = tmp("filein");
        let p = d.join("in");
        std::fs::write(&p, b"x").unwrap();
        assert!(matches!(
            Incoming::open(&Uri::File(FileUri::new(p)), |_| None),
            Ok(Incoming::Ready(_))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fd_tcp_listener_accepts_tcp() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let inc = Incoming::open(&Uri::Fd("l".into()), |_| Some(l.into())).unwrap();
        assert!(matches!(inc, Incoming::Tcp(..)));
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut s, b"QEVM").unwrap();
        });
        let c = inc.accept(&Never).unwrap();
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            got += c.read(&mut buf[got..]).unwrap();
        }
        assert_eq!(&buf, b"QEVM");
        t.join().unwrap();
        // A datagram socket is no channel.
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            Channel::from_fd("u", u.into()),
            Err(TransportError::BadFd { .. })
        ));
    }

    #[test]
    fn a_pipe_that_stalls_times_out_after_data_moved() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let c = Channel::from_fd("p", r).unwrap();
        c.set_timeouts(Some(Duration::from_millis(300)));
        nix::unistd::write(&w, b"ab").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(c.read(&mut buf).unwrap(), 2);
        let t = std::time::Instant::now();
        let e = c.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("link-timeout (300 ms)"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(300));
        drop(w);
    }

    #[test]
    fn connect_is_cancellable_and_connects() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = Uri::Tcp(l.local_addr().unwrap().to_string());
        let c = Channel::connect(&uri, |_| None, &CancelToken::new().unwrap()).unwrap();
        assert!(c.is_socket);
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        std::io::Read::read_exact(&mut s, &mut b).unwrap();
        assert_eq!(&b, b"hi");
        // A Unix listener whose backlog is full: connect waits, and a cancel ends it.
        let d = tmp("connect");
        let p = d.join("s");
        let l = UnixListener::bind(&p).unwrap();
        let mut held = Vec::new();
        let cancel = CancelToken::new().unwrap();
        let c2 = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c2.cancel();
        });
        let uri = Uri::Unix(p.clone());
        let start = std::time::Instant::now();
        let r = loop {
            match Channel::connect(&uri, |_| None, &cancel) {
                Ok(c) => held.push(c),
                Err(e) => break e,
            }
            assert!(held.len() < 10_000, "the backlog never filled");
        };
        assert!(matches!(r, TransportError::Cancelled(_)), "{r}");
        assert!(start.elapsed() < Duration::from_secs(10));
        t.join().unwrap();
        drop(l);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
