//! The files of a `file:` migration that the command opens itself: a mapped-ram migration
//! (its stream, and one more fd per multifd channel), and any `file:/dev/fdset/N`. QEMU's
//! checks come first, in its words (`migration.c`, `options.c`).

use std::fs::File;
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;

use super::{lock, Helper, Role};
use crate::control::qmp::QmpError;
use crate::engine::migration::{Capabilities, Parameters};
use crate::transport::open::{self, FileKind};
use crate::transport::{Channel, FileUri, TransportError, Uri};

/// A file migration's channels, opened by the command.
pub(super) struct FileChannels {
    pub(super) main: Channel,
    /// mapped-ram with multifd: one fd each, on the same file (O_DIRECT with direct-io).
    pub(super) multifd: Vec<Channel>,
}

fn generic(e: TransportError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// QEMU's checks of a migration's capabilities against its URI and role, before anything
/// is opened. `uffd`: the destination has the parent's userfaultfd.
pub(super) fn check(
    role: Role,
    caps: &Capabilities,
    p: &Parameters,
    uri: &Uri,
    tls: bool,
    uffd: bool,
) -> Result<(), QmpError> {
    if !caps.mapped_ram {
        if caps.multifd && matches!(uri, Uri::File(_)) {
            return Err(QmpError::generic(
                "Migration requires multi-channel URIs (e.g. tcp): multifd over file: needs \
                 mapped-ram",
            ));
        }
        return Ok(());
    }
    if tls {
        return Err(QmpError::generic("Cannot use TLS with mapped-ram"));
    }
    if !matches!(uri, Uri::File(_) | Uri::Fd(_)) {
        return Err(QmpError::generic(
            "Migration requires seekable transport (e.g. file)",
        ));
    }
    if caps.postcopy_ram {
        match role {
            // QEMU refuses the pair; on a destination with a userfaultfd the helper reads
            // it as an on-demand restore.
            Role::Source => {
                return Err(QmpError::generic(
                    "Mapped-ram migration is incompatible with postcopy",
                ))
            }
            Role::Destination if !uffd => {
                return Err(QmpError::generic(
                    "an on-demand restore (mapped-ram with postcopy-ram) needs the parent's \
                     userfaultfd: userfaultfd-set first",
                ))
            }
            Role::Destination if caps.multifd => {
                return Err(QmpError::generic(
                    "an on-demand restore reads the file through one fd: turn multifd off",
                ))
            }
            Role::Destination => {}
        }
    }
    if caps.postcopy_preempt {
        return Err(QmpError::generic(
            "Mapped-ram migration is incompatible with postcopy",
        ));
    }
    if direct_io(caps, p) && matches!(uri, Uri::Fd(_)) {
        return Err(QmpError::generic(
            "Migration requires a transport that allows for extra fds (e.g. file)",
        ));
    }
    Ok(())
}

/// QEMU's `migrate_direct_io`: only with mapped-ram and multifd.
fn direct_io(caps: &Capabilities, p: &Parameters) -> bool {
    p.direct_io && caps.mapped_ram && caps.multifd
}

impl Helper {
    /// Opens a file migration's channels now, when it needs more than the stream (mapped-ram)
    /// or names an fd set; None: the migration thread opens the URI as any other.
    pub(super) fn open_file_channels(
        &self,
        role: Role,
        uri: &Uri,
        caps: &Capabilities,
        p: &Parameters,
    ) -> Result<Option<FileChannels>, QmpError> {
        let label = uri.to_string();
        let n = if caps.mapped_ram && caps.multifd {
            usize::from(p.multifd_channels)
        } else {
            0
        };
        let write = role == Role::Source;
        let direct = direct_io(caps, p);
        let main = match uri {
            Uri::File(f) if f.fdset().is_some() || caps.mapped_ram => self.open_main(f, write)?,
            Uri::Fd(name) if caps.mapped_ram => {
                let fd = self.take_fd(name).ok_or_else(|| {
                    QmpError::generic(format!("File descriptor named '{name}' not found"))
                })?;
                let file = File::from(fd);
                if !file.metadata().is_ok_and(|m| m.is_file()) {
                    return Err(QmpError::generic(format!(
                        "Migration requires seekable transport (e.g. file): fd '{name}' is \
                         not a regular file"
                    )));
                }
                Channel::from_file(file, label.clone())
            }
            _ => return Ok(None),
        };
        let mut multifd = Vec::with_capacity(n);
        for k in 0..n {
            let what = format!("{label} (multifd {k})");
            let f: File = match uri {
                Uri::File(f) => match f.fdset() {
                    Some(id) => {
                        let mut flags = if write {
                            OFlag::O_WRONLY
                        } else {
                            OFlag::O_RDONLY
                        };
                        if direct {
                            flags |= OFlag::O_DIRECT;
                        }
                        File::from(self.fdset_dup(id, flags)?)
                    }
                    None => open::open_extra(&f.path, &label, write, direct).map_err(generic)?,
                },
                // An fd passed as a file: the channels share it (pread/pwrite need no
                // position of their own); direct-io was refused for it.
                _ => File::from(
                    main.try_clone_fd()
                        .map_err(|e| QmpError::generic(format!("cannot duplicate {label}: {e}")))?,
                ),
            };
            multifd.push(Channel::from_file(f, what));
        }
        Ok(Some(FileChannels { main, multifd }))
    }

    /// The stream's own fd: created and truncated at the offset for a source, opened and
    /// positioned for a destination; a regular file either way (mapped-ram seeks in it).
    fn open_main(&self, f: &FileUri, write: bool) -> Result<Channel, QmpError> {
        let label = Uri::File(f.clone()).to_string();
        let file = match f.fdset() {
            Some(id) => {
                let flags = if write {
                    OFlag::O_WRONLY
                } else {
                    OFlag::O_RDONLY
                };
                let fd: OwnedFd = self.fdset_dup(id, flags)?;
                let file = File::from(fd);
                let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
                if !regular {
                    return Err(QmpError::generic(format!(
                        "Migration requires seekable transport (e.g. file): {label} is not a \
                         regular file"
                    )));
                }
                if write {
                    open::start_output(file, &label, f.offset)
                } else {
                    open::start_input(file, &label, f.offset)
                }
                .map_err(generic)?
            }
            None if write => {
                if open::output_kind(&f.path, &label).map_err(generic)? == Some(FileKind::Fifo) {
                    return Err(QmpError::generic(format!(
                        "Migration requires seekable transport (e.g. file): {label} is a FIFO"
                    )));
                }
                open::create_output(&f.path, &label, f.offset).map_err(generic)?
            }
            None => {
                let (file, kind) = open::open_input(&f.path, &label, f.offset).map_err(generic)?;
                if kind != FileKind::Regular {
                    return Err(QmpError::generic(format!(
                        "Migration requires seekable transport (e.g. file): {label} is a FIFO"
                    )));
                }
                file
            }
        };
        Ok(Channel::from_file(file, label))
    }
}

/// Whether the helper has the parent's userfaultfd.
pub(super) fn has_uffd(h: &Helper) -> bool {
    lock(&h.uffd).is_some()
}
