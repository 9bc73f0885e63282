//! mapped-ram (`migration/ram.c`, `docs/devel/migration/mapped-ram.rst`): with the
//! capability, a file holds every RAM page at a fixed place. After each block's entry in
//! the RAM block list comes a `MappedRamHeader`; the block's bitmap (one bit per page, set
//! for a page whose data is in the file) and its pages live at the absolute file offsets the
//! header names, and the stream goes on after the pages region. Zero pages are never
//! written: their bit is clear and their place in the file is a hole.
//!
//! Pure: the header codec, the layout a writer chooses, the checks a reader makes before
//! any offset from a file sizes a read, and the bitmap's runs.

use crate::compat::wire::mapped_ram::{FILE_OFFSET_ALIGNMENT, HEADER_LEN, VERSION};
use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::wire::stream::{put_be32, put_be64, Cursor, Decoded, WireError};

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// A block's `MappedRamHeader`; offsets are absolute in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub page_size: u64,
    pub bitmap_offset: u64,
    pub pages_offset: u64,
}

/// Bytes of a block's bitmap: `BITS_TO_LONGS(pages) * sizeof(long)` on x86-64.
pub fn bitmap_len(used_length: u64) -> u64 {
    (used_length / PAGE).div_ceil(64) * 8
}

/// The header a writer puts after a block's entry that ends at absolute file offset `at`,
/// as QEMU's `mapped_ram_setup_ramblock` lays it out: the bitmap right after the header,
/// the pages at the next 1 MiB boundary. The stream goes on at [`Header::end`].
pub fn layout(at: u64, used_length: u64) -> Result<Header, WireError> {
    let overflow = || WireError::Invalid("mapped-ram layout runs past 2^64".into());
    let bitmap_offset = at.checked_add(HEADER_LEN as u64).ok_or_else(overflow)?;
    let pages_offset = bitmap_offset
        .checked_add(bitmap_len(used_length))
        .and_then(|e| e.checked_next_multiple_of(FILE_OFFSET_ALIGNMENT))
        .ok_or_else(overflow)?;
    pages_offset.checked_add(used_length).ok_or_else(overflow)?;
    Ok(Header {
        version: VERSION,
        page_size: PAGE,
        bitmap_offset,
        pages_offset,
    })
}

impl Header {
    /// Where the stream goes on after this block (`pages_offset + used_length`), checked.
    pub fn end(&self, used_length: u64) -> Option<u64> {
        self.pages_offset.checked_add(used_length)
    }

    /// Absolute file offset of the page at `offset` in the block.
    pub fn page_at(&self, offset: u64) -> u64 {
        self.pages_offset + offset
    }
}

pub fn encode_header(out: &mut Vec<u8>, h: &Header) {
    put_be32(out, h.version);
    put_be64(out, h.page_size);
    put_be64(out, h.bitmap_offset);
    put_be64(out, h.pages_offset);
}

/// Decodes a header; a version newer than 1 is refused with QEMU's words. The offsets are
/// not checked here: see [`check`].
pub fn decode_header(buf: &[u8]) -> Decoded<Header> {
    let mut c = Cursor::new(buf);
    let (Some(version), Some(page_size), Some(bitmap_offset), Some(pages_offset)) =
        (c.be32(), c.be64(), c.be64(), c.be64())
    else {
        return Ok(None);
    };
    if version > VERSION {
        return Err(WireError::Invalid(format!(
            "Migration mapped-ram capability version not supported (expected <= {VERSION}, \
             got {version})"
        )));
    }
    Ok(Some((
        Header {
            version,
            page_size,
            bitmap_offset,
            pages_offset,
        },
        HEADER_LEN,
    )))
}

/// A region of the file: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
}

impl Region {
    fn overlaps(&self, o: &Region) -> bool {
        self.start < o.end && o.start < self.end
    }
}

/// The two regions a checked header names: its bitmap and its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    pub bitmap: Region,
    pub pages: Region,
}

/// Checks a header read right before absolute offset `after` (the end of the header
/// itself) for a block of `used_length` bytes named `block`, in a file of `file_len` bytes
/// (None: not known, e.g. a pipe): page size 4 KiB, pages page-aligned (QEMU's check),
/// bitmap and pages inside the file, after the header, and not overlapping each other or
/// any region in `taken` (the other blocks'). Only then may the offsets size a read.
pub fn check(
    h: &Header,
    block: &str,
    used_length: u64,
    after: u64,
    file_len: Option<u64>,
    taken: &[Regions],
) -> Result<Regions, WireError> {
    let bad = |why: String| WireError::Invalid(format!("mapped-ram block {block:?}: {why}"));
    if h.page_size != PAGE {
        return Err(bad(format!(
            "page size {} (only {PAGE} is supported)",
            h.page_size
        )));
    }
    if h.pages_offset % PAGE != 0 {
        return Err(WireError::Invalid(format!(
            "Error reading ramblock {block} pages, region has bad alignment"
        )));
    }
    if used_length % PAGE != 0 {
        return Err(bad(format!(
            "length {used_length:#x} is not a multiple of the page size"
        )));
    }
    let region = |what: &str, start: u64, len: u64| -> Result<Region, WireError> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| bad(format!("{what} at {start:#x} runs past 2^64")))?;
        if start < after {
            return Err(bad(format!(
                "{what} at {start:#x} lies before the end of its header ({after:#x})"
            )));
        }
        if let Some(n) = file_len {
            if end > n {
                return Err(bad(format!(
                    "{what} [{start:#x}, {end:#x}) lies outside the file ({n:#x} bytes)"
                )));
            }
        }
        Ok(Region { start, end })
    };
    let r = Regions {
        bitmap: region("bitmap", h.bitmap_offset, bitmap_len(used_length))?,
        pages: region("pages", h.pages_offset, used_length)?,
    };
    if r.bitmap.overlaps(&r.pages) {
        return Err(bad("its bitmap and its pages overlap".into()));
    }
    for o in taken {
        for (mine, theirs) in [
            (r.bitmap, o.bitmap),
            (r.bitmap, o.pages),
            (r.pages, o.bitmap),
            (r.pages, o.pages),
        ] {
            if mine.overlaps(&theirs) {
                return Err(bad(format!(
                    "[{:#x}, {:#x}) overlaps another block's [{:#x}, {:#x})",
                    mine.start, mine.end, theirs.start, theirs.end
                )));
            }
        }
    }
    Ok(r)
}

/// A bitmap read from the file (native `unsigned long`s: little-endian u64 words on
/// x86-64) as words, bits past `pages` cleared. `bytes` must be [`bitmap_len`] long.
pub fn decode_bitmap(bytes: &[u8], pages: u64) -> Result<Vec<u64>, WireError> {
    let want = pages.div_ceil(64) * 8;
    if bytes.len() as u64 != want {
        return Err(WireError::Invalid(format!(
            "mapped-ram bitmap is {} bytes, {want} expected for {pages} pages",
            bytes.len()
        )));
    }
    let mut words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .collect();
    if pages % 64 != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (pages % 64)) - 1;
        }
    }
    Ok(words)
}

/// The bitmap as it goes into the file.
pub fn encode_bitmap(out: &mut Vec<u8>, words: &[u64]) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Runs of set bits: `(first page, pages)`, in order, each as long as possible. A run is
/// what a reader fetches with one `pread` (or a writer with one `pwritev`).
pub fn runs(words: &[u64]) -> Runs<'_> {
    Runs {
        words,
        bit: 0,
        set: true,
    }
}

/// Runs of clear bits below `pages`: the pages whose place in the file is a hole.
pub fn holes(words: &[u64], pages: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    Runs {
        words,
        bit: 0,
        set: false,
    }
    .map(move |(s, n)| (s, n.min(pages.saturating_sub(s))))
    .filter(|&(_, n)| n > 0)
}

/// Iterator of [`runs`] (or of clear runs).
pub struct Runs<'a> {
    words: &'a [u64],
    bit: u64,
    /// Runs of set bits (true) or of clear bits.
    set: bool,
}

impl Runs<'_> {
    fn total(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// First bit at or after `from` whose value is `want`, or the end.
    fn first_from(&self, from: u64, want: bool) -> u64 {
        let total = self.total();
        let mut i = from;
        while i < total {
            let wi = (i / 64) as usize;
            let w = if want {
                self.words[wi]
            } else {
                !self.words[wi]
            };
            let w = w & (u64::MAX << (i % 64));
            if w != 0 {
                return wi as u64 * 64 + u64::from(w.trailing_zeros());
            }
            i = (wi as u64 + 1) * 64;
        }
        total
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.first_from(self.bit, self.set);
        if start >= self.total() {
            self.bit = start;
            return None;
        }
        let end = self.first_from(start + 1, !self.set);
        self.bit = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers QEMU 10.0.2 wrote for `-M none -m 16M` saved to `file:` (offset 0,
    /// capability list in the configuration section): the block entry `ram` ends at 0x65,
    /// the bitmap is at 0x81, the pages at 1 MiB, the stream goes on at 0x1100000.
    #[test]
    fn layout_as_qemu_lays_it_out() {
        let h = layout(0x65, 16 << 20).unwrap();
        assert_eq!(h.bitmap_offset, 0x81);
        assert_eq!(h.pages_offset, 0x10_0000);
        assert_eq!(h.end(16 << 20), Some(0x110_0000));
        // A bitmap that crosses the boundary moves the pages to the next one.
        let big = layout(0xff_0000, 64 << 30).unwrap();
        assert_eq!(big.pages_offset, 0x120_0000);
        assert_eq!(bitmap_len(64 << 30), 2 << 20);
    }

    #[test]
    fn header_roundtrip_and_newer_version_refused() {
        let h = layout(100, 1 << 20).unwrap();
        let mut b = Vec::new();
        encode_header(&mut b, &h);
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(decode_header(&b).unwrap(), Some((h, HEADER_LEN)));
        assert_eq!(decode_header(&b[..27]).unwrap(), None);
        b[3] = 2;
        let e = decode_header(&b).unwrap_err().to_string();
        assert!(e.contains("expected <= 1, got 2"), "{e}");
    }

    #[test]
    fn checks_refuse_what_would_read_outside_the_file_or_overlap() {
        let len = 1 << 20;
        let h = layout(100, len).unwrap();
        let after = 100 + HEADER_LEN as u64;
        let file = Some(h.end(len).unwrap() + 100);
        let r = check(&h, "ram", len, after, file, &[]).unwrap();
        assert_eq!(r.pages.start, h.pages_offset);
        let e = |h: Header, file: Option<u64>, taken: &[Regions]| {
            check(&h, "ram", len, after, file, taken)
                .unwrap_err()
                .to_string()
        };
        assert!(e(h, Some(h.pages_offset + 4096), &[]).contains("outside the file"));
        let mut o = h;
        o.bitmap_offset = h.pages_offset + 8;
        assert!(e(o, file, &[]).contains("overlap"));
        o = h;
        o.pages_offset = 4096 * 5 + 1;
        assert!(e(o, file, &[]).contains("bad alignment"));
        o = h;
        o.bitmap_offset = 4;
        assert!(e(o, file, &[]).contains("before the end of its header"));
        o = h;
        o.pages_offset = u64::MAX - 4095;
        assert!(e(o, None, &[]).contains("past 2^64"));
        o = h;
        o.page_size = 2 << 20;
        assert!(e(o, file, &[]).contains("page size"));
        assert!(e(h, file, &[r]).contains("overlaps another block"));
    }

    #[test]
    fn bitmap_words_and_runs() {
        let words = vec![0b0110_0011u64, u64::MAX, 1];
        let mut bytes = Vec::new();
        encode_bitmap(&mut bytes, &words);
        assert_eq!(decode_bitmap(&bytes, 129).unwrap(), words);
        // Bits past the block's pages are dropped.
        bytes[16] = 0b110;
        assert_eq!(decode_bitmap(&bytes, 129).unwrap()[2], 0);
        assert!(decode_bitmap(&bytes[..16], 129).is_err());
        let r: Vec<_> = runs(&words).collect();
        assert_eq!(r, vec![(0, 2), (5, 2), (64, 65)]);
        let h: Vec<_> = holes(&words, 140).collect();
        assert_eq!(h, vec![(2, 3), (7, 57), (129, 11)]);
        assert_eq!(runs(&[0, 0]).count(), 0);
        assert_eq!(runs(&[u64::MAX; 3]).collect::<Vec<_>>(), vec![(0, 192)]);
    }
}
