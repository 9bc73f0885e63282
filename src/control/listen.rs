//! The `--control-socket` listener. The socket can stream guest RAM anywhere, so it is
//! never reachable with a looser mode than 0600: it is bound inside a fresh 0700 directory
//! next to the requested path, chmodded there, then renamed into place (RENAME_NOREPLACE).
//! The umask is never touched (it is process-wide, and other threads may create files).
//! A stale socket at the path is replaced, as QEMU does; anything else is refused.

use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenError {
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Path {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("control connection: {0}")]
    Io(std::io::Error),
}

/// A listening control socket; the path is removed on drop if it is still this socket.
pub(crate) struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    dev_ino: (u64, u64),
}

fn path_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> ListenError + 'a {
    move |source| ListenError::Path {
        path: path.to_path_buf(),
        what,
        source,
    }
}

impl ControlListener {
    pub(crate) fn bind(path: &Path) -> Result<ControlListener, ListenError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(path_err(path, "removing the old socket"))?
            }
            Ok(_) => {
                return Err(ListenError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(path_err(path, "checking the path")(e)),
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Same directory as the target, so the rename stays on one filesystem.
        let private = nix::unistd::mkdtemp(&parent.join(".qemu-migration-helper-XXXXXX"))
            .map_err(|e| path_err(path, "creating a private directory")(e.into()))?;
        let result = Self::bind_in(&private, path);
        let _ = std::fs::remove_dir_all(&private);
        result
    }

    fn bind_in(private: &Path, path: &Path) -> Result<ControlListener, ListenError> {
        // mkdtemp asks for 0700 but the umask could take bits away; set it exactly.
        std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o700))
            .map_err(path_err(path, "setting the private directory's mode"))?;
        let tmp = private.join("s");
        let listener = UnixListener::bind(&tmp).map_err(path_err(path, "binding"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(path_err(path, "setting the socket's mode"))?;
        let meta = std::fs::symlink_metadata(&tmp).map_err(path_err(path, "checking"))?;
        nix::fcntl::renameat2(
            None,
            &tmp,
            None,
            path,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| path_err(path, "moving the socket into place")(e.into()))?;
        Ok(ControlListener {
            listener,
            path: path.to_path_buf(),
            dev_ino: (meta.dev(), meta.ino()),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn incoming(&self) -> std::os::unix::net::Incoming<'_> {
        self.listener.incoming()
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        // Only our own socket: something else may have been put there since.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.dev_ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The helper's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The connected peer's uid and pid (SO_PEERCRED, taken by the kernel at connect time).
pub(crate) fn peer(stream: &UnixStream) -> std::io::Result<(u32, i32)> {
    let c = getsockopt(&stream.as_fd(), PeerCredentials)?;
    Ok((c.uid(), c.pid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qmh-listen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }

    #[test]
    fn socket_is_0600_and_others_are_not_replaced() {
        let d = tmpdir("a");
        let p = d.join("ctl");
        let l = ControlListener::bind(&p).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let (uid, pid) = peer(&UnixStream::connect(&p).unwrap()).unwrap();
        assert_eq!(uid, own_uid());
        assert_eq!(pid, std::process::id() as i32);
        drop(l);
        assert!(!p.exists());
        // A stale socket is replaced.
        let stale = UnixListener::bind(&p).unwrap();
        drop(stale);
        drop(ControlListener::bind(&p).unwrap());
        // A regular file is not.
        std::fs::write(&p, b"precious").unwrap();
        let e = ControlListener::bind(&p).err().unwrap();
        assert!(matches!(e, ListenError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        // Only the socket and the file were ever in the directory.
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
