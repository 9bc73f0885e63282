//! Migration through files (`file:` URIs): every real QEMU stream in
//! `../shared/fixtures/qemu-streams/` loads into a helper, a file written by the helper loads
//! into QEMU 10.0 and 7.2, and a file written by QEMU loads into the helper. Guest RAM is
//! compared byte for byte every time.
//!
//! Also home of the test-side stream walker ([`StreamMap`]) that `bad_input.rs` uses to pick
//! cut and flip points: it delimits every item of a complete stream with the library's pure
//! decoders and computes the RAM image a correct loader must produce.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use qemu_migration_helper::compat::wire;
use qemu_migration_helper::vmstate::{self, VmDescription};
use qemu_migration_helper::wire::ram::{self, BlockEntry, Record};
use qemu_migration_helper::wire::stream::{self, Token};
use serde_json::{json, Value};

use support::helper::HelperVm;
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::util::{assert_same_memory, fill_mixed, test_seed, TempDir, GIB, MIB, PAGE_SIZE};

pub const FIXTURE_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/qemu-streams/"
);

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(120);
/// What a helper's memfd holds before a load: not zero, so that a loader which skips
/// ZERO records (or any page) is caught.
pub const PREFILL: u8 = 0xa5;

/// The fixture `name`, or `None` after printing a SKIP line when the fixture directory (or
/// the file) is missing. With `QMH_REQUIRE_FIXTURES=1` a missing fixture fails the test.
pub fn fixture_path(test: &str, name: &str) -> Option<PathBuf> {
    let dir = Path::new(FIXTURE_DIR);
    let path = dir.join(name);
    let why = if !dir.is_dir() {
        format!("fixture directory {} is missing", dir.display())
    } else if !path.is_file() {
        format!("fixture {} is missing", path.display())
    } else {
        return Some(path);
    };
    if std::env::var("QMH_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("{test}: {why} and QMH_REQUIRE_FIXTURES=1");
    }
    // Past libtest's capture, so that the skip shows even though the test "passes".
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    None
}

/// One top-level item of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemKind {
    Header,
    Configuration,
    /// A RAM section: the section type byte (START, PART or END).
    Ram(u8),
    /// A non-RAM START or FULL section (body delimited with the VM description).
    Device {
        idstr: String,
        instance_id: u32,
    },
    Command(u16),
    Eof,
    VmDescription,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub range: Range<usize>,
    pub kind: ItemKind,
}

/// Everything the tests need to know about a complete, well-formed stream.
pub struct StreamMap {
    pub items: Vec<Item>,
    /// The RAM START block list.
    pub blocks: Vec<BlockEntry>,
    /// Start offsets of the page records (ZERO and PAGE).
    pub page_records: Vec<usize>,
    pub desc: Option<VmDescription>,
    /// Per block: what a loader leaves in a block that held `PREFILL` everywhere.
    pub images: Vec<Vec<u8>>,
    /// Per block: pages that no record touched.
    pub untouched_pages: Vec<usize>,
}

impl StreamMap {
    /// Walks a complete stream; panics on anything unexpected (the inputs are fixtures and
    /// streams the tests built).
    pub fn walk(buf: &[u8]) -> StreamMap {
        // The VM description first: device sections can only be delimited with it.
        let desc = vmstate::find_trailing_vmdesc(buf)
            .map(|(_, json)| VmDescription::parse(&buf[json]).expect("parse VM description"));
        let mut items = Vec::new();
        let mut pos = 0usize;
        let ((), n) = stream::decode_header(buf)
            .expect("header")
            .expect("whole header");
        items.push(Item {
            range: 0..n,
            kind: ItemKind::Header,
        });
        pos += n;
        if buf.get(pos) == Some(&wire::section::CONFIGURATION) {
            let (_, n) = stream::decode_configuration(&buf[pos..])
                .expect("configuration")
                .expect("whole configuration");
            items.push(Item {
                range: pos..pos + n,
                kind: ItemKind::Configuration,
            });
            pos += n;
        }
        let mut map = StreamMap {
            items,
            blocks: Vec::new(),
            page_records: Vec::new(),
            desc,
            images: Vec::new(),
            untouched_pages: Vec::new(),
        };
        let mut touched: Vec<Vec<bool>> = Vec::new();
        let mut ram_id = None;
        let mut last_block: Option<usize> = None;
        loop {
            let start = pos;
            let (token, n) = stream::decode_token(&buf[pos..])
                .unwrap_or_else(|e| panic!("token at {pos}: {e}"))
                .unwrap_or_else(|| panic!("stream ends inside the token at {pos}"));
            pos += n;
            let kind = match token {
                Token::Start(h) if h.idstr == wire::ram::IDSTR => {
                    ram_id = Some(h.section_id);
                    let (rec, n) = ram::decode_record(&buf[pos..]).unwrap().unwrap();
                    let Record::MemSize { total } = rec else {
                        panic!("RAM START at {start} does not begin with the block list")
                    };
                    pos += n;
                    let mut sum = 0;
                    while sum < total {
                        let (e, n) = ram::decode_block_entry(&buf[pos..], &|_| false)
                            .unwrap()
                            .unwrap();
                        pos += n;
                        sum += e.used_length;
                        map.images.push(vec![PREFILL; e.used_length as usize]);
                        touched.push(vec![false; e.used_length as usize / PAGE_SIZE]);
                        map.blocks.push(e);
                    }
                    assert_eq!(sum, total, "block list total");
                    pos = map.ram_body(buf, pos, &mut last_block, &mut touched);
                    pos = footer(buf, pos, h.section_id);
                    ItemKind::Ram(wire::section::START)
                }
                Token::Part(id) | Token::End(id) => {
                    assert_eq!(Some(id), ram_id, "PART/END at {start} is not RAM");
                    pos = map.ram_body(buf, pos, &mut last_block, &mut touched);
                    pos = footer(buf, pos, id);
                    ItemKind::Ram(buf[start])
                }
                Token::Start(h) | Token::Full(h) => {
                    let desc = map
                        .desc
                        .as_ref()
                        .expect("device section without description");
                    let d = desc
                        .device(&h.idstr, h.instance_id)
                        .unwrap_or_else(|| panic!("{} not described", h.idstr));
                    pos += vmstate::body_len(d, &buf[pos..])
                        .unwrap_or_else(|e| panic!("section {} at {start}: {e}", h.idstr));
                    pos = footer(buf, pos, h.section_id);
                    ItemKind::Device {
                        idstr: h.idstr,
                        instance_id: h.instance_id,
                    }
                }
                Token::Command(c) => ItemKind::Command(c.cmd),
                Token::Eof => ItemKind::Eof,
                Token::VmDescription(_) => ItemKind::VmDescription,
            };
            let done =
                kind == ItemKind::VmDescription || (kind == ItemKind::Eof && pos == buf.len());
            map.items.push(Item {
                range: start..pos,
                kind,
            });
            if done {
                break;
            }
        }
        assert_eq!(pos, buf.len(), "bytes after the end of the stream");
        map.untouched_pages = touched
            .iter()
            .map(|t| t.iter().filter(|&&x| !x).count())
            .collect();
        map
    }

    /// Applies one RAM section body from `pos` through EOS; returns the position after it.
    fn ram_body(
        &mut self,
        buf: &[u8],
        mut pos: usize,
        last_block: &mut Option<usize>,
        touched: &mut [Vec<bool>],
    ) -> usize {
        loop {
            let (rec, n) = ram::decode_record(&buf[pos..])
                .unwrap_or_else(|e| panic!("RAM record at {pos}: {e}"))
                .unwrap_or_else(|| panic!("stream ends inside the RAM record at {pos}"));
            let (offset, block) = match rec {
                Record::Eos => return pos + n,
                Record::MultifdFlush => {
                    pos += n;
                    continue;
                }
                Record::MemSize { .. } => panic!("block list at {pos} outside RAM START"),
                Record::Zero { offset, block, .. } | Record::Page { offset, block, .. } => {
                    (offset, block)
                }
            };
            self.page_records.push(pos);
            let bi = match block {
                Some(name) => {
                    let i = self.blocks.iter().position(|b| b.idstr == name).unwrap();
                    *last_block = Some(i);
                    i
                }
                None => last_block.expect("CONTINUE without a block"),
            };
            let o = offset as usize;
            let page = &mut self.images[bi][o..o + PAGE_SIZE];
            match rec {
                Record::Zero { fill, .. } => page.fill(fill),
                Record::Page { data, .. } => page.copy_from_slice(data),
                _ => unreachable!(),
            }
            touched[bi][o / PAGE_SIZE] = true;
            pos += n;
        }
    }

    /// The device sections, in stream order.
    pub fn devices(&self) -> impl Iterator<Item = &Item> {
        self.items
            .iter()
            .filter(|i| matches!(i.kind, ItemKind::Device { .. }))
    }

    pub fn find(&self, kind: &ItemKind) -> Option<&Item> {
        self.items.iter().find(|i| &i.kind == kind)
    }

    pub fn ram_sections(&self) -> impl Iterator<Item = &Item> {
        self.items
            .iter()
            .filter(|i| matches!(i.kind, ItemKind::Ram(_)))
    }
}

fn footer(buf: &[u8], pos: usize, id: u32) -> usize {
    let ((), n) = stream::decode_footer(&buf[pos..], id)
        .unwrap_or_else(|e| panic!("footer at {pos}: {e}"))
        .unwrap_or_else(|| panic!("stream ends inside the footer at {pos}"));
    pos + n
}

/// The documented content of the `none-16M-pattern-*` fixtures' block `ram`.
pub fn pattern_16m() -> Vec<u8> {
    let mut v = vec![0u8; 16 * MIB as usize];
    for (i, page) in v.chunks_mut(PAGE_SIZE).enumerate() {
        if i % 4 != 0 {
            page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        }
    }
    v
}

/// A helper with one memfd block per entry of `blocks` (same id and size), each filled with
/// `PREFILL`. The fixtures live outside the scratch directories the sandbox allows by
/// default: the helper may read them with `--sandbox-allow-path`, as a VMM would name its
/// own migration-file directory.
pub fn helper_for(blocks: &[BlockEntry], args: &[&str]) -> HelperVm {
    let mut all = vec!["--sandbox-allow-path", FIXTURE_DIR];
    all.extend_from_slice(args);
    let mut h = HelperVm::spawn_with_args(&all);
    for b in blocks {
        h.add_block(&b.idstr, b.used_length, false);
    }
    prefill(&h);
    h
}

/// Fills every block of `h` with `PREFILL`.
pub fn prefill(h: &HelperVm) {
    for b in &h.blocks {
        b.mem.map().fill(PREFILL);
    }
}

/// Starts `migrate-incoming file:PATH` and waits (at most `timeout`) until the migration is
/// `completed` or `failed`. `Err` when the command is refused, the wait times out or the
/// control channel breaks.
pub fn load_file(h: &mut HelperVm, path: &Path, timeout: Duration) -> Result<Value, String> {
    h.client
        .migrate_incoming(&format!("file:{}", path.display()))
        .map_err(|e| format!("migrate-incoming: {e}"))?;
    h.client
        .wait_for_status(&["completed", "failed"], timeout)
        .map_err(|e| format!("waiting for completed/failed: {e}"))
}

/// Checks that every block of `h` equals the stream's image.
pub fn check_images(h: &HelperVm, map: &StreamMap, what: &str) {
    for (b, (entry, image)) in h.blocks.iter().zip(map.blocks.iter().zip(&map.images)) {
        assert_eq!(b.id, entry.idstr);
        assert_same_memory(image, &b.mem.map(), &format!("{what}: block {}", b.id));
    }
}

/// Checks `query-device-state` against the stream: one section per described device, in the
/// stream's order, byte-exact, with decoded `fields` for most of them.
fn check_device_state(h: &mut HelperVm, bytes: &[u8], map: &StreamMap, test: &str) {
    let desc = map.desc.as_ref().expect("fixture has a VM description");
    let ds = h.client.query_device_state().expect("query-device-state");
    let sections = ds["sections"].as_array().expect("sections array");
    let in_stream: Vec<&Item> = map.devices().collect();
    assert_eq!(
        sections.len(),
        desc.devices().len(),
        "{test}: device sections received vs devices in the VM description"
    );
    assert_eq!(
        sections.len(),
        in_stream.len(),
        "{test}: vs sections in the file"
    );
    let mut with_fields = 0;
    for (s, item) in sections.iter().zip(&in_stream) {
        let ItemKind::Device { idstr, instance_id } = &item.kind else {
            unreachable!()
        };
        assert_eq!(s["idstr"], json!(idstr), "{test}: section order");
        assert_eq!(s["instance-id"], json!(instance_id), "{test}: {idstr}");
        let raw = B64
            .decode(s["raw"].as_str().expect("raw"))
            .expect("raw is base64");
        assert!(
            raw == bytes[item.range.clone()],
            "{test}: section {idstr} is not byte-exact ({} bytes vs {} in the file)",
            raw.len(),
            item.range.len()
        );
        if s["fields"].is_object() {
            with_fields += 1;
        }
    }
    eprintln!(
        "{test}: {} device sections, {with_fields} with fields",
        sections.len()
    );
    assert!(
        with_fields * 4 >= sections.len() * 3,
        "{test}: only {with_fields} of {} device sections have decoded fields",
        sections.len()
    );
}

fn load_fixture(name: &str, test: &str) {
    let Some(path) = fixture_path(test, name) else {
        return;
    };
    let t0 = Instant::now();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = StreamMap::walk(&bytes);
    let blocks: Vec<String> = map
        .blocks
        .iter()
        .map(|b| format!("{}={:#x}", b.idstr, b.used_length))
        .collect();
    eprintln!(
        "{test}: {} bytes, blocks {blocks:?}, {} page records, {} device sections, untouched \
         pages {:?}",
        bytes.len(),
        map.page_records.len(),
        map.devices().count(),
        map.untouched_pages
    );
    let mut h = helper_for(&map.blocks, &["--log-level", "info"]);
    let v = load_file(&mut h, &path, TIMEOUT).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(v["status"], "completed", "{test}: {v}");
    check_images(&h, &map, test);
    if name.starts_with("none-16M-pattern") {
        assert_eq!(map.blocks.len(), 1, "{test}: one block");
        assert_eq!(map.blocks[0].idstr, "ram");
        assert_eq!(map.blocks[0].used_length, 16 * MIB);
        assert_same_memory(&pattern_16m(), &h.blocks[0].mem.map(), test);
    }
    check_device_state(&mut h, &bytes, &map, test);
    assert!(h.alive());
    eprintln!("{test}: took {:?}", t0.elapsed());
}

#[test]
fn fixture_none_16m_pattern_qemu10() {
    load_fixture(
        "none-16M-pattern-qemu10.0.bin",
        "fixture_none_16m_pattern_qemu10",
    );
}

#[test]
fn fixture_none_16m_pattern_qemu72() {
    load_fixture(
        "none-16M-pattern-qemu7.2.bin",
        "fixture_none_16m_pattern_qemu72",
    );
}

#[test]
fn fixture_pc_128m_qemu10() {
    load_fixture("pc-128M-qemu10.0.bin", "fixture_pc_128m_qemu10");
}

#[test]
fn fixture_pc_128m_qemu72() {
    load_fixture("pc-128M-qemu7.2.bin", "fixture_pc_128m_qemu72");
}

#[test]
fn fixture_q35_128m_qemu10() {
    load_fixture("q35-128M-qemu10.0.bin", "fixture_q35_128m_qemu10");
}

/// The content of `path` once it holds a whole precopy stream (one that ends with its VM
/// description). QEMU reports `completed` before it closes the channel, and with `exec:cat`
/// the `cat` process may still be writing then.
fn wait_whole_stream(path: &Path, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    loop {
        let bytes = std::fs::read(path).unwrap_or_default();
        if vmstate::find_trailing_vmdesc(&bytes).is_some() {
            return bytes;
        }
        assert!(
            Instant::now() < deadline,
            "{} does not hold a whole stream after {timeout:?} ({} bytes)",
            path.display(),
            bytes.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A helper source writes a file (`migrate file:PATH`) from 64 MiB of mixed pages; QEMU
/// loads it (10.0 with `migrate-incoming file:`, 7.2, which has no `file:` URI, with
/// `-incoming exec:cat PATH`).
fn helper_file_to_qemu(qemu: Qemu, test: &str) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("qmh-files");
    let file = dir.join("helper.mig");
    let mut src = HelperVm::spawn_with_args(&["--log-level", "info"]);
    src.add_block("ram", RAM, false);
    let zeros = fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.5);
    if qemu == Qemu::V72 {
        src.client
            .set_parameters(json!({"compat-version": "7.2"}))
            .expect("compat-version");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    src.client
        .migrate(&format!("file:{}", file.display()))
        .expect("migrate file:");
    src.wait(&["completed"], TIMEOUT);
    let written = t0.elapsed();
    let len = std::fs::metadata(&file).expect("file written").len();
    eprintln!("{test}: helper wrote {len} bytes ({zeros} zero pages) in {written:?}");

    let opts = match qemu {
        Qemu::V10 => VmOpts::incoming(),
        Qemu::V72 => VmOpts {
            extra_args: vec!["-incoming".into(), format!("exec:cat {}", file.display())],
            ..VmOpts::default()
        },
    };
    let mut dst = QemuVm::start(qemu, RAM, &opts);
    if qemu == Qemu::V10 {
        dst.qmp()
            .execute(
                "migrate-incoming",
                json!({"uri": format!("file:{}", file.display())}),
            )
            .expect("migrate-incoming");
    }
    dst.wait_migration(&["completed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: QEMU destination: {e}"));
    assert_same_memory(&src.blocks[0].mem.map(), &dst.ram_mmap(), test);
    eprintln!("{test}: took {:?}", t0.elapsed());
}

/// A helper source cuts a dirty pass into PART sections of about 50 ms, as QEMU's
/// `ram_save_iterate` does: a throttled 64 MiB pass (about 0.5 s) is several sections.
#[test]
fn helper_pass_is_cut_into_timed_parts() {
    let test = "helper_pass_is_cut_into_timed_parts";
    let dir = TempDir::new("qmh-files");
    let file = dir.join("parts.mig");
    let mut src = HelperVm::spawn_with_args(&[]);
    src.add_block("ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.5);
    src.client
        .set_parameters(json!({"max-bandwidth": 64 * MIB}))
        .expect("params");
    let t0 = Instant::now();
    src.client
        .migrate(&format!("file:{}", file.display()))
        .expect("migrate file:");
    src.wait(&["completed"], TIMEOUT);
    let took = t0.elapsed();
    let bytes = std::fs::read(&file).expect("file written");
    let map = StreamMap::walk(&bytes);
    let parts = map
        .ram_sections()
        .filter(|i| i.kind == ItemKind::Ram(wire::section::PART))
        .count();
    eprintln!("{test}: {parts} PART sections in {took:?}");
    assert!(
        parts >= 4,
        "a {took:?} pass should be cut into PART sections of ~50 ms, got {parts}"
    );
}

#[test]
fn helper_file_to_qemu10() {
    helper_file_to_qemu(Qemu::V10, "helper_file_to_qemu10");
}

#[test]
fn helper_file_to_qemu72() {
    helper_file_to_qemu(Qemu::V72, "helper_file_to_qemu72");
}

/// QEMU writes a file from 64 MiB of mixed pages (10.0: `migrate file:PATH`; 7.2:
/// `migrate exec:cat > PATH`); a helper loads it.
fn qemu_file_to_helper(qemu: Qemu, test: &str) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("qmh-files");
    let file = dir.join("qemu.mig");
    let mut src = QemuVm::start(qemu, RAM, &VmOpts::default());
    let zeros = fill_mixed(&mut src.ram_mmap(), test_seed(test), 0.5);
    src.qmp()
        .set_parameters(json!({"max-bandwidth": 10 * GIB}))
        .expect("params");
    let uri = match qemu {
        Qemu::V10 => format!("file:{}", file.display()),
        Qemu::V72 => format!("exec:cat > {}", file.display()),
    };
    src.qmp().migrate(&uri).expect("migrate");
    src.wait_migration(&["completed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: QEMU source: {e}"));
    let bytes = wait_whole_stream(&file, Duration::from_secs(20));
    eprintln!(
        "{test}: {} wrote {} bytes ({zeros} zero pages)",
        qemu.name(),
        bytes.len()
    );

    let map = StreamMap::walk(&bytes);
    let mut dst = helper_for(&map.blocks, &["--log-level", "info"]);
    assert_eq!(dst.blocks.len(), 1, "{test}: -M none has one block");
    let v = load_file(&mut dst, &file, TIMEOUT).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(v["status"], "completed", "{test}: {v}");
    assert_same_memory(&src.ram_mmap(), &dst.blocks[0].mem.map(), test);
    check_device_state(&mut dst, &bytes, &map, test);
    eprintln!("{test}: took {:?}", t0.elapsed());
}

#[test]
fn qemu10_file_to_helper() {
    qemu_file_to_helper(Qemu::V10, "qemu10_file_to_helper");
}

#[test]
fn qemu72_file_to_helper() {
    qemu_file_to_helper(Qemu::V72, "qemu72_file_to_helper");
}
