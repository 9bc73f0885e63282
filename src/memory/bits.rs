//! Page bitmaps as words: which bitmap words a range of pages falls in, each with the mask
//! of those pages. Shared by the source's to-do bitmaps and the destination's received ones.

/// The bitmap words that bits `first..last` fall in, each with the mask of those bits: a
/// range costs one step per 64 pages, not one per page.
pub(crate) fn word_masks(first: u64, last: u64) -> impl Iterator<Item = (usize, u64)> {
    let (fw, lw) = (first / 64, last.div_ceil(64));
    (fw..lw).map(move |w| {
        let lo = first.max(w * 64) - w * 64;
        let hi = last.min(w * 64 + 64) - w * 64;
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (w as usize, mask)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_masks_match_bit_by_bit() {
        for (first, last) in [(0, 0), (5, 5), (0, 64), (3, 200), (64, 65), (63, 129)] {
            let mut want = vec![0u64; 4];
            for p in first..last {
                want[(p / 64) as usize] |= 1 << (p % 64);
            }
            let mut got = vec![0u64; 4];
            for (w, m) in word_masks(first, last) {
                got[w] |= m;
            }
            assert_eq!(got, want, "{first}..{last}");
        }
        // A whole 64 GiB block is 262144 words, not 16 M pages.
        assert_eq!(word_masks(0, 16 << 20).count(), 262_144);
    }
}
