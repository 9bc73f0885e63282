//! The file as an on-demand restore loads it (the loader in `MappedMode::Lazy`), over real
//! files (memfds) built by the shared mapped-ram file builder: the layout, what it refuses,
//! that no page is written, and the comparison a recovery makes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compat::wire::mapped_ram::HEADER_LEN;
use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::engine::destination::mapped_ram::tests::channel_at;
use crate::engine::destination::mapped_ram::{load_lazy, Lazy};
use crate::engine::destination::tests::{block, ctx};
use crate::engine::destination::LoadError;
use crate::fuzzing::mapped_ram_file;
use crate::memory::block::tests::{byte, memfd};
use crate::memory::block::RamBlock;
use crate::wire::stream;

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// The pages of a block whose bitmap word is `bits`: data where a bit is set.
fn pages(n: u64, bits: u64) -> Vec<Option<u8>> {
    (0..n)
        .map(|i| (bits & (1 << i) != 0).then_some(i as u8 + 1))
        .collect()
}

/// Loads `bytes` lazily, the stream starting at `offset` (the channel's position).
fn lazy(bytes: &[u8], offset: u64, blocks: &[Arc<RamBlock>]) -> Result<Lazy, LoadError> {
    let f = File::from(memfd(0));
    f.write_all_at(bytes, 0).unwrap();
    load_lazy(&ctx(), blocks, &channel_at(f, offset))
}

fn err(bytes: &[u8], blocks: &[Arc<RamBlock>]) -> String {
    lazy(bytes, 0, blocks).unwrap_err().to_string()
}

#[test]
fn a_lazy_load_keeps_each_blocks_place_and_writes_no_page() {
    let bits = 0b1010_0110;
    for offset in [0usize, 0x3000] {
        let bytes = mapped_ram_file(offset, PAGE, &[("ram", pages(8, bits))]);
        let blocks = [block("ram", 8)];
        // A preallocated guest: the load must leave it as it is (the restore punches it).
        for p in 0..8 {
            assert!(blocks[0].fill_page(p * PAGE, 0x5a));
        }
        let l = lazy(&bytes, offset as u64, &blocks).unwrap();
        assert_eq!(l.blocks.len(), 1);
        let m = &l.blocks[0];
        assert_eq!(m.index, 0);
        assert_eq!(m.bitmap, vec![bits]);
        // The header is where the block entry ends, the bitmap right after it.
        let at = m.header.bitmap_offset as usize - HEADER_LEN;
        let (h, _) = crate::wire::mapped_ram::decode_header(&bytes[at..])
            .unwrap()
            .unwrap();
        assert_eq!(m.header, h);
        assert!(l.devices.is_empty());
        assert!((0..8).all(|p| byte(&blocks[0], p * PAGE, 100) == 0x5a));
        // The file to serve pages from is the channel's.
        let mut got = [0u8; 8];
        l.file
            .read_exact_at(&mut got, m.header.page_at(PAGE))
            .unwrap();
        assert_eq!(got, 2u64.to_le_bytes());
        assert!(super::same_layout(&l.blocks, &l.blocks).is_ok());
        // Another bitmap: not the same file.
        let other = mapped_ram_file(offset, PAGE, &[("ram", pages(8, bits | 1))]);
        let o = lazy(&other, offset as u64, &blocks).unwrap();
        let e = super::same_layout(&l.blocks, &o.blocks).unwrap_err();
        assert!(e.contains("bitmap differs"), "{e}");
    }
}

#[test]
fn lazy_load_refusals() {
    let blocks = [block("ram", 8)];
    // A stream without mapped-ram, with and without a configuration section.
    let mut plain = Vec::new();
    stream::encode_header(&mut plain);
    let mut with_conf = plain.clone();
    stream::encode_configuration(&mut with_conf, "pc").unwrap();
    for s in [&mut plain, &mut with_conf] {
        stream::encode_eof(s);
        let e = err(s, &blocks);
        assert!(
            e.ends_with("Capability mapped-ram is on, but received capability is off"),
            "{e}"
        );
    }
    let good = mapped_ram_file(0, PAGE, &[("ram", pages(8, 1))]);
    let hdr = lazy(&good, 0, &blocks).unwrap().blocks[0].header;
    // Cut inside the pages: the header's pages region lies outside the file.
    let cut = &good[..hdr.pages_offset as usize + 4096];
    let e = err(cut, &blocks);
    assert!(e.contains("outside the file"), "{e}");
    // A destination block the file does not have would fault forever.
    let e = err(&good, &[block("ram", 8), block("other", 4)]);
    assert!(e.contains("\"other\" is not in the file"), "{e}");
    // A block of another size.
    let e = err(&good, &[block("ram", 16)]);
    assert!(e.contains("0x8000 bytes at the source"), "{e}");
    // A header whose bitmap points before the header itself.
    let mut bad = good.clone();
    let at = hdr.bitmap_offset as usize - HEADER_LEN + 12;
    bad[at..at + 8].copy_from_slice(&4u64.to_be_bytes());
    let e = err(&bad, &blocks);
    assert!(e.contains("before the end of its header"), "{e}");
    // A block whose pages would have two places.
    let twice = mapped_ram_file(0, PAGE, &[("ram", pages(8, 1)), ("ram", pages(8, 2))]);
    let e = err(&twice, &blocks);
    assert!(e.contains("\"ram\" is listed twice"), "{e}");
}

#[test]
fn the_source_file_is_mapped_where_it_can_be() {
    use super::source::Source;
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let f = File::from(memfd(0));
    f.write_all_at(&vec![7u8; 3 * PAGE as usize], 0).unwrap();
    let src = Source::new(f.try_clone().unwrap(), "t".into(), &log);
    assert!(src.mapped(0, 3 * PAGE).is_some());
    assert!(src.mapped(PAGE, PAGE).is_some());
    // Past the file as it was mapped, or not page-aligned: not from the mapping.
    assert!(src.mapped(2 * PAGE, 2 * PAGE).is_none());
    assert!(src.mapped(u64::MAX - PAGE + 1, PAGE).is_none());
    assert!(src.mapped(100, PAGE).is_none());
    src.release(0, 3 * PAGE);
    // A file that cannot be mapped (opened write-only) is read with pread instead.
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
    let wo = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let src = Source::new(wo, "t".into(), &log);
    assert!(src.mapped(0, PAGE).is_none());
}

#[test]
fn throttle_waits_for_the_bytes_at_the_limit() {
    let t0 = Instant::now();
    let mut t = super::fill::Throttle::new(t0);
    t.bytes = 1 << 20;
    // Unlimited: never due later.
    assert_eq!(t.due(0, t0), None);
    assert_eq!(t.due(2 << 20, t0), None);
    // 1 MiB at 2 MiB/s: due half a second after the window started.
    t.bytes = 1 << 20;
    let due = t.due(2 << 20, t0).unwrap();
    assert_eq!(due.duration_since(t0), Duration::from_millis(500));
    // A new limit starts a new window, without the old debt.
    assert_eq!(t.due(4 << 20, t0), None);
}
