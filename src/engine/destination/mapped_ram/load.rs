//! The full load of a mapped-ram block: every page whose bit is set is read from its place
//! in the file straight into guest memory (`preadv` into the block's pages: one copy,
//! kernel to guest), and every other page is made to read as zero (a hole punched, unless
//! the page is known to be a hole already: a fresh destination pays nothing).
//!
//! The block is cut into segments of `LOAD_BUF_SIZE` (one `preadv` at most per run of set
//! bits in a segment, at most 256 iovecs). With multifd file channels, one scoped thread per
//! channel fd takes segments in turn; all are joined before the stream goes on (QEMU syncs
//! its channels once per block list too).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::compat::wire::mapped_ram::LOAD_BUF_SIZE;
use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::engine::destination::bitmap::AtomicBitmap;
use crate::engine::destination::error::LoadError;
use crate::engine::destination::loader::{Loader, Phase};
use crate::engine::destination::mapped_ram::{MappedBlock, MappedError};
use crate::engine::migration::{MigrationCtx, Stats};
use crate::memory::block::RamBlock;
use crate::memory::page::IoVecs;
use crate::wire::mapped_ram as codec;

const PAGE: u64 = TARGET_PAGE_SIZE as u64;
/// Pages per segment, and bitmap words per segment.
const SEG_PAGES: u64 = LOAD_BUF_SIZE / PAGE;
const SEG_WORDS: usize = (SEG_PAGES / 64) as usize;

/// Why a positional read did not fill its buffer.
pub(super) enum ReadFail {
    /// End of file first.
    Short,
    Io(std::io::Error),
}

impl ReadFail {
    /// The error, naming what was read.
    pub(super) fn named(
        self,
        block: &str,
        what: &'static str,
        file_offset: u64,
        block_offset: u64,
    ) -> MappedError {
        match self {
            ReadFail::Short => MappedError::Short {
                block: block.into(),
                what,
                file_offset,
                block_offset,
            },
            ReadFail::Io(source) => MappedError::Io {
                block: block.into(),
                what,
                file_offset,
                source,
            },
        }
    }
}

fn file_offset(at: u64) -> Result<i64, ReadFail> {
    i64::try_from(at).map_err(|e| ReadFail::Io(std::io::Error::other(e)))
}

/// Reads `buf.len()` bytes at absolute file offset `at`.
pub(super) fn pread_exact(fd: &OwnedFd, buf: &mut [u8], at: u64) -> Result<(), ReadFail> {
    let mut got = 0;
    while got < buf.len() {
        let off = file_offset(at + got as u64)?;
        match nix::sys::uio::pread(fd.as_fd(), &mut buf[got..], off) {
            Ok(0) => return Err(ReadFail::Short),
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(ReadFail::Io(e.into())),
        }
    }
    Ok(())
}

impl Loader<'_> {
    /// Loads block `mb` in full (see the module's doc). `offset`: the stream offset, for
    /// errors.
    pub(super) fn load_mapped(&mut self, mb: &MappedBlock, offset: u64) -> Result<(), LoadError> {
        let (Some(block), Some(file)) = (self.blocks.get(mb.index), self.mapped_file.as_ref())
        else {
            return Ok(());
        };
        let Phase::Precopy(p) = &self.phase else {
            return Ok(());
        };
        let known_zero = p.sink.known_zero();
        let (Some(known), Some(received)) = (known_zero.get(mb.index), self.received.get(mb.index))
        else {
            return Ok(());
        };
        let fds: Vec<BorrowedFd<'_>> = if file.channels.is_empty() {
            vec![file.fd.as_fd()]
        } else {
            file.channels.iter().map(|f| f.as_fd()).collect()
        };
        let t0 = std::time::Instant::now();
        let mapped = |source| LoadError::Mapped { offset, source };
        read_pages(self.ctx, block, mb, &fds).map_err(|e| match e {
            Failed::Cancelled => LoadError::Cancelled,
            Failed::Mapped(e) => mapped(e),
        })?;
        let (data, zeroed) = zero_the_rest(block, mb, known, &self.ctx.stats);
        for w in 0..mb.bitmap.len() {
            received.set_mask(w, valid(block.pages(), w));
        }
        slog::info!(self.ctx.log, "mapped-ram block loaded";
            "block" => &block.id,
            "pages" => data,
            "zero_pages" => block.pages() - data,
            "holes_punched" => zeroed,
            "channels" => fds.len(),
            "ms" => t0.elapsed().as_millis());
        Ok(())
    }
}

/// The bits of bitmap word `w` that are pages of a block of `pages` pages.
fn valid(pages: u64, w: usize) -> u64 {
    let first = w as u64 * 64;
    match pages.saturating_sub(first) {
        0 => 0,
        n if n >= 64 => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

enum Failed {
    Cancelled,
    Mapped(MappedError),
}

/// Reads the pages whose bits are set, segment by segment, on `fds` (one thread each when
/// there are several).
fn read_pages(
    ctx: &MigrationCtx,
    block: &RamBlock,
    mb: &MappedBlock,
    fds: &[BorrowedFd<'_>],
) -> Result<(), Failed> {
    let segments = block.pages().div_ceil(SEG_PAGES);
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let work = |fd: BorrowedFd<'_>| -> Result<(), Failed> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let k = next.fetch_add(1, Ordering::Relaxed);
            if k >= segments {
                return Ok(());
            }
            let done = if ctx.cancelled() {
                Err(Failed::Cancelled)
            } else {
                read_segment(block, mb, fd, k, &ctx.stats).map_err(Failed::Mapped)
            };
            if done.is_err() {
                stop.store(true, Ordering::Release);
                return done;
            }
        }
    };
    let [fd] = fds else {
        return std::thread::scope(|s| {
            let mut handles = Vec::with_capacity(fds.len());
            let mut result = Ok(());
            for (i, &fd) in fds.iter().enumerate() {
                let h = std::thread::Builder::new()
                    .name(format!("qmh-mr-read-{i}"))
                    .spawn_scoped(s, move || {
                        // It only moves pages from the file it was handed into guest memory.
                        crate::sandbox::enter_thread(crate::sandbox::ThreadKind::ChannelMover);
                        work(fd)
                    });
                match h {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        stop.store(true, Ordering::Release);
                        result = Err(Failed::Mapped(MappedError::Thread(e.to_string())));
                        break;
                    }
                }
            }
            for h in handles {
                let r = h.join().unwrap_or_else(|_| {
                    Err(Failed::Mapped(MappedError::Thread("panicked".into())))
                });
                // The first failure is the cause; the others stopped because of it.
                if result.is_ok() {
                    result = r;
                }
            }
            result
        });
    };
    work(*fd)
}

/// Reads the set runs of segment `k`.
fn read_segment(
    block: &RamBlock,
    mb: &MappedBlock,
    fd: BorrowedFd<'_>,
    k: u64,
    stats: &Stats,
) -> Result<(), MappedError> {
    let first = k as usize * SEG_WORDS;
    let words = mb
        .bitmap
        .get(first..(first + SEG_WORDS).min(mb.bitmap.len()))
        .unwrap_or(&[]);
    // Bits past the block's pages were cleared when the bitmap was decoded.
    for (s, n) in codec::runs(words) {
        let off = (k * SEG_PAGES + s) * PAGE;
        read_run(block, mb, fd, off, n)?;
        Stats::add(&stats.normal, n);
        Stats::add(&stats.transferred, n * PAGE);
        sub(&stats.remaining, n * PAGE);
    }
    Ok(())
}

/// Reads `n` pages at block offset `off` from their place in the file.
fn read_run(
    block: &RamBlock,
    mb: &MappedBlock,
    fd: BorrowedFd<'_>,
    off: u64,
    n: u64,
) -> Result<(), MappedError> {
    let len = n * PAGE;
    let outside = || MappedError::Outside {
        block: block.id.clone(),
        offset: off,
        len,
    };
    let range = block.range(off, len).ok_or_else(outside)?;
    // Holes are allocated with one call instead of a fault per page in the read.
    range.populate_write();
    let mut iov = IoVecs::with_capacity(n as usize);
    for i in 0..n as usize {
        iov.push_page_to_fill(range.page(i).ok_or_else(outside)?);
    }
    // Inside the pages region: `off + len` is within the block (checked by `range`), the
    // region is the block's length and inside the file (checked by `check`).
    let mut at = mb.header.pages_offset + off;
    let fail = |e: ReadFail, at: u64| {
        let block_offset = at - mb.header.pages_offset;
        e.named(&block.id, "pages", at, block_offset)
    };
    while !iov.is_empty() {
        let pos = file_offset(at).map_err(|e| fail(e, at))?;
        match iov.preadv(fd, pos) {
            Ok(0) => return Err(fail(ReadFail::Short, at)),
            Ok(got) => at += got as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(ReadFail::Io(e), at)),
        }
    }
    Ok(())
}

/// Makes the pages whose bit is clear read as zero: a hole is punched where the page is
/// not known to be one already (a page that cannot be punched is zeroed). Updates the
/// known-zero map both ways. Returns the data pages and the pages punched.
fn zero_the_rest(
    block: &RamBlock,
    mb: &MappedBlock,
    known: &AtomicBitmap,
    stats: &Stats,
) -> (u64, u64) {
    let pages = block.pages();
    let known_words = known.words();
    let mut punch = Vec::with_capacity(mb.bitmap.len());
    let mut data = 0u64;
    for (w, &bits) in mb.bitmap.iter().enumerate() {
        let v = valid(pages, w);
        let kz = known_words.get(w).copied().unwrap_or(0);
        punch.push(!bits & !kz & v);
        data += u64::from((bits & v).count_ones());
        // Data pages are data now; the others will be holes (or zeroed, which the map
        // may also call known zero: nothing wrote them since).
        known.clear_mask(w, bits);
        known.set_mask(w, !bits & v);
    }
    let mut punched = 0;
    for (s, n) in codec::runs(&punch) {
        let (off, len) = (s * PAGE, n * PAGE);
        if block.punch_hole(off, len).is_err() {
            // Not a file that takes holes this size (hugetlbfs): write zeros instead.
            for p in s..s + n {
                block.fill_page(p * PAGE, 0);
            }
        }
        punched += n;
    }
    let zero = pages - data;
    Stats::add(&stats.duplicate, zero);
    sub(&stats.remaining, zero * PAGE);
    (data, punched)
}

/// Saturating subtraction on a counter.
fn sub(c: &AtomicU64, n: u64) {
    let _ = c.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(n)));
}

/// The first segment's reads, for the short-read test.
#[cfg(test)]
pub(super) fn read_for_test(
    block: &RamBlock,
    mb: &MappedBlock,
    fd: &OwnedFd,
) -> Result<(), MappedError> {
    read_segment(block, mb, fd.as_fd(), 0, &Stats::default())
}
