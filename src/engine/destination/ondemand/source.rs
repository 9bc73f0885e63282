//! The file the pages come from. It is mapped read-only so that UFFDIO_COPY copies a run of
//! pages straight from the file's page cache into the guest: one copy, where a pread into
//! a buffer and a UFFDIO_COPY from the buffer made two. Nothing in this process reads
//! through the mapping, only the kernel (MADV_POPULATE_READ, UFFDIO_COPY): a file that
//! shrinks or fails under it makes those calls fail with EFAULT, never raises SIGBUS. A
//! file that cannot be mapped is read with pread into a buffer, as before.

use std::fs::File;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use crate::engine::destination::ondemand::serve::PAGE;

pub(super) struct Source {
    pub(super) file: Arc<File>,
    /// The file's name, for errors.
    pub(super) name: String,
    /// The whole file, as long as it was when mapped (None: not mappable, read with pread).
    map: Option<MmapRegion<()>>,
}

impl Source {
    pub(super) fn new(file: File, name: String, log: &slog::Logger) -> Self {
        let file = Arc::new(file);
        let map = file
            .metadata()
            .map_err(|e| e.to_string())
            .and_then(|m| usize::try_from(m.len()).map_err(|e| e.to_string()))
            .and_then(|len| {
                MmapRegion::build(
                    Some(FileOffset::from_arc(file.clone(), 0)),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                )
                .map_err(|e| e.to_string())
            });
        let map = match map {
            Ok(m) => Some(m),
            Err(e) => {
                slog::info!(log, "on-demand restore: the file is read with pread"; "file" => &name, "mmap" => e);
                None
            }
        };
        Source { file, name, map }
    }

    /// Where `len` bytes at file offset `at` are mapped, if they are (inside the file as
    /// it was mapped, page-aligned: `check` aligned every pages region).
    pub(super) fn mapped(&self, at: u64, len: u64) -> Option<*const u8> {
        let m = self.map.as_ref()?;
        let end = at.checked_add(len)?;
        if end > m.size() as u64 || at % PAGE != 0 {
            return None;
        }
        // Inside the mapping (checked above): an address for the kernel, never read here.
        Some(m.as_ptr().wrapping_add(at as usize).cast_const())
    }

    /// Maps `len` bytes at `p` (from [`Source::mapped`]) with one call, so that the copy
    /// does not fault page by page. Only a hint: where it fails the copy faults, or fails.
    pub(super) fn populate(&self, p: *const u8, len: u64) {
        self.advise(p, len, libc::MADV_POPULATE_READ);
    }

    /// Unmaps the pages at `at` once copied: the helper keeps none of the file mapped
    /// (they stay in the page cache).
    pub(super) fn release(&self, at: u64, len: u64) {
        if let Some(p) = self.mapped(at, len) {
            self.advise(p, len, libc::MADV_DONTNEED);
        }
    }

    fn advise(&self, p: *const u8, len: u64, advice: libc::c_int) {
        // SAFETY: `p..p+len` is inside this read-only mapping of a file (`mapped`): the
        // advice maps or unmaps its pages, which nothing in this process reads.
        unsafe { libc::madvise(p.cast_mut().cast(), len as usize, advice) };
    }
}
