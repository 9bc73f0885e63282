//! The source engine: sends guest RAM (and the device state it was given) as a QEMU
//! precopy stream. Runs on its own thread; the control channel sees it only through
//! `MigrationCtx`.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compat::{self, wire};
use crate::engine::migration::{MigrationCtx, Stats};
use crate::engine::source::rp_reader::{
    spawn_rp_reader, PageRequest, Route, RpEvent, RpGate, MAX_QUEUED_REQUESTS,
};
use crate::engine::state::MigrationStatus;
use crate::memory::block::RamBlock;
use crate::transport::Channel;
use crate::vmstate::VmDescriptionBuilder;
use crate::wire::device_state::DeviceSection;
use crate::wire::postcopy;
use crate::wire::ram::{self, BlockEntry};
use crate::wire::stream::{self, SectionHeader, SectionKind, WireError};

pub(crate) mod rp_reader;

const PAGE: usize = wire::TARGET_PAGE_SIZE;
/// The RAM section's id on the wire (QEMU 10.0 gives `ram` id 1 too).
const RAM_SECTION_ID: u32 = 1;
/// How long one PART section runs before the next (QEMU uses about 50 ms).
const PART_TIME: Duration = Duration::from_millis(50);
/// How long the source waits for the destination's SHUT at the end.
const SHUT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a recovery handshake may take before it counts as failed.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket send buffer in postcopy: small, so requested pages are not queued behind much.
const POSTCOPY_SNDBUF: usize = 64 << 10;
/// Background pages sent between two looks at the page requests.
const POSTCOPY_CHUNK: u32 = 16;

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
    State(#[from] crate::engine::state::BadTransition),
    #[error("link: {0}")]
    Link(String),
    #[error("recovery: {0}")]
    Recovery(String),
}

impl SourceError {
    /// A failure of the link (not of either side's state): postcopy pauses on it.
    fn is_link_failure(&self) -> bool {
        matches!(self, SourceError::Io { .. } | SourceError::Link(_))
    }
}

/// Gathers records into few large `writev` calls: headers are copied into an arena, pages
/// are sent straight from the guest mapping (never copied).
struct Writer {
    chan: Arc<Channel>,
    arena: Vec<u8>,
    segs: Vec<Seg>,
    pending: usize,
    sent: u64,
}

enum Seg {
    Arena(usize, usize),
    Page(*const u8),
}

impl Writer {
    const MAX_SEGS: usize = 1024;
    const MAX_PENDING: usize = 1 << 20;

    fn new(chan: Arc<Channel>) -> Self {
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

    /// Continues on a new channel (postcopy recovery); what was not written is dropped:
    /// the destination's received bitmap says what to send again.
    fn set_channel(&mut self, chan: Arc<Channel>) {
        self.chan = chan;
        self.segs.clear();
        self.arena.clear();
        self.pending = 0;
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

    /// Counts `bytes`; returns how long to wait when the window's budget is spent.
    fn account(&mut self, bytes: u64, limit_bps: u64) -> Option<Duration> {
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

/// Pages still to send in one block, as a bitmap of target pages.
struct BlockTodo {
    block: Arc<RamBlock>,
    /// Pages still to send. Shared with the postcopy-preempt sender: each bit is taken out
    /// by exactly one of them (an atomic swap or and-not) before its page is sent.
    todo: Arc<Vec<AtomicU64>>,
    /// Pages that are holes in the memfd and not written since: zero without reading them
    /// (reading a hole through a shared mapping would allocate a page for it).
    holes: Vec<u64>,
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
        BlockTodo {
            block,
            todo: Arc::new(todo.into_iter().map(AtomicU64::new).collect()),
            holes: Vec::new(),
        }
    }

    /// Takes the pages of word `i` that are in `mask` out of the to-do set.
    fn take(&self, i: usize, mask: u64) -> u64 {
        self.todo
            .get(i)
            .map_or(0, |w| w.fetch_and(!mask, Ordering::AcqRel) & mask)
    }

    fn words(&self) -> Vec<u64> {
        self.todo
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Moves the parent's dirty bits into the to-do set; returns how many pages are to do.
    fn harvest(&mut self) -> u64 {
        if let Some(d) = self.block.dirty() {
            for (i, w) in self.todo.iter().enumerate().take(d.len_words()) {
                let dirty = d.take_word(i);
                w.fetch_or(dirty, Ordering::AcqRel);
                // A written page is no longer known to be a hole.
                if let Some(h) = self.holes.get_mut(i) {
                    *h &= !dirty;
                }
            }
        }
        self.count()
    }

    fn count(&self) -> u64 {
        self.todo
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
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
    out: Writer,
    blocks: Vec<BlockTodo>,
    /// Where the current pass is: (block index, word index).
    cursor: (usize, usize),
    throttle: Throttle,
    rp: Option<mpsc::Receiver<RpEvent>>,
    /// A SHUT 0 that arrived before the end.
    shut: Option<u32>,
    /// Page requests from the destination not yet served.
    requests: std::collections::VecDeque<PageRequest>,
    /// Keepalive on the return path in postcopy.
    postcopy_live: bool,
    last_progress: Instant,
    last_pong: Instant,
    last_ping_sent: Instant,
    ping_seq: u32,
    /// postcopy-preempt: where the main channel went (the preempt channel goes there too),
    /// and the preempt channel once connected.
    preempt_uri: Option<crate::transport::Uri>,
    urgent: Option<Urgent>,
    /// Where the return-path reader sends page requests while a preempt sender runs.
    route: Route,
    /// Tells the return-path reader what it may accept.
    gate: Arc<RpGate>,
}

/// What the preempt sender needs of a block: its memory, the shared to-do bits and the
/// holes (fixed from the start of postcopy on).
type UrgentBlock = (Arc<RamBlock>, Arc<Vec<AtomicU64>>, Vec<u64>);

/// postcopy-preempt on the source: a thread that takes page requests straight from the
/// return-path reader and sends the pages on the preempt channel, so that a request never
/// waits behind the push on the main channel (QEMU sends them from its return-path thread
/// too). A page whose bit the push took first is on its way there and is skipped.
struct Urgent {
    chan: Arc<Channel>,
    handle: Option<std::thread::JoinHandle<()>>,
    requests: Arc<AtomicU64>,
    pages: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Urgent {
    fn spawn(
        chan: Arc<Channel>,
        blocks: Vec<UrgentBlock>,
        log: slog::Logger,
    ) -> std::io::Result<(Urgent, mpsc::SyncSender<PageRequest>)> {
        let (tx, rx) = mpsc::sync_channel::<PageRequest>(MAX_QUEUED_REQUESTS);
        let (requests, pages, bytes) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (c, nr, np, nb) = (chan.clone(), requests.clone(), pages.clone(), bytes.clone());
        let handle = std::thread::Builder::new()
            .name("qmh-urgent".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(2 * (PAGE + 300));
                for r in rx {
                    nr.fetch_add(1, Ordering::Relaxed);
                    buf.clear();
                    let Some((block, todo, holes)) = blocks.get(r.block) else {
                        continue;
                    };
                    for (wi, mask) in r.words() {
                        let mut word = todo
                            .get(wi)
                            .map_or(0, |w| w.fetch_and(!mask, Ordering::AcqRel) & mask);
                        while word != 0 {
                            let bit = word.trailing_zeros() as u64;
                            word &= word - 1;
                            let off = (wi as u64 * 64 + bit) * PAGE as u64;
                            let Some(page) = block.page(off) else {
                                continue;
                            };
                            let hole = holes.get(wi).is_some_and(|h| h & (1 << bit) != 0);
                            // Every record names its block: nothing relies on the channel's past.
                            let ok = if hole || ram::is_zero_page(page) {
                                ram::encode_zero_page(&mut buf, off, Some(&block.id))
                            } else {
                                ram::encode_page_header(
                                    &mut buf,
                                    off,
                                    wire::ram::PAGE,
                                    Some(&block.id),
                                )
                                .map(|()| buf.extend_from_slice(page))
                            };
                            if ok.is_ok() {
                                np.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    if buf.is_empty() {
                        continue;
                    }
                    nb.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    if let Err(e) = c.write_all(&buf) {
                        // The main channel fails too and the migration pauses; the
                        // recovery's bitmaps say what to send again.
                        slog::debug!(log, "postcopy-preempt write failed"; "error" => %e);
                        return;
                    }
                }
            })?;
        Ok((
            Urgent {
                chan,
                handle: Some(handle),
                requests,
                pages,
                bytes,
            },
            tx,
        ))
    }
}

fn shut_error(v: u32) -> SourceError {
    SourceError::Peer(format!("destination failed to load the stream (SHUT {v})"))
}

impl<'c> Source<'c> {
    /// Everything to send, the memfds' current holes noted (sent as zero pages unread).
    fn new(
        ctx: &'c MigrationCtx,
        blocks: &[Arc<RamBlock>],
        chan: Arc<Channel>,
        rp: Option<mpsc::Receiver<RpEvent>>,
    ) -> Self {
        let mut blocks: Vec<BlockTodo> = blocks.iter().cloned().map(BlockTodo::all).collect();
        for b in &mut blocks {
            b.holes = b.block.hole_bitmap();
        }
        Source {
            ctx,
            out: Writer::new(chan),
            blocks,
            cursor: (0, 0),
            throttle: Throttle::new(),
            rp,
            shut: None,
            requests: Default::default(),
            postcopy_live: false,
            last_progress: Instant::now(),
            last_pong: Instant::now(),
            last_ping_sent: Instant::now(),
            ping_seq: 100,
            preempt_uri: None,
            urgent: None,
            route: Route::default(),
            gate: Arc::default(),
        }
    }

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
            let word = bt.take(wi, u64::MAX);
            let block = bt.block.clone();
            let bytes = self.send_word(&block, bi, wi, word, &mut last_block)?;
            self.cursor = (bi, wi + 1);
            if limit {
                let bw = self.ctx.params().max_bandwidth;
                if let Some(wait) = self.throttle.account(bytes, bw) {
                    if !self.ctx.cancelled() {
                        std::thread::sleep(wait);
                    }
                }
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

    /// Sends the pages of one bitmap word (pages `64*wi ..`) of block `bi`; returns the
    /// bytes put on the wire. `last_block` tracks the CONTINUE flag.
    fn send_word(
        &mut self,
        block: &RamBlock,
        bi: usize,
        wi: usize,
        mut word: u64,
        last_block: &mut Option<usize>,
    ) -> Result<u64, SourceError> {
        let mut bytes = 0u64;
        let mut pages = 0u64;
        while word != 0 {
            let bit = word.trailing_zeros() as u64;
            word &= word - 1;
            let off = (wi as u64 * 64 + bit) * PAGE as u64;
            let Some(page) = block.page(off) else {
                continue;
            };
            let name = if *last_block == Some(bi) {
                None
            } else {
                *last_block = Some(bi);
                Some(block.id.as_str())
            };
            pages += 1;
            let hole = self.blocks[bi]
                .holes
                .get(wi)
                .is_some_and(|h| h & (1 << bit) != 0);
            if hole || ram::is_zero_page(page) {
                self.out.put(|o| ram::encode_zero_page(o, off, name))?;
                Stats::add(&self.ctx.stats.duplicate, 1);
                bytes += 9 + name.map_or(0, |n| 1 + n.len() as u64);
            } else {
                self.out
                    .put(|o| ram::encode_page_header(o, off, wire::ram::PAGE, name))?;
                self.out.put_page(page)?;
                Stats::add(&self.ctx.stats.normal, 1);
                bytes += 8 + PAGE as u64 + name.map_or(0, |n| 1 + n.len() as u64);
            }
        }
        Stats::add(&self.ctx.stats.transferred, bytes);
        let rem = self.ctx.stats.remaining.load(Ordering::Relaxed);
        self.ctx
            .stats
            .remaining
            .store(rem.saturating_sub(pages * PAGE as u64), Ordering::Relaxed);
        Ok(bytes)
    }

    /// Queues a page request, up to a bound: a request beyond it is dropped (its page is
    /// still to send and goes with the push), so a flood cannot grow the queue.
    fn queue_request(&mut self, r: PageRequest) {
        if self.requests.len() < MAX_QUEUED_REQUESTS {
            self.requests.push_back(r);
        } else {
            self.gate.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stops the migration as soon as the destination reports a failure (SHUT with an
    /// error, or a broken return path), instead of sending the rest of RAM for nothing.
    fn check_rp(&mut self) -> Result<(), SourceError> {
        if let Some(rx) = &self.rp {
            match rx.try_recv() {
                Ok(RpEvent::Shut(0)) => self.shut = Some(0),
                Ok(RpEvent::Shut(v)) => return Err(shut_error(v)),
                Ok(RpEvent::Error(e)) => return Err(SourceError::Peer(e)),
                Ok(RpEvent::LinkDown(e)) => return Err(SourceError::Link(e)),
                Ok(RpEvent::Request(r)) => self.queue_request(r),
                Ok(RpEvent::Pong) => self.last_pong = Instant::now(),
                Ok(other) => {
                    return Err(SourceError::Peer(format!(
                        "unexpected return-path message {other:?}"
                    )))
                }
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
    uri: crate::transport::Uri,
) -> Result<(), SourceError> {
    let caps = ctx.caps();
    let params = ctx.params();
    let t0 = Instant::now();
    // Reading faults pages in cheaply (16 at a time); mapping them ahead now would only
    // compete with sending them.
    blocks.iter().for_each(|b| b.stop_mapping_ahead());
    let total: u64 = blocks.iter().map(|b| b.size).sum();
    ctx.stats.total.store(total, Ordering::Relaxed);
    ctx.stats.remaining.store(total, Ordering::Relaxed);

    let chan = Arc::new(chan);
    chan.tune_buffers();
    if caps.postcopy_ram && !chan.is_socket {
        return Err(SourceError::Peer(format!(
            "postcopy needs a socket (for the return path); {} is not one",
            chan.peer
        )));
    }
    let use_rp = (caps.return_path || caps.postcopy_ram) && chan.is_socket;
    let route = Route::default();
    let gate = Arc::<RpGate>::default();
    let rp = if use_rp {
        let fd = chan.try_clone_fd().map_err(|source| SourceError::Io {
            peer: chan.peer.clone(),
            sent: 0,
            source,
        })?;
        let names = blocks.iter().map(|b| (b.id.clone(), b.size)).collect();
        Some(spawn_rp_reader(
            Channel::from_fd("return-path", fd).map_err(|e| SourceError::Peer(e.to_string()))?,
            names,
            route.clone(),
            gate.clone(),
            ctx.log.clone(),
        ))
    } else {
        None
    };

    // Pages the parent dirtied before now are sent by the first pass anyway; with the bits
    // clear, `Source::new` notes the holes: a page written after this has its bit set again.
    for b in &blocks {
        if let Some(d) = b.dirty() {
            for i in 0..d.len_words() {
                d.take_word(i);
            }
        }
    }
    let mut src = Source::new(ctx, &blocks, chan.clone(), rp);
    src.route = route;
    src.gate = gate;
    if caps.postcopy_preempt {
        src.preempt_uri = Some(uri);
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
        if caps.postcopy_ram {
            let advise = postcopy::Advise {
                page_size_summary: blocks.iter().fold(0, |a, b| a | b.page_size),
                target_page_size: PAGE as u64,
            };
            stream::encode_command(
                o,
                wire::command::POSTCOPY_ADVISE,
                &postcopy::encode_advise(&advise),
            )?;
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

    // Iterate passes until what is left fits in the downtime limit, or postcopy is asked for.
    let mut pass = 1u64;
    let mut go_postcopy = false;
    'passes: loop {
        let pass_start = Instant::now();
        let sent_before = src.out.sent + src.out.pending as u64;
        loop {
            let end = src.part(Instant::now() + PART_TIME)?;
            src.log_progress(pass);
            if caps.postcopy_ram && ctx.postcopy_requested.load(Ordering::Acquire) {
                go_postcopy = true;
                break 'passes;
            }
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

    if caps.pause_before_switchover {
        ctx.state.transition(MigrationStatus::PreSwitchover)?;
        // Waiting for the parent sends nothing: an empty RAM part now and then keeps the
        // destination's precopy-timeout from firing.
        let idle = ctx.precopy_keepalive().unwrap_or(Duration::from_secs(3600));
        loop {
            match ctx.gate.wait_for(&ctx.cancel, idle) {
                Some(true) => break,
                Some(false) => return Err(SourceError::Cancelled),
                None => {
                    src.out.put(|o| {
                        stream::encode_section_part(o, SectionKind::Part, RAM_SECTION_ID);
                        ram::encode_eos(o);
                        stream::encode_footer(o, RAM_SECTION_ID);
                        Ok(())
                    })?;
                    src.out.flush()?;
                }
            }
        }
    }
    let downtime_start = Instant::now();
    let p = ctx.params();
    if p.compat_version.accepts_switchover_start()
        && compat::machine_sends_switchover_start(&p.machine_type)
    {
        src.out
            .put(|o| stream::encode_command(o, wire::command::SWITCHOVER_START, &[]))?;
    }
    let devices: Vec<DeviceSection> = ctx
        .device_out
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if go_postcopy {
        src.postcopy(&devices, downtime_start)?;
    } else {
        ctx.state.transition(MigrationStatus::Device)?;
        src.precopy_end(&devices, &p)?;
        ctx.stats.downtime_us.store(
            downtime_start.elapsed().as_micros() as u64,
            Ordering::Relaxed,
        );
    }
    ctx.stats.remaining.store(0, Ordering::Relaxed);
    src.wait_shut()?;
    ctx.stats
        .total_time_us
        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    slog::info!(ctx.log, "migration summary";
        "role" => "source",
        "postcopy" => go_postcopy,
        "bytes" => src.out.sent,
        "pages" => ctx.stats.normal.load(Ordering::Relaxed),
        "zero_pages" => ctx.stats.duplicate.load(Ordering::Relaxed),
        "secs" => secs,
        "rate_mbps" => src.out.sent as f64 * 8.0 / secs / 1e6,
        "downtime_ms" => ctx.stats.downtime_us.load(Ordering::Relaxed) / 1000,
        "postcopy_requests" => ctx.stats.postcopy_requests.load(Ordering::Relaxed),
        "device_sections" => devices.len(),
    );
    ctx.state.transition(MigrationStatus::Completed)?;
    Ok(())
}

impl Source<'_> {
    /// A progress line for operators, about once a second during long migrations.
    fn log_progress(&mut self, pass: u64) {
        if self.last_progress.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_progress = Instant::now();
        let st = &self.ctx.stats;
        slog::info!(self.ctx.log, "progress";
            "pass" => pass,
            "transferred" => st.transferred.load(Ordering::Relaxed),
            "remaining" => st.remaining.load(Ordering::Relaxed),
            "total" => st.total.load(Ordering::Relaxed),
            "pages" => st.normal.load(Ordering::Relaxed),
            "zero_pages" => st.duplicate.load(Ordering::Relaxed),
        );
    }

    /// Precopy switchover: END with everything still dirty, the device sections, EOF and
    /// the VM description.
    fn precopy_end(
        &mut self,
        devices: &[DeviceSection],
        p: &crate::engine::migration::Parameters,
    ) -> Result<(), SourceError> {
        // The guest is stopped now: everything still dirty goes in the END section.
        self.harvest();
        self.out.put(|o| {
            stream::encode_section_part(o, SectionKind::End, RAM_SECTION_ID);
            Ok(())
        })?;
        self.send_pages(None, false)?;
        self.out.put(|o| {
            ram::encode_eos(o);
            stream::encode_footer(o, RAM_SECTION_ID);
            Ok(())
        })?;
        let mut desc = VmDescriptionBuilder::new(PAGE as u64);
        if p.compat_version.vmdesc_has_configuration() {
            desc.configuration(p.machine_type.len());
        }
        for d in devices {
            self.out.put(|o| {
                o.extend_from_slice(&d.raw);
                Ok(())
            })?;
            match &d.description {
                Some(j) => desc.push_device(serde_json::Value::clone(j)),
                None => desc.push_opaque(
                    &d.header.idstr,
                    d.header.instance_id,
                    d.header.version_id,
                    d.body.len(),
                ),
            };
        }
        let json = desc.to_json_bytes();
        self.out.put(|o| {
            stream::encode_eof(o);
            stream::encode_vmdesc(o, &json)
        })?;
        self.out.flush()
    }

    /// Postcopy switchover and the rest of RAM: discards, the device package, then pages on
    /// request first and in the background otherwise.
    fn postcopy(
        &mut self,
        devices: &[DeviceSection],
        downtime_start: Instant,
    ) -> Result<(), SourceError> {
        let ctx = self.ctx;
        // What is still to send (never sent, or dirtied since) is discarded on the
        // destination so that the guest faults on it instead of reading stale data.
        self.harvest();
        for bt in &self.blocks {
            let ranges = bit_runs(&bt.words());
            if !ranges.is_empty() {
                let name = bt.block.id.clone();
                self.out
                    .put(|o| postcopy::encode_discards(o, &name, &ranges))?;
            }
        }
        // postcopy-preempt: the second channel exists before the package (a QEMU
        // destination waits for it before loading the device state), and after the last
        // harvest (its sender reads the holes). Failing here still leaves the whole guest
        // on this side.
        if let Some(uri) = self.preempt_uri.clone() {
            self.connect_preempt(&uri).map_err(|e| {
                SourceError::Peer(format!(
                    "cannot establish the postcopy-preempt channel: {e}"
                ))
            })?;
        }
        let mut dev = Vec::new();
        for d in devices {
            dev.extend_from_slice(&d.raw);
        }
        let blob = postcopy::encode_package(&dev)?;
        // From LISTEN on the destination may ask for pages.
        self.gate
            .postcopy
            .store(true, std::sync::atomic::Ordering::Release);
        let len = u32::try_from(blob.len())
            .ok()
            .filter(|&l| l <= stream::MAX_PACKAGED_LEN)
            .ok_or(WireError::TooLong {
                what: "postcopy package",
                len: blob.len() as u64,
                max: stream::MAX_PACKAGED_LEN as u64,
            })?;
        self.out.put(|o| {
            stream::encode_command(o, wire::command::PING, &2u32.to_be_bytes())?;
            stream::encode_command(o, wire::command::PACKAGED, &len.to_be_bytes())?;
            o.extend_from_slice(&blob);
            stream::encode_command(o, wire::command::PING, &4u32.to_be_bytes())
        })?;
        self.out.flush()?;
        ctx.stats.downtime_us.store(
            downtime_start.elapsed().as_micros() as u64,
            Ordering::Relaxed,
        );
        ctx.state.transition(MigrationStatus::PostcopyActive)?;
        // Keep little queued in the socket, so a requested page does not wait behind
        // megabytes of background pages.
        self.out.chan.set_send_buffer(POSTCOPY_SNDBUF);
        self.arm_link_timeout();

        // From here on a broken link pauses the migration instead of failing it: neither
        // side has the whole guest.
        loop {
            match self.postcopy_push() {
                Ok(()) => return Ok(()),
                Err(e) if e.is_link_failure() => self.pause_and_recover(e)?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Pushes the rest of RAM (requests first), ends the stream and waits for SHUT.
    fn postcopy_push(&mut self) -> Result<(), SourceError> {
        let ctx = self.ctx;
        self.cursor = (0, 0);
        let mut throttle = Throttle::new();
        let mut resume_at: Option<Instant> = None;
        loop {
            self.keepalive()?;
            self.serve_requests()?;
            // The background push waits out its bandwidth window; requests do not.
            if let Some(t) = resume_at {
                let now = Instant::now();
                if now < t {
                    self.wait_for_request(t - now)?;
                    continue;
                }
                resume_at = None;
            }
            let Some((bi, wi, word)) = self.next_word() else {
                break;
            };
            let block = self.blocks[bi].block.clone();
            self.out.put(|o| {
                stream::encode_section_part(o, SectionKind::Part, RAM_SECTION_ID);
                Ok(())
            })?;
            let bytes = self.send_word(&block, bi, wi, word, &mut None)?;
            self.out.put(|o| {
                ram::encode_eos(o);
                stream::encode_footer(o, RAM_SECTION_ID);
                Ok(())
            })?;
            self.out.flush()?;
            // On a busy machine, let the return-path thread run: a request it has not read
            // yet cannot overtake the push.
            std::thread::yield_now();
            let limit = ctx.params().max_postcopy_bandwidth;
            if let Some(wait) = throttle.account(bytes, limit) {
                resume_at = Some(Instant::now() + wait);
            }
        }
        self.serve_requests()?;
        self.out.put(|o| {
            stream::encode_section_part(o, SectionKind::End, RAM_SECTION_ID);
            ram::encode_eos(o);
            stream::encode_footer(o, RAM_SECTION_ID);
            stream::encode_eof(o);
            Ok(())
        })?;
        self.out.flush()?;
        let shut = self.wait_shut();
        // The destination has every page; the preempt channel closes after its SHUT.
        self.stop_urgent(false);
        shut
    }

    /// Connects the postcopy-preempt channel to `uri` (where the main channel went).
    fn connect_preempt(&mut self, uri: &crate::transport::Uri) -> Result<(), String> {
        if matches!(
            uri,
            crate::transport::Uri::Fd(_) | crate::transport::Uri::File(_)
        ) {
            return Err(format!(
                "postcopy-preempt needs a unix: or tcp: URI for its second connection, not {uri}"
            ));
        }
        let c = Channel::connect(uri, |_| None, &self.ctx.cancel)
            .map_err(|e| e.to_string())?
            .with_cancel(self.ctx.cancel.clone());
        let t = self.ctx.params().link_timeout;
        c.set_timeouts((t > 0).then(|| Duration::from_millis(t)));
        let blocks = self
            .blocks
            .iter()
            .map(|b| (b.block.clone(), b.todo.clone(), b.holes.clone()))
            .collect();
        let (u, tx) = Urgent::spawn(Arc::new(c), blocks, self.ctx.log.clone())
            .map_err(|e| format!("cannot start the preempt sender: {e}"))?;
        // Requests queued before now go the same way.
        for r in self.requests.drain(..) {
            let _ = tx.try_send(r);
        }
        *self.route.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        self.urgent = Some(u);
        slog::info!(self.ctx.log, "postcopy-preempt channel connected"; "uri" => %uri);
        Ok(())
    }

    /// Stops the preempt sender (at the end, or broken with `shut` at a pause) and adds
    /// its figures to the migration's.
    fn stop_urgent(&mut self, shut: bool) {
        // Dropping the route's sender ends the thread once it has sent what it has.
        self.route.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut u) = self.urgent.take() else {
            return;
        };
        if shut {
            u.chan.shutdown();
        }
        if let Some(h) = u.handle.take() {
            let _ = h.join();
        }
        let st = &self.ctx.stats;
        let pages = u.pages.load(Ordering::Relaxed);
        Stats::add(&st.postcopy_requests, u.requests.load(Ordering::Relaxed));
        Stats::add(&st.postcopy_preempt_pages, pages);
        Stats::add(&st.normal, pages);
        Stats::add(&st.transferred, u.bytes.load(Ordering::Relaxed));
    }

    /// Postcopy-paused until a recovery succeeds: `migrate resume=true` gives a new channel,
    /// the destination says per block what it has (RECV_BITMAP), the rest is to send again,
    /// POSTCOPY_RESUME / RESUME_ACK, and postcopy goes on. Any failure on the way pauses
    /// again, ready for the next attempt.
    fn pause_and_recover(&mut self, why: SourceError) -> Result<(), SourceError> {
        let ctx = self.ctx;
        ctx.pauses.fetch_add(1, Ordering::Relaxed);
        slog::warn!(ctx.log, "postcopy link failed: paused"; "error" => %why);
        self.out.chan.shutdown();
        self.stop_urgent(true);
        ctx.state.transition(MigrationStatus::PostcopyPaused)?;
        // The old return path thread ends with its socket; requests pending at the
        // destination are sent again after the recovery.
        self.rp = None;
        self.requests.clear();
        self.shut = None;
        self.postcopy_live = false;
        self.wait_and_recover()
    }

    /// In postcopy-paused: takes recoveries until one succeeds.
    fn wait_and_recover(&mut self) -> Result<(), SourceError> {
        let ctx = self.ctx;
        loop {
            let Some(rec) = ctx.wait_recovery() else {
                return Err(SourceError::Cancelled);
            };
            let crate::engine::migration::Recovery::Source(uri, fd) = rec else {
                continue;
            };
            let t0 = Instant::now();
            match self.recover(uri, fd) {
                Ok(()) => {
                    let took = t0.elapsed();
                    ctx.record_recovery(took);
                    slog::info!(ctx.log, "postcopy recovered"; "ms" => took.as_secs_f64() * 1000.0);
                    return Ok(());
                }
                Err(e) => {
                    slog::warn!(ctx.log, "postcopy recovery failed: paused again"; "error" => %e);
                    ctx.pauses.fetch_add(1, Ordering::Relaxed);
                    self.out.chan.shutdown();
                    self.rp = None;
                    let _ = ctx.state.transition(MigrationStatus::PostcopyPaused);
                    if !e.is_link_failure() && !matches!(e, SourceError::Recovery(_)) {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn recover(
        &mut self,
        uri: crate::transport::Uri,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), SourceError> {
        let ctx = self.ctx;
        ctx.state
            .transition(MigrationStatus::PostcopyRecoverSetup)?;
        let name = uri.to_string();
        let chan = match fd {
            Some(fd) => Channel::from_fd(name.trim_start_matches("fd:"), fd),
            None => Channel::connect(&uri, |_| None, &ctx.cancel),
        }
        .map_err(|e| SourceError::Recovery(e.to_string()))?
        .with_cancel(ctx.cancel.clone());
        if !chan.is_socket {
            return Err(SourceError::Recovery(format!("{name} is not a socket")));
        }
        let chan = Arc::new(chan);
        if let Ok(fd) = chan.try_clone_fd() {
            ctx.set_channel(Some(fd));
        }
        ctx.state.transition(MigrationStatus::PostcopyRecover)?;
        let rp_fd = chan
            .try_clone_fd()
            .map_err(|e| SourceError::Recovery(e.to_string()))?;
        let names: Vec<(String, u64)> = self
            .blocks
            .iter()
            .map(|b| (b.block.id.clone(), b.block.size))
            .collect();
        let rx = spawn_rp_reader(
            Channel::from_fd("return-path", rp_fd)
                .map_err(|e| SourceError::Recovery(e.to_string()))?,
            names,
            self.route.clone(),
            self.gate.clone(),
            ctx.log.clone(),
        );
        self.rp = Some(rx);
        self.out.set_channel(chan.clone());
        chan.set_send_buffer(POSTCOPY_SNDBUF);
        let t = ctx.params().link_timeout;
        chan.set_timeouts((t > 0).then(|| Duration::from_millis(t)));
        self.gate.expect_bitmaps(self.blocks.len());
        // No header on a recovery channel: straight to the bitmap requests.
        for bt in &self.blocks {
            let name = bt.block.id.clone();
            self.out.put(|o| {
                let mut p = Vec::new();
                stream::put_str8(&mut p, &name)?;
                stream::encode_command(o, wire::command::RECV_BITMAP, &p)
            })?;
        }
        self.out.flush()?;
        let mut got = vec![false; self.blocks.len()];
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        while got.iter().any(|g| !g) {
            match self.next_rp(deadline)? {
                RpEvent::Bitmap(bi, words) => {
                    // What the destination lacks is what is left to send.
                    let bt = &mut self.blocks[bi];
                    let pages = bt.block.pages();
                    for (i, t) in bt.todo.iter().enumerate() {
                        let have = words.get(i).copied().unwrap_or(0);
                        let valid = if (i as u64 + 1) * 64 <= pages {
                            u64::MAX
                        } else {
                            (1u64 << (pages % 64)) - 1
                        };
                        t.store(!have & valid, Ordering::Release);
                    }
                    got[bi] = true;
                }
                RpEvent::Request(r) => self.queue_request(r),
                other => {
                    return Err(SourceError::Recovery(format!(
                        "unexpected {other:?} during recovery"
                    )))
                }
            }
        }
        if ctx.caps().postcopy_preempt {
            // A new preempt channel to the new address, after the main one (QEMU's order).
            self.connect_preempt(&uri).map_err(SourceError::Recovery)?;
        }
        self.out
            .put(|o| stream::encode_command(o, wire::command::POSTCOPY_RESUME, &[]))?;
        self.out.flush()?;
        loop {
            match self.next_rp(deadline)? {
                RpEvent::ResumeAck(1) => break,
                RpEvent::ResumeAck(v) => {
                    return Err(SourceError::Recovery(format!("RESUME_ACK {v}, expected 1")))
                }
                RpEvent::Request(r) => self.queue_request(r),
                other => {
                    return Err(SourceError::Recovery(format!(
                        "unexpected {other:?} during recovery"
                    )))
                }
            }
        }
        let left: u64 = self.blocks.iter().map(|b| b.count()).sum();
        ctx.stats
            .remaining
            .store(left * PAGE as u64, Ordering::Relaxed);
        ctx.state.transition(MigrationStatus::PostcopyActive)?;
        self.arm_link_timeout();
        Ok(())
    }

    /// The next return-path event before `deadline`.
    fn next_rp(&mut self, deadline: Instant) -> Result<RpEvent, SourceError> {
        let rx = self
            .rp
            .as_ref()
            .ok_or_else(|| SourceError::Link("no return path".into()))?;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(RpEvent::Error(e)) => Err(SourceError::Peer(e)),
            Ok(RpEvent::LinkDown(e)) => Err(SourceError::Link(e)),
            Ok(RpEvent::Shut(v)) if v != 0 => Err(shut_error(v)),
            Ok(RpEvent::Pong) => {
                self.last_pong = Instant::now();
                self.next_rp(deadline)
            }
            Ok(ev) => Ok(ev),
            Err(_) => Err(SourceError::Link(
                "the destination did not answer in time".into(),
            )),
        }
    }

    /// The next pages still to send (at most POSTCOPY_CHUNK, within one bitmap word), taken
    /// out of the to-do set.
    fn next_word(&mut self) -> Option<(usize, usize, u64)> {
        while self.cursor.0 < self.blocks.len() {
            let (bi, wi) = self.cursor;
            let bt = &self.blocks[bi];
            let Some(w) = bt.todo.get(wi).map(|w| w.load(Ordering::Acquire)) else {
                self.cursor = (bi + 1, 0);
                continue;
            };
            if w == 0 {
                self.cursor = (bi, wi + 1);
                continue;
            }
            let mut chunk = 0u64;
            let mut rest = w;
            for _ in 0..POSTCOPY_CHUNK {
                if rest == 0 {
                    break;
                }
                chunk |= rest & rest.wrapping_neg();
                rest &= rest - 1;
            }
            // The preempt sender may have taken some of these meanwhile: keep what we got.
            let got = bt.take(wi, chunk);
            if got == 0 {
                continue;
            }
            return Some((bi, wi, got));
        }
        None
    }

    /// Sends the requested pages that are still to send, each request in its own PART,
    /// flushed at once. Pages already sent are in flight and are not sent again.
    fn serve_requests(&mut self) -> Result<(), SourceError> {
        self.check_rp_all()?;
        if self.urgent.is_some() {
            // Requests that reached this queue anyway go to the preempt sender.
            let route = self.route.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = route.as_ref() {
                for r in self.requests.drain(..) {
                    // A full queue drops the request: the push sends the page anyway.
                    let _ = tx.try_send(r);
                }
            }
            return Ok(());
        }
        while let Some(r) = self.requests.pop_front() {
            Stats::add(&self.ctx.stats.postcopy_requests, 1);
            let block = self.blocks[r.block].block.clone();
            let mut sent = false;
            for (wi, mask) in r.words() {
                let word = self.blocks[r.block].take(wi, mask);
                if word != 0 {
                    if !sent {
                        self.out.put(|o| {
                            stream::encode_section_part(o, SectionKind::Part, RAM_SECTION_ID);
                            Ok(())
                        })?;
                        sent = true;
                    }
                    self.send_word(&block, r.block, wi, word, &mut None)?;
                }
            }
            if sent {
                self.out.put(|o| {
                    ram::encode_eos(o);
                    stream::encode_footer(o, RAM_SECTION_ID);
                    Ok(())
                })?;
                self.out.flush()?;
            }
        }
        Ok(())
    }

    /// Takes every return-path event that is waiting.
    fn check_rp_all(&mut self) -> Result<(), SourceError> {
        loop {
            let before = self.requests.len();
            let had_shut = self.shut;
            self.check_rp()?;
            if self.requests.len() == before && self.shut == had_shut {
                return Ok(());
            }
        }
    }

    /// Sleeps up to `d`, returning early when a page request arrives.
    fn wait_for_request(&mut self, d: Duration) -> Result<(), SourceError> {
        let d = self.ping_interval().map_or(d, |p| d.min(p));
        let Some(rx) = &self.rp else {
            std::thread::sleep(d);
            return Ok(());
        };
        match rx.recv_timeout(d) {
            Ok(RpEvent::Request(r)) => self.queue_request(r),
            Ok(RpEvent::Pong) => self.last_pong = Instant::now(),
            Ok(RpEvent::Shut(0)) => self.shut = Some(0),
            Ok(RpEvent::Shut(v)) => return Err(shut_error(v)),
            Ok(RpEvent::Error(e)) => return Err(SourceError::Peer(e)),
            Ok(RpEvent::LinkDown(e)) => return Err(SourceError::Link(e)),
            Ok(other) => {
                return Err(SourceError::Peer(format!(
                    "unexpected return-path message {other:?}"
                )))
            }
            Err(_) => {}
        }
        Ok(())
    }

    /// Waits for the destination's SHUT, ignoring late requests for pages in flight.
    fn wait_shut(&mut self) -> Result<(), SourceError> {
        if self.rp.is_none() || self.shut.is_some() {
            self.rp = None;
            return Ok(());
        }
        let deadline = Instant::now() + SHUT_TIMEOUT;
        loop {
            self.keepalive()?;
            let step = self
                .ping_interval()
                .unwrap_or(SHUT_TIMEOUT)
                .min(deadline.saturating_duration_since(Instant::now()));
            let Some(rx) = &self.rp else { return Ok(()) };
            match rx.recv_timeout(step) {
                Ok(RpEvent::Shut(0)) => {
                    self.rp = None;
                    return Ok(());
                }
                Ok(RpEvent::Shut(v)) => return Err(shut_error(v)),
                Ok(RpEvent::Error(e)) => return Err(SourceError::Peer(e)),
                Ok(RpEvent::LinkDown(e)) => return Err(SourceError::Link(e)),
                Ok(RpEvent::Pong) => self.last_pong = Instant::now(),
                Ok(RpEvent::Request(_)) => continue,
                Ok(other) => {
                    return Err(SourceError::Peer(format!(
                        "unexpected return-path message {other:?}"
                    )))
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(_) => return Err(SourceError::Peer("no SHUT from the destination".into())),
            }
        }
    }

    /// In postcopy with a link timeout: pings the destination at a quarter of the timeout,
    /// and declares the link dead when no PONG came for the whole timeout.
    fn keepalive(&mut self) -> Result<(), SourceError> {
        let (Some(interval), true) = (self.ping_interval(), self.postcopy_live) else {
            return Ok(());
        };
        if self.last_pong.elapsed() > interval * 4 && self.last_ping_sent > self.last_pong {
            return Err(SourceError::Link(format!(
                "no answer from the destination for {} ms",
                self.last_pong.elapsed().as_millis()
            )));
        }
        if self.last_ping_sent.elapsed() >= interval {
            self.ping_seq = self.ping_seq.wrapping_add(1);
            let v = self.ping_seq;
            self.out
                .put(|o| stream::encode_command(o, wire::command::PING, &v.to_be_bytes()))?;
            self.out.flush()?;
            self.last_ping_sent = Instant::now();
        }
        Ok(())
    }

    fn ping_interval(&self) -> Option<Duration> {
        let t = self.ctx.params().link_timeout;
        (t > 0).then(|| Duration::from_millis(t / 4))
    }

    /// Arms the link timeout on the channel once postcopy runs (precopy may idle for long,
    /// e.g. in pre-switchover).
    fn arm_link_timeout(&mut self) {
        let t = self.ctx.params().link_timeout;
        self.out
            .chan
            .set_timeouts((t > 0).then(|| Duration::from_millis(t)));
        self.postcopy_live = true;
        self.last_pong = Instant::now();
        self.last_ping_sent = Instant::now() - Duration::from_secs(3600);
    }
}

/// Runs of set bits as (byte offset, byte length).
fn bit_runs(bits: &[u64]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start: Option<u64> = None;
    let total = bits.len() as u64 * 64;
    for i in 0..=total {
        let set = i < total && bits[(i / 64) as usize] & (1 << (i % 64)) != 0;
        match (set, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s * PAGE as u64, (i - s) * PAGE as u64));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// A new helper takes over a postcopy migration whose source helper died: the parent
/// passed the same memfds (its guest is stopped). What is left to send comes entirely from
/// the destination's received bitmaps in the recovery; until then it is postcopy-paused,
/// waiting for `migrate resume=true`.
pub fn adopt(ctx: &MigrationCtx, blocks: Vec<Arc<RamBlock>>) -> Result<(), SourceError> {
    let t0 = Instant::now();
    let (placeholder, _) =
        std::os::unix::net::UnixStream::pair().map_err(|source| SourceError::Io {
            peer: "socketpair".into(),
            sent: 0,
            source,
        })?;
    // Replaced by the recovery channel before anything is written.
    let chan = Arc::new(Channel::from_unix(placeholder, "none".into()));
    let mut src = Source::new(ctx, &blocks, chan, None);
    // An adopted migration is in postcopy from the start.
    src.gate.postcopy.store(true, Ordering::Release);
    ctx.stats
        .total
        .store(blocks.iter().map(|b| b.size).sum(), Ordering::Relaxed);
    ctx.state.transition(MigrationStatus::PostcopyPaused)?;
    slog::info!(ctx.log, "adopted a paused postcopy migration"; "blocks" => blocks.len());
    src.wait_and_recover()?;
    loop {
        match src.postcopy_push() {
            Ok(()) => break,
            Err(e) if e.is_link_failure() => src.pause_and_recover(e)?,
            Err(e) => return Err(e),
        }
    }
    ctx.stats.remaining.store(0, Ordering::Relaxed);
    ctx.stats
        .total_time_us
        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    slog::info!(ctx.log, "migration summary";
        "role" => "source (adopted)",
        "bytes" => src.out.sent,
        "pages" => ctx.stats.normal.load(Ordering::Relaxed),
        "postcopy_requests" => ctx.stats.postcopy_requests.load(Ordering::Relaxed),
    );
    ctx.state.transition(MigrationStatus::Completed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs() {
        assert_eq!(bit_runs(&[0b1011]), vec![(0, 8192), (12288, 4096)]);
        assert_eq!(bit_runs(&[u64::MAX, 1]), vec![(0, 65 * 4096)]);
        assert!(bit_runs(&[0, 0]).is_empty());
    }
}
