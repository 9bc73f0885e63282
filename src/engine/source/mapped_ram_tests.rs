//! mapped-ram saves into real files from real memfds: the layout at an offset, each page at
//! its place, the bitmaps, and a main stream without page records.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::*;
use crate::compat::ZeroPageDetection;
use crate::engine::migration::MigrationCtx;
use crate::engine::state::MigrationStatus;
use crate::memory::block::tests::{memfd, spec};
use crate::wire::ram::{self as wram, Record};
use crate::wire::stream::{self, Token};

/// Page `i` of a test block: data, written zeros, or a hole (never written).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Data,
    Zero,
    Hole,
}

fn kind(i: u64) -> Kind {
    match i % 7 {
        0 | 1 | 3 | 4 => Kind::Data,
        2 => Kind::Zero,
        _ => Kind::Hole,
    }
}

fn data(id: &str, i: u64, gen: u8) -> Vec<u8> {
    let mut d = vec![gen; PAGE as usize];
    d[..8].copy_from_slice(&i.to_le_bytes());
    d[8..8 + id.len()].copy_from_slice(id.as_bytes());
    d
}

fn block(id: &str, pages: u64) -> Arc<RamBlock> {
    let b = RamBlock::new(spec(id, pages * PAGE), memfd(pages * PAGE)).expect("block");
    for i in 0..pages {
        let p = b.guest_page(i * PAGE).expect("page");
        match kind(i) {
            Kind::Data => p.copy_from(&data(id, i, 0xa5)),
            Kind::Zero => p.copy_from(&[0u8; PAGE as usize]),
            Kind::Hole => {}
        }
    }
    Arc::new(b)
}

/// A file (unlinked) and `n` more write handles on it, as the control layer opens them.
fn files(n: usize) -> (File, Vec<File>) {
    let p = std::env::temp_dir().join(format!(
        "qmh-mr-src-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let main = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("create");
    let more = (0..n)
        .map(|_| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .expect("open")
        })
        .collect();
    let _ = std::fs::remove_file(&p);
    (main, more)
}

fn file_io(f: &File) -> FileIo {
    let chan = Channel::from_file(f.try_clone().expect("dup"), "test-file".into());
    FileIo::of(&chan).expect("io")
}

fn read_at(f: &File, at: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, at).expect("read");
    v
}

fn bitmap_of(f: &File, h: &Header, used: u64) -> Vec<u64> {
    let len = mapped_ram::bitmap_len(used);
    mapped_ram::decode_bitmap(&read_at(f, h.bitmap_offset, len), used / PAGE).expect("bitmap")
}

#[test]
fn a_word_of_mixed_pages_goes_to_its_places_and_its_bits() {
    let b = block("pc.ram", 128);
    let (f, _) = files(0);
    let mut out = MappedRamOut::new(file_io(&f), true);
    let (h, end) = out.add_block(100, b.size).expect("layout");
    assert_eq!(h.bitmap_offset, 128);
    assert_eq!(h.pages_offset, 1 << 20);
    assert_eq!(end, (1 << 20) + 128 * PAGE);
    // Page 5 is a hole (Kind::Hole) and page 6 too; 9 is known as a hole to the caller.
    let holes = 1 << 9;
    let s = out.write_word(&b, 0, 0, u64::MAX, holes).expect("word 0");
    let want_data: Vec<u64> = (0..64)
        .filter(|&i| kind(i) == Kind::Data && i != 9)
        .collect();
    assert_eq!(s.normal, want_data.len() as u64);
    assert_eq!(s.zero, 64 - want_data.len() as u64);
    assert_eq!(s.bytes, s.normal * PAGE);
    assert_eq!(out.written(), s.bytes);
    let words = out.map.blocks[0].words();
    let want_bits = want_data.iter().fold(0u64, |a, &i| a | 1 << i);
    assert_eq!(words[0], want_bits);
    assert_eq!(words[1], 0, "word 1 not sent yet");
    for i in 0..64 {
        let got = read_at(&f, h.pages_offset + i * PAGE, PAGE);
        if want_data.contains(&i) {
            assert_eq!(got, data("pc.ram", i, 0xa5), "page {i}");
        } else {
            assert!(got.iter().all(|&x| x == 0), "page {i} not written");
        }
    }
    // The file ends with the word's last data page: nothing written past it.
    let last = want_data.iter().max().copied().unwrap_or(0);
    assert_eq!(
        f.metadata().expect("stat").len(),
        h.pages_offset + (last + 1) * PAGE
    );
}

#[test]
fn a_page_zero_in_a_later_pass_clears_its_bit_and_a_new_one_sets_it() {
    let b = block("pc.ram", 64);
    let (f, _) = files(0);
    let mut out = MappedRamOut::new(file_io(&f), true);
    let (h, _) = out.add_block(0, b.size).expect("layout");
    out.write_word(&b, 0, 0, u64::MAX, 0).expect("pass 1");
    assert_ne!(out.map.blocks[0].words()[0] & 1, 0);
    // Pass 2: page 0 became zero, page 2 (zero) got data.
    b.guest_page(0).expect("p").copy_from(&[0u8; PAGE as usize]);
    b.guest_page(2 * PAGE)
        .expect("p")
        .copy_from(&data("pc.ram", 2, 7));
    let s = out.write_word(&b, 0, 0, 0b101, 0).expect("pass 2");
    assert_eq!((s.normal, s.zero), (1, 1));
    let w = out.map.blocks[0].words()[0];
    assert_eq!(w & 1, 0, "page 0 is zero now");
    assert_ne!(w & 4, 0, "page 2 has data now");
    assert_ne!(w & 2, 0, "page 1 untouched");
    assert_eq!(
        read_at(&f, h.pages_offset + 2 * PAGE, PAGE),
        data("pc.ram", 2, 7)
    );
    // zero-page-detection=none: a zero page is written, and its bit set.
    let mut none = MappedRamOut::new(file_io(&f), false);
    none.add_block(0, b.size).expect("layout");
    let s = none.write_word(&b, 0, 0, 0b1, 0).expect("none");
    assert_eq!((s.normal, s.zero), (1, 0));
    assert_eq!(none.map.blocks[0].words()[0], 1);
    // The bitmaps land at their offsets, little-endian words.
    out.write_bitmaps().expect("bitmaps");
    assert_eq!(bitmap_of(&f, &h, b.size), out.map.blocks[0].words());
}

#[test]
fn a_failed_pwrite_names_the_file_and_offset() {
    let b = block("pc.ram", 64);
    let (f, _) = files(0);
    // A read-only fd: every pwrite fails with EBADF.
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", f.as_raw_fd())).expect("ro");
    let mut out = MappedRamOut::new(file_io(&ro), true);
    let (h, _) = out.add_block(0, b.size).expect("layout");
    let e = out.write_word(&b, 0, 0, 1, 0).expect_err("fails");
    match &e {
        MappedRamError::Write {
            file,
            offset,
            source,
            ..
        } => {
            assert_eq!(file, "test-file");
            assert_eq!(*offset, h.pages_offset);
            assert_eq!(source.raw_os_error(), Some(libc::EBADF));
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("0x100000"), "{e}");
    // The guest is untouched.
    assert_eq!(crate::memory::block::tests::byte(&b, 0, 100), 0xa5);
}

fn ctx(multifd: bool, zpd: Option<ZeroPageDetection>) -> Arc<MigrationCtx> {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let ctx = MigrationCtx::new(log, Default::default()).expect("ctx");
    {
        let mut p = ctx.params.lock().unwrap();
        p.zero_page_detection = zpd;
        p.max_bandwidth = 0;
    }
    {
        let mut c = ctx.caps.lock().unwrap();
        c.mapped_ram = true;
        c.multifd = multifd;
    }
    ctx.state.transition(MigrationStatus::Setup).expect("setup");
    ctx
}

/// What the main stream in the file holds: per block its header; no page records and no
/// MULTIFD_FLUSH anywhere; RAM sections that end with EOS.
struct Parsed {
    headers: Vec<(String, u64, Header)>,
    ram_sections: usize,
}

fn parse(f: &File, start: u64) -> Parsed {
    let len = f.metadata().expect("stat").len();
    let buf = read_at(f, 0, len);
    let mut at = start as usize;
    at += stream::decode_header(&buf[at..]).unwrap().unwrap().1;
    at += stream::decode_configuration(&buf[at..]).unwrap().unwrap().1;
    let mut headers = Vec::new();
    let mut ram_sections = 0;
    loop {
        let (t, n) = stream::decode_token(&buf[at..]).unwrap().unwrap();
        at += n;
        let id = match t {
            Token::Eof => break,
            Token::Start(h) if h.idstr == "ram" => h.section_id,
            Token::Part(id) | Token::End(id) => id,
            // No return path in a file: only SWITCHOVER_START (as QEMU 10.0 writes).
            Token::Command(c) => {
                assert_eq!(c.cmd, crate::compat::wire::command::SWITCHOVER_START);
                continue;
            }
            other => panic!("unexpected {other:?}"),
        };
        ram_sections += 1;
        loop {
            let (r, n) = wram::decode_record(&buf[at..]).unwrap().unwrap();
            at += n;
            match r {
                Record::MemSize { total } => {
                    let mut sum = 0;
                    while sum < total {
                        let (e, n) = wram::decode_block_entry(&buf[at..], &|_| false)
                            .unwrap()
                            .unwrap();
                        at += n;
                        let (h, n) = mapped_ram::decode_header(&buf[at..]).unwrap().unwrap();
                        assert_eq!(h, mapped_ram::layout(at as u64, e.used_length).unwrap());
                        assert_eq!(n, crate::compat::wire::mapped_ram::HEADER_LEN);
                        at = h.end(e.used_length).unwrap() as usize;
                        sum += e.used_length;
                        headers.push((e.idstr, e.used_length, h));
                    }
                }
                Record::Eos => break,
                other => panic!("no page records or flushes under mapped-ram: {other:?}"),
            }
        }
        at += stream::decode_footer(&buf[at..], id).unwrap().unwrap().1;
    }
    Parsed {
        headers,
        ram_sections,
    }
}

/// Saves `blocks` to a file whose stream starts at `start` (with `n` multifd channels);
/// checks the layout, every page and every bit.
fn save_and_check(n: usize, zpd: Option<ZeroPageDetection>, start: u64) {
    let ctx = ctx(n > 0, zpd);
    let blocks = vec![block("pc.ram", 1000), block("vga.vram", 130)];
    let (mut f, more) = files(n);
    f.write_all(&vec![0x55u8; start as usize]).expect("prefix");
    f.seek(SeekFrom::Start(start)).expect("seek");
    let chan = Channel::from_file(f.try_clone().expect("dup"), "file:test".into());
    let chans = more
        .into_iter()
        .enumerate()
        .map(|(i, m)| Channel::from_file(m, format!("file:test#{i}")))
        .collect();
    let uri = "file:/nonexistent".parse().expect("uri");
    crate::engine::source::run(&ctx, blocks.clone(), chan, chans, uri).expect("saved");
    assert_eq!(
        read_at(&f, 0, start),
        vec![0x55u8; start as usize],
        "before the offset"
    );
    let p = parse(&f, start);
    assert!(p.ram_sections >= 3, "START, a pass, END");
    assert_eq!(p.headers.len(), 2);
    let detect = zpd != Some(ZeroPageDetection::None);
    let mut data_pages = 0;
    for ((id, used, h), b) in p.headers.iter().zip(&blocks) {
        assert_eq!((id, *used), (&b.id, b.size));
        assert_eq!(h.pages_offset % (1 << 20), 0);
        let bits = bitmap_of(&f, h, b.size);
        for i in 0..b.size / PAGE {
            let set = bits[(i / 64) as usize] & 1 << (i % 64) != 0;
            let page = read_at(&f, h.pages_offset + i * PAGE, PAGE);
            match kind(i) {
                Kind::Data => {
                    assert!(set, "{id} page {i}");
                    assert_eq!(page, data(id, i, 0xa5), "{id} page {i}");
                    data_pages += 1;
                }
                Kind::Zero | Kind::Hole => {
                    assert_eq!(set, !detect, "{id} page {i}");
                    assert!(page.iter().all(|&x| x == 0));
                }
            }
        }
    }
    let st = &ctx.stats;
    let normal = st.normal.load(std::sync::atomic::Ordering::Relaxed);
    let zero = st.duplicate.load(std::sync::atomic::Ordering::Relaxed);
    if detect {
        assert_eq!(normal, data_pages);
        assert_eq!(zero, 1130 - data_pages);
    } else {
        assert_eq!((normal, zero), (1130, 0));
    }
    let transferred = st.transferred.load(std::sync::atomic::Ordering::Relaxed);
    assert!(transferred >= normal * PAGE, "{transferred}");
    assert_eq!(ctx.state.status(), MigrationStatus::Completed);
}

#[test]
fn save_at_an_offset_one_channel() {
    save_and_check(0, None, 12345);
}

#[test]
fn save_with_two_multifd_channels() {
    save_and_check(2, None, 0);
}

#[test]
fn save_with_multifd_legacy_zero_detection_at_an_offset() {
    save_and_check(2, Some(ZeroPageDetection::Legacy), 4096);
}

#[test]
fn save_without_zero_detection() {
    save_and_check(0, Some(ZeroPageDetection::None), 0);
    save_and_check(2, Some(ZeroPageDetection::None), 0);
}

#[test]
fn a_socket_is_refused() {
    let ctx = ctx(false, None);
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let chan = Channel::from_unix(a, "sock".into());
    let uri = "unix:/nonexistent".parse().expect("uri");
    let e = crate::engine::source::run(&ctx, vec![block("pc.ram", 8)], chan, Vec::new(), uri)
        .expect_err("refused");
    assert!(
        matches!(
            e,
            crate::engine::source::SourceError::MappedRam(MappedRamError::NotAFile(_))
        ),
        "{e}"
    );
}

/// A multifd file channel's packet: pages in any order (as the zero-page partition leaves
/// them), a hole sent as data (`zero-page-detection=none`), zero ones only clearing bits.
#[test]
fn a_channel_packet_writes_its_runs_and_bits() {
    let b = block("pc.ram", 64);
    let (f, more) = files(1);
    let mut out = MappedRamOut::new(file_io(&f), true);
    let (h, _) = out.add_block(0, b.size).expect("layout");
    // Page 9 had data in an earlier pass.
    out.map.blocks[0].mark(9 * PAGE, true);
    let chan = Channel::from_file(more.into_iter().next().expect("fd"), "test-mfd".into());
    let cf = ChannelFile {
        io: FileIo::of(&chan).expect("io"),
        map: out.map.clone(),
    };
    const HOLE: u64 = 1;
    // 4, 3, 1, 0 are data; 5 a hole written as zeros (its old content must go); 9 zero.
    std::fs::File::options()
        .write(true)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .expect("rw")
        .write_all_at(&[0xee; PAGE as usize], h.pages_offset + 5 * PAGE)
        .expect("old page 5");
    let mut normal = vec![4 * PAGE, 3 * PAGE, (5 * PAGE) | HOLE, PAGE, 0];
    let n = cf
        .write_packet(&b, 0, &mut normal, &[9 * PAGE], HOLE)
        .expect("packet");
    assert_eq!(n, 5 * PAGE);
    let w = out.map.blocks[0].words()[0];
    assert_eq!(w, 0b11_1011, "pages 0, 1, 3, 4, 5 set; 2 and 9 clear");
    for i in [0, 1, 3, 4] {
        assert_eq!(
            read_at(&f, h.pages_offset + i * PAGE, PAGE),
            data("pc.ram", i, 0xa5)
        );
    }
    assert!(read_at(&f, h.pages_offset + 5 * PAGE, PAGE)
        .iter()
        .all(|&x| x == 0));
    // A page outside the block is refused (the channel checks every page before, too).
    let mut bad = vec![64 * PAGE];
    assert!(matches!(
        cf.write_packet(&b, 0, &mut bad, &[], HOLE),
        Err(MappedRamError::Outside(_))
    ));
}
