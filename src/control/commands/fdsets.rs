//! fd sets, as QEMU's `monitor/fds.c` has them: `add-fd` (one fd sent with SCM_RIGHTS into
//! set N, or the first free set), `remove-fd`, `query-fdsets`, and `/dev/fdset/N` in a
//! `file:` URI, which opens a duplicate of the set's fd whose access mode (and O_DIRECT)
//! match what the open asks for. libvirt saves and restores through these
//! (`file:/dev/fdset/N,offset=...`).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use serde_json::{json, Value};

use super::{lock, Args, CmdResult, Helper};
use crate::control::qmp::QmpError;

/// Most fds held in all fd sets together (the fd table is finite).
pub(super) const MAX_FDSET_FDS: usize = 64;

/// One fd of a set, with the caller's note.
#[derive(Debug)]
pub(super) struct SetFd {
    fd: OwnedFd,
    opaque: Option<String>,
}

/// The fd sets, by id.
pub(super) type Fdsets = BTreeMap<u64, Vec<SetFd>>;

/// Longest `opaque` note kept.
const MAX_OPAQUE: usize = 1024;

impl Helper {
    /// `add-fd {"fdset-id"?: N, "opaque"?: STR}` with one fd attached.
    pub(super) fn add_fd(&self, a: &Args<'_>, mut fds: Vec<OwnedFd>) -> CmdResult {
        a.only(&["fdset-id", "opaque"])?;
        let id = match a.0.get("fdset-id") {
            None => None,
            Some(v) => match v.as_i64() {
                Some(n) if n >= 0 => Some(n as u64),
                Some(_) => {
                    return Err(QmpError::generic(
                        "Parameter 'fdset-id' expects a non-negative value",
                    ))
                }
                None => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'fdset-id', expected: integer",
                    ))
                }
            },
        };
        let opaque = a.opt_str("opaque")?.map(str::to_string);
        if opaque.as_ref().is_some_and(|o| o.len() > MAX_OPAQUE) {
            return Err(QmpError::generic(format!(
                "Parameter 'opaque' is longer than {MAX_OPAQUE} bytes"
            )));
        }
        if fds.len() > 1 {
            return Err(QmpError::generic(format!(
                "add-fd takes exactly one file descriptor sent with SCM_RIGHTS, got {}",
                fds.len()
            )));
        }
        let fd = fds
            .pop()
            .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
        let mut sets = lock(&self.fdsets);
        if sets.values().map(Vec::len).sum::<usize>() >= MAX_FDSET_FDS {
            return Err(QmpError::generic(format!(
                "too many fds in fd sets (limit {MAX_FDSET_FDS}); remove-fd some first"
            )));
        }
        // Without an id: the lowest one not in use, as QEMU picks it.
        let id = id.unwrap_or_else(|| (0..).find(|k| !sets.contains_key(k)).unwrap_or(0));
        let raw = fd.as_raw_fd();
        sets.entry(id).or_default().push(SetFd { fd, opaque });
        Ok(json!({"fdset-id": id, "fd": raw}))
    }

    /// `remove-fd {"fdset-id": N, "fd"?: M}`: one fd of the set, or the whole set.
    pub(super) fn remove_fd(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["fdset-id", "fd"])?;
        let id = a.0.get("fdset-id").and_then(Value::as_i64).ok_or_else(|| {
            QmpError::generic("Parameter 'fdset-id' is missing or not an integer")
        })?;
        let fd = match a.0.get("fd") {
            None => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| {
                QmpError::generic("Invalid parameter type for 'fd', expected: integer")
            })?),
        };
        let not_found = || {
            let name = match fd {
                Some(fd) => format!("fdset-id:{id}, fd:{fd}"),
                None => format!("fdset-id:{id}"),
            };
            QmpError::generic(format!("File descriptor named '{name}' not found"))
        };
        let mut sets = lock(&self.fdsets);
        let key = u64::try_from(id).map_err(|_| not_found())?;
        let set = sets.get_mut(&key).ok_or_else(not_found)?;
        match fd {
            None => set.clear(),
            Some(fd) => {
                let i = set
                    .iter()
                    .position(|s| i64::from(s.fd.as_raw_fd()) == fd)
                    .ok_or_else(not_found)?;
                set.remove(i);
            }
        }
        if set.is_empty() {
            sets.remove(&key);
        }
        Ok(json!({}))
    }

    /// `query-fdsets`: `[{"fdset-id": N, "fds": [{"fd": M, "opaque"?: STR}]}]`.
    pub(super) fn query_fdsets(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[])?;
        let sets = lock(&self.fdsets);
        Ok(Value::Array(
            sets.iter()
                .map(|(id, fds)| {
                    let fds: Vec<Value> = fds
                        .iter()
                        .map(|s| {
                            let mut v = json!({"fd": s.fd.as_raw_fd()});
                            if let Some(o) = &s.opaque {
                                v["opaque"] = json!(o);
                            }
                            v
                        })
                        .collect();
                    json!({"fdset-id": id, "fds": fds})
                })
                .collect(),
        ))
    }

    /// What opening `/dev/fdset/N` with `flags` gives, as QEMU's
    /// `monitor_fdset_dup_fd_add`: a duplicate (close-on-exec) of the first fd of the set
    /// whose access mode and O_DIRECT match `flags`.
    pub(super) fn fdset_dup(&self, id: u64, flags: OFlag) -> Result<OwnedFd, QmpError> {
        let sets = lock(&self.fdsets);
        let set = sets
            .get(&id)
            .ok_or_else(|| QmpError::generic(format!("Failed to find fdset /dev/fdset/{id}")))?;
        let mask = OFlag::O_ACCMODE | OFlag::O_DIRECT;
        for s in set {
            let got = fcntl(s.fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|_| {
                QmpError::generic(format!(
                    "Failed to read file status flags for fd={}",
                    s.fd.as_raw_fd()
                ))
            })?;
            if OFlag::from_bits_truncate(got) & mask == flags & mask {
                return s.fd.as_fd().try_clone_to_owned().map_err(|_| {
                    QmpError::generic(format!(
                        "Failed to dup() given file descriptor fd={}",
                        s.fd.as_raw_fd()
                    ))
                });
            }
        }
        Err(QmpError::generic(format!(
            "Failed to find file descriptor with matching flags=0x{:x}",
            flags.bits()
        )))
    }
}
