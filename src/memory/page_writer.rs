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

/// Pages per thread below which splitting a batch costs more than it saves.
const PER_THREAD_MIN: usize = 64;
/// The most threads `load-threads` may ask for.
pub const MAX_THREADS: usize = 16;
/// Pages in one `pwritev` run (the kernel takes at most 1024 iovecs).
const RUN_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PageWriteError {
    #[error("write outside RAM block {block:?}")]
    Outside { block: String },
    #[error("writing RAM block {block:?} failed: {source}")]
    Io {
        block: String,
        #[source]
        source: std::io::Error,
    },
}

/// Consecutive pages of one block, as addresses of page-sized buffers.
struct Run {
    block: Arc<RamBlock>,
    start: u64,
    pages: Vec<usize>,
    /// The pages already existed in the block (were not holes) when queued.
    present: bool,
}

impl Run {
    /// Writes with `pwritev`, or through the mapping when `via_map` (see the module
    /// comment).
    fn write(&self, via_map: bool) -> Result<(), PageWriteError> {
        let ptrs: Vec<*const u8> = self.pages.iter().map(|&p| p as *const u8).collect();
        // hugetlbfs files cannot be written with write(2) at all: always copy there.
        let via_map = via_map || self.present || self.block.page_size != TARGET_PAGE_SIZE as u64;
        let r = if via_map {
            Ok(self.block.copy_pages_at(self.start, &ptrs, !self.present))
        } else {
            self.block.write_pages_at(self.start, &ptrs)
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

fn write_all(runs: &[Run], via_map: bool) -> Result<(), PageWriteError> {
    runs.iter().try_for_each(|r| r.write(via_map))
}

struct Worker {
    jobs: Option<SyncSender<Vec<Run>>>,
    done: Receiver<Result<(), PageWriteError>>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn() -> std::io::Result<Worker> {
        let (jobs, job_rx) = mpsc::sync_channel::<Vec<Run>>(1);
        let (done_tx, done) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("qmh-writer".into())
            .spawn(move || {
                crate::sandbox::enter_thread(crate::sandbox::ThreadKind::PageMover);
                for runs in job_rx {
                    if done_tx.send(write_all(&runs, true)).is_err() {
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

/// Pages queued for writing. The queued addresses point into the caller's buffer, which
/// must stay unchanged until the next [`PageWriter::flush`] returns.
pub struct PageWriter {
    runs: Vec<Run>,
    pages: usize,
    /// Threads writing a batch, the caller's included (lowered if a spawn fails).
    threads: usize,
    /// Spawned as the first large batch needs them.
    workers: Vec<Worker>,
    /// Per block in the batch: the highest page offset queued.
    high: Vec<(*const RamBlock, u64)>,
}

// SAFETY: the raw block pointers in `high` are only compared, never dereferenced.
unsafe impl Send for PageWriter {}

impl PageWriter {
    /// A writer that splits large batches over `threads` threads (the caller's included),
    /// between 1 and [`MAX_THREADS`].
    pub fn new(threads: usize) -> Self {
        PageWriter {
            runs: Vec::new(),
            pages: 0,
            threads: threads.clamp(1, MAX_THREADS),
            workers: Vec::new(),
            high: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Queues the page at `data` (TARGET_PAGE_SIZE bytes) for `offset` in `block`;
    /// `present` says the page already exists there (was not a hole). The caller checks the
    /// offset against the block first and keeps `data` valid and unchanged until the next
    /// flush.
    ///
    /// The parts of a batch are written at the same time, so a batch must not hold the
    /// same page twice: a page at or below the highest one queued for its block (a page
    /// sent again in a later pass) writes the batch out first.
    pub fn queue(
        &mut self,
        block: &Arc<RamBlock>,
        offset: u64,
        data: *const u8,
        present: bool,
    ) -> Result<(), PageWriteError> {
        let key = Arc::as_ptr(block);
        match self.high.iter().position(|(b, _)| *b == key) {
            Some(i) if self.high[i].1 >= offset => {
                self.flush()?;
                self.high.push((key, offset));
            }
            Some(i) => self.high[i].1 = offset,
            None => self.high.push((key, offset)),
        }
        let extends = self.runs.last().is_some_and(|r| {
            Arc::ptr_eq(&r.block, block)
                && r.present == present
                && r.pages.len() < RUN_MAX
                && r.start + (r.pages.len() * TARGET_PAGE_SIZE) as u64 == offset
        });
        if !extends {
            self.runs.push(Run {
                block: block.clone(),
                start: offset,
                pages: Vec::with_capacity(64),
                present,
            });
        }
        if let Some(r) = self.runs.last_mut() {
            r.pages.push(data as usize);
        }
        self.pages += 1;
        Ok(())
    }

    /// Writes everything queued; on return the queued buffers may be reused.
    pub fn flush(&mut self) -> Result<(), PageWriteError> {
        if self.pages == 0 {
            return Ok(());
        }
        self.high.clear();
        let mut runs = std::mem::take(&mut self.runs);
        let total = std::mem::take(&mut self.pages);
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
        let mut handed = Vec::with_capacity(parts - 1);
        let mut gone = Vec::new();
        let mut first_error = None;
        for (i, w) in self.workers.iter().take(parts - 1).enumerate() {
            let part = split_front(&mut runs, total * (i + 1) / parts - total * i / parts);
            match w.jobs.as_ref().map(|j| j.send(part)) {
                Some(Ok(())) => handed.push(i),
                // The worker is gone: write its part here, and replace it next time.
                Some(Err(mpsc::SendError(part))) => {
                    gone.push(i);
                    if let Err(e) = write_all(&part, false) {
                        first_error.get_or_insert(e);
                    }
                }
                None => gone.push(i),
            }
        }
        let mine = write_all(&runs, false);
        // Wait for exactly the workers that took a part, even when a part failed: the
        // buffers must not be reused while any of them reads them.
        for &i in &handed {
            let r = self.workers[i].done.recv();
            if let Err(e) = r.unwrap_or_else(|_| Err(worker_gone())) {
                first_error.get_or_insert(e);
            }
        }
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
fn split_front(runs: &mut Vec<Run>, n: usize) -> Vec<Run> {
    // Whole runs that fit, then a piece of the next one.
    let mut count = 0;
    let mut whole = 0;
    while whole < runs.len() && count + runs[whole].pages.len() <= n {
        count += runs[whole].pages.len();
        whole += 1;
    }
    let mut first: Vec<Run> = runs.drain(..whole).collect();
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
    use crate::memory::block::tests::{memfd, spec};

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
                    assert!(blk.write_pages_at(off, &[fill.as_ptr()]).expect("write"));
                }
            }
            // Map one block ahead, leave the other to fault.
            assert_eq!(a.map_present(|| false), a.pages());
        }
        let pages: Vec<Vec<u8>> = (0..600u32)
            .map(|i| vec![(i % 251) as u8 + 1; TARGET_PAGE_SIZE])
            .collect();
        let mut w = PageWriter::new(threads);
        // Three runs in two blocks, with a gap, so that the splits fall inside runs.
        for (i, p) in pages.iter().enumerate() {
            let (blk, off) = match i {
                0..=299 => (&a, i as u64 * 4096),
                300..=499 => (&a, (i as u64 + 10) * 4096),
                _ => (&b, (i as u64 - 500) * 4096),
            };
            w.queue(blk, off, p.as_ptr(), present).expect("queue");
        }
        w.flush().expect("flush");
        assert!(w.is_empty());
        let check = |blk: &Arc<RamBlock>, off: u64, want: u8| {
            let got = blk.page(off).expect("in the block")[100];
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
        let old = vec![1u8; TARGET_PAGE_SIZE];
        let new = vec![2u8; TARGET_PAGE_SIZE];
        let mut w = PageWriter::new(2);
        // Page 10 in the first part of the batch, again in the second: without the flush
        // between them the two parts would race.
        for i in 0..300u64 {
            w.queue(&a, i * 4096, old.as_ptr(), false).expect("queue");
        }
        for i in 10..310u64 {
            w.queue(&a, i * 4096, new.as_ptr(), i < 300).expect("queue");
        }
        w.flush().expect("flush");
        for i in 0..310u64 {
            let want = if i < 10 { 1 } else { 2 };
            assert_eq!(a.page(i * 4096).expect("page")[0], want, "page {i}");
        }
    }

    #[test]
    fn a_worker_that_is_gone_is_written_for_and_replaced() {
        let a = block("a", 4 << 20);
        let fill = |w: &mut PageWriter, pages: &[Vec<u8>]| {
            for (i, p) in pages.iter().enumerate() {
                w.queue(&a, i as u64 * 4096, p.as_ptr(), false)
                    .expect("queue");
            }
            w.flush()
        };
        let mut w = PageWriter::new(3);
        let first: Vec<Vec<u8>> = (0..600).map(|_| vec![1u8; TARGET_PAGE_SIZE]).collect();
        fill(&mut w, &first).expect("flush");
        assert_eq!(w.workers.len(), 2);
        // Worker 0's thread ends (its job channel closes); worker 1 still takes a part.
        let (tx, rx) = mpsc::sync_channel(1);
        drop(rx);
        w.workers[0].jobs = Some(tx);
        let second: Vec<Vec<u8>> = (0..600).map(|_| vec![2u8; TARGET_PAGE_SIZE]).collect();
        fill(&mut w, &second).expect("flush without worker 0");
        for i in 0..600u64 {
            assert_eq!(a.page(i * 4096).expect("page")[9], 2, "page {i}");
        }
        assert_eq!(w.workers.len(), 1, "the worker that is gone was dropped");
        let third: Vec<Vec<u8>> = (0..600).map(|_| vec![3u8; TARGET_PAGE_SIZE]).collect();
        fill(&mut w, &third).expect("flush");
        assert_eq!(w.workers.len(), 2, "and replaced");
        for i in 0..600u64 {
            assert_eq!(a.page(i * 4096).expect("page")[9], 3, "page {i}");
        }
    }

    #[test]
    fn a_write_past_the_block_fails_clearly() {
        let a = block("a", 1 << 20);
        let page = vec![1u8; TARGET_PAGE_SIZE];
        let mut w = PageWriter::new(2);
        for i in 0..200u64 {
            w.queue(&a, (i + 200) * 4096, page.as_ptr(), false)
                .expect("queue");
        }
        let e = w.flush().expect_err("outside");
        assert!(e.to_string().contains("outside RAM block \"a\""), "{e}");
    }
}
