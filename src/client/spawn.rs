//! Starting a helper (`--control-fd` on a socketpair) or connecting to one
//! (`--control-socket`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::{ClientError, HelperClient, DEFAULT_CONNECT_TIMEOUT};

impl HelperClient {
    /// Spawns `binary --control-fd N args...` with one end of a fresh socketpair as fd `N`,
    /// and does the handshake. The child's stdin is `/dev/null`; stdout and stderr are
    /// inherited. If the handshake fails the child is killed and reaped.
    pub fn spawn(binary: &Path, args: &[&str]) -> Result<(HelperClient, Child), ClientError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| ClientError::io("creating the control socketpair", e.into()))?;
        let child_fd: RawFd = theirs.as_raw_fd();

        let mut cmd = Command::new(binary);
        cmd.arg("--control-fd")
            .arg(child_fd.to_string())
            .args(args)
            .stdin(Stdio::null());
        // SAFETY: the closure only calls fcntl(2), which is async-signal-safe, on an fd that
        // is open in the forked child (it is the same fd table as ours at fork time).
        unsafe {
            cmd.pre_exec(move || {
                // Keep the child's end across exec; it is CLOEXEC everywhere else, so
                // children spawned concurrently by other threads never inherit it.
                if libc::fcntl(child_fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ClientError::io(format!("spawning {}", binary.display()), e))?;
        drop(theirs);

        match Self::from_stream(UnixStream::from(ours)) {
            Ok(client) => Ok((client, child)),
            Err(err) => {
                // A helper that exited closes its end before it becomes reapable: give it
                // a moment so that its own exit status, not our SIGKILL, is reported.
                let status = match wait_exit(&mut child, Duration::from_millis(500)) {
                    Some(status) => Some(status),
                    None => {
                        let _ = child.kill();
                        child.wait().ok()
                    }
                };
                Err(match (err, status) {
                    (ClientError::Protocol(msg), Some(status)) => {
                        ClientError::Protocol(format!("{msg} (helper {status})"))
                    }
                    (err, _) => err,
                })
            }
        }
    }

    /// Connects to a helper started with `--control-socket PATH` and does the handshake.
    /// Retries for up to [`DEFAULT_CONNECT_TIMEOUT`] while the socket does not exist yet or
    /// refuses connections (the helper may still be starting).
    pub fn connect(path: &Path) -> Result<HelperClient, ClientError> {
        Self::connect_timeout(path, DEFAULT_CONNECT_TIMEOUT)
    }

    /// [`HelperClient::connect`] with an explicit retry deadline.
    pub fn connect_timeout(path: &Path, timeout: Duration) -> Result<HelperClient, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Self::from_stream(stream),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound
                            | io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(ClientError::io(
                        format!("connecting to {}", path.display()),
                        e,
                    ))
                }
            }
        }
    }
}

/// Waits up to `grace` for `child` to exit, woken by its pidfd (Linux 5.3+); where there is
/// none, checks once after `grace`.
fn wait_exit(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let pid = libc::pid_t::try_from(child.id()).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed. The child is not reaped yet, so the pid is still ours.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    match RawFd::try_from(raw) {
        Ok(raw) if raw >= 0 => {
            // SAFETY: the kernel just returned this fd, and nothing else owns it.
            let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
            let timeout = PollTimeout::try_from(grace).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
            // Readable once the child exited; EINTR or a timeout just means "not yet".
            let _ = poll(&mut fds, timeout);
        }
        _ => std::thread::sleep(grace),
    }
    child.try_wait().ok().flatten()
}
