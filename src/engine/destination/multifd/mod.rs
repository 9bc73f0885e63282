//! The multifd receivers (QEMU's `multifd_recv_thread`, `multifd_ram_unfill_packet` and
//! `multifd_recv_sync_main`): one thread per channel reads each packet's 1344-byte header,
//! checks every page against its block, then reads the page data with `readv` straight into
//! the guest's pages. Zero pages are written as zeros unless the page is known to be a
//! hole still.
//!
//! Sync: a thread that reads a SYNC packet (after placing its pages) reports it and waits.
//! The loader, at a MULTIFD_FLUSH record (or at each RAM EOS under
//! flush-after-each-section, compat 7.2), waits until every channel has reported, then
//! releases them all: every page sent before the flush is in memory before the main
//! channel's next record is placed.
//!
//! The threads are scoped to the load and stopped (their sockets shut down) on every path:
//! at the end of the stream, at POSTCOPY_LISTEN, on any failure. A failing thread shuts the
//! main channel down, so that a loader blocked reading it returns, and its error is the one
//! reported.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crate::compat::wire::multifd::{FLAG_SYNC, PACKET_HEADER_LEN, PAGES_PER_PACKET};
use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::engine::destination::bitmap::AtomicBitmap;
use crate::engine::destination::error::LoadError;
use crate::engine::destination::place::{self, PlaceError};
use crate::engine::destination::precopy::KnownZero;
use crate::engine::migration::{MigrationCtx, Stats};
use crate::memory::block::RamBlock;
use crate::memory::page::IoVecs;
use crate::transport::{wait_fd, CancelToken, Channel, Woke};
use crate::wire::multifd::{decode_packet_header, PacketHeader};
use crate::wire::stream::WireError;

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// Why a multifd channel failed. `packet` counts the packets of the channel from 1.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MultifdError {
    #[error("packet {packet} on the channel: bad header: {source}")]
    Header {
        packet: u64,
        #[source]
        source: WireError,
    },
    /// An unknown block, or an offset outside the block: nothing of the packet was written.
    #[error("packet {packet} on the channel (packet number {num}): {source}")]
    Page {
        packet: u64,
        num: u64,
        #[source]
        source: PlaceError,
    },
    #[error("packet {packet} on the channel: the channel closed {got} bytes into the {what} ({want} bytes)")]
    Truncated {
        packet: u64,
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("packet {packet} on the channel: reading the {what}: {source}")]
    Io {
        packet: u64,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the channel closed before reaching the sync point the main channel waits for")]
    ClosedBeforeSync,
    #[error("no packet came on any channel for {ms} ms (precopy-timeout) while the main channel waited for this one's sync point")]
    SilentAtSync { ms: u128 },
    #[error("cannot start its receiver thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("its receiver thread panicked")]
    Panicked,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    Receiving,
    /// Read a SYNC packet; waits to be released.
    AtSync,
    /// The thread ended: EOF at a packet boundary, stopped, or failed.
    Ended,
}

struct State {
    status: Vec<Status>,
    /// The first failure: the channel and why.
    failure: Option<(usize, MultifdError)>,
    /// Stopping: the threads end, and what fails from here on is a consequence.
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Threads at their sync point wait here for the release (or the stop).
    released: Condvar,
    /// Wakes the loader waiting for the sync points: a thread reached one, or ended.
    kick: CancelToken,
    /// A failure is recorded (readable without the lock).
    failed: AtomicBool,
    /// Packets read on all channels: progress, for the sync's timeout.
    packets: AtomicU64,
    /// The main channel: shut down when a thread fails, so that the loader returns.
    main: Option<OwnedFd>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A thread read a SYNC packet: reports it and waits for the release. False when
    /// stopped instead.
    fn reached_sync(&self, ch: usize) -> bool {
        let mut st = self.lock();
        if st.stop {
            return false;
        }
        st.status[ch] = Status::AtSync;
        self.kick.cancel();
        while st.status[ch] == Status::AtSync && !st.stop {
            st = self.released.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        !st.stop
    }
}

/// Marks its channel ended and wakes the loader, however the thread ends (a panic too).
struct Ending<'a> {
    shared: &'a Shared,
    ch: usize,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.shared.lock().status[self.ch] = Status::Ended;
        self.shared.kick.cancel();
    }
}

/// The receivers of one load.
pub(crate) struct Multifd<'s> {
    shared: Arc<Shared>,
    /// Per channel: a second handle on its socket, shut down to end a blocked read.
    socks: Vec<OwnedFd>,
    threads: Vec<ScopedJoinHandle<'s, ()>>,
    /// Sync at every RAM EOS (QEMU 8.0 and older), instead of at MULTIFD_FLUSH only.
    pub(crate) flush_each_section: bool,
    cancel: CancelToken,
    /// `precopy-timeout`: how long a sync may wait with no packet arriving.
    timeout: Option<Duration>,
}

/// What a receiver thread needs: all borrowed for the load, or shared.
struct Receiver<'s> {
    ch: usize,
    chan: Channel,
    blocks: &'s [Arc<RamBlock>],
    known_zero: KnownZero,
    received: Arc<Vec<AtomicBitmap>>,
    stats: &'s Stats,
    shared: Arc<Shared>,
    log: slog::Logger,
}

impl<'s> Multifd<'s> {
    /// Starts a receiver thread per channel (in id order). `main` is a second handle on the
    /// main channel, for a failing thread to shut down.
    pub(crate) fn start<'env>(
        scope: &'s Scope<'s, 'env>,
        ctx: &'s MigrationCtx,
        blocks: &'s [Arc<RamBlock>],
        chans: Vec<Channel>,
        known_zero: KnownZero,
        received: Arc<Vec<AtomicBitmap>>,
        main: Option<OwnedFd>,
    ) -> Result<Self, LoadError> {
        let kick = CancelToken::new().map_err(LoadError::MultifdWait)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                status: vec![Status::Receiving; chans.len()],
                failure: None,
                stop: false,
            }),
            released: Condvar::new(),
            kick,
            failed: AtomicBool::new(false),
            packets: AtomicU64::new(0),
            main,
        });
        // Built up one channel at a time: on a failure the part started is stopped by Drop.
        let mut m = Multifd {
            shared: shared.clone(),
            socks: Vec::new(),
            threads: Vec::new(),
            flush_each_section: ctx.params().multifd_flush_after_each_section(),
            cancel: ctx.mailbox.cancel_token().clone(),
            timeout: ctx.precopy_timeout(),
        };
        for (ch, chan) in chans.into_iter().enumerate() {
            let fail = |source| LoadError::Multifd {
                channel: ch,
                source: MultifdError::Spawn(source),
            };
            m.socks.push(chan.try_clone_fd().map_err(fail)?);
            let r = Receiver {
                ch,
                chan,
                blocks,
                known_zero: known_zero.clone(),
                received: received.clone(),
                stats: &ctx.stats,
                shared: shared.clone(),
                log: ctx.log.clone(),
            };
            let h = std::thread::Builder::new()
                .name(format!("qmh-mfd-recv-{ch}"))
                .spawn_scoped(scope, move || {
                    // It only moves pages from the socket it was handed into guest memory.
                    crate::sandbox::enter_thread(crate::sandbox::ThreadKind::ChannelMover);
                    r.run()
                });
            match h {
                Ok(h) => m.threads.push(h),
                Err(e) => {
                    // The channel's status must not wait for a thread that never ran.
                    m.shared.lock().status[ch] = Status::Ended;
                    return Err(fail(e));
                }
            }
        }
        Ok(m)
    }

    /// A thread's failure, as soon as it is known.
    pub(crate) fn check(&self) -> Result<(), LoadError> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.shared.lock().failure.take() {
            Some((channel, source)) => Err(LoadError::Multifd { channel, source }),
            None => Ok(()),
        }
    }

    /// Waits until every channel has reached its sync point, then releases them all. Fails
    /// when a channel failed or ended first, on cancel, or when no packet arrived on any
    /// channel for `precopy-timeout` (a silent peer: nothing reads the main channel, whose
    /// own timeout would tell, meanwhile).
    pub(crate) fn sync(&self) -> Result<(), LoadError> {
        let mut seen = self.shared.packets.load(Ordering::Relaxed);
        let mut deadline = self.timeout.map(|t| Instant::now() + t);
        loop {
            {
                let mut st = self.shared.lock();
                if let Some((channel, source)) = st.failure.take() {
                    return Err(LoadError::Multifd { channel, source });
                }
                if let Some(channel) = st.status.iter().position(|&s| s == Status::Ended) {
                    return Err(LoadError::Multifd {
                        channel,
                        source: MultifdError::ClosedBeforeSync,
                    });
                }
                if st.status.iter().all(|&s| s == Status::AtSync) {
                    st.status.fill(Status::Receiving);
                    self.shared.released.notify_all();
                    return Ok(());
                }
            }
            // A thread changes the state before it kicks: a kick after the check above
            // leaves the fd readable, one before it is seen by the check.
            match wait_fd(
                self.shared.kick.as_fd(),
                nix::poll::PollFlags::POLLIN,
                &self.cancel,
                deadline,
            ) {
                Ok(Woke::Interrupted) => return Err(LoadError::Cancelled),
                Ok(Woke::TimedOut) => {
                    let now = self.shared.packets.load(Ordering::Relaxed);
                    if now == seen {
                        return Err(self.silent());
                    }
                    // Packets still arrive: the channels are slow, not silent.
                    seen = now;
                    deadline = self.timeout.map(|t| Instant::now() + t);
                    continue;
                }
                Ok(Woke::Ready) => {}
                Err(e) => return Err(LoadError::MultifdWait(e)),
            }
            self.shared.kick.reset();
        }
    }

    /// The sync timed out: names the first channel that has not reached it.
    fn silent(&self) -> LoadError {
        let st = self.shared.lock();
        let channel = st
            .status
            .iter()
            .position(|&s| s != Status::AtSync)
            .unwrap_or(0);
        LoadError::Multifd {
            channel,
            source: MultifdError::SilentAtSync {
                ms: self.timeout.unwrap_or_default().as_millis(),
            },
        }
    }

    /// Stops the threads (their sockets shut down) and joins them; the first failure from
    /// before the stop, if any.
    pub(crate) fn finish(mut self) -> Result<(), LoadError> {
        self.stop();
        let failure = self.shared.lock().failure.take();
        if let Some((channel, source)) = failure {
            return Err(LoadError::Multifd { channel, source });
        }
        Ok(())
    }

    fn stop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.released.notify_all();
        for s in &self.socks {
            crate::transport::shutdown_fd(s);
        }
        for (ch, h) in self.threads.drain(..).enumerate() {
            if h.join().is_err() {
                let mut st = self.shared.lock();
                if st.failure.is_none() {
                    st.failure = Some((ch, MultifdError::Panicked));
                }
            }
        }
    }
}

impl Drop for Multifd<'_> {
    fn drop(&mut self) {
        // The scope would wait for threads blocked reading: end them first.
        self.stop();
    }
}

impl<'s> Receiver<'s> {
    fn run(self) {
        let _ending = Ending {
            shared: &self.shared,
            ch: self.ch,
        };
        let r = self.receive();
        let mut st = self.shared.lock();
        match r {
            Ok(packets) => {
                slog::debug!(self.log, "multifd channel ended"; "channel" => self.ch, "packets" => packets)
            }
            // Shut down to stop: not a failure.
            Err(_) if st.stop => {}
            Err(e) => {
                slog::error!(self.log, "multifd channel failed"; "channel" => self.ch, "error" => %e);
                if st.failure.is_none() {
                    st.failure = Some((self.ch, e));
                    self.shared.failed.store(true, Ordering::Release);
                }
                drop(st);
                if let Some(fd) = &self.shared.main {
                    crate::transport::shutdown_fd(fd);
                }
            }
        }
    }

    /// Receives packets until EOF at a packet boundary or the stop; the packets read.
    fn receive(&self) -> Result<u64, MultifdError> {
        let mut header = [0u8; PACKET_HEADER_LEN];
        let mut iov = IoVecs::with_capacity(PAGES_PER_PACKET as usize);
        let mut packet = 0u64;
        loop {
            if self.shared.lock().stop {
                return Ok(packet);
            }
            if !self.read_header(&mut header, packet + 1)? {
                return Ok(packet);
            }
            packet += 1;
            let h = match decode_packet_header(&header) {
                Ok(Some((h, _))) => h,
                Ok(None) => {
                    return Err(MultifdError::Header {
                        packet,
                        source: WireError::Invalid("multifd packet header is short".into()),
                    })
                }
                Err(source) => return Err(MultifdError::Header { packet, source }),
            };
            self.place(&h, packet, &mut iov)?;
            self.shared.packets.fetch_add(1, Ordering::Relaxed);
            Stats::add(
                &self.stats.multifd_bytes,
                (PACKET_HEADER_LEN + h.data_len()) as u64,
            );
            if h.flags & FLAG_SYNC != 0 && !self.shared.reached_sync(self.ch) {
                return Ok(packet);
            }
        }
    }

    /// Reads a whole header; false on EOF before its first byte.
    fn read_header(&self, buf: &mut [u8], packet: u64) -> Result<bool, MultifdError> {
        let mut got = 0;
        while got < buf.len() {
            match self.chan.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(MultifdError::Truncated {
                        packet,
                        what: "header",
                        got,
                        want: buf.len(),
                    })
                }
                Ok(n) => got += n,
                Err(source) => {
                    return Err(MultifdError::Io {
                        packet,
                        what: "header",
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    /// Checks every page of the packet against its block, then reads the page data into
    /// the pages and handles the zero pages.
    fn place(
        &self,
        h: &PacketHeader,
        packet: u64,
        iov: &mut IoVecs<'s>,
    ) -> Result<(), MultifdError> {
        if h.offsets.is_empty() {
            return Ok(());
        }
        let page_err = |source| MultifdError::Page {
            packet,
            num: h.packet_num,
            source,
        };
        let blocks: &'s [Arc<RamBlock>] = self.blocks;
        let bi = place::block_index(blocks, &h.ramblock).map_err(page_err)?;
        let b: &'s RamBlock = &blocks[bi];
        for &o in &h.offsets {
            place::check_offset(b, o).map_err(page_err)?;
        }
        let (known, received) = (&self.known_zero[bi], &self.received[bi]);
        iov.clear();
        // Runs of consecutive pages that are holes: allocated with one madvise each rather
        // than a page fault per page in the read.
        let mut holes = HoleRuns::new(b);
        for &o in h.normal_offsets() {
            let p = b.guest_page(o).ok_or_else(|| {
                page_err(PlaceError::Outside {
                    block: b.id.clone(),
                    offset: o,
                    size: b.size,
                })
            })?;
            // Not a hole any more, from before the first byte lands.
            if known.take(o / PAGE) {
                holes.add(o);
            }
            iov.push_page_to_fill(p);
        }
        holes.populate();
        let want = h.data_len();
        self.chan.read_exact_iovecs(iov).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                MultifdError::Truncated {
                    packet,
                    what: "page data",
                    got: want - iov.remaining(),
                    want,
                }
            } else {
                MultifdError::Io {
                    packet,
                    what: "page data",
                    source,
                }
            }
        })?;
        for &o in h.normal_offsets() {
            received.set(o / PAGE);
        }
        for &o in h.zero_offsets() {
            // QEMU leaves a page it never received alone; a preallocated guest may hold
            // anything there, so only a known hole is left as it is.
            if !known.get(o / PAGE) {
                b.fill_page(o, 0);
            }
            received.set(o / PAGE);
        }
        Stats::add(&self.stats.normal, u64::from(h.normal_pages));
        Stats::add(&self.stats.duplicate, u64::from(h.zero_pages));
        Ok(())
    }
}

/// Consecutive hole pages of one block that a packet is about to fill.
struct HoleRuns<'b> {
    block: &'b RamBlock,
    /// The run being built: start offset and length.
    run: Option<(u64, u64)>,
}

impl<'b> HoleRuns<'b> {
    fn new(block: &'b RamBlock) -> Self {
        HoleRuns { block, run: None }
    }

    /// Adds the hole page at `offset` (checked, inside the block).
    fn add(&mut self, offset: u64) {
        match &mut self.run {
            Some((start, len)) if *start + *len == offset => *len += PAGE,
            _ => {
                self.populate();
                self.run = Some((offset, PAGE));
            }
        }
    }

    /// Allocates the run built so far: one `MADV_POPULATE_WRITE` (a hint only).
    fn populate(&mut self) {
        // A single page faults as cheaply; huge pages map whole on their first touch.
        let small = self.block.page_size == PAGE;
        if let Some((start, len)) = self.run.take().filter(|r| r.1 > PAGE && small) {
            if let Some(r) = self.block.range(start, len) {
                r.populate_write();
            }
        }
    }
}

#[cfg(test)]
mod tests;
