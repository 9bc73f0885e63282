//! Bad input never panics, hangs or kills the helper: truncated and corrupted QEMU streams,
//! hand-built malformed streams, and malformed control-channel input. A bad stream ends in
//! `failed` with an `error-desc`; afterwards the same helper process still answers
//! `query-migrate` and a good migration on it still works (checked once per category).
//! Also: a stalled source (socket, pipe) can be cancelled, a FIFO given as `file:` does not
//! block the control channel, a 100 MiB line is refused in bounded memory and time, and a
//! control client that does not read its replies does not stall a migration.
//!
//! Loads that hang, kill the helper or break the control channel are collected (the helper
//! is replaced and the run goes on) and reported together at the end of each test.

use std::collections::BTreeMap;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use qemu_migration_helper::compat::wire::{command, ram as flag, section};
use qemu_migration_helper::wire::ram::{encode_eos, BlockEntry};
use qemu_migration_helper::wire::stream::{
    encode_command, encode_eof, encode_footer, encode_section_start, encode_vmdesc, put_be16,
    put_be32, put_be64, put_str8, SectionKind,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::files::{
    check_images, fixture_path, helper_for, load_file, prefill, ItemKind, StreamMap,
};
use crate::streams::*;
use support::helper::{helper_bin, HelperVm, Memfd};
use support::migrate::socketpair;
use support::util::{assert_same_memory, test_seed, TempDir, MIB, PAGE_SIZE};

/// Every wait for a migration to end has this deadline: a bad stream must never hang.
const DEADLINE: Duration = Duration::from_secs(20);
const QUIET: &[&str] = &["--log-level", "warn"];

/// Runs loads against one helper, replacing it (and noting why) only when it hung or died,
/// so that one helper bug does not hide the others.
struct Runner {
    test: &'static str,
    blocks: Vec<BlockEntry>,
    helper: HelperVm,
    problems: Vec<String>,
    loads: usize,
}

/// How one load ended.
enum Outcome {
    Completed,
    Failed(String),
    Cancelled,
    /// Hung, died or the control channel broke (already recorded as a problem).
    Broken,
}

impl Runner {
    fn new(test: &'static str, blocks: &[BlockEntry]) -> Runner {
        Runner {
            test,
            blocks: blocks.to_vec(),
            helper: helper_for(blocks, QUIET),
            problems: Vec::new(),
            loads: 0,
        }
    }

    /// After the damaged variants, the same helper (unless it had to be replaced) loads the
    /// intact stream `name` into a prefilled guest, which must then match it.
    fn load_intact(&mut self, dir: &TempDir, bytes: &[u8], map: &StreamMap, name: &str) {
        prefill(&self.helper);
        match self.load(dir, bytes, &format!("{name} intact")) {
            Outcome::Completed => check_images(&self.helper, map, self.test),
            Outcome::Failed(d) => self.problem(format!("{name} intact: failed: {d}")),
            Outcome::Cancelled => self.problem(format!("{name} intact: cancelled")),
            Outcome::Broken => {}
        }
    }

    /// Loads `bytes` through a file in `dir` and checks the helper survived and answers.
    fn load(&mut self, dir: &TempDir, bytes: &[u8], what: &str) -> Outcome {
        let path = dir.join("input.bin");
        std::fs::write(&path, bytes).expect("write input file");
        let r = load_file(&mut self.helper, &path, DEADLINE);
        self.settle(r, what)
    }

    fn settle(&mut self, r: Result<Value, String>, what: &str) -> Outcome {
        self.loads += 1;
        let outcome = match r {
            Ok(v) if v["status"] == "completed" => Outcome::Completed,
            Ok(v) if v["status"] == "cancelled" => Outcome::Cancelled,
            Ok(v) => match v["error-desc"].as_str() {
                Some(d) if !d.is_empty() => Outcome::Failed(d.to_string()),
                _ => {
                    self.problems
                        .push(format!("{what}: failed without an error-desc: {v}"));
                    Outcome::Failed(String::new())
                }
            },
            Err(e) => {
                let alive = self.helper.alive();
                self.problems.push(format!(
                    "{what}: helper pid {} {} ({e})",
                    self.helper.pid(),
                    if alive {
                        "never reached completed/failed (hang)"
                    } else {
                        "DIED"
                    }
                ));
                self.respawn();
                return Outcome::Broken;
            }
        };
        if !self.helper.alive() {
            self.problems
                .push(format!("{what}: helper died after the load"));
            self.respawn();
            return Outcome::Broken;
        }
        match self.helper.client.query_migrate() {
            Ok(v) if v["status"].is_string() => outcome,
            other => {
                self.problems
                    .push(format!("{what}: query-migrate afterwards: {other:?}"));
                self.respawn();
                Outcome::Broken
            }
        }
    }

    fn respawn(&mut self) {
        eprintln!("{}: replacing helper pid {}", self.test, self.helper.pid());
        self.helper = helper_for(&self.blocks, QUIET);
    }

    fn problem(&mut self, p: String) {
        self.problems.push(p);
    }

    /// Fails the test listing every problem seen.
    fn finish(self) {
        eprintln!(
            "{}: {} loads, {} problems",
            self.test,
            self.loads,
            self.problems.len()
        );
        assert!(
            self.problems.is_empty(),
            "{}: {} problem(s):\n  {}",
            self.test,
            self.problems.len(),
            self.problems.join("\n  ")
        );
    }
}

/// The stream offset named in an error-desc ("at stream offset N", "early at offset N").
fn reported_offset(desc: &str) -> Option<u64> {
    ["stream offset ", "at offset "].iter().find_map(|pat| {
        let i = desc.find(pat)? + pat.len();
        let digits: String = desc[i..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// Cut points across every part of a complete stream: offset -> where it falls.
fn cut_points(map: &StreamMap, len: usize) -> BTreeMap<usize, String> {
    let mut cuts = BTreeMap::new();
    let mut add = |off: usize, what: &str| {
        if off < len {
            cuts.entry(off).or_insert_with(|| what.to_string());
        }
    };
    for off in [0, 1, 4, 7] {
        add(off, "in the header");
    }
    if let Some(c) = map.find(&ItemKind::Configuration) {
        let r = c.range.clone();
        add(r.start, "right after the header");
        for d in [1, 3, 5] {
            add(r.start + d, "in the configuration");
        }
        add(r.end - 1, "at the configuration's last byte");
    }
    let ram: Vec<_> = map.ram_sections().cloned().collect();
    let start = &ram[0].range;
    add(start.start, "before the RAM START");
    add(start.start + 1, "in the RAM START header (section id)");
    add(start.start + 7, "in the RAM START idstr");
    add(start.start + 17, "at the RAM block list");
    add(start.start + 21, "in the RAM total");
    add(start.start + 26, "in the first block entry");
    add(start.end - 13, "in the RAM START's EOS");
    add(start.end - 5, "at the RAM START footer");
    add(start.end - 2, "in the RAM START footer");
    let part = &ram[1].range;
    add(part.start, "before the first RAM PART");
    add(part.start + 3, "in the first PART header");
    add(part.start + 9, "in the first page record's flags");
    add(part.start + 14, "in the first page record's block name");
    let n = map.page_records.len();
    for k in 1..=8 {
        let rec = map.page_records[k * n / 9];
        add(rec, "at a page record");
        add(rec + 3, "in a page record's flags");
        add(rec + 11, "in a page record's name or data");
        add(rec + 1500, "in page data");
    }
    let last = &ram[ram.len() - 1].range;
    add(last.start, "before the last RAM section");
    add(last.start + 2, "in the last RAM section's header");
    add(last.end - 8, "in the last RAM section's EOS");
    add(last.end - 1, "in the last RAM section's footer");
    let devs: Vec<_> = map.devices().cloned().collect();
    for (i, d) in devs.iter().enumerate() {
        let r = &d.range;
        let name = match &d.kind {
            ItemKind::Device { idstr, .. } => idstr.clone(),
            _ => unreachable!(),
        };
        if i == 0 || i == devs.len() - 1 || i % (devs.len() / 5).max(1) == 0 {
            add(r.start, &format!("before device section {name}"));
            add(r.start + 3, &format!("in the header of {name}"));
            add((r.start + r.end) / 2, &format!("in the body of {name}"));
            add(r.end - 5, &format!("at the footer of {name}"));
            add(r.end - 1, &format!("in the footer of {name}"));
        }
    }
    let eof = map.find(&ItemKind::Eof).expect("EOF").range.start;
    add(eof, "before EOF");
    // The helper knows no devices: it delimits the device sections with the trailing VM
    // description, so a stream whose description is missing or cut short cannot be loaded
    // even though QEMU (which reads and drops the description) would take it. Every cut in
    // or before the description must therefore fail, like every cut before it.
    add(eof + 1, "right after EOF (no VM description)");
    add(eof + 2, "after the VM description's type byte");
    add(eof + 4, "in the VM description's length");
    add(eof + 6, "after the VM description's length");
    add(eof + 7, "at the VM description's first byte");
    add((eof + len) / 2, "in the VM description JSON");
    add(len - 2, "in the VM description JSON's end");
    add(len - 1, "before the VM description's last byte");
    cuts
}

/// A fixture cut at ~60 points across every part of it, each loaded by the same helper:
/// `failed`, with an error-desc naming the offset where the stream ended; then the whole
/// fixture still loads on that helper.
fn truncations(name: &str, test: &'static str) {
    let Some(path) = fixture_path(test, name) else {
        return;
    };
    let t0 = Instant::now();
    let bytes = std::fs::read(&path).expect("read fixture");
    let map = StreamMap::walk(&bytes);
    let cuts = cut_points(&map, bytes.len());
    eprintln!("{test}: {} cut points in {} bytes", cuts.len(), bytes.len());
    let dir = TempDir::new("qmh-bad");
    let mut run = Runner::new(test, &map.blocks);
    for (&cut, where_) in &cuts {
        let what = format!("{name} cut at {cut} ({where_})");
        match run.load(&dir, &bytes[..cut], &what) {
            Outcome::Completed => run.problem(format!("{what}: reached completed")),
            Outcome::Failed(desc) => {
                if !desc.contains("offset") {
                    run.problem(format!("{what}: error-desc names no offset: {desc:?}"));
                }
                match reported_offset(&desc) {
                    Some(o) if o > cut as u64 => run.problem(format!(
                        "{what}: error-desc names offset {o}, past the end of the input: \
                         {desc:?}"
                    )),
                    // A stream that ends early is reported where it ended.
                    Some(o) if desc.contains("ended early") && o != cut as u64 => {
                        run.problem(format!("{what}: says it ended at {o}: {desc:?}"))
                    }
                    _ => {}
                }
            }
            Outcome::Cancelled => run.problem(format!("{what}: cancelled")),
            Outcome::Broken => {}
        }
    }
    run.load_intact(&dir, &bytes, &map, name);
    eprintln!("{test}: took {:?}", t0.elapsed());
    run.finish();
}

#[test]
fn truncated_none_16m_pattern_qemu10() {
    truncations(
        "none-16M-pattern-qemu10.0.bin",
        "truncated_none_16m_pattern_qemu10",
    );
}

#[test]
fn truncated_pc_128m_qemu10() {
    truncations("pc-128M-qemu10.0.bin", "truncated_pc_128m_qemu10");
}

#[test]
fn truncated_q35_128m_qemu10() {
    truncations("q35-128M-qemu10.0.bin", "truncated_q35_128m_qemu10");
}

#[test]
fn truncated_pc_128m_qemu72() {
    truncations("pc-128M-qemu7.2.bin", "truncated_pc_128m_qemu72");
}

/// `variants` (or `QMH_FLIP_VARIANTS`) copies of a fixture with 1 to 8 random bytes changed, half in the first
/// 64 KiB (header, configuration, block list, first pages), half in the device sections
/// and VM description: each ends `completed` or `failed` within the deadline, with the
/// helper alive; then the intact fixture still loads on the same helper.
fn flips(name: &str, test: &'static str, variants: usize) {
    let Some(path) = fixture_path(test, name) else {
        return;
    };
    let t0 = Instant::now();
    let bytes = std::fs::read(&path).expect("read fixture");
    let map = StreamMap::walk(&bytes);
    let devices = map.devices().next().expect("device sections").range.start;
    let seed = test_seed(test);
    let mut rng = SmallRng::seed_from_u64(seed);
    // QMH_FLIP_VARIANTS=N runs more (or fewer) variants, e.g. to fuzz for a while.
    let variants = std::env::var("QMH_FLIP_VARIANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(variants);
    let dir = TempDir::new("qmh-bad");
    let mut run = Runner::new(test, &map.blocks);
    let (mut completed, mut failed) = (0, 0);
    for v in 0..variants {
        let area = if v % 2 == 0 {
            0..bytes.len().min(64 << 10)
        } else {
            devices..bytes.len()
        };
        let mut b = bytes.clone();
        let mut changed = Vec::new();
        for _ in 0..rng.gen_range(1..=8) {
            let at = rng.gen_range(area.clone());
            b[at] ^= rng.gen_range(1..=255u8);
            changed.push(format!("{at}:{:02x}->{:02x}", bytes[at], b[at]));
        }
        let what = format!(
            "{name} variant {v} (seed {seed}) bytes {}",
            changed.join(",")
        );
        match run.load(&dir, &b, &what) {
            Outcome::Completed => completed += 1,
            Outcome::Failed(_) => failed += 1,
            Outcome::Cancelled => run.problem(format!("{what}: cancelled")),
            Outcome::Broken => {}
        }
    }
    eprintln!("{test}: {completed} completed, {failed} failed of {variants}");
    run.load_intact(&dir, &bytes, &map, name);
    eprintln!("{test}: took {:?}", t0.elapsed());
    run.finish();
}

#[test]
fn flipped_pc_128m_qemu10() {
    flips("pc-128M-qemu10.0.bin", "flipped_pc_128m_qemu10", 60);
}

#[test]
fn flipped_none_16m_pattern_qemu10() {
    flips(
        "none-16M-pattern-qemu10.0.bin",
        "flipped_none_16m_pattern_qemu10",
        40,
    );
}

#[test]
fn flipped_q35_128m_qemu10() {
    flips("q35-128M-qemu10.0.bin", "flipped_q35_128m_qemu10", 40);
}

// ---- Hand-built streams -------------------------------------------------------------------

// The stream builders are in streams.rs, shared with bounds.rs.

/// The malformed streams: (what, stream, keyword the error-desc must contain).
fn bad_streams() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good = good_stream();
    let page0 = page_content(0);
    let mut v: Vec<(&'static str, Vec<u8>, &'static str)> = Vec::new();

    let mut b = good.clone();
    b[..4].copy_from_slice(b"\x7fELF");
    v.push(("bad magic", b, "magic"));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&2u32.to_be_bytes());
    v.push(("stream version 2", b, "version 2"));
    v.push(("empty stream", Vec::new(), "ended early"));
    v.push(("header only", good[..8].to_vec(), "ended early"));

    let mut b = head();
    b.push(section::SUBSECTION);
    put_str8(&mut b, "configuration/capabilities").unwrap();
    put_be32(&mut b, 1);
    put_be32(&mut b, 1);
    put_str8(&mut b, "mapped-ram").unwrap();
    b.extend_from_slice(&good[head().len()..]);
    v.push((
        "configuration capability mapped-ram",
        b,
        "Capability mapped-ram is off, but received capability is on",
    ));

    let mut b = good_prefix();
    b.push(0x42);
    b.extend_from_slice(&tail());
    v.push(("unknown section type 0x42", b, "unknown section type"));

    let mut b = good_prefix();
    b.push(section::SUBSECTION);
    v.push((
        "a SUBSECTION at the top level",
        b,
        "unexpected section type",
    ));

    let b = [
        good_prefix(),
        ram_section(SectionKind::Part, 7, &records(0..4)),
        tail(),
    ]
    .concat();
    v.push(("PART for section id 7, never started", b, "never started"));

    let b = [
        head(),
        ram_section(SectionKind::Part, 1, &records(0..4)),
        tail(),
    ]
    .concat();
    v.push(("PART before any START", b, "never started"));

    let b = [good_prefix(), ram_start(&[("ram", BLOCK)]), tail()].concat();
    v.push(("a second RAM START", b, "second RAM START"));

    let mut b = head();
    let mut h4 = Vec::new();
    encode_section_start(&mut h4, SectionKind::Start, &ram_header(1, 4)).unwrap();
    encode_section_start(&mut b, SectionKind::Start, &ram_header(1, 3)).unwrap();
    b.extend_from_slice(&ram_start(&[("ram", BLOCK)])[h4.len()..]);
    b.extend_from_slice(&tail());
    v.push(("RAM START version 3", b, "version 3"));

    let mut b = [good_prefix(), ram_section(SectionKind::End, 1, &[])].concat();
    encode_eof(&mut b);
    b.push(section::VMDESCRIPTION);
    put_be32(&mut b, 0xffff_fff0);
    b.extend_from_slice(b"{}");
    v.push(("VM description of 4 GiB", b, "VM description"));

    let b = [
        head(),
        ram_start(&[("ram", BLOCK), ("extra", 4096)]),
        tail(),
    ]
    .concat();
    v.push(("block list with an unregistered block", b, "not registered"));

    let b = [head(), ram_start(&[("ram-longer", BLOCK)]), tail()].concat();
    v.push((
        "block list name longer than the registered one",
        b,
        "not registered",
    ));

    let b = [head(), ram_start(&[("ram", 2 * BLOCK)]), tail()].concat();
    v.push(("block list with the block twice as big", b, "0x200000"));

    let mut b = head();
    encode_section_start(&mut b, SectionKind::Start, &ram_header(1, 4)).unwrap();
    put_be64(&mut b, 4096 | flag::MEM_SIZE);
    put_str8(&mut b, "ram").unwrap();
    put_be64(&mut b, BLOCK);
    encode_eos(&mut b);
    encode_footer(&mut b, 1);
    b.extend_from_slice(&tail());
    v.push(("block lengths exceed the announced total", b, "exceed"));

    v.push((
        "page record for block \"ram\\0\" (longer than registered)",
        with_record(flag::PAGE, &named("ram\0", &page0)),
        "unknown RAM block",
    ));
    v.push((
        "page record for unknown block \"rom\"",
        with_record(flag::ZERO, &named("rom", &[0])),
        "unknown RAM block",
    ));
    v.push((
        "page at the block's end",
        with_record(BLOCK | flag::PAGE, &named("ram", &page0)),
        "outside",
    ));
    v.push((
        "zero page far beyond the block",
        with_record(0x7fff_ffff_f000 | flag::ZERO, &named("ram", &[0])),
        "outside",
    ));
    v.push((
        "RAM flag 0x800",
        with_record(0x800, &named("ram", &page0)),
        "unknown RAM flags",
    ));
    v.push((
        "RAM flags ZERO|PAGE together",
        with_record(flag::ZERO | flag::PAGE, &named("ram", &page0)),
        "unknown RAM flags",
    ));
    v.push((
        "RAM flags EOS|CONTINUE",
        with_record(flag::EOS | flag::CONTINUE, &[]),
        "unknown RAM flags",
    ));
    v.push((
        "CONTINUE page with no previous block",
        with_record(flag::PAGE | flag::CONTINUE, &page0),
        "no previous block",
    ));
    v.push((
        "XBZRLE page",
        with_record(flag::XBZRLE, &named("ram", &[1, 0, 0])),
        "not supported",
    ));
    v.push((
        "block list (MEM_SIZE) inside a PART",
        with_record(BLOCK | flag::MEM_SIZE, &named("ram", &BLOCK.to_be_bytes())),
        "block list",
    ));

    let mut b = good_prefix();
    b.extend_from_slice(&[section::COMMAND]);
    put_be16(&mut b, command::PING);
    put_be16(&mut b, 2);
    b.extend_from_slice(&[0, 1]);
    b.extend_from_slice(&tail());
    v.push(("PING command with length 2", b, "length"));

    let mut b = good_prefix();
    encode_command(&mut b, command::OPEN_RETURN_PATH, &[0, 0, 0, 0]).unwrap();
    b.extend_from_slice(&tail());
    v.push(("OPEN_RETURN_PATH with length 4", b, "length"));

    let mut b = good_prefix();
    encode_command(&mut b, 99, &[]).unwrap();
    b.extend_from_slice(&tail());
    v.push(("unknown command 99", b, "command 99"));

    let mut b = head();
    b.extend_from_slice(&ram_start(&[("ram", BLOCK)])[..ram_start(&[("ram", BLOCK)]).len() - 5]);
    encode_footer(&mut b, 9);
    b.extend_from_slice(&tail());
    v.push(("footer for the wrong section", b, "footer"));

    let b = [
        head(),
        ram_start(&[("ram", BLOCK)])[..ram_start(&[("ram", BLOCK)]).len() - 5].to_vec(),
        tail(),
    ]
    .concat();
    v.push(("RAM START without its footer", b, "footer"));

    let b = [good_prefix(), device_section(), vec![section::EOF]].concat();
    v.push((
        "device section, no VM description",
        b,
        "without a VM description",
    ));

    let b = [good_prefix(), device_section(), vmdesc_with_dev(4)].concat();
    v.push(("device section longer than described", b, "footer"));

    let mut b = [good_prefix(), device_section()].concat();
    encode_eof(&mut b);
    encode_vmdesc(&mut b, br#"{"page_size":4096,"devices":[]}"#).unwrap();
    v.push((
        "device section missing from the VM description",
        b,
        "not in the VM description",
    ));

    v
}

#[test]
fn hand_built_streams() {
    let t0 = Instant::now();
    let blocks = [BlockEntry {
        idstr: "ram".into(),
        used_length: BLOCK,
        page_size: None,
    }];
    let mut run = Runner::new("hand_built_streams", &blocks);
    let want = image();

    // The good stream works, so each bad one fails for its own reason.
    let r = load_over_socket(&mut run.helper, good_stream());
    if let Outcome::Completed = run.settle(r, "good stream (first)") {
        assert_same_memory(&want, &run.helper.blocks[0].mem.map(), "good stream");
    } else {
        panic!(
            "the good hand-built stream does not load: {:?}",
            run.problems
        );
    }

    let cases = bad_streams();
    for (what, stream, keyword) in cases.iter().cloned() {
        let r = load_over_socket(&mut run.helper, stream);
        match run.settle(r, what) {
            Outcome::Completed => run.problem(format!("{what}: reached completed")),
            Outcome::Failed(desc) => {
                eprintln!("hand_built_streams: {what}: {desc}");
                if !desc.to_lowercase().contains(&keyword.to_lowercase()) {
                    run.problem(format!(
                        "{what}: error-desc does not mention {keyword:?}: {desc:?}"
                    ));
                }
                if !desc.contains("offset") {
                    run.problem(format!("{what}: error-desc names no offset: {desc:?}"));
                }
            }
            Outcome::Cancelled => run.problem(format!("{what}: cancelled")),
            Outcome::Broken => {}
        }
    }

    // The same helper still loads a good stream, into memory that held something else.
    prefill(&run.helper);
    let r = load_over_socket(&mut run.helper, good_stream());
    if let Outcome::Completed = run.settle(r, "good stream (last)") {
        assert_same_memory(&want, &run.helper.blocks[0].mem.map(), "good stream after");
    } else {
        run.problem("the good stream does not load after the bad ones".into());
    }
    eprintln!(
        "hand_built_streams: {} bad streams, took {:?}",
        cases.len(),
        t0.elapsed()
    );
    run.finish();
}

/// A source that sends part of a stream and then neither sends more nor closes: the
/// helper waits (as QEMU does), but `migrate_cancel` ends the migration at once, over a
/// socket and over a pipe, and the same helper then loads a good stream.
fn stalled_then_cancelled(pipe: bool, test: &'static str) {
    let blocks = [BlockEntry {
        idstr: "ram".into(),
        used_length: BLOCK,
        page_size: None,
    }];
    let mut run = Runner::new(test, &blocks);
    let good = good_stream();
    // The header, the RAM START and some pages; not EOS, not EOF.
    let partial = good[..good_prefix().len() + 5 + 20 * (PAGE_SIZE + 8)].to_vec();
    for (what, cut) in [
        ("stalled in page data", partial.len()),
        ("stalled after the header", 8),
    ] {
        let (reader, writer): (OwnedFd, OwnedFd) = if pipe {
            let (r, w) = nix::unistd::pipe().unwrap();
            (r, w)
        } else {
            let (w, r) = socketpair();
            (r, w)
        };
        run.helper
            .client
            .getfd("mig", reader.as_fd())
            .expect("getfd");
        drop(reader);
        run.helper
            .client
            .migrate_incoming("fd:mig")
            .expect("migrate-incoming");
        let mut w = std::fs::File::from(writer);
        w.write_all(&partial[..cut]).unwrap();
        // The helper has read what there is and waits for more.
        let deadline = Instant::now() + DEADLINE;
        loop {
            let v = run.helper.client.query_migrate().expect("query-migrate");
            if v["status"] == "active" && v["ram"]["normal"].as_u64().unwrap_or(0) >= 1 || cut == 8
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{test}: {what}: not loading: {v}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        run.helper.client.migrate_cancel().expect("migrate_cancel");
        let r = run
            .helper
            .client
            .wait_for_status(&["cancelled", "failed"], Duration::from_secs(5))
            .map_err(|e| format!("after migrate_cancel: {e}"));
        eprintln!(
            "{test}: {what}: migrate_cancel took {:?}: {r:?}",
            t.elapsed()
        );
        let ok = matches!(&r, Ok(v) if v["status"] == "cancelled");
        if !ok {
            run.problem(format!(
                "{what} ({}): migrate_cancel did not end the migration within 5 s: {r:?}",
                if pipe { "pipe" } else { "socket" }
            ));
            // Unblock the helper so that it can be checked and reused.
            drop(w);
            let r = run
                .helper
                .client
                .wait_for_status(&["cancelled", "failed", "completed"], DEADLINE);
            eprintln!("{test}: {what}: after closing the writer: {r:?}");
            run.settle(r.map_err(|e| e.to_string()), what);
        } else {
            drop(w);
            run.settle(r, what);
        }
    }
    prefill(&run.helper);
    let r = load_over_socket(&mut run.helper, good);
    if let Outcome::Completed = run.settle(r, "good stream after the cancels") {
        assert_same_memory(&image(), &run.helper.blocks[0].mem.map(), test);
    } else {
        run.problem("the good stream does not load after the cancels".into());
    }
    run.finish();
}

#[test]
fn stalled_socket_input_cancelled() {
    stalled_then_cancelled(false, "stalled_socket_input_cancelled");
}

#[test]
fn stalled_pipe_input_cancelled() {
    stalled_then_cancelled(true, "stalled_pipe_input_cancelled");
}

/// A source helper writing into a pipe that nobody reads: `migrate_cancel` ends the
/// migration at once and the helper can migrate again.
#[test]
fn stalled_pipe_output_cancelled() {
    let test = "stalled_pipe_output_cancelled";
    let mut h = HelperVm::spawn_with_args(QUIET);
    h.add_block("ram", 4 * MIB, false);
    support::util::fill_mixed(&mut h.blocks[0].mem.map(), 1, 0.1);
    let (r, w) = nix::unistd::pipe().unwrap();
    h.client.getfd("out", w.as_fd()).expect("getfd");
    drop(w);
    h.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    h.client.migrate("fd:out").expect("migrate");
    // The pipe (64 KiB) is full long before 4 MiB are written.
    std::thread::sleep(Duration::from_millis(300));
    let v = h.client.query_migrate().expect("query-migrate");
    assert_eq!(v["status"], "active", "{test}: {v}");
    let t = Instant::now();
    h.client.migrate_cancel().expect("migrate_cancel");
    let res = h
        .client
        .wait_for_status(&["cancelled", "failed"], Duration::from_secs(5));
    eprintln!("{test}: migrate_cancel took {:?}: {res:?}", t.elapsed());
    // Unblock the helper whatever happened, so that it can be checked.
    drop(r);
    let after = h
        .client
        .wait_for_status(&["cancelled", "failed"], DEADLINE)
        .expect("status after the reader went away");
    assert!(h.alive(), "{test}: helper died");
    // And it migrates again.
    let dir = TempDir::new("qmh-bad");
    let file = dir.join("out.mig");
    h.client
        .migrate(&format!("file:{}", file.display()))
        .expect("migrate file:");
    h.wait(&["completed"], DEADLINE);
    assert!(
        matches!(&res, Ok(v) if v["status"] == "cancelled"),
        "{test}: migrate_cancel did not end a source blocked on a full pipe within 5 s \
         ({res:?}); only closing the pipe's read end did ({})",
        after["status"]
    );
}

/// `migrate-incoming file:PATH` where PATH is a FIFO with no writer yet: opening it for
/// reading blocks until a writer comes, which must not stop the control channel (the
/// protocol: it never waits on migration I/O). The stream then arrives through the FIFO.
#[test]
fn incoming_file_fifo_keeps_control_answering() {
    let test = "incoming_file_fifo_keeps_control_answering";
    let dir = TempDir::new("qmh-bad");
    let fifo = dir.join("in.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let blocks = [BlockEntry {
        idstr: "ram".into(),
        used_length: BLOCK,
        page_size: None,
    }];
    let mut h = helper_for(&blocks, QUIET);
    h.client.set_timeout(Duration::from_secs(3)).unwrap();
    let t = Instant::now();
    let started = h
        .client
        .migrate_incoming(&format!("file:{}", fifo.display()));
    let took = t.elapsed();
    let answered = h.client.query_migrate();
    eprintln!("{test}: migrate-incoming took {took:?}: {started:?}; query-migrate: {answered:?}");
    // Whatever happened, give the helper its writer and the stream.
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let _ = f.write_all(&good_stream());
    });
    h.client.set_timeout(DEADLINE).unwrap();
    let end = h.client.wait_for_status(&["completed", "failed"], DEADLINE);
    writer.join().unwrap();
    assert!(h.alive(), "{test}: helper died");
    assert!(
        took < Duration::from_secs(2) && answered.is_ok(),
        "{test}: migrate-incoming on a FIFO blocked the control channel until a writer \
         opened it ({took:?}: {started:?}; query-migrate meanwhile: {answered:?})"
    );
    let end = end.expect("loading through the FIFO");
    assert_eq!(end["status"], "completed", "{test}: {end}");
    assert_same_memory(&image(), &h.blocks[0].mem.map(), test);
}

// ---- The control channel ------------------------------------------------------------------

/// A helper started with `--control-socket PATH`, spoken to with raw bytes.
pub(crate) struct SocketHelper {
    pub(crate) child: Child,
    pub(crate) path: PathBuf,
    pub(crate) _dir: TempDir,
}

impl SocketHelper {
    pub(crate) fn spawn() -> SocketHelper {
        SocketHelper::spawn_with(QUIET, Stdio::inherit(), false)
    }

    /// A helper on `--control-socket` with `args` in a fresh directory others may traverse
    /// (the access tests connect as nobody); with `umask0`, started with umask 0.
    pub(crate) fn spawn_with(args: &[&str], stderr: Stdio, umask0: bool) -> SocketHelper {
        let dir = TempDir::new("qmh-control");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("control.sock");
        let mut cmd = Command::new(helper_bin());
        cmd.arg("--control-socket")
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .stderr(stderr);
        if umask0 {
            // SAFETY: umask is async-signal-safe; runs in the child only.
            unsafe {
                cmd.pre_exec(|| {
                    libc::umask(0);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn helper");
        SocketHelper {
            child,
            path,
            _dir: dir,
        }
    }

    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Connects (retrying while the helper starts) and reads the greeting.
    pub(crate) fn connect(&mut self) -> Raw {
        self.connect_within(Duration::from_secs(5))
    }

    /// `connect`, waiting up to `greeting` for the greeting (the helper serves one client
    /// at a time).
    pub(crate) fn connect_within(&mut self, greeting: Duration) -> Raw {
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match UnixStream::connect(&self.path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(self.alive(), "helper exited before listening");
                    assert!(Instant::now() < deadline, "connect: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut raw = Raw { s, buf: Vec::new() };
        let g = raw.read_msg_within(greeting);
        assert!(
            g["QMP"]["version"]["qemu"]["major"].is_u64(),
            "greeting {g}"
        );
        assert_eq!(g["QMP"]["capabilities"], json!(["oob"]), "greeting {g}");
        raw
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        support::util::peak_rss_kib(self.child.id())
    }
}

impl Drop for SocketHelper {
    fn drop(&mut self) {
        if let Ok(s) = UnixStream::connect(&self.path) {
            let mut r = Raw { s, buf: Vec::new() };
            let _ = r.s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ =
                r.s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
            let mut sink = [0u8; 4096];
            while matches!(r.s.read(&mut sink), Ok(n) if n > 0) {}
        }
        for _ in 0..100 {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw control connection.
pub(crate) struct Raw {
    pub(crate) s: UnixStream,
    buf: Vec<u8>,
}

impl Raw {
    /// The next message that is not an event (5 s deadline).
    pub(crate) fn read_msg(&mut self) -> Value {
        self.read_msg_within(Duration::from_secs(5))
    }

    pub(crate) fn read_msg_within(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let v: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!(
                        "helper sent bad JSON {:?}: {e}",
                        String::from_utf8_lossy(&line)
                    )
                });
                if v.get("event").is_some() {
                    continue;
                }
                return v;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .unwrap_or_else(|| panic!("no reply from the helper within {timeout:?}"));
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => panic!("helper closed the control connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("reading the control connection: {e}"),
            }
        }
    }

    /// Sends `line` (a newline is added) and returns the reply.
    pub(crate) fn cmd(&mut self, line: &str) -> Value {
        // One write: the object is complete without the newline, and after `quit` the
        // helper may be gone before a second write.
        self.s.write_all(format!("{line}\n").as_bytes()).unwrap();
        self.read_msg()
    }

    /// Sends `line` with `fds` attached as SCM_RIGHTS and returns the reply.
    pub(crate) fn cmd_fds(&mut self, line: &str, fds: &[RawFd]) -> Value {
        let data = format!("{line}\n");
        let n = sendmsg::<()>(
            self.s.as_raw_fd(),
            &[IoSlice::new(data.as_bytes())],
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .expect("sendmsg");
        self.s.write_all(&data.as_bytes()[n..]).unwrap();
        self.read_msg()
    }

    pub(crate) fn ok(&mut self, line: &str) -> Value {
        let r = self.cmd(line);
        assert!(r.get("return").is_some(), "{line} -> {r}");
        r["return"].clone()
    }

    pub(crate) fn status(&mut self) -> String {
        let r = self.ok(r#"{"execute":"query-migrate"}"#);
        r["status"].as_str().expect("status").to_string()
    }
}

/// Asserts `reply` is an error whose desc mentions `keyword`, and that the helper still
/// answers `query-migrate` on the same connection.
fn expect_error(raw: &mut Raw, what: &str, reply: &Value, keyword: &str) {
    let desc = reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected an error reply, got {reply}"));
    assert!(
        reply["error"]["class"].is_string(),
        "{what}: error without class: {reply}"
    );
    assert!(
        desc.to_lowercase().contains(&keyword.to_lowercase()),
        "{what}: error {desc:?} does not mention {keyword:?}"
    );
    let st = raw.status();
    assert!(!st.is_empty(), "{what}: query-migrate afterwards");
}

fn memfd(size: u64) -> OwnedFd {
    let fd = memfd_create(c"qmh-bad", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, size as i64).unwrap();
    fd
}

#[test]
fn control_channel_bad_input() {
    let t0 = Instant::now();
    let mut h = SocketHelper::spawn();
    let mut c = h.connect();

    // Nothing but qmp_capabilities before negotiation.
    for line in [
        r#"{"execute":"query-migrate","id":1}"#,
        r#"{"execute":"migrate","arguments":{"uri":"file:/nonexistent"}}"#,
    ] {
        let r = c.cmd(line);
        let desc = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains("qmp_capabilities"), "{line} -> {r}");
    }
    let pipe = nix::unistd::pipe().unwrap();
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"early"}}"#,
        &[pipe.0.as_raw_fd()],
    );
    assert!(r.get("error").is_some(), "getfd before negotiation: {r}");
    c.ok(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#);
    let r = c.cmd(r#"{"execute":"qmp_capabilities"}"#);
    assert!(r.get("error").is_some(), "second qmp_capabilities: {r}");
    assert_eq!(c.status(), "none");
    // The fd sent before negotiation was not kept.
    let r = c.cmd(r#"{"execute":"closefd","arguments":{"fdname":"early"}}"#);
    expect_error(&mut c, "closefd of the refused fd", &r, "not found");

    // Malformed requests. The input is a JSON stream, as QEMU's: an unterminated object
    // waits for more (a control character or 0xFF ends it), and garbage is skipped up to
    // the next newline or structural character.
    for (line, keyword) in [
        ("{\"execute\": \"query-migrate\"\u{1}", "JSON"),
        ("@not json at all", "JSON"),
        (r#"[{"execute":"query-migrate"}]"#, "object"),
        ("42", "object"),
        (r#"{"arguments":{}}"#, "execute"),
        (r#"{"execute":5}"#, "execute"),
        (
            r#"{"execute":"query-migrate","arguments":[1]}"#,
            "arguments",
        ),
        (r#"{"execute":"query-migrate","bogus":1}"#, "bogus"),
        (
            r#"{"execute":"query-migrate","control":{"run-oob":"yes"}}"#,
            "control",
        ),
        (
            r#"{"execute":"no-such-command","id":"x"}"#,
            "no-such-command",
        ),
        (r#"{"execute":"system_reset"}"#, "not been found"),
    ] {
        let r = c.cmd(line);
        expect_error(&mut c, line, &r, keyword);
    }
    // The id is echoed on error replies that have one.
    let r = c.cmd(r#"{"execute":"no-such-command","id":{"n":[7]}}"#);
    assert_eq!(r["id"], json!({"n": [7]}), "{r}");

    // Wrong argument types, missing and unexpected arguments.
    for (line, keyword) in [
        (
            r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":"fast"}}"#,
            "max-bandwidth",
        ),
        (
            r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":-1}}"#,
            "max-bandwidth",
        ),
        (
            r#"{"execute":"migrate-set-parameters","arguments":{"compat-version":7.2}}"#,
            "compat-version",
        ),
        (
            r#"{"execute":"migrate-set-parameters","arguments":{"compat-version":"banana"}}"#,
            "",
        ),
        (
            r#"{"execute":"migrate-set-parameters","arguments":{"load-threads":0}}"#,
            "load-threads must be 1 to 16",
        ),
        (
            r#"{"execute":"migrate-set-parameters","arguments":{"load-threads":17}}"#,
            "load-threads must be 1 to 16",
        ),
        (
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":{"events":true}}}"#,
            "capabilities",
        ),
        (
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":"on"}]}}"#,
            "state",
        ),
        (
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"no-such-cap","state":true}]}}"#,
            "no-such-cap",
        ),
        (r#"{"execute":"migrate","arguments":{"uri":5}}"#, "uri"),
        (
            r#"{"execute":"migrate","arguments":{"uri":"fd:x","resume":"yes"}}"#,
            "resume",
        ),
        (
            r#"{"execute":"migrate-incoming","arguments":{"uri":null}}"#,
            "uri",
        ),
        (
            r#"{"execute":"closefd","arguments":{"fdname":[]}}"#,
            "fdname",
        ),
        (r#"{"execute":"migrate"}"#, "missing"),
        (
            r#"{"execute":"migrate-incoming","arguments":{}}"#,
            "missing",
        ),
        (
            r#"{"execute":"ram-block-add","arguments":{"id":"x"}}"#,
            "missing",
        ),
        (r#"{"execute":"migrate-continue"}"#, "missing"),
        (r#"{"execute":"device-state-set"}"#, "missing"),
        (r#"{"execute":"getfd"}"#, "missing"),
        (
            r#"{"execute":"migrate","arguments":{"uri":"file:/x","bogus":1}}"#,
            "unexpected",
        ),
        (
            r#"{"execute":"migrate-set-parameters","arguments":{"bogus":1}}"#,
            "unexpected",
        ),
        (
            r#"{"execute":"getfd","arguments":{"fdname":"x","extra":true}}"#,
            "unexpected",
        ),
        (
            r#"{"execute":"device-state-set","arguments":{"sections":"nope"}}"#,
            "",
        ),
        (
            r#"{"execute":"device-state-set","arguments":{"sections":[{"raw":"!!"}]}}"#,
            "",
        ),
    ] {
        let r = c.cmd(line);
        expect_error(&mut c, line, &r, keyword);
    }
    assert_eq!(c.status(), "none");

    // getfd needs exactly one fd on the same message.
    let r = c.cmd(r#"{"execute":"getfd","arguments":{"fdname":"nofd"}}"#);
    expect_error(&mut c, "getfd without an fd", &r, "file descriptor");
    let (p0, p1) = nix::unistd::pipe().unwrap();
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"two"}}"#,
        &[p0.as_raw_fd(), p1.as_raw_fd()],
    );
    expect_error(&mut c, "getfd with two fds", &r, "got 2");
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"9lives"}}"#,
        &[p0.as_raw_fd()],
    );
    expect_error(
        &mut c,
        "getfd with a name starting with a digit",
        &r,
        "digit",
    );
    // An fd sent with a command that takes none is dropped, the command still runs.
    let r = c.cmd_fds(r#"{"execute":"query-migrate"}"#, &[p0.as_raw_fd()]);
    assert!(r.get("return").is_some(), "query-migrate with an fd: {r}");

    // ram-block-add with fds that cannot be guest RAM.
    let (sa, _sb) = UnixStream::pair().unwrap();
    let dirfd = std::fs::File::open(std::env::temp_dir()).unwrap();
    let small = memfd(4096);
    let good = memfd(BLOCK);
    for (name, fd) in [
        ("sock", sa.as_raw_fd()),
        ("dir", dirfd.as_raw_fd()),
        ("pipe", p0.as_raw_fd()),
        ("small", small.as_raw_fd()),
        ("good", good.as_raw_fd()),
    ] {
        let line = format!(r#"{{"execute":"getfd","arguments":{{"fdname":"{name}"}}}}"#);
        let r = c.cmd_fds(&line, &[fd]);
        assert!(r.get("return").is_some(), "getfd {name}: {r}");
    }
    for (what, fdname, offset, size, keyword) in [
        ("a socket", "sock", 0, 4096, "socket"),
        ("a directory", "dir", 0, 4096, "directory"),
        ("a pipe", "pipe", 0, 4096, "pipe"),
        ("a memfd too small", "small", 0, 8192, "exceeds"),
        ("an unaligned offset", "good", 100, 4096, "aligned"),
        ("a size not a page multiple", "good", 0, 1000, "multiple"),
        ("offset + size past the end", "good", 4096, BLOCK, "exceeds"),
        ("a size of zero", "good", 0, 0, "multiple"),
        ("an unknown fd name", "nope", 0, 4096, "not found"),
    ] {
        let r = c.cmd(&format!(
            r#"{{"execute":"ram-block-add","arguments":{{"id":"bad","fdname":"{fdname}","offset":{offset},"size":{size}}}}}"#
        ));
        expect_error(&mut c, &format!("ram-block-add with {what}"), &r, keyword);
    }
    for (what, args, keyword) in [
        ("a string offset", r#""offset":"0","size":4096"#, "offset"),
        ("a negative size", r#""offset":0,"size":-4096"#, "size"),
        ("a float size", r#""offset":0,"size":4096.5"#, "size"),
        ("no size", r#""offset":0"#, "size"),
        (
            "an unexpected argument",
            r#""offset":0,"size":4096,"shared":true"#,
            "shared",
        ),
    ] {
        let r = c.cmd(&format!(
            r#"{{"execute":"ram-block-add","arguments":{{"id":"ram","fdname":"good",{args}}}}}"#
        ));
        expect_error(&mut c, &format!("ram-block-add with {what}"), &r, keyword);
    }
    let r = c.cmd(&format!(
        r#"{{"execute":"ram-block-add","arguments":{{"id":"ram","fdname":"good","offset":0,"size":{BLOCK},"page-size":2097152}}}}"#
    ));
    expect_error(
        &mut c,
        "ram-block-add with a page-size the fd does not have",
        &r,
        "page",
    );
    let r = c.cmd(
        r#"{"execute":"ram-block-add","arguments":{"id":"ram","fdname":"good","offset":0,"size":4096,"dirty-bitmap":"nope"}}"#,
    );
    expect_error(
        &mut c,
        "ram-block-add with an unknown dirty bitmap",
        &r,
        "not found",
    );
    c.ok(&format!(
        r#"{{"execute":"ram-block-add","arguments":{{"id":"ram","fdname":"good","offset":0,"size":{BLOCK}}}}}"#
    ));
    let r = c.cmd(&format!(
        r#"{{"execute":"ram-block-add","arguments":{{"id":"ram","fdname":"good","offset":0,"size":{BLOCK}}}}}"#
    ));
    expect_error(&mut c, "ram-block-add of an existing id", &r, "exists");
    let blocks = c.ok(r#"{"execute":"query-ram-blocks"}"#);
    assert_eq!(blocks.as_array().map(Vec::len), Some(1), "{blocks}");

    // Migration commands that cannot start or do not apply.
    for (line, keyword) in [
        (
            r#"{"execute":"migrate","arguments":{"uri":"fd:nope"}}"#,
            "not found",
        ),
        (
            r#"{"execute":"migrate-incoming","arguments":{"uri":"fd:nope"}}"#,
            "nope",
        ),
        (
            r#"{"execute":"migrate","arguments":{"uri":"exec:cat > /dev/null"}}"#,
            "unsupported migration URI",
        ),
        (
            r#"{"execute":"migrate-incoming","arguments":{"uri":"exec:cat /dev/zero"}}"#,
            "unsupported migration URI",
        ),
        (
            r#"{"execute":"migrate","arguments":{"uri":"tcp:localhost"}}"#,
            "unsupported",
        ),
        (
            r#"{"execute":"migrate","arguments":{"uri":"rdma:1.2.3.4:5"}}"#,
            "unsupported",
        ),
        (
            r#"{"execute":"migrate-incoming","arguments":{"uri":"file:/nonexistent/qmh-file"}}"#,
            "nonexistent",
        ),
        (
            r#"{"execute":"migrate","arguments":{"uri":"fd:sock","resume":true}}"#,
            "resume",
        ),
        (
            r#"{"execute":"migrate-continue","arguments":{"state":"pre-switchover"}}"#,
            "not in expected state",
        ),
        (
            r#"{"execute":"migrate-continue","arguments":{"state":"active"}}"#,
            "not in expected state",
        ),
        (
            r#"{"execute":"ram-block-del","arguments":{"id":"nope"}}"#,
            "nope",
        ),
    ] {
        let r = c.cmd(line);
        expect_error(&mut c, line, &r, keyword);
    }
    assert_eq!(c.status(), "none", "nothing started");

    // A migration started by one client goes on after it disconnects; the next client gets
    // a greeting and sees it through.
    let (ours, theirs) = socketpair();
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"mig"}}"#,
        &[theirs.as_raw_fd()],
    );
    assert!(r.get("return").is_some(), "getfd mig: {r}");
    drop(theirs);
    c.ok(r#"{"execute":"migrate-incoming","arguments":{"uri":"fd:mig"}}"#);
    let r = c.cmd(r#"{"execute":"ram-block-add","arguments":{"id":"x","fdname":"good","offset":0,"size":4096}}"#);
    expect_error(&mut c, "ram-block-add during a migration", &r, "running");
    drop(c);
    let mut c = h.connect();
    let r = c.cmd(r#"{"execute":"query-migrate"}"#);
    let desc = r["error"]["desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains("qmp_capabilities"),
        "new client, not negotiated: {r}"
    );
    c.ok(r#"{"execute":"qmp_capabilities"}"#);
    let st = c.status();
    assert!(
        st == "setup" || st == "active",
        "migration after reconnect: {st}"
    );
    let r = c.cmd(r#"{"execute":"migrate-incoming","arguments":{"uri":"fd:other"}}"#);
    expect_error(&mut c, "a second migrate-incoming", &r, "");
    let feeder = std::thread::spawn(move || {
        let mut s = UnixStream::from(ours);
        s.write_all(&good_stream()).expect("feed the good stream");
    });
    let deadline = Instant::now() + DEADLINE;
    loop {
        let st = c.status();
        if st == "completed" {
            break;
        }
        assert!(
            st != "failed",
            "good stream failed: {:?}",
            c.ok(r#"{"execute":"query-migrate"}"#)
        );
        assert!(Instant::now() < deadline, "good stream stuck in {st}");
        std::thread::sleep(Duration::from_millis(10));
    }
    feeder.join().unwrap();
    let mem = Memfd {
        fd: good,
        size: BLOCK,
    };
    assert_same_memory(&image(), &mem.map(), "control-socket helper");

    drop(c);
    assert!(h.alive());
    eprintln!("control_channel_bad_input: took {:?}", t0.elapsed());
}

/// QEMU refuses an unexpected argument on every command ("Parameter 'bogus' is
/// unexpected"), also on those that take none; the protocol promises QEMU's meaning for
/// QEMU's names.
#[test]
fn control_channel_unexpected_arguments_like_qemu() {
    let mut h = SocketHelper::spawn();
    let mut c = h.connect();
    c.ok(r#"{"execute":"qmp_capabilities"}"#);
    let mut accepted = Vec::new();
    for name in [
        "query-migrate",
        "query-version",
        "query-commands",
        "query-ram-blocks",
        "query-migrate-parameters",
        "query-migrate-capabilities",
        "query-device-state",
        "migrate_cancel",
        "migrate-set-capabilities",
        "migrate-set-parameters",
        "migrate",
        "ram-block-del",
        "quit",
    ] {
        let r = c.cmd(&format!(
            r#"{{"execute":"{name}","arguments":{{"bogus":1}}}}"#
        ));
        if r.get("error").is_none() {
            accepted.push(format!("{name} {{\"bogus\": 1}} -> {r}"));
        }
        if name == "quit" && r.get("error").is_none() {
            break;
        }
        assert_eq!(c.status(), "none");
    }
    assert!(h.alive() || accepted.iter().any(|a| a.starts_with("quit")));
    assert!(
        accepted.is_empty(),
        "commands that accept an unexpected argument (QEMU: \"Parameter 'bogus' is \
         unexpected\"):\n  {}",
        accepted.join("\n  ")
    );
}

/// A 100 MiB line without a newline: the helper refuses it once it passes the 64 MiB cap,
/// without buffering all of it, stays alive, and serves the next client after this one
/// leaves in the middle of the line.
#[test]
fn control_channel_100mib_line() {
    let t0 = Instant::now();
    let mut h = SocketHelper::spawn();
    let mut c = h.connect();
    c.ok(r#"{"execute":"qmp_capabilities"}"#);
    let before = h.peak_rss_kib();
    let chunk = vec![b'a'; MIB as usize];
    c.s.set_write_timeout(Some(Duration::from_secs(600)))
        .unwrap();
    for _ in 0..100 {
        c.s.write_all(&chunk).expect("writing the long line");
    }
    // The refusal is sent when the line passes the cap (the helper has read at least 64 MiB
    // of it by now).
    let r = c.read_msg_within(Duration::from_secs(600));
    let desc = r["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("too long"), "reply to a 100 MiB line: {r}");
    // Leave without ever sending the newline; the next client is served once the helper
    // has drained this connection.
    drop(c);
    let mut c = h.connect_within(Duration::from_secs(600));
    let elapsed = t0.elapsed();
    c.ok(r#"{"execute":"qmp_capabilities"}"#);
    assert_eq!(c.status(), "none");
    assert!(h.alive());
    let peak = h.peak_rss_kib();
    eprintln!(
        "control_channel_100mib_line: 100 MiB line to next greeting took {elapsed:?}; helper \
         peak RSS {before} KiB before, {peak} KiB after"
    );
    assert!(
        peak < before + 96 * 1024,
        "helper peak RSS grew from {before} KiB to {peak} KiB for a 100 MiB line"
    );
    drop(c);
    // Reading a line is linear work: even an unoptimised helper moves 100 MiB through a
    // Unix socket in a second or two. Rescanning the whole buffer for the newline after
    // every read is quadratic: minutes.
    assert!(
        elapsed < Duration::from_secs(10),
        "the helper took {elapsed:?} to consume a 100 MiB line (quadratic line reading?)"
    );
}

/// Migrates the helper's block `ram` out through a socketpair read by a thread; with
/// `flood`, the control client meanwhile sends thousands of commands and reads no reply.
/// Returns how long the stream took to arrive (to EOF) and its length.
fn source_run(c: &mut Raw, flood: bool) -> (Duration, usize) {
    let (ours, theirs) = socketpair();
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"mig"}}"#,
        &[theirs.as_raw_fd()],
    );
    assert!(r.get("return").is_some(), "{r}");
    drop(theirs);
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut s = UnixStream::from(ours);
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut n = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => panic!("reading the migration stream: {e}"),
            }
        }
        (t0.elapsed(), n)
    });
    c.ok(r#"{"execute":"migrate","arguments":{"uri":"fd:mig"}}"#);
    if flood {
        // Replies of about 1 KiB each: the socket buffer is full after a few hundred.
        let line = r#"{"execute":"query-commands"}"#.to_string() + "\n";
        c.s.set_write_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        for _ in 0..4000 {
            c.s.write_all(line.as_bytes()).unwrap();
        }
    }
    reader.join().unwrap()
}

/// A control client that sends commands but does not read the replies (a busy parent) must
/// not stall the migration: the helper's migration thread must not wait on control-socket
/// writes.
#[test]
fn control_client_that_does_not_read_does_not_stall_migration() {
    let test = "control_client_that_does_not_read_does_not_stall_migration";
    const SIZE: u64 = 32 * MIB;
    let mut h = SocketHelper::spawn();
    let mut c = h.connect();
    c.ok(r#"{"execute":"qmp_capabilities"}"#);
    let mem = Memfd {
        fd: memfd(SIZE),
        size: SIZE,
    };
    support::util::fill_mixed(&mut mem.map(), 7, 0.2);
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"ram"}}"#,
        &[mem.fd.as_raw_fd()],
    );
    assert!(r.get("return").is_some(), "{r}");
    c.ok(&format!(
        r#"{{"execute":"ram-block-add","arguments":{{"id":"ram","fdname":"ram","offset":0,"size":{SIZE}}}}}"#
    ));
    // About one and a half seconds per migration.
    c.ok(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":16777216}}"#);
    let (base, base_bytes) = source_run(&mut c, false);
    let deadline = Instant::now() + DEADLINE;
    while c.status() != "completed" {
        assert!(
            Instant::now() < deadline,
            "{test}: first migration never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (took, bytes) = source_run(&mut c, true);
    eprintln!(
        "{test}: {base_bytes} bytes in {base:?} with a reading client; {bytes} bytes in \
         {took:?} with a client that does not read"
    );
    assert!(h.alive());
    // Every command gets its reply, however late the client reads them.
    c.s.write_all(b"{\"execute\":\"query-migrate\",\"id\":\"after-flood\"}\n")
        .unwrap();
    let (mut replies, mut answered) = (0usize, false);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 65536];
    'read: while Instant::now() < deadline {
        while let Some(nl) = c.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = c.buf.drain(..=nl).collect();
            let v: Value = serde_json::from_slice(&line).expect("JSON from the helper");
            if v.get("return").is_some() || v.get("error").is_some() {
                replies += 1;
            }
            if v["id"] == "after-flood" {
                answered = true;
                break 'read;
            }
        }
        c.s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        match c.s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => c.buf.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    eprintln!("{test}: {replies} replies read after the flood (4001 commands sent)");
    drop(c);
    assert!(
        answered,
        "{test}: after a client was slow to read, the helper stopped answering it: {replies} \
         replies for 4001 commands, none to the last one (the commands still ran)"
    );
    assert!(
        took < base + Duration::from_secs(5),
        "{test}: a migration that takes {base:?} took {took:?} while the control client did \
         not read its replies (the migration thread waits on the control socket)"
    );
}
