//! Memory and time bounds for crafted stream input (issue 10, item 1): each input that once
//! made a helper's memory or time explode is sent to a fresh helper destination over a
//! socket, or given to `analyze` as a file. The helper's peak RSS (VmHWM, or ru_maxrss for
//! `analyze`) and the wall time must stay under the bounds stated here and in the man page,
//! and the helper must end the load cleanly (completed, or failed with an error-desc) and
//! keep answering query-migrate.

use std::process::{Command, Stdio};
use std::time::Instant;

use qemu_migration_helper::compat::wire::command;
use qemu_migration_helper::wire::ram::BlockEntry;
use qemu_migration_helper::wire::stream::{
    encode_command, encode_eof, encode_footer, encode_section_start, encode_vmdesc, SectionHeader,
    SectionKind,
};
use serde_json::{json, Value};

use crate::files::helper_for;
use crate::streams::*;
use support::helper::{helper_bin, HelperVm};
use support::util::{peak_rss_kib, TempDir};

/// The helper's own footprint before any stream (binary, threads, a 1 MiB guest block)
/// is well under this; each case adds what its input may legitimately cost.
const BASE_MIB: u64 = 64;

fn blocks() -> Vec<BlockEntry> {
    vec![BlockEntry {
        idstr: "ram".into(),
        used_length: BLOCK,
        page_size: None,
    }]
}

/// Header, configuration, the RAM block list and all of RAM: a stream ready for devices.
fn ram_prefix() -> Vec<u8> {
    [
        head(),
        ram_start(&[("ram", BLOCK)]),
        ram_section(SectionKind::End, 1, &records(0..PAGES)),
    ]
    .concat()
}

fn full(id: u32, idstr: &str, instance_id: u32, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    encode_section_start(
        &mut b,
        SectionKind::Full,
        &SectionHeader {
            section_id: id,
            idstr: idstr.into(),
            instance_id,
            version_id: 1,
        },
    )
    .unwrap();
    b.extend_from_slice(body);
    encode_footer(&mut b, id);
    b
}

fn eof_and_vmdesc(desc: &Value) -> Vec<u8> {
    let mut b = Vec::new();
    encode_eof(&mut b);
    encode_vmdesc(&mut b, desc.to_string().as_bytes()).unwrap();
    b
}

/// A description with one device "dev" instance 0 whose fields are `fields`.
fn desc_with(fields: Vec<Value>) -> Value {
    json!({"page_size": 4096, "devices": [{
        "name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1, "fields": fields}]})
}

/// What one load did.
struct Load {
    status: Value,
    secs: f64,
    peak_mib: u64,
}

/// Loads `stream` into a fresh helper over a socket; checks it ended cleanly and still
/// answers. Returns the final status, the time and the helper's peak RSS.
fn load(what: &str, stream: Vec<u8>) -> (HelperVm, Load) {
    let mut h = helper_for(&blocks(), &["--log-level", "warn"]);
    let t0 = Instant::now();
    let r = load_over_socket(&mut h, stream);
    let secs = t0.elapsed().as_secs_f64();
    let status = r.unwrap_or_else(|e| panic!("{what}: {e} (helper alive: {})", h.alive()));
    assert!(h.alive(), "{what}: the helper died");
    let q = h.client.query_migrate().expect("query-migrate afterwards");
    assert_eq!(q["status"], status["status"], "{what}: {q}");
    if status["status"] == "failed" {
        let d = status["error-desc"].as_str().unwrap_or_default();
        assert!(
            !d.is_empty(),
            "{what}: failed without an error-desc: {status}"
        );
    }
    let peak_mib = peak_rss_kib(h.pid()) / 1024;
    eprintln!(
        "bounds: {what}: {} in {secs:.2} s, peak RSS {peak_mib} MiB{}",
        status["status"],
        status["error-desc"]
            .as_str()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    );
    (
        h,
        Load {
            status,
            secs,
            peak_mib,
        },
    )
}

fn assert_within(what: &str, l: &Load, max_mib: u64, max_secs: f64) {
    assert!(
        l.peak_mib <= max_mib,
        "{what}: peak RSS {} MiB, over the bound of {max_mib} MiB",
        l.peak_mib
    );
    assert!(
        l.secs <= max_secs,
        "{what}: took {:.1} s, over the bound of {max_secs} s",
        l.secs
    );
}

#[test]
fn sections_share_one_description() {
    // The reported input: 40 sections of one device and a 2.5 MB description entry. Each
    // section used to clone the entry (2.4 GiB). The entry is parsed once, sections
    // refer to it, and a device sent twice is refused.
    let fields: Vec<Value> = (0..50_000)
        .map(|i| json!({"name": format!("f{i:06}"), "type": "uint8", "size": 0}))
        .collect();
    let desc = desc_with(fields);
    assert!(desc.to_string().len() > 2_000_000);
    let mut s = ram_prefix();
    for i in 0..40 {
        s.extend(full(10 + i, "dev", 0, &[]));
    }
    s.extend(eof_and_vmdesc(&desc));
    let (_h, l) = load("40 sections of one 2.5 MB description", s);
    assert_eq!(l.status["status"], "failed");
    assert!(
        l.status["error-desc"]
            .as_str()
            .is_some_and(|d| d.contains("sent twice")),
        "{}",
        l.status
    );
    assert_within("shared description", &l, BASE_MIB + 128, 20.0);
}

#[test]
fn many_distinct_sections_stay_small() {
    // 4000 devices, each with its own entry: memory follows the bytes, not a copy per
    // section; everything completes and is reported.
    let n = 4000u32;
    let devices: Vec<Value> = (0..n)
        .map(|i| {
            json!({"name": "dev", "instance_id": i, "vmsd_name": "dev", "version": 1,
            "fields": [{"name": "x", "type": "uint32", "size": 4}]})
        })
        .collect();
    let mut s = ram_prefix();
    for i in 0..n {
        s.extend(full(10 + i, "dev", i, &i.to_be_bytes()));
    }
    s.extend(eof_and_vmdesc(
        &json!({"page_size": 4096, "devices": devices}),
    ));
    let (mut h, l) = load("4000 device sections", s);
    assert_eq!(l.status["status"], "completed", "{}", l.status);
    let ds = h.client.query_device_state().expect("query-device-state");
    let secs = ds["sections"].as_array().expect("sections");
    assert_eq!(secs.len(), n as usize);
    assert_eq!(secs[3999]["fields"], json!({"x": 3999}));
    assert_within("4000 sections", &l, BASE_MIB + 64, 20.0);
}

/// A device whose body is `n` bytes described as a `uint8` array: one JSON value per byte
/// if decoded naively.
fn big_section_stream(n: usize) -> Vec<u8> {
    let desc = desc_with(vec![
        json!({"name": "a", "type": "uint8", "size": 1, "array_len": n}),
    ]);
    let mut s = ram_prefix();
    s.extend(full(10, "dev", 0, &vec![0x5a; n]));
    s.extend(eof_and_vmdesc(&desc));
    s
}

#[test]
fn big_device_section_is_kept_but_not_decoded() {
    // 8 MiB: ~600 MiB decoded before. The section completes, keeps its bytes, and says
    // why it has no fields.
    let n = 8 << 20;
    let (mut h, l) = load("8 MiB uint8 device section", big_section_stream(n));
    assert_eq!(l.status["status"], "completed", "{}", l.status);
    // The query itself carries the section twice in base64: measured before it.
    assert_within("8 MiB section", &l, BASE_MIB + 3 * 8 + 32, 20.0);
    let ds = h.client.query_device_state().expect("query-device-state");
    let sec = &ds["sections"][0];
    assert_eq!(sec["idstr"], "dev");
    assert!(sec["fields"].is_null(), "decoded anyway");
    let why = sec["fields-error"].as_str().unwrap_or_default();
    assert!(why.contains("too large to decode"), "fields-error: {why:?}");
    assert_eq!(sec["data"].as_str().map(str::len), Some(n.div_ceil(3) * 4));
}

#[test]
fn device_section_of_64mib_does_not_abort() {
    // 64 MiB: the helper used to die of an allocation failure (SIGABRT). The device
    // state costs twice its size (held stream + kept section), the decode nothing.
    let n = 64 << 20;
    let (_h, l) = load("64 MiB uint8 device section", big_section_stream(n));
    assert_eq!(l.status["status"], "completed", "{}", l.status);
    assert_within("64 MiB section", &l, BASE_MIB + 2 * 64 + 48, 30.0);
}

#[test]
fn many_indexed_fields_group_in_linear_time() {
    // 80k indexed fields: 11 s in a destination with quadratic grouping.
    let n = 80_000;
    let fields: Vec<Value> = (0..n)
        .map(|i| json!({"name": format!("f{i}"), "type": "uint8", "size": 1, "index": 0}))
        .collect();
    let mut s = ram_prefix();
    s.extend(full(10, "dev", 0, &vec![1u8; n]));
    s.extend(eof_and_vmdesc(&desc_with(fields)));
    let (_h, l) = load("80k indexed fields", s);
    assert_eq!(l.status["status"], "completed", "{}", l.status);
    assert_within("80k indexed fields", &l, BASE_MIB + 96, 6.0);
}

#[test]
fn packaged_without_advise_is_refused_before_buffering() {
    // A plain precopy stream announcing a 1 GiB package (and sending 32 MiB of it): it
    // used to be buffered whole (2 GiB RSS) before LISTEN was found out of place.
    let mut s = ram_prefix();
    encode_command(&mut s, command::PACKAGED, &(1u32 << 30).to_be_bytes()).unwrap();
    s.extend(vec![0u8; 32 << 20]);
    let (_h, l) = load("1 GiB PACKAGED in precopy", s);
    assert_eq!(l.status["status"], "failed");
    let d = l.status["error-desc"].as_str().unwrap_or_default();
    assert!(d.contains("POSTCOPY_ADVISE"), "{d}");
    assert_within("PACKAGED without ADVISE", &l, BASE_MIB, 10.0);
}

/// Starts a program through a small python3 process that forks (not vfork) and reports
/// the child's ru_maxrss on stderr: a child spawned straight from this test process
/// would inherit the test's own peak (Linux keeps the pre-exec mm's high-water mark).
const MAXRSS_WRAPPER: &str = r#"
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, st, ru = os.wait4(pid, 0)
sys.stderr.write("MAXRSS_KIB %d\n" % ru.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))
"#;

/// Runs `analyze --json` on `bytes`; returns whether it succeeded, its stdout, the time
/// and its peak RSS in MiB.
fn analyze(what: &str, bytes: &[u8]) -> (bool, String, f64, u64) {
    let dir = TempDir::new("qmh-bounds");
    let path = dir.join("input.bin");
    std::fs::write(&path, bytes).expect("write");
    let t0 = Instant::now();
    let out = Command::new("python3")
        .arg("-c")
        .arg(MAXRSS_WRAPPER)
        .arg(helper_bin())
        .arg("analyze")
        .arg("--json")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run python3 (tests/install-deps.sh installs it)");
    let secs = t0.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code < 128,
        "{what}: analyze killed by signal {}: {err}",
        code - 128
    );
    let peak_mib = err
        .lines()
        .find_map(|l| l.strip_prefix("MAXRSS_KIB "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("MAXRSS_KIB line")
        / 1024;
    eprintln!("bounds: analyze {what}: exit {code} in {secs:.2} s, peak RSS {peak_mib} MiB");
    (
        code == 0,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        secs,
        peak_mib,
    )
}

#[test]
fn analyze_crafted_package_is_linear() {
    // PACKAGED whose device bytes are full of footer patterns each followed by 0x04:
    // 100 KB took 32 s, 1 MB never finished, with the backtracking splitter.
    let mut dev = Vec::new();
    for _ in 0..(1 << 20) / 10 {
        dev.extend_from_slice(&[0x04, 0, 0, 0, 3, 0x7e, 0, 0, 0, 3]);
    }
    let mut body = full(3, "timer", 0, &dev);
    body.extend(full(4, "other", 0, &[1, 2, 3]));
    let pkg = qemu_migration_helper::wire::postcopy::encode_package(&body).unwrap();
    let mut s = [head(), ram_start(&[("ram", BLOCK)])].concat();
    encode_command(&mut s, command::PACKAGED, &(pkg.len() as u32).to_be_bytes()).unwrap();
    s.extend(pkg);
    s.extend(ram_section(SectionKind::End, 1, &records(0..PAGES)));
    encode_eof(&mut s);
    let (ok, out, secs, peak) = analyze("1 MB crafted package", &s);
    assert!(ok, "analyze failed on a package it can split: {out}");
    assert!(secs < 5.0, "took {secs:.1} s");
    assert!(peak < BASE_MIB + 32, "peak RSS {peak} MiB");
}

#[test]
fn analyze_big_section_and_many_fields() {
    let (ok, out, secs, peak) = analyze("64 MiB uint8 section", &big_section_stream(64 << 20));
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).expect("analyze --json output");
    let sec = v["sections"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["idstr"] == "dev"))
        .cloned()
        .unwrap_or_default();
    assert!(
        sec["fields-error"]
            .as_str()
            .is_some_and(|e| e.contains("too large to decode")),
        "{sec}"
    );
    // The file is mapped (64 MiB of it resident at most) and nothing else grows with it.
    assert!(peak < BASE_MIB + 64 + 48, "peak RSS {peak} MiB");
    assert!(secs < 20.0, "took {secs:.1} s");

    let n = 80_000;
    let fields: Vec<Value> = (0..n)
        .map(|i| json!({"name": format!("f{i}"), "type": "uint8", "size": 1, "index": 0}))
        .collect();
    let mut s = ram_prefix();
    s.extend(full(10, "dev", 0, &vec![1u8; n]));
    s.extend(eof_and_vmdesc(&desc_with(fields)));
    let (ok, out, secs, peak) = analyze("80k indexed fields", &s);
    assert!(ok, "{out}");
    assert!(
        secs < 6.0,
        "80k fields took {secs:.1} s (9.8 s when quadratic)"
    );
    assert!(peak < BASE_MIB + 96, "peak RSS {peak} MiB");
}

/// Found by the `vmstate` fuzz target: a zero-size field repeated 65536 times consumes no
/// body byte but yields 65536 values, so before the stream-wide decode budget a 4 KB file
/// of such sections took `analyze` to 926 MB. 2000 devices of that shape, each with its
/// own description entry: the budget stops decoding early, in `analyze` and in a
/// destination alike.
#[test]
fn zero_size_fields_cannot_multiply_values() {
    let n = 2000;
    let devices: Vec<Value> = (0..n)
        .map(|i| {
            json!({"name": format!("d{i}"), "instance_id": 0, "vmsd_name": "d", "version": 1,
                "fields": [{"name": "a", "type": "x", "size": 0, "array_len": 65536}]})
        })
        .collect();
    let desc = json!({"page_size": 4096, "devices": devices});
    let mut s = ram_prefix();
    for i in 0..n {
        s.extend(full(10 + i as u32, &format!("d{i}"), 0, &[]));
    }
    s.extend(eof_and_vmdesc(&desc));
    let (ok, out, secs, peak) = analyze("2000 zero-size field arrays", &s);
    assert!(ok, "{out}");
    assert!(
        out.contains("too large to decode"),
        "the decode budget did not stop it"
    );
    assert!(peak < BASE_MIB + 64, "analyze: peak RSS {peak} MiB");
    assert!(secs < 20.0, "analyze took {secs:.1} s");
    let (_h, l) = load("2000 zero-size field arrays", s);
    assert_eq!(l.status["status"], "completed", "{}", l.status);
    assert_within("2000 zero-size field arrays", &l, BASE_MIB + 64, 20.0);
}

// ---- Source: a destination that floods the return path with page requests -----------------

const SRC_RAM: u64 = 32 << 20;

/// A source helper migrating a 32 MiB random guest into a fake destination (a socket this
/// test holds): returns the helper, the guest's bytes before, and our end of the socket.
fn flooded_source(test: &str) -> (HelperVm, Vec<u8>, std::os::unix::net::UnixStream) {
    use std::os::fd::AsFd;
    let mut src = HelperVm::spawn_quiet();
    src.add_block("ram", SRC_RAM, false);
    support::util::fill_mixed(
        &mut src.blocks[0].mem.map(),
        support::util::test_seed(test),
        0.0,
    );
    let before = src.blocks[0].mem.map().to_vec();
    src.client
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("caps");
    // Slow enough that precopy is still running when the flood starts.
    src.client
        .set_parameters(json!({"max-bandwidth": 4 << 20, "max-postcopy-bandwidth": 4 << 20}))
        .expect("params");
    let (a, b) = support::migrate::socketpair();
    src.client.getfd("mig", a.as_fd()).expect("getfd");
    drop(a);
    (src, before, std::os::unix::net::UnixStream::from(b))
}

/// Reads and drops everything the source sends, until it closes.
fn drain(s: &std::os::unix::net::UnixStream) -> std::thread::JoinHandle<u64> {
    use std::io::Read;
    let mut r = s.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut sink = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while let Ok(k) = r.read(&mut sink) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    })
}

/// Writes valid page requests (every page of the block, over and over) for `secs`, then
/// `tail`; returns the bytes of requests written.
fn flood(s: &std::os::unix::net::UnixStream, secs: f64, tail: Vec<u8>) -> u64 {
    use qemu_migration_helper::wire::return_path::{encode, RpMessage};
    use std::io::Write;
    let mut w = s.try_clone().expect("clone");
    w.set_write_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let mut first = Vec::new();
    encode(
        &mut first,
        &RpMessage::ReqPagesId {
            offset: 0,
            len: 4096,
            block: "ram",
        },
    )
    .unwrap();
    let _ = w.write_all(&first);
    let mut batch = Vec::new();
    for p in 0..SRC_RAM / 4096 {
        encode(
            &mut batch,
            &RpMessage::ReqPages {
                offset: p * 4096,
                len: 4096,
            },
        )
        .unwrap();
    }
    let t0 = Instant::now();
    let mut sent = first.len() as u64;
    while t0.elapsed().as_secs_f64() < secs {
        match w.write(&batch) {
            Ok(n) => sent += n as u64,
            // The source stopped reading for a while (its queues are full): go on trying.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    let _ = w.write_all(&tail);
    sent
}

#[test]
fn source_refuses_page_requests_in_precopy() {
    let (mut src, before, s) = flooded_source("source_refuses_page_requests_in_precopy");
    let base = peak_rss_kib(src.pid()) / 1024;
    let d = drain(&s);
    src.client.migrate("fd:mig").expect("migrate");
    let t0 = Instant::now();
    let sent = flood(&s, 3.0, Vec::new());
    let v = src.wait(&["failed", "completed"], std::time::Duration::from_secs(30));
    let secs = t0.elapsed().as_secs_f64();
    let peak = peak_rss_kib(src.pid()) / 1024;
    eprintln!(
        "bounds: REQ_PAGES flood in precopy: {} after {secs:.1} s, {} MiB of requests, source peak {peak} MiB (before {base} MiB)",
        v["status"],
        sent >> 20
    );
    assert_eq!(v["status"], "failed", "{v}");
    let desc = v["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("before postcopy"), "{desc}");
    assert!(src.alive());
    assert_eq!(
        src.client.query_migrate().expect("query")["status"],
        "failed"
    );
    assert!(
        peak <= base + (SRC_RAM >> 20) + 64,
        "source peak {peak} MiB, {base} MiB before"
    );
    drop(s);
    let _ = d.join();
    support::util::assert_same_memory(&before, &src.blocks[0].mem.map(), "source guest");
}

#[test]
fn source_queue_is_bounded_in_postcopy() {
    use qemu_migration_helper::wire::return_path::{encode, RpMessage};
    let (mut src, before, s) = flooded_source("source_queue_is_bounded_in_postcopy");
    let base = peak_rss_kib(src.pid()) / 1024;
    let d = drain(&s);
    src.client.migrate("fd:mig").expect("migrate");
    std::thread::sleep(std::time::Duration::from_millis(200));
    src.client.migrate_start_postcopy().expect("postcopy");
    src.wait(&["postcopy-active"], std::time::Duration::from_secs(30));
    let mut shut = Vec::new();
    encode(&mut shut, &RpMessage::Shut(0)).unwrap();
    // Five seconds of requests (the reported flood: 926 MiB in 10 s), then SHUT 0.
    let sent = flood(&s, 5.0, shut);
    let v = src.wait(&["completed", "failed"], std::time::Duration::from_secs(60));
    let peak = peak_rss_kib(src.pid()) / 1024;
    eprintln!(
        "bounds: REQ_PAGES flood in postcopy: {}, {} MiB of requests, source peak {peak} MiB (before {base} MiB)",
        v["status"],
        sent >> 20
    );
    assert_eq!(v["status"], "completed", "{v}");
    assert!(src.alive());
    assert!(
        peak <= base + (SRC_RAM >> 20) + 64,
        "source peak {peak} MiB, {base} MiB before the flood (the guest is {} MiB)",
        SRC_RAM >> 20
    );
    drop(s);
    let _ = d.join();
    support::util::assert_same_memory(&before, &src.blocks[0].mem.map(), "source guest");
}

#[test]
fn source_refuses_a_received_bitmap_it_did_not_ask_for() {
    use qemu_migration_helper::wire::return_path::{encode, RpMessage};
    use std::io::Write;
    let (mut src, before, s) = flooded_source("source_refuses_a_received_bitmap");
    let d = drain(&s);
    src.client.migrate("fd:mig").expect("migrate");
    // A bitmap header announcing the block's whole bitmap: refused at the header, before
    // its tail would be buffered.
    let mut m = Vec::new();
    encode(&mut m, &RpMessage::RecvBitmap { block: "ram" }).unwrap();
    m.extend_from_slice(&(SRC_RAM / 4096 / 8).to_be_bytes());
    (&s).write_all(&m).expect("write");
    let v = src.wait(&["failed", "completed"], std::time::Duration::from_secs(30));
    assert_eq!(v["status"], "failed", "{v}");
    let desc = v["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("not asked for"), "{desc}");
    assert!(src.alive());
    drop(s);
    let _ = d.join();
    support::util::assert_same_memory(&before, &src.blocks[0].mem.map(), "source guest");
}
