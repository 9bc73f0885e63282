//! Reader operations for items far larger than the read buffer (a postcopy package, the
//! held device state), kept apart from the loader: sized to the item, not doubled.

use super::Reader;

impl Reader<&'static [u8]> {
    /// A reader over bytes already in memory, taken as its buffer.
    pub(super) fn over(buf: Vec<u8>, peer: String) -> Self {
        Reader {
            src: &[],
            peer,
            end: buf.len(),
            buf,
            start: 0,
            offset: 0,
            eof: true,
            top_up: false,
        }
    }
}

impl<R> Reader<R> {
    /// Makes room for an item of `n` bytes at `start` in one step: growing by doubling
    /// would touch up to twice the item.
    pub(super) fn reserve_exact(&mut self, n: usize) {
        if self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
        }
    }

    /// Gives back what a big item made the buffer grow to, once the item is consumed.
    pub(super) fn shrink_to(&mut self, cap: usize) {
        if self.buf.len() > cap && self.end - self.start <= cap {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            self.buf.truncate(cap);
            self.buf.shrink_to_fit();
        }
    }
}
