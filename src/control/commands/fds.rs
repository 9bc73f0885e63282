//! Named fds: `getfd`, `closefd`, and `userfaultfd-set` (the parent's userfaultfd for
//! postcopy destinations).

use std::os::fd::OwnedFd;

use serde_json::json;

use super::{lock, Args, CmdResult, Helper, Role, MAX_NAMED_FDS};
use crate::control::qmp::QmpError;

impl Helper {
    /// `getfd`.
    pub(super) fn getfd(&self, a: &Args<'_>, mut fds: Vec<OwnedFd>) -> CmdResult {
        a.only(&["fdname"])?;
        let fdname = a.str("fdname")?;
        if fdname.is_empty() || fdname.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::generic(
                "Parameter 'fdname' expects a name not starting with a digit",
            ));
        }
        if fds.len() != 1 {
            return Err(QmpError::generic(format!(
                "getfd needs exactly one file descriptor sent with SCM_RIGHTS, got {}",
                fds.len()
            )));
        }
        let fd = fds
            .pop()
            .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
        let mut named = lock(&self.fds);
        // A bound on what a client can make the helper hold (the fd table is finite).
        if named.len() >= MAX_NAMED_FDS && !named.contains_key(fdname) {
            return Err(QmpError::generic(format!(
                "too many named file descriptors (limit {MAX_NAMED_FDS}); closefd some first"
            )));
        }
        named.insert(fdname.to_string(), fd);
        Ok(json!({}))
    }

    /// `closefd`.
    pub(super) fn closefd(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["fdname"])?;
        let fdname = a.str("fdname")?;
        lock(&self.fds)
            .remove(fdname)
            .map(|_| json!({}))
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{fdname}' not found")))
    }

    /// `userfaultfd-set`.
    pub(super) fn userfaultfd_set(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["fdname"])?;
        let name = a.str("fdname")?;
        let fd = self.dup_fd(name)?;
        crate::engine::destination::fault::check_userfaultfd(name, &fd)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        if self.busy() && *lock(&self.role) == Some(Role::Destination) {
            return Err(QmpError::generic(
                "cannot change the userfaultfd of a running migration",
            ));
        }
        *lock(&self.uffd) = Some(fd);
        Ok(json!({}))
    }
}
