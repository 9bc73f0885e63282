//! Multifd (issue 12): RAM over `multifd-channels` extra connections, in packets. QEMU 10.0
//! and 7.2 on either side of a helper (paused and live helper sources, the return path, a
//! VM UUID, a listening fd); helper to helper with a live source under each zero-page
//! detection and compat-version, into fresh and garbage-filled destinations, over unix:,
//! tcp: and the `fd:` forms; odd blocks, a sparse guest, offsets above 4 GiB; hostile
//! multifd channels from a source crafted here with the crate's wire codecs (checked
//! against QEMU 10.0 first); a QEMU destination killed mid-migration, a wrong UUID, ends that
//! disagree on the channel count, cancel on either end; the capability and parameter
//! surface and what is refused at the start. Every migration ends with guest RAM compared
//! byte for byte and `multifd-bytes` on the helper end(s) at least the normal pages' data,
//! so that no test passes over the main channel alone.
//!
//! Not here: multifd with postcopy-ram (10.1 semantics); only its refusal under
//! compat-version 10.0 and 7.2 (and again at the start after a change back from 10.1).

use std::io::Write;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_migration_helper::client::HelperClient;
use qemu_migration_helper::compat::wire::multifd::PAGES_PER_PACKET;
use qemu_migration_helper::compat::wire::ram as flag;
use qemu_migration_helper::wire::multifd::{
    encode_init, encode_packet_header, InitPacket, PacketHeader,
};
use qemu_migration_helper::wire::ram::{encode_block_entries, encode_eos, BlockEntry};
use qemu_migration_helper::wire::stream::{
    encode_footer, encode_section_part, encode_section_start, put_be64, SectionKind,
};
use serde_json::{json, Value};

use crate::helper_helper::dirty_writer;
use crate::streams::{head, image, page_content, ram_header, tail, BLOCK, PAGES};
use support::helper::{HelperVm, Memfd};
use support::migrate::pass_ends;
use support::migrate::socketpair;
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::util::{
    assert_same_memory, fill_mixed, test_seed, u64_at, TempDir, GIB, MIB, PAGE_SIZE,
};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(120);
/// How long a helper may take to notice that its peer died or sent something bad.
const FAIL_TIMEOUT: Duration = Duration::from_secs(20);
/// What a preallocated destination holds before the migration: a page that is zero at the
/// source must read zero afterwards, so the destination has to write it.
const GARBAGE: u8 = 0xa5;
const UUID: &str = "6f1c2a9e-3b4d-4e5f-8a7b-0c1d2e3f4a5b";
const ZERO_UUID: &str = "00000000-0000-0000-0000-000000000000";

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// The `multifd` capability and `multifd-channels` on one end (helper or QEMU).
fn enable_multifd(c: &mut HelperClient, channels: u8) {
    c.set_capabilities(&[("multifd", true)])
        .expect("multifd capability");
    c.set_parameters(json!({ "multifd-channels": channels }))
        .expect("multifd-channels");
}

fn unix_uri(dir: &TempDir, name: &str) -> String {
    format!("unix:{}", dir.join(name).display())
}

/// `multifd-bytes` is at least the data of `normal` pages: every normal page went over
/// the multifd channels (whatever the zero-page detection, the main channel carries none).
fn assert_multifd_carried(info: &Value, normal: u64, what: &str) {
    let bytes = u64_at(info, &["ram", "multifd-bytes"]);
    assert!(
        bytes > 0 && bytes >= normal * PAGE_SIZE as u64,
        "{what}: multifd-bytes {bytes} for {normal} normal pages ({} bytes): {info}",
        normal * PAGE_SIZE as u64
    );
}

fn nonzero_pages(mem: &[u8]) -> u64 {
    mem.chunks(PAGE_SIZE)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64
}

fn uuid_args(uuid: Option<&str>) -> Vec<String> {
    uuid.map(|u| vec!["-uuid".to_string(), u.to_string()])
        .unwrap_or_default()
}

/// How a QEMU <-> helper case is set up.
#[derive(Clone, Copy)]
struct Case {
    channels: u8,
    /// The source's `zero-page-detection` (QEMU 10.0 or helper); `None`: its default.
    zpd: Option<&'static str>,
    /// QEMU's `-uuid` and the helper's `vm-uuid`; `None`: neither (all zero).
    uuid: Option<&'static str>,
    /// The helper destination's memory is preallocated with `GARBAGE`.
    garbage: bool,
    /// The `return-path` capability on both ends.
    return_path: bool,
    /// The helper destination keeps compat-version 10.0 whatever the QEMU source (it must
    /// follow a 7.2 source's sync style by itself).
    dst_default_compat: bool,
}

// ---------------------------------------------------------------------------------------
// 1, 2. QEMU 10.0 / 7.2 <-> helper over unix:
// ---------------------------------------------------------------------------------------

fn qemu_to_helper(qemu: Qemu, test: &str, c: Case) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let opts = VmOpts {
        extra_args: uuid_args(c.uuid),
        ..VmOpts::default()
    };
    let mut src = QemuVm::start(qemu, RAM, &opts);
    let mut dst = HelperVm::spawn();
    if c.garbage {
        dst.add_preallocated_block("ram", RAM, GARBAGE);
    } else {
        dst.add_block("ram", RAM, false);
    }
    let zeros = fill_mixed(&mut src.ram_mmap(), test_seed(test), 0.5) as u64;
    let normal = RAM / PAGE_SIZE as u64 - zeros;
    if qemu == Qemu::V72 && !c.dst_default_compat {
        dst.client
            .set_parameters(json!({"compat-version": "7.2"}))
            .expect("compat-version");
    }
    if let Some(u) = c.uuid {
        dst.client
            .set_parameters(json!({ "vm-uuid": u }))
            .expect("vm-uuid");
    }
    enable_multifd(src.qmp(), c.channels);
    enable_multifd(&mut dst.client, c.channels);
    if c.return_path {
        src.qmp()
            .set_capabilities(&[("return-path", true)])
            .expect("return-path");
        dst.client
            .set_capabilities(&[("return-path", true)])
            .expect("return-path");
    }
    if let Some(z) = c.zpd {
        src.qmp()
            .set_parameters(json!({ "zero-page-detection": z }))
            .expect("zero-page-detection");
    }
    src.qmp()
        .set_parameters(json!({"max-bandwidth": 10 * GIB}))
        .expect("params");
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "mig.sock");
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    let t0 = Instant::now();
    src.qmp().migrate(&uri).expect("migrate");
    src.wait_migration(&["completed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: QEMU source: {e}"));
    let info = dst.wait(&["completed"], TIMEOUT);
    eprintln!(
        "{test}: {zeros} zero pages of {}, {:?}; destination {}",
        RAM / PAGE_SIZE as u64,
        t0.elapsed(),
        info["ram"]
    );
    assert_same_memory(&src.ram_mmap(), &dst.blocks[0].mem.map(), test);
    assert_multifd_carried(&info, normal, test);
}

fn helper_to_qemu(qemu: Qemu, test: &str, c: Case) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    let opts = VmOpts {
        extra_args: uuid_args(c.uuid),
        ..VmOpts::incoming()
    };
    let mut dst = QemuVm::start(qemu, RAM, &opts);
    let zeros = fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.5) as u64;
    let pages = RAM / PAGE_SIZE as u64;
    if qemu == Qemu::V72 {
        src.client
            .set_parameters(json!({"compat-version": "7.2"}))
            .expect("compat-version");
    }
    if let Some(u) = c.uuid {
        src.client
            .set_parameters(json!({ "vm-uuid": u }))
            .expect("vm-uuid");
    }
    if let Some(z) = c.zpd {
        src.client
            .set_parameters(json!({ "zero-page-detection": z }))
            .expect("zero-page-detection");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    enable_multifd(&mut src.client, c.channels);
    enable_multifd(dst.qmp(), c.channels);
    if c.return_path {
        src.client
            .set_capabilities(&[("return-path", true)])
            .expect("return-path");
        dst.qmp()
            .set_capabilities(&[("return-path", true)])
            .expect("return-path");
    }
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "mig.sock");
    dst.qmp().migrate_incoming(&uri).expect("migrate-incoming");
    let t0 = Instant::now();
    src.client.migrate(&uri).expect("migrate");
    let info = src.wait(&["completed"], TIMEOUT);
    dst.wait_migration(&["completed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: QEMU destination: {e}"));
    eprintln!(
        "{test}: {zeros} zero pages of {pages}, {:?}; source {}",
        t0.elapsed(),
        info["ram"]
    );
    assert_same_memory(&src.blocks[0].mem.map(), &dst.ram_mmap(), test);
    // With `none` no page is found zero: all of them are normal pages (as QEMU counts).
    let normal = if c.zpd == Some("none") {
        pages
    } else {
        pages - zeros
    };
    assert_eq!(u64_at(&info, &["ram", "normal"]), normal, "{test}: {info}");
    assert_eq!(
        u64_at(&info, &["ram", "duplicate"]),
        pages - normal,
        "{test}: {info}"
    );
    assert_multifd_carried(&info, normal, test);
}

#[test]
fn qemu10_to_helper_multifd_2ch() {
    qemu_to_helper(
        Qemu::V10,
        "qemu10_to_helper_multifd_2ch",
        Case {
            channels: 2,
            zpd: Some("legacy"),
            uuid: None,
            garbage: false,
            return_path: false,
            dst_default_compat: false,
        },
    );
}

/// QEMU's default `multifd` zero-page detection (zero pages listed in packets) into a
/// destination full of garbage, with a VM UUID and the return path on both ends.
#[test]
fn qemu10_to_helper_multifd_4ch() {
    qemu_to_helper(
        Qemu::V10,
        "qemu10_to_helper_multifd_4ch",
        Case {
            channels: 4,
            zpd: None,
            uuid: Some(UUID),
            garbage: true,
            return_path: true,
            dst_default_compat: false,
        },
    );
}

#[test]
fn helper_to_qemu10_multifd_2ch() {
    helper_to_qemu(
        Qemu::V10,
        "helper_to_qemu10_multifd_2ch",
        Case {
            channels: 2,
            zpd: None,
            uuid: None,
            garbage: false,
            return_path: false,
            dst_default_compat: false,
        },
    );
}

#[test]
fn helper_to_qemu10_multifd_4ch() {
    helper_to_qemu(
        Qemu::V10,
        "helper_to_qemu10_multifd_4ch",
        Case {
            channels: 4,
            zpd: Some("none"),
            uuid: Some(UUID),
            garbage: false,
            return_path: true,
            dst_default_compat: false,
        },
    );
}

/// QEMU 10.0 migrating to `unix:PATH` where the helper listens on a socket its parent bound
/// there and passed as `fd:lis` (what a management layer that binds for it does).
#[test]
fn qemu10_to_helper_multifd_fd_listener() {
    let test = "qemu10_to_helper_multifd_fd_listener";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let mut src = QemuVm::start(Qemu::V10, FD_RAM, &VmOpts::default());
    let mut dst = HelperVm::spawn();
    dst.add_block("ram", FD_RAM, false);
    let zeros = fill_mixed(&mut src.ram_mmap(), test_seed(test), 0.5) as u64;
    enable_multifd(src.qmp(), 3);
    enable_multifd(&mut dst.client, 3);
    let dir = TempDir::new("qmh-mfd");
    let path = dir.join("lis.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    dst.client.getfd("lis", listener.as_fd()).expect("getfd");
    drop(listener);
    dst.client
        .migrate_incoming("fd:lis")
        .expect("migrate-incoming");
    src.qmp()
        .migrate(&format!("unix:{}", path.display()))
        .expect("migrate");
    src.wait_migration(&["completed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: QEMU source: {e}"));
    let info = dst.wait(&["completed"], TIMEOUT);
    assert_same_memory(&src.ram_mmap(), &dst.blocks[0].mem.map(), test);
    assert_multifd_carried(&info, FD_RAM / PAGE_SIZE as u64 - zeros, test);
}

/// QEMU 7.2: legacy zero pages, SYNC packets of the old shape, a sync at every section end.
#[test]
fn qemu72_to_helper_multifd() {
    qemu_to_helper(
        Qemu::V72,
        "qemu72_to_helper_multifd",
        Case {
            channels: 2,
            zpd: None,
            uuid: None,
            garbage: true,
            return_path: true,
            dst_default_compat: false,
        },
    );
}

/// The same with the helper left at compat-version 10.0: it learns from the setup section
/// that the source syncs at every section end (a QEMU 10.0 destination would hang here).
#[test]
fn qemu72_to_helper_multifd_default_compat() {
    qemu_to_helper(
        Qemu::V72,
        "qemu72_to_helper_multifd_default_compat",
        Case {
            channels: 2,
            zpd: None,
            uuid: None,
            garbage: true,
            return_path: true,
            dst_default_compat: true,
        },
    );
}

#[test]
fn helper_to_qemu72_multifd() {
    helper_to_qemu(
        Qemu::V72,
        "helper_to_qemu72_multifd",
        Case {
            channels: 3,
            zpd: None,
            uuid: None,
            garbage: false,
            return_path: true,
            dst_default_compat: false,
        },
    );
}

// ---------------------------------------------------------------------------------------
// 3. Helper -> helper: a live source, each zero-page detection, the fd: forms
// ---------------------------------------------------------------------------------------

/// A live source (the parent dirties pages, one in eight made zero, while it runs) with
/// `channels` channels and `zpd` migrates over unix: into a fresh or garbage-filled
/// destination; the writer stops at `pre-switchover`.
fn live_helper_to_helper(test: &str, channels: u8, zpd: &str, garbage: bool) {
    live_helper_to_helper_compat(test, channels, zpd, garbage, "10.0");
}

/// `live_helper_to_helper` with `compat-version` `compat` on both ends (7.2: a sync before
/// every section's EOS instead of MULTIFD_FLUSH records).
fn live_helper_to_helper_compat(test: &str, channels: u8, zpd: &str, garbage: bool, compat: &str) {
    live_helper_to_helper_compats(test, channels, zpd, garbage, (compat, compat));
}

/// `compats`: the source's and the destination's compat-version.
fn live_helper_to_helper_compats(
    test: &str,
    channels: u8,
    zpd: &str,
    garbage: bool,
    compats: (&str, &str),
) {
    let seed = test_seed(test);
    let t0 = Instant::now();
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, true);
    let mut dst = HelperVm::spawn();
    if garbage {
        dst.add_preallocated_block("ram", RAM, GARBAGE);
    } else {
        dst.add_block("ram", RAM, false);
    }
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.3);
    enable_multifd(&mut src.client, channels);
    enable_multifd(&mut dst.client, channels);
    for (h, compat) in [(&mut src, compats.0), (&mut dst, compats.1)] {
        h.client
            .set_parameters(json!({ "compat-version": compat }))
            .expect("compat-version");
    }
    src.client
        .set_parameters(json!({
            "zero-page-detection": zpd,
            "max-bandwidth": 200 * MIB,
            "downtime-limit": 20,
        }))
        .expect("params");
    assert_eq!(
        src.client.query_parameters().expect("params")["zero-page-detection"],
        zpd
    );
    src.client
        .set_capabilities(&[("pause-before-switchover", true)])
        .expect("caps");

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let mem = src.blocks[0].mem.map();
        let bitmap = src.blocks[0].bitmap.as_ref().expect("bitmap").map();
        let (stop, writes) = (stop.clone(), writes.clone());
        std::thread::spawn(move || dirty_writer(mem, bitmap, seed ^ 0x5eed, stop, writes))
    };
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "mig.sock");
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    src.client.migrate(&uri).expect("migrate");
    let at_migrate = writes.load(Ordering::Relaxed);
    // 64 MiB at 200 MiB/s: well under a second per pass; a stuck pass fails in 30 s.
    let r = src
        .client
        .wait_for_status(&["pre-switchover"], Duration::from_secs(30));
    let during = writes.load(Ordering::Relaxed) - at_migrate;
    stop.store(true, Ordering::Release);
    writer.join().expect("writer thread");
    let pre = r.unwrap_or_else(|e| {
        panic!(
            "{test}: source reaches pre-switchover: {e}; destination: {:?}",
            dst.client.query_migrate()
        )
    });
    assert!(during > 0, "{test}: the writer wrote nothing: {pre}");
    src.client.migrate_continue().expect("migrate-continue");
    let info = src.wait(&["completed"], TIMEOUT);
    let dinfo = dst.wait(&["completed"], TIMEOUT);
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);

    let pages = RAM / PAGE_SIZE as u64;
    let normal = u64_at(&info, &["ram", "normal"]);
    let dup = u64_at(&info, &["ram", "duplicate"]);
    let syncs = u64_at(&info, &["ram", "dirty-sync-count"]);
    eprintln!(
        "{test}: {during} pages written during precopy; {} sent for {pages}, dirty-sync-count \
         {syncs}, {:?}; source {}; destination {}",
        normal + dup,
        t0.elapsed(),
        info["ram"],
        dinfo["ram"]
    );
    assert!(syncs >= 2, "{test}: dirty-sync-count {syncs}: {info}");
    assert!(normal + dup > pages, "{test}: no page sent twice: {info}");
    if zpd == "none" {
        assert_eq!(
            dup, 0,
            "{test}: zero pages found with detection none: {info}"
        );
    } else {
        assert!(dup > 0, "{test}: no zero page found with {zpd}: {info}");
    }
    assert_multifd_carried(&info, normal, &format!("{test} (source)"));
    assert_multifd_carried(&dinfo, normal, &format!("{test} (destination)"));
}

#[test]
fn live_helper_to_helper_multifd_2ch_zpd_none_garbage() {
    live_helper_to_helper(
        "live_helper_to_helper_multifd_2ch_zpd_none_garbage",
        2,
        "none",
        true,
    );
}

#[test]
fn live_helper_to_helper_multifd_4ch_zpd_legacy_garbage() {
    live_helper_to_helper(
        "live_helper_to_helper_multifd_4ch_zpd_legacy_garbage",
        4,
        "legacy",
        true,
    );
}

#[test]
fn live_helper_to_helper_multifd_2ch_zpd_multifd_fresh() {
    live_helper_to_helper(
        "live_helper_to_helper_multifd_2ch_zpd_multifd_fresh",
        2,
        "multifd",
        false,
    );
}

#[test]
fn live_helper_to_helper_multifd_4ch_zpd_multifd_garbage() {
    live_helper_to_helper(
        "live_helper_to_helper_multifd_4ch_zpd_multifd_garbage",
        4,
        "multifd",
        true,
    );
}

/// Between helpers as between a QEMU 7.2 pair: a sync at every section end, over passes.
#[test]
fn live_helper_to_helper_multifd_compat72() {
    live_helper_to_helper_compat(
        "live_helper_to_helper_multifd_compat72",
        2,
        "legacy",
        true,
        "7.2",
    );
}

/// The two ends configured with different compat-versions: the destination follows the
/// source's sync style (per section from a 7.2-style source, per round from a 10.0 one).
#[test]
fn live_helper_to_helper_multifd_compat_mismatch() {
    live_helper_to_helper_compats(
        "live_helper_to_helper_multifd_compat_mismatch_72_100",
        2,
        "legacy",
        false,
        ("7.2", "10.0"),
    );
    live_helper_to_helper_compats(
        "live_helper_to_helper_multifd_compat_mismatch_100_72",
        2,
        "multifd",
        false,
        ("10.0", "7.2"),
    );
}

/// A source paused in `pre-switchover` for 4x precopy-timeout with multifd: the silent
/// multifd channels do not time the destination out (nor the source), and it completes.
#[test]
fn multifd_pause_longer_than_precopy_timeout() {
    let test = "multifd_pause_longer_than_precopy_timeout";
    let (mut src, mut dst) = fd_pair(test, 2);
    for h in [&mut src, &mut dst] {
        h.client
            .set_parameters(json!({"precopy-timeout": 500}))
            .expect("params");
    }
    src.client
        .set_capabilities(&[("pause-before-switchover", true)])
        .expect("caps");
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "mig.sock");
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    src.client.migrate(&uri).expect("migrate");
    src.wait(&["pre-switchover"], TIMEOUT);
    std::thread::sleep(Duration::from_millis(2000));
    let d = dst.client.query_migrate().expect("query-migrate");
    assert_eq!(
        d["status"], "active",
        "{test}: the destination gave up during the pause: {d}"
    );
    src.client.migrate_continue().expect("migrate-continue");
    finish_fd(&mut src, &mut dst, test);
}

/// `tcp:` between helpers: the destination tells the channels apart on one TCP listener.
#[test]
fn helper_to_helper_multifd_tcp() {
    let test = "helper_to_helper_multifd_tcp";
    let (mut src, mut dst) = fd_pair(test, 4);
    // A free port: bind port 0, note it, close; retry if someone takes it meanwhile.
    let mut uri = String::new();
    for attempt in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind port 0")
            .port();
        uri = format!("tcp:127.0.0.1:{port}");
        match dst.client.migrate_incoming(&uri) {
            Ok(()) => break,
            Err(e) if attempt < 4 => eprintln!("{test}: {uri}: {e}; another port"),
            Err(e) => panic!("migrate-incoming {uri}: {e}"),
        }
    }
    src.client.migrate(&uri).expect("migrate");
    finish_fd(&mut src, &mut dst, test);
}

/// A live helper source (the parent dirtying pages, passes cut into timed sections by
/// max-bandwidth) into a real QEMU destination, the writer stopping at `pre-switchover`:
/// QEMU 7.2 syncs the channels at every section's EOS, QEMU 10.0 at every pass's FLUSH.
fn live_helper_to_qemu(qemu: Qemu, test: &str) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let seed = test_seed(test);
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, true);
    let mut dst = QemuVm::start(qemu, RAM, &VmOpts::incoming());
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.3);
    if qemu == Qemu::V72 {
        src.client
            .set_parameters(json!({"compat-version": "7.2"}))
            .expect("compat-version");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 200 * MIB, "downtime-limit": 20}))
        .expect("params");
    src.client
        .set_capabilities(&[("pause-before-switchover", true)])
        .expect("caps");
    enable_multifd(&mut src.client, 2);
    enable_multifd(dst.qmp(), 2);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let mem = src.blocks[0].mem.map();
        let bitmap = src.blocks[0].bitmap.as_ref().expect("bitmap").map();
        let (stop, writes) = (stop.clone(), writes.clone());
        std::thread::spawn(move || dirty_writer(mem, bitmap, seed ^ 0x5eed, stop, writes))
    };
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "mig.sock");
    dst.qmp().migrate_incoming(&uri).expect("migrate-incoming");
    src.client.migrate(&uri).expect("migrate");
    // 64 MiB at 200 MiB/s: well under a second per pass.
    let r = src
        .client
        .wait_for_status(&["pre-switchover"], Duration::from_secs(30));
    stop.store(true, Ordering::Release);
    writer.join().expect("writer thread");
    r.unwrap_or_else(|e| {
        panic!(
            "{test}: source reaches pre-switchover: {e}; source {:?}; QEMU {:?}",
            src.client.query_migrate(),
            dst.qmp().query_migrate()
        )
    });
    src.client.migrate_continue().expect("migrate-continue");
    let info = src.wait(&["completed"], TIMEOUT);
    dst.wait_migration(&["completed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: QEMU destination: {e}"));
    assert_same_memory(&src.blocks[0].mem.map(), &dst.ram_mmap(), test);
    let normal = u64_at(&info, &["ram", "normal"]);
    let dup = u64_at(&info, &["ram", "duplicate"]);
    eprintln!("{test}: {} pages sent, {}", normal + dup, info["ram"]);
    assert!(
        normal + dup > RAM / PAGE_SIZE as u64,
        "{test}: one pass only: {info}"
    );
    assert_multifd_carried(&info, normal, test);
}

#[test]
fn live_helper_to_qemu10_multifd() {
    live_helper_to_qemu(Qemu::V10, "live_helper_to_qemu10_multifd");
}

#[test]
fn live_helper_to_qemu72_multifd() {
    live_helper_to_qemu(Qemu::V72, "live_helper_to_qemu72_multifd");
}

const FD_RAM: u64 = 32 * MIB;

/// A source and a destination with multifd, `FD_RAM` of mixed pages at the source.
fn fd_pair(test: &str, channels: u8) -> (HelperVm, HelperVm) {
    let mut src = HelperVm::spawn();
    src.add_block("ram", FD_RAM, false);
    let mut dst = HelperVm::spawn();
    dst.add_preallocated_block("ram", FD_RAM, GARBAGE);
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.5);
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    enable_multifd(&mut src.client, channels);
    enable_multifd(&mut dst.client, channels);
    (src, dst)
}

fn finish_fd(src: &mut HelperVm, dst: &mut HelperVm, test: &str) {
    let info = src.wait(&["completed"], TIMEOUT);
    let dinfo = dst.wait(&["completed"], TIMEOUT);
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
    let normal = u64_at(&info, &["ram", "normal"]);
    assert_eq!(normal, nonzero_pages(&src.blocks[0].mem.map()), "{info}");
    assert_multifd_carried(&info, normal, &format!("{test} (source)"));
    assert_multifd_carried(&dinfo, normal, &format!("{test} (destination)"));
}

/// The source gets `fd:mig` and `mig-multifd-K`, sockets the parent connected to a
/// listening socket it gave the destination as `fd:lis`.
#[test]
fn helper_to_helper_multifd_fd_listener() {
    let test = "helper_to_helper_multifd_fd_listener";
    let (mut src, mut dst) = fd_pair(test, 2);
    let dir = TempDir::new("qmh-mfd");
    let path = dir.join("lis.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    dst.client.getfd("lis", listener.as_fd()).expect("getfd");
    drop(listener);
    dst.client
        .migrate_incoming("fd:lis")
        .expect("migrate-incoming");
    let names = ["mig", "mig-multifd-0", "mig-multifd-1"];
    for name in names {
        let s = UnixStream::connect(&path).expect("connect");
        src.client.getfd(name, s.as_fd()).expect("getfd");
    }
    src.client.migrate("fd:mig").expect("migrate");
    finish_fd(&mut src, &mut dst, test);
}

/// Both ends get connected fds: `fd:mig` and `mig-multifd-K`. The destination's names
/// are rotated against the source's: it must tell the channels apart by their initial
/// packets (as QEMU does), not by the fds' names.
#[test]
fn helper_to_helper_multifd_fd_socketpairs() {
    let test = "helper_to_helper_multifd_fd_socketpairs";
    let channels = 3u8;
    let (mut src, mut dst) = fd_pair(test, channels);
    pass_ends(&mut src.client, &mut dst.client, "mig", socketpair());
    let ends: Vec<_> = (0..channels).map(|_| socketpair()).collect();
    for (k, (a, b)) in ends.iter().enumerate() {
        src.client
            .getfd(&format!("mig-multifd-{k}"), a.as_fd())
            .expect("getfd");
        let j = (k + 1) % channels as usize;
        dst.client
            .getfd(&format!("mig-multifd-{j}"), b.as_fd())
            .expect("getfd");
    }
    drop(ends);
    dst.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    src.client.migrate("fd:mig").expect("migrate");
    finish_fd(&mut src, &mut dst, test);
}

// ---------------------------------------------------------------------------------------
// 4. Hostile multifd channels from a crafted source; a QEMU destination that dies
// ---------------------------------------------------------------------------------------

/// The crafted source's channels (the destination's `multifd-channels`).
const CRAFT_CHANNELS: u8 = 2;
/// What the destination's second block holds; nothing may ever touch it.
const OTHER_FILL: u8 = 0x3c;

fn init_packet(uuid: [u8; 16], id: u8) -> Vec<u8> {
    let mut b = Vec::new();
    encode_init(&mut b, &InitPacket { uuid, id });
    b
}

/// QEMU 9.0+'s page-less SYNC packet.
fn sync_packet(num: u64) -> Vec<u8> {
    let mut b = Vec::new();
    encode_packet_header(&mut b, &PacketHeader::sync(num)).expect("sync packet");
    b
}

/// Page data for `off`: the good stream's page there, or a pattern past the block.
fn page_at(off: u64) -> Vec<u8> {
    if off < BLOCK {
        page_content(off / PAGE_SIZE as u64)
    } else {
        vec![0x42; PAGE_SIZE]
    }
}

/// A packet of block `block`: the pages at `normal` with their data, and the zero pages at
/// `zero`.
fn data_packet(num: u64, block: &str, normal: &[u64], zero: &[u64]) -> Vec<u8> {
    let mut b = Vec::new();
    encode_packet_header(
        &mut b,
        &PacketHeader {
            flags: 0,
            pages_alloc: PAGES_PER_PACKET,
            normal_pages: normal.len() as u32,
            zero_pages: zero.len() as u32,
            next_packet_size: (normal.len() * PAGE_SIZE) as u32,
            packet_num: num,
            ramblock: block.into(),
            offsets: normal.iter().chain(zero).copied().collect(),
        },
    )
    .expect("data packet");
    for &off in normal {
        b.extend_from_slice(&page_at(off));
    }
    b
}

/// The main channel as QEMU 10.0 sends it with multifd: the RAM START's block list, a
/// MULTIFD_FLUSH (the channels' setup SYNC) before its EOS; an END whose only record is the
/// FLUSH of the last pass; EOF and the VM description. No page records.
fn main_stream() -> Vec<u8> {
    let mut b = head();
    encode_section_start(&mut b, SectionKind::Start, &ram_header(1, 4)).expect("start");
    // Its EOS goes after the FLUSH, as in QEMU's ram_save_setup.
    encode_block_entries(
        &mut b,
        &[BlockEntry {
            idstr: "ram".into(),
            used_length: BLOCK,
            page_size: None,
        }],
    )
    .expect("block list");
    put_be64(&mut b, flag::MULTIFD_FLUSH);
    encode_eos(&mut b);
    encode_footer(&mut b, 1);
    encode_section_part(&mut b, SectionKind::End, 1);
    put_be64(&mut b, flag::MULTIFD_FLUSH);
    encode_eos(&mut b);
    encode_footer(&mut b, 1);
    b.extend_from_slice(&tail());
    b
}

/// The pages channel `k` carries in the good stream: its half of the block, even pages as
/// normal pages, odd (zero) pages as zero offsets.
fn half(k: u8) -> (Vec<u64>, Vec<u64>) {
    let per = PAGES / CRAFT_CHANNELS as u64;
    let range = per * k as u64..per * (k as u64 + 1);
    let offs = |odd: u64| {
        range
            .clone()
            .filter(|i| i % 2 == odd)
            .map(|i| i * PAGE_SIZE as u64)
            .collect::<Vec<_>>()
    };
    (offs(0), offs(1))
}

/// Channel `k` up to and including its setup SYNC (packet numbers: setup SYNCs 0..N,
/// data N.., last SYNCs 2N..).
fn channel_start(k: u8) -> Vec<u8> {
    [init_packet([0; 16], k), sync_packet(k as u64)].concat()
}

/// Channel `k` of the good stream, whole.
fn good_channel(k: u8) -> Vec<u8> {
    let n = CRAFT_CHANNELS as u64;
    let (normal, zero) = half(k);
    [
        channel_start(k),
        data_packet(n + k as u64, "ram", &normal, &zero),
        sync_packet(2 * n + k as u64),
    ]
    .concat()
}

/// One connection of the crafted source: a thread writes its bytes (then shuts down its
/// writing side when asked: an EOF); `keep` lets the test cut it when done.
struct Conn {
    keep: UnixStream,
    writer: std::thread::JoinHandle<()>,
}

fn connect_and_send(path: &Path, bytes: Vec<u8>, eof: bool) -> Conn {
    let s = UnixStream::connect(path).expect("connect to the helper's listener");
    let keep = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let mut s = s;
        // The helper may stop reading at the first bad byte: EPIPE is fine.
        let _ = s.write_all(&bytes);
        if eof {
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    Conn { keep, writer }
}

fn cut(conns: Vec<Conn>) {
    for c in conns {
        let _ = c.keep.shutdown(Shutdown::Both);
        let _ = c.writer.join();
    }
}

/// A destination for the crafted source: block `ram` (preallocated with `GARBAGE`) and
/// block `other` that the stream never names, multifd with `CRAFT_CHANNELS` channels and
/// `precopy-timeout` 1 s so that whatever waits fails fast.
fn crafted_destination() -> HelperVm {
    let mut h = HelperVm::spawn();
    h.add_preallocated_block("ram", BLOCK, GARBAGE);
    h.add_preallocated_block("other", BLOCK, OTHER_FILL);
    enable_multifd(&mut h.client, CRAFT_CHANNELS);
    h.client
        .set_parameters(json!({"precopy-timeout": 1000}))
        .expect("precopy-timeout");
    h
}

/// Runs one crafted load on `h`: main then `channels` (bytes, EOF after them) connect to a
/// fresh unix: listener; returns the final query-migrate (`completed` or `failed`) and how
/// long it took.
fn crafted_load(h: &mut HelperVm, channels: Vec<(Vec<u8>, bool)>) -> (Value, Duration) {
    let dir = TempDir::new("qmh-mfd-craft");
    let path = dir.join("mig.sock");
    h.client
        .migrate_incoming(&format!("unix:{}", path.display()))
        .expect("migrate-incoming");
    let t0 = Instant::now();
    let mut conns = vec![connect_and_send(&path, main_stream(), true)];
    for (bytes, eof) in channels {
        conns.push(connect_and_send(&path, bytes, eof));
    }
    let v = h.wait(&["completed", "failed"], FAIL_TIMEOUT);
    let took = t0.elapsed();
    cut(conns);
    (v, took)
}

/// The good crafted load on `h`, checked: completed, `ram` equals the stream's image (its
/// zero pages written over the garbage), `other` untouched, packets counted.
fn good_crafted_load(h: &mut HelperVm, what: &str) {
    let channels = (0..CRAFT_CHANNELS)
        .map(|k| (good_channel(k), true))
        .collect();
    let (v, _) = crafted_load(h, channels);
    assert_eq!(v["status"], "completed", "{what}: {v}");
    assert_same_memory(&image(), &h.blocks[0].mem.map(), what);
    assert_other_untouched(h, what);
    assert_multifd_carried(&v, PAGES / 2, what);
}

fn assert_other_untouched(h: &HelperVm, what: &str) {
    let other = h.blocks[1].mem.map();
    assert!(
        other.iter().all(|&b| b == OTHER_FILL),
        "{what}: block `other`, never named by the stream, was written"
    );
}

/// The crafted source itself is right: a helper loads it (so the bad variants below fail
/// for their one defect).
#[test]
fn crafted_multifd_source_loads() {
    let mut h = crafted_destination();
    good_crafted_load(&mut h, "crafted_multifd_source_loads");
}

/// The crafted source is what QEMU 10.0 expects: a QEMU destination (one 1 MiB block
/// `ram`, fresh) loads it. A harness self-test: when this fails, the crafted source is wrong.
#[test]
fn crafted_multifd_source_loads_into_qemu10() {
    let test = "crafted_multifd_source_loads_into_qemu10";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let mut dst = QemuVm::start(Qemu::V10, BLOCK, &VmOpts::incoming());
    enable_multifd(dst.qmp(), CRAFT_CHANNELS);
    let dir = TempDir::new("qmh-mfd-craft");
    let path = dir.join("mig.sock");
    dst.qmp()
        .migrate_incoming(&format!("unix:{}", path.display()))
        .expect("migrate-incoming");
    let mut conns = vec![connect_and_send(&path, main_stream(), true)];
    for k in 0..CRAFT_CHANNELS {
        conns.push(connect_and_send(&path, good_channel(k), true));
    }
    let r = dst.wait_migration(&["completed"], FAIL_TIMEOUT);
    cut(conns);
    r.unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_same_memory(&image(), &dst.ram_mmap(), test);
}

/// One hostile variant of the crafted source.
struct Bad {
    what: &'static str,
    /// Each multifd connection's bytes and whether an EOF follows them.
    channels: Vec<(Vec<u8>, bool)>,
    /// Words the error-desc must contain (case-insensitive).
    keywords: Vec<String>,
    /// Whether block `ram` must be untouched too (no valid page was sent before the defect).
    ram_untouched: bool,
}

fn bad_variants() -> Vec<Bad> {
    let n = CRAFT_CHANNELS as u64;
    let kw = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut v = Vec::new();

    let mut init = init_packet([0; 16], 1);
    init[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    v.push(Bad {
        what: "wrong magic in the initial packet",
        channels: vec![
            (channel_start(0), false),
            ([init, sync_packet(1)].concat(), false),
        ],
        keywords: kw(&["magic"]),
        ram_untouched: true,
    });
    v.push(Bad {
        what: "wrong uuid in the initial packet",
        channels: vec![
            (channel_start(0), false),
            ([init_packet([0x11; 16], 1), sync_packet(1)].concat(), false),
        ],
        keywords: kw(&["uuid"]),
        ram_untouched: true,
    });
    v.push(Bad {
        what: "channel 1 never connects",
        channels: vec![(channel_start(0), false)],
        keywords: kw(&["channel"]),
        ram_untouched: true,
    });
    let bad_packet = |packet: Vec<u8>| {
        vec![
            ([channel_start(0), packet].concat(), false),
            (channel_start(1), false),
        ]
    };
    let page = PAGE_SIZE as u64;
    v.push(Bad {
        what: "a normal page at the block's length",
        channels: bad_packet(data_packet(n, "ram", &[0, page, BLOCK], &[])),
        keywords: kw(&["offset", "channel 0"]),
        ram_untouched: true,
    });
    v.push(Bad {
        what: "a zero page past the block",
        channels: bad_packet(data_packet(n, "ram", &[0], &[page, BLOCK + 7 * page])),
        keywords: kw(&["offset", "channel 0"]),
        ram_untouched: true,
    });
    v.push(Bad {
        what: "a normal page at offset 2^64 - 4096",
        channels: bad_packet(data_packet(n, "ram", &[!(page - 1)], &[])),
        keywords: kw(&["offset", "channel 0"]),
        ram_untouched: true,
    });
    v.push(Bad {
        what: "a packet naming an unknown block",
        channels: bad_packet(data_packet(n, "nope", &[0], &[page])),
        keywords: kw(&["nope", "channel 0"]),
        ram_untouched: true,
    });
    // Header fields the encoder would refuse, patched in: (what, byte offset, bytes).
    let good = data_packet(n, "ram", &[0], &[page]);
    let patched = |at: usize, bytes: &[u8]| {
        let mut p = good.clone();
        p[at..at + bytes.len()].copy_from_slice(bytes);
        p
    };
    for (what, at, bytes, word) in [
        (
            "a packet with a wrong magic",
            0,
            &0x5a5a_5a5a_u32.to_be_bytes()[..],
            "magic",
        ),
        (
            "a packet asking for zstd",
            8,
            &(2u32 << 1).to_be_bytes()[..],
            "compression",
        ),
        (
            "a packet with room for 200 pages",
            12,
            &200u32.to_be_bytes()[..],
            "200",
        ),
        (
            "a packet with a misaligned offset",
            320,
            &0x1001u64.to_be_bytes()[..],
            "offset",
        ),
        ("a block name without its NUL", 64, &[b'r'; 256][..], "nul"),
    ] {
        v.push(Bad {
            what,
            channels: bad_packet(patched(at, bytes)),
            keywords: kw(&[word, "channel 0"]),
            ram_untouched: true,
        });
    }
    v.push(Bad {
        what: "two channels with id 0",
        channels: vec![(channel_start(0), false), (channel_start(0), false)],
        keywords: kw(&["id", "0"]),
        ram_untouched: true,
    });
    v.push(Bad {
        what: "a channel with id 7 of 2",
        channels: vec![(channel_start(0), false), (channel_start(7), false)],
        keywords: kw(&["7"]),
        ram_untouched: true,
    });
    v.push(Bad {
        what: "a second main channel",
        channels: vec![(channel_start(0), false), (main_stream(), false)],
        keywords: kw(&["main"]),
        ram_untouched: true,
    });
    v.push(Bad {
        what: "a connection that closes before 4 bytes",
        channels: vec![(channel_start(0), false), (vec![0x11, 0x22], true)],
        keywords: kw(&["closed"]),
        ram_untouched: true,
    });
    // Channel 1 ends cleanly at a packet boundary, but before the SYNC that the END's
    // MULTIFD_FLUSH waits for.
    v.push(Bad {
        what: "channel 1 closes before its last SYNC",
        channels: vec![(good_channel(0), false), (channel_start(1), true)],
        keywords: kw(&["channel 1"]),
        ram_untouched: false,
    });
    // Channel 1 stalls after a page and a half of a packet's data, its connection open:
    // whatever waits for it gives up after precopy-timeout (1 s here).
    let (normal, zero) = half(1);
    let mut stalled = data_packet(n + 1, "ram", &normal, &zero);
    stalled.truncate(stalled.len() - (normal.len() * PAGE_SIZE) + PAGE_SIZE * 3 / 2);
    v.push(Bad {
        what: "channel 1 stalls mid-packet",
        channels: vec![
            (good_channel(0), false),
            ([channel_start(1), stalled].concat(), false),
        ],
        keywords: kw(&["precopy-timeout"]),
        ram_untouched: false,
    });
    // Channel 1 dies after its header and a page and a half of its packet's data.
    let (normal, zero) = half(1);
    let mut packet = data_packet(n + 1, "ram", &normal, &zero);
    packet.truncate(packet.len() - (normal.len() * PAGE_SIZE) + PAGE_SIZE * 3 / 2);
    v.push(Bad {
        what: "channel 1 dies mid-packet",
        channels: vec![
            (channel_start(0), false),
            ([channel_start(1), packet].concat(), true),
        ],
        keywords: kw(&["channel 1"]),
        ram_untouched: false,
    });
    v
}

/// Each hostile variant against a fresh helper: `failed` within the deadline with an
/// error-desc naming the cause; block `other` (and `ram` where nothing valid came first)
/// untouched; the control channel answers; then the same helper loads the good stream.
#[test]
fn crafted_multifd_bad_channels() {
    let test = "crafted_multifd_bad_channels";
    let mut problems = Vec::new();
    for bad in bad_variants() {
        let mut h = crafted_destination();
        let (v, took) = crafted_load(&mut h, bad.channels);
        let desc = v["error-desc"].as_str().unwrap_or_default().to_string();
        eprintln!(
            "{test}: {}: {} after {took:?}: {desc}",
            bad.what, v["status"]
        );
        if v["status"] != "failed" {
            problems.push(format!(
                "{}: status {}, not failed: {v}",
                bad.what, v["status"]
            ));
            continue;
        }
        let lower = desc.to_lowercase();
        let missing: Vec<&String> = bad
            .keywords
            .iter()
            .filter(|k| !lower.contains(&k.to_lowercase()))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "{}: error-desc {desc:?} does not name {missing:?}",
                bad.what
            ));
        }
        if took > Duration::from_secs(10) {
            problems.push(format!("{}: failed only after {took:?}", bad.what));
        }
        assert_other_untouched(&h, bad.what);
        if bad.ram_untouched {
            let ram = h.blocks[0].mem.map();
            if let Some(p) = ram
                .chunks(PAGE_SIZE)
                .position(|pg| pg.iter().any(|&b| b != GARBAGE))
            {
                problems.push(format!(
                    "{}: block `ram` page {p} was written though no valid page was sent",
                    bad.what
                ));
            }
        }
        match h.client.query_migrate() {
            Ok(q) if q["status"] == "failed" => {}
            other => problems.push(format!("{}: query-migrate afterwards: {other:?}", bad.what)),
        }
        good_crafted_load(&mut h, &format!("{test}: good load after {}", bad.what));
    }
    assert!(
        problems.is_empty(),
        "{test}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// A QEMU 10.0 destination SIGKILLed while multifd pages flow: the helper source fails
/// within the deadline with an error-desc, keeps answering, the parent's memory is what it
/// was, and it then migrates to another destination.
#[test]
fn qemu10_destination_killed_mid_multifd() {
    let test = "qemu10_destination_killed_mid_multifd";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.2);
    let before = src.blocks[0].mem.map().to_vec();
    let mut dst = QemuVm::start(Qemu::V10, RAM, &VmOpts::incoming());
    enable_multifd(&mut src.client, 2);
    enable_multifd(dst.qmp(), 2);
    // Throttled so that the kill lands mid-pass; pause-before-switchover keeps it from
    // completing if the throttle did not hold.
    src.client
        .set_parameters(json!({"max-bandwidth": 16 * MIB}))
        .expect("params");
    src.client
        .set_capabilities(&[("pause-before-switchover", true)])
        .expect("caps");
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "mig.sock");
    dst.qmp().migrate_incoming(&uri).expect("migrate-incoming");
    src.client.migrate(&uri).expect("migrate");
    let t0 = Instant::now();
    let at_kill = loop {
        let v = src.client.query_migrate().expect("query-migrate");
        let status = v["status"].as_str().unwrap_or_default().to_string();
        let bytes = v["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
        if bytes >= 4 * MIB || ["pre-switchover", "completed", "failed"].contains(&&*status) {
            break v;
        }
        assert!(
            t0.elapsed() < TIMEOUT,
            "{test}: no multifd traffic after {TIMEOUT:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("{test}: killing QEMU with the source at {}", at_kill);
    assert_eq!(
        at_kill["status"], "active",
        "{test}: the source is not mid-migration (max-bandwidth not honoured?)"
    );
    dst.kill();
    let t1 = Instant::now();
    let v = src.wait(&["failed", "completed", "pre-switchover"], FAIL_TIMEOUT);
    let v = if v["status"] == "pre-switchover" {
        // Nothing to write until the switchover: it notices the dead peer now.
        src.client.migrate_continue().expect("migrate-continue");
        src.wait(&["failed", "completed"], FAIL_TIMEOUT)
    } else {
        v
    };
    eprintln!("{test}: source after {:?}: {v}", t1.elapsed());
    assert_eq!(v["status"], "failed", "{test}: {v}");
    assert!(
        v["error-desc"].as_str().is_some_and(|d| !d.is_empty()),
        "{test}: no error-desc: {v}"
    );
    assert!(src.alive(), "{test}: the source helper died");
    assert_eq!(
        src.client.query_migrate().expect("query-migrate")["status"],
        "failed"
    );
    assert_same_memory(&before, &src.blocks[0].mem.map(), test);

    // Nothing of the failed attempt is left in the way: it migrates to a helper.
    let mut dst2 = HelperVm::spawn();
    dst2.add_block("ram", RAM, false);
    enable_multifd(&mut dst2.client, 2);
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    src.client
        .set_capabilities(&[("pause-before-switchover", false)])
        .expect("caps");
    let uri2 = unix_uri(&dir, "mig2.sock");
    dst2.client
        .migrate_incoming(&uri2)
        .expect("migrate-incoming");
    src.client.migrate(&uri2).expect("migrate again");
    let info = src.wait(&["completed"], TIMEOUT);
    let dinfo = dst2.wait(&["completed"], TIMEOUT);
    assert_same_memory(&src.blocks[0].mem.map(), &dst2.blocks[0].mem.map(), test);
    let normal = u64_at(&info, &["ram", "normal"]);
    assert_multifd_carried(&info, normal, test);
    assert_multifd_carried(&dinfo, normal, test);
}

// ---------------------------------------------------------------------------------------
// 5. Capability and parameter surface
// ---------------------------------------------------------------------------------------

fn cap_state(h: &mut HelperVm, name: &str) -> Option<bool> {
    let caps = h
        .client
        .query_capabilities()
        .expect("query-migrate-capabilities");
    caps.as_array()
        .expect("capabilities array")
        .iter()
        .find(|c| c["capability"] == name)
        .and_then(|c| c["state"].as_bool())
}

fn refused(r: Result<(), qemu_migration_helper::client::ClientError>, what: &str) -> String {
    match r {
        Ok(()) => panic!("{what}: accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn multifd_capability_and_parameters() {
    let test = "multifd_capability_and_parameters";
    let mut h = HelperVm::spawn_with_args(&["--log-level", "warn"]);
    assert_eq!(cap_state(&mut h, "multifd"), Some(false), "{test}");
    let p = h.client.query_parameters().expect("params");
    assert_eq!(p["multifd-channels"], 2, "{test}: {p}");
    assert_eq!(p["multifd-compression"], "none", "{test}: {p}");
    assert_eq!(p["zero-page-detection"], "multifd", "{test}: {p}");
    assert_eq!(p["vm-uuid"], ZERO_UUID, "{test}: {p}");
    assert_eq!(p["compat-version"], "10.0", "{test}: {p}");
    // The default detection follows compat-version (QEMU 8.2 and older: legacy).
    h.client
        .set_parameters(json!({"compat-version": "7.2"}))
        .expect("compat-version");
    let p = h.client.query_parameters().expect("params");
    assert_eq!(p["zero-page-detection"], "legacy", "{test}: {p}");
    h.client
        .set_parameters(json!({"compat-version": "10.0"}))
        .expect("compat-version");

    // Accepted values read back.
    for z in ["none", "legacy", "multifd"] {
        h.client
            .set_parameters(json!({ "zero-page-detection": z }))
            .expect("zero-page-detection");
        assert_eq!(
            h.client.query_parameters().expect("params")["zero-page-detection"],
            z
        );
    }
    for n in [1u64, 255, 4] {
        h.client
            .set_parameters(json!({ "multifd-channels": n }))
            .expect("multifd-channels");
        assert_eq!(
            h.client.query_parameters().expect("params")["multifd-channels"],
            n
        );
    }
    h.client
        .set_parameters(json!({"multifd-compression": "none", "vm-uuid": UUID}))
        .expect("compression none, vm-uuid");
    assert_eq!(
        h.client.query_parameters().expect("params")["vm-uuid"],
        UUID
    );

    // Refusals leave every value as it was.
    let before = h.client.query_parameters().expect("params");
    for args in [
        json!({"multifd-channels": 0}),
        json!({"multifd-channels": 256}),
        json!({"multifd-channels": -1}),
        json!({"multifd-compression": "zstd"}),
        json!({"multifd-compression": "zlib"}),
        json!({"zero-page-detection": "bogus"}),
        json!({"vm-uuid": "not-a-uuid"}),
        json!({"vm-uuid": "6f1c2a9e-3b4d-4e5f-8a7b-0c1d2e3f4a5"}),
        json!({"vm-uuid": "6f1c2a9e3b4d4e5f8a7b0c1d2e3f4a5b00"}),
        json!({"vm-uuid": "6f1c2a9e-3b4d-4e5f-8a7b-0c1d2e3f4a5g"}),
    ] {
        let e = refused(h.client.set_parameters(args.clone()), &args.to_string());
        eprintln!("{test}: {args}: {e}");
        assert_eq!(
            h.client.query_parameters().expect("params"),
            before,
            "{test}: {args} changed the parameters"
        );
    }

    // multifd + postcopy-ram: refused as QEMU 10.0 does, in either order or at once, and
    // under compat-version 7.2 too.
    for compat in ["10.0", "7.2"] {
        let mut h = HelperVm::spawn_with_args(&["--log-level", "warn"]);
        h.client
            .set_parameters(json!({ "compat-version": compat }))
            .expect("compat-version");
        h.client
            .set_capabilities(&[("multifd", true)])
            .expect("multifd alone");
        let e = refused(
            h.client.set_capabilities(&[("postcopy-ram", true)]),
            "postcopy-ram after multifd",
        );
        assert!(
            e.to_lowercase().contains("compatible with multifd"),
            "{test} ({compat}): {e}"
        );
        assert_eq!(cap_state(&mut h, "postcopy-ram"), Some(false));
        h.client
            .set_capabilities(&[("multifd", false), ("postcopy-ram", true)])
            .expect("postcopy-ram alone");
        let e = refused(
            h.client.set_capabilities(&[("multifd", true)]),
            "multifd after postcopy-ram",
        );
        assert!(
            e.to_lowercase().contains("compatible with multifd"),
            "{test} ({compat}): {e}"
        );
        assert_eq!(cap_state(&mut h, "multifd"), Some(false));
        h.client
            .set_capabilities(&[("postcopy-ram", false)])
            .expect("postcopy-ram off");
        refused(
            h.client
                .set_capabilities(&[("multifd", true), ("postcopy-ram", true)]),
            "both at once",
        );
        assert_eq!(cap_state(&mut h, "multifd"), Some(false));
        assert_eq!(cap_state(&mut h, "postcopy-ram"), Some(false));
    }
}

fn refused_start(
    h: &mut HelperVm,
    r: Result<(), qemu_migration_helper::client::ClientError>,
    what: &str,
    keyword: &str,
) {
    let e = refused(r, what);
    assert!(e.contains(keyword), "{what}: {e}");
    assert_eq!(
        h.client.query_migrate().expect("query-migrate")["status"],
        "none",
        "{what}: a refused start left a migration behind"
    );
}

/// What is only checked when a migration starts: `multifd` zero-page detection towards a
/// peer older than 9.0 (it would ignore the listed zero pages), the `fd:` source's missing
/// channel fds, and multifd with postcopy-ram after compat-version went back to 10.0.
#[test]
fn multifd_start_refusals() {
    let test = "multifd_start_refusals";
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "nobody.sock");

    let mut h = HelperVm::spawn_with_args(&["--log-level", "warn"]);
    h.add_block("ram", MIB, false);
    enable_multifd(&mut h.client, 2);
    h.client
        .set_parameters(json!({"compat-version": "7.2", "zero-page-detection": "multifd"}))
        .expect("settable; checked at the start");
    let r = h.client.migrate(&uri);
    refused_start(
        &mut h,
        r,
        &format!("{test}: migrate, 7.2"),
        "zero-page-detection",
    );
    let r = h.client.migrate_incoming(&uri);
    refused_start(
        &mut h,
        r,
        &format!("{test}: migrate-incoming, 7.2"),
        "zero-page-detection",
    );

    // fd: with one of the two channel fds missing.
    h.client
        .set_parameters(json!({"compat-version": "10.0"}))
        .expect("compat-version");
    let (a, _b) = socketpair();
    let (c, _d) = socketpair();
    h.client.getfd("mig", a.as_fd()).expect("getfd");
    h.client.getfd("mig-multifd-0", c.as_fd()).expect("getfd");
    let r = h.client.migrate("fd:mig");
    refused_start(&mut h, r, &format!("{test}: fd: source"), "mig-multifd-1");

    // Allowed together with compat-version 10.1, refused again at the start under 10.0.
    let mut h = HelperVm::spawn_with_args(&["--log-level", "warn"]);
    h.add_block("ram", MIB, false);
    h.client
        .set_parameters(json!({"compat-version": "10.1"}))
        .expect("compat-version 10.1");
    h.client
        .set_capabilities(&[("multifd", true), ("postcopy-ram", true)])
        .expect("multifd with postcopy-ram under 10.1");
    h.client
        .set_parameters(json!({"compat-version": "10.0"}))
        .expect("compat-version");
    let r = h.client.migrate(&uri);
    refused_start(
        &mut h,
        r,
        &format!("{test}: multifd + postcopy-ram, back to 10.0"),
        "not yet compatible with multifd",
    );
}

/// Threads of process `pid` (its /proc tasks).
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits up to 5 s for `pid` to be back at `baseline` threads or fewer; the count then.
fn settle_threads(pid: u32, baseline: usize) -> usize {
    let t0 = Instant::now();
    loop {
        let n = threads(pid);
        if n <= baseline || t0.elapsed() > Duration::from_secs(5) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `migrate_cancel` mid-transfer, first on the source and then on the destination: the
/// cancelled end reaches `cancelled` within 2 s, the other fails, both are back at the
/// threads they had before (every sender and receiver joined), and a third migration
/// between the same two helpers completes.
#[test]
fn multifd_cancel_then_retry() {
    let test = "multifd_cancel_then_retry";
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    let mut dst = HelperVm::spawn();
    dst.add_block("ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.3);
    enable_multifd(&mut src.client, 4);
    enable_multifd(&mut dst.client, 4);
    let dir = TempDir::new("qmh-mfd");
    let base = (threads(src.pid()), threads(dst.pid()));
    for (round, cancel_source) in [(0, true), (1, false)] {
        src.client
            .set_parameters(json!({"max-bandwidth": 16 * MIB}))
            .expect("params");
        let uri = unix_uri(&dir, &format!("mig{round}.sock"));
        dst.client.migrate_incoming(&uri).expect("migrate-incoming");
        src.client.migrate(&uri).expect("migrate");
        let t0 = Instant::now();
        loop {
            let v = src.client.query_migrate().expect("query-migrate");
            if v["ram"]["multifd-bytes"].as_u64().unwrap_or(0) >= 2 * MIB {
                assert_eq!(v["status"], "active", "{test}: {v}");
                break;
            }
            assert!(t0.elapsed() < TIMEOUT, "{test}: no multifd traffic: {v}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (cancelled, other) = if cancel_source {
            (&mut src, &mut dst)
        } else {
            (&mut dst, &mut src)
        };
        let t1 = Instant::now();
        cancelled.client.migrate_cancel().expect("migrate_cancel");
        let v = cancelled.wait(&["cancelled", "failed"], FAIL_TIMEOUT);
        let took = t1.elapsed();
        let o = other.wait(&["failed", "cancelled", "completed"], FAIL_TIMEOUT);
        eprintln!(
            "{test}: round {round}: {} after {took:?}; the other end {}: {}",
            v["status"], o["status"], o["error-desc"]
        );
        assert_eq!(v["status"], "cancelled", "{test}: round {round}: {v}");
        assert!(
            took < Duration::from_secs(2),
            "{test}: cancel took {took:?}"
        );
        assert_eq!(o["status"], "failed", "{test}: round {round}: {o}");
        let now = (
            settle_threads(src.pid(), base.0),
            settle_threads(dst.pid(), base.1),
        );
        assert!(
            now.0 <= base.0 && now.1 <= base.1,
            "{test}: round {round}: threads (source, destination) {now:?}, before {base:?}"
        );
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let uri = unix_uri(&dir, "mig-last.sock");
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    src.client.migrate(&uri).expect("migrate");
    let info = src.wait(&["completed"], TIMEOUT);
    let dinfo = dst.wait(&["completed"], TIMEOUT);
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
    let normal = u64_at(&info, &["ram", "normal"]);
    assert_multifd_carried(&info, normal, test);
    assert_multifd_carried(&dinfo, normal, test);
}

/// Several odd-sized blocks (sizes not a multiple of a packet's 128 pages, names with `/`,
/// `:` and `@`, one of 255 bytes: the longest a packet's `ramblock` field holds) over 3
/// channels into a garbage-filled destination: packets never mix blocks, the last partial
/// packet of each block arrives, and every block ends equal to the source's.
#[test]
fn helper_to_helper_multifd_odd_blocks() {
    let test = "helper_to_helper_multifd_odd_blocks";
    let long = "L".repeat(255);
    let mut blocks: Vec<(&str, u64)> = crate::helper_helper::ODD_BLOCKS.to_vec();
    blocks.push((&long, 516 * 1024));
    let mut src = HelperVm::spawn();
    let mut dst = HelperVm::spawn();
    for (i, (id, size)) in blocks.iter().enumerate() {
        // A memfd's own name is shorter than a block's may be.
        src.add_memfd_block(id, Memfd::new("src", *size), false);
        let mem = Memfd::new("dst", *size);
        mem.map().fill(GARBAGE);
        dst.add_memfd_block(id, mem, false);
        fill_mixed(
            &mut src.blocks[i].mem.map(),
            test_seed(test) + i as u64,
            0.4,
        );
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    enable_multifd(&mut src.client, 3);
    enable_multifd(&mut dst.client, 3);
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "mig.sock");
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    src.client.migrate(&uri).expect("migrate");
    let info = src.wait(&["completed"], TIMEOUT);
    let dinfo = dst.wait(&["completed"], TIMEOUT);
    for (s, d) in src.blocks.iter().zip(&dst.blocks) {
        assert_same_memory(
            &s.mem.map(),
            &d.mem.map(),
            &format!("{test}: block {}", s.id),
        );
    }
    let normal = u64_at(&info, &["ram", "normal"]);
    let expected: u64 = src.blocks.iter().map(|b| nonzero_pages(&b.mem.map())).sum();
    assert_eq!(normal, expected, "{test}: {info}");
    assert_multifd_carried(&info, normal, test);
    assert_multifd_carried(&dinfo, normal, test);
}

/// Ends that disagree on `multifd-channels`, either way: never a `completed` destination
/// (its memory is compared if it claims so), and with the return path the source fails
/// too (without it a source that wrote everything may report `completed`, as QEMU's does).
#[test]
fn multifd_channel_count_mismatch() {
    let test = "multifd_channel_count_mismatch";
    for (size, src_n, dst_n) in [(MIB, 4u8, 2u8), (16 * MIB, 4, 2), (MIB, 2, 4)] {
        let what = format!(
            "{test}: {} KiB, source {src_n}, destination {dst_n}",
            size >> 10
        );
        let mut src = HelperVm::spawn_with_args(&["--log-level", "warn"]);
        src.add_block("ram", size, false);
        let mut dst = HelperVm::spawn_with_args(&["--log-level", "warn"]);
        dst.add_block("ram", size, false);
        fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.3);
        enable_multifd(&mut src.client, src_n);
        enable_multifd(&mut dst.client, dst_n);
        for h in [&mut src, &mut dst] {
            h.client
                .set_parameters(json!({"precopy-timeout": 2000, "max-bandwidth": 0}))
                .expect("params");
            h.client
                .set_capabilities(&[("return-path", true)])
                .expect("return-path");
        }
        let dir = TempDir::new("qmh-mfd");
        let uri = unix_uri(&dir, "mig.sock");
        dst.client.migrate_incoming(&uri).expect("migrate-incoming");
        src.client.migrate(&uri).expect("migrate");
        let s = src.wait(&["completed", "failed"], FAIL_TIMEOUT);
        let d = dst.wait(&["completed", "failed"], FAIL_TIMEOUT);
        eprintln!(
            "{what}: source {} ({}), destination {} ({})",
            s["status"], s["error-desc"], d["status"], d["error-desc"]
        );
        if d["status"] == "completed" {
            assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), &what);
        }
        assert_eq!(d["status"], "failed", "{what}: {d}");
        assert_eq!(s["status"], "failed", "{what}: {s}");
        assert!(src.alive() && dst.alive(), "{what}: a helper died");
    }
}

/// A sparse guest (one page in 1024 written) over multifd with each zero-page detection
/// into a fresh destination, as `helper_helper::sparse_guest_stays_sparse` without multifd:
/// the source allocates nothing for its holes, and the destination, where the zero pages
/// are holes already, about what the source holds. With `none` every page arrives as data
/// and is written, as QEMU does: then the destination's allocation is not checked.
#[test]
fn multifd_sparse_guest_stays_sparse() {
    use std::os::unix::fs::MetadataExt;
    let test = "multifd_sparse_guest_stays_sparse";
    let size = 64 * MIB;
    let allocated =
        |mem: &Memfd| -> u64 { std::fs::metadata(mem.path()).expect("fstat").blocks() * 512 };
    for zpd in ["multifd", "legacy", "none"] {
        let what = format!("{test} ({zpd})");
        let mut src = HelperVm::spawn_with_args(&["--log-level", "warn"]);
        src.add_block("ram", size, false);
        {
            let mut m = src.blocks[0].mem.map();
            for p in (0..size as usize / PAGE_SIZE).step_by(1024) {
                m[p * PAGE_SIZE] = (p % 251) as u8 + 1;
            }
        }
        let before = allocated(&src.blocks[0].mem);
        let mut dst = HelperVm::spawn_with_args(&["--log-level", "warn"]);
        dst.add_block("ram", size, false);
        enable_multifd(&mut src.client, 2);
        enable_multifd(&mut dst.client, 2);
        src.client
            .set_parameters(json!({"max-bandwidth": 0, "zero-page-detection": zpd}))
            .expect("params");
        let dir = TempDir::new("qmh-mfd");
        let uri = unix_uri(&dir, "mig.sock");
        dst.client.migrate_incoming(&uri).expect("migrate-incoming");
        src.client.migrate(&uri).expect("migrate");
        let info = src.wait(&["completed"], TIMEOUT);
        dst.wait(&["completed"], TIMEOUT);
        // Before reading them: a read through a mapping allocates a memfd's holes.
        let (s_after, d_after) = (allocated(&src.blocks[0].mem), allocated(&dst.blocks[0].mem));
        assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), &what);
        eprintln!(
            "{what}: source held {before} bytes, now {s_after}; destination {d_after}; {}",
            info["ram"]
        );
        assert_eq!(
            s_after, before,
            "{what}: the source allocated memory for holes"
        );
        if zpd != "none" {
            assert!(
                d_after <= 2 * before,
                "{what}: destination allocated {d_after} bytes for {before} of data"
            );
        }
        let normal = u64_at(&info, &["ram", "normal"]);
        assert_multifd_carried(&info, normal, &what);
    }
}

/// A 5 GiB sparse guest: pages above 4 GiB (offsets that do not fit 32 bits) and, at their
/// offsets modulo 4 GiB, other pages. Each arrives at its own offset (compared with pread,
/// which reads a hole as zeros without allocating it) and the destination allocates no more
/// than the source holds.
#[test]
fn multifd_offsets_above_4g() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let test = "multifd_offsets_above_4g";
    let size = 5 * GIB;
    let mut src = HelperVm::spawn();
    src.add_block("ram", size, false);
    let mut dst = HelperVm::spawn();
    dst.add_block("ram", size, false);
    let file = |m: &Memfd| std::fs::File::from(m.fd.try_clone().expect("dup"));
    let sfile = file(&src.blocks[0].mem);
    let mut offsets = Vec::new();
    for k in 0..64u64 {
        for base in [4 * GIB, 0] {
            let off = base + k * 16 * MIB + k * PAGE_SIZE as u64;
            let page = vec![(k as u8) ^ (base >> 32) as u8 ^ 0x5a; PAGE_SIZE];
            sfile.write_all_at(&page, off).expect("write page");
            offsets.push(off);
        }
    }
    let allocated = |m: &Memfd| std::fs::metadata(m.path()).expect("fstat").blocks() * 512;
    let before = allocated(&src.blocks[0].mem);
    enable_multifd(&mut src.client, 2);
    enable_multifd(&mut dst.client, 2);
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "mig.sock");
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    let t0 = Instant::now();
    src.client.migrate(&uri).expect("migrate");
    let info = src.wait(&["completed"], TIMEOUT);
    let dinfo = dst.wait(&["completed"], TIMEOUT);
    let d_alloc = allocated(&dst.blocks[0].mem);
    eprintln!(
        "{test}: {:?}; source holds {before} bytes, destination {d_alloc}; {}",
        t0.elapsed(),
        info["ram"]
    );
    let dfile = file(&dst.blocks[0].mem);
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for &off in &offsets {
        sfile.read_exact_at(&mut a, off).expect("read source");
        dfile.read_exact_at(&mut b, off).expect("read destination");
        assert!(a == b, "{test}: page at {off:#x} differs");
    }
    assert!(
        d_alloc <= 2 * before,
        "{test}: destination allocated {d_alloc} bytes for {before} of data"
    );
    assert_eq!(
        u64_at(&info, &["ram", "normal"]),
        offsets.len() as u64,
        "{info}"
    );
    assert_multifd_carried(&info, offsets.len() as u64, test);
    assert_multifd_carried(&dinfo, offsets.len() as u64, test);
}

/// A helper source whose `vm-uuid` is not the QEMU destination's `-uuid`: QEMU refuses
/// the channels (and exits, as a failed incoming QEMU does); the helper fails within the
/// deadline with an error-desc, keeps answering, and its guest is unchanged.
#[test]
fn helper_to_qemu10_wrong_uuid_fails() {
    let test = "helper_to_qemu10_wrong_uuid_fails";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let mut src = HelperVm::spawn();
    src.add_block("ram", FD_RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.5);
    let before = src.blocks[0].mem.map().to_vec();
    let mut dst = QemuVm::start(Qemu::V10, FD_RAM, &VmOpts::incoming());
    src.client
        .set_parameters(json!({"vm-uuid": UUID, "max-bandwidth": 0}))
        .expect("params");
    enable_multifd(&mut src.client, 2);
    enable_multifd(dst.qmp(), 2);
    let dir = TempDir::new("qmh-mfd");
    let uri = unix_uri(&dir, "mig.sock");
    dst.qmp().migrate_incoming(&uri).expect("migrate-incoming");
    src.client.migrate(&uri).expect("migrate");
    let v = src.wait(&["failed", "completed"], FAIL_TIMEOUT);
    eprintln!("{test}: source {}: {}", v["status"], v["error-desc"]);
    eprintln!("{test}: QEMU said:\n{}", dst.stderr_tail(5));
    assert_eq!(v["status"], "failed", "{test}: {v}");
    assert!(
        v["error-desc"].as_str().is_some_and(|d| !d.is_empty()),
        "{test}: {v}"
    );
    assert!(
        dst.stderr_tail(20).contains("uuid"),
        "{test}: QEMU did not refuse for the uuid:\n{}",
        dst.stderr_tail(20)
    );
    assert!(src.alive(), "{test}: the helper died");
    assert_same_memory(&before, &src.blocks[0].mem.map(), test);
}
