//! What the fault thread and the fill thread share: the file (replaced by a recovery), each
//! block's place in it, the postcopy placement (`PostcopyDest`: UFFDIO_COPY and
//! UFFDIO_ZEROPAGE, the received bitmaps), and the run state (paused, done, failed) the
//! migration thread waits on. Also the fault thread itself.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use userfaultfd::Event;

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::engine::destination::fault::{FaultError, PostcopyDest};
use crate::engine::destination::mapped_ram::MappedBlock;
use crate::engine::destination::ondemand::source::Source;
use crate::engine::migration::Latency;
use crate::memory::block::RamBlock;
use crate::transport::CancelToken;

pub(super) const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// Pages a fault reads with the faulting one (the rest of its run in the bitmap, not yet
/// placed): a guest touching one page of a run often touches the next ones.
const FAULT_RUN: u64 = 16;

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    /// The file failed us (EIO, a short read: truncated): pauses, a recovery brings a new
    /// file.
    #[error(
        "reading {len} bytes of RAM block {block:?} at file offset {at:#x} from {file}: {source}"
    )]
    Read {
        file: String,
        block: String,
        at: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Place(#[from] FaultError),
}

/// What the migration thread waits for.
#[derive(Default)]
pub(super) struct Run {
    /// The file failed: why (the pause's error-desc). Faulting threads wait.
    pub(super) paused: Option<String>,
    /// Faults on data pages that came while paused: woken (they fault again) on resume.
    pub(super) deferred: Vec<u64>,
    /// The fill placed its last page: every page is here.
    pub(super) done: bool,
    /// Placement failed: fails the migration (taken by the migration thread).
    pub(super) failed: Option<ServeError>,
    /// Set with `failed`, which the migration thread takes.
    pub(super) has_failed: bool,
    /// The migration was cancelled (seen by the fault thread's poll).
    pub(super) cancelled: bool,
    /// The threads are to end.
    pub(super) stopping: bool,
}

pub(super) struct Shared<'a> {
    pub(super) pc: PostcopyDest,
    pub(super) blocks: &'a [Arc<RamBlock>],
    pub(super) mapped: Vec<MappedBlock>,
    /// The file; a recovery replaces it.
    pub(super) file: RwLock<Arc<Source>>,
    pub(super) run: Mutex<Run>,
    /// Signalled on every change of `run`, and when the fault thread is idle again.
    pub(super) changed: Condvar,
    /// Fault batches being served: the fill waits for 0 before each chunk.
    pub(super) busy: AtomicU64,
    /// Ends the fault thread's poll.
    pub(super) stop: CancelToken,
    pub(super) cancel: CancelToken,
    pub(super) latency: Arc<Latency>,
    pub(super) requests: Arc<AtomicU64>,
    /// Pages placed with data from the file, and zero pages placed.
    pub(super) data_pages: AtomicU64,
    pub(super) zero_pages: AtomicU64,
    pub(super) log: slog::Logger,
}

impl Shared<'_> {
    pub(super) fn lock(&self) -> MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the run state and wakes every waiter.
    pub(super) fn update(&self, f: impl FnOnce(&mut Run)) {
        let mut g = self.lock();
        f(&mut g);
        drop(g);
        self.changed.notify_all();
    }

    pub(super) fn pause(&self, why: &ServeError) {
        let msg = why.to_string();
        self.update(|r| {
            if r.paused.is_none() {
                r.paused = Some(msg);
            }
        });
    }

    pub(super) fn fail(&self, why: ServeError) {
        slog::error!(self.log, "on-demand restore failed"; "error" => %why);
        self.update(|r| {
            if !r.has_failed {
                r.has_failed = true;
                r.failed = Some(why);
            }
        });
    }

    pub(super) fn file(&self) -> Arc<Source> {
        self.file.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a page of block `bi` has its data in the file (else it is zero).
    pub(super) fn has_data(&self, bi: usize, page: u64) -> bool {
        self.mapped[bi]
            .bitmap
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The run at `page` of block `bi`: pages of the same kind (data or hole) not yet
    /// placed, at most `max`. `page` is inside the block.
    pub(super) fn run_at(&self, bi: usize, page: u64, max: u64) -> (bool, u64) {
        let data = self.has_data(bi, page);
        let end = self.blocks[bi].pages().min(page.saturating_add(max));
        let mut n = 1;
        while page + n < end
            && self.has_data(bi, page + n) == data
            && !self.pc.received[bi].get(page + n)
        {
            n += 1;
        }
        (data, n)
    }

    /// Where block `bi`'s page `page` is in the file. `check` put the block's pages inside
    /// the file; `page` is inside the block.
    pub(super) fn file_offset(&self, bi: usize, page: u64) -> u64 {
        self.mapped[bi].header.page_at(page * PAGE)
    }

    /// The file could not be read: a pause, naming what was read.
    fn read_failed(
        &self,
        src: &Source,
        bi: usize,
        at: u64,
        len: u64,
        source: std::io::Error,
    ) -> ServeError {
        ServeError::Read {
            file: src.name.clone(),
            block: self.blocks[bi].id.clone(),
            at,
            len,
            source,
        }
    }

    /// Places the run of `n` pages at `page`: data copied from the file (from its mapping,
    /// or read into `buf` where it is not mapped), or zero pages. A short read is an error:
    /// the file shrank under us.
    pub(super) fn place(
        &self,
        bi: usize,
        page: u64,
        n: u64,
        data: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(), ServeError> {
        let len = n * PAGE;
        if !data {
            self.pc.place_zeros(bi, page * PAGE, len)?;
            self.zero_pages.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        let src = self.file();
        let at = self.file_offset(bi, page);
        match src.mapped(at, len) {
            Some(p) => {
                src.populate(p, len);
                match self.pc.place_from(bi, page * PAGE, p, len) {
                    Err(FaultError::Place {
                        source: userfaultfd::Error::CopyFailed(e),
                        ..
                    }) if e as i32 == libc::EFAULT => {
                        let why = std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the file cannot be read there (shorter than when the restore \
                             started, or an I/O error)",
                        );
                        return Err(self.read_failed(&src, bi, at, len, why));
                    }
                    r => r?,
                }
            }
            None => {
                buf.resize(len as usize, 0);
                src.file
                    .read_exact_at(buf, at)
                    .map_err(|e| self.read_failed(&src, bi, at, len, e))?;
                self.pc.place_pages(bi, page * PAGE, buf)?;
            }
        }
        self.data_pages.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn block_of(&self, addr: u64) -> Option<(usize, u64)> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            let base = b.host_addr?;
            (addr >= base && addr - base < b.size).then(|| (i, (addr - base) / PAGE))
        })
    }

    /// One fault: the page (and the rest of its run) from the file, or a zero page. While
    /// paused, a data page waits (its address is kept to wake on resume).
    fn fault(&self, addr: u64, t: Instant, buf: &mut Vec<u8>) -> Result<(), ServeError> {
        let (bi, page) = self
            .block_of(addr)
            .ok_or(FaultError::OutsideBlocks { addr })?;
        let host = (addr & !(PAGE - 1)) as *mut libc::c_void;
        if self.pc.received[bi].get(page) {
            // Placed while this fault was queued: the placement woke it, or this does.
            let _ = self.pc.uffd().wake(host, TARGET_PAGE_SIZE);
            return Ok(());
        }
        let (data, n) = self.run_at(bi, page, FAULT_RUN);
        if data {
            let mut g = self.lock();
            if g.paused.is_some() {
                g.deferred.push(addr);
                return Ok(());
            }
        }
        match self.place(bi, page, n, data, buf) {
            Ok(()) => {
                // Counted once served, with its latency: a fault deferred by a pause comes
                // again on resume and is counted then.
                self.requests.fetch_add(1, Ordering::Relaxed);
                self.latency.record(t.elapsed());
                Ok(())
            }
            Err(e @ ServeError::Read { .. }) => {
                slog::warn!(self.log, "on-demand restore: the file failed; paused"; "error" => %e);
                self.pause(&e);
                self.lock().deferred.push(addr);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// On resume: the threads that faulted while paused fault again, and are served then.
    pub(super) fn wake_deferred(&self) {
        let addrs = std::mem::take(&mut self.lock().deferred);
        for a in addrs {
            let host = (a & !(PAGE - 1)) as *mut libc::c_void;
            let _ = self.pc.uffd().wake(host, TARGET_PAGE_SIZE);
        }
    }

    /// The fault thread: sleeps in poll(2) on the userfaultfd, its stop token and the
    /// migration's cancel token.
    pub(super) fn fault_thread(&self) -> Result<(), ServeError> {
        crate::engine::priority::raise(&self.log, "on-demand faults");
        let mut events = userfaultfd::EventBuffer::new(64);
        let mut buf = Vec::with_capacity((FAULT_RUN * PAGE) as usize);
        loop {
            if self.stop.is_cancelled() {
                return Ok(());
            }
            if self.cancel.is_cancelled() {
                self.update(|r| r.cancelled = true);
                return Ok(());
            }
            let mut fds = [
                PollFd::new(self.pc.uffd().as_fd(), PollFlags::POLLIN),
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.cancel.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(FaultError::Poll(e.into()).into()),
            }
            if !fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR))
            {
                continue;
            }
            let got = self
                .pc
                .uffd()
                .read_events(&mut events)
                .map_err(FaultError::Read)?;
            self.busy.fetch_add(1, Ordering::AcqRel);
            let t = Instant::now();
            let mut result = Ok(());
            for ev in got {
                match ev.map_err(FaultError::Read) {
                    Ok(Event::Pagefault { addr, .. }) => {
                        result = self.fault(addr as u64, t, &mut buf);
                    }
                    Ok(other) => {
                        slog::debug!(self.log, "userfaultfd event ignored"; "event" => format!("{other:?}"))
                    }
                    Err(e) => result = Err(e.into()),
                }
                if result.is_err() {
                    break;
                }
            }
            self.busy.fetch_sub(1, Ordering::AcqRel);
            // Under the lock: the fill checks `busy` under it before it waits.
            self.update(|_| {});
            result?;
        }
    }
}
