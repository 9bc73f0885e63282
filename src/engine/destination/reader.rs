//! The stream reader: a read buffer over any byte source, tracking the absolute stream
//! offset. Items are decoded in place from [`Reader::data`]; whatever borrows the buffer
//! (a device section, pages queued for the page writer) must be done with before the next
//! [`Reader::fill`] moves it.

use std::io::Read;

use crate::transport::Channel;

/// How reading failed: both mean a broken link.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("read from {peer} failed at stream offset {offset}: {source}")]
    Io {
        peer: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("stream ended early at offset {offset} ({context})")]
    Truncated { offset: u64, context: &'static str },
}

/// What the loader reads from. `read_ready` returns only bytes that have already arrived
/// (0 when there are none), so that a refill can gather a large batch without waiting.
pub(crate) trait ReadReady: Read {
    fn read_ready(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }
}

impl Read for &Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Channel::read(self, buf)
    }
}

impl ReadReady for &Channel {
    fn read_ready(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Channel::read_ready(self, buf)
    }
}

impl ReadReady for &[u8] {}

pub(crate) struct Reader<R> {
    pub(crate) src: R,
    pub(crate) peer: String,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    pub(crate) offset: u64,
    eof: bool,
    /// After a read, also take what else has already arrived, up to a full buffer: larger
    /// batches of pages let the page writer use two threads. Off in postcopy, where the
    /// first page of a read may be one a vCPU waits for.
    pub(crate) top_up: bool,
}

impl<R: ReadReady> Reader<R> {
    pub(crate) fn new(src: R, peer: String, cap: usize) -> Self {
        Reader {
            src,
            peer,
            buf: vec![0; cap],
            start: 0,
            end: 0,
            offset: 0,
            eof: false,
            top_up: true,
        }
    }

    /// Reads more; false at the end of the stream.
    pub(crate) fn fill(&mut self) -> Result<bool, ReadError> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 && (self.start >= self.buf.len() / 2 || self.end == self.buf.len()) {
            self.compact();
        }
        if self.end == self.buf.len() {
            // An item larger than the buffer (a big VM description): grow.
            let n = self.buf.len() * 2;
            self.buf.resize(n, 0);
        }
        loop {
            match self.src.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    while self.top_up && self.end < self.buf.len() {
                        match self.src.read_ready(&mut self.buf[self.end..]) {
                            Ok(m) if m > 0 => self.end += m,
                            // Nothing more yet, or an error the next read reports.
                            _ => break,
                        }
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ReadError::Io {
                        peer: self.peer.clone(),
                        offset: self.offset + (self.end - self.start) as u64,
                        source,
                    })
                }
            }
        }
    }

    /// Postcopy, while a vCPU waits for a page not read yet: appends what has already
    /// arrived, without waiting, so that the kernel's queue in front of that page drains at
    /// copy speed, not at the speed pages are placed; true if anything came. Errors are
    /// left to the next `fill`. The unplaced bytes this holds are bounded by the buffer
    /// (4 MiB on the main channel, `READ_CHUNK`): reading here never grows it, whatever
    /// the peer sends. Room is made by moving the unplaced bytes to the front when that
    /// moves no more than it frees, so a byte is moved at most once on average.
    pub(crate) fn read_arrived(&mut self) -> bool {
        if self.eof {
            return false;
        }
        if self.buf.len() - self.end < self.start && self.end - self.start <= self.start {
            self.compact();
        }
        if self.end == self.buf.len() {
            return false;
        }
        match self.src.read_ready(&mut self.buf[self.end..]) {
            Ok(n) if n > 0 => {
                self.end += n;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn need_more(&mut self, context: &'static str) -> Result<(), ReadError> {
        if self.fill()? {
            Ok(())
        } else {
            Err(ReadError::Truncated {
                offset: self.offset + (self.end - self.start) as u64,
                context,
            })
        }
    }

    /// True at the end of the stream with nothing left unread.
    pub(crate) fn eof_or_fill(&mut self) -> Result<bool, ReadError> {
        Ok(!self.fill()? && self.data().is_empty())
    }
}

impl Reader<&'static [u8]> {
    /// A reader over bytes already in memory, taken as its buffer.
    pub(crate) fn over(buf: Vec<u8>, peer: String, offset: u64) -> Self {
        Reader {
            src: &[],
            peer,
            end: buf.len(),
            buf,
            start: 0,
            offset,
            eof: true,
            top_up: false,
        }
    }
}

impl<R> Reader<R> {
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Moves the unread bytes to the front of the buffer.
    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    /// mapped-ram: goes on at stream offset `to`, past a block's pages. What is buffered
    /// before it is dropped; beyond the buffer, `lseek` moves the source there (the stream
    /// is a file) and the buffer starts afresh.
    pub(crate) fn seek(
        &mut self,
        to: u64,
        lseek: impl FnOnce(u64) -> std::io::Result<()>,
    ) -> Result<(), ReadError> {
        let buffered = (self.end - self.start) as u64;
        match to.checked_sub(self.offset) {
            Some(skip) if skip <= buffered => {
                self.consume(skip as usize);
                Ok(())
            }
            _ => {
                lseek(to).map_err(|source| ReadError::Io {
                    peer: self.peer.clone(),
                    offset: to,
                    source,
                })?;
                self.start = 0;
                self.end = 0;
                self.offset = to;
                self.eof = false;
                Ok(())
            }
        }
    }

    /// Makes room for an item of `n` bytes at `start` in one step (a postcopy package):
    /// growing by doubling would touch up to twice the item.
    pub(crate) fn reserve_exact(&mut self, n: usize) {
        if self.buf.len() - self.start < n {
            self.compact();
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
        }
    }

    /// Gives back what a big item made the buffer grow to, once the item is consumed.
    pub(crate) fn shrink_to(&mut self, cap: usize) {
        if self.buf.len() > cap && self.end - self.start <= cap {
            self.compact();
            self.buf.truncate(cap);
            self.buf.shrink_to_fit();
        }
    }
}

/// Decodes the next item with `$dec`, reading more as needed; binds it to `$pat` for `$body`
/// and consumes it afterwards. A macro because the item borrows the reader's buffer.
macro_rules! with_next {
    ($r:expr, $ctx:expr, $dec:expr, |$item:pat_param| $body:expr) => {{
        loop {
            match $dec($r.data()) {
                Ok(Some(($item, n))) => {
                    let out = $body;
                    $r.consume(n);
                    break out;
                }
                Ok(None) => {}
                Err(e) => return Err($r.wire(e)),
            }
            $r.need_more($ctx)?;
        }
    }};
}
pub(crate) use with_next;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_grows_for_large_items_and_tracks_the_offset() {
        let src: &[u8] = &[7u8; 100];
        let mut r = Reader::new(src, "test".into(), 16);
        assert!(r.fill().unwrap());
        assert_eq!(r.data().len(), 16);
        r.consume(4);
        assert_eq!(r.offset, 4);
        // Full with 12 bytes left: moves them to the front and reads more.
        while r.fill().unwrap() {}
        assert_eq!(r.data().len(), 96);
        assert!(r.need_more("test").is_err());
    }

    /// A socket with `ready` bytes arrived and more to come: blocking reads and
    /// `read_ready` take from the arrived ones only.
    struct Arrived {
        ready: std::collections::VecDeque<u8>,
    }

    impl Read for Arrived {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.ready.len());
            for (d, s) in buf.iter_mut().zip(self.ready.drain(..n)) {
                *d = s;
            }
            Ok(n)
        }
    }

    impl ReadReady for Arrived {
        fn read_ready(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.read(buf)
        }
    }

    fn arrived(n: u8) -> Reader<Arrived> {
        let src = Arrived {
            ready: (0..n).collect(),
        };
        let mut r = Reader::new(src, "test".into(), 16);
        r.top_up = false;
        r
    }

    #[test]
    fn read_arrived_takes_what_has_arrived_up_to_the_buffer_never_growing_it() {
        let mut r = arrived(40);
        assert!(r.read_arrived());
        assert_eq!(r.data(), &(0..16).collect::<Vec<u8>>()[..]);
        // Full, nothing placed: no room, and the buffer stays as it is.
        assert!(!r.read_arrived());
        assert_eq!(r.buf.len(), 16);
    }

    #[test]
    fn read_arrived_makes_room_when_that_moves_no_more_than_it_frees() {
        let mut r = arrived(40);
        assert!(r.read_arrived());
        // 4 placed, 12 not: moving 12 bytes to free 4 is not worth it.
        r.consume(4);
        assert!(!r.read_arrived());
        assert_eq!(r.data().len(), 12);
        // 10 placed, 6 not: moved to the front, and 10 more read behind them.
        r.consume(6);
        assert!(r.read_arrived());
        assert_eq!(r.data(), &(10..26).collect::<Vec<u8>>()[..]);
        assert_eq!(r.offset, 10);
        assert_eq!(r.buf.len(), 16);
    }

    #[test]
    fn read_arrived_is_nothing_when_nothing_has_arrived() {
        let mut r = arrived(0);
        assert!(!r.read_arrived());
        assert!(r.data().is_empty());
    }
}
