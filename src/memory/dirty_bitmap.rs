//! The dirty bitmaps the parent shares (one per RAM block, optional), mapped MAP_SHARED.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use crate::memory::error::{file_size, MemoryError};

/// A dirty bitmap shared with the parent: little-endian u64 words, bit i = page i.
/// The parent sets bits with an atomic OR; the helper takes a word with an atomic swap.
pub(crate) struct DirtyBitmap {
    /// Declared before the region: stops watching before the unmap.
    guard: crate::memory::guard::Guard,
    region: MmapRegion,
    words: usize,
}

impl DirtyBitmap {
    pub(crate) fn new(id: &str, fd: OwnedFd, pages: u64) -> Result<Self, MemoryError> {
        let have = file_size(id, &fd)?;
        let words = pages.div_ceil(64);
        let need = words * 8;
        if have < need {
            return Err(MemoryError::BitmapTooSmall {
                id: id.into(),
                have,
                need,
            });
        }
        crate::memory::guard::seal_shrink(&fd);
        let file = File::from(fd);
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            need.max(8) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|source| MemoryError::Map {
            id: id.into(),
            source,
        })?;
        // SAFETY: `guard` is declared before `region` in DirtyBitmap: dropped first.
        let guard = unsafe { watch(&format!("{id} (dirty bitmap)"), &region)? };
        Ok(DirtyBitmap {
            guard,
            region,
            words: words as usize,
        })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the region is page aligned, at least words*8 bytes, and lives as long as
        // self; AtomicU64 is how both processes access it.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr() as *const AtomicU64, self.words) }
    }

    /// Its fd shrank under the mapping (see `memory_guard`).
    pub(crate) fn lost(&self) -> bool {
        self.guard.lost()
    }

    pub(crate) fn len_words(&self) -> usize {
        self.words
    }

    /// Takes word `i` (pages 64i..64i+63), leaving it zero. Words are little-endian on the
    /// wire of the contract, which is native on the x86 hosts the helper runs on.
    #[inline]
    pub(crate) fn take_word(&self, i: usize) -> u64 {
        match self.words().get(i) {
            Some(w) if w.load(Ordering::Relaxed) != 0 => u64::from_le(w.swap(0, Ordering::AcqRel)),
            _ => 0,
        }
    }

    /// Marks a page dirty (as the parent does).
    #[cfg(test)]
    pub(crate) fn set(&self, page: u64) {
        if let Some(w) = self.words().get((page / 64) as usize) {
            w.fetch_or((1u64 << (page % 64)).to_le(), Ordering::AcqRel);
        }
    }
}

/// Watches a mapping for SIGBUS (its fd shrinking), or says there are too many.
///
/// # Safety
/// The returned guard is dropped before `region` (declare it before the region in the
/// struct that holds both): see [`crate::memory::guard::watch`].
pub(crate) unsafe fn watch(
    id: &str,
    region: &MmapRegion,
) -> Result<crate::memory::guard::Guard, MemoryError> {
    // SAFETY: the region is a page-aligned mapping of `size()` bytes; the caller drops the
    // guard before it.
    unsafe { crate::memory::guard::watch(id, region.as_ptr(), region.size()) }.ok_or_else(|| {
        MemoryError::invalid(
            id,
            format!(
                "too many mappings: at most {} blocks and dirty bitmaps",
                crate::memory::guard::MAX_MAPPINGS
            ),
        )
    })
}
