//! The multifd sender: RAM pages in packets over the multifd channels, as QEMU 10.0's
//! `multifd.c` and `multifd-nocomp.c` send them. The pass thread fills a packet with pages
//! of one block ([`Multifd::queue`]) and hands it to the next channel with room, from
//! where the last one went (QEMU's `multifd_send`); each channel's thread (`channel.rs`)
//! detects zero pages, numbers the packet and writes its header and the pages straight from
//! guest memory in one `writev`. [`Multifd::sync`] is QEMU's `multifd_ram_flush_and_sync`
//! without the main channel's record: the partial packet goes, every channel writes a SYNC
//! packet after what it has queued, and the call returns once all have.
//!
//! The pass thread waits on a condvar that the channels notify. A cancel reaches the
//! channels as every other channel of the migration: the mailbox holds them (the control
//! layer registers them) and shuts them down, so that a thread blocked in `writev` on a
//! stalled peer returns; its failed write then counts as the cancel.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::compat::wire::multifd::PAGES_PER_PACKET;
use crate::compat::ZeroPageDetection;
use crate::engine::migration::{MigrationCtx, Stats};
use crate::engine::source::error::MultifdError;
use crate::engine::source::mapped_ram::{ChannelFile, FileIo, FileMap};
use crate::engine::source::SourceError;
use crate::memory::block::RamBlock;
use crate::transport::{CancelToken, Channel};

mod channel;
#[cfg(test)]
mod tests;

/// Packets a channel holds, the one it is writing included (QEMU holds one): a second one
/// lets the pass thread run ahead of a channel's `writev`.
const DEPTH: usize = 2;
/// Low bit of a queued page offset (offsets are page-aligned): the page is a known hole,
/// never to be read through the mapping.
const HOLE: u64 = 1;

/// What a channel is asked to send.
enum Job {
    /// Pages of block `block`: offsets, [`HOLE`] marking holes.
    Pages { block: usize, pages: Vec<u64> },
    /// A SYNC packet, after everything queued before it.
    Sync,
}

#[derive(Default)]
struct Lane {
    queue: VecDeque<Job>,
    /// Writing a job taken from the queue.
    busy: bool,
    /// SYNC packets written.
    synced: u64,
    /// Its thread waits for work (notify it).
    waiting: bool,
    /// Its thread has returned.
    ended: bool,
}

impl Lane {
    fn has_room(&self) -> bool {
        !self.ended && self.queue.len() + usize::from(self.busy) < DEPTH
    }
}

#[derive(Default)]
struct State {
    lanes: Vec<Lane>,
    /// The first channel failure, for the pass thread.
    error: Option<MultifdError>,
    /// A channel's write failed because the migration was cancelled.
    cancelled: bool,
    /// The end: channel threads return once their queue is empty.
    closing: bool,
    /// Failure or cancel: channel threads return at once.
    abort: bool,
    /// The pass thread waits for a channel event (notify it).
    pass_waiting: bool,
}

/// What the pass thread and the channel threads share.
struct Shared {
    state: Mutex<State>,
    /// One per channel: work was queued (or the end came).
    work: Vec<Condvar>,
    /// For the pass thread: a channel finished a job, failed or ended.
    events: Condvar,
    /// QEMU's `packet_num`: one counter over all channels, every packet.
    packet_num: AtomicU64,
    /// Written by the channels since the pass thread last folded them into the stats.
    bytes: AtomicU64,
    normal: AtomicU64,
    zero: AtomicU64,
    /// Zero pages listed in the packets (`multifd`), else every queued page is data.
    detect_zero: bool,
    /// The migration's cancel token: tells a cancel from a failure.
    cancel: CancelToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Flags and queues: a panicking holder cannot leave them half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the pass thread if it waits.
    fn notify_pass(&self, g: &State) {
        if g.pass_waiting {
            self.events.notify_one();
        }
    }

    /// Fails everything: channel threads stop, the pass thread wakes.
    fn abort_all(&self, g: &mut State) {
        g.abort = true;
        for c in &self.work {
            c.notify_one();
        }
        self.events.notify_all();
    }
}

/// The pass thread's side of the multifd channels.
pub(crate) struct Multifd {
    shared: Arc<Shared>,
    chans: Vec<Arc<Channel>>,
    threads: Vec<JoinHandle<()>>,
    /// Where the search for a channel with room starts (QEMU's `next_channel`).
    next: usize,
    /// The packet being filled: its block and pages.
    fill: Option<(usize, Vec<u64>)>,
    /// SYNC rounds asked for.
    syncs: u64,
    zero_on_main: bool,
    per_section: bool,
    /// mapped-ram: file channels; no MULTIFD_FLUSH record on the main channel.
    mapped: bool,
    /// Multifd bytes folded into the stats so far.
    written: u64,
    /// Of those, bytes the bandwidth limit has not counted yet.
    unthrottled: u64,
}

impl Multifd {
    /// Starts one thread per channel (`qmh-mfd-send-K`); None
    /// without channels (the `multifd` capability off).
    ///
    /// With mapped-ram (`file`: the blocks' places in the file, laid out already), the
    /// channels are file channels: each writes its pages at their places with its own fd
    /// and nothing else (no packet headers, no SYNC packets).
    pub(crate) fn start(
        ctx: &MigrationCtx,
        blocks: &[Arc<RamBlock>],
        chans: Vec<Channel>,
        file: Option<&Arc<FileMap>>,
    ) -> Result<Option<Self>, SourceError> {
        if chans.is_empty() {
            return Ok(None);
        }
        let params = ctx.params();
        let mode = params.zero_page_detection();
        let n = chans.len();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lanes: (0..n).map(|_| Lane::default()).collect(),
                ..State::default()
            }),
            work: (0..n).map(|_| Condvar::new()).collect(),
            events: Condvar::new(),
            packet_num: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            normal: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            detect_zero: mode == ZeroPageDetection::Multifd,
            cancel: ctx.mailbox.cancel_token().clone(),
        });
        let chans: Vec<Arc<Channel>> = chans
            .into_iter()
            .map(|c| {
                c.tune_buffers();
                Arc::new(c)
            })
            .collect();
        let mut m = Multifd {
            shared,
            chans,
            threads: Vec::with_capacity(n),
            next: 0,
            fill: None,
            syncs: 0,
            zero_on_main: mode == ZeroPageDetection::Legacy,
            // mapped-ram always syncs per round, and only locally (QEMU's
            // `multifd_ram_sync_per_section`, MULTIFD_SYNC_LOCAL).
            per_section: file.is_none() && params.multifd_flush_after_each_section(),
            mapped: file.is_some(),
            written: 0,
            unthrottled: 0,
        };
        // On an error below, dropping `m` stops and joins what was started.
        for (id, chan) in m.chans.iter().enumerate() {
            let id8 = u8::try_from(id).unwrap_or(u8::MAX);
            let cf = match file {
                Some(map) => Some(ChannelFile {
                    io: FileIo::of(chan)
                        .map_err(|source| MultifdError::File { id: id8, source })?,
                    map: map.clone(),
                }),
                None => None,
            };
            let t = channel::spawn(id8, chan.clone(), blocks.to_vec(), m.shared.clone(), cf)
                .map_err(|source| MultifdError::Spawn { id: id8, source })?;
            m.threads.push(t);
        }
        slog::info!(ctx.log, "multifd channels"; "channels" => n, "zero_page_detection" => mode.as_str(),
            "flush_after_each_section" => m.per_section);
        Ok(Some(m))
    }

    /// `zero-page-detection=legacy`: the pass thread sends zero pages as ZERO records on
    /// the main channel; only the others come here.
    pub(crate) fn zero_on_main(&self) -> bool {
        self.zero_on_main
    }

    /// Sync before every EOS of a RAM section, without a FLUSH record (QEMU <= 8.0).
    pub(crate) fn per_section(&self) -> bool {
        self.per_section
    }

    /// After a per-round sync: the main channel's MULTIFD_FLUSH record follows (not under
    /// mapped-ram, whose destination rejects it, nor per section).
    pub(crate) fn flush_record(&self) -> bool {
        !self.per_section && !self.mapped
    }

    /// Adds the page at `off` of block `bi` (a page of it) to the packet being filled; a
    /// page of another block, or a full packet, sends the packet first.
    pub(crate) fn queue(&mut self, bi: usize, off: u64, hole: bool) -> Result<(), SourceError> {
        let entry = off | if hole { HOLE } else { 0 };
        match &mut self.fill {
            Some((b, pages)) if *b == bi && pages.len() < PAGES_PER_PACKET as usize => {
                pages.push(entry);
                return Ok(());
            }
            Some(_) => self.dispatch()?,
            None => {}
        }
        let mut pages = Vec::with_capacity(PAGES_PER_PACKET as usize);
        pages.push(entry);
        self.fill = Some((bi, pages));
        Ok(())
    }

    /// Hands the packet being filled to the next channel with room, waiting for one.
    fn dispatch(&mut self) -> Result<(), SourceError> {
        let Some((block, pages)) = self.fill.take() else {
            return Ok(());
        };
        let n = self.chans.len();
        let next = self.next;
        let mut job = Some(Job::Pages { block, pages });
        let shared = &self.shared;
        let id = self.wait(|g| {
            let id = (0..n)
                .map(|i| (next + i) % n)
                .find(|&i| g.lanes[i].has_room())?;
            let lane = &mut g.lanes[id];
            lane.queue.extend(job.take());
            if lane.waiting {
                shared.work[id].notify_one();
            }
            Some(id)
        })?;
        self.next = (id + 1) % n;
        Ok(())
    }

    /// QEMU's flush and sync: the partial packet goes, then every channel writes a SYNC
    /// packet after what it has queued; returns once all have (the caller then writes the
    /// main channel's FLUSH record, or the EOS, behind every page sent so far).
    pub(crate) fn sync(&mut self) -> Result<(), SourceError> {
        self.dispatch()?;
        self.syncs += 1;
        {
            let mut g = self.shared.lock();
            for (id, lane) in g.lanes.iter_mut().enumerate() {
                lane.queue.push_back(Job::Sync);
                if lane.waiting {
                    self.shared.work[id].notify_one();
                }
            }
        }
        let target = self.syncs;
        self.wait(|g| g.lanes.iter().all(|l| l.synced >= target).then_some(()))
    }

    /// Waits on the channels' events until `ready` (run under the lock) gives a value; a
    /// channel's failure or a cancel ends the wait with its error.
    fn wait<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> Result<T, SourceError> {
        let mut g = self.shared.lock();
        loop {
            if g.cancelled {
                return Err(SourceError::Cancelled);
            }
            if let Some(e) = g.error.take() {
                self.shared.abort_all(&mut g);
                return Err(e.into());
            }
            if g.abort {
                // Failed before (the error already returned once).
                return Err(SourceError::Cancelled);
            }
            if let Some(v) = ready(&mut g) {
                return Ok(v);
            }
            g.pass_waiting = true;
            g = self
                .shared
                .events
                .wait(g)
                .unwrap_or_else(|e| e.into_inner());
            g.pass_waiting = false;
        }
    }

    /// Moves what the channels counted since the last call into the migration's stats.
    pub(crate) fn fold(&mut self, ctx: &MigrationCtx) {
        let s = &self.shared;
        let bytes = s.bytes.swap(0, Ordering::Relaxed);
        if bytes == 0 {
            return;
        }
        let st = &ctx.stats;
        Stats::add(&st.transferred, bytes);
        Stats::add(&st.multifd_bytes, bytes);
        Stats::add(&st.normal, s.normal.swap(0, Ordering::Relaxed));
        Stats::add(&st.duplicate, s.zero.swap(0, Ordering::Relaxed));
        self.written += bytes;
        self.unthrottled += bytes;
    }

    /// Folds the stats; returns the bytes written since the last call (for the bandwidth
    /// limit), those folded by a sync included.
    pub(crate) fn throttle_bytes(&mut self, ctx: &MigrationCtx) -> u64 {
        self.fold(ctx);
        std::mem::take(&mut self.unthrottled)
    }

    /// Bytes written on the multifd channels, as folded so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// The end, after the last sync: the channel threads return, the channels close
    /// (QEMU sends nothing more on them). Returns the bytes written on them.
    pub(crate) fn close(mut self, ctx: &MigrationCtx) -> Result<u64, SourceError> {
        self.dispatch()?;
        {
            let mut g = self.shared.lock();
            g.closing = true;
            for c in &self.shared.work {
                c.notify_one();
            }
        }
        self.join();
        let err = self.shared.lock().error.take();
        if err.is_none() {
            // Under TLS each channel's session ends with close_notify, which a QEMU 10.0
            // destination requires (a cut would otherwise pass for the end).
            for c in &self.chans {
                if let Err(e) = c.close_notify() {
                    slog::warn!(ctx.log, "multifd: could not end the TLS session";
                        "channel" => &c.peer, "error" => %e);
                }
            }
        }
        // The peer sees the end now, even while the mailbox still holds a copy of each
        // socket for cancel (until the migration thread ends).
        for c in &self.chans {
            c.shutdown();
        }
        self.fold(ctx);
        match err {
            Some(e) => Err(e.into()),
            None => Ok(self.written),
        }
    }

    fn join(&mut self) {
        for t in self.threads.drain(..) {
            // A channel thread that panicked has reported itself as gone.
            let _ = t.join();
        }
    }
}

impl Drop for Multifd {
    /// Not closed: the migration failed or was cancelled. The sockets are shut down so
    /// that a thread blocked in `writev` returns, then every thread is joined.
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        {
            let mut g = self.shared.lock();
            self.shared.abort_all(&mut g);
        }
        for c in &self.chans {
            c.shutdown();
        }
        self.join();
    }
}
