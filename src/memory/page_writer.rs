//! Writes received precopy pages into the parent's RAM blocks, each large batch split over
//! several threads (the `load-threads` parameter, 2 by default).
//!
//! Copying into guest memory that has never been touched is the destination's most
//! expensive step (the kernel allocates each page, and on a VM the host may have to back it
//! first). One thread doing that alone leaves the other CPUs idle while the source waits on
//! a full socket, so a batch of at least [`PER_THREAD_MIN`] pages per thread is split into
//! equal parts: worker threads write the first parts while the calling thread writes the
//! last, and `flush` returns when all are done. Batches are written in order, so a later
//! write to the same page always wins.
//!
//! Pages that were holes (fresh memory, the usual case): the calling thread writes with
//! `pwritev` (no page fault, no clearing of the new page); the workers copy through the
//! mapping, because writes to one shmem file serialise on its inode lock (measured: two
//! `pwritev` threads spent their time spinning on it) while page faults do not. Pages that
//! already exist (a preallocated guest, or a page sent again) are copied through the
//! mapping by every thread: `RamBlock::map_present` has mapped them, so a copy is all it
//! takes (measured: 0.94 s -> 0.71 s for 2 GiB into preallocated memory).

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::memory::block::RamBlock;
use crate::memory::page::Page;

/// Pages per thread below which splitting a batch costs more than it saves.
const PER_THREAD_MIN: usize = 64;
/// The most threads `load-threads` may ask for.
pub(crate) const MAX_THREADS: usize = 16;
/// Pages in one `pwritev` run (the kernel takes at most 1024 iovecs).
const RUN_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PageWriteError {
    #[error("write outside RAM block {block:?}")]
    Outside { block: String },
    #[error("writing RAM block {block:?} failed: {source}")]
    Io {
        block: String,
        #[source]
        source: std::io::Error,
    },
}

/// Consecutive pages of one block, borrowed from the buffer they were read into.
struct Run<'buf> {
    block: Arc<RamBlock>,
    start: u64,
    pages: Vec<&'buf Page>,
    /// The pages already existed in the block (were not holes) when queued.
    present: bool,
}

impl Run<'_> {
    /// Writes with `pwritev`, or through the mapping when `via_map` (see the module
    /// comment).
    fn write(&self, via_map: bool) -> Result<(), PageWriteError> {
        // hugetlbfs files cannot be written with write(2) at all: always copy there.
        let via_map = via_map || self.present || self.block.page_size != TARGET_PAGE_SIZE as u64;
        let r = if via_map {
            Ok(self
                .block
                .copy_pages_at(self.start, &self.pages, !self.present))
        } else {
            self.block.write_pages_at(self.start, &self.pages)
        };
        match r {
            Ok(true) => Ok(()),
            Ok(false) => Err(PageWriteError::Outside {
                block: self.block.id.clone(),
            }),
            Err(source) => Err(PageWriteError::Io {
                block: self.block.id.clone(),
                source,
            }),
        }
    }
}

fn write_all(runs: &[Run<'_>], via_map: bool) -> Result<(), PageWriteError> {
    runs.iter().try_for_each(|r| r.write(via_map))
}

/// Pages that may be written at the same time: no page twice.
struct Part<'buf> {
    runs: Vec<Run<'buf>>,
    pages: usize,
}

/// Received pages to write into RAM blocks, borrowed from the buffer they were read into.
/// The buffer cannot be refilled while a batch borrows it: the batch ends in
/// [`PageWriter::write`], which returns once every page is written. So "flush before
/// refill" is checked by the compiler.
///
/// Pages are written in the order queued as far as it matters: a page queued again (at or
/// below the highest page queued for its block, a page sent again in a later pass) starts
/// a new part of the batch, written after everything queued before it.
#[must_use = "a batch is written by PageWriter::write"]
pub(crate) struct PageBatch<'buf> {
    parts: Vec<Part<'buf>>,
    /// Per block in the last part (by address, only compared): the highest page offset.
    high: Vec<(usize, u64)>,
}

impl Default for PageBatch<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'buf> PageBatch<'buf> {
    pub(crate) const fn new() -> Self {
        PageBatch {
            parts: Vec::new(),
            high: Vec::new(),
        }
    }

    /// Queues `data` (one target page) for `offset` in `block`; `present` says the page
    /// already exists there (was not a hole). A page outside the block fails the write.
    /// (A record's `&[u8]` becomes a `&Page` with `try_into()`.)
    pub(crate) fn queue(
        &mut self,
        block: &Arc<RamBlock>,
        offset: u64,
        data: &'buf Page,
        present: bool,
    ) {
        let key = Arc::as_ptr(block) as usize;
        let again = match self.high.iter_mut().find(|(b, _)| *b == key) {
            Some((_, high)) if *high >= offset => true,
            Some((_, high)) => {
                *high = offset;
                false
            }
            None => {
                self.high.push((key, offset));
                false
            }
        };
        if again || self.parts.is_empty() {
            if again {
                self.high.clear();
                self.high.push((key, offset));
            }
            self.parts.push(Part {
                runs: Vec::new(),
                pages: 0,
            });
        }
        let Some(part) = self.parts.last_mut() else {
            return;
        };
        let extends = part.runs.last().is_some_and(|r| {
            Arc::ptr_eq(&r.block, block)
                && r.present == present
                && r.pages.len() < RUN_MAX
                && r.start + (r.pages.len() * TARGET_PAGE_SIZE) as u64 == offset
        });
        if !extends {
            part.runs.push(Run {
                block: block.clone(),
                start: offset,
                pages: Vec::with_capacity(64),
                present,
            });
        }
        if let Some(r) = part.runs.last_mut() {
            r.pages.push(data);
        }
        part.pages += 1;
    }
}

/// A part handed to a worker thread. Its pages' lifetime is erased to `'static` for the
/// channel; see the SAFETY comment in [`PageWriter::write_part`].
type Job = Vec<Run<'static>>;

struct Worker {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Result<(), PageWriteError>>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn() -> std::io::Result<Worker> {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(1);
        let (done_tx, done) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("qmh-writer".into())
            .spawn(move || {
                crate::sandbox::enter_thread(crate::sandbox::ThreadKind::PageMover);
                for runs in job_rx {
                    let r = write_all(&runs, true);
                    // The borrowed pages are gone before the writer is told the part is done.
                    drop(runs);
                    if done_tx.send(r).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Worker {
            jobs: Some(jobs),
            done,
            handle: Some(handle),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the job channel ends the thread.
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The workers that took a part of the batch being written. Waits for each of them, also
/// when dropped during a panic: the batch's buffer must outlive every read of it.
struct Handed<'w> {
    workers: &'w [Worker],
    idx: Vec<usize>,
    first_error: Option<PageWriteError>,
}

impl Handed<'_> {
    fn wait(&mut self) {
        for i in std::mem::take(&mut self.idx) {
            // A worker that ended (its sender dropped) no longer reads anything.
            let r = self.workers[i].done.recv();
            if let Err(e) = r.unwrap_or_else(|_| Err(worker_gone())) {
                self.first_error.get_or_insert(e);
            }
        }
    }
}

impl Drop for Handed<'_> {
    fn drop(&mut self) {
        self.wait();
    }
}

/// Writes [`PageBatch`]es, splitting large ones over its threads.
pub(crate) struct PageWriter {
    /// Threads writing a batch, the caller's included (lowered if a spawn fails).
    threads: usize,
    /// Spawned as the first large batch needs them.
    workers: Vec<Worker>,
}

impl PageWriter {
    /// A writer that splits large batches over `threads` threads (the caller's included),
    /// between 1 and [`MAX_THREADS`].
    pub(crate) fn new(threads: usize) -> Self {
        PageWriter {
            threads: threads.clamp(1, MAX_THREADS),
            workers: Vec::new(),
        }
    }

    /// Writes every page of `batch`, and returns when all are written (or the first error);
    /// the buffer the batch borrowed is free again.
    pub(crate) fn write(&mut self, batch: PageBatch<'_>) -> Result<(), PageWriteError> {
        for part in batch.parts {
            self.write_part(part)?;
        }
        Ok(())
    }

    fn write_part(&mut self, part: Part<'_>) -> Result<(), PageWriteError> {
        let Part { mut runs, pages } = part;
        let total = pages;
        let parts = self.threads.min(total / PER_THREAD_MIN);
        if parts < 2 {
            return write_all(&runs, false);
        }
        while self.workers.len() < parts - 1 {
            match Worker::spawn() {
                Ok(w) => self.workers.push(w),
                Err(_) => {
                    // Go on with the threads there are.
                    self.threads = self.workers.len() + 1;
                    break;
                }
            }
        }
        let parts = parts.min(self.workers.len() + 1);
        // The workers take the first parts, in order; the caller writes what is left.
        let mut handed = Handed {
            workers: &self.workers,
            idx: Vec::with_capacity(parts - 1),
            first_error: None,
        };
        let mut gone = Vec::new();
        for (i, w) in self.workers.iter().take(parts - 1).enumerate() {
            let part = split_front(&mut runs, total * (i + 1) / parts - total * i / parts);
            // SAFETY: only the lifetime changes (same type otherwise). The pages stay
            // borrowed for this call: `handed` waits, before this function returns or
            // unwinds, for every worker that took a part, and a worker drops its part
            // before it reports it done (or ends, dropping it). A part that comes back
            // unsent is written and dropped here.
            let part: Job = unsafe { std::mem::transmute::<Vec<Run<'_>>, Job>(part) };
            match w.jobs.as_ref().map(|j| j.send(part)) {
                Some(Ok(())) => handed.idx.push(i),
                // The worker is gone: write its part here, and replace it next time.
                Some(Err(mpsc::SendError(part))) => {
                    gone.push(i);
                    if let Err(e) = write_all(&part, false) {
                        handed.first_error.get_or_insert(e);
                    }
                }
                None => gone.push(i),
            }
        }
        let mine = write_all(&runs, false);
        // Wait for exactly the workers that took a part, even when a part failed: the
        // buffer must not be reused while any of them reads it.
        handed.wait();
        let first_error = handed.first_error.take();
        drop(handed);
        for &i in gone.iter().rev() {
            self.workers.remove(i);
        }
        match first_error {
            Some(e) => Err(e),
            None => mine,
        }
    }
}

fn worker_gone() -> PageWriteError {
    PageWriteError::Io {
        block: String::new(),
        source: std::io::Error::other("page writer thread ended"),
    }
}

/// Takes the first `n` pages of `runs` out and returns them, splitting a run when the cut
/// falls inside it; `runs` keeps the rest.
fn split_front<'buf>(runs: &mut Vec<Run<'buf>>, n: usize) -> Vec<Run<'buf>> {
    // Whole runs that fit, then a piece of the next one.
    let mut count = 0;
    let mut whole = 0;
    while whole < runs.len() && count + runs[whole].pages.len() <= n {
        count += runs[whole].pages.len();
        whole += 1;
    }
    let mut first: Vec<Run<'buf>> = runs.drain(..whole).collect();
    let need = n - count;
    if need > 0 {
        if let Some(r) = runs.first_mut() {
            let rest = r.pages.split_off(need);
            first.push(Run {
                present: r.present,
                block: r.block.clone(),
                start: r.start,
                pages: std::mem::replace(&mut r.pages, rest),
            });
            r.start += (need * TARGET_PAGE_SIZE) as u64;
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::block::tests::{byte, memfd, spec};

    fn block(name: &str, size: u64) -> Arc<RamBlock> {
        Arc::new(RamBlock::new(spec(name, size), memfd(size)).expect("block"))
    }

    #[test]
    fn large_batches_are_split_and_written_in_full() {
        // 1 thread (no split), the default 2, parts that do not divide the batch evenly,
        // and more threads than the batch has pages for.
        for threads in [1, 2, 3, 4, 7, MAX_THREADS] {
            write_600_pages(threads, false);
        }
        // Into pages that exist already (a preallocated guest), mapped ahead or not.
        write_600_pages(2, true);
        write_600_pages(3, true);
    }

    fn write_600_pages(threads: usize, present: bool) {
        let a = block("a", 4 << 20);
        let b = block("b", 1 << 20);
        if present {
            // Written through the fd, so that this process has not mapped them.
            let fill = [0xeeu8; TARGET_PAGE_SIZE];
            for blk in [&a, &b] {
                for off in (0..blk.size).step_by(4096) {
                    assert!(blk.write_pages_at(off, &[&fill]).expect("write"));
                }
            }
            // Map one block ahead, leave the other to fault.
            assert_eq!(a.map_present(|| false), a.pages());
        }
        let pages: Vec<Page> = (0..600u32)
            .map(|i| [(i % 251) as u8 + 1; TARGET_PAGE_SIZE])
            .collect();
        let mut w = PageWriter::new(threads);
        let mut batch = PageBatch::new();
        // Three runs in two blocks, with a gap, so that the splits fall inside runs.
        for (i, p) in pages.iter().enumerate() {
            let (blk, off) = match i {
                0..=299 => (&a, i as u64 * 4096),
                300..=499 => (&a, (i as u64 + 10) * 4096),
                _ => (&b, (i as u64 - 500) * 4096),
            };
            batch.queue(blk, off, p, present);
        }
        assert_eq!(batch.parts.iter().map(|p| p.pages).sum::<usize>(), 600);
        w.write(batch).expect("write");
        let check = |blk: &Arc<RamBlock>, off: u64, want: u8| {
            let got = byte(blk, off, 100);
            assert_eq!(
                got, want,
                "{threads} threads: block {} offset {off:#x}",
                blk.id
            );
        };
        for i in 0..600u32 {
            let want = (i % 251) as u8 + 1;
            match i {
                0..=299 => check(&a, i as u64 * 4096, want),
                300..=499 => check(&a, (i as u64 + 10) * 4096, want),
                _ => check(&b, (i as u64 - 500) * 4096, want),
            }
        }
        // The gap keeps what it had.
        check(&a, 305 * 4096, if present { 0xee } else { 0 });
    }

    #[test]
    fn a_page_queued_twice_ends_with_the_later_content() {
        let a = block("a", 2 << 20);
        let old = [1u8; TARGET_PAGE_SIZE];
        let new = [2u8; TARGET_PAGE_SIZE];
        let mut w = PageWriter::new(2);
        let mut batch = PageBatch::new();
        // Page 10 in the first part of the batch, again in the second: without the cut
        // between them the two parts would race.
        for i in 0..300u64 {
            batch.queue(&a, i * 4096, &old, false);
        }
        for i in 10..310u64 {
            batch.queue(&a, i * 4096, &new, i < 300);
        }
        assert_eq!(batch.parts.len(), 2);
        w.write(batch).expect("write");
        for i in 0..310u64 {
            let want = if i < 10 { 1 } else { 2 };
            assert_eq!(byte(&a, i * 4096, 0), want, "page {i}");
        }
    }

    #[test]
    fn a_worker_that_is_gone_is_written_for_and_replaced() {
        let a = block("a", 4 << 20);
        let fill = |w: &mut PageWriter, pages: &[Page]| {
            let mut batch = PageBatch::new();
            for (i, p) in pages.iter().enumerate() {
                batch.queue(&a, i as u64 * 4096, p, false);
            }
            w.write(batch)
        };
        let mut w = PageWriter::new(3);
        let first: Vec<Page> = vec![[1u8; TARGET_PAGE_SIZE]; 600];
        fill(&mut w, &first).expect("flush");
        assert_eq!(w.workers.len(), 2);
        // Worker 0's thread ends (its job channel closes); worker 1 still takes a part.
        let (tx, rx) = mpsc::sync_channel(1);
        drop(rx);
        w.workers[0].jobs = Some(tx);
        let second: Vec<Page> = vec![[2u8; TARGET_PAGE_SIZE]; 600];
        fill(&mut w, &second).expect("flush without worker 0");
        for i in 0..600u64 {
            assert_eq!(byte(&a, i * 4096, 9), 2, "page {i}");
        }
        assert_eq!(w.workers.len(), 1, "the worker that is gone was dropped");
        let third: Vec<Page> = vec![[3u8; TARGET_PAGE_SIZE]; 600];
        fill(&mut w, &third).expect("flush");
        assert_eq!(w.workers.len(), 2, "and replaced");
        for i in 0..600u64 {
            assert_eq!(byte(&a, i * 4096, 9), 3, "page {i}");
        }
    }

    #[test]
    fn a_write_past_the_block_fails_clearly() {
        let a = block("a", 1 << 20);
        let page = [1u8; TARGET_PAGE_SIZE];
        let mut w = PageWriter::new(2);
        let mut batch = PageBatch::new();
        for i in 0..200u64 {
            batch.queue(&a, (i + 200) * 4096, &page, false);
        }
        let e = w.write(batch).expect_err("outside");
        assert!(e.to_string().contains("outside RAM block \"a\""), "{e}");
    }
}
