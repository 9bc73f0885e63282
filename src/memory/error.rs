//! Why a block or a bitmap cannot be used, and the fd check both share.

use std::os::fd::{AsRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub(crate) enum MemoryError {
    #[error("block {id:?}: fd is not a regular file or memfd ({kind})")]
    NotAFile { id: String, kind: &'static str },
    #[error("block {id:?}: {what}: {source}")]
    Os {
        id: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("block {id:?}: offset {offset} + size {size} exceeds the fd's size {file_size}")]
    PastEnd {
        id: String,
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("block {id:?}: {msg}")]
    Invalid { id: String, msg: String },
    #[error("block {id:?}: mapping failed: {source}")]
    Map {
        id: String,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("block {id:?}: dirty bitmap is {have} bytes, needs at least {need}")]
    BitmapTooSmall { id: String, have: u64, need: u64 },
}

impl MemoryError {
    pub(crate) fn invalid(id: &str, msg: impl Into<String>) -> Self {
        MemoryError::Invalid {
            id: id.to_string(),
            msg: msg.into(),
        }
    }
}

/// Checks that `fd` is something the helper may map as guest RAM, and returns its size.
pub(crate) fn file_size(id: &str, fd: &OwnedFd) -> Result<u64, MemoryError> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| MemoryError::Os {
        id: id.into(),
        what: "fstat",
        source: e.into(),
    })?;
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt != libc::S_IFREG {
        let kind = match fmt {
            libc::S_IFSOCK => "a socket",
            libc::S_IFIFO => "a pipe",
            libc::S_IFCHR => "a character device",
            libc::S_IFDIR => "a directory",
            libc::S_IFBLK => "a block device",
            _ => "not a regular file",
        };
        return Err(MemoryError::NotAFile {
            id: id.into(),
            kind,
        });
    }
    Ok(st.st_size as u64)
}
