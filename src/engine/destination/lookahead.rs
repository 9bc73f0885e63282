//! Postcopy on the main channel: finding the pages a vCPU waits for among the records
//! already read, ahead of the in-order pass. Pure over the reader's bytes: which pages are
//! wanted and how one is placed are the caller's (`PostcopySink::place_requested_ahead`).

use std::sync::Arc;

use crate::compat::wire;
use crate::engine::destination::place::{BlockCursor, Page};
use crate::memory::block::RamBlock;
use crate::wire::ram::{self, Record};

/// Where the last look-ahead stopped, and what it knew then.
#[derive(Clone, Copy, Default)]
pub(super) struct ScanMark {
    /// Stream offset of the first record it did not walk, and the block context there.
    pub(super) to: u64,
    pub(super) cursor: BlockCursor,
    /// The request count (`PostcopyDest::asked`) read before it walked.
    pub(super) asked: u64,
}

impl ScanMark {
    /// Where a look-ahead over `len` bytes at stream offset `at` (in-order block context
    /// `cursor`), knowing `asked` requests, starts: where the last one stopped, unless a
    /// page was requested since (it may be among the records the last one passed: walking
    /// them again places it now, not when the in-order pass gets there) or the in-order
    /// pass is past that point.
    pub(super) fn start(
        &self,
        at: u64,
        len: usize,
        cursor: BlockCursor,
        asked: u64,
    ) -> (usize, BlockCursor) {
        if self.asked == asked && self.to > at && self.to - at <= len as u64 {
            ((self.to - at) as usize, self.cursor)
        } else {
            (0, cursor)
        }
    }
}

/// Walks the records of `data` from `pos` (block context `cursor`) and hands every page
/// `wanted(block, page)` asks for to `place` (false: stop). Follows RAM records, and the
/// footer and next header of RAM section `ram_section`; stops at anything else, at an
/// incomplete record and at any record the in-order pass would reject (that pass checks
/// every record again and reports it). Returns where it stopped: the position of the first
/// record not walked, and the block context there.
pub(super) fn scan(
    blocks: &[Arc<RamBlock>],
    data: &[u8],
    mut pos: usize,
    mut cursor: BlockCursor,
    ram_section: Option<u32>,
    wanted: impl Fn(usize, u64) -> bool,
    mut place: impl FnMut(&Page<'_>) -> bool,
) -> (usize, BlockCursor) {
    loop {
        let mark = (pos, cursor);
        let Ok(Some((rec, n))) = ram::decode_record(&data[pos..]) else {
            return mark;
        };
        pos += n;
        if let Record::Eos = rec {
            // Optional footer, then this RAM section's next header, or stop.
            if data.get(pos) == Some(&wire::section::FOOTER) {
                pos += 5;
            }
            let rest = data.get(pos..).unwrap_or(&[]);
            let part = rest.len() >= 5
                && rest[0] == wire::section::PART
                && Some(u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]])) == ram_section;
            if !part {
                return mark;
            }
            pos += 5;
            continue;
        }
        // The same checks as the in-order pass; any doubt stops the walk.
        let Ok(Some(page)) = cursor.page(blocks, &rec) else {
            return mark;
        };
        if wanted(page.bi, page.index()) && !place(&page) {
            return mark;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;
    use crate::compat::wire::{ram as flag, TARGET_PAGE_SIZE};
    use crate::engine::destination::place::PageData;
    use crate::engine::destination::tests::block;
    use crate::wire::stream::{self, SectionKind};

    const PAGE: u64 = TARGET_PAGE_SIZE as u64;

    /// A PAGE record of `block` (None: CONTINUE) at page `index`, filled with `index`.
    fn page(out: &mut Vec<u8>, index: u64, block: Option<&str>) {
        ram::encode_page_header(out, index * PAGE, flag::PAGE, block).unwrap();
        out.extend_from_slice(&[index as u8; TARGET_PAGE_SIZE]);
    }

    /// Pages 0..n of "a", the first naming its block.
    fn pages(n: u64) -> Vec<u8> {
        let mut s = Vec::new();
        for i in 0..n {
            page(&mut s, i, (i == 0).then_some("a"));
        }
        s
    }

    /// Walks `data` from `pos`/`cursor`, placing the pages of `wanted` (block 0); returns
    /// where it stopped and the pages placed, with the first byte of each.
    fn walk(
        data: &[u8],
        pos: usize,
        cursor: BlockCursor,
        wanted: &[u64],
        section: Option<u32>,
    ) -> ((usize, BlockCursor), Vec<(u64, u8)>) {
        let blocks = [block("a", 16), block("b", 16)];
        let wanted: BTreeSet<u64> = wanted.iter().copied().collect();
        let placed = RefCell::new(Vec::new());
        let stop = scan(
            &blocks,
            data,
            pos,
            cursor,
            section,
            |bi, p| bi == 0 && wanted.contains(&p),
            |pg| {
                let first = match pg.data {
                    PageData::Bytes(b) => b[0],
                    PageData::Fill(f) => f,
                };
                placed.borrow_mut().push((pg.index(), first));
                true
            },
        );
        (stop, placed.into_inner())
    }

    #[test]
    fn places_only_wanted_pages_and_stops_at_an_incomplete_record() {
        let s = pages(6);
        let whole = s.len();
        // The last record cut short: the walk stops at its start, for the next one.
        let cut = &s[..whole - 100];
        let ((pos, cursor), placed) = walk(cut, 0, BlockCursor::default(), &[1, 4, 5], None);
        assert_eq!(placed, vec![(1, 1), (4, 4)]);
        let last = whole - (8 + TARGET_PAGE_SIZE);
        assert_eq!(pos, last);
        assert_eq!(cursor.last, Some(0));
        // Going on from there with the rest of the record finds page 5.
        let ((pos, _), placed) = walk(&s, pos, cursor, &[1, 4, 5], None);
        assert_eq!(placed, vec![(5, 5)]);
        assert_eq!(pos, whole);
    }

    #[test]
    fn follows_its_own_section_and_stops_at_another() {
        let mut s = pages(2);
        ram::encode_eos(&mut s);
        stream::encode_footer(&mut s, 2);
        stream::encode_section_part(&mut s, SectionKind::Part, 2);
        page(&mut s, 3, None);
        let eos2 = s.len();
        ram::encode_eos(&mut s);
        stream::encode_footer(&mut s, 2);
        stream::encode_section_part(&mut s, SectionKind::Part, 7);
        page(&mut s, 5, None);
        let ((pos, _), placed) = walk(&s, 0, BlockCursor::default(), &[3, 5], Some(2));
        // Across the first section boundary to page 3; not into section 7.
        assert_eq!(placed, vec![(3, 3)]);
        assert_eq!(pos, eos2);
        // With no RAM section known, not even across the first.
        let (_, placed) = walk(&s, 0, BlockCursor::default(), &[3, 5], None);
        assert!(placed.is_empty());
    }

    #[test]
    fn stops_at_a_record_the_in_order_pass_rejects() {
        let mut s = pages(2);
        let bad = s.len();
        page(&mut s, 2, Some("nope"));
        page(&mut s, 3, Some("a"));
        let ((pos, cursor), placed) = walk(&s, 0, BlockCursor::default(), &[3], None);
        assert!(placed.is_empty());
        assert_eq!(pos, bad);
        assert_eq!(cursor.last, Some(0));
        // CONTINUE with no block named before: rejected too, never guessed.
        let ((pos, _), placed) = walk(
            &s[8 + 2 + TARGET_PAGE_SIZE..],
            0,
            BlockCursor::default(),
            &[1],
            None,
        );
        assert!(placed.is_empty());
        assert_eq!(pos, 0);
    }

    #[test]
    fn a_failed_placement_stops_the_walk_at_that_record() {
        let s = pages(4);
        let blocks = [block("a", 16)];
        let mut tried = Vec::new();
        let (pos, _) = scan(
            &blocks,
            &s,
            0,
            BlockCursor::default(),
            None,
            |_, p| p == 1 || p == 3,
            |pg| {
                tried.push(pg.index());
                false
            },
        );
        assert_eq!(tried, vec![1]);
        assert_eq!(pos, 8 + 2 + TARGET_PAGE_SIZE);
    }

    #[test]
    fn a_request_since_the_last_walk_starts_it_again_from_the_in_order_position() {
        let s = pages(6);
        let in_order = BlockCursor::default();
        // A walk with nothing wanted passes every record.
        let ((to, cursor), placed) = walk(&s, 0, in_order, &[], None);
        assert!(placed.is_empty());
        let mark = ScanMark {
            to: 1000 + to as u64,
            cursor,
            asked: 3,
        };
        // No request since: go on where it stopped (nothing new to walk).
        assert_eq!(mark.start(1000, s.len(), in_order, 3).0, s.len());
        // Page 2, requested since, is among the records it passed: found from the start.
        let (pos, cursor) = mark.start(1000, s.len(), in_order, 4);
        assert_eq!(pos, 0);
        assert_eq!(cursor.last, None);
        let (_, placed) = walk(&s, pos, cursor, &[2], None);
        assert_eq!(placed, vec![(2, 2)]);
        // The in-order pass is past where it stopped: from the in-order position.
        assert_eq!(mark.start(1000 + to as u64 + 8, 64, in_order, 3).0, 0);
        // A new link starts its offsets again: a default mark never resumes.
        assert_eq!(ScanMark::default().start(0, s.len(), in_order, 0).0, 0);
    }
}
