//! Opening the paths of `unix:` and `file:` URIs. Whoever chose a path may have fewer
//! rights than the helper, so the helper never unlinks what is not a socket, never writes
//! through a symlink, creates its output 0600 (as QEMU's `migration/file.c`), and only
//! opens file types it can always stop waiting on (regular files and FIFOs).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::TransportError;

/// What a `file:` path turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Regular,
    Fifo,
}

fn kind_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "of an unknown type"
    }
}

fn classify(ft: std::fs::FileType) -> Option<FileKind> {
    if ft.is_file() {
        Some(FileKind::Regular)
    } else if ft.is_fifo() {
        Some(FileKind::Fifo)
    } else {
        None
    }
}

/// Why a `file:` or `unix:` path is refused (the text follows the URI).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Refusal {
    #[error("is {0}; file: takes a regular file or a FIFO")]
    WrongType(&'static str),
    #[error("is a symbolic link (not followed for output)")]
    OutputSymlink,
    #[error("changed into a FIFO while being opened")]
    BecameFifo,
    #[error("is a FIFO: a stream in a FIFO cannot start at an offset")]
    FifoOffset,
    #[error("{} is {kind}, not a socket: not removing it", path.display())]
    NotASocket { path: PathBuf, kind: &'static str },
}

pub(super) fn refused(uri: &str, why: Refusal) -> TransportError {
    TransportError::Refused {
        uri: uri.to_string(),
        why,
    }
}

use super::io_err;

/// Refuses anything but a regular file or a FIFO: a read or write on a character device
/// (a tty, /dev/ptmx) can block where no cancel reaches it, a directory or a socket path
/// cannot carry a stream at all.
fn check_type(uri: &str, m: &std::fs::Metadata) -> Result<FileKind, TransportError> {
    classify(m.file_type())
        .ok_or_else(|| refused(uri, Refusal::WrongType(kind_name(m.file_type()))))
}

/// Clears O_NONBLOCK (opened with it so that opening never waits) on a regular file.
fn set_blocking(f: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(f.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(flags & !OFlag::O_NONBLOCK))?;
    Ok(())
}

/// The type of what is at `p` now, without following a final symlink (which is refused).
pub(crate) fn output_kind(p: &Path, uri: &str) -> Result<Option<FileKind>, TransportError> {
    match std::fs::symlink_metadata(p) {
        Ok(m) => check_type(uri, &m).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("inspect", uri)(e)),
    }
}

/// `migrate file:PATH[,offset=N]` to a regular file: as QEMU (O_CREAT|O_WRONLY, mode 0600,
/// close-on-exec, truncated to N and written from N), plus O_NOFOLLOW, and the truncation
/// done only once the opened file is known to be a regular file. A file that exists keeps
/// its mode, as with QEMU.
pub(crate) fn create_output(p: &Path, uri: &str, offset: u64) -> Result<File, TransportError> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        // O_NONBLOCK: opening a FIFO or device that replaced the file meanwhile never
        // waits; O_NOCTTY: a terminal never becomes the helper's.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                refused(uri, Refusal::OutputSymlink)
            } else {
                io_err("create", uri)(e)
            }
        })?;
    let m = f.metadata().map_err(io_err("fstat", uri))?;
    if check_type(uri, &m)? != FileKind::Regular {
        return Err(refused(uri, Refusal::BecameFifo));
    }
    set_blocking(&f).map_err(io_err("fcntl", uri))?;
    start_output(f, uri, offset)
}

/// A regular file the source writes its stream into from `offset` on: truncated there (what
/// was before it, libvirt's header, stays), as QEMU's `file_start_outgoing_migration`.
pub(crate) fn start_output(f: File, uri: &str, offset: u64) -> Result<File, TransportError> {
    use std::io::Seek;
    f.set_len(offset).map_err(io_err("truncate", uri))?;
    let mut f = f;
    f.seek(io::SeekFrom::Start(offset))
        .map_err(io_err("seek in", uri))?;
    Ok(f)
}

/// A regular file the destination reads a stream from, starting at `offset`.
pub(crate) fn start_input(f: File, uri: &str, offset: u64) -> Result<File, TransportError> {
    use std::io::Seek;
    let mut f = f;
    f.seek(io::SeekFrom::Start(offset))
        .map_err(io_err("seek in", uri))?;
    Ok(f)
}

/// One more fd on a regular file a migration already opened, for a mapped-ram multifd
/// channel: read-only or write-only, never created or truncated, O_DIRECT with
/// `direct-io` (the pages are page-aligned in memory, length and file offset).
pub(crate) fn open_extra(
    p: &Path,
    uri: &str,
    write: bool,
    direct: bool,
) -> Result<File, TransportError> {
    let mut flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    if direct {
        flags |= libc::O_DIRECT;
    }
    let f = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(flags)
        .open(p)
        .map_err(io_err("open another channel on", uri))?;
    let m = f.metadata().map_err(io_err("fstat", uri))?;
    if check_type(uri, &m)? != FileKind::Regular {
        return Err(refused(uri, Refusal::BecameFifo));
    }
    set_blocking(&f).map_err(io_err("fcntl", uri))?;
    Ok(f)
}

/// `migrate-incoming file:PATH`: a regular file (read blocking) or a FIFO (non-blocking,
/// polled). Symlinks are followed, as QEMU does, but the type is checked before opening,
/// so that opening has no side effect (a new pty for /dev/ptmx), and again after.
pub(crate) fn open_input(
    p: &Path,
    uri: &str,
    offset: u64,
) -> Result<(File, FileKind), TransportError> {
    let m = std::fs::metadata(p).map_err(io_err("open", uri))?;
    check_type(uri, &m)?;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .map_err(io_err("open", uri))?;
    let kind = check_type(uri, &f.metadata().map_err(io_err("fstat", uri))?)?;
    match kind {
        FileKind::Regular => {
            set_blocking(&f).map_err(io_err("fcntl", uri))?;
            Ok((start_input(f, uri, offset)?, kind))
        }
        FileKind::Fifo if offset != 0 => Err(refused(uri, Refusal::FifoOffset)),
        FileKind::Fifo => Ok((f, kind)),
    }
}

/// Before binding `unix:PATH`: removes a stale socket there, and refuses anything else
/// (QEMU unlinks whatever is there; the helper never removes a file that is not a socket).
pub(super) fn clear_socket_path(p: &Path, uri: &str) -> Result<(), TransportError> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("inspect", uri)(e)),
        Ok(m) if m.file_type().is_socket() => match std::fs::remove_file(p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_err("remove the stale socket", uri)(e))
            }
            _ => Ok(()),
        },
        Ok(m) => Err(refused(
            uri,
            Refusal::NotASocket {
                path: p.to_path_buf(),
                kind: kind_name(m.file_type()),
            },
        )),
    }
}

/// The socket a `unix:` listener bound: removed when done only if the path still names it.
#[derive(Debug)]
pub(crate) struct BoundPath {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl BoundPath {
    pub(super) fn new(path: PathBuf) -> Self {
        let id = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|m| (m.dev(), m.ino()));
        BoundPath { path, id }
    }

    /// Unlinks the path if it is still the socket bound (not whatever replaced it).
    pub(super) fn remove(&self) {
        let same = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.id);
        if same {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
