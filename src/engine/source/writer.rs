//! The source's output: one writer that gathers records into few large `writev` calls, the
//! one page encoder (used by the main channel and the preempt sender alike), the one RAM
//! section framer, and the bandwidth throttle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compat::wire;
use crate::engine::source::mapped_ram::FileIo;
use crate::engine::source::SourceError;
use crate::memory::block::RamBlock;
use crate::memory::page::IoVecs;
use crate::transport::Channel;
use crate::wire::ram;
use crate::wire::stream::{self, SectionKind, WireError};

pub(crate) const PAGE: usize = wire::TARGET_PAGE_SIZE;
/// The RAM section's id on the wire (QEMU 10.0 gives `ram` id 1 too).
pub(crate) const RAM_SECTION_ID: u32 = 1;

/// Gathers records into few large `writev` calls: headers are copied into an arena, pages
/// are sent straight from the guest mapping (never copied). `'m` is the life of the RAM
/// blocks the pages come from, so a queued page cannot outlive its mapping.
pub(crate) struct Writer<'m> {
    chan: Arc<Channel>,
    arena: Vec<u8>,
    segs: Vec<Seg<'m>>,
    pending: usize,
    sent: u64,
}

enum Seg<'m> {
    Arena(usize, usize),
    /// A guest page, read only when the batch is written.
    Page(&'m RamBlock, u64),
}

/// What one page cost on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageSent {
    /// A zero page: a ZERO record, the page itself not sent.
    Zero(u64),
    /// A normal page: its header and its contents.
    Normal(u64),
}

impl PageSent {
    pub(crate) fn bytes(self) -> u64 {
        match self {
            PageSent::Zero(b) | PageSent::Normal(b) => b,
        }
    }
}

impl<'m> Writer<'m> {
    const MAX_SEGS: usize = 1024;
    const MAX_PENDING: usize = 1 << 20;

    /// A writer on `chan` that has already sent `sent` bytes (of the migration, on earlier
    /// channels): the count goes on across a recovery.
    pub(crate) fn new(chan: Arc<Channel>, sent: u64) -> Self {
        Writer {
            chan,
            arena: Vec::with_capacity(64 << 10),
            segs: Vec::with_capacity(Self::MAX_SEGS + 2),
            pending: 0,
            sent,
        }
    }

    pub(crate) fn chan(&self) -> &Arc<Channel> {
        &self.chan
    }

    /// Bytes written so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent
    }

    /// Bytes written or queued.
    pub(crate) fn produced(&self) -> u64 {
        self.sent + self.pending as u64
    }

    /// Appends bytes produced by an encoder.
    pub(crate) fn put(
        &mut self,
        f: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
    ) -> Result<(), SourceError> {
        let start = self.arena.len();
        f(&mut self.arena)?;
        let end = self.arena.len();
        match self.segs.last_mut() {
            Some(Seg::Arena(_, e)) if *e == start => *e = end,
            _ => self.segs.push(Seg::Arena(start, end)),
        }
        self.pending += end - start;
        self.maybe_flush()
    }

    /// The one page encoder: the page at `off` of `block` as a ZERO record when it is a
    /// known hole or reads as zero, else as a page header and the page itself. `name` is
    /// the block's name when the record does not CONTINUE the previous block. None when
    /// `off` is not a page of the block.
    pub(crate) fn page(
        &mut self,
        block: &'m RamBlock,
        off: u64,
        name: Option<&str>,
        hole: bool,
    ) -> Result<Option<PageSent>, SourceError> {
        let Some(page) = block.guest_page(off) else {
            return Ok(None);
        };
        if hole || page.is_zero() {
            return self.zero_page(off, name).map(Some);
        }
        let name_len = name.map_or(0, |n| 1 + n.len() as u64);
        self.put(|o| ram::encode_page_header(o, off, wire::ram::PAGE, name))?;
        self.segs.push(Seg::Page(block, off));
        self.pending += PAGE;
        self.maybe_flush()?;
        Ok(Some(PageSent::Normal(8 + PAGE as u64 + name_len)))
    }

    /// A ZERO record for the page at `off`, which the caller knows is zero (a hole, or
    /// read as zero).
    pub(crate) fn zero_page(
        &mut self,
        off: u64,
        name: Option<&str>,
    ) -> Result<PageSent, SourceError> {
        self.put(|o| ram::encode_zero_page(o, off, name))?;
        Ok(PageSent::Zero(9 + name.map_or(0, |n| 1 + n.len() as u64)))
    }

    /// The one RAM section framer: opens a PART or END section of RAM.
    pub(crate) fn open_ram(&mut self, kind: SectionKind) -> Result<(), SourceError> {
        self.put(|o| {
            stream::encode_section_part(o, kind, RAM_SECTION_ID);
            Ok(())
        })
    }

    /// Closes the RAM section opened by [`Writer::open_ram`]: EOS and the footer.
    pub(crate) fn close_ram(&mut self) -> Result<(), SourceError> {
        self.put(|o| {
            ram::encode_eos(o);
            stream::encode_footer(o, RAM_SECTION_ID);
            Ok(())
        })
    }

    /// A RAM section with no pages (a keepalive in pre-switchover, the last one of
    /// postcopy).
    pub(crate) fn empty_ram(&mut self, kind: SectionKind) -> Result<(), SourceError> {
        self.open_ram(kind)?;
        self.close_ram()
    }

    /// Flushes; then the file offset the stream goes on at (a file channel).
    pub(crate) fn position(&mut self, io: &FileIo) -> Result<u64, SourceError> {
        self.flush()?;
        Ok(io.position()?)
    }

    /// Flushes; then the stream goes on at file offset `pos` (mapped-ram: past a block's
    /// pages region).
    pub(crate) fn seek(&mut self, io: &FileIo, pos: u64) -> Result<(), SourceError> {
        self.flush()?;
        Ok(io.seek(pos)?)
    }

    fn maybe_flush(&mut self) -> Result<(), SourceError> {
        if self.segs.len() >= Self::MAX_SEGS || self.pending >= Self::MAX_PENDING {
            self.flush()?;
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<(), SourceError> {
        if self.segs.is_empty() {
            return Ok(());
        }
        let mut iov = IoVecs::with_capacity(self.segs.len());
        for s in &self.segs {
            match *s {
                Seg::Arena(a, b) => iov.push_bytes(&self.arena[a..b]),
                Seg::Page(block, off) => {
                    // Checked when queued: the page is inside its block.
                    if let Some(p) = block.guest_page(off) {
                        iov.push_page(p);
                    }
                }
            }
        }
        let r = self.chan.write_all_iovecs(&mut iov);
        drop(iov);
        r.map_err(|source| SourceError::Io {
            peer: self.chan.peer.clone(),
            sent: self.sent,
            source,
        })?;
        self.sent += self.pending as u64;
        self.segs.clear();
        self.arena.clear();
        self.pending = 0;
        Ok(())
    }
}

/// QEMU-style rate limit: a byte budget per 100 ms window.
pub(crate) struct Throttle {
    window_start: Instant,
    window_bytes: u64,
}

impl Throttle {
    pub(crate) fn new() -> Self {
        Throttle {
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    /// Counts `bytes`; returns how long to wait when the window's budget is spent.
    pub(crate) fn account(&mut self, bytes: u64, limit_bps: u64) -> Option<Duration> {
        self.window_bytes += bytes;
        if limit_bps == 0 {
            return None;
        }
        let budget = (limit_bps / 10).max(PAGE as u64);
        if self.window_bytes < budget {
            return None;
        }
        let elapsed = self.window_start.elapsed();
        let window = Duration::from_millis(100);
        self.window_start = Instant::now() + window.saturating_sub(elapsed);
        self.window_bytes = 0;
        (elapsed < window).then(|| window - elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The page encoder and the framer produce exactly what the codecs do by hand.
    #[test]
    fn pages_and_sections_as_the_codecs_encode_them() {
        let fd = crate::memory::block::tests::memfd(4 * PAGE as u64);
        let block = RamBlock::new(
            crate::memory::block::tests::spec("ram", 4 * PAGE as u64),
            fd,
        )
        .expect("block");
        block
            .guest_page(PAGE as u64)
            .expect("page")
            .copy_from(&[7u8; PAGE]);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let chan = Arc::new(Channel::from_unix(a, "test".into()));
        let mut w = Writer::new(chan, 10);
        w.open_ram(SectionKind::Part).expect("open");
        let z = w.page(&block, 0, Some("ram"), false).expect("zero");
        let n = w.page(&block, PAGE as u64, None, false).expect("normal");
        let h = w.page(&block, 2 * PAGE as u64, None, true).expect("hole");
        assert_eq!(
            w.page(&block, 4 * PAGE as u64, None, false).expect("out"),
            None
        );
        w.close_ram().expect("close");
        w.flush().expect("flush");
        assert_eq!(z, Some(PageSent::Zero(13)));
        assert_eq!(n, Some(PageSent::Normal(8 + PAGE as u64)));
        assert_eq!(h, Some(PageSent::Zero(9)));

        let mut want = Vec::new();
        stream::encode_section_part(&mut want, SectionKind::Part, RAM_SECTION_ID);
        ram::encode_zero_page(&mut want, 0, Some("ram")).expect("zero");
        ram::encode_page_header(&mut want, PAGE as u64, wire::ram::PAGE, None).expect("hdr");
        want.extend_from_slice(&[7u8; PAGE]);
        ram::encode_zero_page(&mut want, 2 * PAGE as u64, None).expect("zero");
        ram::encode_eos(&mut want);
        stream::encode_footer(&mut want, RAM_SECTION_ID);
        assert_eq!(w.sent(), 10 + want.len() as u64);
        drop(w);
        let mut got = vec![0u8; want.len()];
        b.read_exact(&mut got).expect("read");
        assert_eq!(got, want);
    }

    #[test]
    fn throttle_waits_out_the_window() {
        let mut t = Throttle::new();
        assert_eq!(t.account(1 << 20, 0), None);
        assert_eq!(t.account(1000, 100_000_000), None);
        let w = t.account(10 << 20, 100_000_000).expect("budget spent");
        assert!(w <= Duration::from_millis(100));
    }
}
