//! Postcopy on the destination: the parent's userfaultfd. Missing-page faults in the parent's
//! mappings are read here, mapped to a block and offset, and requested from the source over
//! the return path; arriving pages are placed atomically with UFFDIO_COPY (UFFDIO_ZEROPAGE for
//! zero pages), which also wakes the faulting threads.
//!
//! The fault thread sleeps in poll(2) on the userfaultfd and its stop token's eventfd: it
//! wakes for a fault or to end, never on a tick.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use nix::poll::PollFlags;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd};

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::engine::destination::bitmap::AtomicBitmap;
use crate::engine::destination::place::{Page, PageData};
use crate::engine::destination::return_path::RpWriter;
use crate::engine::migration::Latency;
use crate::memory::block::RamBlock;
use crate::transport::{wait_fd, CancelToken, Woke};

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FaultError {
    #[error("fd {name:?} is not a userfaultfd ({source})")]
    Proc {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {name:?} is not a userfaultfd ({link})")]
    NotUserfaultfd { name: String, link: String },
    #[error("postcopy needs userfaultfd-set on the destination")]
    NoUserfaultfd,
    #[error("postcopy needs host-addr for RAM block {0:?}")]
    NoHostAddr(String),
    #[error("fault at {addr:#x}, outside every RAM block")]
    OutsideBlocks { addr: u64 },
    #[error("placing {what} at {block:?} offset {offset:#x}: outside the block")]
    PlaceOutside {
        what: &'static str,
        block: String,
        offset: u64,
    },
    #[error("placing {what} at {block:?} offset {offset:#x}: {source}")]
    Place {
        what: &'static str,
        block: String,
        offset: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("userfaultfd: {0}")]
    Poll(#[source] std::io::Error),
    #[error("userfaultfd: {0}")]
    Read(#[source] userfaultfd::Error),
    #[error("cannot create the fault thread's eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the fault thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the fault thread panicked")]
    Panicked,
}

/// Checks that an fd is a userfaultfd (its /proc link names the anon inode).
pub(crate) fn check_userfaultfd(name: &str, fd: &OwnedFd) -> Result<(), FaultError> {
    let link =
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|source| {
            FaultError::Proc {
                name: name.into(),
                source,
            }
        })?;
    let s = link.to_string_lossy();
    if s != "anon_inode:[userfaultfd]" {
        return Err(FaultError::NotUserfaultfd {
            name: name.into(),
            link: s.into_owned(),
        });
    }
    Ok(())
}

/// Requested pages not yet placed, with the time their fault was read.
#[derive(Default)]
struct Pending {
    pages: HashMap<(usize, u64), Instant>,
}

/// The destination's postcopy state shared by the loader, the fault thread and the preempt
/// thread.
pub(crate) struct PostcopyDest {
    blocks: Vec<Arc<RamBlock>>,
    uffd: Uffd,
    /// Per block: pages present in the parent's memory (received, or zero and skipped).
    pub(crate) received: Arc<Vec<AtomicBitmap>>,
    pending: Mutex<Pending>,
    /// Signalled whenever a pending page is settled (see `wait_requested`).
    settled: Condvar,
    /// Per block: the pages in `pending`, readable without the lock, so that the loader can
    /// tell at no cost whether an arriving page has a thread waiting for it.
    requested: Vec<AtomicBitmap>,
    /// How many pages `pending` holds, readable without the lock.
    waiting: AtomicU64,
    /// Requests recorded so far: it only grows (`waiting` also falls), so the loader can
    /// tell that a page was requested since it last looked among the records it has read.
    asked: AtomicU64,
    rp: Arc<RpWriter>,
    latency: Arc<Latency>,
    requests: Arc<AtomicU64>,
    /// Ends the fault thread's wait at once.
    stop: CancelToken,
    log: slog::Logger,
}

impl PostcopyDest {
    /// Takes the parent's userfaultfd; every block must have a host address.
    pub(crate) fn new(
        blocks: Vec<Arc<RamBlock>>,
        uffd: OwnedFd,
        rp: Arc<RpWriter>,
        latency: Arc<Latency>,
        requests: Arc<AtomicU64>,
        received: Arc<Vec<AtomicBitmap>>,
        log: slog::Logger,
    ) -> Result<Self, FaultError> {
        for b in &blocks {
            if b.host_addr.is_none() {
                return Err(FaultError::NoHostAddr(b.id.clone()));
            }
        }
        let stop = CancelToken::new().map_err(FaultError::EventFd)?;
        // SAFETY: we own the fd; Uffd takes it over.
        let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
        let requested = blocks
            .iter()
            .map(|b| AtomicBitmap::new(b.pages()))
            .collect();
        Ok(PostcopyDest {
            requested,
            waiting: AtomicU64::new(0),
            asked: AtomicU64::new(0),
            blocks,
            uffd,
            received,
            pending: Mutex::default(),
            settled: Condvar::new(),
            rp,
            latency,
            requests,
            stop,
            log,
        })
    }

    fn host(&self, bi: usize, offset: u64) -> *mut libc::c_void {
        let base = self.blocks[bi].host_addr.unwrap_or(0);
        (base + offset) as *mut libc::c_void
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes a settled request; true if it was pending.
    fn settle(&self, p: &mut Pending, bi: usize, page: u64) -> Option<Instant> {
        let t = p.pages.remove(&(bi, page));
        if t.is_some() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.settled.notify_all();
        }
        t
    }

    fn placed(&self, bi: usize, page: u64) {
        self.received[bi].set(page);
        // Pairs with the fence in `fault`: either this sees the request, or the fault
        // thread sees the page received.
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.requested[bi].get(page) {
            return;
        }
        self.requested[bi].clear(page);
        let t = {
            let mut p = self.lock();
            self.settle(&mut p, bi, page)
        };
        if let Some(t) = t {
            self.latency.record(t.elapsed());
        }
    }

    /// Places one received page: the postcopy placement of every channel.
    pub(crate) fn place(&self, page: &Page<'_>) -> Result<(), FaultError> {
        match page.data {
            PageData::Fill(0) => self.place_zero(page.bi, page.offset),
            PageData::Fill(f) => self.place_pages(page.bi, page.offset, &[f; TARGET_PAGE_SIZE]),
            PageData::Bytes(d) => self.place_pages(page.bi, page.offset, d),
        }
    }

    /// Places consecutive pages with one UFFDIO_COPY (one ioctl and one wake for the run);
    /// when some page of the run is already present (EEXIST: it arrived twice, or the
    /// parent had it), falls back to page by page.
    pub(crate) fn place_pages(
        &self,
        bi: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<(), FaultError> {
        self.place_from(bi, offset, data.as_ptr(), data.len() as u64)
    }

    /// [`PostcopyDest::place_pages`] from `len` bytes at `src` in this process, which only
    /// the kernel reads (UFFDIO_COPY's copy_from_user): a mapped file, say. Where it cannot
    /// read them the copy fails with EFAULT.
    pub(crate) fn place_from(
        &self,
        bi: usize,
        offset: u64,
        src: *const u8,
        len: u64,
    ) -> Result<(), FaultError> {
        self.check_range(bi, offset, len, "page")?;
        let b = &self.blocks[bi];
        let copy = |off: u64, from: *const u8, n: u64| {
            // SAFETY: dst is inside the parent's registered mapping of this block
            // (host-addr, size; checked above); src is only read by the kernel, which
            // fails the copy with EFAULT where it cannot.
            unsafe {
                self.uffd
                    .copy(from.cast(), self.host(bi, off), n as usize, true)
            }
        };
        let failed = |off: u64, source| FaultError::Place {
            what: "page",
            block: b.id.clone(),
            offset: off,
            source,
        };
        let per_page = match copy(offset, src, len) {
            Ok(n) if n as u64 == len => false,
            Ok(_) | Err(userfaultfd::Error::PartiallyCopied(_)) => true,
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => true,
            Err(e) => return Err(failed(offset, e)),
        };
        if per_page {
            for i in 0..len / PAGE {
                let off = offset + i * PAGE;
                match copy(off, src.wrapping_add((i * PAGE) as usize), PAGE) {
                    Ok(_) => {}
                    Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {}
                    Err(e) => return Err(failed(off, e)),
                }
            }
        }
        for p in offset / PAGE..(offset + len) / PAGE {
            self.placed(bi, p);
        }
        Ok(())
    }

    /// Checks that `len` bytes at `offset` are whole pages inside block `bi`.
    fn check_range(
        &self,
        bi: usize,
        offset: u64,
        len: u64,
        what: &'static str,
    ) -> Result<(), FaultError> {
        let b = &self.blocks[bi];
        if len == 0
            || len % PAGE != 0
            || offset % PAGE != 0
            || offset.checked_add(len).is_none_or(|e| e > b.size)
        {
            return Err(FaultError::PlaceOutside {
                what,
                block: b.id.clone(),
                offset,
            });
        }
        Ok(())
    }

    fn place_zero(&self, bi: usize, offset: u64) -> Result<(), FaultError> {
        self.check_range(bi, offset, PAGE, "zero page")?;
        let b = &self.blocks[bi];
        // SAFETY: inside the parent's registered mapping of this block (checked above).
        match unsafe {
            self.uffd
                .zeropage(self.host(bi, offset), TARGET_PAGE_SIZE, true)
        } {
            Ok(_) => {}
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {}
            Err(source) => {
                return Err(FaultError::Place {
                    what: "zero page",
                    block: b.id.clone(),
                    offset,
                    source,
                })
            }
        }
        self.placed(bi, offset / PAGE);
        Ok(())
    }

    /// A zero page of the stream, in postcopy: every page the source sends then was
    /// discarded here first (POSTCOPY_RAM_DISCARD), so it is a hole, and a hole reads as
    /// zero. It is only marked received, at the cost of a bit: placing it would allocate and
    /// clear a page in the kernel, about a microsecond, and a mostly-zero guest's stream
    /// holds tens of thousands of zero records in the socket alone, all in front of a
    /// requested page (p99 14-19 ms in `cargo bench --bench postcopy` with 90 % zero pages).
    /// A later fault on it is served at once from here (`fault`), and `finish` unregisters
    /// the rest. A page a thread already waits for is placed, since only that wakes it.
    pub(crate) fn skip_zero(&self, bi: usize, offset: u64) -> Result<(), FaultError> {
        self.check_range(bi, offset, PAGE, "zero page")?;
        let page = offset / PAGE;
        self.received[bi].set(page);
        // Pairs with the fence in `fault`: either the fault thread sees the page received
        // (and maps a zero page itself), or this sees its request.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.requested[bi].get(page) {
            return self.place_zero(bi, offset);
        }
        Ok(())
    }

    /// Places `len` bytes of zero pages at `offset` with one UFFDIO_ZEROPAGE (falling back
    /// to page by page when some are present already, EEXIST): a hole run of an on-demand
    /// restore, which serves its faults from a file with no stream to skip zero pages in.
    pub(crate) fn place_zeros(&self, bi: usize, offset: u64, len: u64) -> Result<(), FaultError> {
        self.check_range(bi, offset, len, "zero pages")?;
        let b = &self.blocks[bi];
        // SAFETY: inside the parent's registered mapping of this block (checked above).
        let run = unsafe {
            self.uffd
                .zeropage(self.host(bi, offset), len as usize, true)
        };
        match run {
            Ok(n) if n as u64 == len => {
                for p in offset / PAGE..(offset + len) / PAGE {
                    self.placed(bi, p);
                }
                Ok(())
            }
            Ok(_) | Err(userfaultfd::Error::ZeropageFailed(_)) => {
                for off in (offset..offset + len).step_by(TARGET_PAGE_SIZE) {
                    self.place_zero(bi, off)?;
                }
                Ok(())
            }
            Err(source) => Err(FaultError::Place {
                what: "zero pages",
                block: b.id.clone(),
                offset,
                source,
            }),
        }
    }

    /// The parent's userfaultfd, for a thread that serves faults itself (an on-demand
    /// restore reads them here and places from its file).
    pub(crate) fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    fn block_of(&self, addr: u64) -> Option<(usize, u64)> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            let base = b.host_addr?;
            (addr >= base && addr - base < b.size).then(|| (i, (addr - base) & !(PAGE - 1)))
        })
    }

    /// Handles one fault: requests the page, or resolves it at once when the page is
    /// already here (a zero page the loader skipped, or a race with its arrival).
    fn fault(&self, addr: u64) -> Result<(), FaultError> {
        let (bi, offset) = self
            .block_of(addr)
            .ok_or(FaultError::OutsideBlocks { addr })?;
        let page = offset / PAGE;
        if self.received[bi].get(page) {
            // Present in our books but missing in the mapping: a zero page that was never
            // written (a hole). Map a zero page; EEXIST means it raced in, so just wake.
            // SAFETY: inside the parent's registered mapping of this block (`block_of`).
            match unsafe {
                self.uffd
                    .zeropage(self.host(bi, offset), TARGET_PAGE_SIZE, true)
            } {
                Ok(_) => {}
                Err(_) => {
                    let _ = self.uffd.wake(self.host(bi, offset), TARGET_PAGE_SIZE);
                }
            }
            return Ok(());
        }
        {
            let mut p = self.lock();
            if p.pages.contains_key(&(bi, page)) {
                return Ok(());
            }
            p.pages.insert((bi, page), Instant::now());
            self.waiting.fetch_add(1, Ordering::AcqRel);
            self.requested[bi].set(page);
            // After the bit: whoever sees the new count sees the request.
            self.asked.fetch_add(1, Ordering::Release);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.received[bi].get(page) {
            // Placed between the check above and the request being recorded: `placed` may
            // have missed the request, so settle it here (a pending entry left behind would
            // hold up the end of a postcopy-preempt migration).
            let timed = {
                let mut p = self.lock();
                self.settle(&mut p, bi, page).is_none()
            };
            if timed {
                // `placed` saw the request and timed it: count it with the requests, so
                // that `postcopy-latency-dist` sums to `postcopy-requests` (the request
                // itself need not go).
                self.requests.fetch_add(1, Ordering::Relaxed);
            }
            self.requested[bi].clear(page);
            let _ = self.uffd.wake(self.host(bi, offset), TARGET_PAGE_SIZE);
            return Ok(());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self
            .rp
            .request(&self.blocks[bi].id, offset, TARGET_PAGE_SIZE as u32)
        {
            // The link is down: the request stays pending and is sent again after the
            // recovery; the faulting thread keeps waiting.
            slog::debug!(self.log, "page request not sent"; "error" => %e);
        }
        // The page may have been placed between our check and the request: then the request
        // is merely redundant (the source skips pages it already sent).
        Ok(())
    }

    /// The fault thread: reads the userfaultfd until `stop`.
    pub(crate) fn run(&self) -> Result<(), FaultError> {
        // A vCPU waits while this thread sleeps: ask to be scheduled ahead of the threads
        // pushing and placing background pages.
        crate::engine::priority::raise(&self.log, "fault");
        let mut buf = userfaultfd::EventBuffer::new(64);
        loop {
            match wait_fd(self.uffd.as_fd(), PollFlags::POLLIN, &self.stop, None) {
                Ok(Woke::Ready) => {}
                Ok(Woke::Interrupted) => return Ok(()),
                // No deadline: only a spurious wake-up.
                Ok(Woke::TimedOut) => continue,
                Err(e) => return Err(FaultError::Poll(e)),
            }
            let events = self.uffd.read_events(&mut buf).map_err(FaultError::Read)?;
            for ev in events {
                match ev.map_err(FaultError::Read)? {
                    Event::Pagefault { addr, .. } => self.fault(addr as u64)?,
                    other => {
                        slog::debug!(self.log, "userfaultfd event ignored"; "event" => format!("{other:?}"))
                    }
                }
            }
        }
    }

    /// Wakes the fault thread to end.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// After the last page: unregisters the blocks from the parent's userfaultfd, so pages
    /// that stayed holes (zero pages never written) read as zero without a fault thread.
    /// Only after success: on failure a missing page must keep faulting, never read as zero.
    pub(crate) fn finish(&self) {
        for b in &self.blocks {
            if let Some(base) = b.host_addr {
                if let Err(e) = self
                    .uffd
                    .unregister(base as *mut libc::c_void, b.size as usize)
                {
                    slog::warn!(self.log, "UFFDIO_UNREGISTER failed"; "block" => &b.id, "error" => %e);
                }
            }
        }
    }

    /// After a recovery: asks again for every page still pending.
    pub(crate) fn resend_pending(&self) {
        let pending: Vec<(usize, u64)> = self.lock().pages.keys().copied().collect();
        for (bi, page) in pending {
            if self.received[bi].get(page) {
                continue;
            }
            if let Err(e) =
                self.rp
                    .request(&self.blocks[bi].id, page * PAGE, TARGET_PAGE_SIZE as u32)
            {
                slog::debug!(self.log, "page request not sent again"; "error" => %e);
            }
        }
    }

    /// Whether a thread of the parent waits for this page (it was requested, not placed).
    pub(crate) fn is_requested(&self, bi: usize, page: u64) -> bool {
        self.requested.get(bi).is_some_and(|r| r.get(page))
    }

    /// Whether any thread of the parent waits for a page, without taking a lock.
    pub(crate) fn anyone_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// How many requests have been recorded (see `asked`).
    pub(crate) fn asked(&self) -> u64 {
        self.asked.load(Ordering::Acquire)
    }

    fn missing(&self, p: &Pending) -> usize {
        p.pages
            .keys()
            .filter(|&&(bi, page)| !self.received[bi].get(page))
            .count()
    }

    /// Waits until every requested page has arrived (a pending entry whose page is here by
    /// now does not count), woken as each is settled; at most `limit`. Returns how many are
    /// still missing.
    pub(crate) fn wait_requested(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut p = self.lock();
        loop {
            let n = self.missing(&p);
            let now = Instant::now();
            if n == 0 || now >= deadline {
                return n;
            }
            p = self
                .settled
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
