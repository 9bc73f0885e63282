//! The postcopy sink: from POSTCOPY_LISTEN (or an adoption) on, pages are placed through
//! the parent's userfaultfd. It owns the fault thread, the postcopy-preempt channel, the
//! staging of runs of background pages and the look-ahead for requested pages. It starts
//! without a stream: an adopted migration has none until its recovery.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::engine::destination::bitmap::AtomicBitmap;
use crate::engine::destination::error::LinkError;
use crate::engine::destination::fault::{FaultError, PostcopyDest};
use crate::engine::destination::lookahead::{self, ScanMark};
use crate::engine::destination::place::{BlockCursor, Page, PageData};
use crate::engine::destination::preempt::{PreemptChannel, PreemptConn, PreemptError};
use crate::engine::destination::return_path::RpWriter;
use crate::engine::migration::MigrationCtx;
use crate::memory::block::RamBlock;

/// Pages per UFFDIO_COPY: large enough to amortise the ioctl, small enough that a requested
/// page behind a run of background pages is placed soon.
const STAGE_PAGES: usize = 32;

/// Zero pages skipped (left holes) between two reads of what has arrived while a vCPU
/// waits: a zero page is a 9-byte record, so reading after each would be a system call per
/// few bytes of stream.
const SKIPPED_PER_READ: u32 = 256;

/// Consecutive postcopy pages of data gathered for one UFFDIO_COPY.
#[derive(Default)]
struct Staged {
    block: usize,
    start: u64,
    data: Vec<u8>,
}

impl Staged {
    fn pages(&self) -> u64 {
        (self.data.len() / TARGET_PAGE_SIZE) as u64
    }
}

/// The fault thread and how it ended.
struct FaultThread {
    handle: Option<JoinHandle<Result<(), FaultError>>>,
    /// Set before the thread shuts the channel down on failure, so that the loader, woken
    /// by that, finds the thread's error by joining it.
    failed: Arc<AtomicBool>,
    error: Option<Arc<FaultError>>,
}

impl FaultThread {
    /// The thread's failure, once it has failed (joined then).
    fn failure(&mut self) -> Option<Arc<FaultError>> {
        let done = self
            .handle
            .as_ref()
            .is_some_and(|h| self.failed.load(Ordering::Acquire) || h.is_finished());
        if done {
            if let Some(h) = self.handle.take() {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.error = Some(Arc::new(e)),
                    Err(_) => self.error = Some(Arc::new(FaultError::Panicked)),
                }
            }
        }
        self.error.clone()
    }
}

pub(crate) struct PostcopySink {
    pc: Arc<PostcopyDest>,
    faults: FaultThread,
    preempt: Option<PreemptChannel>,
    staged: Staged,
    /// Where the last look-ahead for requested pages stopped (see `place_requested_ahead`).
    mark: ScanMark,
    /// The main channel placed a run or a page, or skipped `SKIPPED_PER_READ` zero pages,
    /// since `take_placed`.
    placed: bool,
    /// Zero pages skipped since `placed` was last set for them.
    skipped: u32,
}

impl PostcopySink {
    /// Takes the parent's userfaultfd and starts the fault thread. On a fault-handling
    /// error the loader may be blocked reading the stream: the thread shuts `wake` (the
    /// main channel) down, and the fault error is what gets reported.
    pub(crate) fn start(
        ctx: &MigrationCtx,
        blocks: &[Arc<RamBlock>],
        uffd: OwnedFd,
        rp: Arc<RpWriter>,
        received: Arc<Vec<AtomicBitmap>>,
        wake: Option<OwnedFd>,
    ) -> Result<Self, FaultError> {
        let pc = Arc::new(PostcopyDest::new(
            blocks.to_vec(),
            uffd,
            rp,
            ctx.latency.clone(),
            ctx.stats.postcopy_requests.clone(),
            received,
            ctx.log.clone(),
        )?);
        let failed = Arc::new(AtomicBool::new(false));
        let (t, f, log) = (pc.clone(), failed.clone(), ctx.log.clone());
        let handle = std::thread::Builder::new()
            .name("qmh-faults".into())
            .spawn(move || {
                let r = t.run();
                if let Err(e) = &r {
                    slog::error!(log, "fault handling stopped"; "error" => %e);
                    f.store(true, Ordering::Release);
                    if let Some(fd) = &wake {
                        crate::transport::shutdown_fd(fd);
                    }
                }
                r
            })
            .map_err(FaultError::Spawn)?;
        Ok(PostcopySink {
            pc,
            faults: FaultThread {
                handle: Some(handle),
                failed,
                error: None,
            },
            preempt: None,
            staged: Staged::default(),
            mark: ScanMark::default(),
            placed: false,
            skipped: 0,
        })
    }

    /// The fault thread's failure, if it failed.
    pub(crate) fn fault_failure(&mut self) -> Option<Arc<FaultError>> {
        self.faults.failure()
    }

    /// Starts taking the postcopy-preempt channel on `incoming`, replacing the channel of
    /// a link that failed.
    pub(crate) fn start_preempt(
        &mut self,
        ctx: &MigrationCtx,
        blocks: &[Arc<RamBlock>],
        conn: PreemptConn,
        main: Option<OwnedFd>,
    ) -> Result<(), PreemptError> {
        if let Some(old) = self.preempt.take() {
            let _ = old.stop();
        }
        if let Some(b) = blocks
            .iter()
            .find(|b| b.page_size != TARGET_PAGE_SIZE as u64)
        {
            return Err(PreemptError::HugePages(b.id.clone()));
        }
        self.preempt = Some(PreemptChannel::spawn(
            conn,
            self.pc.clone(),
            blocks.to_vec(),
            ctx.stats.postcopy_preempt_pages.clone(),
            main,
            ctx.log.clone(),
            (ctx.securer(), ctx.link_timeout()),
        )?);
        Ok(())
    }

    /// Stops the preempt channel (the source closes it too when it pauses).
    pub(crate) fn stop_preempt(&mut self) {
        if let Some(p) = self.preempt.take() {
            // How it ended does not matter any more: it failed into the pause, or ended.
            let _ = p.stop();
        }
    }

    /// Places a page that came on the main channel: pages of bytes are staged into runs,
    /// zero pages are left holes (`PostcopyDest::skip_zero`), other fills are placed at once.
    pub(crate) fn place(&mut self, page: &Page<'_>) -> Result<(), FaultError> {
        match page.data {
            PageData::Bytes(data) => self.stage(page.bi, page.offset, data),
            PageData::Fill(0) => {
                self.skipped += 1;
                if self.skipped >= SKIPPED_PER_READ {
                    self.skipped = 0;
                    self.placed = true;
                }
                self.pc.skip_zero(page.bi, page.offset)
            }
            PageData::Fill(_) => {
                self.flush_staged()?;
                self.placed = true;
                self.pc.place(page)
            }
        }
    }

    /// Adds a page of data to the staged run. A page that does not extend the run (another
    /// block, not next, the run full) places the run first.
    fn stage(&mut self, bi: usize, offset: u64, data: &[u8]) -> Result<(), FaultError> {
        let page = TARGET_PAGE_SIZE as u64;
        if self.pc.received[bi].get(offset / page) {
            // Placed already, ahead of the stream (see place_requested_ahead).
            return self.flush_staged();
        }
        let st = &self.staged;
        let full = st.data.len() >= STAGE_PAGES * TARGET_PAGE_SIZE;
        if st.pages() > 0 && (st.block != bi || st.start + st.pages() * page != offset || full) {
            self.flush_staged()?;
        }
        if self.staged.pages() == 0 {
            self.staged.block = bi;
            self.staged.start = offset;
        }
        self.staged.data.extend_from_slice(data);
        // A page a thread waits for is placed now, not when the run is full: QEMU goes on
        // sending the pages after a requested one, so the run would otherwise keep growing.
        if self.pc.is_requested(bi, offset / page) {
            self.flush_staged()?;
        }
        Ok(())
    }

    pub(crate) fn flush_staged(&mut self) -> Result<(), FaultError> {
        let st = &mut self.staged;
        if st.data.is_empty() {
            return Ok(());
        }
        let r = self.pc.place_pages(st.block, st.start, &st.data);
        st.data.clear();
        self.placed = true;
        r
    }

    pub(crate) fn anyone_waiting(&self) -> bool {
        self.pc.anyone_waiting()
    }

    /// Places the pages that threads of the parent wait for among those already read
    /// (`data`, at stream offset `at`; `cursor` is the in-order pass's block context),
    /// before the rest are placed in stream order. A requested page arrives behind a full
    /// socket buffer of background pages; this places it as soon as it is read instead of
    /// after all of them. The walk goes on from where the last one stopped, or from the
    /// in-order position when a page was requested since (see `ScanMark::start`). It
    /// reports nothing: the in-order pass validates every record again (and skips the pages
    /// placed here).
    pub(crate) fn place_requested_ahead(
        &mut self,
        blocks: &[Arc<RamBlock>],
        data: &[u8],
        at: u64,
        cursor: BlockCursor,
        ram_section: Option<u32>,
    ) {
        if !self.pc.anyone_waiting() {
            return;
        }
        // A staged run holding a page that was requested after it was staged.
        let first = self.staged.start / TARGET_PAGE_SIZE as u64;
        if (0..self.staged.pages()).any(|i| self.pc.is_requested(self.staged.block, first + i))
            && self.flush_staged().is_err()
        {
            return;
        }
        // Read before the walk: a request that comes during it makes the next one start over.
        let asked = self.pc.asked();
        let (pos, cursor) = self.mark.start(at, data.len(), cursor, asked);
        let pc = &self.pc;
        let (to, cursor) = lookahead::scan(
            blocks,
            data,
            pos,
            cursor,
            ram_section,
            |bi, page| pc.is_requested(bi, page),
            // On failure the in-order pass meets the same page and reports the error.
            |page| pc.place(page).is_ok(),
        );
        self.mark = ScanMark {
            to: at + to as u64,
            cursor,
            asked,
        };
    }

    /// Whether a page was requested since the last look-ahead: the records it walked are
    /// to be walked again.
    pub(crate) fn asked_since_scan(&self) -> bool {
        self.pc.asked() != self.mark.asked
    }

    /// Whether the main channel placed something (a run, or a zero page) since the last
    /// call: the loader reads what has arrived after each (see `Loader::keep_drained`).
    pub(crate) fn take_placed(&mut self) -> bool {
        std::mem::take(&mut self.placed)
    }

    /// A new link (a recovery): its stream offsets start again, so where the last
    /// look-ahead stopped means nothing on it.
    pub(crate) fn new_link(&mut self) {
        self.mark = ScanMark::default();
    }

    /// Before SHUT: every requested page must be in place, and some may still be on the
    /// preempt channel (the source closes it only after SHUT). Waits for them (woken as
    /// each is placed) at most `limit`, then stops reading it. `main` is shut down when
    /// they do not come, so that the source sees the pause too (it waits for SHUT).
    pub(crate) fn finish_preempt(
        &mut self,
        limit: Duration,
        main: Option<&OwnedFd>,
    ) -> Result<(), LinkError> {
        let Some(p) = self.preempt.take() else {
            return Ok(());
        };
        let missing = self.pc.wait_requested(limit);
        let _ = p.stop();
        if missing > 0 {
            // Never fail here: neither side has the whole guest. Treated as a broken link,
            // this pauses, and a recovery sends what is missing.
            if let Some(fd) = main {
                crate::transport::shutdown_fd(fd);
            }
            return Err(LinkError::RequestedMissing {
                missing,
                ms: limit.as_millis(),
            });
        }
        Ok(())
    }

    /// Every page has arrived: the fault thread's work is over (see `PostcopyDest::finish`).
    pub(crate) fn finish(&self) {
        self.pc.finish();
    }

    /// Stops and joins the preempt and fault threads.
    pub(crate) fn stop(&mut self) {
        self.stop_preempt();
        self.pc.stop();
        if let Some(h) = self.faults.handle.take() {
            if let Ok(Err(e)) = h.join() {
                self.faults.error = Some(Arc::new(e));
            }
        }
    }

    /// Pages requested before a recovery: asked for again on the new link.
    pub(crate) fn resend_pending(&self) {
        self.pc.resend_pending();
    }
}

impl Drop for PostcopySink {
    fn drop(&mut self) {
        self.stop();
    }
}
