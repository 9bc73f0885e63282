//! The source engine: sends guest RAM (and the device state it was given) as a QEMU
//! precopy stream. Runs on its own thread; the control channel sees it only through
//! `MigrationCtx`.

use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compat::{self, wire};
use crate::device_state::DeviceSection;
use crate::guest_memory::RamBlock;
use crate::migration::{MigrationCtx, Stats};
use crate::ram::{self, BlockEntry};
use crate::return_path::{self, RpMessage};
use crate::state::MigrationStatus;
use crate::stream::{self, SectionHeader, SectionKind, WireError};
use crate::transport::Channel;
use crate::vmstate::VmDescriptionBuilder;

const PAGE: usize = wire::TARGET_PAGE_SIZE;
/// The RAM section's id on the wire (QEMU 10.0 gives `ram` id 1 too).
const RAM_SECTION_ID: u32 = 1;
/// How long one PART section runs before the next (QEMU uses about 50 ms).
const PART_TIME: Duration = Duration::from_millis(50);
/// How long the source waits for the destination's SHUT at the end.
const SHUT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("write to {peer} failed after {sent} bytes: {source}")]
    Io {
        peer: String,
        sent: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("cancelled")]
    Cancelled,
    #[error("destination: {0}")]
    Peer(String),
    #[error("{0}")]
    State(#[from] crate::state::BadTransition),
}

/// Gathers records into few large `writev` calls: headers are copied into an arena, pages
/// are sent straight from the guest mapping (never copied).
struct Writer<'c> {
    chan: &'c Channel,
    arena: Vec<u8>,
    segs: Vec<Seg>,
    pending: usize,
    sent: u64,
}

enum Seg {
    Arena(usize, usize),
    Page(*const u8),
}

impl<'c> Writer<'c> {
    const MAX_SEGS: usize = 1024;
    const MAX_PENDING: usize = 1 << 20;

    fn new(chan: &'c Channel) -> Self {
        Writer {
            chan,
            arena: Vec::with_capacity(64 << 10),
            segs: Vec::with_capacity(Self::MAX_SEGS + 2),
            pending: 0,
            sent: 0,
        }
    }

    /// Appends bytes produced by an encoder.
    fn put(
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

    fn put_page(&mut self, page: &[u8]) -> Result<(), SourceError> {
        debug_assert_eq!(page.len(), PAGE);
        self.segs.push(Seg::Page(page.as_ptr()));
        self.pending += PAGE;
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> Result<(), SourceError> {
        if self.segs.len() >= Self::MAX_SEGS || self.pending >= Self::MAX_PENDING {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SourceError> {
        if self.segs.is_empty() {
            return Ok(());
        }
        let mut iov: Vec<IoSlice<'_>> = self
            .segs
            .iter()
            .map(|s| match *s {
                Seg::Arena(a, b) => IoSlice::new(&self.arena[a..b]),
                // SAFETY: page pointers come from live guest mappings held by the caller
                // for the whole migration.
                Seg::Page(p) => IoSlice::new(unsafe { std::slice::from_raw_parts(p, PAGE) }),
            })
            .collect();
        let r = self.chan.write_all_vectored(&mut iov);
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
struct Throttle {
    window_start: Instant,
    window_bytes: u64,
}

impl Throttle {
    fn new() -> Self {
        Throttle {
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    fn account(&mut self, bytes: u64, limit_bps: u64, ctx: &MigrationCtx) {
        self.window_bytes += bytes;
        if limit_bps == 0 {
            return;
        }
        let budget = (limit_bps / 10).max(PAGE as u64);
        if self.window_bytes >= budget {
            let elapsed = self.window_start.elapsed();
            let window = Duration::from_millis(100);
            if elapsed < window && !ctx.cancelled() {
                std::thread::sleep(window - elapsed);
            }
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
    }
}

/// Pages still to send in one block, as a bitmap of target pages.
struct BlockTodo {
    block: Arc<RamBlock>,
    todo: Vec<u64>,
}

impl BlockTodo {
    fn all(block: Arc<RamBlock>) -> Self {
        let pages = block.pages();
        let mut todo = vec![u64::MAX; pages.div_ceil(64) as usize];
        if pages % 64 != 0 {
            if let Some(last) = todo.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        BlockTodo { block, todo }
    }

    /// Moves the parent's dirty bits into the to-do set; returns how many pages are to do.
    fn harvest(&mut self) -> u64 {
        if let Some(d) = self.block.dirty() {
            for (i, w) in self.todo.iter_mut().enumerate().take(d.len_words()) {
                *w |= d.take_word(i);
            }
        }
        self.count()
    }

    fn count(&self) -> u64 {
        self.todo.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// Why a send loop stopped.
#[derive(PartialEq, Eq)]
enum SendEnd {
    Done,
    TimeUp,
}

struct Source<'c> {
    ctx: &'c MigrationCtx,
    out: Writer<'c>,
    blocks: Vec<BlockTodo>,
    /// Where the current pass is: (block index, word index).
    cursor: (usize, usize),
    throttle: Throttle,
    rp: Option<mpsc::Receiver<RpEvent>>,
    /// A SHUT 0 that arrived before the end.
    shut: Option<u32>,
}

fn shut_error(v: u32) -> SourceError {
    SourceError::Peer(format!("destination failed to load the stream (SHUT {v})"))
}

enum RpEvent {
    Shut(u32),
    Error(String),
}

impl<'c> Source<'c> {
    /// Sends pages from the to-do sets, starting at the cursor, until all are sent or
    /// `deadline` passes. `limit` applies the bandwidth limit.
    fn send_pages(
        &mut self,
        deadline: Option<Instant>,
        limit: bool,
    ) -> Result<SendEnd, SourceError> {
        let mut last_block: Option<usize> = None;
        let mut since_check = 0u32;
        while self.cursor.0 < self.blocks.len() {
            let (bi, wi) = self.cursor;
            let bt = &mut self.blocks[bi];
            if wi >= bt.todo.len() {
                self.cursor = (bi + 1, 0);
                continue;
            }
            let mut word = std::mem::take(&mut bt.todo[wi]);
            let block = bt.block.clone();
            let mut bytes = 0u64;
            while word != 0 {
                let bit = word.trailing_zeros() as u64;
                word &= word - 1;
                let off = (wi as u64 * 64 + bit) * PAGE as u64;
                let Some(page) = block.page(off) else {
                    continue;
                };
                let name = if last_block == Some(bi) {
                    None
                } else {
                    last_block = Some(bi);
                    Some(block.id.as_str())
                };
                if ram::is_zero_page(page) {
                    self.out.put(|o| ram::encode_zero_page(o, off, name))?;
                    Stats::add(&self.ctx.stats.duplicate, 1);
                    bytes += 9;
                } else {
                    self.out
                        .put(|o| ram::encode_page_header(o, off, wire::ram::PAGE, name))?;
                    self.out.put_page(page)?;
                    Stats::add(&self.ctx.stats.normal, 1);
                    bytes += 8 + PAGE as u64;
                }
            }
            self.cursor = (bi, wi + 1);
            Stats::add(&self.ctx.stats.transferred, bytes);
            let rem = self.ctx.stats.remaining.load(Ordering::Relaxed);
            self.ctx
                .stats
                .remaining
                .store(rem.saturating_sub(bytes.min(rem)), Ordering::Relaxed);
            if limit {
                let bw = self.ctx.params().max_bandwidth;
                self.throttle.account(bytes, bw, self.ctx);
            }
            since_check += 1;
            if since_check >= 16 {
                since_check = 0;
                if self.ctx.cancelled() {
                    return Err(SourceError::Cancelled);
                }
                self.check_rp()?;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(SendEnd::TimeUp);
                }
            }
        }
        Ok(SendEnd::Done)
    }

    /// Stops the migration as soon as the destination reports a failure (SHUT with an
    /// error, or a broken return path), instead of sending the rest of RAM for nothing.
    fn check_rp(&mut self) -> Result<(), SourceError> {
        if let Some(rx) = &self.rp {
            match rx.try_recv() {
                Ok(RpEvent::Shut(0)) => self.shut = Some(0),
                Ok(RpEvent::Shut(v)) => return Err(shut_error(v)),
                Ok(RpEvent::Error(e)) => return Err(SourceError::Peer(e)),
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// One PART section.
    fn part(&mut self, deadline: Instant) -> Result<SendEnd, SourceError> {
        self.out.put(|o| {
            stream::encode_section_part(o, SectionKind::Part, RAM_SECTION_ID);
            Ok(())
        })?;
        let end = self.send_pages(Some(deadline), true)?;
        self.out.put(|o| {
            ram::encode_eos(o);
            stream::encode_footer(o, RAM_SECTION_ID);
            Ok(())
        })?;
        Ok(end)
    }

    fn harvest(&mut self) -> u64 {
        let n: u64 = self.blocks.iter_mut().map(|b| b.harvest()).sum();
        Stats::add(&self.ctx.stats.dirty_sync_count, 1);
        self.ctx
            .stats
            .remaining
            .store(n * PAGE as u64, Ordering::Relaxed);
        self.cursor = (0, 0);
        n
    }
}

/// Runs a precopy migration to `chan`. The caller has moved the state to `setup`.
pub fn run(
    ctx: &MigrationCtx,
    blocks: Vec<Arc<RamBlock>>,
    chan: Channel,
) -> Result<(), SourceError> {
    let caps = ctx.caps();
    let params = ctx.params();
    let t0 = Instant::now();
    let total: u64 = blocks.iter().map(|b| b.size).sum();
    ctx.stats.total.store(total, Ordering::Relaxed);
    ctx.stats.remaining.store(total, Ordering::Relaxed);

    chan.tune_buffers();
    let use_rp = (caps.return_path || caps.postcopy_ram) && chan.is_socket;
    let rp = if use_rp {
        let fd = chan.try_clone_fd().map_err(|source| SourceError::Io {
            peer: chan.peer.clone(),
            sent: 0,
            source,
        })?;
        Some(spawn_rp_reader(
            Channel::from_fd("return-path", fd).map_err(|e| SourceError::Peer(e.to_string()))?,
            ctx.log.clone(),
        ))
    } else {
        None
    };

    let mut src = Source {
        ctx,
        out: Writer::new(&chan),
        blocks: blocks.iter().cloned().map(BlockTodo::all).collect(),
        cursor: (0, 0),
        throttle: Throttle::new(),
        rp,
        shut: None,
    };
    // Pages the parent dirtied before now are sent by the first pass anyway.
    for b in &mut src.blocks {
        if let Some(d) = b.block.dirty() {
            for i in 0..d.len_words() {
                d.take_word(i);
            }
        }
    }

    let entries: Vec<BlockEntry> = blocks
        .iter()
        .map(|b| BlockEntry {
            idstr: b.id.clone(),
            used_length: b.size,
            // Only huge-page blocks carry their page size, and only with postcopy.
            page_size: (caps.postcopy_ram && b.page_size != PAGE as u64).then_some(b.page_size),
        })
        .collect();
    src.out.put(|o| {
        stream::encode_header(o);
        stream::encode_configuration(o, &params.machine_type)?;
        if use_rp {
            stream::encode_command(o, wire::command::OPEN_RETURN_PATH, &[])?;
            stream::encode_command(o, wire::command::PING, &1u32.to_be_bytes())?;
        }
        stream::encode_section_start(
            o,
            SectionKind::Start,
            &SectionHeader {
                section_id: RAM_SECTION_ID,
                idstr: wire::ram::IDSTR.into(),
                instance_id: 0,
                version_id: wire::ram::VERSION,
            },
        )?;
        ram::encode_block_list(o, &entries)?;
        stream::encode_footer(o, RAM_SECTION_ID);
        Ok(())
    })?;
    src.out.flush()?;
    ctx.stats
        .setup_time_us
        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    ctx.state.transition(MigrationStatus::Active)?;

    // Iterate passes until what is left fits in the downtime limit.
    let mut pass = 1u64;
    loop {
        let pass_start = Instant::now();
        let sent_before = src.out.sent + src.out.pending as u64;
        loop {
            let end = src.part(Instant::now() + PART_TIME)?;
            if end == SendEnd::Done {
                break;
            }
        }
        src.out.flush()?;
        let secs = pass_start.elapsed().as_secs_f64().max(1e-6);
        let bytes = (src.out.sent - sent_before) as f64;
        let bps = bytes / secs;
        ctx.stats
            .rate_bps
            .store((bps * 8.0) as u64, Ordering::Relaxed);
        ctx.state
            .emit_event("MIGRATION_PASS", serde_json::json!({"pass": pass}));
        let dirty = src.harvest();
        let dirty_bytes = dirty * PAGE as u64;
        let p = ctx.params();
        let budget = bps * p.downtime_limit as f64 / 1000.0;
        slog::debug!(ctx.log, "pass done"; "pass" => pass, "bytes" => bytes as u64, "secs" => secs, "dirty_pages" => dirty);
        pass += 1;
        if (dirty_bytes as f64) <= budget || dirty == 0 {
            break;
        }
    }

    // Switchover.
    if caps.pause_before_switchover {
        ctx.state.transition(MigrationStatus::PreSwitchover)?;
        if !ctx.gate.wait(&ctx.cancel) {
            return Err(SourceError::Cancelled);
        }
    }
    let downtime_start = Instant::now();
    ctx.state.transition(MigrationStatus::Device)?;
    let p = ctx.params();
    if p.compat_version.accepts_switchover_start()
        && compat::machine_sends_switchover_start(&p.machine_type)
    {
        src.out
            .put(|o| stream::encode_command(o, wire::command::SWITCHOVER_START, &[]))?;
    }
    // The guest is stopped now: everything still dirty goes in the END section.
    src.harvest();
    src.out.put(|o| {
        stream::encode_section_part(o, SectionKind::End, RAM_SECTION_ID);
        Ok(())
    })?;
    src.send_pages(None, false)?;
    src.out.put(|o| {
        ram::encode_eos(o);
        stream::encode_footer(o, RAM_SECTION_ID);
        Ok(())
    })?;

    let devices: Vec<DeviceSection> = ctx
        .device_out
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut desc = VmDescriptionBuilder::new(PAGE as u64);
    if p.compat_version.vmdesc_has_configuration() {
        desc.configuration(p.machine_type.len());
    }
    for d in &devices {
        src.out.put(|o| {
            o.extend_from_slice(&d.raw);
            Ok(())
        })?;
        match &d.description {
            Some(j) => desc.push_device(j.clone()),
            None => desc.push_opaque(
                &d.header.idstr,
                d.header.instance_id,
                d.header.version_id,
                d.body.len(),
            ),
        };
    }
    let json = desc.to_json_bytes();
    src.out.put(|o| {
        stream::encode_eof(o);
        stream::encode_vmdesc(o, &json)
    })?;
    src.out.flush()?;
    ctx.stats.remaining.store(0, Ordering::Relaxed);

    if let Some(rx) = src.rp.take() {
        if src.shut.is_none() {
            match rx.recv_timeout(SHUT_TIMEOUT) {
                Ok(RpEvent::Shut(0)) => {}
                Ok(RpEvent::Shut(v)) => return Err(shut_error(v)),
                Ok(RpEvent::Error(e)) => return Err(SourceError::Peer(e)),
                Err(_) => return Err(SourceError::Peer("no SHUT from the destination".into())),
            }
        }
    }
    ctx.stats.downtime_us.store(
        downtime_start.elapsed().as_micros() as u64,
        Ordering::Relaxed,
    );
    ctx.stats
        .total_time_us
        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    slog::info!(ctx.log, "migration summary";
        "role" => "source",
        "bytes" => src.out.sent,
        "pages" => ctx.stats.normal.load(Ordering::Relaxed),
        "zero_pages" => ctx.stats.duplicate.load(Ordering::Relaxed),
        "secs" => secs,
        "rate_mbps" => src.out.sent as f64 * 8.0 / secs / 1e6,
        "downtime_ms" => downtime_start.elapsed().as_millis() as u64,
        "device_sections" => devices.len(),
    );
    ctx.state.transition(MigrationStatus::Completed)?;
    Ok(())
}

/// Reads the return path on its own thread and forwards what matters.
fn spawn_rp_reader(chan: Channel, log: slog::Logger) -> mpsc::Receiver<RpEvent> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("qmh-rp".into())
        .spawn(move || {
            let mut buf = vec![0u8; 4096];
            let mut have = 0usize;
            loop {
                // Decode everything buffered.
                loop {
                    match return_path::decode(&buf[..have]) {
                        Ok(Some((m, n))) => {
                            match m {
                                RpMessage::Shut(v) => {
                                    let _ = tx.send(RpEvent::Shut(v));
                                    return;
                                }
                                RpMessage::Pong(v) => slog::debug!(log, "PONG"; "value" => v),
                                other => {
                                    let _ = tx.send(RpEvent::Error(format!(
                                        "unexpected return-path message in precopy: {other:?}"
                                    )));
                                    return;
                                }
                            }
                            buf.copy_within(n..have, 0);
                            have -= n;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ =
                                tx.send(RpEvent::Error(format!("bad return-path message: {e}")));
                            return;
                        }
                    }
                }
                match chan.read(&mut buf[have..]) {
                    Ok(0) => {
                        let _ = tx.send(RpEvent::Error("return path closed before SHUT".into()));
                        return;
                    }
                    Ok(n) => have += n,
                    Err(e) => {
                        let _ = tx.send(RpEvent::Error(format!("return path: {e}")));
                        return;
                    }
                }
            }
        })
        .ok();
    rx
}
