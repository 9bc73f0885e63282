//! The destination's loader over in-memory streams: the precopy sink's page placement,
//! the checks of the one placement path, and how a stream that ends early fails.

use std::sync::Arc;

use crate::compat::wire::{ram as flag, TARGET_PAGE_SIZE};
use crate::engine::destination::place::{BlockCursor, PageData, PlaceError};
use crate::engine::destination::{load, LoadError};
use crate::engine::migration::MigrationCtx;
use crate::memory::block::tests::{byte, memfd, spec};
use crate::memory::block::RamBlock;
use crate::wire::ram::{self, BlockEntry, Record};
use crate::wire::stream::{self, SectionHeader, SectionKind};

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

pub(super) fn ctx() -> Arc<MigrationCtx> {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    MigrationCtx::new(log, Default::default()).expect("ctx")
}

pub(super) fn block(id: &str, pages: u64) -> Arc<RamBlock> {
    Arc::new(RamBlock::new(spec(id, pages * PAGE), memfd(pages * PAGE)).expect("block"))
}

/// The RAM section's START header (section 2), as QEMU numbers it.
pub(super) fn encode_ram_start(s: &mut Vec<u8>) {
    let h = SectionHeader {
        section_id: 2,
        idstr: flag::IDSTR.into(),
        instance_id: 0,
        version_id: flag::VERSION,
    };
    stream::encode_section_start(s, SectionKind::Start, &h).unwrap();
}

/// The stream's header and a RAM START section with the block list of `blocks` (id, pages),
/// without its EOS: the START body may go on.
pub(super) fn ram_start(blocks: &[(&str, u64)]) -> Vec<u8> {
    let mut s = Vec::new();
    stream::encode_header(&mut s);
    encode_ram_start(&mut s);
    let entries: Vec<BlockEntry> = blocks
        .iter()
        .map(|&(id, pages)| BlockEntry {
            idstr: id.into(),
            used_length: pages * PAGE,
            page_size: None,
        })
        .collect();
    ram::encode_block_entries(&mut s, &entries).unwrap();
    s
}

/// A precopy stream: header, RAM START with the block list of `blocks`, then `body` (RAM
/// records), EOS, footer, EOF.
fn stream(blocks: &[(&str, u64)], body: &[u8]) -> Vec<u8> {
    let mut s = ram_start(blocks);
    ram::encode_eos(&mut s);
    stream::encode_footer(&mut s, 2);
    stream::encode_section_part(&mut s, SectionKind::Part, 2);
    s.extend_from_slice(body);
    ram::encode_eos(&mut s);
    stream::encode_footer(&mut s, 2);
    stream::encode_eof(&mut s);
    s
}

fn page(out: &mut Vec<u8>, offset: u64, block: Option<&str>, fill: u8) {
    ram::encode_page_header(out, offset, flag::PAGE, block).unwrap();
    out.extend_from_slice(&[fill; TARGET_PAGE_SIZE]);
}

fn run(blocks: &[Arc<RamBlock>], s: &[u8]) -> Result<(), LoadError> {
    let ctx = ctx();
    load(&ctx, blocks, s, "test".into(), None, Vec::new(), None, None).map(|_| ())
}

#[test]
fn precopy_pages_land_in_order() {
    let b = block("pc.ram", 8);
    let mut body = Vec::new();
    page(&mut body, 0, Some("pc.ram"), 1);
    page(&mut body, PAGE, None, 2);
    page(&mut body, 3 * PAGE, None, 3);
    // Sent again in the same buffer: the later page wins.
    page(&mut body, PAGE, None, 4);
    // A ZERO record with a fill after a queued page of the same offset: written after it.
    page(&mut body, 5 * PAGE, None, 5);
    ram::encode_page_header(&mut body, 5 * PAGE, flag::ZERO, None).unwrap();
    body.push(9);
    ram::encode_zero_page(&mut body, 6 * PAGE, None).unwrap();
    run(std::slice::from_ref(&b), &stream(&[("pc.ram", 8)], &body)).expect("load");
    let got: Vec<u8> = (0..8).map(|p| byte(&b, p * PAGE, 100)).collect();
    assert_eq!(got, [1, 4, 0, 3, 0, 9, 0, 0]);
}

#[test]
fn bad_pages_fail_with_their_offset() {
    let b = block("pc.ram", 4);
    let blocks = [b];
    let cases = [
        (0, Some("nope"), "page for unknown RAM block \"nope\""),
        (0, None, "CONTINUE page with no previous block"),
        (
            4 * PAGE,
            Some("pc.ram"),
            "page offset 0x4000 is outside RAM block \"pc.ram\" of size 0x4000",
        ),
    ];
    for (offset, name, want) in cases {
        let mut b = Vec::new();
        page(&mut b, offset, name, 1);
        let e = run(&blocks, &stream(&[("pc.ram", 4)], &b)).unwrap_err();
        assert!(matches!(e, LoadError::Page { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("at stream offset ") && msg.ends_with(want),
            "{msg}"
        );
        assert!(!e.is_link());
    }
}

#[test]
fn a_stream_that_ends_early_is_a_broken_link() {
    let b = block("pc.ram", 4);
    let mut body = Vec::new();
    page(&mut body, 0, Some("pc.ram"), 1);
    let s = stream(&[("pc.ram", 4)], &body);
    for cut in [5, 40, s.len() - 100, s.len() - 1] {
        let e = run(std::slice::from_ref(&b), &s[..cut]).unwrap_err();
        assert!(e.is_link(), "cut at {cut}: {e}");
    }
}

#[test]
fn the_block_cursor_follows_the_last_named_block() {
    let blocks = [block("a", 2), block("b", 2)];
    let data = [7u8; TARGET_PAGE_SIZE];
    let mut c = BlockCursor::default();
    let rec = |offset, block| Record::Page {
        offset,
        block,
        data: &data,
    };
    let p = c.page(&blocks, &rec(PAGE, Some("b"))).unwrap().unwrap();
    assert_eq!((p.bi, p.index()), (1, 1));
    assert!(matches!(p.data, PageData::Bytes(d) if d[0] == 7));
    let p = c.page(&blocks, &rec(0, None)).unwrap().unwrap();
    assert_eq!(p.bi, 1);
    assert!(c.page(&blocks, &Record::Eos).unwrap().is_none());
    assert!(matches!(
        c.page(&blocks, &rec(2 * PAGE, Some("a"))),
        Err(PlaceError::Outside { .. })
    ));
    // The block was named: it stays the context even though the page was refused.
    assert_eq!(c.last, Some(0));
    let short = Record::Page {
        offset: 0,
        block: None,
        data: &data[..100],
    };
    assert!(matches!(
        c.page(&blocks, &short),
        Err(PlaceError::PageLength(100))
    ));
}
