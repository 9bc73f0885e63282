//! The file's start as an on-demand restore reads it, over real files (memfds) built with
//! the codecs: the layout, what it refuses, the stream after the pages, and the
//! comparison a recovery makes.

use std::fs::File;
use std::time::{Duration, Instant};

use crate::compat::wire::ram as flag;
use crate::engine::destination::loader::{Link, Loader};
use crate::engine::destination::ondemand::scan;
use crate::engine::destination::tests::{block, ctx};
use crate::transport::Channel;
use crate::wire::mapped_ram as mr;
use crate::wire::ram::{self, BlockEntry};
use crate::wire::stream::{self, SectionHeader, SectionKind};

const PAGE: u64 = 4096;

/// A mapped-ram file for one block `ram` of `pages` pages whose bitmap is `bits`, page i
/// filled with byte i+1 where its bit is set; with `caps` in the configuration.
fn file(pages: u64, bits: u64, caps: &[&str]) -> (Vec<u8>, mr::Header) {
    let mut s = Vec::new();
    stream::encode_header(&mut s);
    stream::encode_configuration_with(&mut s, "none", caps).unwrap();
    let h = SectionHeader {
        section_id: 2,
        idstr: flag::IDSTR.into(),
        instance_id: 0,
        version_id: flag::VERSION,
    };
    stream::encode_section_start(&mut s, SectionKind::Start, &h).unwrap();
    let e = BlockEntry {
        idstr: "ram".into(),
        used_length: pages * PAGE,
        page_size: None,
    };
    ram::encode_block_entries(&mut s, &[e]).unwrap();
    let hdr = mr::layout(s.len() as u64, pages * PAGE).unwrap();
    mr::encode_header(&mut s, &hdr);
    mr::encode_bitmap(&mut s, &[bits]);
    s.resize(hdr.pages_offset as usize, 0);
    for i in 0..pages {
        let fill = if bits & (1 << i) != 0 { i as u8 + 1 } else { 0 };
        s.extend(std::iter::repeat_n(fill, PAGE as usize));
    }
    ram::encode_eos(&mut s);
    stream::encode_footer(&mut s, 2);
    stream::encode_section_part(&mut s, SectionKind::End, 2);
    ram::encode_eos(&mut s);
    stream::encode_footer(&mut s, 2);
    stream::encode_eof(&mut s);
    (s, hdr)
}

fn memfile(bytes: &[u8]) -> File {
    let fd = nix::sys::memfd::memfd_create(c"qmh-od", nix::sys::memfd::MemFdCreateFlag::empty())
        .unwrap();
    let f = File::from(fd);
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, 0).unwrap();
    f
}

#[test]
fn layout_of_a_mapped_ram_file_and_the_stream_after_its_pages() {
    let (bytes, hdr) = file(8, 0b1010_0110, &["mapped-ram"]);
    let f = memfile(&bytes);
    let blocks = [block("ram", 8)];
    let l = scan::layout(&f, "t", 0, &blocks).unwrap();
    assert_eq!(l.blocks.len(), 1);
    assert_eq!(l.blocks[0].header, hdr);
    assert_eq!(l.blocks[0].bitmap, vec![0b1010_0110]);
    assert_eq!(l.stream_at, hdr.pages_offset + 8 * PAGE);
    assert_eq!(l.ram_section, 2);
    // The rest (EOS, footer, END, EOF) loads without placing anything.
    let ctx = ctx();
    let chan = Channel::from_file(f.try_clone().unwrap(), "t".into());
    let mut loader = Loader::new(&ctx, &blocks, None, Link::default(), None);
    let devices = scan::rest(&mut loader, &chan, l.stream_at, l.ram_section).unwrap();
    assert!(devices.is_empty());
    assert!(l.same_as(&l).is_ok());
    // Another bitmap: not the same file.
    let (other, _) = file(8, 0b1010_0111, &["mapped-ram"]);
    let o = scan::layout(&memfile(&other), "o", 0, &blocks).unwrap();
    assert!(l.same_as(&o).unwrap_err().contains("bitmap differs"));
}

#[test]
fn layout_refusals() {
    let blocks = [block("ram", 8)];
    let err = |bytes: &[u8], blocks: &[std::sync::Arc<crate::memory::block::RamBlock>]| {
        scan::layout(&memfile(bytes), "t", 0, blocks)
            .unwrap_err()
            .to_string()
    };
    let (plain, _) = file(8, 1, &[]);
    assert!(err(&plain, &blocks).contains("needs a mapped-ram file"));
    // Cut inside the pages: the header's pages region lies outside the file.
    let (good, hdr) = file(8, 1, &["mapped-ram"]);
    let cut = &good[..hdr.pages_offset as usize + 4096];
    assert!(
        err(cut, &blocks).contains("outside the file"),
        "{}",
        err(cut, &blocks)
    );
    // A destination block the file does not have would fault forever.
    let two = [block("ram", 8), block("other", 4)];
    assert!(err(&good, &two).contains("not in the file"));
    // A block of another size.
    let e = err(&good, &[block("ram", 16)]);
    assert!(e.contains("0x8000 bytes at the source"), "{e}");
    // A header whose bitmap points before the header itself.
    let mut bad = good.clone();
    let at = hdr.bitmap_offset as usize - 28 + 12;
    bad[at..at + 8].copy_from_slice(&4u64.to_be_bytes());
    assert!(err(&bad, &blocks).contains("before the end of its header"));
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
