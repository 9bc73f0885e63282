//! mapped-ram: the fuzz targets of the header/bitmap codec and of `analyze` on a
//! mapped-ram file, their seeds, and the file builder the seeds and the unit tests share.

use crate::compat::wire::mapped_ram::{FILE_OFFSET_ALIGNMENT, HEADER_LEN};
use crate::compat::wire::{ram as flag, TARGET_PAGE_SIZE};
use crate::wire::mapped_ram;
use crate::wire::ram::{self, BlockEntry};
use crate::wire::stream::{self, put_be64, SectionHeader, SectionKind};

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// The content of page `i` of a block filled with `fill`: distinct pages, so a page copied
/// to the wrong place shows.
pub fn page_content(fill: u8, i: u64) -> [u8; TARGET_PAGE_SIZE] {
    let mut p = [fill; TARGET_PAGE_SIZE];
    p[..8].copy_from_slice(&(i + 1).to_le_bytes());
    p
}

/// A mapped-ram file laid out as QEMU 10.0.2 lays out `-M none` saved to
/// `file:PATH,offset=OFFSET` (zeros before the stream): header, configuration listing
/// `mapped-ram`, RAM START (section 2) whose block list has each block's mapped-ram header,
/// bitmap and pages (at the next `align` boundary: QEMU's is 1 MiB; the compact seeds use a
/// page), the START's EOS and footer, a RAM PART and END of only EOS, EOF. Each block is
/// its pages: `Some(fill)` a page of data ([`page_content`]), `None` a zero page (bit
/// clear, a hole).
pub fn mapped_ram_file(offset: usize, align: u64, blocks: &[(&str, Vec<Option<u8>>)]) -> Vec<u8> {
    let mut out = vec![0u8; offset];
    stream::encode_header(&mut out);
    let _ = stream::encode_configuration_with(&mut out, "none", &["mapped-ram"]);
    let ram = SectionHeader {
        section_id: 2,
        idstr: "ram".into(),
        instance_id: 0,
        version_id: flag::VERSION,
    };
    let _ = stream::encode_section_start(&mut out, SectionKind::Start, &ram);
    let total: u64 = blocks.iter().map(|(_, p)| p.len() as u64 * PAGE).sum();
    put_be64(&mut out, total | flag::MEM_SIZE);
    for (name, pages) in blocks {
        let len = pages.len() as u64 * PAGE;
        let entry = BlockEntry {
            idstr: (*name).into(),
            used_length: len,
            page_size: None,
        };
        // The entry alone: encode_block_entries writes the MEM_SIZE record first.
        let mut e = Vec::new();
        let _ = ram::encode_block_entries(&mut e, std::slice::from_ref(&entry));
        out.extend_from_slice(&e[8..]);
        let at = out.len() as u64;
        let mut h = match mapped_ram::layout(at, len) {
            Ok(h) => h,
            Err(_) => return out,
        };
        if align != FILE_OFFSET_ALIGNMENT {
            h.pages_offset =
                (h.bitmap_offset + mapped_ram::bitmap_len(len)).next_multiple_of(align);
        }
        mapped_ram::encode_header(&mut out, &h);
        let mut words = vec![0u64; pages.len().div_ceil(64)];
        for (i, p) in pages.iter().enumerate() {
            if p.is_some() {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        let mut bm = Vec::new();
        mapped_ram::encode_bitmap(&mut bm, &words);
        out.extend_from_slice(&bm);
        out.resize(h.pages_offset as usize + len as usize, 0);
        for (i, p) in pages.iter().enumerate() {
            if let Some(fill) = p {
                let at = h.pages_offset as usize + i * TARGET_PAGE_SIZE;
                out[at..at + TARGET_PAGE_SIZE].copy_from_slice(&page_content(*fill, i as u64));
            }
        }
    }
    ram::encode_eos(&mut out);
    stream::encode_footer(&mut out, 2);
    for kind in [SectionKind::Part, SectionKind::End] {
        stream::encode_section_part(&mut out, kind, 2);
        ram::encode_eos(&mut out);
        stream::encode_footer(&mut out, 2);
    }
    stream::encode_eof(&mut out);
    out
}

/// Seeds: compact files of the QEMU layout (pages at the next page), one with two blocks
/// and an offset; header+numbers inputs for the codec target.
pub(super) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mixed: Vec<Option<u8>> = (0..8u8).map(|i| (i % 3 != 0).then_some(0x40 + i)).collect();
    let small = mapped_ram_file(0, PAGE, &[("ram", mixed.clone())]);
    let two = mapped_ram_file(
        0,
        PAGE,
        &[("pc.ram", mixed), ("vga.vram", vec![None, Some(7)])],
    );
    let mut seeds = vec![("mapped_file", small), ("mapped_file", two)];
    // Codec inputs: header, used_length, the header's end, the file's length, bitmap.
    for (at, len) in [(0x65u64, 16u64 << 20), (0x1000, 0x9000), (0, 64 * PAGE)] {
        if let Ok(h) = mapped_ram::layout(at, len) {
            let mut s = Vec::new();
            mapped_ram::encode_header(&mut s, &h);
            s.extend_from_slice(&len.to_le_bytes());
            s.extend_from_slice(&(at + HEADER_LEN as u64).to_le_bytes());
            s.extend_from_slice(&h.end(len).unwrap_or(0).to_le_bytes());
            s.extend_from_slice(&[0b1011_0001, 0xff, 0, 0x80, 1, 0, 0, 0]);
            seeds.push(("mapped_ram", s));
        }
    }
    seeds
}

fn le64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    u64::from_le_bytes(w)
}

/// The codec: a header, three numbers (block length, end of the header, file length) and a
/// bitmap. Whatever `check` accepts lies inside the file and after the header; the bitmap's
/// runs and holes partition the block's pages; encodings round-trip.
pub fn codec(data: &[u8]) {
    let Ok(Some((h, n))) = mapped_ram::decode_header(data) else {
        return;
    };
    let mut enc = Vec::new();
    mapped_ram::encode_header(&mut enc, &h);
    assert_eq!(&enc[..], &data[..n]);
    let rest = &data[n..];
    let nums = |i: usize| le64(rest.get(i * 8..(i + 1) * 8).unwrap_or(&[]));
    // Lengths small enough that the bitmap below stays in the input's scale.
    let used = nums(0) % (1 << 30) / PAGE * PAGE;
    let after = nums(1);
    let file_len = nums(2);
    let bitmap = rest.get(24..).unwrap_or(&[]);
    if let Ok(r) = mapped_ram::check(&h, "ram", used, after, Some(file_len), &[]) {
        for reg in [r.bitmap, r.pages] {
            assert!(
                reg.start >= after && reg.start <= reg.end && reg.end <= file_len,
                "{r:?}"
            );
        }
        assert!(r.bitmap.end <= r.pages.start || r.pages.end <= r.bitmap.start);
        assert_eq!(r.pages.end - r.pages.start, used);
        assert_eq!(h.end(used), Some(r.pages.end));
        // The same regions again overlap themselves (empty ones overlap nothing).
        if used > 0 {
            assert!(mapped_ram::check(&h, "ram", used, after, Some(file_len), &[r]).is_err());
        }
    }
    if let Ok(l) = mapped_ram::layout(after, used) {
        let end = l.end(used).unwrap_or(u64::MAX);
        assert!(mapped_ram::check(&l, "ram", used, after, Some(end), &[]).is_ok());
    }
    // The bitmap of as many pages as its bytes hold, and of fewer.
    let pages = (bitmap.len() / 8 * 64) as u64;
    for p in [pages, pages.saturating_sub(used / PAGE % 64)] {
        let Ok(words) = mapped_ram::decode_bitmap(&bitmap[..bitmap.len() / 8 * 8], p) else {
            assert!(p.div_ceil(64) * 8 != (bitmap.len() / 8 * 8) as u64);
            continue;
        };
        let set: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut covered = 0u64;
        let mut last_end = 0u64;
        let mut spans: Vec<(u64, u64)> = mapped_ram::runs(&words)
            .chain(mapped_ram::holes(&words, p))
            .collect();
        let run_pages: u64 = mapped_ram::runs(&words).map(|(_, n)| n).sum();
        assert_eq!(run_pages, set);
        spans.sort_unstable();
        for (s, n) in spans {
            assert!(n > 0 && s == last_end, "gap or overlap at page {s}");
            last_end = s + n;
            covered += n;
        }
        assert_eq!(covered, p, "runs and holes cover the pages");
        let mut again = Vec::new();
        mapped_ram::encode_bitmap(&mut again, &words);
        assert_eq!(mapped_ram::decode_bitmap(&again, p).ok(), Some(words));
    }
}

/// `analyze` on a mapped-ram-shaped file: no panic, and for each block it read, its
/// header's regions inside the file and its pages counted in full.
pub fn file(data: &[u8]) {
    super::targets::stream(data);
    let Ok(r) = crate::analyze::analyze_bytes(data) else {
        return;
    };
    for b in &r.blocks {
        if let Some(m) = &b.mapped {
            assert_eq!(b.pages, b.length / PAGE, "{b:?}");
            assert_eq!(m.data_pages + b.zero_pages, b.pages, "{b:?}");
            assert!(m.pages_offset + b.length <= data.len() as u64, "{b:?}");
        }
    }
}
