//! The background fill: every data page not yet placed, block by block, in runs (each
//! copied from the mapped file with one UFFDIO_COPY, see `source`), at most 1 MiB each so
//! that a fault waits for one run at most. Holes are left alone: the blocks were punched at the start, and
//! once the last data page is placed the blocks are unregistered, so a hole nobody touched
//! reads as zero without being allocated (as QEMU leaves them; a hole that faults before
//! is placed by the fault thread with UFFDIO_ZEROPAGE). It yields to the fault thread (no
//! new run while a fault batch is served), keeps to `max-postcopy-bandwidth` (re-read at
//! every run; 0 = unlimited), and waits while paused.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::compat::wire::mapped_ram::LOAD_BUF_SIZE;
use crate::engine::destination::ondemand::serve::{ServeError, Shared, PAGE};
use crate::engine::migration::MigrationCtx;

/// Pages per run: QEMU's mapped-ram load buffer (1 MiB).
const RUN_PAGES: u64 = LOAD_BUF_SIZE / PAGE;

/// How often `remaining` is recomputed from the received bitmaps (in runs).
const STATS_EVERY: u64 = 64;

/// What ended the fill.
pub(super) enum Filled {
    /// Every page is placed.
    All,
    /// The threads are stopping (cancel, failure).
    Stopped,
}

/// Bandwidth accounting: bytes read since `since`.
pub(super) struct Throttle {
    since: Instant,
    pub(super) bytes: u64,
    limit: u64,
}

impl Throttle {
    pub(super) fn new(now: Instant) -> Self {
        Throttle {
            since: now,
            bytes: 0,
            limit: 0,
        }
    }

    /// When the bytes read so far are due at `limit` bytes/s (None: now).
    pub(super) fn due(&mut self, limit: u64, now: Instant) -> Option<Instant> {
        if limit != self.limit || now.duration_since(self.since) > Duration::from_secs(1) {
            // A new limit, or a new window: no debt carried over.
            *self = Throttle {
                since: now,
                bytes: 0,
                limit,
            };
        }
        if limit == 0 {
            return None;
        }
        let at = self.since + Duration::from_secs_f64(self.bytes as f64 / limit as f64);
        (at > now).then_some(at)
    }
}

impl Shared<'_> {
    /// Waits until the fill may place its next run: not paused, no fault batch being
    /// served, and the bandwidth allows it. False when the threads are stopping.
    fn turn(&self, ctx: &MigrationCtx, throttle: &mut Throttle) -> bool {
        let mut g = self.lock();
        loop {
            if g.stopping || g.has_failed || g.cancelled {
                return false;
            }
            let now = Instant::now();
            let due = throttle.due(ctx.params().max_postcopy_bandwidth, now);
            if g.paused.is_none() && self.busy.load(Ordering::Acquire) == 0 && due.is_none() {
                return true;
            }
            g = match due {
                // The throttle window is a real deadline; anything else wakes by signal.
                Some(at) if g.paused.is_none() => {
                    self.changed
                        .wait_timeout(g, at.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                _ => self.changed.wait(g).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    /// Bytes of data pages not placed yet, into `stats.remaining`.
    pub(super) fn count_remaining(&self, ctx: &MigrationCtx) {
        let left: u64 = self
            .mapped
            .iter()
            .zip(self.pc.received.iter())
            .map(|(m, r)| {
                m.bitmap
                    .iter()
                    .zip(r.words())
                    .map(|(d, got)| u64::from((d & !got).count_ones()))
                    .sum::<u64>()
            })
            .sum();
        ctx.stats.remaining.store(left * PAGE, Ordering::Relaxed);
    }

    /// The fill thread.
    pub(super) fn fill_thread(&self, ctx: &MigrationCtx) -> Result<Filled, ServeError> {
        let mut buf = Vec::with_capacity(LOAD_BUF_SIZE as usize);
        let mut throttle = Throttle::new(Instant::now());
        let mut runs = 0u64;
        for (bi, b) in self.blocks.iter().enumerate() {
            let pages = b.pages();
            let mut page = 0;
            while page < pages {
                if self.mapped[bi].bitmap.get((page / 64) as usize) == Some(&0) {
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                if !self.has_data(bi, page) || self.pc.received[bi].get(page) {
                    page += 1;
                    continue;
                }
                if !self.turn(ctx, &mut throttle) {
                    return Ok(Filled::Stopped);
                }
                let (data, n) = self.run_at(bi, page, RUN_PAGES);
                debug_assert!(data);
                match self.place(bi, page, n, data, &mut buf) {
                    Ok(()) => {}
                    Err(e @ ServeError::Read { .. }) => {
                        // Stay on this run: it is read again once a recovery gave a file.
                        slog::warn!(self.log, "on-demand restore: the file failed; paused"; "error" => %e);
                        self.pause(&e);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                if data {
                    // The mapped file pages are copied: unmap them.
                    self.file().release(self.file_offset(bi, page), n * PAGE);
                    throttle.bytes += n * PAGE;
                    ctx.stats.transferred.fetch_add(n * PAGE, Ordering::Relaxed);
                }
                page += n;
                runs += 1;
                if runs % STATS_EVERY == 0 {
                    self.count_remaining(ctx);
                }
            }
        }
        self.count_remaining(ctx);
        Ok(Filled::All)
    }
}
