//! `analyze` on mapped-ram files and `--extract-ram`, on files built as QEMU lays them out.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::*;
use crate::compat::wire::mapped_ram::FILE_OFFSET_ALIGNMENT;
use crate::compat::wire::ram as flag;
use crate::fuzzing::{mapped_ram_file, page_content};
use crate::wire::mapped_ram as mr;
use crate::wire::ram::BlockEntry;
use crate::wire::stream::{SectionHeader, SectionKind};

const PAGE: usize = 4096;

/// The first 0xa8 bytes of QEMU 10.0.2's save of `-M none -m 16M` with mapped-ram (all
/// zero RAM): header, configuration, RAM START with the block `ram` and its header, bitmap.
const QEMU_PROLOGUE: &str = "5145564d0000000307000000046e6f6e65051a636f6e66696775726174696f6e2f\
6361706162696c697469657300000001000000010a6d61707065642d72616d01000000020372616d000000000000\
000400000000010000040372616d000000000100000000000001000000000000100000000000000000810000000000\
100000000000000000000000000000000000000000000000000000000000000000000000000000000000";
/// And at 0x1100000, after the pages: START's EOS and footer, a PART of only EOS.
const QEMU_AFTER_PAGES: &str = "00000000000000107e00000002020000000200000000000000107e00000002";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

struct Dir(PathBuf);
impl Dir {
    fn new(what: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "qmh-analyze-{what}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mixed(n: usize) -> Vec<Option<u8>> {
    (0..n).map(|i| (i % 5 != 2).then_some(i as u8)).collect()
}

fn expected(pages: &[Option<u8>]) -> Vec<u8> {
    let mut v = vec![0u8; pages.len() * PAGE];
    for (i, p) in pages.iter().enumerate() {
        if let Some(f) = p {
            v[i * PAGE..(i + 1) * PAGE].copy_from_slice(&page_content(*f, i as u64));
        }
    }
    v
}

#[test]
fn builder_lays_out_as_qemu() {
    let f = mapped_ram_file(0, FILE_OFFSET_ALIGNMENT, &[("ram", vec![None; 4096])]);
    assert_eq!(&f[..0xa8], &unhex(QEMU_PROLOGUE)[..]);
    let tail = unhex(QEMU_AFTER_PAGES);
    assert_eq!(&f[0x110_0000..0x110_0000 + tail.len()], &tail[..]);
}

#[test]
fn mapped_ram_file_analysed() {
    let pages = mixed(200);
    let f = mapped_ram_file(
        0,
        FILE_OFFSET_ALIGNMENT,
        &[("pc.ram", pages.clone()), ("vga.vram", vec![None, Some(9)])],
    );
    let r = analyze_buf(&f, None, 0).unwrap();
    assert!(r.complete);
    assert_eq!(r.capabilities, vec!["mapped-ram"]);
    assert_eq!(r.blocks.len(), 2);
    let b = &r.blocks[0];
    let m = b.mapped.as_ref().unwrap();
    assert_eq!((m.version, m.page_size), (1, 4096));
    assert_eq!(m.pages_offset % FILE_OFFSET_ALIGNMENT, 0);
    assert_eq!(b.pages, 200);
    assert_eq!(b.zero_pages, 40);
    assert_eq!(m.data_pages, 160);
    let v = &r.blocks[1];
    assert_eq!((v.pages, v.zero_pages), (2, 1));
    // The walk went on after the pages: START, PART, END, EOF.
    let kinds: Vec<_> = r.items.iter().map(|i| i.kind.as_str()).collect();
    assert_eq!(kinds, vec!["START", "PART", "END", "EOF"]);
    let j = r.to_json();
    assert_eq!(j["ram"][0]["mapped-ram"]["pages-with-data"], 160);
    assert_eq!(j["ram"][0]["mapped-ram"]["bitmap-offset"], m.bitmap_offset);
    let mut text = Vec::new();
    r.print(&mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("160 with data, 40 zero"), "{text}");
    assert!(text.contains("mapped-ram header: version 1"), "{text}");
}

#[test]
fn stream_at_an_offset() {
    let f = mapped_ram_file(0x3000, PAGE as u64, &[("ram", mixed(10))]);
    let r = analyze_buf(&f, None, 0x3000).unwrap();
    assert!(r.complete);
    assert_eq!(r.stream_offset, 0x3000);
    assert!(r.items[0].offset > 0x3000, "{:?}", r.items[0]);
    let e = analyze_buf(&f, None, 0).unwrap_err().to_string();
    assert!(e.contains("--offset 12288"), "{e}");
    let e = analyze_buf(&f, None, f.len() as u64 + 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("past the end"), "{e}");
}

/// Where the header of block `nth` is in a built file.
fn header_at(f: &[u8], name: &str) -> usize {
    let mut pat = vec![name.len() as u8];
    pat.extend_from_slice(name.as_bytes());
    let at = f.windows(pat.len()).position(|w| w == pat).unwrap();
    at + pat.len() + 8
}

#[test]
fn bad_offsets_are_errors_naming_the_block() {
    let f = mapped_ram_file(0, PAGE as u64, &[("a", mixed(64)), ("b", mixed(8))]);
    let h = header_at(&f, "b");
    let set = |f: &mut Vec<u8>, field: usize, v: u64| {
        let at = h + 4 + 8 * field;
        f[at..at + 8].copy_from_slice(&v.to_be_bytes());
    };
    let cases: [(usize, u64, &str); 5] = [
        (1, f.len() as u64, "outside the file"),
        (2, u64::MAX - 4095, "past 2^64"),
        (2, 4097, "bad alignment"),
        (1, 3, "before the end of its header"),
        (0, 8192, "page size"),
    ];
    for (field, v, want) in cases {
        let mut g = f.clone();
        set(&mut g, field, v);
        let e = analyze_buf(&g, None, 0).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
        assert!(e.contains("\"b\"") || e.contains("ramblock b"), "{e}");
    }
    // Block a's bitmap inside block b's pages (a reads its bitmap there; b then overlaps).
    let a = header_at(&f, "a");
    let b_pages = u64::from_be_bytes(f[h + 20..h + 28].try_into().unwrap());
    let mut g = f.clone();
    g[a + 12..a + 20].copy_from_slice(&b_pages.to_be_bytes());
    let e = analyze_buf(&g, None, 0).unwrap_err().to_string();
    assert!(
        e.contains("overlaps another block") && e.contains("\"b\""),
        "{e}"
    );
    // A newer version.
    let mut g = f.clone();
    g[h + 3] = 2;
    let e = analyze_buf(&g, None, 0).unwrap_err().to_string();
    assert!(e.contains("got 2"), "{e}");
    // Every cut of the file: an error, never a panic.
    for cut in (0..f.len()).step_by(97) {
        assert!(analyze_buf(&f[..cut], None, 0).is_err());
    }
}

#[test]
fn page_records_refused_under_mapped_ram() {
    let mut f = mapped_ram_file(0, PAGE as u64, &[("ram", mixed(4))]);
    // Replace the START's EOS by a zero page record, then EOS.
    // EOF 1 byte, END and PART 18 each, the START's footer 5, its EOS 8.
    let eos = f.len() - 1 - 18 * 2 - 5 - 8;
    let mut rec = Vec::new();
    ram::encode_zero_page(&mut rec, 0, Some("ram")).unwrap();
    f.splice(eos..eos, rec);
    let e = analyze_buf(&f, None, 0).unwrap_err().to_string();
    assert!(e.contains("Unexpected RAM flags"), "{e}");
}

#[test]
fn mapped_ram_extracted_with_holes() {
    let d = Dir::new("mapped");
    // 300 pages mostly zero, a run crossing words, a last page set.
    let mut big = vec![None; 300];
    for p in big.iter_mut().take(140).skip(60) {
        *p = Some(0xa5);
    }
    big[299] = Some(1);
    let small = mixed(7);
    let f = mapped_ram_file(
        0x200,
        FILE_OFFSET_ALIGNMENT,
        &[("pc/ram", big.clone()), ("vram", small.clone())],
    );
    let file = d.0.join("s.bin");
    std::fs::write(&file, &f).unwrap();
    let out = d.0.join("out");
    let r = analyze_at(&file, Some(&out), 0x200).unwrap();
    assert!(r.complete);
    assert_eq!(std::fs::read(out.join("pc_ram")).unwrap(), expected(&big));
    assert_eq!(std::fs::read(out.join("vram")).unwrap(), expected(&small));
    // Zero pages are holes: 81 pages of data, not 300.
    let blocks = std::fs::metadata(out.join("pc_ram")).unwrap().blocks() * 512;
    assert!(blocks < 120 * PAGE as u64, "{blocks} bytes allocated");
    // The fallback copy through the mapping gives the same.
    let mut x = Extract::new(&d.0.join("out2"), None).unwrap();
    x.add_block("pc/ram", 300 * PAGE as u64).unwrap();
    let h = header_at(&f, "pc/ram");
    let (hd, _) = mr::decode_header(&f[h..]).unwrap().unwrap();
    let bm = &f[hd.bitmap_offset as usize..][..mr::bitmap_len(300 * PAGE as u64) as usize];
    let words = mr::decode_bitmap(bm, 300).unwrap();
    x.mapped_block(0, &hd, &words, &f).unwrap();
    assert_eq!(
        std::fs::read(d.0.join("out2/pc_ram")).unwrap(),
        expected(&big)
    );
}

/// An ordinary stream: pages out of order, in several blocks, a page sent again, a page
/// sent with data then as zero, a 7.2-style filled zero page.
#[test]
fn ordinary_stream_extracted_in_runs() {
    let d = Dir::new("ordinary");
    let n = 3000usize;
    let mut s = Vec::new();
    stream::encode_header(&mut s);
    stream::encode_configuration(&mut s, "none").unwrap();
    let ram_h = SectionHeader {
        section_id: 2,
        idstr: "ram".into(),
        instance_id: 0,
        version_id: flag::VERSION,
    };
    stream::encode_section_start(&mut s, SectionKind::Start, &ram_h).unwrap();
    let blocks = [
        BlockEntry {
            idstr: "a".into(),
            used_length: (n * PAGE) as u64,
            page_size: None,
        },
        BlockEntry {
            idstr: "b".into(),
            used_length: 16 * PAGE as u64,
            page_size: None,
        },
    ];
    ram::encode_block_list(&mut s, &blocks).unwrap();
    stream::encode_footer(&mut s, 2);
    let mut want_a = vec![0u8; n * PAGE];
    let mut want_b = vec![0u8; 16 * PAGE];
    let page =
        |s: &mut Vec<u8>, blk: &str, i: usize, fill: Option<u8>, want: &mut Vec<u8>| match fill {
            Some(f) => {
                let c = page_content(f, i as u64);
                ram::encode_page_header(s, (i * PAGE) as u64, flag::PAGE, Some(blk)).unwrap();
                s.extend_from_slice(&c);
                want[i * PAGE..(i + 1) * PAGE].copy_from_slice(&c);
            }
            None => {
                ram::encode_zero_page(s, (i * PAGE) as u64, Some(blk)).unwrap();
                want[i * PAGE..(i + 1) * PAGE].fill(0);
            }
        };
    stream::encode_section_part(&mut s, SectionKind::Part, 2);
    for i in 0..n {
        let fill = (i % 7 != 3).then_some((i % 251) as u8);
        page(&mut s, "a", i, fill, &mut want_a);
        if i % 500 == 0 {
            page(&mut s, "b", i / 500, Some(0x11), &mut want_b);
        }
    }
    // Again: pages of a run now zero (flushed and pending), data over a hole.
    for i in [10usize, 11, 2999] {
        page(&mut s, "a", i, None, &mut want_a);
    }
    page(&mut s, "a", 3, Some(0x77), &mut want_a);
    page(&mut s, "a", 4, None, &mut want_a);
    page(&mut s, "b", 1, None, &mut want_b);
    ram::encode_eos(&mut s);
    stream::encode_footer(&mut s, 2);
    stream::encode_section_part(&mut s, SectionKind::End, 2);
    // QEMU 7.2's "zero" page filled with 0x5a.
    ram::encode_page_header(&mut s, 15 * PAGE as u64, flag::ZERO, Some("b")).unwrap();
    s.push(0x5a);
    want_b[15 * PAGE..].fill(0x5a);
    ram::encode_eos(&mut s);
    stream::encode_footer(&mut s, 2);
    stream::encode_eof(&mut s);
    let file = d.0.join("s.bin");
    std::fs::write(&file, &s).unwrap();
    let out = d.0.join("out");
    let r = analyze(&file, Some(&out)).unwrap();
    assert!(r.complete);
    assert!(
        std::fs::read(out.join("a")).unwrap() == want_a,
        "block a differs"
    );
    assert!(
        std::fs::read(out.join("b")).unwrap() == want_b,
        "block b differs"
    );
}
