//! Helper to helper: two `qemu-migration-helper` processes (each driven through the client
//! API with memfd guest RAM) migrating to each other over every URI kind; block mismatches,
//! cancel and retry, a live source with a dirty bitmap and `pause-before-switchover`, and
//! device state carried byte-exactly through a chain QEMU -> helper -> helper -> QEMU.

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use qemu_migration_helper::client::{Event, RamBlockSpec};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

use support::helper::{Block, HelperVm, Memfd};
use support::migrate::{pass_socketpair, socketpair};
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::util::{
    assert_same_memory, fill_mixed, test_seed, u64_at, TempDir, KIB, MIB, PAGE_SIZE,
};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(120);
/// How long a helper may take to notice that its peer went away or failed.
const FAIL_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// A helper with the `events` capability on (QEMU sends `MIGRATION` and
/// `MIGRATION_PASS` only with it, and these tests check the events).
pub(crate) fn spawn_helper() -> HelperVm {
    let mut vm = HelperVm::spawn();
    vm.client
        .set_capabilities(&[("events", true)])
        .expect("events capability");
    vm
}

/// A helper with the given blocks (fresh memfds, no dirty bitmaps).
pub(crate) fn spawn_with(blocks: &[(&str, u64)]) -> HelperVm {
    let mut vm = spawn_helper();
    for (id, size) in blocks {
        vm.add_block(id, *size, false);
    }
    vm
}

/// Registers `mem` (the test's own memfd, shared with another helper) as block `id`.
fn add_shared_block(vm: &mut HelperVm, id: &str, mem: &Memfd) -> usize {
    let fdname = format!("shared-{}", vm.blocks.len());
    vm.client
        .getfd(&fdname, mem.fd.as_fd())
        .expect("getfd shared memfd");
    vm.client
        .ram_block_add(&RamBlockSpec {
            id: id.into(),
            fdname,
            offset: 0,
            size: mem.size,
            ..Default::default()
        })
        .expect("ram-block-add (shared memfd)");
    vm.blocks.push(Block {
        id: id.into(),
        mem: Memfd {
            fd: mem.fd.try_clone().expect("dup memfd"),
            size: mem.size,
        },
        bitmap: None,
    });
    vm.blocks.len() - 1
}

/// A fresh socketpair, one end passed to each helper as `name`.
pub(crate) fn connect_fd(src: &mut HelperVm, dst: &mut HelperVm, name: &str) {
    let (a, b) = socketpair();
    src.client.getfd(name, a.as_fd()).expect("source getfd");
    dst.client
        .getfd(name, b.as_fd())
        .expect("destination getfd");
}

/// Fills every block of `vm` with mixed zero/random pages; returns the zero pages.
fn fill_all(vm: &HelperVm, seed: u64, zero_fraction: f64) -> u64 {
    vm.blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            fill_mixed(&mut b.mem.map(), seed.wrapping_add(i as u64), zero_fraction) as u64
        })
        .sum()
}

fn total_pages(vm: &HelperVm) -> u64 {
    vm.blocks.iter().map(Block::pages).sum()
}

/// Compares every block of `a` with the block of the same id in `b`.
fn assert_same_blocks(a: &HelperVm, b: &HelperVm, what: &str) {
    assert_eq!(a.blocks.len(), b.blocks.len(), "{what}: block counts");
    for x in &a.blocks {
        let y = b
            .blocks
            .iter()
            .find(|y| y.id == x.id)
            .unwrap_or_else(|| panic!("{what}: no block {:?} on the second helper", x.id));
        assert_same_memory(
            &x.mem.map(),
            &y.mem.map(),
            &format!("{what}, block {}", x.id),
        );
    }
}

fn status_of(vm: &mut HelperVm) -> Value {
    vm.client
        .query_migrate()
        .unwrap_or_else(|e| panic!("helper pid {} does not answer query-migrate: {e}", vm.pid()))
}

/// Waits (50 steps of `step` at most) until the counter at `path` in `vm`'s query-migrate
/// stops moving, at `min` or more: its migration is stuck on a stalled peer.
fn wait_until_still(vm: &mut HelperVm, path: &[&str], step: Duration, min: u64) {
    let mut last = 0;
    for _ in 0..50 {
        std::thread::sleep(step);
        let n = u64_at(&status_of(vm), path);
        if n == last && n >= min {
            break;
        }
        last = n;
    }
}

/// `query-migrate` on a helper whose migration is stuck: it answers within 1 s (the
/// command timeout is 2 s until `cancel_at_once` puts it back).
fn query_at_once(vm: &mut HelperVm) -> Value {
    vm.client
        .set_timeout(Duration::from_secs(2))
        .expect("timeout");
    let t = Instant::now();
    let v = status_of(vm);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "query-migrate took {:?}",
        t.elapsed()
    );
    v
}

/// `migrate_cancel` on a stuck migration reaches one of `wanted` within 2 s; returns that
/// query-migrate. Puts the command timeout back to 30 s.
fn cancel_at_once(vm: &mut HelperVm, wanted: &[&str]) -> Value {
    let t = Instant::now();
    vm.client.migrate_cancel().expect("migrate_cancel");
    let v = vm.wait(wanted, Duration::from_secs(10));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        t.elapsed()
    );
    vm.client
        .set_timeout(Duration::from_secs(30))
        .expect("timeout");
    v
}

/// The statuses of the `MIGRATION` events in `events`, in order.
fn statuses(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.name == "MIGRATION")
        .map(|e| e.data["status"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Checks the events of one source migration: `MIGRATION` statuses exactly `want`, and
/// `MIGRATION_PASS` events numbered 1, 2, ... between `active` and the next status.
fn assert_source_events(events: &[Event], want: &[&str], what: &str) {
    let got = statuses(events);
    assert_eq!(
        got, want,
        "{what}: MIGRATION events (all events: {events:?})"
    );
    let passes: Vec<u64> = events
        .iter()
        .filter(|e| e.name == "MIGRATION_PASS")
        .map(|e| e.data["pass"].as_u64().expect("pass number"))
        .collect();
    assert!(
        !passes.is_empty(),
        "{what}: no MIGRATION_PASS event: {events:?}"
    );
    let expected: Vec<u64> = (1..=passes.len() as u64).collect();
    assert_eq!(passes, expected, "{what}: MIGRATION_PASS numbers");
    let pos = |pred: &dyn Fn(&Event) -> bool| events.iter().position(pred);
    let active = pos(&|e| e.name == "MIGRATION" && e.data["status"] == "active").unwrap();
    let first_pass = pos(&|e| e.name == "MIGRATION_PASS").unwrap();
    let last_pass = events
        .iter()
        .rposition(|e| e.name == "MIGRATION_PASS")
        .unwrap();
    let after_active = events[active + 1..]
        .iter()
        .position(|e| e.name == "MIGRATION")
        .map(|i| i + active + 1)
        .unwrap_or(events.len());
    assert!(
        active < first_pass && last_pass < after_active,
        "{what}: MIGRATION_PASS events outside the active phase: {events:?}"
    );
}

fn completed_source_events(pause: bool) -> Vec<&'static str> {
    if pause {
        vec!["setup", "active", "pre-switchover", "device", "completed"]
    } else {
        vec!["setup", "active", "device", "completed"]
    }
}

/// Checks the figures of a completed source that sent every page exactly once.
fn assert_single_pass_figures(info: &Value, pages: u64, zeros: u64, size: u64, what: &str) {
    let normal = u64_at(info, &["ram", "normal"]);
    let dup = u64_at(info, &["ram", "duplicate"]);
    assert_eq!(normal + dup, pages, "{what}: normal + duplicate: {info}");
    assert_eq!(dup, zeros, "{what}: duplicate (zero) pages: {info}");
    assert_eq!(
        u64_at(info, &["ram", "total"]),
        size,
        "{what}: ram.total: {info}"
    );
    let transferred = u64_at(info, &["ram", "transferred"]);
    assert!(
        transferred >= normal * PAGE_SIZE as u64 && transferred > 0,
        "{what}: ram.transferred {transferred} < {normal} normal pages: {info}"
    );
    assert_eq!(
        u64_at(info, &["ram", "normal-bytes"]),
        normal * PAGE_SIZE as u64,
        "{what}: normal-bytes: {info}"
    );
    assert_eq!(
        u64_at(info, &["ram", "remaining"]),
        0,
        "{what}: remaining: {info}"
    );
}

/// Runs one complete helper -> helper migration over `fd:NAME` and checks memory and
/// events. Returns the source's final `query-migrate`.
fn migrate_fd_and_check(src: &mut HelperVm, dst: &mut HelperVm, name: &str, what: &str) -> Value {
    src.client.take_events();
    dst.client.take_events();
    connect_fd(src, dst, name);
    let uri = format!("fd:{name}");
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    src.client.migrate(&uri).expect("migrate");
    let info = src.wait(&["completed"], TIMEOUT);
    let dinfo = dst.wait(&["completed"], TIMEOUT);
    assert_same_blocks(src, dst, what);
    assert_source_events(
        &src.client.take_events(),
        &completed_source_events(false),
        what,
    );
    assert_eq!(
        statuses(&dst.client.take_events()),
        ["setup", "active", "completed"],
        "{what}: destination MIGRATION events"
    );
    assert_eq!(
        u64_at(&dinfo, &["ram", "total"]),
        src.blocks.iter().map(|b| b.mem.size).sum::<u64>(),
        "{what}: destination ram.total: {dinfo}"
    );
    assert!(
        info["total-time"].is_u64() && info["downtime"].is_u64(),
        "{what}: {info}"
    );
    assert!(
        info["ram"]["mbps"].as_f64().is_some_and(|m| m > 0.0),
        "{what}: mbps: {info}"
    );
    // The destination counted what the source sent.
    for k in ["normal", "duplicate"] {
        assert_eq!(
            u64_at(&dinfo, &["ram", k]),
            u64_at(&info, &["ram", k]),
            "{what}: ram.{k} differs between source {info} and destination {dinfo}"
        );
    }
    info
}

// ---------------------------------------------------------------------------------------
// 1. 64 MiB over a socketpair
// ---------------------------------------------------------------------------------------

#[test]
fn helper_to_helper_fd_64m() {
    let test = "helper_to_helper_fd_64m";
    let t0 = Instant::now();
    let mut src = spawn_with(&[("ram", RAM)]);
    let mut dst = spawn_with(&[("ram", RAM)]);
    let zeros = fill_all(&src, test_seed(test), 0.5);
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    assert_eq!(
        src.client.query_parameters().expect("params")["max-bandwidth"],
        0
    );
    assert_eq!(status_of(&mut src)["status"], "none");
    let info = migrate_fd_and_check(&mut src, &mut dst, "mig", test);
    assert_single_pass_figures(&info, RAM / PAGE_SIZE as u64, zeros, RAM, test);
    assert_eq!(info["role"], "source", "{info}");
    assert_eq!(status_of(&mut dst)["role"], "destination");
    eprintln!("{test}: {zeros} zero pages; took {:?}", t0.elapsed());
}

/// The destination's `load-threads`: one thread (no split), and more threads than this
/// machine may have CPUs; either way the destination ends equal to the source.
#[test]
fn helper_to_helper_load_threads() {
    let test = "helper_to_helper_load_threads";
    for threads in [1u64, 4] {
        let mut src = spawn_with(&[("ram", RAM)]);
        let mut dst = spawn_with(&[("ram", RAM)]);
        let zeros = fill_all(&src, test_seed(test) + threads, 0.2);
        src.client
            .set_parameters(json!({"max-bandwidth": 0}))
            .expect("params");
        dst.client
            .set_parameters(json!({"load-threads": threads}))
            .expect("load-threads");
        assert_eq!(
            dst.client.query_parameters().expect("params")["load-threads"],
            threads
        );
        let what = format!("{test} ({threads} threads)");
        let info = migrate_fd_and_check(&mut src, &mut dst, "mig", &what);
        assert_single_pass_figures(&info, RAM / PAGE_SIZE as u64, zeros, RAM, &what);
    }
}

/// A destination whose memory the parent preallocated (and filled with junk) before adding
/// it: the helper maps it ahead (`mapped-ahead`), then normal pages are copied into the
/// existing pages and zero pages clear them; the result equals the source byte for byte.
#[test]
fn helper_to_helper_into_preallocated_memory() {
    let test = "helper_to_helper_into_preallocated_memory";
    let mut src = spawn_with(&[("ram", RAM)]);
    let mut dst = spawn_helper();
    dst.add_preallocated_block("ram", RAM, 0xa5);
    // Mapped ahead means in the helper's own page tables: all of it counts in its RssShmem.
    let status = std::fs::read_to_string(format!("/proc/{}/status", dst.pid())).expect("status");
    let shmem_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("RssShmem");
    assert!(
        shmem_kib >= RAM / 1024,
        "{shmem_kib} KiB of shared memory mapped, want the whole {} KiB block",
        RAM / 1024
    );
    let zeros = fill_all(&src, test_seed(test), 0.5);
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let info = migrate_fd_and_check(&mut src, &mut dst, "mig", test);
    assert_single_pass_figures(&info, RAM / PAGE_SIZE as u64, zeros, RAM, test);
}

// ---------------------------------------------------------------------------------------
// 2. Odd block sizes and names
// ---------------------------------------------------------------------------------------

pub(crate) const ODD_BLOCKS: &[(&str, u64)] = &[
    ("pc.ram", 3 * MIB + 4 * KIB),
    ("/rom@etc/acpi/tables", 12 * KIB),
    ("vga.vram", 5 * MIB + 36 * KIB),
    ("0000:00:02.0/virtio-net-pci.rom", 260 * KIB),
    ("/rom@etc/table-loader", 4 * KIB),
    ("pc.bios", 2 * MIB + 1020 * KIB),
];

#[test]
fn helper_to_helper_odd_blocks() {
    let test = "helper_to_helper_odd_blocks";
    let mut src = spawn_with(ODD_BLOCKS);
    let mut dst = spawn_with(ODD_BLOCKS);
    let zeros = fill_all(&src, test_seed(test), 0.3);
    for vm in [&mut src, &mut dst] {
        let list = vm.client.query_ram_blocks().expect("query-ram-blocks");
        let got: Vec<(String, u64)> = list
            .as_array()
            .expect("array")
            .iter()
            .map(|b| {
                (
                    b["id"].as_str().unwrap().to_string(),
                    b["size"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, u64)> = ODD_BLOCKS
            .iter()
            .map(|(i, s)| (i.to_string(), *s))
            .collect();
        assert_eq!(got, want, "query-ram-blocks: {list}");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let info = migrate_fd_and_check(&mut src, &mut dst, "mig", test);
    let size: u64 = ODD_BLOCKS.iter().map(|(_, s)| s).sum();
    assert_single_pass_figures(&info, total_pages(&src), zeros, size, test);
}

// ---------------------------------------------------------------------------------------
// 3. Block mismatches
// ---------------------------------------------------------------------------------------

/// `src` migrates to `dst` whose blocks do not match: the destination fails naming
/// `block`, the source fails too, both still answer. Returns the destination's error-desc.
fn expect_mismatch(src: &mut HelperVm, dst: &mut HelperVm, block: &str, what: &str) -> String {
    connect_fd(src, dst, "bad");
    dst.client
        .migrate_incoming("fd:bad")
        .expect("migrate-incoming");
    src.client.migrate("fd:bad").expect("migrate");
    let d = dst.wait(&["failed", "completed"], FAIL_TIMEOUT);
    assert_eq!(d["status"], "failed", "{what}: destination: {d}");
    let desc = d["error-desc"].as_str().unwrap_or("").to_string();
    assert!(
        desc.contains(&format!("{block:?}")) || desc.contains(block),
        "{what}: destination error-desc does not name block {block:?}: {desc:?}"
    );
    let s = src.wait(&["failed", "completed"], FAIL_TIMEOUT);
    assert_eq!(s["status"], "failed", "{what}: source: {s}");
    let sdesc = s["error-desc"].as_str().unwrap_or("");
    assert!(
        !sdesc.is_empty(),
        "{what}: source failed without error-desc: {s}"
    );
    eprintln!("{what}: destination error-desc {desc:?}; source error-desc {sdesc:?}");
    // Both still answer, and keep saying failed.
    assert_eq!(status_of(src)["status"], "failed");
    assert_eq!(status_of(dst)["status"], "failed");
    assert!(src.alive() && dst.alive());
    let ev = statuses(&src.client.take_events());
    assert_eq!(
        ev.last().map(String::as_str),
        Some("failed"),
        "{what}: source events {ev:?}"
    );
    let ev = statuses(&dst.client.take_events());
    assert_eq!(
        ev.last().map(String::as_str),
        Some("failed"),
        "{what}: destination events {ev:?}"
    );
    desc
}

#[test]
fn block_size_mismatch_fails_then_retry() {
    let test = "block_size_mismatch_fails_then_retry";
    let seed = test_seed(test);
    let mut dst = spawn_with(&[("ram", 8 * MIB)]);
    // A source whose "ram" is larger; return path on, so it hears SHUT from the destination.
    let mut bad = spawn_with(&[("ram", 12 * MIB)]);
    fill_all(&bad, seed, 0.5);
    bad.client
        .set_capabilities(&[("return-path", true)])
        .expect("caps");
    let desc = expect_mismatch(&mut bad, &mut dst, "ram", test);
    assert!(
        desc.contains("0xc00000") && desc.contains("0x800000"),
        "error-desc should give both sizes: {desc:?}"
    );
    // A matching source: the same destination helper loads it.
    let mut good = spawn_with(&[("ram", 8 * MIB)]);
    let zeros = fill_all(&good, seed ^ 1, 0.5);
    let info = migrate_fd_and_check(&mut good, &mut dst, "mig2", test);
    assert_single_pass_figures(&info, 8 * MIB / PAGE_SIZE as u64, zeros, 8 * MIB, test);
}

#[test]
fn block_name_mismatch_fails_then_retry() {
    let test = "block_name_mismatch_fails_then_retry";
    let seed = test_seed(test);
    let mut dst = spawn_with(&[("pc.ram", RAM), ("vga.vram", 4 * MIB)]);
    // Same sizes, one name differs; no return path: the source learns from the broken
    // connection (64 MiB do not fit in the socket buffers).
    let mut bad = spawn_with(&[("pc.ram", RAM), ("vga.ram", 4 * MIB)]);
    fill_all(&bad, seed, 0.5);
    bad.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    expect_mismatch(&mut bad, &mut dst, "vga.ram", test);
    let mut good = spawn_with(&[("pc.ram", RAM), ("vga.vram", 4 * MIB)]);
    fill_all(&good, seed ^ 1, 0.5);
    good.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    migrate_fd_and_check(&mut good, &mut dst, "mig2", test);
}

/// The source has a block the destination lacks. The whole stream is small enough to fit
/// in the socket buffers, so only the return path (SHUT 1) can tell the source.
#[test]
fn block_missing_at_destination_with_return_path() {
    let test = "block_missing_at_destination_with_return_path";
    let seed = test_seed(test);
    let mut dst = spawn_with(&[("ram", 64 * KIB)]);
    let mut bad = spawn_with(&[("ram", 64 * KIB), ("extra.rom", 8 * KIB)]);
    fill_all(&bad, seed, 0.0);
    bad.client
        .set_capabilities(&[("return-path", true)])
        .expect("caps");
    expect_mismatch(&mut bad, &mut dst, "extra.rom", test);
}

/// A large stream with the return path on: the destination rejects it at the block list,
/// answers SHUT(1) and closes. The source fails either way (SHUT or broken pipe, whichever
/// it notices first, as in QEMU); it must not hang or report completion.
#[test]
fn size_mismatch_64m_with_return_path() {
    let test = "size_mismatch_64m_with_return_path";
    let seed = test_seed(test);
    let mut dst = spawn_with(&[("ram", RAM)]);
    let mut bad = spawn_with(&[("ram", RAM + 4 * KIB)]);
    fill_all(&bad, seed, 0.1);
    bad.client
        .set_capabilities(&[("return-path", true)])
        .expect("caps");
    bad.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let desc = expect_mismatch(&mut bad, &mut dst, "ram", test);
    assert!(
        desc.contains("0x4001000") && desc.contains("0x4000000"),
        "error-desc should give both sizes: {desc:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. URIs
// ---------------------------------------------------------------------------------------

const URI_RAM: u64 = 32 * MIB;

fn uri_pair(test: &str) -> (HelperVm, HelperVm, u64) {
    let src = spawn_with(&[("ram", URI_RAM)]);
    let dst = spawn_with(&[("ram", URI_RAM)]);
    let zeros = fill_all(&src, test_seed(test), 0.5);
    (src, dst, zeros)
}

fn finish_uri_migration(src: &mut HelperVm, dst: &mut HelperVm, zeros: u64, test: &str) {
    let info = src.wait(&["completed"], TIMEOUT);
    dst.wait(&["completed"], TIMEOUT);
    assert_same_blocks(src, dst, test);
    assert_single_pass_figures(&info, URI_RAM / PAGE_SIZE as u64, zeros, URI_RAM, test);
    assert_source_events(
        &src.client.take_events(),
        &completed_source_events(false),
        test,
    );
}

#[test]
fn helper_to_helper_unix() {
    let test = "helper_to_helper_unix";
    let dir = TempDir::new("qmh-hh");
    let (mut src, mut dst, zeros) = uri_pair(test);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    // With the return path: the source waits for the destination's SHUT(0).
    src.client
        .set_capabilities(&[("return-path", true)])
        .expect("caps");
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    // Listening already when migrate-incoming returns.
    assert!(dir.join("mig.sock").exists());
    src.client.migrate(&uri).expect("migrate");
    finish_uri_migration(&mut src, &mut dst, zeros, test);
}

#[test]
fn helper_to_helper_tcp() {
    let test = "helper_to_helper_tcp";
    let (mut src, mut dst, zeros) = uri_pair(test);
    src.client
        .set_capabilities(&[("return-path", true)])
        .expect("caps");
    // A free port: bind port 0, note it, close; retry if someone takes it meanwhile.
    let mut uri = String::new();
    for attempt in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
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
    finish_uri_migration(&mut src, &mut dst, zeros, test);
}

#[test]
fn helper_to_helper_file() {
    let test = "helper_to_helper_file";
    let dir = TempDir::new("qmh-hh");
    let path = dir.join("stream.bin");
    let (mut src, mut dst, zeros) = uri_pair(test);
    let uri = format!("file:{}", path.display());
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    src.client.migrate(&uri).expect("migrate");
    let info = src.wait(&["completed"], TIMEOUT);
    assert_source_events(
        &src.client.take_events(),
        &completed_source_events(false),
        test,
    );
    let len = std::fs::metadata(&path).expect("stream file").len();
    let normal = u64_at(&info, &["ram", "normal"]);
    assert!(
        len >= normal * PAGE_SIZE as u64,
        "stream file is {len} bytes for {normal} pages"
    );
    // A fresh destination loads the file.
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    let dinfo = dst.wait(&["completed"], TIMEOUT);
    assert_eq!(u64_at(&dinfo, &["ram", "normal"]), normal, "{dinfo}");
    assert_same_blocks(&src, &dst, test);
    assert_single_pass_figures(&info, URI_RAM / PAGE_SIZE as u64, zeros, URI_RAM, test);
    // The file can be loaded again into yet another helper.
    let mut dst2 = spawn_with(&[("ram", URI_RAM)]);
    dst2.client
        .migrate_incoming(&uri)
        .expect("migrate-incoming 2");
    dst2.wait(&["completed"], TIMEOUT);
    assert_same_blocks(&src, &dst2, test);
}

// ---------------------------------------------------------------------------------------
// 5. Device state through a chain QEMU -> A -> (B -> C) -> D -> QEMU
// ---------------------------------------------------------------------------------------

fn sections(ds: &Value) -> Vec<Value> {
    ds["sections"].as_array().expect("sections array").clone()
}

fn raw_bytes(section: &Value) -> Vec<u8> {
    B64.decode(section["raw"].as_str().expect("raw member"))
        .expect("raw is base64")
}

fn device_state_chain(qemu: Qemu, test: &str) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let t0 = Instant::now();
    let compat = (qemu == Qemu::V72).then_some("7.2");

    // QEMU source -> helper A.
    let mut qsrc = QemuVm::start(qemu, RAM, &VmOpts::default());
    fill_mixed(&mut qsrc.ram_mmap(), test_seed(test), 0.5);
    let mut a = spawn_with(&[("ram", RAM)]);
    let (x, y) = socketpair();
    qsrc.qmp().getfd("mig", x.as_fd()).expect("qemu getfd");
    a.client.getfd("mig", y.as_fd()).expect("helper getfd");
    drop((x, y));
    a.client
        .migrate_incoming("fd:mig")
        .expect("A migrate-incoming");
    qsrc.qmp()
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("qemu params");
    qsrc.execute("migrate", json!({"uri": "fd:mig"}))
        .expect("qemu migrate");
    qsrc.wait_migration(&["completed"], TIMEOUT)
        .expect("QEMU source completes");
    a.wait(&["completed"], TIMEOUT);
    let src_ram = qsrc.ram_mmap();
    assert_same_memory(&src_ram, &a.blocks[0].mem.map(), "QEMU -> A");
    let ds_a = sections(&a.client.query_device_state().expect("A query-device-state"));
    let names: Vec<&str> = ds_a
        .iter()
        .map(|s| s["idstr"].as_str().unwrap_or(""))
        .collect();
    eprintln!("{test}: device sections from {}: {names:?}", qemu.name());
    assert!(
        names.contains(&"timer") && names.contains(&"globalstate"),
        "{names:?}"
    );
    for s in &ds_a {
        assert!(s["raw"].is_string() && s["description"].is_object(), "{s}");
    }

    // Helper B sends A's memory (the same memfd) and A's sections to helper C.
    let mut b = spawn_helper();
    add_shared_block(&mut b, "ram", &a.blocks[0].mem);
    b.client
        .device_state_set(Value::Array(ds_a.clone()))
        .expect("B device-state-set");
    if let Some(v) = compat {
        b.client
            .set_parameters(json!({"compat-version": v}))
            .expect("B compat");
    }
    let mut c = spawn_with(&[("ram", RAM)]);
    migrate_fd_and_check(&mut b, &mut c, "mig", &format!("{test}: B -> C"));
    assert_same_memory(&src_ram, &c.blocks[0].mem.map(), "QEMU source vs C");
    let ds_c = sections(&c.client.query_device_state().expect("C query-device-state"));
    assert_eq!(ds_c.len(), ds_a.len(), "section count at C: {ds_c:?}");
    for (i, (sa, sc)) in ds_a.iter().zip(&ds_c).enumerate() {
        assert_eq!(sc["idstr"], sa["idstr"], "section {i}");
        let (ra, rc) = (raw_bytes(sa), raw_bytes(sc));
        assert!(
            ra == rc,
            "section {i} ({}) differs: A received {ra:02x?}, C received {rc:02x?}",
            sa["idstr"]
        );
        assert_eq!(sc["fields"], sa["fields"], "section {i} decoded fields");
    }

    // Helper D sends C's memory and sections to a real QEMU destination.
    let mut d = spawn_helper();
    add_shared_block(&mut d, "ram", &c.blocks[0].mem);
    d.client
        .device_state_set(Value::Array(ds_c.clone()))
        .expect("D device-state-set");
    if let Some(v) = compat {
        d.client
            .set_parameters(json!({"compat-version": v}))
            .expect("D compat");
    }
    d.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("D params");
    let mut qdst = QemuVm::start(qemu, RAM, &VmOpts::incoming());
    let (x, y) = socketpair();
    qdst.qmp().getfd("mig", y.as_fd()).expect("qemu getfd");
    d.client.getfd("mig", x.as_fd()).expect("helper getfd");
    drop((x, y));
    qdst.execute("migrate-incoming", json!({"uri": "fd:mig"}))
        .expect("qemu migrate-incoming");
    d.client.take_events();
    d.client.migrate("fd:mig").expect("D migrate");
    let dres = d.client.wait_for_status(&["completed"], TIMEOUT);
    let qres = qdst.wait_migration(&["completed"], TIMEOUT);
    if let Err(e) = &qres {
        panic!(
            "{} destination did not complete: {e}\nhelper D: {dres:?}\nQEMU output:\n{}",
            qemu.name(),
            qdst.stderr_tail(30)
        );
    }
    dres.expect("helper D completes");
    assert_source_events(
        &d.client.take_events(),
        &completed_source_events(false),
        &format!("{test}: D"),
    );
    assert_same_memory(
        &src_ram,
        &qdst.ram_mmap(),
        &format!("{test}: first vs last QEMU"),
    );
    // The last QEMU applied the device state: its migration status is completed and it
    // is still alive and answering.
    let st = qdst
        .execute("query-status", Value::Null)
        .expect("query-status");
    eprintln!("{test}: last QEMU status {st}; took {:?}", t0.elapsed());
}

#[test]
fn device_state_chain_qemu10() {
    device_state_chain(Qemu::V10, "device_state_chain_qemu10");
}

#[test]
fn device_state_chain_qemu72() {
    device_state_chain(Qemu::V72, "device_state_chain_qemu72");
}

// ---------------------------------------------------------------------------------------
// 6. A live source: dirty bitmap and pause-before-switchover
// ---------------------------------------------------------------------------------------

/// Writes random pages (one in eight all zeros) into `mem`, setting each page's dirty bit
/// in `bitmap` afterwards, until `stop`. Counts writes in `writes`.
pub(crate) fn dirty_writer(
    mut mem: support::map::RamMap,
    bitmap: support::map::RamMap,
    seed: u64,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
) {
    let pages = mem.len() / PAGE_SIZE;
    let words = bitmap.len() / 8;
    assert!(words * 64 >= pages);
    // SAFETY: the bitmap mapping is page aligned, `words * 8` bytes long, and lives as
    // long as this function (`bitmap` is owned here); the helper accesses it atomically too.
    let bits: &[AtomicU64] =
        unsafe { std::slice::from_raw_parts(bitmap.as_ptr() as *const AtomicU64, words) };
    let mut rng = SmallRng::seed_from_u64(seed);
    while !stop.load(Ordering::Acquire) {
        let p = rng.gen_range(0..pages);
        let page = &mut mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        if rng.gen_ratio(1, 8) {
            page.fill(0);
        } else {
            rng.fill_bytes(page);
        }
        bits[p / 64].fetch_or((1u64 << (p % 64)).to_le(), Ordering::SeqCst);
        writes.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn live_source_pause_before_switchover() {
    let test = "live_source_pause_before_switchover";
    let seed = test_seed(test);
    let t0 = Instant::now();
    let mut src = spawn_helper();
    src.add_block("ram", RAM, true);
    let mut dst = spawn_with(&[("ram", RAM)]);
    fill_all(&src, seed, 0.1);
    src.client
        .set_capabilities(&[("pause-before-switchover", true)])
        .expect("caps");
    src.client
        .set_parameters(json!({"max-bandwidth": 200 * MIB, "downtime-limit": 20}))
        .expect("params");
    let caps = src.client.query_capabilities().expect("caps");
    assert!(
        caps.as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == "pause-before-switchover" && c["state"] == true),
        "{caps}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let mem = src.blocks[0].mem.map();
        let bitmap = src.blocks[0].bitmap.as_ref().expect("bitmap").map();
        let (stop, writes) = (stop.clone(), writes.clone());
        std::thread::spawn(move || dirty_writer(mem, bitmap, seed ^ 0x5eed, stop, writes))
    };
    let stop_writer = |writer: std::thread::JoinHandle<()>| {
        stop.store(true, Ordering::Release);
        writer.join().expect("writer thread");
    };

    connect_fd(&mut src, &mut dst, "mig");
    dst.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    src.client.migrate("fd:mig").expect("migrate");
    let at_migrate = writes.load(Ordering::Relaxed);
    let r = src.client.wait_for_status(&["pre-switchover"], TIMEOUT);
    let during_precopy = writes.load(Ordering::Relaxed) - at_migrate;
    stop_writer(writer);
    let pre = r.expect("source reaches pre-switchover");
    eprintln!(
        "{test}: pre-switchover after {:?}, {during_precopy} pages written during precopy: {pre}",
        t0.elapsed()
    );
    assert!(
        during_precopy > 0,
        "the writer wrote nothing during precopy"
    );
    // Paused: nothing moves until migrate-continue.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(status_of(&mut src)["status"], "pre-switchover");
    assert_eq!(status_of(&mut dst)["status"], "active");
    // The VMM hands over its device state while paused (body form, framed by the helper):
    // several instances of one idstr, an empty body and a large one.
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xde5);
    let mut body = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    let devices = [
        ("vmm-cpu", 0u32, 1u32, body(3000)),
        ("vmm-cpu", 1, 1, body(3000)),
        ("vmm/empty", 0, 3, Vec::new()),
        ("vmm-big", 0, 2, body(MIB as usize + 17)),
    ];
    let to_send: Vec<Value> = devices
        .iter()
        .map(|(id, inst, ver, data)| {
            json!({"idstr": id, "instance-id": inst, "version-id": ver, "data": B64.encode(data)})
        })
        .collect();
    src.client
        .device_state_set(Value::Array(to_send))
        .expect("device-state-set in pre-switchover");
    src.client.migrate_continue().expect("migrate-continue");

    let info = src.wait(&["completed"], TIMEOUT);
    dst.wait(&["completed"], TIMEOUT);
    assert_same_blocks(&src, &dst, test);
    let pages = RAM / PAGE_SIZE as u64;
    let sent = u64_at(&info, &["ram", "normal"]) + u64_at(&info, &["ram", "duplicate"]);
    let syncs = u64_at(&info, &["ram", "dirty-sync-count"]);
    eprintln!(
        "{test}: {sent} pages sent for {pages}, dirty-sync-count {syncs}, took {:?}",
        t0.elapsed()
    );
    assert!(syncs > 1, "dirty-sync-count {syncs}: {info}");
    assert!(sent > pages, "no page was sent twice: {info}");
    assert_source_events(
        &src.client.take_events(),
        &completed_source_events(true),
        test,
    );
    let got = sections(&dst.client.query_device_state().expect("query-device-state"));
    assert_eq!(got.len(), devices.len(), "device sections: {got:?}");
    for (g, (id, inst, ver, data)) in got.iter().zip(&devices) {
        assert_eq!(
            (
                g["idstr"].as_str(),
                g["instance-id"].as_u64(),
                g["version-id"].as_u64()
            ),
            (Some(*id), Some(*inst as u64), Some(*ver as u64)),
            "{g}"
        );
        let d = B64
            .decode(g["data"].as_str().expect("data"))
            .expect("base64");
        assert!(
            d == *data,
            "section {id}/{inst}: body differs ({} vs {} bytes)",
            d.len(),
            data.len()
        );
    }
    // The bitmap was harvested: nothing is left dirty.
    let bm = src.blocks[0].bitmap.as_ref().unwrap().map();
    assert!(
        bm.iter().all(|&b| b == 0),
        "dirty bits left after completion"
    );
}

// ---------------------------------------------------------------------------------------
// 7. Cancel, then migrate again between the same helpers
// ---------------------------------------------------------------------------------------

#[test]
fn cancel_and_retry() {
    let test = "cancel_and_retry";
    let seed = test_seed(test);
    let mut src = spawn_with(&[("ram", RAM)]);
    let mut dst = spawn_with(&[("ram", RAM)]);
    let zeros = fill_all(&src, seed, 0.1);
    src.client
        .set_parameters(json!({"max-bandwidth": 20 * MIB}))
        .expect("params");
    connect_fd(&mut src, &mut dst, "mig");
    dst.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    src.client.migrate("fd:mig").expect("migrate");
    src.wait(&["active"], TIMEOUT);
    std::thread::sleep(Duration::from_millis(500));
    let before = status_of(&mut src);
    assert_eq!(before["status"], "active", "{before}");
    assert!(u64_at(&before, &["ram", "transferred"]) > 0, "{before}");

    let t = Instant::now();
    src.client.migrate_cancel().expect("migrate_cancel");
    let s = src.wait(&["cancelled"], Duration::from_secs(10));
    let took = t.elapsed();
    eprintln!("{test}: cancelled in {took:?}: {s}");
    assert!(took < Duration::from_secs(2), "cancel took {took:?}");
    let d = dst.wait(&["failed", "completed"], FAIL_TIMEOUT);
    assert_eq!(d["status"], "failed", "destination after cancel: {d}");
    assert!(d["error-desc"].is_string(), "{d}");
    // Both still answer.
    assert_eq!(status_of(&mut src)["status"], "cancelled");
    assert_eq!(status_of(&mut dst)["status"], "failed");
    let ev = statuses(&src.client.take_events());
    assert_eq!(
        ev,
        ["setup", "active", "cancelling", "cancelled"],
        "source events"
    );
    // migrate_cancel on a finished migration is harmless.
    src.client.migrate_cancel().expect("second migrate_cancel");
    assert_eq!(status_of(&mut src)["status"], "cancelled");

    // Again, unthrottled, on a fresh socketpair between the same two helpers.
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let info = migrate_fd_and_check(&mut src, &mut dst, "mig2", test);
    assert_single_pass_figures(&info, RAM / PAGE_SIZE as u64, zeros, RAM, test);
}

// ---------------------------------------------------------------------------------------
// More reuse and robustness
// ---------------------------------------------------------------------------------------

/// A destination whose memory already holds data (a VMM reusing its memfd) and then
/// receives two different guests in turn: every page, zero pages included, must end up as
/// the last source has it.
#[test]
fn second_incoming_overwrites_previous_content() {
    let test = "second_incoming_overwrites_previous_content";
    let seed = test_seed(test);
    let blocks = [("pc.ram", 16 * MIB), ("vga.vram", 4 * MIB + 8 * KIB)];
    let mut dst = spawn_with(&blocks);
    fill_all(&dst, seed ^ 0xdead, 0.0); // garbage everywhere
    for (round, zero_fraction) in [(1u64, 0.5), (2, 0.7)] {
        let mut src = spawn_with(&blocks);
        fill_all(&src, seed.wrapping_add(round * 1000), zero_fraction);
        src.client
            .set_parameters(json!({"max-bandwidth": 0}))
            .expect("params");
        migrate_fd_and_check(&mut src, &mut dst, &format!("mig{round}"), test);
    }
}

/// `migrate_cancel` while the source waits in `pre-switchover`: it is cancelled, the
/// destination fails, and the same pair migrates again (without the pause).
#[test]
fn cancel_in_pre_switchover_then_retry() {
    let test = "cancel_in_pre_switchover_then_retry";
    let mut src = spawn_with(&[("ram", 16 * MIB)]);
    let mut dst = spawn_with(&[("ram", 16 * MIB)]);
    fill_all(&src, test_seed(test), 0.5);
    src.client
        .set_capabilities(&[("pause-before-switchover", true)])
        .expect("caps");
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    connect_fd(&mut src, &mut dst, "mig");
    dst.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    src.client.migrate("fd:mig").expect("migrate");
    src.wait(&["pre-switchover"], TIMEOUT);
    // migrate-continue with the wrong state is refused and changes nothing.
    assert!(src
        .client
        .execute("migrate-continue", json!({"state": "active"}))
        .is_err());
    let t = Instant::now();
    src.client.migrate_cancel().expect("migrate_cancel");
    src.wait(&["cancelled"], Duration::from_secs(10));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        t.elapsed()
    );
    let d = dst.wait(&["failed", "completed"], FAIL_TIMEOUT);
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(
        statuses(&src.client.take_events()),
        [
            "setup",
            "active",
            "pre-switchover",
            "cancelling",
            "cancelled"
        ]
    );
    // migrate-continue after the cancel is refused.
    assert!(src.client.migrate_continue().is_err());
    src.client
        .set_capabilities(&[("pause-before-switchover", false)])
        .expect("caps");
    migrate_fd_and_check(&mut src, &mut dst, "mig2", test);
}

/// A destination listening on a unix socket that nobody connects to can be cancelled, and
/// then receives a migration on a new `migrate-incoming`.
#[test]
fn cancel_pending_incoming_then_retry() {
    let test = "cancel_pending_incoming_then_retry";
    let dir = TempDir::new("qmh-hh");
    let mut src = spawn_with(&[("ram", 8 * MIB)]);
    let mut dst = spawn_with(&[("ram", 8 * MIB)]);
    fill_all(&src, test_seed(test), 0.5);
    let uri = format!("unix:{}", dir.join("never.sock").display());
    dst.client.migrate_incoming(&uri).expect("migrate-incoming");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(status_of(&mut dst)["status"], "setup");
    // A second migrate-incoming while one is pending is refused.
    assert!(dst.client.migrate_incoming(&uri).is_err());
    let t = Instant::now();
    dst.client.migrate_cancel().expect("migrate_cancel");
    let d = dst.wait(&["cancelled", "failed"], Duration::from_secs(10));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        t.elapsed()
    );
    assert_eq!(d["status"], "cancelled", "{d}");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    dst.client.take_events();
    dst.client
        .migrate_incoming(&uri)
        .expect("migrate-incoming again");
    src.client.migrate(&uri).expect("migrate");
    src.wait(&["completed"], TIMEOUT);
    dst.wait(&["completed"], TIMEOUT);
    assert_same_blocks(&src, &dst, test);
}

/// `migrate` to a unix socket nobody listens on fails (it does not hang), and the same
/// source migrates fine afterwards.
#[test]
fn migrate_to_absent_listener_fails_then_retry() {
    let test = "migrate_to_absent_listener_fails_then_retry";
    let dir = TempDir::new("qmh-hh");
    let mut src = spawn_with(&[("ram", 8 * MIB)]);
    let mut dst = spawn_with(&[("ram", 8 * MIB)]);
    fill_all(&src, test_seed(test), 0.5);
    let nowhere = format!("unix:{}", dir.join("nobody.sock").display());
    match src.client.migrate(&nowhere) {
        Err(e) => eprintln!("{test}: migrate refused at once: {e}"),
        Ok(()) => {
            let s = src.wait(&["failed", "completed"], FAIL_TIMEOUT);
            assert_eq!(s["status"], "failed", "{s}");
            assert!(
                s["error-desc"]
                    .as_str()
                    .unwrap_or("")
                    .contains("nobody.sock"),
                "error-desc should name the socket: {s}"
            );
        }
    }
    // Unknown fd names and bad URIs are plain command errors.
    assert!(src.client.migrate("fd:nosuchfd").is_err());
    assert!(src.client.migrate("exec:cat").is_err());
    assert_ne!(status_of(&mut src)["status"], "setup");
    migrate_fd_and_check(&mut src, &mut dst, "mig", test);
}

/// While a throttled migration runs: a second `migrate` and `ram-block-add` are refused,
/// and raising `max-bandwidth` takes effect at once.
#[test]
fn bandwidth_raised_mid_migration() {
    let test = "bandwidth_raised_mid_migration";
    let mut src = spawn_with(&[("ram", RAM)]);
    let mut dst = spawn_with(&[("ram", RAM)]);
    let zeros = fill_all(&src, test_seed(test), 0.1);
    src.client
        .set_parameters(json!({"max-bandwidth": 10 * MIB}))
        .expect("params");
    src.client.take_events();
    connect_fd(&mut src, &mut dst, "mig");
    dst.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    src.client.migrate("fd:mig").expect("migrate");
    src.wait(&["active"], TIMEOUT);
    std::thread::sleep(Duration::from_millis(300));
    let (a, b) = socketpair();
    src.client.getfd("other", a.as_fd()).expect("getfd");
    drop((a, b));
    assert!(
        src.client.migrate("fd:other").is_err(),
        "second migrate accepted"
    );
    let extra = Memfd::new("extra", 4 * KIB);
    src.client.getfd("extra", extra.fd.as_fd()).expect("getfd");
    assert!(
        src.client
            .ram_block_add(&RamBlockSpec {
                id: "extra".into(),
                fdname: "extra".into(),
                offset: 0,
                size: 4 * KIB,
                ..Default::default()
            })
            .is_err(),
        "ram-block-add accepted during a migration"
    );
    let before = status_of(&mut src);
    assert_eq!(before["status"], "active", "{before}");
    let t = Instant::now();
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params while active");
    let info = src.wait(&["completed"], TIMEOUT);
    dst.wait(&["completed"], TIMEOUT);
    // At 10 MiB/s the remaining ~55 MiB would take more than 5 s.
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "raising max-bandwidth did not speed the migration up: {:?} ({before})",
        t.elapsed()
    );
    assert_same_blocks(&src, &dst, test);
    assert_single_pass_figures(&info, RAM / PAGE_SIZE as u64, zeros, RAM, test);
    assert_source_events(
        &src.client.take_events(),
        &completed_source_events(false),
        test,
    );
}

/// Like `dirty_writer`, over several blocks (each with its bitmap), picking pages uniformly
/// over all of them.
fn dirty_writer_multi(
    mut blocks: Vec<(support::map::RamMap, support::map::RamMap)>,
    seed: u64,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
) {
    let pages: Vec<usize> = blocks.iter().map(|(m, _)| m.len() / PAGE_SIZE).collect();
    let total: usize = pages.iter().sum();
    let mut rng = SmallRng::seed_from_u64(seed);
    while !stop.load(Ordering::Acquire) {
        let mut p = rng.gen_range(0..total);
        let mut bi = 0;
        while p >= pages[bi] {
            p -= pages[bi];
            bi += 1;
        }
        let (mem, bitmap) = &mut blocks[bi];
        let page = &mut mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        if rng.gen_ratio(1, 8) {
            page.fill(0);
        } else {
            rng.fill_bytes(page);
        }
        // SAFETY: `p / 64` is a whole word inside the (page-aligned) bitmap mapping.
        let word = unsafe { &*(bitmap.as_ptr().add(p / 64 * 8) as *const AtomicU64) };
        word.fetch_or((1u64 << (p % 64)).to_le(), Ordering::SeqCst);
        writes.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// A live source with several odd-sized blocks, each with a dirty bitmap, iterating
/// several passes (downtime-limit 0: it converges only once a pass leaves nothing dirty)
/// while the writer runs; the writer stops when the source reaches `pre-switchover`.
#[test]
fn live_source_odd_blocks_many_passes() {
    let test = "live_source_odd_blocks_many_passes";
    let seed = test_seed(test);
    let mut src = spawn_helper();
    for (id, size) in ODD_BLOCKS {
        src.add_block(id, *size, true);
    }
    let mut dst = spawn_with(ODD_BLOCKS);
    fill_all(&src, seed, 0.2);
    src.client
        .set_capabilities(&[("pause-before-switchover", true)])
        .expect("caps");
    src.client
        .set_parameters(json!({"max-bandwidth": 50 * MIB, "downtime-limit": 0}))
        .expect("params");
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let maps = src
            .blocks
            .iter()
            .map(|b| (b.mem.map(), b.bitmap.as_ref().unwrap().map()))
            .collect();
        let (stop, writes) = (stop.clone(), writes.clone());
        std::thread::spawn(move || dirty_writer_multi(maps, seed ^ 0x5eed, stop, writes))
    };
    src.client.take_events();
    connect_fd(&mut src, &mut dst, "mig");
    dst.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    src.client.migrate("fd:mig").expect("migrate");
    let r = src.client.wait_for_status(&["pre-switchover"], TIMEOUT);
    stop.store(true, Ordering::Release);
    writer.join().expect("writer");
    r.expect("source reaches pre-switchover");
    eprintln!("{test}: {} pages written", writes.load(Ordering::Relaxed));
    src.client.migrate_continue().expect("migrate-continue");
    let info = src.wait(&["completed"], TIMEOUT);
    dst.wait(&["completed"], TIMEOUT);
    assert_same_blocks(&src, &dst, test);
    let sent = u64_at(&info, &["ram", "normal"]) + u64_at(&info, &["ram", "duplicate"]);
    let syncs = u64_at(&info, &["ram", "dirty-sync-count"]);
    eprintln!(
        "{test}: {sent} pages sent for {}, dirty-sync-count {syncs}",
        total_pages(&src)
    );
    // The first pass takes ~200 ms while ~1000 pages get written: at least a second pass.
    assert!(syncs >= 3, "dirty-sync-count {syncs}: {info}");
    assert!(sent > total_pages(&src), "{info}");
    assert_source_events(
        &src.client.take_events(),
        &completed_source_events(true),
        test,
    );
}

/// A source blocked writing to a peer that never reads still answers `query-migrate` at
/// once, and `migrate_cancel` unblocks it; then it migrates to a real destination.
#[test]
fn cancel_source_blocked_on_stalled_peer() {
    let test = "cancel_source_blocked_on_stalled_peer";
    let mut src = spawn_with(&[("ram", RAM)]);
    let mut dst = spawn_with(&[("ram", RAM)]);
    fill_all(&src, test_seed(test), 0.0);
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let (a, stalled) = socketpair();
    src.client.getfd("mig", a.as_fd()).expect("getfd");
    drop(a);
    src.client.migrate("fd:mig").expect("migrate");
    src.wait(&["active"], TIMEOUT);
    // Let it fill the socket buffers and block.
    wait_until_still(
        &mut src,
        &["ram", "transferred"],
        Duration::from_millis(100),
        0,
    );
    let s = query_at_once(&mut src);
    assert_eq!(s["status"], "active", "{s}");
    assert!(
        u64_at(&s, &["ram", "transferred"]) < RAM / 2,
        "the stalled peer took {s}"
    );
    cancel_at_once(&mut src, &["cancelled"]);
    drop(stalled);
    migrate_fd_and_check(&mut src, &mut dst, "mig2", test);
}

/// A destination waiting for a source that sent half a stream and stalled answers at once
/// and can be cancelled; then it receives a full migration.
#[test]
fn cancel_destination_on_stalled_source() {
    let test = "cancel_destination_on_stalled_source";
    let mut src = spawn_with(&[("ram", 8 * MIB)]);
    let mut dst = spawn_with(&[("ram", 8 * MIB)]);
    fill_all(&src, test_seed(test), 0.5);
    // A real stream, cut short: record one into a file, send its first 1 MiB by hand.
    let dir = TempDir::new("qmh-hh");
    let path = dir.join("stream.bin");
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    src.client
        .migrate(&format!("file:{}", path.display()))
        .expect("migrate to file");
    src.wait(&["completed"], TIMEOUT);
    let stream = std::fs::read(&path).expect("stream");
    let (b, feeder) = socketpair();
    dst.client.getfd("mig", b.as_fd()).expect("getfd");
    drop(b);
    dst.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    let mut feeder = std::os::unix::net::UnixStream::from(feeder);
    std::io::Write::write_all(&mut feeder, &stream[..1 << 20]).expect("feed");
    wait_until_still(&mut dst, &["ram", "normal"], Duration::from_millis(50), 1);
    let d = query_at_once(&mut dst);
    assert_eq!(d["status"], "active", "{d}");
    let d = cancel_at_once(&mut dst, &["cancelled", "failed"]);
    assert_eq!(d["status"], "cancelled", "{d}");
    drop(feeder);
    migrate_fd_and_check(&mut src, &mut dst, "mig2", test);
}

/// The destination end of a migration socket played by the test: drains the stream,
/// and (if `shut_after` is given) after that many bytes sends SHUT(1) on the return path (as a QEMU or helper
/// destination does when loading fails) while the socket stays open. Returns the bytes
/// read after the SHUT was sent, and in total, once the source closes its end.
fn fake_failing_destination(
    sock: std::os::fd::OwnedFd,
    shut_after: Option<u64>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::from(sock);
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut buf = vec![0u8; 1 << 20];
        let (mut total, mut after_shut) = (0u64, 0u64);
        let mut shut_sent = false;
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n as u64,
            };
            total += n;
            if shut_sent {
                after_shut += n;
            } else if shut_after.is_some_and(|at| total >= at) {
                // be16 type SHUT (1), be16 length 4, be32 value 1.
                s.write_all(&[0, 1, 0, 4, 0, 0, 0, 1])
                    .expect("send SHUT(1)");
                shut_sent = true;
            }
        }
        (after_shut, total)
    })
}

/// With the return path on, a destination that reports failure with SHUT(1) in the middle
/// of the stream makes the source stop and fail, saying the destination failed (QEMU's
/// return-path thread records "Sibling indicated error 1"). It must not go on sending the
/// whole RAM and then blame a missing SHUT.
#[test]
fn source_stops_when_destination_reports_failure() {
    let test = "source_stops_when_destination_reports_failure";
    let mut src = spawn_with(&[("ram", RAM)]);
    fill_all(&src, test_seed(test), 0.0);
    src.client
        .set_capabilities(&[("return-path", true)])
        .expect("caps");
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let (a, b) = socketpair();
    src.client.getfd("mig", a.as_fd()).expect("getfd");
    drop(a);
    let fake = fake_failing_destination(b, Some(4 * MIB));
    src.client.migrate("fd:mig").expect("migrate");
    let s = src.wait(&["failed", "completed"], TIMEOUT);
    let (after_shut, total) = fake.join().expect("fake destination");
    let desc = s["error-desc"].as_str().unwrap_or("");
    eprintln!(
        "{test}: source {}: {desc:?}; {total} bytes sent, {after_shut} after SHUT(1)",
        s["status"]
    );
    assert_eq!(s["status"], "failed", "{s}");
    assert!(
        desc.contains("SHUT 1") || desc.contains("failed to load"),
        "the source's error-desc should report the destination's failure (SHUT 1): {desc:?}"
    );
    assert!(
        // Far less than the 64 MiB block: the source stopped early (the margin is for a
        // loaded machine, where the return-path thread may run late).
        after_shut < 32 * MIB,
        "the source sent {after_shut} more bytes (of {total}) after the destination's SHUT(1)"
    );
}

/// A source that has sent everything and waits (in `device`) for a SHUT that never comes
/// answers `query-migrate` and can be cancelled at once.
#[test]
fn cancel_while_waiting_for_shut() {
    let test = "cancel_while_waiting_for_shut";
    let mut src = spawn_with(&[("ram", 8 * MIB)]);
    fill_all(&src, test_seed(test), 0.5);
    src.client
        .set_capabilities(&[("return-path", true)])
        .expect("caps");
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let (a, b) = socketpair();
    src.client.getfd("mig", a.as_fd()).expect("getfd");
    drop(a);
    let fake = fake_failing_destination(b, None);
    src.client.migrate("fd:mig").expect("migrate");
    let s = src.wait(&["device"], TIMEOUT);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status_of(&mut src)["status"], "device", "{s}");
    let t = Instant::now();
    src.client.migrate_cancel().expect("migrate_cancel");
    src.wait(&["cancelled"], Duration::from_secs(10));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        t.elapsed()
    );
    let (_, total) = fake.join().expect("fake destination");
    assert!(total > 0);
    assert_eq!(
        statuses(&src.client.take_events()),
        ["setup", "active", "device", "cancelling", "cancelled"]
    );
}

/// As in QEMU, the destination only checks the blocks the source announces: a block that
/// exists only on the destination is left as it is and the migration completes.
#[test]
fn destination_extra_block_is_left_alone() {
    let test = "destination_extra_block_is_left_alone";
    let seed = test_seed(test);
    let mut src = spawn_with(&[("ram", 8 * MIB)]);
    let mut dst = spawn_with(&[("ram", 8 * MIB), ("extra.rom", 64 * KIB)]);
    fill_all(&src, seed, 0.5);
    fill_mixed(&mut dst.blocks[1].mem.map(), seed ^ 7, 0.0);
    let extra_before = dst.blocks[1].mem.map().to_vec();
    connect_fd(&mut src, &mut dst, "mig");
    dst.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    src.client.migrate("fd:mig").expect("migrate");
    src.wait(&["completed"], TIMEOUT);
    dst.wait(&["completed"], TIMEOUT);
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
    assert_same_memory(
        &extra_before,
        &dst.blocks[1].mem.map(),
        "extra block untouched",
    );
}

/// A sparse guest stays sparse: the source sends the memfd's holes as zero pages without
/// reading them (a read through a shared mapping would allocate a page per hole), and the
/// destination leaves them holes too.
#[test]
fn sparse_guest_stays_sparse() {
    use std::os::unix::fs::MetadataExt;
    let size = 256 * MIB;
    let mut src = HelperVm::spawn();
    src.add_block("ram", size, false);
    {
        let mut m = src.blocks[0].mem.map();
        for p in (0..size as usize / 4096).step_by(1024) {
            m[p * 4096] = (p % 251) as u8 + 1;
        }
    }
    let allocated = |mem: &support::helper::Memfd| -> u64 {
        std::fs::metadata(mem.path()).expect("fstat").blocks() * 512
    };
    let before = allocated(&src.blocks[0].mem);
    let mut dst = HelperVm::spawn();
    dst.add_block("ram", size, false);
    pass_socketpair(&mut src.client, &mut dst.client, "mig");
    dst.client.migrate_incoming("fd:mig").expect("incoming");
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    src.client.migrate("fd:mig").expect("migrate");
    src.wait(&["completed"], TIMEOUT);
    dst.wait(&["completed"], TIMEOUT);
    let (s_after, d_after) = (allocated(&src.blocks[0].mem), allocated(&dst.blocks[0].mem));
    assert_eq!(s_after, before, "the source allocated memory for holes");
    assert!(
        d_after <= 2 * before,
        "destination allocated {d_after} bytes for {before} of data"
    );
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), "sparse");
}
