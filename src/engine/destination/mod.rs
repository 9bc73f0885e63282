//! The destination engine: loads a QEMU migration stream into the parent's RAM blocks and
//! keeps the device sections byte-exact for `query-device-state`.
//!
//! Device sections of unknown devices can only be delimited with the VM description that a
//! precopy source appends after EOF. When the loader meets the first such section it holds
//! the rest of the stream in memory until the description has arrived (RAM pages normally
//! all come before it), then walks the held bytes with the description.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use crate::compat::wire::{self, command};
use crate::engine::destination::fault::{AtomicBitmap, FaultError, PostcopyDest, RpWriter};
use crate::engine::destination::preempt::PreemptChannel;
use crate::engine::migration::{MigrationCtx, Stats};
use crate::engine::state::MigrationStatus;
use crate::memory::block::RamBlock;
use crate::memory::page_writer::{PageWriteError, PageWriter};
use crate::transport::Channel;
use crate::vmstate::{self, VmDescription};
use crate::wire::device_intake::DeviceIntake;
use crate::wire::device_state::DeviceSection;
use crate::wire::postcopy;
use crate::wire::ram::{self, Record};
use crate::wire::return_path::RpMessage;
use crate::wire::stream::{self, SectionHeader, Token, WireError};

const READ_CHUNK: usize = 4 << 20;
/// Postcopy: the most unplaced stream bytes that reading ahead for requested pages holds.
const ARRIVED_MAX: usize = 512 << 10;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("read from {peer} failed at stream offset {offset}: {source}")]
    Io {
        peer: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("stream ended early at offset {offset} ({context})")]
    Truncated { offset: u64, context: &'static str },
    #[error("at stream offset {offset}: {source}")]
    Wire {
        offset: u64,
        #[source]
        source: WireError,
    },
    #[error("at stream offset {offset}: {msg}")]
    Invalid { offset: u64, msg: String },
    #[error("at stream offset {offset}, section {section:?}: {source}")]
    Device {
        offset: u64,
        section: String,
        #[source]
        source: vmstate::VmStateError,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("recovery: {0}")]
    Recovery(String),
    #[error("link: {0}")]
    Link(String),
    #[error("{0}")]
    State(#[from] crate::engine::state::BadTransition),
}

impl LoadError {
    /// The link broke (read error or EOF), as opposed to a bad stream.
    fn is_link(&self) -> bool {
        matches!(
            self,
            LoadError::Io { .. } | LoadError::Truncated { .. } | LoadError::Link(_)
        )
    }
}

pub mod fault;
mod held;
mod package;
pub mod preempt;
mod reader_ext;

/// A read buffer over any byte source, tracking the absolute stream offset.
struct Reader<R> {
    src: R,
    peer: String,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    eof: bool,
    /// After a read, also take what else has already arrived, up to a full buffer: larger
    /// batches of pages let the page writer use two threads. Off in postcopy, where the
    /// first page of a read may be one a vCPU waits for.
    top_up: bool,
}

impl<R: ReadReady> Reader<R> {
    fn new(src: R, peer: String, cap: usize) -> Self {
        Reader {
            src,
            peer,
            buf: vec![0; cap],
            start: 0,
            end: 0,
            offset: 0,
            eof: false,
            top_up: true,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    /// Reads more; false at the end of the stream.
    fn fill(&mut self) -> Result<bool, LoadError> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 && (self.start >= self.buf.len() / 2 || self.end == self.buf.len()) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // An item larger than the buffer (a big VM description): grow.
            let n = self.buf.len() * 2;
            self.buf.resize(n, 0);
        }
        loop {
            match self.src.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    while self.top_up && self.end < self.buf.len() {
                        match self.src.read_ready(&mut self.buf[self.end..]) {
                            Ok(m) if m > 0 => self.end += m,
                            // Nothing more yet, or an error the next read reports.
                            _ => break,
                        }
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(LoadError::Io {
                        peer: self.peer.clone(),
                        offset: self.offset + (self.end - self.start) as u64,
                        source,
                    })
                }
            }
        }
    }

    /// Appends what has already arrived to the free end of the buffer, without moving or
    /// waiting; true if anything came. Errors are left to the next `fill`.
    fn read_arrived(&mut self) -> bool {
        // Bounded: a backlog that only grows would fill the buffer, and then nothing could
        // be read until all of it was placed.
        if self.eof || self.end == self.buf.len() || self.end - self.start >= ARRIVED_MAX {
            return false;
        }
        match self.src.read_ready(&mut self.buf[self.end..]) {
            Ok(n) if n > 0 => {
                self.end += n;
                true
            }
            _ => false,
        }
    }

    fn need_more(&mut self, context: &'static str) -> Result<(), LoadError> {
        if self.fill()? {
            Ok(())
        } else {
            Err(LoadError::Truncated {
                offset: self.offset + (self.end - self.start) as u64,
                context,
            })
        }
    }
}

impl<R> Reader<R> {
    fn wire(&self, source: WireError) -> LoadError {
        LoadError::Wire {
            offset: self.offset,
            source,
        }
    }
}

/// Decodes the next item with `$dec`, reading more as needed; binds it to `$pat` for `$body`
/// and consumes it afterwards. A macro because the item borrows the reader's buffer.
macro_rules! with_next {
    ($r:expr, $ctx:expr, $dec:expr, |$item:pat_param| $body:expr) => {{
        loop {
            match $dec($r.data()) {
                Ok(Some(($item, n))) => {
                    let out = $body;
                    $r.consume(n);
                    break out;
                }
                Ok(None) => {}
                Err(e) => return Err($r.wire(e)),
            }
            $r.need_more($ctx)?;
        }
    }};
}

/// What ended a pass of the section loop.
enum LoopEnd {
    /// EOF and, where one came, the VM description.
    Done,
    /// A device section needs the VM description (not yet known) to be delimited.
    NeedDescription,
}

/// Loader state shared by the streaming pass and the held-bytes pass.
struct Loader<'a> {
    ctx: &'a MigrationCtx,
    blocks: &'a [Arc<RamBlock>],
    ram_section: Option<u32>,
    last_block: Option<usize>,
    rp: Option<Arc<RpWriter>>,
    devices: Vec<DeviceSection>,
    intake: DeviceIntake,
    bytes: u64,
    /// Per block: pages this destination has (received, or zero and left a hole).
    received: Arc<Vec<AtomicBitmap>>,
    /// The parent's userfaultfd, for postcopy.
    uffd: Option<OwnedFd>,
    /// POSTCOPY_ADVISE came: huge-page blocks carry their page size in the block list.
    advised: bool,
    /// Took over a migration from a helper that died: the RAM section id is learnt from the
    /// first PART after the recovery.
    adopted: bool,
    /// From POSTCOPY_LISTEN on: pages are placed through the userfaultfd.
    postcopy: Option<Arc<PostcopyDest>>,
    fault_thread: Option<std::thread::JoinHandle<()>>,
    fault_error: Arc<Mutex<Option<String>>>,
    /// Postcopy pages waiting for one UFFDIO_COPY.
    staged: Staged,
    /// postcopy-preempt: the listener the preempt channel will connect to, until LISTEN
    /// (or a recovery) starts the thread that takes it.
    preempt_listener: Option<crate::transport::Incoming>,
    preempt: Option<PreemptChannel>,
    /// Stream offset and block context where the next look-ahead for requested pages
    /// starts (see `place_requested_ahead`).
    scan_to: u64,
    scan_block: Option<usize>,
    /// The channel, for the fault thread to shut down when it fails.
    chan_fd: Option<OwnedFd>,
    /// The main channel's timeout record: re-armed with `link-timeout` in postcopy.
    chan_timer: Option<Arc<crate::transport::IoTimer>>,
    last_progress: Instant,
    /// Per block: pages known to read as zero (holes, not written since), so that zero
    /// pages there cost nothing.
    known_zero: Vec<Vec<u64>>,
    /// Pages waiting to be written. They point into the reader's buffer, so they are
    /// flushed before every refill.
    pages: PageWriter,
}

/// Consecutive postcopy pages gathered for one UFFDIO_COPY.
#[derive(Default)]
struct Staged {
    block: usize,
    start: u64,
    data: Vec<u8>,
}

/// Pages per UFFDIO_COPY: large enough to amortise the ioctl, small enough that a requested
/// page behind a run of background pages is placed soon.
const STAGE_PAGES: usize = 32;

impl<'a> Loader<'a> {
    fn stage(
        &mut self,
        pc: &PostcopyDest,
        bi: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<(), FaultError> {
        let page = wire::TARGET_PAGE_SIZE;
        if pc.received[bi].get(offset / page as u64) {
            // Placed already, ahead of the stream (see place_requested_ahead).
            return self.flush_staged_with(pc);
        }
        let next = self.staged.start + self.staged.data.len() as u64;
        if !self.staged.data.is_empty()
            && (self.staged.block != bi
                || next != offset
                || self.staged.data.len() >= STAGE_PAGES * page)
        {
            self.flush_staged_with(pc)?;
        }
        if self.staged.data.is_empty() {
            self.staged.block = bi;
            self.staged.start = offset;
        }
        self.staged.data.extend_from_slice(data);
        // A page a thread waits for is placed now, not when the run is full: QEMU goes on
        // sending the pages after a requested one, so the run would otherwise keep growing.
        if pc.is_requested(bi, offset / page as u64) {
            self.flush_staged_with(pc)?;
        }
        Ok(())
    }

    fn flush_staged_with(&mut self, pc: &PostcopyDest) -> Result<(), FaultError> {
        if self.staged.data.is_empty() {
            return Ok(());
        }
        let r = pc.place_pages(self.staged.block, self.staged.start, &self.staged.data);
        self.staged.data.clear();
        r
    }

    fn flush_staged(&mut self) -> Result<(), FaultError> {
        match self.postcopy.clone() {
            Some(pc) => self.flush_staged_with(&pc),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> Result<(), LoadError> {
        if let Err(e) = self.flush_staged() {
            return Err(LoadError::Invalid {
                offset: 0,
                msg: e.to_string(),
            });
        }
        self.pages.flush().map_err(|e| match e {
            // Offsets were checked when the pages were queued.
            PageWriteError::Outside { .. } => LoadError::Invalid {
                offset: 0,
                msg: e.to_string(),
            },
            PageWriteError::Io { block, source } => LoadError::Io {
                peer: format!("RAM block {block:?}"),
                offset: 0,
                source,
            },
        })
    }

    fn block_index(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.id == name)
    }

    fn invalid<R>(&self, r: &Reader<R>, msg: String) -> LoadError {
        LoadError::Invalid {
            offset: r.offset,
            msg,
        }
    }

    /// Applies one RAM record; returns true at EOS.
    fn apply<R>(&mut self, r: &Reader<R>, rec: Record<'_>) -> Result<bool, LoadError> {
        let (offset, block) = match &rec {
            Record::Eos => return Ok(true),
            Record::MultifdFlush => return Ok(false),
            Record::MemSize { .. } => {
                return Err(self.invalid(r, "block list outside the RAM START section".into()))
            }
            Record::Zero { offset, block, .. } | Record::Page { offset, block, .. } => {
                (*offset, *block)
            }
        };
        let bi = match block {
            Some(name) => {
                let i = self.block_index(name).ok_or_else(|| {
                    self.invalid(r, format!("page for unknown RAM block {name:?}"))
                })?;
                self.last_block = Some(i);
                i
            }
            None => self
                .last_block
                .ok_or_else(|| self.invalid(r, "CONTINUE page with no previous block".into()))?,
        };
        let b = &self.blocks[bi];
        let page = offset / wire::TARGET_PAGE_SIZE as u64;
        let in_block = offset % wire::TARGET_PAGE_SIZE as u64 == 0 && offset < b.size;
        if !in_block {
            return Err(self.invalid(
                r,
                format!(
                    "page offset {offset:#x} is outside RAM block {:?} of size {:#x}",
                    b.id, b.size
                ),
            ));
        }
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        if let Some(pc) = self.postcopy.clone() {
            // Postcopy: place atomically in the parent's mapping, waking faulting threads.
            let placed = match rec {
                Record::Zero { fill: 0, .. } => {
                    Stats::add(&self.ctx.stats.duplicate, 1);
                    self.flush_staged().and_then(|()| pc.place_zero(bi, offset))
                }
                Record::Zero { fill, .. } => {
                    Stats::add(&self.ctx.stats.duplicate, 1);
                    self.flush_staged()
                        .and_then(|()| pc.place_page(bi, offset, &[fill; wire::TARGET_PAGE_SIZE]))
                }
                Record::Page { data, .. } => {
                    Stats::add(&self.ctx.stats.normal, 1);
                    self.stage(&pc, bi, offset, data)
                }
                _ => Ok(()),
            };
            return placed
                .map(|()| false)
                .map_err(|e| self.invalid(r, e.to_string()));
        }
        match rec {
            Record::Zero { fill, .. } => {
                Stats::add(&self.ctx.stats.duplicate, 1);
                let known = self.known_zero[bi].get(w).is_some_and(|x| x & bit != 0);
                if !(known && fill == 0) {
                    // The page may be in the pending run: write that first.
                    self.flush()?;
                    b.fill_page(offset, fill);
                }
            }
            Record::Page { data, .. } => {
                Stats::add(&self.ctx.stats.normal, 1);
                // A page that is not a hole exists already: the writer copies straight into
                // it instead of allocating.
                let mut present = true;
                if let Some(x) = self.known_zero[bi].get_mut(w) {
                    present = *x & bit == 0;
                    *x &= !bit;
                }
                // Written at the next flush, before the reader's buffer changes.
                let queued = self
                    .pages
                    .queue(&self.blocks[bi], offset, data.as_ptr(), present);
                if let Err(e) = queued {
                    return Err(self.invalid(r, e.to_string()));
                }
            }
            _ => {}
        }
        self.received[bi].set(page);
        Ok(false)
    }

    /// Postcopy: places the pages that threads of the parent wait for among those already
    /// read, before the rest are placed in stream order. A requested page arrives behind a
    /// full socket buffer of background pages (QEMU's is about 200 KiB, read in one go);
    /// this places it as soon as it is read instead of after all of them. The scan only
    /// follows RAM records and the footers and headers of RAM sections and stops at anything
    /// else; it reports nothing, as the in-order pass validates every record again (and
    /// skips the pages placed here).
    fn place_requested_ahead<R: ReadReady>(&mut self, r: &Reader<R>) {
        let Some(pc) = self.postcopy.clone() else {
            return;
        };
        if !pc.anyone_waiting() {
            return;
        }
        // A staged run holding a page that was requested after it was staged.
        let staged_pages = self.staged.data.len() / wire::TARGET_PAGE_SIZE;
        let first = self.staged.start / wire::TARGET_PAGE_SIZE as u64;
        if (0..staged_pages as u64).any(|i| pc.is_requested(self.staged.block, first + i))
            && self.flush_staged_with(&pc).is_err()
        {
            return;
        }
        let data = r.data();
        // Go on from where the last scan stopped, unless the in-order pass is past it.
        let (mut pos, mut block) =
            if self.scan_to > r.offset && self.scan_to - r.offset <= data.len() as u64 {
                ((self.scan_to - r.offset) as usize, self.scan_block)
            } else {
                (0, self.last_block)
            };
        loop {
            self.scan_to = r.offset + pos as u64;
            self.scan_block = block;
            let Ok(Some((rec, n))) = ram::decode_record(&data[pos..]) else {
                return;
            };
            pos += n;
            let (offset, name) = match rec {
                Record::Page { offset, block, .. } | Record::Zero { offset, block, .. } => {
                    (offset, block)
                }
                Record::Eos => {
                    // Optional footer, then this RAM section's next header, or stop.
                    if data.get(pos) == Some(&wire::section::FOOTER) {
                        pos += 5;
                    }
                    let rest = data.get(pos..).unwrap_or(&[]);
                    let part = rest.len() >= 5
                        && rest[0] == wire::section::PART
                        && Some(u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]))
                            == self.ram_section;
                    if !part {
                        return;
                    }
                    pos += 5;
                    continue;
                }
                _ => return,
            };
            // The same checks as the in-order pass (`apply`); any doubt stops the scan.
            let bi = match name {
                Some(n) => self.block_index(n),
                None => block,
            };
            let Some(bi) = bi else { return };
            block = Some(bi);
            if offset % wire::TARGET_PAGE_SIZE as u64 != 0 || offset >= self.blocks[bi].size {
                return;
            }
            if !pc.is_requested(bi, offset / wire::TARGET_PAGE_SIZE as u64) {
                continue;
            }
            let placed = match rec {
                Record::Page { data, .. } => pc.place_page(bi, offset, data),
                Record::Zero { fill: 0, .. } => pc.place_zero(bi, offset),
                Record::Zero { fill, .. } => {
                    pc.place_page(bi, offset, &[fill; wire::TARGET_PAGE_SIZE])
                }
                _ => Ok(()),
            };
            if placed.is_err() {
                // The in-order pass meets the same page and reports the error.
                return;
            }
        }
    }

    fn ram_body<R: ReadReady>(&mut self, r: &mut Reader<R>) -> Result<(), LoadError> {
        let start = r.offset;
        self.place_requested_ahead(r);
        let mut records = 0u32;
        let result = loop {
            match ram::decode_record(r.data()) {
                Ok(Some((rec, n))) => {
                    let eos = self.apply(r, rec);
                    r.consume(n);
                    // Postcopy: look at the socket every few pages, so that a requested
                    // page that arrives while these are placed is placed at once.
                    records = records.wrapping_add(1);
                    if records % 8 == 0
                        && self.postcopy.as_ref().is_some_and(|p| p.anyone_waiting())
                        && r.read_arrived()
                    {
                        self.place_requested_ahead(r);
                    }
                    match eos {
                        Ok(true) => break Ok(()),
                        Ok(false) => continue,
                        Err(e) => break Err(e),
                    }
                }
                Ok(None) => {}
                Err(e) => break Err(r.wire(e)),
            }
            // The pending run points into the buffer that a refill moves.
            if let Err(e) = self.flush() {
                break Err(e);
            }
            if let Err(e) = r.need_more("in a RAM section") {
                break Err(e);
            }
            self.place_requested_ahead(r);
        };
        let flushed = self.flush();
        self.bytes += r.offset - start;
        result.and(flushed)
    }

    fn ram_start<R: ReadReady>(
        &mut self,
        r: &mut Reader<R>,
        h: &SectionHeader,
    ) -> Result<(), LoadError> {
        if h.version_id != wire::ram::VERSION || h.instance_id != 0 {
            return Err(self.invalid(
                r,
                format!(
                    "RAM section version {} instance {} (expected 4, 0)",
                    h.version_id, h.instance_id
                ),
            ));
        }
        if self.ram_section.is_some() {
            return Err(self.invalid(r, "a second RAM START section".into()));
        }
        self.ram_section = Some(h.section_id);
        let total = with_next!(
            r,
            "in the RAM block list",
            ram::decode_record,
            |rec| match rec {
                Record::MemSize { total } => total,
                other =>
                    return Err(self.invalid(
                        r,
                        format!("RAM START begins with {other:?}, not the block list")
                    )),
            }
        );
        let mut seen = 0u64;
        let mut names = Vec::new();
        while seen < total {
            let blocks = self.blocks;
            let advised = self.advised;
            let e = with_next!(
                r,
                "in the RAM block list",
                |b| ram::decode_block_entry(b, &|name: &str| {
                    advised
                        && blocks
                            .iter()
                            .any(|x| x.id == name && x.page_size != wire::TARGET_PAGE_SIZE as u64)
                }),
                |e| e
            );
            let Some(b) = blocks.iter().find(|b| b.id == e.idstr) else {
                let known: Vec<&str> = blocks.iter().map(|b| b.id.as_str()).collect();
                return Err(self.invalid(
                    r,
                    format!("the source has RAM block {:?}, which is not registered here (registered: {known:?})", e.idstr),
                ));
            };
            if b.size != e.used_length {
                return Err(self.invalid(
                    r,
                    format!(
                        "RAM block {:?} is {:#x} bytes at the source and {:#x} here",
                        e.idstr, e.used_length, b.size
                    ),
                ));
            }
            seen = seen
                .checked_add(e.used_length)
                .filter(|&s| s <= total)
                .ok_or_else(|| {
                    self.invalid(r, "RAM block lengths exceed the announced total".into())
                })?;
            names.push(e.idstr);
        }
        slog::info!(self.ctx.log, "RAM block list"; "blocks" => format!("{names:?}"), "total" => total);
        self.ram_body(r)
    }

    fn send_rp(&mut self, m: RpMessage<'_>) -> Result<(), LoadError> {
        if let Some(rp) = &self.rp {
            // A return path that cannot be written is a broken link (postcopy pauses on it).
            rp.send(&m).map_err(|e| LoadError::Link(e.to_string()))?;
        }
        Ok(())
    }

    fn command<R>(
        &mut self,
        r: &Reader<R>,
        chan: Option<&Channel>,
        cmd: u16,
        payload: &[u8],
    ) -> Result<(), LoadError> {
        match cmd {
            command::OPEN_RETURN_PATH => {
                let Some(c) = chan.filter(|c| c.is_socket) else {
                    return Err(self.invalid(
                        r,
                        "OPEN_RETURN_PATH on a channel that is not a socket".into(),
                    ));
                };
                let fd = c.try_clone_fd().map_err(|source| LoadError::Io {
                    peer: c.peer.clone(),
                    offset: r.offset,
                    source,
                })?;
                self.rp = Some(Arc::new(RpWriter::new(
                    Channel::from_fd("return-path", fd)
                        .map_err(|e| self.invalid(r, e.to_string()))?,
                )));
            }
            command::PING => {
                let v = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                self.send_rp(RpMessage::Pong(v))?;
            }
            command::SWITCHOVER_START => {}
            command::POSTCOPY_ADVISE => self.advise(r, payload)?,
            command::POSTCOPY_RAM_DISCARD => self.discard(r, payload)?,
            other => {
                return Err(
                    self.invalid(r, format!("unexpected command {other} in a precopy stream"))
                )
            }
        }
        Ok(())
    }

    fn advise<R>(&mut self, r: &Reader<R>, payload: &[u8]) -> Result<(), LoadError> {
        let Some(a) = postcopy::decode_advise(payload).map_err(|e| r.wire(e))? else {
            // Only dirty bitmaps are advised: nothing to prepare for RAM.
            return Ok(());
        };
        if a.target_page_size != wire::TARGET_PAGE_SIZE as u64 {
            return Err(self.invalid(
                r,
                format!(
                    "postcopy target page size {} (this helper has 4096)",
                    a.target_page_size
                ),
            ));
        }
        let local = self.blocks.iter().fold(0, |acc, b| acc | b.page_size);
        if a.page_size_summary != local {
            return Err(self.invalid(
                r,
                format!(
                    "postcopy needs matching RAM page sizes: the source has {:#x}, this side {local:#x}",
                    a.page_size_summary
                ),
            ));
        }
        if self.uffd.is_none() {
            return Err(self.invalid(r, FaultError::NoUserfaultfd.to_string()));
        }
        if let Some(b) = self.blocks.iter().find(|b| b.host_addr.is_none()) {
            return Err(self.invalid(r, FaultError::NoHostAddr(b.id.clone()).to_string()));
        }
        if self.rp.is_none() {
            return Err(self.invalid(r, "POSTCOPY_ADVISE without a return path".into()));
        }
        self.advised = true;
        Ok(())
    }

    /// Punches the discarded ranges out of the memfds: the parent's next access faults and
    /// the page is requested from the source.
    fn discard<R>(&mut self, r: &Reader<R>, payload: &[u8]) -> Result<(), LoadError> {
        if !self.advised {
            return Err(self.invalid(r, "POSTCOPY_RAM_DISCARD without POSTCOPY_ADVISE".into()));
        }
        let d = postcopy::decode_discard(payload).map_err(|e| r.wire(e))?;
        let bi = self.block_index(d.block).ok_or_else(|| {
            self.invalid(r, format!("discard for unknown RAM block {:?}", d.block))
        })?;
        let b = self.blocks[bi].clone();
        for (off, len) in d.ranges {
            let page = wire::TARGET_PAGE_SIZE as u64;
            let end = off.checked_add(len);
            if off % page != 0 || len % page != 0 || end.is_none_or(|e| e > b.size) {
                return Err(self.invalid(
                    r,
                    format!(
                        "discard range {off:#x}+{len:#x} is outside RAM block {:?} of size {:#x}",
                        b.id, b.size
                    ),
                ));
            }
            b.punch_hole(off, len)
                .map_err(|e| self.invalid(r, format!("discard in {:?}: {e}", b.id)))?;
            // A word at a time: ranges come from the stream, up to the whole block each.
            for (w, mask) in
                crate::engine::source::rp_reader::word_masks(off / page, (off + len) / page)
            {
                self.received[bi].clear_mask(w, mask);
                if let Some(z) = self.known_zero[bi].get_mut(w) {
                    *z |= mask;
                }
            }
        }
        Ok(())
    }

    /// POSTCOPY_LISTEN: from here pages go through the userfaultfd and faults are served.
    fn listen<R>(&mut self, r: &Reader<R>) -> Result<(), LoadError> {
        if !self.advised {
            return Err(self.invalid(r, "POSTCOPY_LISTEN without POSTCOPY_ADVISE".into()));
        }
        if self.postcopy.is_some() {
            return Err(self.invalid(r, "a second POSTCOPY_LISTEN".into()));
        }
        let (Some(uffd), Some(rp)) = (self.uffd.take(), self.rp.clone()) else {
            return Err(self.invalid(r, FaultError::NoUserfaultfd.to_string()));
        };
        let pc = Arc::new(
            PostcopyDest::new(
                self.blocks.to_vec(),
                uffd,
                rp,
                self.ctx.latency.clone(),
                self.ctx.stats.postcopy_requests.clone(),
                self.received.clone(),
                self.ctx.log.clone(),
            )
            .map_err(|e| self.invalid(r, e.to_string()))?,
        );
        let (t, err, log) = (pc.clone(), self.fault_error.clone(), self.ctx.log.clone());
        // On a fault-handling error the loader may be blocked reading the stream: shutting
        // the channel down wakes it, and the fault error is what gets reported.
        let wake = self.chan_fd.as_ref().and_then(|f| f.try_clone().ok());
        let h = std::thread::Builder::new()
            .name("qmh-faults".into())
            .spawn(move || {
                if let Err(e) = t.run() {
                    slog::error!(log, "fault handling stopped"; "error" => %e);
                    *err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                    if let Some(fd) = &wake {
                        crate::transport::shutdown_fd(fd);
                    }
                }
            })
            .map_err(|e| self.invalid(r, format!("cannot start the fault thread: {e}")))?;
        self.fault_thread = Some(h);
        if let Some(incoming) = self.preempt_listener.take() {
            self.start_preempt(incoming, &pc)
                .map_err(|e| self.invalid(r, e))?;
        }
        self.postcopy = Some(pc);
        self.arm_link_timeout();
        slog::info!(self.ctx.log, "postcopy listening");
        Ok(())
    }

    /// The PACKAGED command: LISTEN, the device sections, PINGs and RUN, in one blob.
    fn package<R: ReadReady>(&mut self, r: &mut Reader<R>, len: u32) -> Result<(), LoadError> {
        // Whether a package may come at all is known before reading it: QEMU only takes
        // its LISTEN after ADVISE and before any other LISTEN. Checked first, so that a
        // stream that never advised postcopy cannot make the helper buffer a package.
        crate::engine::destination::package::check_before_buffering(
            len,
            self.advised,
            self.postcopy.is_some(),
        )
        .map_err(|e| self.invalid(r, e))?;
        let len = len as usize;
        r.reserve_exact(len);
        while r.data().len() < len {
            r.need_more("in the postcopy package")?;
        }
        let blob = &r.data()[..len];
        let pkg = postcopy::decode_package(blob).map_err(|e| r.wire(e))?;
        let sections = crate::engine::destination::package::sections(pkg.devices, &mut self.intake)
            .map_err(|e| self.invalid(r, e))?;
        let pings = pkg.pings;
        r.consume(len);
        r.shrink_to(READ_CHUNK);
        self.listen(r)?;
        r.top_up = false;
        self.devices.extend(sections);
        // The parent needs the device state before it starts its vCPUs. Moved, not copied:
        // the sections are the largest thing a destination holds.
        self.ctx
            .device_in
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(&mut self.devices);
        for v in pings {
            self.send_rp(RpMessage::Pong(v))?;
        }
        // POSTCOPY_RUN: the parent may start its vCPUs.
        self.ctx.state.transition(MigrationStatus::PostcopyActive)?;
        Ok(())
    }

    /// In postcopy a link with no traffic for `link-timeout` is dead (the source pings; a
    /// QEMU source pushes pages without pause): reads and writes time out instead of hanging.
    fn arm_link_timeout(&self) {
        let t = self.ctx.params().link_timeout;
        let t = (t > 0).then(|| std::time::Duration::from_millis(t));
        if let Some(fd) = &self.chan_fd {
            crate::transport::set_socket_timeouts(fd, t);
        }
        if let Some(timer) = &self.chan_timer {
            timer.set(t, crate::transport::TimeoutParam::Link);
        }
    }

    /// Postcopy-paused until a recovery succeeds and the rest of the stream has loaded.
    /// Starts taking the postcopy-preempt channel on `incoming`.
    fn start_preempt(
        &mut self,
        incoming: crate::transport::Incoming,
        pc: &Arc<PostcopyDest>,
    ) -> Result<(), String> {
        if let Some(b) = self
            .blocks
            .iter()
            .find(|b| b.page_size != wire::TARGET_PAGE_SIZE as u64)
        {
            return Err(format!(
                "postcopy-preempt is not supported with huge-page RAM block {:?}",
                b.id
            ));
        }
        let p = PreemptChannel::spawn(
            incoming,
            pc.clone(),
            self.blocks.to_vec(),
            self.ctx.stats.postcopy_preempt_pages.clone(),
            self.chan_fd.as_ref().and_then(|f| f.try_clone().ok()),
            self.ctx.log.clone(),
        )
        .map_err(|e| format!("cannot start the postcopy-preempt thread: {e}"))?;
        self.preempt = Some(p);
        Ok(())
    }

    /// Before SHUT: every requested page must be in place, and some may still be on the
    /// preempt channel (the source closes it only after SHUT). Then stops reading it.
    fn finish_preempt(&mut self) -> Result<(), LoadError> {
        let Some(p) = self.preempt.take() else {
            return Ok(());
        };
        if let Some(pc) = &self.postcopy {
            let limit = std::time::Duration::from_millis(self.ctx.params().link_timeout.max(1000));
            let t = Instant::now();
            while pc.missing_requested() > 0 {
                if t.elapsed() > limit {
                    // Never fail here: neither side has the whole guest. Treated as a
                    // broken link, this pauses, and a recovery sends what is missing.
                    let n = pc.missing_requested();
                    let _ = p.stop();
                    // Let the source see the pause too (it waits for SHUT).
                    if let Some(fd) = &self.chan_fd {
                        crate::transport::shutdown_fd(fd);
                    }
                    return Err(LoadError::Link(format!(
                        "{n} requested pages had not arrived on either channel {} ms after the end of the stream",
                        limit.as_millis()
                    )));
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        let _ = p.stop();
        Ok(())
    }

    fn pause_and_recover(&mut self, why: String) -> Result<(), LoadError> {
        // The source closes the preempt channel too when it pauses.
        if let Some(p) = self.preempt.take() {
            let _ = p.stop();
        }
        let ctx = self.ctx;
        ctx.pauses.fetch_add(1, Ordering::Relaxed);
        slog::warn!(ctx.log, "postcopy link failed: paused"; "error" => &why);
        ctx.state.transition(MigrationStatus::PostcopyPaused)?;
        self.wait_and_recover()
    }

    /// In postcopy-paused: takes recoveries until one succeeds and the stream has loaded.
    fn wait_and_recover(&mut self) -> Result<(), LoadError> {
        let ctx = self.ctx;
        loop {
            let Some(rec) = ctx.wait_recovery() else {
                return Err(LoadError::Cancelled);
            };
            let crate::engine::migration::Recovery::Destination(incoming) = rec else {
                continue;
            };
            match self.recover_on(incoming) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_link() || matches!(e, LoadError::Recovery(_)) => {
                    let phase = if ctx.state.status() == MigrationStatus::PostcopyActive {
                        "postcopy link failed: paused"
                    } else {
                        "postcopy recovery failed: paused again"
                    };
                    slog::warn!(ctx.log, "{}", phase; "error" => %e);
                    if ctx.state.status() != MigrationStatus::PostcopyPaused {
                        ctx.state.transition(MigrationStatus::PostcopyPaused)?;
                    }
                    ctx.pauses.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes the new channel, answers the source's RECV_BITMAPs and POSTCOPY_RESUME, asks
    /// again for the pages still pending, and loads the rest of the stream.
    fn recover_on(&mut self, incoming: crate::transport::Incoming) -> Result<(), LoadError> {
        let ctx = self.ctx;
        // With postcopy-preempt the source connects a new preempt channel after the main
        // one, to the same address.
        let preempt = ctx.caps().postcopy_preempt && incoming.is_listener();
        let (chan, incoming) = if preempt {
            let c = incoming.accept_another(&ctx.cancel);
            (c, Some(incoming))
        } else {
            (incoming.accept(&ctx.cancel), None)
        };
        let chan = chan
            .map_err(|e| LoadError::Recovery(e.to_string()))?
            .with_cancel(ctx.cancel.clone());

        let t0 = Instant::now();
        if !chan.is_socket {
            return Err(LoadError::Recovery(format!(
                "{} is not a socket",
                chan.peer
            )));
        }
        let dup = |c: &Channel| {
            c.try_clone_fd()
                .map_err(|e| LoadError::Recovery(e.to_string()))
        };
        ctx.set_channel(Some(dup(&chan)?));
        self.chan_fd = Some(dup(&chan)?);
        self.chan_timer = Some(chan.timer());
        if let (Some(incoming), Some(pc)) = (incoming, self.postcopy.clone()) {
            if let Some(old) = self.preempt.take() {
                let _ = old.stop();
            }
            self.start_preempt(incoming, &pc)
                .map_err(LoadError::Recovery)?;
        }
        self.arm_link_timeout();
        let (Some(rp), Some(pc)) = (self.rp.clone(), self.postcopy.clone()) else {
            return Err(LoadError::Recovery("no postcopy to recover".into()));
        };
        rp.replace(
            Channel::from_fd("return-path", dup(&chan)?)
                .map_err(|e| LoadError::Recovery(e.to_string()))?,
        );
        ctx.state.transition(MigrationStatus::PostcopyRecover)?;
        let mut r = Reader::new(&chan, chan.peer.clone(), READ_CHUNK);
        // Recovery happens only in postcopy: read what comes, do not gather.
        r.top_up = false;
        // No header on a recovery channel: RECV_BITMAP per block, then POSTCOPY_RESUME.
        loop {
            let (cmd, payload) = with_next!(
                r,
                "in the recovery handshake",
                stream::decode_token,
                |t| match t {
                    Token::Command(c) => (c.cmd, c.payload.to_vec()),
                    other => {
                        return Err(LoadError::Recovery(format!(
                            "expected RECV_BITMAP or POSTCOPY_RESUME, got {other:?}"
                        )));
                    }
                }
            );
            match cmd {
                command::RECV_BITMAP => {
                    let mut c = stream::Cursor::new(&payload);
                    let name = c
                        .str8("block name")
                        .map_err(|e| r.wire(e))?
                        .ok_or_else(|| {
                            LoadError::Recovery("RECV_BITMAP without a block name".into())
                        })?;
                    let bi = self.block_index(name).ok_or_else(|| {
                        LoadError::Recovery(format!("RECV_BITMAP for unknown RAM block {name:?}"))
                    })?;
                    rp.send_bitmap(name, &self.received[bi].words())
                        .map_err(|e| LoadError::Recovery(e.to_string()))?;
                }
                command::POSTCOPY_RESUME => {
                    rp.send(&RpMessage::ResumeAck(1))
                        .map_err(|e| LoadError::Recovery(e.to_string()))?;
                    break;
                }
                other => {
                    return Err(LoadError::Recovery(format!(
                        "unexpected command {other} during recovery"
                    )))
                }
            }
        }
        ctx.state.transition(MigrationStatus::PostcopyActive)?;
        ctx.record_recovery(t0.elapsed());
        slog::info!(ctx.log, "postcopy recovered"; "ms" => t0.elapsed().as_secs_f64() * 1000.0);
        // The source forgot the requests of the old link.
        self.last_block = None;
        pc.resend_pending();
        match self.sections(&mut r, None, None)? {
            LoopEnd::Done => Ok(()),
            LoopEnd::NeedDescription => Err(LoadError::Recovery(
                "device sections after a postcopy recovery".into(),
            )),
        }
    }

    /// A progress line for operators, about once a second during long loads.
    fn log_progress(&mut self, offset: u64) {
        if self.last_progress.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        self.last_progress = Instant::now();
        let st = &self.ctx.stats;
        slog::info!(self.ctx.log, "progress";
            "received" => offset,
            "pages" => st.normal.load(Ordering::Relaxed),
            "zero_pages" => st.duplicate.load(Ordering::Relaxed),
            "postcopy_requests" => st.postcopy_requests.load(Ordering::Relaxed),
        );
    }

    fn check_faults<R>(&self, r: &Reader<R>) -> Result<(), LoadError> {
        match self
            .fault_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            Some(e) => Err(self.invalid(r, format!("postcopy fault handling: {e}"))),
            None => Ok(()),
        }
    }

    fn stop_faults(&mut self) {
        if let Some(p) = self.preempt.take() {
            let _ = p.stop();
        }
        if let Some(pc) = &self.postcopy {
            pc.stop();
        }
        if let Some(h) = self.fault_thread.take() {
            let _ = h.join();
        }
    }

    /// Loads sections until EOF (and the VM description after it).
    fn sections<R: ReadReady>(
        &mut self,
        r: &mut Reader<R>,
        chan: Option<&Channel>,
        desc: Option<&VmDescription>,
    ) -> Result<LoopEnd, LoadError> {
        loop {
            if self.ctx.cancelled() {
                return Err(LoadError::Cancelled);
            }
            self.check_faults(r)?;
            self.log_progress(r.offset);
            // Peek the token without consuming, so a device section can be handed over whole.
            let token = loop {
                match stream::decode_token(r.data()) {
                    Ok(Some((t, n))) => break Some((owned_token(t), n)),
                    Ok(None) => {}
                    Err(e) => return Err(r.wire(e)),
                }
                if !r.fill()? {
                    break None;
                }
            };
            let Some((token, n)) = token else {
                return Err(LoadError::Truncated {
                    offset: r.offset + r.data().len() as u64,
                    context: "between sections",
                });
            };
            match token {
                OwnedToken::Start(h) if h.idstr == wire::ram::IDSTR => {
                    r.consume(n);
                    self.ram_start(r, &h)?;
                    self.footer(r, h.section_id)?;
                }
                OwnedToken::Part(id) | OwnedToken::End(id) => {
                    if self.adopted && self.ram_section.is_none() {
                        self.ram_section = Some(id);
                    }
                    if Some(id) != self.ram_section {
                        return Err(self.invalid(
                            r,
                            format!("PART/END for section {id}, which was never started"),
                        ));
                    }
                    r.consume(n);
                    self.ram_body(r)?;
                    self.footer(r, id)?;
                }
                OwnedToken::Start(h) | OwnedToken::Full(h) => {
                    let Some(desc) = desc else {
                        return Ok(LoopEnd::NeedDescription);
                    };
                    r.consume(n);
                    self.device_section(r, h, n, desc)?;
                }
                OwnedToken::Command(command::PACKAGED, payload) => {
                    r.consume(n);
                    let len = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    self.package(r, len)?;
                }
                OwnedToken::Command(cmd, payload) => {
                    r.consume(n);
                    self.command(r, chan, cmd, &payload)?;
                }
                OwnedToken::VmDescription => {
                    return Err(self.invalid(r, "VM description before EOF".into()));
                }
                OwnedToken::Eof => {
                    r.consume(n);
                    // A precopy source sends its VM description after EOF and then waits;
                    // a postcopy source sends none.
                    if desc.is_none() && self.postcopy.is_none() {
                        loop {
                            match stream::decode_token(r.data()) {
                                Ok(Some((Token::VmDescription(_), m))) => {
                                    r.consume(m);
                                    break;
                                }
                                Ok(Some(_)) => {
                                    return Err(self.invalid(
                                        r,
                                        "data after EOF that is not a VM description".into(),
                                    ))
                                }
                                Ok(None) => {}
                                Err(e) => return Err(r.wire(e)),
                            }
                            if !r.fill()? {
                                if r.data().is_empty() {
                                    break;
                                }
                                return Err(LoadError::Truncated {
                                    offset: r.offset,
                                    context: "in the VM description",
                                });
                            }
                        }
                    }
                    return Ok(LoopEnd::Done);
                }
            }
        }
    }

    fn footer<R: ReadReady>(&mut self, r: &mut Reader<R>, id: u32) -> Result<(), LoadError> {
        with_next!(
            r,
            "at a section footer",
            |b| stream::decode_footer(b, id),
            |_x| ()
        );
        Ok(())
    }

    /// A device section whose header (`hlen` bytes) was just consumed.
    fn device_section<R: ReadReady>(
        &mut self,
        r: &mut Reader<R>,
        h: SectionHeader,
        hlen: usize,
        desc: &VmDescription,
    ) -> Result<(), LoadError> {
        let offset = r.offset - hlen as u64;
        let dev_err = |source| LoadError::Device {
            offset,
            section: h.idstr.clone(),
            source,
        };
        let d = desc
            .device(&h.idstr, h.instance_id)
            .ok_or_else(|| LoadError::Invalid {
                offset,
                msg: format!(
                    "device section {:?} instance {} is not in the VM description",
                    h.idstr, h.instance_id
                ),
            })?;
        self.intake
            .admit(&h)
            .map_err(|e| self.invalid(r, e.to_string()))?;
        let blen = loop {
            match vmstate::body_len(d, r.data()) {
                Ok(n) if r.data().len() >= n + 5 => break n,
                Ok(_) => {}
                Err(e) if e.is_truncated() => {}
                Err(e) => return Err(dev_err(e)),
            }
            r.need_more("in a device section")?;
        };
        let body = &r.data()[..blen];
        let mut sec = DeviceSection::from_body(h.clone(), body).map_err(|e| r.wire(e))?;
        self.intake.describe(&mut sec, d);
        r.consume(blen);
        self.footer(r, h.section_id)?;
        // Keep the original framing bytes: `from_body` re-encodes the same header, so the
        // raw bytes equal what was read.
        self.devices.push(sec);
        Ok(())
    }
}

/// A token detached from the read buffer.
enum OwnedToken {
    Eof,
    Start(SectionHeader),
    Full(SectionHeader),
    Part(u32),
    End(u32),
    Command(u16, Vec<u8>),
    VmDescription,
}

fn owned_token(t: Token<'_>) -> OwnedToken {
    match t {
        Token::Eof => OwnedToken::Eof,
        Token::Start(h) => OwnedToken::Start(h),
        Token::Full(h) => OwnedToken::Full(h),
        Token::Part(i) => OwnedToken::Part(i),
        Token::End(i) => OwnedToken::End(i),
        Token::Command(c) => OwnedToken::Command(c.cmd, c.payload.to_vec()),
        Token::VmDescription(_) => OwnedToken::VmDescription,
    }
}

/// Reads a stream from `src` into `blocks`. `chan` is the socket (for the return path), if any.
pub fn load<R: ReadReady>(
    ctx: &MigrationCtx,
    blocks: &[Arc<RamBlock>],
    src: R,
    peer: String,
    chan: Option<&Channel>,
    uffd: Option<OwnedFd>,
    preempt: Option<crate::transport::Incoming>,
) -> Result<Vec<DeviceSection>, LoadError> {
    let t0 = Instant::now();
    let mut r = Reader::new(src, peer, READ_CHUNK);
    let mut loader = Loader::new(ctx, blocks, uffd, chan);
    loader.preempt_listener = preempt;
    let result = load_inner(&mut loader, &mut r, chan);
    finish(&mut loader, result, t0, r.offset)
}

/// Ends a load: recovers from link failures in postcopy, finishes postcopy, and tells the
/// source how it went (SHUT).
fn finish(
    loader: &mut Loader<'_>,
    mut result: Result<(), LoadError>,
    t0: Instant,
    offset: u64,
) -> Result<Vec<DeviceSection>, LoadError> {
    let ctx = loader.ctx;
    if result.is_ok() {
        result = loader.finish_preempt();
    }
    // In postcopy a broken link pauses: neither side has the whole guest. That includes
    // the SHUT at the very end: the source must hear it to complete, so a link that dies
    // just then is recovered too (the source then has nothing left but EOF).
    loop {
        match &result {
            Ok(()) => match loader.send_rp(RpMessage::Shut(0)) {
                Ok(()) => break,
                Err(e) => result = Err(e),
            },
            Err(e) => {
                let fault_failed = loader
                    .fault_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some();
                if loader.postcopy.is_none() || !e.is_link() || ctx.cancelled() || fault_failed {
                    break;
                }
                let why = e.to_string();
                result = loader.pause_and_recover(why);
            }
        }
    }
    // A fault-handling failure is the cause of whatever the loader saw after it.
    if result.is_err() {
        if let Some(e) = loader
            .fault_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            result = Err(LoadError::Invalid {
                offset,
                msg: format!("postcopy fault handling: {e}"),
            });
        }
    }
    // Every page has arrived (or the load failed): the fault thread's work is over.
    if result.is_ok() {
        if let Some(pc) = &loader.postcopy {
            pc.finish();
        }
    }
    loader.stop_faults();
    match &result {
        Ok(()) => {
            let secs = t0.elapsed().as_secs_f64();
            slog::info!(ctx.log, "migration summary";
                "role" => "destination",
                "bytes" => offset,
                "pages" => ctx.stats.normal.load(Ordering::Relaxed),
                "zero_pages" => ctx.stats.duplicate.load(Ordering::Relaxed),
                "secs" => secs,
                "rate_mbps" => offset as f64 * 8.0 / secs.max(1e-9) / 1e6,
                "device_sections" => loader.devices.len(),
                "postcopy" => loader.postcopy.is_some(),
                "postcopy_requests" => ctx.stats.postcopy_requests.load(Ordering::Relaxed),
                "postcopy_pauses" => ctx.pauses.load(Ordering::Relaxed),
            );
        }
        Err(_) => {
            // Tell a waiting source that loading failed, as QEMU does.
            let _ = loader.send_rp(RpMessage::Shut(1));
        }
    }
    result.map(|()| std::mem::take(&mut loader.devices))
}

/// A new helper takes over a postcopy migration whose destination helper died: the parent
/// passed the same memfds (and its userfaultfd). What has been received is what the memfds
/// hold: after the discards, a page is data in the memfd only if it arrived (a zero page
/// left as a hole is asked for again, harmlessly). Then it waits in postcopy-paused for
/// `migrate-recover`.
pub fn adopt(
    ctx: &MigrationCtx,
    blocks: Vec<Arc<RamBlock>>,
    uffd: OwnedFd,
) -> Result<(), LoadError> {
    let t0 = Instant::now();
    let mut loader = Loader::new(ctx, &blocks, Some(uffd), None);
    for (bi, b) in blocks.iter().enumerate() {
        let holes = b.hole_bitmap();
        for p in 0..b.pages() {
            if holes
                .get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) == 0)
            {
                loader.received[bi].set(p);
            }
        }
    }
    loader.advised = true;
    loader.adopted = true;
    // The return path comes with the recovery channel.
    let (placeholder, _) =
        std::os::unix::net::UnixStream::pair().map_err(|source| LoadError::Io {
            peer: "socketpair".into(),
            offset: 0,
            source,
        })?;
    loader.rp = Some(Arc::new(RpWriter::new(Channel::from_unix(
        placeholder,
        "none".into(),
    ))));
    let empty: &[u8] = &[];
    loader.listen(&Reader::new(empty, String::new(), 64))?;
    ctx.state.transition(MigrationStatus::PostcopyPaused)?;
    slog::info!(ctx.log, "adopted a paused postcopy migration";
        "received_pages" => loader.received.iter().map(|b| b.count()).sum::<u64>());
    let result = loader.wait_and_recover();
    let devices = finish(&mut loader, result, t0, 0)?;
    drop(devices);
    ctx.state.transition(MigrationStatus::Completed)?;
    Ok(())
}

impl<'a> Loader<'a> {
    fn new(
        ctx: &'a MigrationCtx,
        blocks: &'a [Arc<RamBlock>],
        uffd: Option<OwnedFd>,
        chan: Option<&Channel>,
    ) -> Self {
        Loader {
            ctx,
            blocks,
            ram_section: None,
            last_block: None,
            rp: None,
            devices: Vec::new(),
            intake: DeviceIntake::default(),
            bytes: 0,
            known_zero: blocks.iter().map(|b| b.hole_bitmap()).collect(),
            pages: PageWriter::new(ctx.params().load_threads),
            scan_to: 0,
            scan_block: None,
            preempt_listener: None,
            preempt: None,
            received: Arc::new(
                blocks
                    .iter()
                    .map(|b| AtomicBitmap::new(b.pages()))
                    .collect(),
            ),
            uffd,
            advised: false,
            adopted: false,
            postcopy: None,
            fault_thread: None,
            fault_error: Arc::new(Mutex::new(None)),
            staged: Staged::default(),
            chan_fd: chan.and_then(|c| c.try_clone_fd().ok()),
            chan_timer: chan.map(Channel::timer),
            last_progress: Instant::now(),
        }
    }
}

fn load_inner<R: ReadReady>(
    loader: &mut Loader<'_>,
    r: &mut Reader<R>,
    chan: Option<&Channel>,
) -> Result<(), LoadError> {
    with_next!(r, "in the stream header", stream::decode_header, |_h| ());
    if r.data().is_empty() {
        r.need_more("after the stream header")?;
    }
    if r.data().first() == Some(&wire::section::CONFIGURATION) {
        let conf = with_next!(
            r,
            "in the configuration section",
            stream::decode_configuration,
            |c| c
        );
        if let Some(cap) = conf.capabilities.first() {
            return Err(r.wire(WireError::UnsupportedCapability(cap.clone())));
        }
        if let Some(bits) = conf.target_page_bits {
            if bits != 12 {
                return Err(loader.invalid(
                    r,
                    format!("target page bits {bits}, the helper supports 12 (4 KiB)"),
                ));
            }
        }
        slog::info!(loader.ctx.log, "incoming stream"; "machine" => &conf.machine);
    }
    loader.ctx.stats.total.store(
        loader.blocks.iter().map(|b| b.size).sum(),
        Ordering::Relaxed,
    );
    match loader.sections(r, chan, None)? {
        LoopEnd::Done => Ok(()),
        LoopEnd::NeedDescription => {
            // Hold everything that is left until the description has arrived.
            let (start, base) = (r.data().to_vec(), r.offset);
            let crate::engine::destination::held::Held {
                bytes: mut held,
                eof_at,
                json,
            } = crate::engine::destination::held::hold(&mut r.src, start, base, &r.peer)?;
            let desc =
                VmDescription::parse(&held[json.clone()]).map_err(|source| LoadError::Device {
                    offset: base + json.start as u64,
                    section: "VM description".into(),
                    source,
                })?;
            // Walk the held bytes, up to and including EOF, with the description. They
            // become the reader's buffer: no second copy of the device state.
            held.truncate(eof_at + 1);
            let mut h = Reader::over(held, r.peer.clone());
            h.offset = base;
            match loader.sections(&mut h, chan, Some(&desc))? {
                LoopEnd::Done if h.data().is_empty() && h.eof_or_fill()? => Ok(()),
                _ => Err(loader.invalid(&h, "device sections do not end at EOF".into())),
            }
        }
    }
}

impl<R: ReadReady> Reader<R> {
    fn eof_or_fill(&mut self) -> Result<bool, LoadError> {
        Ok(!self.fill()? && self.data().is_empty())
    }
}

impl Read for &Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Channel::read(self, buf)
    }
}

impl ReadReady for &Channel {
    fn read_ready(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Channel::read_ready(self, buf)
    }
}

impl ReadReady for &[u8] {}

/// What the loader reads from. `read_ready` returns only bytes that have already arrived
/// (0 when there are none), so that a refill can gather a large batch without waiting.
pub trait ReadReady: Read {
    fn read_ready(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }
}

/// Runs an incoming migration on an established channel. The caller set `setup`.
pub fn run(
    ctx: &MigrationCtx,
    blocks: Vec<Arc<RamBlock>>,
    chan: Channel,
    uffd: Option<OwnedFd>,
    preempt: Option<crate::transport::Incoming>,
) -> Result<(), LoadError> {
    ctx.state.transition(MigrationStatus::Active)?;
    chan.tune_buffers();
    let t0 = Instant::now();
    let devices = load(
        ctx,
        &blocks,
        &chan,
        chan.peer.clone(),
        Some(&chan),
        uffd,
        preempt,
    )?;
    ctx.stats
        .total_time_us
        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    // After those a postcopy package already handed over (the list was emptied when the
    // migration started).
    ctx.device_in
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(devices);
    ctx.state.transition(MigrationStatus::Completed)?;
    Ok(())
}
