//! Builders of hand-made migration streams, shared by the bad-input and the bounds tests.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qemu_migration_helper::compat::wire::ram as flag;
use qemu_migration_helper::wire::ram::{
    encode_block_list, encode_eos, encode_page_header, BlockEntry,
};
use qemu_migration_helper::wire::stream::{
    encode_configuration, encode_eof, encode_footer, encode_header, encode_section_part,
    encode_section_start, encode_vmdesc, put_be64, put_str8, SectionHeader, SectionKind,
};
use serde_json::{json, Value};

use support::helper::HelperVm;
use support::migrate::socketpair;
use support::util::{MIB, PAGE_SIZE};

/// How long a hand-built load may take before it counts as a hang.
pub(crate) const LOAD_DEADLINE: Duration = Duration::from_secs(20);

/// The one block of the hand-built streams.
pub(crate) const BLOCK: u64 = MIB;
pub(crate) const PAGES: u64 = BLOCK / PAGE_SIZE as u64;

/// Page `i` of the good stream: even pages carry data, odd pages are zero.
pub(crate) fn page_content(i: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    if i % 2 == 0 {
        for (j, b) in p.iter_mut().enumerate() {
            *b = (i as u8) ^ (j as u8) ^ 0x5a;
        }
        p[..8].copy_from_slice(&(i + 1).to_le_bytes());
    }
    p
}

pub(crate) fn image() -> Vec<u8> {
    (0..PAGES).flat_map(page_content).collect()
}

/// Header and configuration (`none`).
pub(crate) fn head() -> Vec<u8> {
    let mut b = Vec::new();
    encode_header(&mut b);
    encode_configuration(&mut b, "none").unwrap();
    b
}

/// A RAM START section (id 1) announcing `blocks`.
pub(crate) fn ram_start(blocks: &[(&str, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    encode_section_start(&mut b, SectionKind::Start, &ram_header(1, 4)).unwrap();
    let entries: Vec<BlockEntry> = blocks
        .iter()
        .map(|&(n, l)| BlockEntry {
            idstr: n.into(),
            used_length: l,
            page_size: None,
        })
        .collect();
    encode_block_list(&mut b, &entries).unwrap();
    encode_footer(&mut b, 1);
    b
}

pub(crate) fn ram_header(id: u32, version: u32) -> SectionHeader {
    SectionHeader {
        section_id: id,
        idstr: "ram".into(),
        instance_id: 0,
        version_id: version,
    }
}

/// The page records of `pages` (the first names block `ram`), without EOS.
pub(crate) fn records(pages: std::ops::Range<u64>) -> Vec<u8> {
    let mut b = Vec::new();
    for i in pages.clone() {
        let name = (i == pages.start).then_some("ram");
        let p = page_content(i);
        let off = i * PAGE_SIZE as u64;
        if i % 2 == 0 {
            encode_page_header(&mut b, off, flag::PAGE, name).unwrap();
            b.extend_from_slice(&p);
        } else {
            encode_page_header(&mut b, off, flag::ZERO, name).unwrap();
            b.push(0);
        }
    }
    b
}

/// A RAM PART or END section `id` whose body is `body` then EOS.
pub(crate) fn ram_section(kind: SectionKind, id: u32, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    encode_section_part(&mut b, kind, id);
    b.extend_from_slice(body);
    encode_eos(&mut b);
    encode_footer(&mut b, id);
    b
}

/// EOF and an empty VM description, as a QEMU source with no devices would end.
pub(crate) fn tail() -> Vec<u8> {
    let mut b = Vec::new();
    encode_eof(&mut b);
    encode_vmdesc(&mut b, br#"{"page_size":4096,"devices":[]}"#).unwrap();
    b
}

pub(crate) fn good_stream() -> Vec<u8> {
    [
        head(),
        ram_start(&[("ram", BLOCK)]),
        ram_section(SectionKind::Part, 1, &records(0..PAGES / 2)),
        ram_section(SectionKind::End, 1, &records(PAGES / 2..PAGES)),
        tail(),
    ]
    .concat()
}

/// The good stream up to and including the RAM START.
pub(crate) fn good_prefix() -> Vec<u8> {
    [head(), ram_start(&[("ram", BLOCK)])].concat()
}

/// A PART whose body is one raw record word (plus `extra` bytes), after the good prefix.
pub(crate) fn with_record(word: u64, extra: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_be64(&mut body, word);
    body.extend_from_slice(extra);
    [
        good_prefix(),
        ram_section(SectionKind::Part, 1, &body),
        tail(),
    ]
    .concat()
}

pub(crate) fn named(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    put_str8(&mut b, name).unwrap();
    b.extend_from_slice(data);
    b
}

/// A FULL device section `dev` (id 5) with an 8-byte body.
pub(crate) fn device_section() -> Vec<u8> {
    let mut b = Vec::new();
    encode_section_start(
        &mut b,
        SectionKind::Full,
        &SectionHeader {
            section_id: 5,
            idstr: "dev".into(),
            instance_id: 0,
            version_id: 1,
        },
    )
    .unwrap();
    b.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    encode_footer(&mut b, 5);
    b
}

pub(crate) fn vmdesc_with_dev(size: usize) -> Vec<u8> {
    let desc = json!({"page_size": 4096, "devices": [{
        "name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1,
        "fields": [{"name": "x", "type": "buffer", "size": size}]}]});
    let mut b = Vec::new();
    encode_eof(&mut b);
    encode_vmdesc(&mut b, desc.to_string().as_bytes()).unwrap();
    b
}

/// Runs an incoming migration on `h` from `stream`, written by a thread into one end of a
/// socketpair (the helper has the other end as `fd:mig`); the thread then closes its end.
pub(crate) fn load_over_socket(h: &mut HelperVm, stream: Vec<u8>) -> Result<Value, String> {
    let (ours, theirs) = socketpair();
    h.client
        .getfd("mig", theirs.as_fd())
        .map_err(|e| format!("getfd: {e}"))?;
    drop(theirs);
    h.client
        .migrate_incoming("fd:mig")
        .map_err(|e| format!("migrate-incoming: {e}"))?;
    let feeder = std::thread::spawn(move || {
        let mut s = UnixStream::from(ours);
        let _ = s.set_write_timeout(Some(LOAD_DEADLINE));
        // The helper may stop reading (and close) at the first bad byte: EPIPE is fine.
        let _ = s.write_all(&stream);
    });
    let r = h
        .client
        .wait_for_status(&["completed", "failed"], LOAD_DEADLINE)
        .map_err(|e| format!("waiting for completed/failed: {e}"));
    let _ = feeder.join();
    r
}
