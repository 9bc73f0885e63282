//! Migration channels: the URIs `fd:NAME`, `unix:PATH`, `tcp:HOST:PORT` and `file:PATH`,
//! and the byte I/O the engines use (reads into a buffer, gathered writes).

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Socket buffer size asked for (the kernel caps it at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    Fd(String),
    Unix(PathBuf),
    Tcp(String),
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "unsupported migration URI {0:?} (use fd:NAME, unix:PATH, tcp:HOST:PORT or file:PATH)"
    )]
    BadUri(String),
    #[error("no fd named {0:?} (pass one with getfd first)")]
    NoSuchFd(String),
    #[error("fd {name:?} cannot carry a migration: {why}")]
    BadFd { name: String, why: String },
    #[error("{what} {target}: {source}")]
    Io {
        what: &'static str,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("cancelled while waiting for a connection on {0}")]
    Cancelled(String),
}

impl FromStr for Uri {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TransportError::BadUri(s.to_string());
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        if scheme == "file" || scheme == "unix" {
            crate::sandbox::note_path(std::path::Path::new(rest));
        }
        Ok(match scheme {
            "fd" => Uri::Fd(rest.to_string()),
            "unix" => Uri::Unix(PathBuf::from(rest)),
            "tcp" => {
                // HOST:PORT with a numeric port; [v6]:PORT too.
                let (_, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                port.parse::<u16>().map_err(|_| bad())?;
                Uri::Tcp(rest.to_string())
            }
            // QEMU accepts file:PATH,offset=N; the helper writes and reads from offset 0 only.
            "file" if !rest.contains(",offset=") => Uri::File(PathBuf::from(rest)),
            _ => return Err(bad()),
        })
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Fd(n) => write!(f, "fd:{n}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::Tcp(a) => write!(f, "tcp:{a}"),
            Uri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// An established migration channel.
pub struct Channel {
    fd: OwnedFd,
    /// Sockets carry a return path and can be shut down to unblock I/O; files and pipes not.
    pub is_socket: bool,
    /// Pipes (and FIFOs) are non-blocking and polled, so that a cancel never waits on them.
    is_pipe: bool,
    cancel: Option<Arc<AtomicBool>>,
    pub peer: String,
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

fn fd_kind(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok(st.st_mode & libc::S_IFMT)
}

impl Channel {
    /// Wraps a passed fd after checking it is a socket, pipe or regular file.
    pub fn from_fd(name: &str, fd: OwnedFd) -> Result<Self, TransportError> {
        let kind = fd_kind(fd.as_fd()).map_err(io_err("fstat", name))?;
        let is_socket = match kind {
            libc::S_IFSOCK => true,
            libc::S_IFIFO | libc::S_IFREG => false,
            _ => {
                return Err(TransportError::BadFd {
                    name: name.into(),
                    why: "not a socket, pipe or regular file".into(),
                })
            }
        };
        if is_socket {
            // A listening socket would fail every read with ENOTCONN; say so now.
            let listening: Result<bool, _> =
                nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn);
            if listening.unwrap_or(false) {
                return Err(TransportError::BadFd {
                    name: name.into(),
                    why: "it is a listening socket, not a connected one".into(),
                });
            }
        }
        let is_pipe = kind == libc::S_IFIFO;
        if is_pipe {
            set_nonblocking(&fd).map_err(|e| io_err("fcntl", name)(e.into()))?;
        }
        Ok(Channel {
            fd,
            is_socket,
            is_pipe,
            cancel: None,
            peer: format!("fd:{name}"),
        })
    }

    pub fn from_unix(s: UnixStream, peer: String) -> Self {
        Channel {
            fd: s.into(),
            is_socket: true,
            is_pipe: false,
            cancel: None,
            peer,
        }
    }

    pub fn from_file(f: File, peer: String) -> Self {
        Channel {
            fd: f.into(),
            is_socket: false,
            is_pipe: false,
            cancel: None,
            peer,
        }
    }

    /// The flag a cancel sets; pipe I/O checks it while it waits.
    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// For a pipe: waits until `events` or a cancel. Other channels block in the syscall
    /// and are unblocked by shutdown(2) instead.
    fn wait_pipe(&self, events: nix::poll::PollFlags) -> io::Result<()> {
        loop {
            if self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Acquire))
            {
                return Err(io::Error::other("cancelled"));
            }
            let mut pfd = [nix::poll::PollFd::new(self.fd.as_fd(), events)];
            match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(100u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Connects the source side.
    pub fn connect(
        uri: &Uri,
        take_fd: impl FnOnce(&str) -> Option<OwnedFd>,
        cancel: &AtomicBool,
    ) -> Result<Self, TransportError> {
        match uri {
            Uri::Fd(name) => {
                let fd = take_fd(name).ok_or_else(|| TransportError::NoSuchFd(name.clone()))?;
                Channel::from_fd(name, fd)
            }
            Uri::Unix(p) => {
                let s = UnixStream::connect(p).map_err(io_err("connect to", uri))?;
                Ok(Channel::from_unix(s, uri.to_string()))
            }
            Uri::Tcp(a) => {
                let s = TcpStream::connect(a.as_str()).map_err(io_err("connect to", uri))?;
                let _ = s.set_nodelay(true);
                Ok(Channel {
                    fd: s.into(),
                    is_socket: true,
                    is_pipe: false,
                    cancel: None,
                    peer: uri.to_string(),
                })
            }
            Uri::File(p) if is_fifo(p) => {
                // A FIFO's open for writing blocks until a reader comes: poll for one.
                loop {
                    match OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(p)
                    {
                        Ok(f) => return Channel::from_fd(&uri.to_string(), f.into()),
                        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                            if cancel.load(Ordering::Acquire) {
                                return Err(TransportError::Cancelled(uri.to_string()));
                            }
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                        Err(e) => return Err(io_err("open", uri)(e)),
                    }
                }
            }
            Uri::File(p) => {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p)
                    .map_err(io_err("create", uri))?;
                Ok(Channel::from_file(f, uri.to_string()))
            }
        }
    }

    /// Larger socket buffers let the source run ahead of the destination instead of
    /// switching back and forth every 200 KiB (the Unix socket default).
    pub fn tune_buffers(&self) {
        if self.is_socket {
            use nix::sys::socket::{setsockopt, sockopt};
            let _ = setsockopt(&self.fd, sockopt::SndBuf, &SOCKET_BUFFER);
            let _ = setsockopt(&self.fd, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
    }

    pub fn set_send_buffer(&self, bytes: usize) {
        if self.is_socket {
            let _ =
                nix::sys::socket::setsockopt(&self.fd, nix::sys::socket::sockopt::SndBuf, &bytes);
        }
    }

    /// Read and write timeouts on a socket (None: block): a silently dead peer then shows
    /// as an I/O error instead of a hang.
    pub fn set_timeouts(&self, t: Option<std::time::Duration>) {
        if self.is_socket {
            // SAFETY: borrowed for the duration of the calls only; ManuallyDrop keeps the fd.
            let s = std::mem::ManuallyDrop::new(unsafe {
                UnixStream::from_raw_fd(self.fd.as_raw_fd())
            });
            let _ = s.set_read_timeout(t);
            let _ = s.set_write_timeout(t);
        }
    }

    /// Shuts a socket down (both directions) so that blocked I/O on it returns.
    pub fn shutdown(&self) {
        if self.is_socket {
            shutdown_fd(&self.fd);
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A second handle to the same channel (for a return path or for shutdown).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Reads into `buf`; 0 means the peer closed. Retries EINTR.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.is_pipe {
            // Poll first: a FIFO whose writer has not come yet reads as EOF, but polls as
            // not ready (it reports POLLHUP only once a writer has been and gone).
            self.wait_pipe(nix::poll::PollFlags::POLLIN)?;
        }
        loop {
            match nix::unistd::read(self.fd.as_raw_fd(), buf) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) if self.is_pipe => {
                    self.wait_pipe(nix::poll::PollFlags::POLLIN)?
                }
                Err(nix::errno::Errno::EAGAIN) => return Err(link_timeout_error("no data")),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads only what has already arrived: 0 when nothing has (or the peer closed, which
    /// the next [`Channel::read`] reports). Regular files always read 0 here.
    pub fn read_ready(&self, buf: &mut [u8]) -> io::Result<usize> {
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
    pub fn write_all_vectored(&self, bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
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
                Err(nix::errno::Errno::EAGAIN) => return Err(link_timeout_error("could not send")),
                Err(e) => return Err(e.into()),
            };
            io::IoSlice::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    pub fn write_all(&self, data: &[u8]) -> io::Result<()> {
        self.write_all_vectored(&mut [io::IoSlice::new(data)])
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) {
        if self.is_socket {
            // SAFETY: borrowed for the duration of the call only; ManuallyDrop keeps the fd open.
            let s = std::mem::ManuallyDrop::new(unsafe {
                UnixStream::from_raw_fd(self.fd.as_raw_fd())
            });
            let _ = s.set_read_timeout(t);
        }
    }
}

/// A socket timeout (SO_RCVTIMEO/SO_SNDTIMEO, set from link-timeout) fired.
fn link_timeout_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} for the link timeout: the peer is silent (link dead?)"),
    )
}

fn is_fifo(p: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_fifo())
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(|_| ())
}

/// Read and write timeouts on the socket behind `fd` (a duplicate shares them).
pub fn set_socket_timeouts(fd: &OwnedFd, t: Option<std::time::Duration>) {
    // SAFETY: borrowed for the duration of the calls only; ManuallyDrop keeps the fd open.
    let s = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd.as_raw_fd()) });
    let _ = s.set_read_timeout(t);
    let _ = s.set_write_timeout(t);
}

/// Shuts a socket down in both directions so that blocked reads and writes return.
pub fn shutdown_fd(fd: &OwnedFd) {
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

/// The destination side before a connection arrives.
pub enum Incoming {
    Ready(Channel),
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, String),
}

impl Incoming {
    pub fn open(
        uri: &Uri,
        take_fd: impl FnOnce(&str) -> Option<OwnedFd>,
    ) -> Result<Self, TransportError> {
        match uri {
            Uri::Fd(name) => {
                let fd = take_fd(name).ok_or_else(|| TransportError::NoSuchFd(name.clone()))?;
                let listening: Result<bool, _> =
                    nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn);
                if listening.unwrap_or(false) {
                    // SAFETY: fd is an owned listening socket.
                    let l = unsafe {
                        UnixListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
                    };
                    return Ok(Incoming::Unix(l, PathBuf::from(format!("fd:{name}"))));
                }
                Ok(Incoming::Ready(Channel::from_fd(name, fd)?))
            }
            Uri::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p).map_err(io_err("listen on", uri))?;
                Ok(Incoming::Unix(l, p.clone()))
            }
            Uri::Tcp(a) => {
                let l = TcpListener::bind(a.as_str()).map_err(io_err("listen on", uri))?;
                Ok(Incoming::Tcp(l, a.clone()))
            }
            // Opening a FIFO blocks until a writer comes: open it non-blocking (never waits).
            Uri::File(p) if is_fifo(p) => {
                let f = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(p)
                    .map_err(io_err("open", uri))?;
                Ok(Incoming::Ready(Channel::from_fd(
                    &uri.to_string(),
                    f.into(),
                )?))
            }
            Uri::File(p) => {
                let f = File::open(p).map_err(io_err("open", uri))?;
                Ok(Incoming::Ready(Channel::from_file(f, uri.to_string())))
            }
        }
    }

    /// Removes a `unix:` listener's path once no more connections are expected.
    pub fn done_listening(&self) {
        if let Incoming::Unix(_, p) = self {
            remove_socket_path(p);
        }
    }

    /// Whether a peer can open more than one connection here (a listening socket), as
    /// postcopy-preempt needs.
    pub fn is_listener(&self) -> bool {
        !matches!(self, Incoming::Ready(_))
    }

    /// Waits for one connection and keeps listening, for a second channel from the same
    /// peer (postcopy-preempt). Polls `cancel` as [`Incoming::accept`] does.
    pub fn accept_another(&self, cancel: &AtomicBool) -> Result<Channel, TransportError> {
        match self {
            Incoming::Ready(c) => Err(TransportError::BadFd {
                name: c.peer.clone(),
                why: "a single connected channel cannot take a second connection".into(),
            }),
            Incoming::Unix(l, p) => {
                let what = format!("unix:{}", p.display());
                wait_readable(l.as_fd(), cancel, &what)?;
                let (s, _) = l.accept().map_err(io_err("accept on", &what))?;
                Ok(Channel::from_unix(s, what))
            }
            Incoming::Tcp(l, a) => {
                let what = format!("tcp:{a}");
                wait_readable(l.as_fd(), cancel, &what)?;
                let (s, peer) = l.accept().map_err(io_err("accept on", &what))?;
                let _ = s.set_nodelay(true);
                Ok(Channel {
                    fd: s.into(),
                    is_socket: true,
                    is_pipe: false,
                    cancel: None,
                    peer: format!("tcp:{peer}"),
                })
            }
        }
    }

    /// Waits for the connection, polling `cancel` so that a cancel never waits on a peer,
    /// and stops listening.
    pub fn accept(self, cancel: &AtomicBool) -> Result<Channel, TransportError> {
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

/// Polls `fd` for input in 100 ms steps until it is readable or `cancel` is set.
/// A listener made by `unix:PATH` owns PATH; one passed as `fd:NAME` has no path.
fn remove_socket_path(p: &std::path::Path) {
    if !p.to_string_lossy().starts_with("fd:") {
        let _ = std::fs::remove_file(p);
    }
}

fn wait_readable(
    fd: BorrowedFd<'_>,
    cancel: &AtomicBool,
    what: &str,
) -> Result<(), TransportError> {
    loop {
        if cancel.load(Ordering::Acquire) {
            return Err(TransportError::Cancelled(what.to_string()));
        }
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(100u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(io_err("poll", what)(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Uri::File("/tmp/f".into())
        );
        for bad in [
            "",
            "fd:",
            "exec:cat",
            "tcp:host",
            "tcp:host:99999",
            "nothing",
            "file:/x,offset=4",
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
}
