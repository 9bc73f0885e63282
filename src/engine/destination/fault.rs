//! Postcopy on the destination: the parent's userfaultfd. Missing-page faults in the parent's
//! mappings are read here, mapped to a block and offset, and requested from the source over
//! the return path; arriving pages are placed atomically with UFFDIO_COPY (UFFDIO_ZEROPAGE for
//! zero pages), which also wakes the faulting threads.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd};

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::engine::migration::Latency;
use crate::memory::block::RamBlock;
use crate::transport::Channel;
use crate::wire::return_path::{self, RpMessage};

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("fd {0:?} is not a userfaultfd ({1})")]
    NotUserfaultfd(String, String),
    #[error("postcopy needs userfaultfd-set on the destination")]
    NoUserfaultfd,
    #[error("postcopy needs host-addr for RAM block {0:?}")]
    NoHostAddr(String),
    #[error("fault at {addr:#x}, outside every RAM block")]
    OutsideBlocks { addr: u64 },
    #[error("placing {what} at {block:?} offset {offset:#x}: {err}")]
    Place {
        what: &'static str,
        block: String,
        offset: u64,
        err: String,
    },
    #[error("return path: {0}")]
    ReturnPath(String),
    #[error("userfaultfd: {0}")]
    Read(String),
}

/// Checks that an fd is a userfaultfd (its /proc link names the anon inode).
pub fn check_userfaultfd(name: &str, fd: &OwnedFd) -> Result<(), FaultError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| FaultError::NotUserfaultfd(name.into(), e.to_string()))?;
    let s = link.to_string_lossy();
    if s != "anon_inode:[userfaultfd]" {
        return Err(FaultError::NotUserfaultfd(name.into(), s.into_owned()));
    }
    Ok(())
}

/// A bitmap shared between threads.
pub struct AtomicBitmap(Vec<AtomicU64>);

impl AtomicBitmap {
    pub fn new(bits: u64) -> Self {
        AtomicBitmap((0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    pub fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }
    pub fn set(&self, i: u64) {
        if let Some(w) = self.0.get((i / 64) as usize) {
            w.fetch_or(1 << (i % 64), Ordering::AcqRel);
        }
    }
    pub fn clear(&self, i: u64) {
        if let Some(w) = self.0.get((i / 64) as usize) {
            w.fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }
    /// Clears the bits of `mask` in word `w`.
    pub fn clear_mask(&self, w: usize, mask: u64) {
        if let Some(word) = self.0.get(w) {
            word.fetch_and(!mask, Ordering::AcqRel);
        }
    }
    /// The bits as words (bit i of word w = item 64w + i).
    pub fn words(&self) -> Vec<u64> {
        self.0.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
}

/// The return path's write side, shared by the loader (PONG, SHUT) and the fault thread
/// (page requests).
pub struct RpWriter {
    inner: Mutex<RpInner>,
}

struct RpInner {
    chan: Channel,
    /// The block named in the last request: REQ_PAGES may omit it.
    last_block: Option<String>,
}

impl RpWriter {
    pub fn new(chan: Channel) -> Self {
        RpWriter {
            inner: Mutex::new(RpInner {
                chan,
                last_block: None,
            }),
        }
    }

    pub fn send(&self, m: &RpMessage<'_>) -> Result<(), FaultError> {
        let mut b = Vec::with_capacity(32);
        return_path::encode(&mut b, m).map_err(|e| FaultError::ReturnPath(e.to_string()))?;
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.chan
            .write_all(&b)
            .map_err(|e| FaultError::ReturnPath(e.to_string()))
    }

    /// Continues on a new channel (postcopy recovery).
    pub fn replace(&self, chan: Channel) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.chan = chan;
        g.last_block = None;
    }

    /// The received bitmap of `block`, answering the source's RECV_BITMAP.
    pub fn send_bitmap(&self, block: &str, words: &[u64]) -> Result<(), FaultError> {
        let mut b = Vec::with_capacity(words.len() * 8 + 64);
        return_path::encode(&mut b, &RpMessage::RecvBitmap { block })
            .map_err(|e| FaultError::ReturnPath(e.to_string()))?;
        return_path::encode_bitmap_tail(&mut b, words);
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.chan
            .write_all(&b)
            .map_err(|e| FaultError::ReturnPath(e.to_string()))
    }

    /// Requests one page, naming the block only when it changed (as QEMU does).
    pub fn request(&self, block: &str, offset: u64, len: u32) -> Result<(), FaultError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let m = if g.last_block.as_deref() == Some(block) {
            RpMessage::ReqPages { offset, len }
        } else {
            RpMessage::ReqPagesId { offset, len, block }
        };
        let mut b = Vec::with_capacity(32 + block.len());
        return_path::encode(&mut b, &m).map_err(|e| FaultError::ReturnPath(e.to_string()))?;
        g.chan
            .write_all(&b)
            .map_err(|e| FaultError::ReturnPath(e.to_string()))?;
        g.last_block = Some(block.to_string());
        Ok(())
    }
}

/// The destination's postcopy state shared by the loader and the fault thread.
pub struct PostcopyDest {
    blocks: Vec<Arc<RamBlock>>,
    uffd: Uffd,
    /// Per block: pages present in the parent's memory (received, or zero and skipped).
    pub received: Arc<Vec<AtomicBitmap>>,
    /// Requested pages not yet placed, with the time their fault was read.
    pending: Mutex<HashMap<(usize, u64), Instant>>,
    /// Per block: the pages in `pending`, readable without the lock, so that the loader can
    /// tell at no cost whether an arriving page has a thread waiting for it.
    requested: Vec<AtomicBitmap>,
    /// How many pages `pending` holds, readable without the lock.
    waiting: AtomicU64,
    rp: Arc<RpWriter>,
    pub latency: Arc<Latency>,
    pub requests: Arc<AtomicU64>,
    stop: AtomicBool,
    log: slog::Logger,
}

impl PostcopyDest {
    /// Takes the parent's userfaultfd; every block must have a host address.
    pub fn new(
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
        // SAFETY: we own the fd; Uffd takes it over.
        let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
        let requested = blocks
            .iter()
            .map(|b| AtomicBitmap::new(b.pages()))
            .collect();
        Ok(PostcopyDest {
            requested,
            waiting: AtomicU64::new(0),
            blocks,
            uffd,
            received,
            pending: Mutex::new(HashMap::new()),
            rp,
            latency,
            requests,
            stop: AtomicBool::new(false),
            log,
        })
    }

    fn host(&self, bi: usize, offset: u64) -> *mut libc::c_void {
        let base = self.blocks[bi].host_addr.unwrap_or(0);
        (base + offset) as *mut libc::c_void
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
        let t = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(bi, page));
        if let Some(t) = t {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.latency.record(t.elapsed());
        }
    }

    /// Places a page the source sent. A page already present (EEXIST) is fine: it arrived
    /// twice, or the parent had it.
    pub fn place_page(&self, bi: usize, offset: u64, data: &[u8]) -> Result<(), FaultError> {
        self.place_pages(bi, offset, data)
    }

    /// Places consecutive pages with one UFFDIO_COPY (one ioctl and one wake for the run);
    /// when some page of the run is already present, falls back to page by page.
    pub fn place_pages(&self, bi: usize, offset: u64, data: &[u8]) -> Result<(), FaultError> {
        let b = &self.blocks[bi];
        let len = data.len() as u64;
        if len == 0
            || len % PAGE != 0
            || offset % PAGE != 0
            || offset.checked_add(len).is_none_or(|e| e > b.size)
        {
            return Err(FaultError::Place {
                what: "page",
                block: b.id.clone(),
                offset,
                err: "outside the block".into(),
            });
        }
        let copy = |off: u64, d: &[u8]| {
            // SAFETY: dst is inside the parent's registered mapping of this block
            // (host-addr, size; checked above), src is our buffer of d.len() bytes.
            unsafe {
                self.uffd
                    .copy(d.as_ptr() as *const _, self.host(bi, off), d.len(), true)
            }
        };
        let whole = copy(offset, data);
        let per_page = match whole {
            Ok(n) if n == data.len() => false,
            Ok(_) | Err(userfaultfd::Error::PartiallyCopied(_)) => true,
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => true,
            Err(e) => {
                return Err(FaultError::Place {
                    what: "page",
                    block: b.id.clone(),
                    offset,
                    err: format!("{e}"),
                })
            }
        };
        if per_page {
            for (i, d) in data.chunks(TARGET_PAGE_SIZE).enumerate() {
                let off = offset + i as u64 * PAGE;
                match copy(off, d) {
                    Ok(_) => {}
                    Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {}
                    Err(e) => {
                        return Err(FaultError::Place {
                            what: "page",
                            block: b.id.clone(),
                            offset: off,
                            err: format!("{e}"),
                        })
                    }
                }
            }
        }
        for p in offset / PAGE..(offset + len) / PAGE {
            self.placed(bi, p);
        }
        Ok(())
    }

    pub fn place_zero(&self, bi: usize, offset: u64) -> Result<(), FaultError> {
        let b = &self.blocks[bi];
        if offset % PAGE != 0 || offset.checked_add(PAGE).is_none_or(|e| e > b.size) {
            return Err(FaultError::Place {
                what: "zero page",
                block: b.id.clone(),
                offset,
                err: "outside the block".into(),
            });
        }
        // SAFETY: inside the parent's registered mapping of this block.
        match unsafe {
            self.uffd
                .zeropage(self.host(bi, offset), TARGET_PAGE_SIZE, true)
        } {
            Ok(_) => {}
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {}
            Err(e) => {
                return Err(FaultError::Place {
                    what: "zero page",
                    block: b.id.clone(),
                    offset,
                    err: format!("{e}"),
                })
            }
        }
        self.placed(bi, offset / PAGE);
        Ok(())
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
            // SAFETY: inside the parent's registered mapping of this block.
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
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.contains_key(&(bi, page)) {
                return Ok(());
            }
            p.insert((bi, page), Instant::now());
            self.waiting.fetch_add(1, Ordering::AcqRel);
            self.requested[bi].set(page);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.received[bi].get(page) {
            // Placed between the check above and the request being recorded: `placed` may
            // have missed the request, so settle it here (a pending entry left behind would
            // hold up the end of a postcopy-preempt migration).
            if self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(bi, page))
                .is_some()
            {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
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
    pub fn run(self: &Arc<Self>) -> Result<(), FaultError> {
        // A vCPU waits while this thread sleeps: ask to be scheduled ahead of the threads
        // pushing and placing background pages (see `preempt::raise_priority`).
        crate::engine::destination::preempt::raise_priority(&self.log, "fault");
        let mut buf = userfaultfd::EventBuffer::new(64);
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = [nix::poll::PollFd::new(
                self.uffd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(50u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(FaultError::Read(e.to_string())),
            }
            let events = match self.uffd.read_events(&mut buf) {
                Ok(ev) => ev,
                Err(e) => return Err(FaultError::Read(e.to_string())),
            };
            for ev in events {
                match ev {
                    Ok(Event::Pagefault { addr, .. }) => self.fault(addr as u64)?,
                    Ok(other) => {
                        slog::debug!(self.log, "userfaultfd event ignored"; "event" => format!("{other:?}"))
                    }
                    Err(e) => return Err(FaultError::Read(e.to_string())),
                }
            }
        }
        Ok(())
    }

    /// After the last page: unregisters the blocks from the parent's userfaultfd, so pages
    /// that stayed holes (zero pages never written) read as zero without a fault thread.
    /// Only after success: on failure a missing page must keep faulting, never read as zero.
    pub fn finish(&self) {
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

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// After a recovery: asks again for every page still pending.
    pub fn resend_pending(&self) {
        let pending: Vec<(usize, u64)> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
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
    pub fn is_requested(&self, bi: usize, page: u64) -> bool {
        self.requested.get(bi).is_some_and(|r| r.get(page))
    }

    /// Whether any thread of the parent waits for a page, without taking a lock.
    pub fn anyone_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Requested pages that are still missing (a pending entry whose page has arrived by
    /// now does not count).
    pub fn missing_requested(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|&&(bi, page)| !self.received[bi].get(page))
            .count()
    }

    /// Pages requested and not yet placed.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn wait_stop_timeout() -> Duration {
        Duration::from_millis(200)
    }
}

// The Uffd handle is used from the loader and the fault thread; its ioctls are thread safe.
unsafe impl Send for PostcopyDest {}
unsafe impl Sync for PostcopyDest {}
