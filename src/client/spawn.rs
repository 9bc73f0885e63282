//! Starting a helper (`--control-fd` on a socketpair) or connecting to one
//! (`--control-socket`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
                let grace = Instant::now() + Duration::from_millis(500);
                let status = loop {
                    match child.try_wait() {
                        Ok(Some(status)) => break Some(status),
                        Ok(None) if Instant::now() < grace => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        _ => {
                            let _ = child.kill();
                            break child.wait().ok();
                        }
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
