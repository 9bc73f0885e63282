//! Dirty pages, from KVM's log to the helper's bitmap.
//!
//! KVM records the pages the guest writes in the memslot (KVM_MEM_LOG_DIRTY_PAGES);
//! KVM_GET_DIRTY_LOG returns them and clears the log. The helper reads a bitmap of the same
//! layout (bit i = page i, little-endian u64 words) from a memfd that both map, and
//! harvests it with an atomic swap; so the VMM ORs each KVM harvest into it atomically.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::VmFd;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

use crate::error::{kvm, VmmError};
use crate::vm::{PAGE_SIZE, RAM_SLOT};

pub(crate) struct DirtyBitmap {
    /// Passed to the helper with `getfd`.
    file: File,
    map: MmapRegion,
    ram_size: u64,
}

impl DirtyBitmap {
    /// A zeroed bitmap for `ram_size` bytes of RAM: `ceil(pages / 64) * 8` bytes.
    pub(crate) fn new(ram_size: u64) -> Result<DirtyBitmap, VmmError> {
        let len = ram_size.div_ceil(PAGE_SIZE).div_ceil(64) * 8;
        let fd = memfd_create(c"kvm-vmm-dirty", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| VmmError::Io("memfd_create", e.into()))?;
        let file = File::from(fd);
        file.set_len(len)
            .map_err(|e| VmmError::Io("sizing the dirty bitmap", e))?;
        let map_file = file
            .try_clone()
            .map_err(|e| VmmError::Io("dup dirty bitmap fd", e))?;
        let map = MmapRegion::from_file(FileOffset::new(map_file, 0), len as usize)
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        Ok(DirtyBitmap {
            file,
            map,
            ram_size,
        })
    }

    /// A duplicate of the bitmap's fd, for the helper (`getfd`).
    pub(crate) fn dup(&self) -> Result<File, VmmError> {
        self.file
            .try_clone()
            .map_err(|e| VmmError::Io("dup dirty bitmap fd", e))
    }

    /// Takes KVM's log (clearing it) and ORs it into the helper's bitmap.
    pub(crate) fn harvest(&self, vm: &VmFd) -> Result<(), VmmError> {
        let log = vm
            .get_dirty_log(RAM_SLOT, self.ram_size as usize)
            .map_err(kvm("KVM_GET_DIRTY_LOG"))?;
        for (i, &word) in log.iter().enumerate().filter(|(_, w)| **w != 0) {
            let cell: &AtomicU64 = self
                .map
                .get_atomic_ref(i * 8)
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            cell.fetch_or(word.to_le(), Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Harvests every `interval` until `stop` fires (or its sender goes away), so that the
/// helper sees the guest's writes while precopy runs. The last harvest, after the vCPUs
/// stop, is the caller's.
pub(crate) fn harvest_loop(
    bitmap: &DirtyBitmap,
    vm: &Arc<VmFd>,
    interval: Duration,
    stop: &Receiver<()>,
) -> Result<(), VmmError> {
    loop {
        bitmap.harvest(vm)?;
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}
