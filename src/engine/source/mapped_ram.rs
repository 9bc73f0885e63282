//! mapped-ram on the source (QEMU's `mapped_ram_setup_ramblock`, `save_normal_page`,
//! `file_write_ramblock_iov`, `ram_save_file_bmap`): every page has a fixed place in the
//! file, written with `pwritev` straight from the guest mapping; the main channel carries
//! no page records. Per block a header after its entry in the block list, and a file bitmap
//! (QEMU's `file_bmap`: bit set = the page's data is in the file) written at the end.
//!
//! [`FileIo`] is the one place positional I/O and seeks on a file channel happen (the
//! main channel's, and each multifd channel's own fd).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::engine::source::error::MappedRamError;
use crate::memory::block::RamBlock;
use crate::memory::page::IoVecs;
use crate::transport::Channel;
use crate::wire::mapped_ram::{self, Header};

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// A page of zeros aligned for O_DIRECT: the data of a hole written as a page
/// (`zero-page-detection=none`), never read through the mapping (which would allocate it).
#[repr(C, align(4096))]
pub(crate) struct ZeroPage(pub(crate) [u8; TARGET_PAGE_SIZE]);
pub(crate) static ZERO_PAGE: ZeroPage = ZeroPage([0; TARGET_PAGE_SIZE]);

/// Positional I/O on a file channel: a duplicate of the channel's fd (it shares the file
/// offset and flags, O_DIRECT included, with the channel's own).
pub(crate) struct FileIo {
    fd: OwnedFd,
    pub(crate) name: String,
}

impl FileIo {
    pub(crate) fn of(chan: &Channel) -> Result<Self, MappedRamError> {
        let fd = chan.try_clone_fd().map_err(|source| MappedRamError::Dup {
            file: chan.peer.clone(),
            source,
        })?;
        Ok(FileIo {
            fd,
            name: chan.peer.clone(),
        })
    }

    /// The file offset the channel's next `write` goes to.
    pub(crate) fn position(&self) -> Result<u64, MappedRamError> {
        self.lseek(0, libc::SEEK_CUR)
    }

    /// Moves the channel's file offset to `pos` (absolute).
    pub(crate) fn seek(&self, pos: u64) -> Result<(), MappedRamError> {
        let off = i64::try_from(pos).map_err(|_| self.seek_err(pos, libc::EOVERFLOW))?;
        self.lseek(off, libc::SEEK_SET).map(drop)
    }

    fn lseek(&self, off: i64, whence: libc::c_int) -> Result<u64, MappedRamError> {
        // SAFETY: a plain syscall on an fd we own.
        let r = unsafe { libc::lseek(self.fd.as_raw_fd(), off, whence) };
        if r < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return Err(self.seek_err(off as u64, errno));
        }
        Ok(r as u64)
    }

    fn seek_err(&self, offset: u64, errno: i32) -> MappedRamError {
        MappedRamError::Seek {
            file: self.name.clone(),
            offset,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// Writes all of `iov` at absolute file offset `at` (`pwritev`, retried on EINTR and
    /// short writes).
    pub(crate) fn pwrite_all(&self, iov: &mut IoVecs<'_>, at: u64) -> Result<(), MappedRamError> {
        let len = iov.remaining() as u64;
        let mut off = at;
        let err = |offset: u64, source: std::io::Error| MappedRamError::Write {
            file: self.name.clone(),
            offset,
            len,
            source,
        };
        while !iov.is_empty() {
            let o = i64::try_from(off)
                .map_err(|_| err(off, std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
            match iov.pwritev(self.fd.as_fd(), o) {
                Ok(0) => return Err(err(off, std::io::ErrorKind::WriteZero.into())),
                Ok(n) => off += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(err(off, e)),
            }
        }
        Ok(())
    }
}

/// One block's place in the file and its file bitmap.
pub(crate) struct BlockMap {
    pub(crate) header: Header,
    used_length: u64,
    /// Set: the page's data is in the file. Atomic: the multifd channels set and clear
    /// bits of the pages they write concurrently (QEMU's `set_bit_atomic`).
    bits: Vec<AtomicU64>,
}

impl BlockMap {
    pub(crate) fn new(header: Header, used_length: u64) -> Self {
        let words = (used_length / PAGE).div_ceil(64) as usize;
        BlockMap {
            header,
            used_length,
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Marks the page at block offset `off` as in the file (`data`) or a hole.
    pub(crate) fn mark(&self, off: u64, data: bool) {
        let page = off / PAGE;
        if let Some(w) = self.bits.get((page / 64) as usize) {
            let bit = 1u64 << (page % 64);
            if data {
                w.fetch_or(bit, Ordering::AcqRel);
            } else {
                w.fetch_and(!bit, Ordering::AcqRel);
            }
        }
    }

    pub(crate) fn words(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// The absolute file offset of the page at block offset `off`, checked to lie in the
    /// block's pages region.
    pub(crate) fn page_at(&self, off: u64) -> Option<u64> {
        (off < self.used_length).then(|| self.header.page_at(off))
    }
}

/// Every block's place in the file: shared by the pass thread and the multifd channels.
pub(crate) struct FileMap {
    pub(crate) blocks: Vec<BlockMap>,
    /// Page and bitmap bytes written to the file by the pass thread.
    written: AtomicU64,
}

impl FileMap {
    pub(crate) fn block(&self, bi: usize) -> Option<&BlockMap> {
        self.blocks.get(bi)
    }
}

/// The pass thread's side: the main channel's file and the map.
pub(crate) struct MappedRamOut {
    pub(crate) io: FileIo,
    pub(crate) map: Arc<FileMap>,
    /// Zero pages are detected (not written, bit cleared), unless
    /// `zero-page-detection=none`.
    detect_zero: bool,
}

/// What the file sink did with some pages.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileSent {
    pub(crate) normal: u64,
    pub(crate) zero: u64,
    pub(crate) bytes: u64,
}

impl MappedRamOut {
    pub(crate) fn new(io: FileIo, detect_zero: bool) -> Self {
        MappedRamOut {
            io,
            map: Arc::new(FileMap {
                blocks: Vec::new(),
                written: AtomicU64::new(0),
            }),
            detect_zero,
        }
    }

    /// Lays out the next block, whose entry ends at absolute file offset `at` (QEMU's
    /// `mapped_ram_setup_ramblock`): returns its header and where the stream goes on.
    /// Only while no multifd channel holds the map.
    pub(crate) fn add_block(
        &mut self,
        at: u64,
        used_length: u64,
    ) -> Result<(Header, u64), MappedRamError> {
        let h = mapped_ram::layout(at, used_length).map_err(MappedRamError::Layout)?;
        let end = h.end(used_length).ok_or_else(|| {
            MappedRamError::Layout(crate::wire::stream::WireError::Invalid(
                "mapped-ram layout runs past 2^64".into(),
            ))
        })?;
        let map = Arc::get_mut(&mut self.map).ok_or(MappedRamError::Shared)?;
        map.blocks.push(BlockMap::new(h, used_length));
        Ok((h, end))
    }

    /// The pages of word `wi` of block `bi` in `word` (already taken out of the to-do set;
    /// `holes`: known holes), each run of data pages with one `pwritev` from the guest
    /// mapping at its place; zero pages are not written and their bit is cleared (a page
    /// that became zero since an earlier pass).
    pub(crate) fn write_word(
        &self,
        block: &RamBlock,
        bi: usize,
        wi: usize,
        word: u64,
        holes: u64,
    ) -> Result<FileSent, MappedRamError> {
        let bm = self.map.block(bi).ok_or(MappedRamError::NoBlock(bi))?;
        let mut sent = FileSent::default();
        let mut iov = IoVecs::with_capacity(64);
        // The run being gathered: its first page's block offset and its end.
        let mut run: Option<(u64, u64)> = None;
        let mut w = word;
        while w != 0 {
            let bit = w.trailing_zeros() as u64;
            w &= w - 1;
            let off = (wi as u64 * 64 + bit) * PAGE;
            let Some(page) = block.guest_page(off) else {
                continue;
            };
            let hole = holes & (1 << bit) != 0;
            if self.detect_zero && (hole || page.is_zero()) {
                bm.mark(off, false);
                sent.zero += 1;
                continue;
            }
            if let Some((start, end)) = run {
                if end != off {
                    sent.bytes += self.write_run(bm, &mut iov, start)?;
                    run = None;
                }
            }
            let (start, _) = run.unwrap_or((off, off));
            run = Some((start, off + PAGE));
            if hole {
                iov.push_bytes(&ZERO_PAGE.0);
            } else {
                iov.push_page(page);
            }
            bm.mark(off, true);
            sent.normal += 1;
        }
        if let Some((start, _)) = run {
            sent.bytes += self.write_run(bm, &mut iov, start)?;
        }
        self.map.written.fetch_add(sent.bytes, Ordering::Relaxed);
        Ok(sent)
    }

    fn write_run(
        &self,
        bm: &BlockMap,
        iov: &mut IoVecs<'_>,
        start: u64,
    ) -> Result<u64, MappedRamError> {
        let len = iov.remaining() as u64;
        let at = bm.page_at(start).ok_or(MappedRamError::Outside(start))?;
        self.io.pwrite_all(iov, at)?;
        iov.clear();
        Ok(len)
    }

    /// A zero page found elsewhere (on the pass thread with multifd under
    /// `zero-page-detection=legacy`): not written, its bit cleared.
    pub(crate) fn zero(&self, bi: usize, off: u64) {
        if let Some(bm) = self.map.block(bi) {
            bm.mark(off, false);
        }
    }

    /// QEMU's `ram_save_file_bmap`, once no channel writes pages any more: every block's
    /// bitmap at its `bitmap_offset`, through the main fd. Returns the bytes written.
    pub(crate) fn write_bitmaps(&self) -> Result<u64, MappedRamError> {
        let mut total = 0;
        let mut buf = Vec::new();
        for bm in &self.map.blocks {
            buf.clear();
            mapped_ram::encode_bitmap(&mut buf, &bm.words());
            let mut iov = IoVecs::with_capacity(1);
            iov.push_bytes(&buf);
            self.io.pwrite_all(&mut iov, bm.header.bitmap_offset)?;
            total += buf.len() as u64;
        }
        self.map.written.fetch_add(total, Ordering::Relaxed);
        Ok(total)
    }

    /// Page and bitmap bytes the pass thread wrote.
    pub(crate) fn written(&self) -> u64 {
        self.map.written.load(Ordering::Relaxed)
    }
}

/// A multifd channel's side under mapped-ram (QEMU's `file_write_ramblock_iov` and
/// `multifd_set_file_bitmap`): its own fd and the shared map.
pub(crate) struct ChannelFile {
    pub(crate) io: FileIo,
    pub(crate) map: Arc<FileMap>,
}

impl ChannelFile {
    /// Writes the data pages `normal` (block offsets; [`crate::engine::source::multifd`]'s
    /// HOLE bit in `hole_bit` marks a hole, written as zeros) of block `bi` at their places,
    /// one `pwritev` per contiguous run, and sets their bits; clears those of `zero`.
    /// Returns the bytes written.
    pub(crate) fn write_packet(
        &self,
        block: &RamBlock,
        bi: usize,
        normal: &mut [u64],
        zero: &[u64],
        hole_bit: u64,
    ) -> Result<u64, MappedRamError> {
        let bm = self.map.block(bi).ok_or(MappedRamError::NoBlock(bi))?;
        // Sorted, the packet's pages make the longest runs (the zero-page partition may
        // have swapped some).
        normal.sort_unstable();
        let mut iov = IoVecs::with_capacity(normal.len());
        let mut written = 0;
        let mut i = 0;
        while i < normal.len() {
            let start = normal[i] & !hole_bit;
            let mut j = i;
            while j < normal.len() && normal[j] & !hole_bit == start + (j - i) as u64 * PAGE {
                let e = normal[j];
                if e & hole_bit != 0 {
                    iov.push_bytes(&ZERO_PAGE.0);
                } else {
                    let p = block.guest_page(e).ok_or(MappedRamError::Outside(e))?;
                    iov.push_page(p);
                }
                j += 1;
            }
            let at = bm.page_at(start).ok_or(MappedRamError::Outside(start))?;
            let len = iov.remaining() as u64;
            self.io.pwrite_all(&mut iov, at)?;
            iov.clear();
            written += len;
            i = j;
        }
        for &e in normal.iter() {
            bm.mark(e & !hole_bit, true);
        }
        for &e in zero {
            bm.mark(e & !hole_bit, false);
        }
        Ok(written)
    }
}

#[cfg(test)]
#[path = "mapped_ram_tests.rs"]
mod tests;
