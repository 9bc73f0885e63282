//! The multifd codecs (`wire::multifd`) against what QEMU 10.0 really sends: a QEMU source
//! with `multifd` on and 2 channels migrates to a `unix:` listener the test owns; the test
//! tells the channels apart as QEMU's destination does (peeking 4 bytes), decodes each
//! multifd channel's initial packet and its packets up to the sync at the end of the first
//! pass, checks every page against the paused source's RAM and that the encoders write the
//! same bytes back. The test never answers as a
//! destination would; dropping the connections fails QEMU's migration, which is fine.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::sys::socket::MsgFlags;
use serde_json::json;

use qemu_migration_helper::compat::wire::multifd::{FLAG_SYNC, PACKET_HEADER_LEN};
use qemu_migration_helper::wire::multifd::{
    decode_init, decode_packet_header, encode_init, encode_packet_header, PacketHeader,
};
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::util::{fill_mixed, test_seed, TempDir, GIB, MIB, PAGE_SIZE};

const RAM: u64 = 64 * MIB;
const CHANNELS: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(60);

/// What one multifd channel carried up to its second SYNC packet.
struct Channel {
    id: u8,
    packets: Vec<PacketHeader>,
    /// (offset, page data) of every normal page.
    pages: Vec<(u64, Vec<u8>)>,
}

fn read_channel(mut s: UnixStream) -> Result<Channel, String> {
    let mut init = [0u8; 64];
    s.read_exact(&mut init)
        .map_err(|e| format!("initial packet: {e}"))?;
    let raw_init = init;
    let (init, n) = decode_init(&init)
        .map_err(|e| e.to_string())?
        .ok_or("initial packet: decoder wants more than 64 bytes")?;
    assert_eq!(n, 64);
    let mut again = Vec::new();
    encode_init(&mut again, &init);
    if again[..] != raw_init[..] {
        return Err(format!(
            "initial packet re-encodes differently: {raw_init:02x?}"
        ));
    }
    if init.uuid != [0; 16] {
        return Err(format!("uuid {:?}, expected all-zero", init.uuid));
    }
    let mut ch = Channel {
        id: init.id,
        packets: Vec::new(),
        pages: Vec::new(),
    };
    let mut syncs = 0;
    let mut hdr = vec![0u8; PACKET_HEADER_LEN];
    while syncs < 2 {
        s.read_exact(&mut hdr)
            .map_err(|e| format!("channel {}: packet header: {e}", ch.id))?;
        let (h, n) = decode_packet_header(&hdr)
            .map_err(|e| format!("channel {}: {e}", ch.id))?
            .ok_or("decoder wants more than a whole header")?;
        assert_eq!(n, PACKET_HEADER_LEN);
        // QEMU 10.0 zeroes each packet before filling it: the encoder writes the same bytes.
        let mut again = Vec::new();
        encode_packet_header(&mut again, &h).map_err(|e| e.to_string())?;
        if again != hdr {
            return Err(format!(
                "channel {}: packet {} re-encodes differently",
                ch.id, h.packet_num
            ));
        }
        for &off in h.normal_offsets() {
            let mut page = vec![0u8; PAGE_SIZE];
            s.read_exact(&mut page)
                .map_err(|e| format!("channel {}: page data: {e}", ch.id))?;
            ch.pages.push((off, page));
        }
        if h.flags & FLAG_SYNC != 0 {
            syncs += 1;
        }
        ch.packets.push(h);
    }
    Ok(ch)
}

fn accept_all(listener: &UnixListener, n: usize) -> Vec<UnixStream> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut conns = Vec::new();
    while conns.len() < n {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                conns.push(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} connections",
                    conns.len()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    conns
}

/// Waits until the peer has written at least 4 bytes and returns them, unread.
fn peek4(s: &UnixStream) -> [u8; 4] {
    let deadline = Instant::now() + TIMEOUT;
    let mut b = [0u8; 4];
    loop {
        let n = nix::sys::socket::recv(s.as_raw_fd(), &mut b, MsgFlags::MSG_PEEK).expect("peek");
        if n == 4 {
            return b;
        }
        assert!(
            n > 0 || Instant::now() < deadline,
            "channel closed before 4 bytes"
        );
        assert!(Instant::now() < deadline, "no 4 bytes in time");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn qemu10_multifd_packets_decode() {
    let test = "qemu10_multifd_packets_decode";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let mut src = QemuVm::start(Qemu::V10, RAM, &VmOpts::default());
    let zeros = fill_mixed(&mut src.ram_mmap(), test_seed(test), 0.5);
    eprintln!("{test}: {zeros} zero pages of {}", RAM / PAGE_SIZE as u64);
    let dir = TempDir::new("qmh-multifd-wire");
    let path = dir.join("mig.sock");
    let listener = UnixListener::bind(&path).expect("bind");

    src.qmp()
        .set_capabilities(&[("multifd", true)])
        .expect("caps");
    src.qmp()
        .set_parameters(json!({"multifd-channels": CHANNELS, "max-bandwidth": 10 * GIB}))
        .expect("params");
    src.qmp()
        .migrate(&format!("unix:{}", path.display()))
        .expect("migrate");

    let mut main = None;
    let mut multifd = Vec::new();
    for s in accept_all(&listener, 1 + CHANNELS) {
        if &peek4(&s) == b"QEVM" {
            assert!(main.is_none(), "two main channels");
            main = Some(s);
        } else {
            multifd.push(s);
        }
    }
    let mut main = main.expect("a main channel starting with QEVM");
    // Drain the main channel so QEMU's main thread never blocks on it.
    let drain = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = main.read_to_end(&mut buf);
        buf
    });
    let readers: Vec<_> = multifd
        .into_iter()
        .map(|s| std::thread::spawn(move || read_channel(s)))
        .collect();
    let channels: Vec<Channel> = readers
        .into_iter()
        .map(|r| {
            r.join()
                .expect("reader thread")
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();

    let mut ids: Vec<u8> = channels.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [0, 1]);

    let ram = src.ram_mmap();
    let mut nums = HashSet::new();
    let mut seen: HashMap<u64, bool> = HashMap::new();
    let mut data_packets = 0;
    for ch in &channels {
        // The first packet is the sync of ram_save_setup, the last the sync at the end of
        // the first pass; both page-less, as QEMU 9.0+ sends them.
        let first = &ch.packets[0];
        let last = ch.packets.last().unwrap();
        for h in [first, last] {
            assert_eq!(h.flags, FLAG_SYNC, "channel {}", ch.id);
            assert_eq!((h.pages_alloc, h.normal_pages, h.zero_pages), (0, 0, 0));
            assert_eq!(h.ramblock, "");
        }
        for h in &ch.packets {
            assert!(
                nums.insert(h.packet_num),
                "packet_num {} twice",
                h.packet_num
            );
            assert_eq!(h.next_packet_size as usize, h.data_len());
            if h.flags & FLAG_SYNC == 0 {
                data_packets += 1;
                assert_eq!(h.pages_alloc, 128, "channel {}", ch.id);
                assert!(h.normal_pages + h.zero_pages > 0);
                assert_eq!(h.ramblock, "ram");
            }
            for &off in h.normal_offsets() {
                assert!(off < RAM, "offset {off:#x}");
                assert!(seen.insert(off, true).is_none(), "page {off:#x} twice");
            }
            for &off in h.zero_offsets() {
                assert!(off < RAM, "offset {off:#x}");
                assert!(seen.insert(off, false).is_none(), "page {off:#x} twice");
                let p = off as usize;
                assert!(
                    ram[p..p + PAGE_SIZE].iter().all(|&b| b == 0),
                    "zero page {off:#x} is not zero in the source"
                );
            }
        }
        for (off, data) in &ch.pages {
            let p = *off as usize;
            assert!(
                ram[p..p + PAGE_SIZE] == data[..],
                "page {off:#x} differs from the source's"
            );
        }
    }
    // The first pass sent every page exactly once, zero pages as zero offsets.
    assert_eq!(seen.len() as u64, RAM / PAGE_SIZE as u64);
    assert_eq!(seen.values().filter(|&&normal| !normal).count(), zeros);
    // One packet counter across the channels, from 0.
    let max = *nums.iter().max().unwrap();
    assert_eq!(nums.len() as u64, max + 1, "packet numbers not 0..={max}");
    eprintln!(
        "{test}: {} packets ({data_packets} with pages) on {CHANNELS} channels",
        nums.len()
    );

    drop(channels);
    drop(listener);
    src.kill();
    let main_bytes = drain.join().expect("drain thread");
    assert!(main_bytes.starts_with(b"QEVM\x00\x00\x00\x03"));
}
