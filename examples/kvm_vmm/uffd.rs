//! The destination's userfaultfd: guest RAM as KVM sees it (the VMM's mapping) registered
//! for missing-page faults, so that a vCPU touching a page that has not arrived blocks in
//! KVM until the helper places it (UFFDIO_COPY through this same userfaultfd).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use userfaultfd::{Uffd, UffdBuilder};

use crate::error::VmmError;

pub(crate) struct GuestFaults {
    uffd: Uffd,
    addr: u64,
    len: u64,
}

impl GuestFaults {
    /// Registers `len` bytes at `addr` (the VMM's mapping of guest RAM).
    pub(crate) fn register(addr: u64, len: u64) -> Result<GuestFaults, VmmError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM touches guest pages from the kernel (get_user_pages on a vCPU's behalf):
            // those faults must reach the userfaultfd too.
            .user_mode_only(false)
            .create()
            .map_err(|e| {
                VmmError::Memory(format!(
                    "userfaultfd: {e} (root, or vm.unprivileged_userfaultfd=1)"
                ))
            })?;
        let len_usize = usize::try_from(len).map_err(|_| VmmError::Memory("RAM size".into()))?;
        uffd.register(addr as *mut libc::c_void, len_usize)
            .map_err(|e| VmmError::Memory(format!("UFFDIO_REGISTER: {e}")))?;
        Ok(GuestFaults { uffd, addr, len })
    }

    /// A duplicate for the helper (`getfd`); the VMM keeps its own.
    pub(crate) fn dup(&self) -> Result<OwnedFd, VmmError> {
        self.as_fd()
            .try_clone_to_owned()
            .map_err(|e| VmmError::Io("dup userfaultfd", e))
    }

    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    /// Ends fault handling for guest RAM: after a completed migration every page is there
    /// (the helper unregisters too; doing it again is harmless), and after a failure it
    /// wakes any vCPU still blocked on a fault, so that the VMM can stop it.
    pub(crate) fn unregister(&self) -> Result<(), VmmError> {
        let len = usize::try_from(self.len).map_err(|_| VmmError::Memory("RAM size".into()))?;
        self.uffd
            .unregister(self.addr as *mut libc::c_void, len)
            .map_err(|e| VmmError::Memory(format!("UFFDIO_UNREGISTER: {e}")))
    }
}

impl AsFd for GuestFaults {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.uffd`, which lives as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.uffd.as_raw_fd()) }
    }
}
