//! Guest memory as the test (the parent VMM) sees it: a shared mapping of a memfd or of
//! QEMU's RAM file.

use std::fs::OpenOptions;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::Path;
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// A MAP_SHARED read-write mapping of a whole file; derefs to `[u8]`.
pub struct RamMap {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: plain shared memory; no thread affinity (the raw pointer alone makes it !Send).
unsafe impl Send for RamMap {}
// SAFETY: as for Send; `&RamMap` only reads through the mapping.
unsafe impl Sync for RamMap {}

impl RamMap {
    pub fn open(path: &Path, len: usize) -> Result<RamMap, String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| e.to_string())?;
        let nz = NonZeroUsize::new(len).ok_or("empty mapping")?;
        // SAFETY: fresh mapping of a file we opened; unmapped in Drop.
        let ptr = unsafe {
            mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .map_err(|e| format!("mmap: {e}"))?;
        Ok(RamMap { ptr, len })
    }
}

impl std::ops::Deref for RamMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: a valid mapping of `len` bytes for our lifetime. Another process (QEMU,
        // a helper) may write these pages meanwhile: a test reads a page only after it was
        // placed (a postcopy fault returned) or the migration ended, or it fills pages
        // before handing the memory over, so it never reads a page while it is written.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const u8, self.len) }
    }
}

impl std::ops::DerefMut for RamMap {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only view in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr() as *mut u8, self.len) }
    }
}

impl Drop for RamMap {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}
