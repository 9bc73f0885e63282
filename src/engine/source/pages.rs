//! What is left to send: per block a bitmap of target pages, shared with the preempt
//! sender (each bit is taken out by exactly one of them before its page is sent), and the
//! sending of one bitmap word through the page encoder.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::engine::migration::{MigrationCtx, Stats};
use crate::engine::source::mapped_ram::MappedRamOut;
use crate::engine::source::multifd::Multifd;
use crate::engine::source::writer::{PageSent, Writer, PAGE};
use crate::engine::source::SourceError;
use crate::memory::block::RamBlock;

/// Background pages sent between two looks at the page requests in postcopy, with
/// postcopy-preempt: requested pages go on their own channel, so this only sets how often
/// the push looks (a larger chunk costs fewer flushes).
pub(crate) const POSTCOPY_CHUNK: u32 = 16;

/// The same without postcopy-preempt, where a requested page waits for the chunk being
/// written. Halving it took helper->helper p50 from about 158 to 131 us (dense) and 114 to
/// 82 us (sparse) in `cargo bench --bench postcopy` (source CPU 1.02 s against 0.78 s in the
/// dense case, whose readers then made 60 % more faults).
pub(crate) const POSTCOPY_CHUNK_SHARED: u32 = 8;

/// Pages still to send in one block, as a bitmap of target pages.
pub(crate) struct BlockTodo<'m> {
    pub(crate) block: &'m RamBlock,
    /// Pages still to send. Shared with the postcopy-preempt sender: each bit is taken out
    /// by exactly one of them (an atomic swap or and-not) before its page is sent.
    pub(crate) todo: Arc<Vec<AtomicU64>>,
    /// Pages that are holes in the memfd and not written since: zero without reading them
    /// (reading a hole through a shared mapping would allocate a page for it).
    pub(crate) holes: Vec<u64>,
}

/// Where [`BlockTodo::send_word`] sends pages.
pub(crate) enum Sink<'a> {
    /// Records through the page encoder (main or preempt channel).
    Stream,
    /// Packets on the multifd channels.
    Multifd(&'a mut Multifd),
    /// mapped-ram: each page at its place in the file, written by the pass thread.
    File(&'a MappedRamOut),
    /// mapped-ram with multifd: the channels write the pages at their places.
    FileMultifd(&'a MappedRamOut, &'a mut Multifd),
}

impl<'a> Sink<'a> {
    /// The sink for a pass: mapped-ram (`file`) and multifd (`mfd`) as configured.
    pub(crate) fn of(mfd: Option<&'a mut Multifd>, file: Option<&'a MappedRamOut>) -> Self {
        match (file, mfd) {
            (Some(f), Some(m)) => Sink::FileMultifd(f, m),
            (Some(f), None) => Sink::File(f),
            (None, Some(m)) => Sink::Multifd(m),
            (None, None) => Sink::Stream,
        }
    }
}

/// Which records name their block: all of them (the preempt channel, where nothing may
/// rely on the channel's past), or only the first after another block's (CONTINUE).
pub(crate) enum Names {
    Always,
    Track(Option<usize>),
}

/// What sending a word put on the wire.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct WordSent {
    pub(crate) bytes: u64,
    pub(crate) zero: u64,
    pub(crate) normal: u64,
    /// Pages handed to the multifd channels (counted by them as normal or zero).
    pub(crate) queued: u64,
}

impl WordSent {
    pub(crate) fn pages(&self) -> u64 {
        self.zero + self.normal + self.queued
    }

    /// Adds this to the migration's counters (pages sent on the main channel; those
    /// handed to multifd only to `remaining`).
    pub(crate) fn count(&self, ctx: &MigrationCtx) {
        let st = &ctx.stats;
        Stats::add(&st.duplicate, self.zero);
        Stats::add(&st.normal, self.normal);
        Stats::add(&st.transferred, self.bytes);
        let rem = st.remaining.load(Ordering::Relaxed);
        st.remaining.store(
            rem.saturating_sub(self.pages() * PAGE as u64),
            Ordering::Relaxed,
        );
    }
}

impl<'m> BlockTodo<'m> {
    /// Every page of `block` to send, none known to be a hole.
    pub(crate) fn all(block: &'m RamBlock) -> Self {
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
    pub(crate) fn take(&self, i: usize, mask: u64) -> u64 {
        self.todo
            .get(i)
            .map_or(0, |w| w.fetch_and(!mask, Ordering::AcqRel) & mask)
    }

    pub(crate) fn words(&self) -> Vec<u64> {
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

    pub(crate) fn count(&self) -> u64 {
        self.todo
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }

    /// What the destination lacks (not set in its received bitmap `have`) is what is left.
    pub(crate) fn set_missing(&self, have: &[u64]) {
        let pages = self.block.pages();
        for (i, t) in self.todo.iter().enumerate() {
            let got = have.get(i).copied().unwrap_or(0);
            let valid = if (i as u64 + 1) * 64 <= pages {
                u64::MAX
            } else {
                (1u64 << (pages % 64)) - 1
            };
            t.store(!got & valid, Ordering::Release);
        }
    }

    /// Sends the pages of one bitmap word (pages `64*wi ..`), already taken out of the
    /// to-do set, to `sink`: through the page encoder, or with multifd into its packets
    /// (with `zero-page-detection=legacy`, zero pages still as ZERO records here), or under
    /// mapped-ram to their places in the file. `bi` is this block's index, for `names`.
    pub(crate) fn send_word(
        &self,
        out: &mut Writer<'m>,
        sink: Sink<'_>,
        bi: usize,
        wi: usize,
        mut word: u64,
        names: &mut Names,
    ) -> Result<WordSent, SourceError> {
        let mut sent = WordSent::default();
        let holes = self.holes.get(wi).copied().unwrap_or(0);
        // With multifd the zero pages the pass thread finds (legacy detection) go as ZERO
        // records, or under mapped-ram only clear their bit in the file's bitmap.
        let (mut mfd, file) = match sink {
            Sink::Stream => (None, None),
            Sink::Multifd(m) => (Some(m), None),
            Sink::File(f) => {
                let s = f.write_word(self.block, bi, wi, word, holes)?;
                sent.zero = s.zero;
                sent.normal = s.normal;
                sent.bytes = s.bytes;
                return Ok(sent);
            }
            Sink::FileMultifd(f, m) => (Some(m), Some(f)),
        };
        while word != 0 {
            let bit = word.trailing_zeros() as u64;
            word &= word - 1;
            let off = (wi as u64 * 64 + bit) * PAGE as u64;
            let Some(page) = self.block.guest_page(off) else {
                continue;
            };
            let hole = holes & (1 << bit) != 0;
            let p = match mfd.as_deref_mut() {
                Some(m) if m.zero_on_main() && (hole || page.is_zero()) => match file {
                    Some(f) => {
                        f.zero(bi, off);
                        sent.zero += 1;
                        continue;
                    }
                    None => out.zero_page(off, self.name(names, bi))?,
                },
                Some(m) => {
                    m.queue(bi, off, hole)?;
                    sent.queued += 1;
                    continue;
                }
                None => match out.page(self.block, off, self.name(names, bi), hole)? {
                    Some(p) => p,
                    None => continue,
                },
            };
            match p {
                PageSent::Zero(_) => sent.zero += 1,
                PageSent::Normal(_) => sent.normal += 1,
            }
            sent.bytes += p.bytes();
        }
        Ok(sent)
    }

    /// The block's name for the next record on the main channel, unless it CONTINUEs the
    /// previous record's block.
    fn name(&self, names: &mut Names, bi: usize) -> Option<&'m str> {
        match names {
            Names::Always => Some(self.block.id.as_str()),
            Names::Track(last) if *last == Some(bi) => None,
            Names::Track(last) => {
                *last = Some(bi);
                Some(self.block.id.as_str())
            }
        }
    }
}

/// Every block's to-do set and where the current pass is.
pub(crate) struct Pages<'m> {
    pub(crate) blocks: Vec<BlockTodo<'m>>,
    /// Where the current pass is: (block index, word index).
    cursor: (usize, usize),
}

impl<'m> Pages<'m> {
    /// Everything to send, the memfds' current holes noted (sent as zero pages unread).
    pub(crate) fn new(blocks: &'m [Arc<RamBlock>]) -> Self {
        let blocks = blocks
            .iter()
            .map(|b| {
                let mut t = BlockTodo::all(b);
                t.holes = b.hole_bitmap();
                t
            })
            .collect();
        Pages {
            blocks,
            cursor: (0, 0),
        }
    }

    /// Starts a pass over the to-do sets from the first page.
    pub(crate) fn rewind(&mut self) {
        self.cursor = (0, 0);
    }

    /// Moves the parent's dirty bits into the to-do sets and starts a new pass; returns how
    /// many pages are to do.
    pub(crate) fn harvest(&mut self, ctx: &MigrationCtx) -> u64 {
        let n: u64 = self.blocks.iter_mut().map(|b| b.harvest()).sum();
        Stats::add(&ctx.stats.dirty_sync_count, 1);
        ctx.stats
            .remaining
            .store(n * PAGE as u64, Ordering::Relaxed);
        self.rewind();
        n
    }

    /// Pages still to send, all blocks.
    pub(crate) fn left(&self) -> u64 {
        self.blocks.iter().map(|b| b.count()).sum()
    }

    /// The next whole word of the pass, taken out of the to-do set (possibly empty); None
    /// at the end of the pass.
    pub(crate) fn next_pass_word(&mut self) -> Option<(usize, usize, u64)> {
        while self.cursor.0 < self.blocks.len() {
            let (bi, wi) = self.cursor;
            let bt = &self.blocks[bi];
            if wi >= bt.todo.len() {
                self.cursor = (bi + 1, 0);
                continue;
            }
            self.cursor = (bi, wi + 1);
            return Some((bi, wi, bt.take(wi, u64::MAX)));
        }
        None
    }

    /// The next pages still to send (at most `max`, within one bitmap word), taken out of
    /// the to-do set.
    pub(crate) fn next_chunk(&mut self, max: u32) -> Option<(usize, usize, u64)> {
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
            for _ in 0..max {
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
}

/// Runs of set bits as (byte offset, byte length).
pub(crate) fn bit_runs(bits: &[u64]) -> Vec<(u64, u64)> {
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
