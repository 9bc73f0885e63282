//! The multifd receivers over socketpairs, with a sender made of the wire codecs: pages
//! land byte for byte, zero pages and holes, the sync barrier, bad packets, and whole
//! loads driven by MULTIFD_FLUSH (QEMU 10.0) and by each EOS (compat 7.2).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::compat::wire::multifd::PAGES_PER_PACKET;
use crate::compat::wire::ram as flag;
use crate::compat::QemuVersion;
use crate::engine::destination::tests::{block, ctx, ram_start};
use crate::memory::block::tests::{byte, memfd, spec};
use crate::wire::multifd::encode_packet_header;
use crate::wire::ram as ram_codec;
use crate::wire::stream::{self, SectionKind};

fn known_zero(blocks: &[Arc<RamBlock>]) -> KnownZero {
    Arc::new(
        blocks
            .iter()
            .map(|b| AtomicBitmap::from_words(b.hole_bitmap()))
            .collect(),
    )
}

fn received(blocks: &[Arc<RamBlock>]) -> Arc<Vec<AtomicBitmap>> {
    Arc::new(
        blocks
            .iter()
            .map(|b| AtomicBitmap::new(b.pages()))
            .collect(),
    )
}

/// `n` channels: the receiving ends and the sending ends.
fn channels(n: usize) -> (Vec<Channel>, Vec<UnixStream>) {
    (0..n)
        .map(|i| {
            let (a, b) = UnixStream::pair().expect("socketpair");
            (Channel::from_unix(a, format!("multifd-{i}")), b)
        })
        .unzip()
}

/// A data packet: `pages` (offset, fill byte) with their data, then `zeros` offsets.
fn packet(block: &str, num: u64, pages: &[(u64, u8)], zeros: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offsets: Vec<u64> = pages.iter().map(|p| p.0).collect();
    offsets.extend_from_slice(zeros);
    let h = PacketHeader {
        flags: 0,
        pages_alloc: PAGES_PER_PACKET,
        normal_pages: pages.len() as u32,
        zero_pages: zeros.len() as u32,
        next_packet_size: (pages.len() * TARGET_PAGE_SIZE) as u32,
        packet_num: num,
        ramblock: block.into(),
        offsets,
    };
    encode_packet_header(&mut out, &h).expect("header");
    for &(_, fill) in pages {
        out.extend_from_slice(&[fill; TARGET_PAGE_SIZE]);
    }
    out
}

/// A SYNC packet as QEMU 10.0 sends it.
fn sync_packet(num: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_packet_header(&mut out, &PacketHeader::sync(num)).expect("header");
    out
}

/// Runs `f` with receivers on `chans` over `blocks`; `main` is what a failure shuts down.
fn with_receivers<T>(
    ctx: &MigrationCtx,
    blocks: &[Arc<RamBlock>],
    chans: Vec<Channel>,
    main: Option<OwnedFd>,
    f: impl FnOnce(&Multifd<'_>) -> T,
) -> (T, Result<(), LoadError>) {
    std::thread::scope(|scope| {
        let m = Multifd::start(
            scope,
            ctx,
            blocks,
            chans,
            known_zero(blocks),
            received(blocks),
            main,
        )
        .expect("start");
        let t = f(&m);
        (t, m.finish())
    })
}

#[test]
fn pages_land_byte_for_byte_and_are_counted() {
    let ctx = ctx();
    let blocks = [block("a", 16), block("b", 8)];
    let (chans, mut tx) = channels(2);
    tx[0]
        .write_all(&packet(
            "a",
            0,
            &[(3 * PAGE, 0x31), (0, 0x30), (15 * PAGE, 0x3f)],
            &[],
        ))
        .unwrap();
    tx[1]
        .write_all(&packet("b", 1, &[(7 * PAGE, 0x47)], &[]))
        .unwrap();
    tx[1]
        .write_all(&packet("a", 2, &[(3 * PAGE, 0x51)], &[]))
        .unwrap();
    for (i, t) in tx.iter_mut().enumerate() {
        t.write_all(&sync_packet(3 + i as u64)).unwrap();
    }
    let (synced, end) = with_receivers(&ctx, &blocks, chans, None, |m| m.sync());
    synced.expect("sync");
    end.expect("end");
    let a: Vec<u8> = (0..16).map(|p| byte(&blocks[0], p * PAGE, 4095)).collect();
    // Page 3 came on both channels: which one wins is the source's business (it never
    // sends a page twice between two syncs); either is one of the two.
    assert!(a[3] == 0x31 || a[3] == 0x51, "{a:?}");
    let mut want = vec![0u8; 16];
    (want[0], want[3], want[15]) = (0x30, a[3], 0x3f);
    assert_eq!(a, want);
    assert_eq!(byte(&blocks[1], 7 * PAGE, 0), 0x47);
    assert_eq!(byte(&blocks[1], 6 * PAGE, 0), 0);
    let st = &ctx.stats;
    assert_eq!(st.normal.load(Ordering::Relaxed), 5);
    assert_eq!(st.duplicate.load(Ordering::Relaxed), 0);
    assert_eq!(
        st.multifd_bytes.load(Ordering::Relaxed),
        5 * PACKET_HEADER_LEN as u64 + 5 * PAGE
    );
}

#[test]
fn zero_pages_zero_written_data_and_leave_holes() {
    let ctx = ctx();
    let b = block("pc.ram", 16);
    // Page 1 holds data before the migration (a preallocated guest, say).
    assert!(b.write_pages_at(PAGE, &[&[9u8; TARGET_PAGE_SIZE]]).unwrap());
    let blocks = [b];
    let (chans, mut tx) = channels(1);
    // Page 6 is written, then sent as zero in a later packet.
    tx[0]
        .write_all(&packet("pc.ram", 0, &[(6 * PAGE, 6)], &[]))
        .unwrap();
    tx[0]
        .write_all(&packet("pc.ram", 1, &[], &[PAGE, 5 * PAGE, 6 * PAGE]))
        .unwrap();
    tx[0].write_all(&sync_packet(2)).unwrap();
    let kz = known_zero(&blocks);
    let rcv = received(&blocks);
    let synced = std::thread::scope(|scope| {
        let m = Multifd::start(scope, &ctx, &blocks, chans, kz.clone(), rcv.clone(), None)
            .expect("start");
        let s = m.sync();
        m.finish().expect("end");
        s
    });
    synced.expect("sync");
    let b = &blocks[0];
    assert_eq!(byte(b, PAGE, 0), 0, "data under a zero page is zeroed");
    assert_eq!(byte(b, 6 * PAGE, 0), 0, "a page written, then zero");
    let holes = b.hole_bitmap()[0];
    assert_ne!(holes & (1 << 5), 0, "a zero page over a hole stays a hole");
    assert_eq!(holes & (1 << 6), 0, "page 6 was written");
    assert!(!kz[0].get(6), "a written page is no longer known zero");
    assert!(kz[0].get(5));
    for p in [1, 5, 6] {
        assert!(rcv[0].get(p), "page {p} received");
    }
    assert!(!rcv[0].get(2));
    assert_eq!(ctx.stats.duplicate.load(Ordering::Relaxed), 3);
    assert_eq!(ctx.stats.normal.load(Ordering::Relaxed), 1);
}

#[test]
fn the_sync_releases_only_when_every_channel_reached_it() {
    let ctx = ctx();
    let blocks = [block("pc.ram", 8)];
    let (chans, mut tx) = channels(2);
    tx[0].write_all(&sync_packet(0)).unwrap();
    // Sent after its SYNC: held back until the release.
    tx[0]
        .write_all(&packet("pc.ram", 2, &[(2 * PAGE, 2)], &[]))
        .unwrap();
    let ((), end) = with_receivers(&ctx, &blocks, chans, None, |m| {
        std::thread::scope(|s| {
            let (done, result) = mpsc::channel();
            s.spawn(move || done.send(m.sync().is_ok()).unwrap());
            // Not a timing assumption that could pass wrongly: a sync that returns here
            // while channel 1 has not reached it is the bug.
            assert!(result.recv_timeout(Duration::from_millis(200)).is_err());
            assert_eq!(
                byte(&blocks[0], 2 * PAGE, 0),
                0,
                "channel 0 is held at its sync"
            );
            tx[1].write_all(&sync_packet(1)).unwrap();
            assert!(result.recv().unwrap(), "released once both reached it");
        });
        // Channel 0's packet after the first sync lands before the second.
        tx[0].write_all(&sync_packet(3)).unwrap();
        tx[1].write_all(&sync_packet(4)).unwrap();
        m.sync().expect("second sync");
        assert_eq!(byte(&blocks[0], 2 * PAGE, 0), 2);
    });
    end.expect("end");
}

#[test]
fn a_channel_closed_at_a_packet_boundary_ends_quietly_but_fails_a_sync() {
    let ctx = ctx();
    let blocks = [block("pc.ram", 8)];
    let (chans, mut tx) = channels(2);
    tx[0]
        .write_all(&packet("pc.ram", 0, &[(PAGE, 1)], &[]))
        .unwrap();
    drop(tx.remove(0));
    let (synced, end) = with_receivers(&ctx, &blocks, chans, None, |m| m.sync());
    let e = synced.unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::Multifd {
                channel: 0,
                source: MultifdError::ClosedBeforeSync
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "multifd channel 0: the channel closed before reaching the sync point the main \
         channel waits for"
    );
    end.expect("an EOF at a packet boundary is no failure");
    assert_eq!(byte(&blocks[0], PAGE, 0), 1);
}

/// One bad packet on channel 1 of 2; what the load reports, and the block untouched.
fn bad_packet(bytes: &[u8], close: bool) -> (LoadError, Arc<RamBlock>, OwnedFd) {
    let ctx = ctx();
    // A 4-page block at the start of an 8-page memfd: pages 4.. are outside it.
    let fd = memfd(8 * PAGE);
    let file = fd.try_clone().unwrap();
    let blocks = [Arc::new(
        RamBlock::new(spec("pc.ram", 4 * PAGE), fd).unwrap(),
    )];
    let (chans, mut tx) = channels(2);
    let (main, main_peer) = UnixStream::pair().unwrap();
    tx[1].write_all(bytes).unwrap();
    if close {
        drop(tx.remove(1));
    }
    let (synced, end) = with_receivers(&ctx, &blocks, chans, Some(main.into()), |m| m.sync());
    let e = synced.unwrap_err();
    assert!(matches!(e, LoadError::Multifd { channel: 1, .. }), "{e}");
    assert!(end.is_ok(), "the failure was taken by the sync");
    // The failing thread shut the main channel down: a loader reading it would return.
    main_peer
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!((&main_peer).read(&mut [0u8; 8]).unwrap(), 0);
    (e, blocks[0].clone(), file)
}

/// Nothing was written in the block nor after it in the fd.
fn untouched(b: &RamBlock, fd: &OwnedFd) {
    assert_eq!(b.hole_bitmap()[0] & 0xf, 0xf, "the block is all holes");
    let f = std::fs::File::from(fd.try_clone().unwrap());
    let mut rest = vec![1u8; 4 * TARGET_PAGE_SIZE];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut rest, 4 * PAGE).unwrap();
    assert!(rest.iter().all(|&x| x == 0), "nothing after the block");
}

#[test]
fn bad_packets_fail_naming_the_channel_and_write_nothing() {
    let pages = [(0, 1u8), (4 * PAGE, 2u8)];
    let cases: Vec<(Vec<u8>, bool, &str)> = vec![
        (
            packet("nope", 7, &pages[..1], &[]),
            false,
            "multifd channel 1: packet 1 on the channel (packet number 7): page for unknown \
             RAM block \"nope\"",
        ),
        (
            packet("pc.ram", 8, &pages, &[]),
            false,
            "multifd channel 1: packet 1 on the channel (packet number 8): page offset 0x4000 \
             is outside RAM block \"pc.ram\" of size 0x4000",
        ),
        (
            packet("pc.ram", 9, &pages[..1], &[4 * PAGE]),
            false,
            "page offset 0x4000 is outside RAM block",
        ),
        (
            {
                let mut p = packet("pc.ram", 0, &pages[..1], &[]);
                p[0] = 0x12;
                p
            },
            false,
            "multifd channel 1: packet 1 on the channel: bad header: multifd packet has magic \
             0x12223344",
        ),
        (
            packet("pc.ram", 0, &pages[..1], &[])[..700].to_vec(),
            true,
            "multifd channel 1: packet 1 on the channel: the channel closed 700 bytes into the \
             header (1344 bytes)",
        ),
    ];
    for (bytes, close, want) in cases {
        let (e, b, fd) = bad_packet(&bytes, close);
        assert!(e.to_string().contains(want), "{e}\nwant: {want}");
        untouched(&b, &fd);
    }
}

#[test]
fn a_channel_that_dies_mid_data_names_its_packet() {
    let mut bytes = sync_packet(0);
    let mut two = packet("pc.ram", 1, &[(0, 1), (PAGE, 2)], &[]);
    two.truncate(PACKET_HEADER_LEN + TARGET_PAGE_SIZE + 10);
    bytes.extend_from_slice(&two);
    // The first SYNC is consumed by the sync: run it by hand.
    let ctx = ctx();
    let blocks = [block("pc.ram", 4)];
    let (chans, mut tx) = channels(2);
    tx[0].write_all(&sync_packet(2)).unwrap();
    tx[1].write_all(&bytes).unwrap();
    drop(tx.remove(1));
    let (e, end) = with_receivers(&ctx, &blocks, chans, None, |m| {
        m.sync().expect("first sync");
        m.sync().unwrap_err()
    });
    end.unwrap();
    assert_eq!(
        e.to_string(),
        "multifd channel 1: packet 2 on the channel: the channel closed 4106 bytes into the \
         page data (8192 bytes)"
    );
}

#[test]
fn a_cancel_ends_the_wait_for_a_sync() {
    let ctx = ctx();
    let blocks = [block("pc.ram", 4)];
    let (chans, _tx) = channels(2);
    let (e, end) = with_receivers(&ctx, &blocks, chans, None, |m| {
        std::thread::scope(|s| {
            let w = s.spawn(|| m.sync());
            ctx.request_cancel();
            w.join().unwrap()
        })
    });
    assert!(matches!(e, Err(LoadError::Cancelled)), "{e:?}");
    end.expect("stopping threads blocked in a read is no failure");
}

/// A stream of three RAM sections (START with the block list, a PART, the END), each
/// `bodies[i]` then EOS, then EOF.
fn stream(blocks: &[(&str, u64)], bodies: [&[u8]; 3]) -> Vec<u8> {
    // The START body goes on after the block list, before its EOS.
    let mut s = ram_start(blocks);
    for (i, body) in bodies.iter().enumerate() {
        if i > 0 {
            let kind = if i == 1 {
                SectionKind::Part
            } else {
                SectionKind::End
            };
            stream::encode_section_part(&mut s, kind, 2);
        }
        s.extend_from_slice(body);
        ram_codec::encode_eos(&mut s);
        stream::encode_footer(&mut s, 2);
    }
    stream::encode_eof(&mut s);
    s
}

fn flush() -> Vec<u8> {
    flag::MULTIFD_FLUSH.to_be_bytes().to_vec()
}

/// A whole load: multifd data before the first sync, a main-channel ZERO record over a page
/// multifd wrote, a page on the main channel, data in the second round. With `v7_2` the
/// syncs are at each EOS instead of at FLUSH records.
fn whole_load(v7_2: bool) {
    let ctx = ctx();
    if v7_2 {
        ctx.params.lock().unwrap().compat_version = QemuVersion::V7_2;
    }
    let b = block("pc.ram", 16);
    assert!(b
        .write_pages_at(3 * PAGE, &[&[9u8; TARGET_PAGE_SIZE]])
        .unwrap());
    let blocks = [b];
    let (chans, mut tx) = channels(2);
    let mut num = 0..;
    let mut n = || num.next().unwrap_or(0);
    // Round 1: setup.
    tx[0]
        .write_all(&packet("pc.ram", n(), &[(0, 0x10), (PAGE, 0x11)], &[]))
        .unwrap();
    tx[1]
        .write_all(&packet("pc.ram", n(), &[(2 * PAGE, 0x12)], &[3 * PAGE]))
        .unwrap();
    // Rounds: QEMU 10.0 syncs at setup and at the end of the pass (in the PART here);
    // 7.2 at every EOS.
    let rounds = if v7_2 { 3 } else { 2 };
    for round in 0..rounds {
        for t in tx.iter_mut() {
            t.write_all(&sync_packet(n())).unwrap();
        }
        if round == 0 {
            tx[1]
                .write_all(&packet("pc.ram", n(), &[(8 * PAGE, 0x18)], &[]))
                .unwrap();
        }
    }
    // The source closes its channels at the end.
    drop(tx);
    let mut part = Vec::new();
    // Page 1 came on multifd before the first sync: this zero must land.
    ram_codec::encode_zero_page(&mut part, PAGE, Some("pc.ram")).unwrap();
    ram_codec::encode_page_header(&mut part, 4 * PAGE, flag::PAGE, None).unwrap();
    part.extend_from_slice(&[0x14; TARGET_PAGE_SIZE]);
    let (setup_end, part_end) = if v7_2 {
        (Vec::new(), part)
    } else {
        let mut p = part;
        p.extend_from_slice(&flush());
        (flush(), p)
    };
    let s = stream(&[("pc.ram", 16)], [&setup_end, &part_end, &[]]);
    crate::engine::destination::load(
        &ctx,
        &blocks,
        &s[..],
        "test".into(),
        None,
        chans,
        None,
        None,
    )
    .expect("load");
    let got: Vec<u8> = (0..10).map(|p| byte(&blocks[0], p * PAGE, 17)).collect();
    assert_eq!(got, [0x10, 0, 0x12, 0, 0x14, 0, 0, 0, 0x18, 0]);
    assert_eq!(ctx.stats.normal.load(Ordering::Relaxed), 5);
    assert_eq!(ctx.stats.duplicate.load(Ordering::Relaxed), 2);
}

#[test]
fn a_load_synced_by_flush_records() {
    whole_load(false);
}

#[test]
fn a_load_synced_at_each_eos_under_compat_7_2() {
    whole_load(true);
}

#[test]
fn a_missing_sync_fails_the_load_naming_the_channel() {
    // The main channel asks for a sync that channel 1 never reaches: it closed.
    let ctx = ctx();
    let blocks = [block("pc.ram", 4)];
    let (chans, mut tx) = channels(2);
    tx[0].write_all(&sync_packet(0)).unwrap();
    drop(tx);
    let s = stream(&[("pc.ram", 4)], [&flush(), &[], &[]]);
    let e = crate::engine::destination::load(
        &ctx,
        &blocks,
        &s[..],
        "test".into(),
        None,
        chans,
        None,
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("multifd channel 1: the channel closed"),
        "{e}"
    );
}

/// Not a timed test: prints what receiving 512 MiB over 2 channels costs into fresh and
/// into present memory
/// (`cargo test --profile ci --lib multifd_receive_cost -- --ignored --nocapture`).
#[test]
#[ignore]
fn multifd_receive_cost() {
    const PAGES: u64 = 128 << 10;
    for fresh in [true, false] {
        let ctx = ctx();
        let b = block("pc.ram", PAGES);
        if !fresh {
            b.range(0, PAGES * PAGE).unwrap().populate_write();
        }
        let blocks = [b];
        let (chans, tx) = channels(2);
        let t = std::time::Instant::now();
        let ((), end) = with_receivers(&ctx, &blocks, chans, None, |m| {
            std::thread::scope(|s| {
                for (c, mut t) in tx.into_iter().enumerate() {
                    s.spawn(move || {
                        let per = PAGES / 2;
                        for k in (0..per).step_by(128) {
                            let pages: Vec<(u64, u8)> = (k..k + 128)
                                .map(|p| ((c as u64 * per + p) * PAGE, p as u8 | 1))
                                .collect();
                            t.write_all(&packet("pc.ram", k, &pages, &[])).unwrap();
                        }
                        t.write_all(&sync_packet(0)).unwrap();
                    });
                }
                m.sync().unwrap();
            });
        });
        end.unwrap();
        eprintln!(
            "multifd receive, 512 MiB over 2 channels into {} memory: {:.0} ms",
            if fresh { "fresh" } else { "present" },
            t.elapsed().as_secs_f64() * 1000.0
        );
        assert_eq!(byte(&blocks[0], 5 * PAGE, 0), 5);
    }
}

#[test]
fn a_failing_channel_wakes_a_loader_blocked_on_the_main_channel() {
    let ctx = ctx();
    let blocks = [block("pc.ram", 4)];
    let (chans, mut tx) = channels(2);
    let (main, mut main_tx) = UnixStream::pair().unwrap();
    let main = Channel::from_unix(main, "main".into());
    // Were the main channel not shut down, the test would fail after this, not hang.
    main.set_timeouts(Some(Duration::from_secs(10)));
    // The main stream stops in the middle of the RAM START: the loader waits for more.
    let s = stream(&[("pc.ram", 4)], [&[], &[], &[]]);
    main_tx.write_all(&s[..40]).unwrap();
    tx[1]
        .write_all(&packet("pc.ram", 3, &[(8 * PAGE, 1)], &[]))
        .unwrap();
    let e = crate::engine::destination::load(
        &ctx,
        &blocks,
        &main,
        "main".into(),
        Some(&main),
        chans,
        None,
        None,
    )
    .unwrap_err();
    // The cause, not the main channel's EOF that followed.
    assert_eq!(
        e.to_string(),
        "multifd channel 1: packet 1 on the channel (packet number 3): page offset 0x8000 is \
         outside RAM block \"pc.ram\" of size 0x4000"
    );
    drop(main_tx);
}

#[test]
fn a_sync_that_waits_on_a_silent_channel_times_out() {
    let ctx = ctx();
    ctx.params.lock().unwrap().precopy_timeout = 300;
    let blocks = [block("pc.ram", 4)];
    let (chans, mut tx) = channels(2);
    tx[1].write_all(&sync_packet(0)).unwrap();
    let (e, end) = with_receivers(&ctx, &blocks, chans, None, |m| m.sync().unwrap_err());
    end.unwrap();
    assert_eq!(
        e.to_string(),
        "multifd channel 0: no packet came on any channel for 300 ms (precopy-timeout) while \
         the main channel waited for this one's sync point"
    );
    drop(tx);
}
