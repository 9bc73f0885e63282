//! A page bitmap that the loader, the fault thread, the preempt thread and the multifd
//! receivers share.

use std::sync::atomic::{AtomicU64, Ordering};

/// A bitmap shared between threads (bit i of word w = page 64w + i).
pub(crate) struct AtomicBitmap(Vec<AtomicU64>);

impl AtomicBitmap {
    pub(crate) fn new(bits: u64) -> Self {
        AtomicBitmap((0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// A bitmap with these words (bit i of word w = page 64w + i).
    pub(crate) fn from_words(words: Vec<u64>) -> Self {
        AtomicBitmap(words.into_iter().map(AtomicU64::new).collect())
    }

    pub(crate) fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    pub(crate) fn set(&self, i: u64) {
        if let Some(w) = self.0.get((i / 64) as usize) {
            w.fetch_or(1 << (i % 64), Ordering::AcqRel);
        }
    }

    pub(crate) fn clear(&self, i: u64) {
        if let Some(w) = self.0.get((i / 64) as usize) {
            w.fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }

    /// Clears bit `i`; returns whether it was set. A clear bit costs a load, not a locked
    /// read-modify-write (the usual case on a page path into preallocated memory).
    pub(crate) fn take(&self, i: u64) -> bool {
        let bit = 1 << (i % 64);
        self.0.get((i / 64) as usize).is_some_and(|w| {
            w.load(Ordering::Acquire) & bit != 0 && w.fetch_and(!bit, Ordering::AcqRel) & bit != 0
        })
    }

    /// Sets the bits of `mask` in word `w`.
    pub(crate) fn set_mask(&self, w: usize, mask: u64) {
        if let Some(word) = self.0.get(w) {
            word.fetch_or(mask, Ordering::AcqRel);
        }
    }

    /// Clears the bits of `mask` in word `w`.
    pub(crate) fn clear_mask(&self, w: usize, mask: u64) {
        if let Some(word) = self.0.get(w) {
            word.fetch_and(!mask, Ordering::AcqRel);
        }
    }

    /// The bits as words.
    pub(crate) fn words(&self) -> Vec<u64> {
        self.0.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    pub(crate) fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count() {
        let b = AtomicBitmap::new(130);
        b.set(0);
        b.set(64);
        b.set(129);
        b.set(500); // outside: ignored
        assert!(b.get(64) && b.get(129) && !b.get(1));
        assert_eq!(b.count(), 3);
        b.clear(64);
        b.clear_mask(0, 1);
        assert_eq!(b.words(), vec![0, 0, 2]);
        assert!(b.take(129) && !b.take(129) && !b.take(500));
        b.set_mask(1, 0b101);
        assert_eq!(b.words(), vec![0, 0b101, 0]);
        let c = AtomicBitmap::from_words(vec![7, 1 << 63]);
        assert!(c.get(2) && c.get(127) && !c.get(3));
    }
}
