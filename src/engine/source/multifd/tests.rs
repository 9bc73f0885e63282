//! The source over multifd, end to end on socketpairs: what the main channel and every
//! multifd channel carry, decoded with the wire codecs and checked against guest memory.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::channel::partition_zero;
use crate::compat::wire::multifd::{FLAG_SYNC, PAGES_PER_PACKET};
use crate::compat::{QemuVersion, ZeroPageDetection};
use crate::engine::migration::{Command, MigrationCtx};
use crate::engine::source::error::MultifdError;
use crate::engine::source::SourceError;
use crate::engine::state::MigrationStatus;
use crate::memory::block::tests::{memfd, spec};
use crate::memory::block::RamBlock;
use crate::transport::Channel;
use crate::wire::multifd::{decode_packet_header, PacketHeader};
use crate::wire::ram::{self, Record};
use crate::wire::stream::{self, Token};

const PAGE: u64 = 4096;

fn ctx(version: QemuVersion, zpd: Option<ZeroPageDetection>) -> Arc<MigrationCtx> {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let ctx = MigrationCtx::new(log, Default::default()).expect("ctx");
    {
        let mut p = ctx.params.lock().unwrap();
        p.compat_version = version;
        p.zero_page_detection = zpd;
        p.max_bandwidth = 0;
    }
    ctx.caps.lock().unwrap().multifd = true;
    ctx.state.transition(MigrationStatus::Setup).expect("setup");
    ctx
}

/// Page `i` of a test block: data (a pattern), written zeros, or a hole (never written).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Data,
    Zero,
    Hole,
}

fn kind(i: u64) -> Kind {
    match i % 5 {
        0 | 3 => Kind::Data,
        1 => Kind::Zero,
        _ => Kind::Hole,
    }
}

fn block(id: &str, pages: u64, dirty: bool) -> Arc<RamBlock> {
    let mut s = spec(id, pages * PAGE);
    if dirty {
        s.dirty_bitmap = Some(("d".into(), memfd(pages.div_ceil(64) * 8)));
    }
    let b = RamBlock::new(s, memfd(pages * PAGE)).expect("block");
    for i in 0..pages {
        let p = b.guest_page(i * PAGE).expect("page");
        match kind(i) {
            Kind::Data => {
                let mut d = [0u8; PAGE as usize];
                d[..8].copy_from_slice(&i.to_le_bytes());
                d[8..id.len() + 8].copy_from_slice(id.as_bytes());
                d[4095] = 0xa5;
                p.copy_from(&d);
            }
            Kind::Zero => p.copy_from(&[0u8; PAGE as usize]),
            Kind::Hole => {}
        }
    }
    Arc::new(b)
}

fn content(b: &RamBlock, off: u64) -> Vec<u8> {
    let mut d = vec![0u8; PAGE as usize];
    b.guest_page(off).expect("page").copy_to(&mut d);
    d
}

fn reader(mut s: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        v
    })
}

struct Run {
    result: Result<(), SourceError>,
    main: Vec<u8>,
    chans: Vec<Vec<u8>>,
}

/// Migrates `blocks` over a main channel and `n` multifd channels; `peer` may keep or
/// drop each channel's far end (None: drop it at once).
fn migrate(
    ctx: &MigrationCtx,
    blocks: &[Arc<RamBlock>],
    n: usize,
    peer: impl Fn(usize, UnixStream) -> Option<std::thread::JoinHandle<Vec<u8>>>,
) -> Run {
    let (a, b) = UnixStream::pair().expect("pair");
    let main = reader(b);
    let mut chans = Vec::new();
    let mut readers = Vec::new();
    for i in 0..n {
        let (x, y) = UnixStream::pair().expect("pair");
        // As the control layer does: a cancel shuts every channel down.
        ctx.add_channel(x.try_clone().expect("dup").into());
        chans.push(
            Channel::from_unix(x, format!("test-mfd-{i}"))
                .with_cancel(ctx.mailbox.cancel_token().clone()),
        );
        readers.push(peer(i, y));
    }
    let uri = "unix:/nonexistent".parse().expect("uri");
    let result = crate::engine::source::run(
        ctx,
        blocks.to_vec(),
        Channel::from_unix(a, "test-main".into()),
        chans,
        uri,
    );
    Run {
        result,
        main: main.join().expect("main reader"),
        chans: readers
            .into_iter()
            .map(|r| r.map(|r| r.join().expect("reader")).unwrap_or_default())
            .collect(),
    }
}

/// What the main channel carried, in order (RAM records and section ends).
#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Zero(String, u64),
    Page(String, u64),
    Flush,
    /// The EOS of a RAM section.
    Eos,
}

fn decode_main(buf: &[u8]) -> Vec<Ev> {
    let mut at = stream::decode_header(buf).unwrap().unwrap().1;
    at += stream::decode_configuration(&buf[at..]).unwrap().unwrap().1;
    let mut evs = Vec::new();
    let mut last: Option<String> = None;
    // A stream handed over to postcopy ends without EOF.
    while let Some((t, n)) = stream::decode_token(&buf[at..]).unwrap() {
        at += n;
        let id = match t {
            Token::Eof => break,
            Token::Start(h) if h.idstr == "ram" => h.section_id,
            Token::Part(id) | Token::End(id) => id,
            Token::Command(_) => continue,
            other => panic!("unexpected {other:?}"),
        };
        loop {
            let (r, n) = ram::decode_record(&buf[at..]).unwrap().unwrap();
            at += n;
            match r {
                Record::MemSize { total } => {
                    let mut sum = 0;
                    while sum < total {
                        let (e, n) = ram::decode_block_entry(&buf[at..], &|_| false)
                            .unwrap()
                            .unwrap();
                        at += n;
                        sum += e.used_length;
                    }
                }
                Record::Zero { offset, block, .. } => {
                    if let Some(b) = block {
                        last = Some(b.to_string());
                    }
                    evs.push(Ev::Zero(last.clone().unwrap(), offset));
                }
                Record::Page { offset, block, .. } => {
                    if let Some(b) = block {
                        last = Some(b.to_string());
                    }
                    evs.push(Ev::Page(last.clone().unwrap(), offset));
                }
                Record::MultifdFlush => evs.push(Ev::Flush),
                Record::Eos => {
                    evs.push(Ev::Eos);
                    break;
                }
            }
        }
        at += stream::decode_footer(&buf[at..], id).unwrap().unwrap().1;
    }
    evs
}

/// A packet and its pages' data.
type Packet = (PacketHeader, Vec<Vec<u8>>);

/// A multifd channel's packets with their page data.
fn decode_chan(buf: &[u8]) -> Vec<Packet> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < buf.len() {
        let (h, n) = decode_packet_header(&buf[at..]).unwrap().unwrap();
        at += n;
        let data = buf[at..at + h.data_len()]
            .chunks(PAGE as usize)
            .map(|c| c.to_vec())
            .collect();
        at += h.data_len();
        out.push((h, data));
    }
    out
}

fn is_sync(h: &PacketHeader) -> bool {
    h.flags == FLAG_SYNC
        && h.pages_alloc == 0
        && h.normal_pages == 0
        && h.zero_pages == 0
        && h.next_packet_size == 0
        && h.ramblock.is_empty()
}

/// Checks the packets' form and numbers; returns per channel the packets between syncs
/// (epoch k ends with the k-th SYNC).
fn check_packets(chans: &[Vec<u8>]) -> Vec<Vec<Vec<Packet>>> {
    let mut nums = HashSet::new();
    let mut per_chan = Vec::new();
    for c in chans {
        let mut epochs = vec![Vec::new()];
        let mut prev: Option<u64> = None;
        for (h, data) in decode_chan(c) {
            assert!(
                nums.insert(h.packet_num),
                "packet_num {} twice",
                h.packet_num
            );
            assert!(
                prev.is_none_or(|p| p < h.packet_num),
                "packet_num goes back"
            );
            prev = Some(h.packet_num);
            if h.flags & FLAG_SYNC != 0 {
                assert!(is_sync(&h), "SYNC packet as QEMU 10.0 sends it: {h:?}");
                epochs.push(Vec::new());
                continue;
            }
            assert_eq!(h.flags, 0);
            assert_eq!(h.pages_alloc, PAGES_PER_PACKET);
            assert!(h.normal_pages + h.zero_pages >= 1);
            assert_eq!(h.next_packet_size as u64, h.normal_pages as u64 * PAGE);
            epochs.last_mut().unwrap().push((h, data));
        }
        // Nothing after the last SYNC.
        assert!(
            epochs.pop().unwrap().is_empty(),
            "packets after the last sync"
        );
        per_chan.push(epochs);
    }
    per_chan
}

fn blocks_by_name(blocks: &[Arc<RamBlock>]) -> HashMap<String, Arc<RamBlock>> {
    blocks.iter().map(|b| (b.id.clone(), b.clone())).collect()
}

/// A static guest over 10.0 or 7.2 rules, in one zero-page-detection mode.
fn static_guest(version: QemuVersion, zpd: ZeroPageDetection, n: usize) {
    let blocks = vec![block("pc.ram", 700, false), block("vga", 70, false)];
    let holes_before: Vec<Vec<u64>> = blocks.iter().map(|b| b.hole_bitmap()).collect();
    assert!(
        holes_before[0].iter().any(|&w| w != 0),
        "the test has holes"
    );
    let ctx = ctx(version, Some(zpd));
    let run = migrate(&ctx, &blocks, n, |_, s| Some(reader(s)));
    run.result.expect("migration");
    let by_name = blocks_by_name(&blocks);

    // Holes were never read through the mapping (that would have allocated them).
    for (b, before) in blocks.iter().zip(&holes_before) {
        assert_eq!(&b.hole_bitmap(), before, "a hole of {} was read", b.id);
    }

    let main = decode_main(&run.main);
    let per_section = version == QemuVersion::V7_2;
    let eos = main.iter().filter(|e| **e == Ev::Eos).count();
    let flushes = main.iter().filter(|e| **e == Ev::Flush).count();
    assert!(
        main.iter().all(|e| !matches!(e, Ev::Page(..))),
        "a PAGE record on main"
    );
    let epochs = check_packets(&run.chans);
    if per_section {
        assert_eq!(flushes, 0);
        for e in &epochs {
            assert_eq!(e.len(), eos, "one SYNC per RAM section");
        }
    } else {
        // Setup, the end of the one pass, the END section; each right before an EOS.
        assert_eq!(flushes, 3);
        for (i, ev) in main.iter().enumerate() {
            if *ev == Ev::Flush {
                assert_eq!(main[i + 1], Ev::Eos);
            }
        }
        for e in &epochs {
            assert_eq!(e.len(), 3, "one SYNC per FLUSH");
        }
    }
    // Nothing before the setup's sync.
    assert!(epochs.iter().all(|e| e[0].is_empty()));

    // Every page exactly once, its data equal to guest memory.
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let mut zero_sent = HashSet::new();
    for ev in &main {
        if let Ev::Zero(b, off) = ev {
            assert!(seen.insert((b.clone(), *off)), "page twice");
            zero_sent.insert((b.clone(), *off));
        }
    }
    for (h, data) in epochs.iter().flatten().flatten() {
        let b = &by_name[&h.ramblock];
        for (off, d) in h.normal_offsets().iter().zip(data) {
            assert!(seen.insert((h.ramblock.clone(), *off)), "page twice");
            assert_eq!(d, &content(b, *off), "page {off:#x} of {}", b.id);
        }
        for off in h.zero_offsets() {
            assert!(seen.insert((h.ramblock.clone(), *off)), "page twice");
            zero_sent.insert((h.ramblock.clone(), *off));
        }
        // Normal pages first: those zero pages listed are all zero; none of the normal
        // ones is (with detection).
        if zpd == ZeroPageDetection::Multifd {
            assert!(h
                .normal_offsets()
                .iter()
                .all(|&o| kind(o / PAGE) == Kind::Data));
        }
    }
    for b in &blocks {
        for i in 0..b.pages() {
            let key = (b.id.clone(), i * PAGE);
            assert!(seen.contains(&key), "page {i} of {} not sent", b.id);
            let zero = zero_sent.contains(&key);
            match zpd {
                ZeroPageDetection::None => assert!(!zero),
                _ => assert_eq!(zero, kind(i) != Kind::Data, "page {i} of {}", b.id),
            }
        }
    }
    // Zero pages: on the main channel with legacy, in the packets with multifd.
    let zero_on_main = main.iter().filter(|e| matches!(e, Ev::Zero(..))).count();
    let zero_in_packets: u32 = epochs
        .iter()
        .flatten()
        .flatten()
        .map(|(h, _)| h.zero_pages)
        .sum();
    match zpd {
        ZeroPageDetection::Legacy => assert_eq!(zero_in_packets, 0),
        _ => assert_eq!(zero_on_main, 0),
    }

    let st = &ctx.stats;
    let total_pages: u64 = blocks.iter().map(|b| b.pages()).sum();
    assert_eq!(
        st.normal.load(Ordering::Relaxed) + st.duplicate.load(Ordering::Relaxed),
        total_pages
    );
    let chan_bytes: usize = run.chans.iter().map(|c| c.len()).sum();
    assert_eq!(st.multifd_bytes.load(Ordering::Relaxed), chan_bytes as u64);
    assert!(st.transferred.load(Ordering::Relaxed) >= chan_bytes as u64);
    assert_eq!(st.remaining.load(Ordering::Relaxed), 0);
    assert_eq!(ctx.state.status(), MigrationStatus::Completed);
}

#[test]
fn qemu10_multifd_detection() {
    static_guest(QemuVersion::V10_0, ZeroPageDetection::Multifd, 2);
}

#[test]
fn qemu10_legacy_detection() {
    static_guest(QemuVersion::V10_0, ZeroPageDetection::Legacy, 3);
}

#[test]
fn qemu10_no_detection() {
    static_guest(QemuVersion::V10_0, ZeroPageDetection::None, 2);
}

#[test]
fn qemu72_flush_after_each_section() {
    static_guest(QemuVersion::V7_2, ZeroPageDetection::Legacy, 4);
    static_guest(QemuVersion::V7_2, ZeroPageDetection::None, 1);
}

/// A guest written while it migrates, over several passes: within a round (between two
/// syncs) no page goes twice, whatever the channel, and applying the rounds in order
/// gives the final guest memory.
#[test]
fn live_guest_rounds_keep_pages_in_order() {
    for (version, zpd) in [
        (QemuVersion::V10_0, ZeroPageDetection::Multifd),
        (QemuVersion::V7_2, ZeroPageDetection::Legacy),
    ] {
        let blocks = vec![block("pc.ram", 4096, true)];
        let ctx = ctx(version, Some(zpd));
        {
            let mut p = ctx.params.lock().unwrap();
            // Never good enough: passes go on while the guest writes.
            p.downtime_limit = 0;
            // 3.2 MB per 100 ms: the first pass (about 6.7 MB, nearly all on the
            // multifd channels, more than they hold queued) takes over 100 ms when the
            // limit counts the multifd bytes, long enough for the guest to dirty pages
            // in it.
            p.max_bandwidth = 32 << 20;
        }
        // The guest stops in pre-switchover, before the END section's harvest, as a
        // parent stops its VM.
        ctx.caps.lock().unwrap().pause_before_switchover = true;
        let b = blocks[0].clone();
        let c2 = ctx.clone();
        let dirtier = std::thread::spawn(move || {
            let d = b.dirty().expect("dirty bitmap");
            let waiting = || {
                let s = c2.state.status();
                s == MigrationStatus::PreSwitchover || s.is_finished()
            };
            let mut gen = 1u64;
            while c2.stats.dirty_sync_count.load(Ordering::Relaxed) < 3 && !waiting() {
                let i = gen * 7 % b.pages();
                let mut p = [0u8; PAGE as usize];
                p[..8].copy_from_slice(&gen.to_le_bytes());
                p[8..16].copy_from_slice(&i.to_le_bytes());
                b.guest_page(i * PAGE).expect("page").copy_from(&p);
                d.set(i);
                gen += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            while !waiting() {
                std::thread::sleep(Duration::from_millis(1));
            }
            c2.mailbox.post(Command::Continue).ok();
        });
        let t0 = Instant::now();
        let run = migrate(&ctx, &blocks, 3, |_, s| Some(reader(s)));
        let took = t0.elapsed();
        dirtier.join().unwrap();
        run.result.expect("migration");

        let main = decode_main(&run.main);
        let epochs = check_packets(&run.chans);
        let rounds = epochs[0].len();
        assert!(epochs.iter().all(|e| e.len() == rounds));
        // Main-channel ZERO records by round: a round ends at a FLUSH (10.0) or an EOS
        // (7.2).
        let ends_round = |e: &Ev| match version {
            QemuVersion::V7_2 => *e == Ev::Eos,
            _ => *e == Ev::Flush,
        };
        let mut main_rounds = vec![Vec::new()];
        for ev in main {
            if ends_round(&ev) {
                main_rounds.push(Vec::new());
            } else if let Ev::Zero(_, off) = ev {
                main_rounds.last_mut().unwrap().push(off);
            }
        }
        assert_eq!(main_rounds.len(), rounds + 1, "as many rounds on main");
        assert!(
            rounds >= 4,
            "several passes: {rounds} rounds ({version:?} {zpd:?}, {took:?}, {} harvests)",
            ctx.stats.dirty_sync_count.load(Ordering::Relaxed)
        );
        assert!(
            took >= Duration::from_millis(100),
            "bandwidth limit: {took:?}"
        );
        let mut mem: HashMap<u64, Vec<u8>> = HashMap::new();
        for r in 0..rounds {
            let mut once = HashSet::new();
            for off in &main_rounds[r] {
                assert!(once.insert(*off), "page {off:#x} twice in round {r}");
                mem.insert(*off, vec![0; PAGE as usize]);
            }
            for (h, data) in epochs.iter().flat_map(|e| &e[r]) {
                for (off, d) in h.normal_offsets().iter().zip(data) {
                    assert!(once.insert(*off), "page {off:#x} twice in round {r}");
                    mem.insert(*off, d.clone());
                }
                for off in h.zero_offsets() {
                    assert!(once.insert(*off), "page {off:#x} twice in round {r}");
                    mem.insert(*off, vec![0; PAGE as usize]);
                }
            }
        }
        for i in 0..blocks[0].pages() {
            assert_eq!(
                mem.get(&(i * PAGE)),
                Some(&content(&blocks[0], i * PAGE)),
                "page {i} ({version:?} {zpd:?})"
            );
        }
    }
}

/// A channel whose peer is gone fails the migration with an error naming it, promptly.
#[test]
fn a_closed_channel_fails_the_migration() {
    let blocks = vec![block("pc.ram", 4096, false)];
    let ctx = ctx(QemuVersion::V10_0, Some(ZeroPageDetection::None));
    let run = migrate(&ctx, &blocks, 3, |i, s| (i != 1).then(|| reader(s)));
    let e = run.result.expect_err("must fail");
    assert!(
        matches!(e, SourceError::Multifd(MultifdError::Io { id: 1, .. })),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("multifd channel 1 to test-mfd-1"), "{msg}");
    // Failed at its first packet: not everything was sent on the others.
    let sent: usize = run.chans.iter().map(|c| c.len()).sum();
    assert!(sent < 4096 * 4096, "stopped early: {sent} bytes");
}

/// Cancel ends a migration whose channel peer stopped reading (its thread blocked in
/// writev) at once.
#[test]
fn cancel_wakes_a_blocked_channel() {
    let blocks = vec![block("pc.ram", 16384, false)];
    let ctx = ctx(QemuVersion::V10_0, Some(ZeroPageDetection::None));
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<UnixStream>();
    let c2 = ctx.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        c2.mailbox.post(Command::Cancel).ok();
        t
    });
    let run = migrate(&ctx, &blocks, 2, |i, s| {
        if i == 0 {
            // Never read: the channel's buffers fill and its writev blocks.
            hold_tx.send(s).unwrap();
            None
        } else {
            Some(reader(s))
        }
    });
    let cancelled_at = canceller.join().unwrap();
    assert!(
        matches!(run.result, Err(SourceError::Cancelled)),
        "{:?}",
        run.result.err()
    );
    assert!(cancelled_at.elapsed() < Duration::from_secs(2));
    drop(hold_rx);
}

#[test]
fn zero_pages_move_to_the_end_as_qemu_orders_them() {
    // N0 Z1 N2 Z3 Z4 N5: Z1 swaps with N5, Z3 with Z4, then Z4(now at 3) stays zero.
    let mut e = vec![0, 1, 2, 3, 4, 5];
    let n = partition_zero(&mut e, |v| [1, 3, 4].contains(&v));
    assert_eq!(n, 3);
    assert_eq!(e, vec![0, 5, 2, 4, 3, 1]);
    let mut all = vec![1, 3];
    assert_eq!(partition_zero(&mut all, |_| true), 0);
    let mut none: Vec<u64> = vec![7, 8];
    assert_eq!(partition_zero(&mut none, |_| false), 2);
    assert_eq!(none, vec![7, 8]);
}

/// `migrate-start-postcopy` with multifd: the pass ends with a sync and a FLUSH record in
/// its section, then the multifd channels close; postcopy goes on over the main channel.
#[test]
fn postcopy_syncs_and_closes_the_multifd_channels() {
    let blocks = vec![block("pc.ram", 2048, false)];
    let ctx = ctx(QemuVersion::V10_0, Some(ZeroPageDetection::Multifd));
    ctx.caps.lock().unwrap().postcopy_ram = true;
    ctx.mailbox.post(Command::StartPostcopy).expect("postcopy");
    let (a, b) = UnixStream::pair().expect("pair");
    let main = reader(b);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut chans = Vec::new();
    for i in 0..2 {
        let (x, mut y) = UnixStream::pair().expect("pair");
        chans.push(Channel::from_unix(x, format!("test-mfd-{i}")));
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = y.read_to_end(&mut v);
            let _ = tx.send((i, v));
        });
    }
    let mut pre = crate::engine::source::precopy::Precopy::start(
        &ctx,
        &blocks,
        Channel::from_unix(a, "test-main".into()),
        chans,
    )
    .expect("start");
    assert!(pre.passes().expect("passes"), "goes to postcopy");
    let (push, mut link) = pre
        .into_postcopy("unix:/nonexistent".parse().expect("uri"))
        .expect("into postcopy");
    // Closed while the postcopy link lives on: both readers saw EOF.
    let mut got = vec![Vec::new(); 2];
    for _ in 0..2 {
        let (i, v) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("multifd channel closed");
        got[i] = v;
    }
    // What the switchover would send next goes behind it.
    link.out.flush().expect("flush");
    drop((push, link));
    let main = decode_main(&main.join().expect("main"));
    // Setup and the pass cut short: each a FLUSH right before its section's EOS.
    assert_eq!(
        main.iter().filter(|e| **e == Ev::Flush).count(),
        2,
        "{main:?}"
    );
    assert_eq!(&main[main.len() - 2..], &[Ev::Flush, Ev::Eos]);
    let epochs = check_packets(&got);
    let pages: u32 = epochs
        .iter()
        .flatten()
        .flatten()
        .map(|(h, _)| h.normal_pages + h.zero_pages)
        .sum();
    assert!(pages > 0);
    for e in &epochs {
        assert_eq!(e.len(), 2, "two syncs, nothing after the last");
    }
}
