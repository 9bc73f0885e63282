//! Guest memory: the parent's RAM blocks (memfd or other shareable files) mapped MAP_SHARED,
//! and their dirty bitmaps. The helper reads and writes guest RAM only through these
//! mappings, so it never holds a private copy.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::memory::dirty_bitmap::watch;
pub(crate) use crate::memory::dirty_bitmap::DirtyBitmap;
pub(crate) use crate::memory::error::{file_size, MemoryError};
use crate::memory::page::{GuestPage, GuestRange, IoVecs, Page};

const HUGETLBFS_MAGIC: i64 = 0x958458f6;
const TMPFS_MAGIC: i64 = 0x01021994;

/// The page size of the file system behind `fd` (hugetlbfs reports its huge page size).
fn fd_page_size(fd: &OwnedFd) -> u64 {
    match nix::sys::statfs::fstatfs(fd) {
        Ok(s) if s.filesystem_type().0 == HUGETLBFS_MAGIC => s.block_size() as u64,
        _ => TARGET_PAGE_SIZE as u64,
    }
}

/// `fd` is on tmpfs (a memfd, or a file in /dev/shm): its pages are memory, not a disk's.
fn fd_is_tmpfs(fd: &OwnedFd) -> bool {
    nix::sys::statfs::fstatfs(fd).is_ok_and(|s| s.filesystem_type().0 == TMPFS_MAGIC)
}

/// Clears bits `[from, to)`, a word at a time where it can.
fn clear_bits(bits: &mut [u64], from: u64, to: u64) {
    let mut p = from;
    while p < to {
        let (w, b) = ((p / 64) as usize, p % 64);
        let n = (64 - b).min(to - p);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << b
        };
        if let Some(x) = bits.get_mut(w) {
            *x &= !mask;
        }
        p += n;
    }
}

/// Starts [`RamBlock::map_present`] on a thread of its own, so that `ram-block-add` returns
/// at once (mapping takes about 0.1 s per GiB present). A migration does not wait for it:
/// a page not mapped yet is mapped by the copy's own fault. Stops when only this thread
/// still holds the block (removed: the mapping then lives at most one chunk longer), when
/// the block becomes a source's, or at the first hole the helper punches. The block joins
/// the thread when it is dropped.
pub(crate) fn map_present_in_background(block: &Arc<RamBlock>, log: &slog::Logger) {
    let b = Arc::downgrade(block);
    let thread_log = log.clone();
    let spawned = std::thread::Builder::new()
        .name("qmh-premap".into())
        .spawn(move || {
            let Some(block) = b.upgrade() else { return };
            let t = std::time::Instant::now();
            let pages = block.map_present(|| Arc::strong_count(&block) == 1);
            slog::debug!(thread_log, "RAM block's present pages mapped"; "id" => &block.id,
                "pages" => pages, "ms" => t.elapsed().as_millis() as u64);
        });
    match spawned {
        Ok(h) => {
            let mut slot = block.premap.lock().unwrap_or_else(|e| e.into_inner());
            // Called once per block, at ram-block-add; were it called again, the first
            // thread is waited for here rather than left unjoined.
            if let Some(old) = slot.replace(h) {
                drop(slot);
                let _ = old.join();
            }
        }
        Err(e) => {
            slog::debug!(log, "not mapping the RAM block's present pages ahead"; "error" => %e)
        }
    }
}

/// One RAM block as registered with `ram-block-add`.
pub(crate) struct RamBlock {
    pub(crate) id: String,
    pub(crate) fdname: String,
    pub(crate) offset: u64,
    pub(crate) size: u64,
    pub(crate) page_size: u64,
    pub(crate) host_addr: Option<u64>,
    pub(crate) dirty_bitmap_name: Option<String>,
    /// The fd has F_SEAL_SHRINK (added at ram-block-add where the fd allows seals).
    pub(crate) shrink_sealed: bool,
    /// Declared before the region: stops watching before the unmap.
    guard: crate::memory::guard::Guard,
    region: MmapRegion,
    dirty: Option<DirtyBitmap>,
    /// The fd is on tmpfs: mapping its present pages ahead reads nothing from a disk.
    tmpfs: bool,
    /// [`RamBlock::map_present`] went through the whole block.
    mapped_ahead: std::sync::atomic::AtomicBool,
    /// Tells [`RamBlock::map_present`] to stop; set for good.
    stop_mapping: std::sync::atomic::AtomicBool,
    /// Held while `map_present` populates a chunk, so that stopping can wait for it.
    mapping: std::sync::Mutex<()>,
    /// The thread of [`map_present_in_background`], joined on drop.
    premap: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for RamBlock {
    fn drop(&mut self) {
        let premap = self.premap.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = premap.take() {
            // The thread holds the block while it maps, so a drop elsewhere finds it done
            // (or never started). A drop on the thread itself (it let go of the block
            // last) is its final act: it ends right after.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// What `ram-block-add` asks for.
pub(crate) struct RamBlockSpec {
    pub(crate) id: String,
    pub(crate) fdname: String,
    pub(crate) offset: u64,
    pub(crate) size: u64,
    pub(crate) page_size: Option<u64>,
    pub(crate) host_addr: Option<u64>,
    pub(crate) dirty_bitmap: Option<(String, OwnedFd)>,
}

impl RamBlock {
    pub(crate) fn new(spec: RamBlockSpec, fd: OwnedFd) -> Result<Self, MemoryError> {
        let id = spec.id.as_str();
        if id.is_empty() || id.len() > 255 {
            return Err(MemoryError::invalid(id, "id must be 1 to 255 bytes"));
        }
        let fsize = file_size(id, &fd)?;
        let fd_ps = fd_page_size(&fd);
        let tmpfs = fd_is_tmpfs(&fd);
        let page_size = spec.page_size.unwrap_or(fd_ps);
        if !page_size.is_power_of_two() || page_size < TARGET_PAGE_SIZE as u64 {
            return Err(MemoryError::invalid(
                id,
                format!("page-size {page_size} is not a power of two >= 4096"),
            ));
        }
        if page_size != fd_ps {
            return Err(MemoryError::invalid(
                id,
                format!("page-size {page_size} differs from the fd's page size {fd_ps}"),
            ));
        }
        if spec.size == 0 || spec.size % page_size != 0 {
            return Err(MemoryError::invalid(
                id,
                format!(
                    "size {} is not a positive multiple of the page size {page_size}",
                    spec.size
                ),
            ));
        }
        if spec.offset % page_size != 0 {
            return Err(MemoryError::invalid(
                id,
                format!("offset {} is not page aligned", spec.offset),
            ));
        }
        let end = spec.offset.checked_add(spec.size);
        if end.is_none_or(|e| e > fsize) {
            return Err(MemoryError::PastEnd {
                id: id.into(),
                offset: spec.offset,
                size: spec.size,
                file_size: fsize,
            });
        }
        if let Some(a) = spec.host_addr {
            if a % page_size != 0 {
                return Err(MemoryError::invalid(id, "host-addr is not page aligned"));
            }
        }
        let size = usize::try_from(spec.size)
            .map_err(|_| MemoryError::invalid(id, "size does not fit the address space"))?;
        // A sealed fd cannot shrink under the mapping; others are watched for SIGBUS.
        let shrink_sealed = crate::memory::guard::seal_shrink(&fd);
        let region = MmapRegion::build(
            Some(FileOffset::new(File::from(fd), spec.offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryError::Map {
            id: id.into(),
            source,
        })?;
        // SAFETY: `guard` is declared before `region` in RamBlock: dropped first.
        let guard = unsafe { watch(id, &region)? };
        let pages = spec.size / TARGET_PAGE_SIZE as u64;
        let (dirty_bitmap_name, dirty) = match spec.dirty_bitmap {
            Some((name, bfd)) => (Some(name), Some(DirtyBitmap::new(id, bfd, pages)?)),
            None => (None, None),
        };
        Ok(RamBlock {
            id: spec.id,
            fdname: spec.fdname,
            offset: spec.offset,
            size: spec.size,
            page_size,
            host_addr: spec.host_addr,
            dirty_bitmap_name,
            shrink_sealed,
            guard,
            region,
            dirty,
            tmpfs,
            mapped_ahead: Default::default(),
            stop_mapping: Default::default(),
            mapping: Default::default(),
            premap: Default::default(),
        })
    }

    /// The fd (or the bitmap's) shrank under the mapping, which now holds nothing of it
    /// (see `memory_guard`): the block must be removed and added again.
    pub(crate) fn memory_lost(&self) -> bool {
        self.guard.lost()
            || self.dirty.as_ref().is_some_and(|d| d.lost())
            || self
                .fd()
                .and_then(|f| f.metadata().ok())
                .is_some_and(|m| m.len() < self.offset + self.size)
    }

    /// Number of target pages (4 KiB) in the block.
    pub(crate) fn pages(&self) -> u64 {
        self.size / TARGET_PAGE_SIZE as u64
    }

    pub(crate) fn dirty(&self) -> Option<&DirtyBitmap> {
        self.dirty.as_ref()
    }

    /// The target page at byte offset `off`, or None when out of bounds or unaligned.
    ///
    /// The parent's vCPUs may write the page while the helper reads it; a torn page is
    /// re-sent because the parent also sets its dirty bit, exactly as in QEMU.
    #[inline]
    pub(crate) fn guest_page(&self, off: u64) -> Option<GuestPage<'_>> {
        if off % TARGET_PAGE_SIZE as u64 != 0 {
            return None;
        }
        let off = usize::try_from(off).ok()?;
        self.region
            .get_slice(off, TARGET_PAGE_SIZE)
            .ok()
            .map(GuestPage::new)
    }

    /// The `len` bytes (whole target pages) at byte offset `off`, or None when out of
    /// bounds or unaligned.
    #[inline]
    pub(crate) fn range(&self, off: u64, len: u64) -> Option<GuestRange<'_>> {
        let page = TARGET_PAGE_SIZE as u64;
        if off % page != 0 || len % page != 0 {
            return None;
        }
        let (off, len) = (usize::try_from(off).ok()?, usize::try_from(len).ok()?);
        self.region.get_slice(off, len).ok().map(GuestRange::new)
    }

    fn fd(&self) -> Option<&File> {
        self.region.file_offset().map(|f| f.file())
    }

    /// The block's data ranges in the fd right now, as block-relative byte ranges widened to
    /// whole target pages, found with SEEK_DATA/SEEK_HOLE: a fresh memfd is one hole and
    /// costs one call. None if the fd cannot tell.
    fn data_ranges(&self) -> Option<Vec<(u64, u64)>> {
        let fd = self.fd()?.as_raw_fd();
        let page = TARGET_PAGE_SIZE as i64;
        let (start, end) = (self.offset as i64, (self.offset + self.size) as i64);
        let mut ranges = Vec::new();
        let mut pos = start;
        while pos < end {
            // SAFETY: plain syscalls on an fd we own.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                // ENXIO: no data after `pos`. Anything else: not a question this fd answers.
                let enxio = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
                return enxio.then_some(ranges);
            }
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole <= data {
                return None;
            }
            // A partly written page is data.
            let from = data - (data - start) % page;
            let to = (start + (hole - start + page - 1) / page * page).min(end);
            ranges.push(((from - start) as u64, (to - start) as u64));
            pos = to;
        }
        Some(ranges)
    }

    /// A bitmap of the target pages that are holes in the fd (so read as zero) right now.
    /// If the fd cannot tell, no page is a hole: a hole is skipped as known zero, so only a
    /// sure answer may say so.
    pub(crate) fn hole_bitmap(&self) -> Vec<u64> {
        let pages = self.pages();
        let words = pages.div_ceil(64) as usize;
        let Some(ranges) = self.data_ranges() else {
            return vec![0; words];
        };
        let mut bits = vec![u64::MAX; words];
        if let Some(last) = bits.last_mut() {
            if pages % 64 != 0 {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        for (a, b) in ranges {
            clear_bits(
                &mut bits,
                a / TARGET_PAGE_SIZE as u64,
                b / TARGET_PAGE_SIZE as u64,
            );
        }
        bits
    }

    /// Maps the pages the parent has already allocated (a preallocated or previously used
    /// guest) into this process's page tables, a chunk at a time, so that copies into and
    /// out of them later do not fault one page at a time; holes stay holes. Only on tmpfs
    /// (on a disk-backed file it would read the file). Stops early when `stop` returns true
    /// or [`RamBlock::stop_mapping_ahead`] was called. Returns the pages mapped. Mapping is
    /// only a hint: on a kernel without MADV_POPULATE_WRITE the copies fault instead.
    ///
    /// The data ranges are taken once, at the start: a hole punched later by the helper
    /// (a postcopy discard) first stops the mapping, and waits for the chunk in progress,
    /// so that it cannot be filled again with a page the parent's userfaultfd would then
    /// never report missing.
    pub(crate) fn map_present(&self, stop: impl Fn() -> bool) -> u64 {
        let ranges = match self.data_ranges() {
            // hugetlbfs pages map whole on their first touch anyway.
            Some(r) if self.tmpfs && self.page_size == TARGET_PAGE_SIZE as u64 => r,
            _ => Vec::new(),
        };
        const CHUNK: u64 = 32 << 20;
        let mut mapped = 0;
        for (a, b) in ranges {
            let mut off = a;
            while off < b {
                let _chunk = self.mapping.lock().unwrap_or_else(|e| e.into_inner());
                // A lost block is anonymous memory now: populating it would only allocate.
                if stop() || self.stop_mapping.load(Ordering::Relaxed) || self.guard.lost() {
                    return mapped;
                }
                let len = (b - off).min(CHUNK);
                // The pages exist (holes punched by this helper stop the mapping first, see
                // above), so populating allocates nothing.
                if let Some(r) = self.range(off, len) {
                    r.populate_write();
                }
                mapped += len / TARGET_PAGE_SIZE as u64;
                off += len;
            }
        }
        self.mapped_ahead.store(true, Ordering::Release);
        mapped
    }

    /// Stops [`RamBlock::map_present`] for good, and returns once a chunk it is mapping is
    /// done.
    pub(crate) fn stop_mapping_ahead(&self) {
        self.stop_mapping.store(true, Ordering::Relaxed);
        drop(self.mapping.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The block's present pages have all been mapped ahead (see `map_present`).
    pub(crate) fn mapped_ahead(&self) -> bool {
        self.mapped_ahead.load(Ordering::Acquire)
    }

    /// Copies whole target pages to consecutive offsets from `off` through the mapping,
    /// with `populate` after populating the range with one `madvise(MADV_POPULATE_WRITE)`
    /// (for pages not allocated yet; pages that exist are mapped by [`RamBlock::map_present`]
    /// or on a fault). Unlike [`RamBlock::write_pages_at`] this takes no lock on the file, so
    /// several threads can fill fresh memory at once. Returns false when the range leaves
    /// the block.
    pub(crate) fn copy_pages_at(&self, off: u64, pages: &[&Page], populate: bool) -> bool {
        let len = pages.len() as u64 * TARGET_PAGE_SIZE as u64;
        let Some(r) = self.range(off, len) else {
            return false;
        };
        if populate {
            r.populate_write();
        }
        r.copy_pages_from(pages)
    }

    /// Writes whole target pages at consecutive offsets from `off` with one `pwritev` into
    /// the fd (the page cache the parent maps): no page fault and no page clearing per page,
    /// unlike a copy through the mapping. Returns false when the range leaves the block.
    pub(crate) fn write_pages_at(&self, off: u64, pages: &[&Page]) -> std::io::Result<bool> {
        let len = pages.len() as u64 * TARGET_PAGE_SIZE as u64;
        if self.range(off, len).is_none() {
            return Ok(false);
        }
        let Some(f) = self.fd() else { return Ok(false) };
        let mut iov = IoVecs::with_capacity(pages.len());
        iov.push_pages(pages);
        let mut file_off = (self.offset + off) as i64;
        while !iov.is_empty() {
            match iov.pwritev(std::os::fd::AsFd::as_fd(f), file_off) {
                Ok(w) => file_off += w as i64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Frees `[off, off+len)` of the block back to a hole (postcopy discard): the parent's
    /// next access to it faults.
    pub(crate) fn punch_hole(&self, off: u64, len: u64) -> std::io::Result<()> {
        // Mapping ahead must not fill the hole again (see `map_present`).
        self.stop_mapping_ahead();
        let f = self
            .fd()
            .ok_or_else(|| std::io::Error::other("block has no fd"))?;
        nix::fcntl::fallocate(
            f.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (self.offset + off) as i64,
            len as i64,
        )
        .map_err(std::io::Error::from)
    }

    /// Makes the page at `off` all `fill`, without dirtying an already zero page (reading a
    /// page is cheaper than writing one, and keeps holes in the memfd where it can).
    #[inline]
    pub(crate) fn fill_page(&self, off: u64, fill: u8) -> bool {
        let Some(page) = self.guest_page(off) else {
            return false;
        };
        if fill == 0 && page.is_zero() {
            return true;
        }
        page.fill(fill);
        true
    }
}

// RamBlock is Send + Sync without an `unsafe impl`: vm-memory's MmapRegion is, and every
// access to the mapping goes through volatile slices or atomics. Checked here.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<RamBlock>();
    send_sync::<DirtyBitmap>();
};

/// Prefixes a migration's error with the blocks whose memory shrank under it, if any (a
/// shrink shows as SIGBUS when the helper reads the page, as EFAULT when the kernel does).
pub(crate) fn explain_loss(blocks: &[std::sync::Arc<RamBlock>], error: String) -> String {
    let _ = crate::memory::guard::take_losses();
    let lost: Vec<&str> = blocks
        .iter()
        .filter(|b| b.memory_lost())
        .map(|b| b.id.as_str())
        .collect();
    if lost.is_empty() {
        return error;
    }
    format!(
        "RAM block(s) {lost:?} shrank under the migration (the parent truncated the fd; \
         a memfd made with MFD_ALLOW_SEALING is sealed against that): {error}"
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

    pub(crate) fn memfd(size: u64) -> OwnedFd {
        let fd = memfd_create(c"qmh-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, size as i64).unwrap();
        fd
    }

    pub(crate) fn spec(id: &str, size: u64) -> RamBlockSpec {
        RamBlockSpec {
            id: id.into(),
            fdname: "m".into(),
            offset: 0,
            size,
            page_size: None,
            host_addr: None,
            dirty_bitmap: None,
        }
    }

    /// Byte `i` of the page at `off`.
    pub(crate) fn byte(b: &RamBlock, off: u64, i: usize) -> u8 {
        let mut page = [0u8; TARGET_PAGE_SIZE];
        b.guest_page(off)
            .expect("page in the block")
            .copy_to(&mut page);
        page[i]
    }

    #[test]
    fn map_write_read() {
        let b = RamBlock::new(spec("ram", 1 << 20), memfd(1 << 20)).unwrap();
        assert_eq!(b.pages(), 256);
        assert!(b.copy_pages_at(4096, &[&[7u8; 4096]], false));
        assert_eq!(byte(&b, 4096, 100), 7);
        assert!(!b.copy_pages_at(1 << 20, &[&[7u8; 4096]], false));
        assert!(!b.copy_pages_at(4095, &[&[7u8; 4096]], false));
        assert!(b.guest_page(u64::MAX - 4095).is_none());
        assert!(b.guest_page(1 << 20).is_none());
        assert!(b.guest_page(100).is_none());
        assert!(b.range(4096, 8192).is_some_and(|r| r.pages() == 2));
        assert!(b.range((1 << 20) - 4096, 8192).is_none());
        assert!(b.fill_page(4096, 0));
        assert!(b.guest_page(4096).unwrap().is_zero());
    }

    #[test]
    fn holes_and_batched_writes() {
        let b = RamBlock::new(spec("ram", 1 << 20), memfd(1 << 20)).unwrap();
        assert!(b.hole_bitmap().iter().all(|&w| w == u64::MAX));
        let pages = [[1u8; 4096], [2u8; 4096], [3u8; 4096]];
        let ptrs: Vec<&Page> = pages.iter().collect();
        assert!(b.write_pages_at(8192, &ptrs).unwrap());
        assert_eq!(byte(&b, 8192, 0), 1);
        assert_eq!(byte(&b, 16384, 4095), 3);
        let h = b.hole_bitmap();
        assert_eq!(h[0] & 0b11111, 0b00011, "pages 2..5 are data");
        assert!(!b.write_pages_at((1 << 20) - 4096, &ptrs).unwrap());
    }

    #[test]
    fn map_present_maps_the_data_and_leaves_the_holes() {
        // A block at 1 MiB into its fd; data in the fd before the block must not count.
        let fd = memfd(2 << 20);
        let f = File::from(fd.try_clone().unwrap());
        std::os::unix::fs::FileExt::write_at(&f, &[9u8; 4096], 0).unwrap();
        let mut s = spec("ram", 1 << 20);
        s.offset = 1 << 20;
        let b = RamBlock::new(s, fd).unwrap();
        let pages = [[1u8; 4096], [2u8; 4096], [3u8; 4096]];
        let ptrs: Vec<&Page> = pages.iter().collect();
        assert!(b.write_pages_at(2 * 4096, &ptrs).unwrap());
        assert!(b.write_pages_at(100 * 4096, &ptrs[..1]).unwrap());
        let before = b.hole_bitmap();
        assert_eq!(before[0] & 0b11111, 0b00011, "pages 2..5 are data");
        assert_eq!(before[1] & (1 << 36), 0, "page 100 is data");
        assert_eq!(b.map_present(|| true), 0, "stopped at once");
        assert_eq!(b.map_present(|| false), 4);
        // Nothing was allocated: the holes are still holes.
        assert_eq!(b.hole_bitmap(), before);
        // Copies into mapped present pages need no populate.
        let new = [7u8; 4096];
        assert!(b.copy_pages_at(3 * 4096, &[&new], false));
        assert_eq!(byte(&b, 3 * 4096, 17), 7);
        assert_eq!(byte(&b, 2 * 4096, 17), 1);
    }

    #[test]
    fn the_mapping_thread_is_joined_when_the_block_goes() {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        for wait in [true, false] {
            let b = Arc::new(RamBlock::new(spec("ram", 4 << 20), memfd(4 << 20)).unwrap());
            assert!(b.write_pages_at(0, &[&[1u8; 4096]; 64]).unwrap());
            map_present_in_background(&b, &log);
            assert!(b.premap.lock().unwrap().is_some());
            if wait {
                while !b.mapped_ahead() {
                    std::thread::yield_now();
                }
            }
            // Dropped here or on the thread (when it still holds the block): no hang.
            drop(b);
        }
    }

    #[test]
    fn a_punched_hole_stops_mapping_ahead_for_good() {
        let b = RamBlock::new(spec("ram", 1 << 20), memfd(1 << 20)).unwrap();
        let page = [5u8; 4096];
        for p in 0..256u64 {
            assert!(b.write_pages_at(p * 4096, &[&page]).unwrap());
        }
        // A postcopy discard: from now on nothing may fill that hole again.
        b.punch_hole(7 * 4096, 4096).unwrap();
        assert_eq!(b.map_present(|| false), 0);
        assert!(!b.mapped_ahead());
        assert_eq!(b.hole_bitmap()[0], 1 << 7, "page 7 is still the only hole");
    }

    #[test]
    fn only_tmpfs_is_mapped_ahead() {
        // A file on the disk the tests run from (not tmpfs here; said if it is).
        let dir = std::env::temp_dir();
        let path = dir.join(format!("qmh-map-ahead-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, &[1u8; 8192], 0).unwrap();
        f.set_len(1 << 20).unwrap();
        let fd = OwnedFd::from(f);
        let on_tmpfs = fd_is_tmpfs(&fd);
        let b = RamBlock::new(spec("disk", 1 << 20), fd).unwrap();
        let want = if on_tmpfs {
            eprintln!("{} is on tmpfs: mapping ahead maps its data", dir.display());
            2
        } else {
            0
        };
        assert_eq!(b.map_present(|| false), want);
        assert!(b.mapped_ahead(), "nothing (more) to map is done too");
        // The holes are found on any file system that reports them.
        assert_eq!(b.hole_bitmap()[0] & 0b111, 0b100);
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(matches!(
            RamBlock::new(spec("ram", 2 << 20), memfd(1 << 20)),
            Err(MemoryError::PastEnd { .. })
        ));
        assert!(RamBlock::new(spec("ram", 1000), memfd(1 << 20)).is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            RamBlock::new(spec("ram", 4096), OwnedFd::from(a)),
            Err(MemoryError::NotAFile { .. })
        ));
        let mut s = spec("ram", 4096);
        s.offset = u64::MAX - 100;
        assert!(RamBlock::new(s, memfd(8192)).is_err());
    }

    #[test]
    fn a_shrunk_unsealed_block_reads_zero_and_is_lost_instead_of_sigbus() {
        let fd = memfd(1 << 20);
        let f = File::from(fd.try_clone().unwrap());
        std::os::unix::fs::FileExt::write_at(&f, &[7u8; 4096], 8192).unwrap();
        let b = RamBlock::new(spec("shrinks", 1 << 20), fd).unwrap();
        assert!(
            !b.shrink_sealed,
            "a memfd without MFD_ALLOW_SEALING cannot be sealed"
        );
        assert_eq!(byte(&b, 8192, 0), 7);
        f.set_len(4096).unwrap();
        // Past the new end: SIGBUS, caught; the block now reads zero and is lost.
        assert!(b.guest_page(8192).unwrap().is_zero());
        assert!(b.memory_lost());
        let lost = crate::memory::guard::take_losses();
        assert!(lost.iter().any(|n| n == "shrinks"), "{lost:?}");
        drop(b);
        // A sealable memfd is sealed: the parent cannot shrink it.
        let sealable = nix::sys::memfd::memfd_create(
            c"qmh-sealable",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        nix::unistd::ftruncate(&sealable, 1 << 20).unwrap();
        let keep = sealable.try_clone().unwrap();
        let b = RamBlock::new(spec("sealed", 1 << 20), sealable).unwrap();
        assert!(b.shrink_sealed);
        assert_eq!(
            nix::unistd::ftruncate(&keep, 4096),
            Err(nix::errno::Errno::EPERM)
        );
    }

    #[test]
    fn dirty_bitmap() {
        let mut s = spec("ram", 1 << 20);
        s.dirty_bitmap = Some(("d".into(), memfd(32)));
        let b = RamBlock::new(s, memfd(1 << 20)).unwrap();
        let d = b.dirty().unwrap();
        d.set(3);
        d.set(70);
        assert_eq!(d.take_word(0), 1 << 3);
        assert_eq!(d.take_word(0), 0);
        assert_eq!(d.take_word(1), 1 << 6);
        assert_eq!(d.take_word(99), 0);
        let mut s = spec("ram", 1 << 20);
        s.dirty_bitmap = Some(("d".into(), memfd(16)));
        assert!(matches!(
            RamBlock::new(s, memfd(1 << 20)),
            Err(MemoryError::BitmapTooSmall { .. })
        ));
    }
}
