//! The full mapped-ram load over crafted files (real files: memfds, read through file
//! channels), laid out as QEMU lays them out with `wire::mapped_ram`'s encoders.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::compat::wire::{ram as flag, TARGET_PAGE_SIZE};
use crate::engine::destination::tests::{block, ctx, encode_ram_start};
use crate::engine::destination::{load, LoadError};
use crate::engine::migration::MigrationCtx;
use crate::memory::block::tests::{byte, memfd, spec};
use crate::memory::block::RamBlock;
use crate::transport::Channel;
use crate::wire::mapped_ram::{self as codec, Header};
use crate::wire::stream::{self, put_be64, put_str8, SectionKind};

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// What a page of the saved guest holds: `Some(fill)` is data (the page is `fill`, its
/// first 8 bytes its index), `None` a zero page (a hole in the file).
type Content = fn(u64) -> Option<u8>;

fn data(p: u64) -> Option<u8> {
    (p % 3 != 1).then_some((p % 251) as u8 + 1)
}

fn sparse(p: u64) -> Option<u8> {
    (p == 5).then_some(0x42)
}

fn page_bytes(p: u64, fill: u8) -> Vec<u8> {
    let mut v = vec![fill; TARGET_PAGE_SIZE];
    v[..8].copy_from_slice(&p.to_le_bytes());
    v
}

/// A mapped-ram file as QEMU writes it: `base` bytes of something else first
/// (`file:PATH,offset=N`), then the stream: header, configuration (with mapped-ram), RAM
/// START with each block's entry followed by its header (bitmap and pages at their places),
/// EOS, an END section with only EOS, EOF. `tweak` may change each block's header.
fn craft(base: u64, blocks: &[(&str, u64, Content)], tweak: &dyn Fn(usize, &mut Header)) -> File {
    let f = File::from(memfd(0));
    f.write_all_at(&vec![0xee; base as usize], 0).unwrap();
    let mut pos = base;
    let mut s = Vec::new();
    stream::encode_header(&mut s);
    stream::encode_configuration_with(&mut s, "pc", &["mapped-ram"]).unwrap();
    encode_ram_start(&mut s);
    let total: u64 = blocks.iter().map(|b| b.1 * PAGE).sum();
    put_be64(&mut s, total | flag::MEM_SIZE);
    for (i, &(id, pages, content)) in blocks.iter().enumerate() {
        let used = pages * PAGE;
        put_str8(&mut s, id).unwrap();
        put_be64(&mut s, used);
        let at = pos + s.len() as u64;
        let mut hdr = codec::layout(at, used).unwrap();
        let end = hdr.end(used).unwrap();
        let mut words = vec![0u64; pages.div_ceil(64) as usize];
        for p in 0..pages {
            if let Some(fill) = content(p) {
                words[(p / 64) as usize] |= 1 << (p % 64);
                f.write_all_at(&page_bytes(p, fill), hdr.pages_offset + p * PAGE)
                    .unwrap();
            }
        }
        let mut bm = Vec::new();
        codec::encode_bitmap(&mut bm, &words);
        f.write_all_at(&bm, hdr.bitmap_offset).unwrap();
        tweak(i, &mut hdr);
        codec::encode_header(&mut s, &hdr);
        f.write_all_at(&s, pos).unwrap();
        s.clear();
        pos = end;
        f.set_len(end).unwrap();
    }
    crate::wire::ram::encode_eos(&mut s);
    stream::encode_footer(&mut s, 2);
    stream::encode_section_part(&mut s, SectionKind::End, 2);
    crate::wire::ram::encode_eos(&mut s);
    stream::encode_footer(&mut s, 2);
    stream::encode_eof(&mut s);
    f.write_all_at(&s, pos).unwrap();
    f
}

fn mapped_ctx(on: bool) -> Arc<MigrationCtx> {
    let ctx = ctx();
    ctx.caps.lock().unwrap().mapped_ram = on;
    ctx
}

/// A file channel over `f` at position `base`, where its stream starts (as the control
/// side leaves it for `file:PATH,offset=N`).
pub(crate) fn channel_at(f: File, base: u64) -> Channel {
    nix::unistd::lseek(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        base as i64,
        nix::unistd::Whence::SeekSet,
    )
    .unwrap();
    Channel::from_file(f, "file:test".into())
}

/// Loads the file from stream offset `base` (its position, as the control side leaves
/// it), with `channels` multifd file channels.
fn run_on(
    ctx: &MigrationCtx,
    blocks: &[Arc<RamBlock>],
    f: &File,
    base: u64,
    channels: usize,
) -> Result<(), LoadError> {
    let chan = channel_at(f.try_clone().unwrap(), base);
    let multifd = (0..channels)
        .map(|i| Channel::from_file(f.try_clone().unwrap(), format!("file:test#{i}")))
        .collect();
    load(
        ctx,
        blocks,
        &chan,
        chan.peer.clone(),
        Some(&chan),
        multifd,
        None,
        None,
    )
    .map(drop)
}

fn run(blocks: &[Arc<RamBlock>], f: &File, base: u64, channels: usize) -> Result<(), LoadError> {
    run_on(&mapped_ctx(true), blocks, f, base, channels)
}

/// Every page of `b` is what `content` says.
fn assert_pages(b: &RamBlock, content: Content) {
    let mut buf = [0u8; TARGET_PAGE_SIZE];
    for p in 0..b.pages() {
        b.guest_page(p * PAGE).unwrap().copy_to(&mut buf);
        match content(p) {
            Some(fill) => assert_eq!(&buf[..], &page_bytes(p, fill)[..], "page {p}"),
            None => assert!(buf.iter().all(|&x| x == 0), "page {p} is not zero"),
        }
    }
}

#[test]
fn a_file_loads_in_full_with_one_or_more_channels() {
    // 300 pages: a run crosses the 256-page segment boundary; the last word is partial.
    for (base, channels) in [(0, 0), (3 * PAGE + 17, 0), (0, 2), (5 << 20, 3)] {
        let f = craft(
            base,
            &[("pc.ram", 300, data), ("vga", 7, sparse)],
            &|_, _| {},
        );
        let (a, v) = (block("pc.ram", 300), block("vga", 7));
        // Pages the file says are zero but hold data here must read as zero afterwards.
        for p in [1, 4, 299] {
            assert!(a.fill_page(p * PAGE, 0x55));
        }
        let ctx = mapped_ctx(true);
        run_on(&ctx, &[a.clone(), v.clone()], &f, base, channels)
            .unwrap_or_else(|e| panic!("base {base} channels {channels}: {e}"));
        // The zero pages are holes again (a fresh destination stays one). Before anything
        // reads them through the mapping: a read of a tmpfs hole allocates it.
        assert_eq!(
            a.hole_bitmap()[0] & 0b11111,
            0b10010,
            "pages 1 and 4 punched"
        );
        assert_eq!(v.hole_bitmap()[0], 0b111_1111 & !(1 << 5));
        assert_pages(&a, data);
        assert_pages(&v, sparse);
        let want_data = (0..300).filter(|&p| data(p).is_some()).count() as u64 + 1;
        let st = &ctx.stats;
        assert_eq!(st.normal.load(Relaxed), want_data);
        assert_eq!(st.duplicate.load(Relaxed), 307 - want_data);
        assert_eq!(st.remaining.load(Relaxed), 0);
        assert!(st.transferred.load(Relaxed) >= want_data * PAGE);
        // The zero pages are holes again (a fresh destination stays one).
    }
}

#[test]
fn the_capability_must_match_at_both_ends() {
    let f = craft(0, &[("pc.ram", 4, data)], &|_, _| {});
    let b = block("pc.ram", 4);
    let e = run_on(&mapped_ctx(false), std::slice::from_ref(&b), &f, 0, 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "at stream offset 62: Capability mapped-ram is off, but received capability is on"
    );
    // A stream without the capability into a destination with it on.
    let mut s = Vec::new();
    stream::encode_header(&mut s);
    stream::encode_configuration(&mut s, "pc").unwrap();
    stream::encode_eof(&mut s);
    let g = File::from(memfd(0));
    g.write_all_at(&s, 0).unwrap();
    let e = run(&[b], &g, 0, 0).unwrap_err().to_string();
    assert!(
        e.ends_with("Capability mapped-ram is on, but received capability is off"),
        "{e}"
    );
}

#[test]
fn bad_headers_fail_before_any_read() {
    type Tweak<'a> = &'a dyn Fn(usize, &mut Header);
    let cases: [(Tweak, &str); 5] = [
        (&|_, h| h.version = 2, "expected <= 1, got 2"),
        (&|_, h| h.pages_offset += 512, "region has bad alignment"),
        (&|_, h| h.pages_offset += 1 << 30, "lies outside the file"),
        (&|_, h| h.bitmap_offset = h.pages_offset + 8, "overlap"),
        // The first block's bitmap where the second one's pages are (at 2 MiB).
        (
            &|i, h| {
                if i == 0 {
                    h.bitmap_offset = 2 << 20
                }
            },
            "overlaps another block",
        ),
    ];
    for (tweak, want) in cases {
        let f = craft(0, &[("a", 4, data), ("b", 4, data)], tweak);
        let (a, b) = (block("a", 4), block("b", 4));
        let e = run(&[a.clone(), b.clone()], &f, 0, 0).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(want), "{want}: {msg}");
        assert!(!e.is_link());
        // Nothing of the block with the bad header was written.
        let bad = if want == "overlaps another block" {
            &b
        } else {
            &a
        };
        assert!((0..4).all(|p| byte(bad, p * PAGE, 100) == 0), "{want}");
    }
}

#[test]
fn a_truncated_file_or_an_unknown_block_is_refused() {
    let f = craft(0, &[("pc.ram", 40, data)], &|_, _| {});
    let len = f.metadata().unwrap().len();
    f.set_len(len - 100 - 20 * PAGE).unwrap();
    let b = block("pc.ram", 40);
    let e = run(std::slice::from_ref(&b), &f, 0, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block \"pc.ram\"") && e.contains("outside the file"),
        "{e}"
    );
    assert!((0..40).all(|p| byte(&b, p * PAGE, 100) == 0));
    let f = craft(0, &[("nope", 4, data)], &|_, _| {});
    let e = run(&[b], &f, 0, 0).unwrap_err().to_string();
    assert!(e.contains("\"nope\", which is not registered here"), "{e}");
}

#[test]
fn pages_on_the_main_channel_are_refused() {
    for (kind, want) in [
        (flag::PAGE, "Unexpected RAM flags: 8"),
        (flag::ZERO, "Unexpected RAM flags: 2"),
        (flag::MULTIFD_FLUSH, "Unexpected RAM flags: 512"),
        (flag::XBZRLE, "Unexpected RAM flags: 64"),
        (flag::HOOK, "Unexpected RAM flags: 128"),
    ] {
        let f = craft(0, &[("pc.ram", 4, data)], &|_, _| {});
        // Replace the END section's EOS with the record.
        let len = f.metadata().unwrap().len();
        let eos_at = len - 1 - 5 - 8;
        f.write_all_at(&(kind | flag::CONTINUE).to_be_bytes(), eos_at)
            .unwrap();
        let e = run(&[block("pc.ram", 4)], &f, 0, 0).unwrap_err();
        assert!(matches!(e, LoadError::Invalid { .. }), "{e:?}");
        assert!(e.to_string().ends_with(want), "{e}");
    }
}

#[test]
fn memory_outside_the_block_is_never_written() {
    // The block is a window into a larger memfd: [1 MiB, 1 MiB + 64 pages).
    let fd = memfd(3 << 20);
    let raw = File::from(fd.try_clone().unwrap());
    raw.write_all_at(&vec![0x77; 3 << 20], 0).unwrap();
    let mut sp = spec("pc.ram", 64 * PAGE);
    sp.offset = 1 << 20;
    let b = Arc::new(RamBlock::new(sp, fd).unwrap());
    let f = craft(0, &[("pc.ram", 64, data)], &|_, _| {});
    run(std::slice::from_ref(&b), &f, 0, 2).unwrap();
    assert_pages(&b, data);
    let mut all = vec![0u8; 3 << 20];
    raw.read_exact_at(&mut all, 0).unwrap();
    let end = (1 << 20) + 64 * PAGE as usize;
    assert!(all[..1 << 20].iter().all(|&x| x == 0x77));
    assert!(all[end..].iter().all(|&x| x == 0x77));
}

#[test]
fn a_short_read_names_the_block_and_the_offset() {
    use crate::engine::destination::mapped_ram::MappedBlock;
    let f = craft(0, &[("pc.ram", 8, data)], &|_, _| {});
    let b = block("pc.ram", 8);
    let used = 8 * PAGE;
    // A header checked against a longer file than there is now (it shrank).
    let h = codec::layout(100, used).unwrap();
    let regions = codec::check(&h, "pc.ram", used, 128, None, &[]).unwrap();
    f.set_len(h.pages_offset + 2 * PAGE + 10).unwrap();
    let mb = MappedBlock {
        index: 0,
        header: h,
        regions,
        bitmap: vec![0xff],
    };
    let fd: std::os::fd::OwnedFd = f.into();
    let e = super::load::read_for_test(&b, &mb, &fd)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("RAM block \"pc.ram\": the file ends early")
            && e.contains(&format!(
                "file offset {:#x}",
                h.pages_offset + 2 * PAGE + 10
            )),
        "{e}"
    );
}

#[test]
fn other_validated_capabilities_stay_refused() {
    use crate::engine::destination::{check_capabilities, CapCheck};
    let caps = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    for on in [false, true] {
        let r = check_capabilities(on, &caps(&["x-ignore-shared", "mapped-ram"]));
        assert!(matches!(r, Err(CapCheck::Unsupported(c)) if c == "x-ignore-shared"));
    }
    assert!(check_capabilities(true, &caps(&["mapped-ram"])).is_ok());
    assert!(check_capabilities(false, &[]).is_ok());
    assert!(matches!(
        check_capabilities(true, &[]),
        Err(CapCheck::Mismatch(_))
    ));
}
