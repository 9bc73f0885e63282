//! Tests against real QEMU streams: every FULL section must be delimited by
//! its description, and nothing may panic on damaged input.

use std::collections::BTreeMap;

use serde_json::Value;

use super::*;
use crate::compat::wire::{ram, section, FILE_MAGIC, FILE_VERSION, TARGET_PAGE_SIZE};

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/qemu-streams/"
);

const FIXTURES: [&str; 5] = [
    "none-16M-pattern-qemu10.0.bin",
    "none-16M-pattern-qemu7.2.bin",
    "pc-128M-qemu10.0.bin",
    "pc-128M-qemu7.2.bin",
    "q35-128M-qemu10.0.bin",
];

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DIR}{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Test-only cursor; panics are fine here.
struct Rd<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Rd<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn be16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    fn be32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    fn be64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }
    fn str8(&mut self) -> String {
        let n = self.u8() as usize;
        String::from_utf8(self.bytes(n).to_vec()).unwrap()
    }

    /// A RAM START/PART/END body, up to and including EOS.
    fn ram_body(&mut self) {
        loop {
            let v = self.be64();
            let flags = v & ram::FLAGS_MASK;
            if flags & ram::MEM_SIZE != 0 {
                let total = v & !ram::FLAGS_MASK;
                let mut sum = 0;
                while sum < total {
                    self.str8();
                    sum += self.be64();
                }
                assert_eq!(sum, total);
            } else if flags == ram::MULTIFD_FLUSH {
            } else if flags & ram::EOS != 0 {
                return;
            } else if flags & (ram::ZERO | ram::PAGE) != 0 {
                if flags & ram::CONTINUE == 0 {
                    self.str8();
                }
                self.bytes(if flags & ram::ZERO != 0 {
                    1
                } else {
                    TARGET_PAGE_SIZE
                });
            } else {
                panic!("unexpected RAM flags {flags:#x} at {}", self.pos - 8);
            }
        }
    }

    fn footer(&mut self, section_id: u32) {
        assert_eq!(self.u8(), section::FOOTER, "footer at {}", self.pos - 1);
        assert_eq!(self.be32(), section_id);
    }
}

struct Full {
    idstr: String,
    instance_id: u32,
    version: u32,
    /// Offset of the body in the stream.
    start: usize,
    len: usize,
}

struct Fixture {
    bytes: Vec<u8>,
    eof: usize,
    desc: VmDescription,
    fulls: Vec<Full>,
}

/// Find the description, then walk the whole stream with it.
fn load(name: &str) -> Fixture {
    let bytes = read(name);
    let (eof, json) = find_trailing_vmdesc(&bytes).unwrap_or_else(|| panic!("{name}: no vmdesc"));
    assert_eq!(json.end, bytes.len());
    assert_eq!(json.start, eof + 6);
    let desc = VmDescription::parse(&bytes[json]).unwrap();
    assert_eq!(desc.page_size(), 4096);

    let mut r = Rd { b: &bytes, pos: 0 };
    assert_eq!(r.be32(), FILE_MAGIC);
    assert_eq!(r.be32(), FILE_VERSION);
    assert_eq!(r.u8(), section::CONFIGURATION);
    match desc.configuration() {
        // 10.0 describes the configuration section too.
        Some(c) => {
            let n = body_len(c, &bytes[r.pos..]).unwrap();
            let name_len = r.be32() as usize;
            assert_eq!(n, 4 + name_len, "{name}: configuration");
            r.bytes(name_len);
        }
        None => {
            let name_len = r.be32() as usize;
            r.bytes(name_len);
            assert_ne!(bytes[r.pos], section::SUBSECTION);
        }
    }

    let mut ids = BTreeMap::new();
    let mut fulls = Vec::new();
    loop {
        let at = r.pos;
        match r.u8() {
            section::EOF => {
                assert_eq!(at, eof, "{name}: EOF where the description says");
                break;
            }
            t @ (section::START | section::FULL) => {
                let sid = r.be32();
                let idstr = r.str8();
                let instance_id = r.be32();
                let version = r.be32();
                ids.insert(sid, idstr.clone());
                if idstr == ram::IDSTR {
                    assert_eq!(t, section::START);
                    r.ram_body();
                } else {
                    assert_eq!(t, section::FULL, "{name}: START of {idstr}");
                    let d = desc
                        .device(&idstr, instance_id)
                        .unwrap_or_else(|| panic!("{name}: {idstr} not described"));
                    let len = body_len(d, &bytes[r.pos..])
                        .unwrap_or_else(|e| panic!("{name}: {idstr}: {e}"));
                    fulls.push(Full {
                        idstr,
                        instance_id,
                        version,
                        start: r.pos,
                        len,
                    });
                    r.pos += len;
                }
                r.footer(sid);
            }
            section::PART | section::END => {
                let sid = r.be32();
                assert_eq!(ids.get(&sid).map(String::as_str), Some(ram::IDSTR));
                r.ram_body();
                r.footer(sid);
            }
            section::COMMAND => {
                r.be16();
                let len = r.be16() as usize;
                r.bytes(len);
            }
            t => panic!("{name}: section type {t:#x} at {at}"),
        }
    }
    Fixture {
        bytes,
        eof,
        desc,
        fulls,
    }
}

#[test]
fn every_full_section_lands_on_its_footer() {
    for name in FIXTURES {
        let f = load(name);
        // Every described device was sent exactly once, and vice versa.
        let mut seen: Vec<_> = f
            .fulls
            .iter()
            .map(|s| (s.idstr.clone(), s.instance_id))
            .collect();
        let mut described: Vec<_> = f
            .desc
            .devices()
            .iter()
            .map(|d| (d.name.clone(), d.instance_id))
            .collect();
        seen.sort();
        described.sort();
        assert_eq!(seen, described, "{name}");

        for s in &f.fulls {
            let d = f.desc.device(&s.idstr, s.instance_id).unwrap();
            if let Some(v) = d.version {
                assert_eq!(v, s.version, "{name}: {}", s.idstr);
            }
            let body = &f.bytes[s.start..s.start + s.len];
            assert_eq!(body_len(d, body).unwrap(), s.len);
            if s.len > 0 {
                let e = body_len(d, &body[..s.len - 1]).unwrap_err();
                assert!(e.is_truncated(), "{name}: {}: {e}", s.idstr);
            }
            // Decoding walks into every struct and checks declared sizes.
            let v = decode_fields(d, body).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(v.is_object());
            if s.idstr == "fdc" {
                // Two "drives" entries, only the first with "index": one array.
                let drives = v["state"]["drives"].as_array().unwrap();
                assert_eq!(drives.len(), 2);
                assert!(drives[1]["fdrive/media_rate"].is_object());
            }
        }
        assert!(f.fulls.last().unwrap().start < f.eof);
    }
}

#[test]
fn timer_and_globalstate_decode() {
    for name in FIXTURES {
        let f = load(name);
        let get = |idstr: &str| {
            let s = f.fulls.iter().find(|s| s.idstr == idstr).unwrap();
            let d = f.desc.device(idstr, 0).unwrap();
            decode_fields(d, &f.bytes[s.start..]).unwrap()
        };
        let timer = get("timer");
        assert!(timer["cpu_ticks_offset"].is_i64(), "{name}: {timer}");
        assert!(timer["cpu_clock_offset"].is_i64(), "{name}: {timer}");
        assert_eq!(timer["unused"], "0000000000000000");

        let gs = get("globalstate");
        let runstate = gs["runstate"].as_str().unwrap();
        let prelaunch: String = b"prelaunch".iter().map(|b| format!("{b:02x}")).collect();
        assert!(runstate.starts_with(&(prelaunch + "00")), "{name}: {gs}");
        assert_eq!(gs["size"], 10, "{name}: {gs}");

        // "int32 le" (less-or-equal check, big-endian on the wire): the
        // PCIDevice vmsd's version_id is 2.
        let mut pci_devices = 0;
        for s in &f.fulls {
            let d = f.desc.device(&s.idstr, s.instance_id).unwrap();
            let v = decode_fields(d, &f.bytes[s.start..]).unwrap();
            for key in ["parent_obj", "d", "dev"] {
                if let Some(id) = v.get(key).and_then(|p| p.get("version_id")) {
                    assert_eq!(id, 2, "{name}: {}", s.idstr);
                    pci_devices += 1;
                }
            }
        }
        if !name.starts_with("none") {
            assert!(pci_devices >= 4, "{name}: {pci_devices}");
        }
    }
}

#[test]
fn builder_reproduces_fixture_descriptions() {
    for name in FIXTURES {
        let f = load(name);
        let (_, range) = find_trailing_vmdesc(&f.bytes).unwrap();
        let original: Value = serde_json::from_slice(&f.bytes[range]).unwrap();
        let mut b = VmDescriptionBuilder::new(f.desc.page_size());
        if let Some(c) = f.desc.configuration() {
            let name_len = u32::from_be_bytes(f.bytes[9..13].try_into().unwrap()) as usize;
            b.configuration(name_len);
            assert_eq!(*c.json, original["configuration"]);
        }
        for d in f.desc.devices() {
            b.push_device(Value::clone(&d.json));
        }
        let out: Value = serde_json::from_slice(&b.to_json_bytes()).unwrap();
        assert_eq!(out, original, "{name}");
        // Same key order too (Value equality ignores it).
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&out), keys(&original));
    }
}

/// Deterministic generator; no extra crates.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Replace one random number or string in a description, or drop a key.
fn mutate_desc(v: &mut Value, rng: &mut Lcg) {
    let mut slots = Vec::new();
    collect_slots(v, &mut Vec::new(), &mut slots);
    if slots.is_empty() {
        return;
    }
    let path = slots.swap_remove(rng.below(slots.len()));
    let mut cur = &mut *v;
    for step in &path[..path.len() - 1] {
        cur = match step {
            Step::Key(k) => &mut cur[k.as_str()],
            Step::Idx(i) => &mut cur[*i],
        };
    }
    let Some(Step::Key(last)) = path.last() else {
        return;
    };
    let obj = cur.as_object_mut().unwrap();
    let choices = [
        0u64,
        1,
        5,
        0x7fff_ffff,
        u32::MAX as u64,
        u64::MAX,
        rng.next(),
    ];
    match rng.below(4) {
        0 => {
            obj.remove(last);
        }
        1 => {
            obj.insert(last.clone(), Value::from("uint8"));
        }
        _ => {
            let n = choices[rng.below(choices.len())];
            obj.insert(last.clone(), Value::from(n));
        }
    }
}

#[derive(Clone)]
enum Step {
    Key(String),
    Idx(usize),
}

fn collect_slots(v: &Value, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match v {
        Value::Object(o) => {
            for (k, c) in o {
                path.push(Step::Key(k.clone()));
                if !c.is_object() && !c.is_array() {
                    out.push(path.clone());
                } else {
                    collect_slots(c, path, out);
                }
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                path.push(Step::Idx(i));
                collect_slots(c, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

#[test]
fn damaged_bodies_and_descriptions_never_panic() {
    let mut rng = Lcg(0x5eed_1234_abcd_0001);
    for name in FIXTURES {
        let f = load(name);
        for s in &f.fulls {
            let d = f.desc.device(&s.idstr, s.instance_id).unwrap();
            let body = &f.bytes[s.start..s.start + s.len];

            // Truncation anywhere is "wait for more", never a mismatch.
            let points: Vec<usize> = if s.len <= 80 {
                (0..s.len).collect()
            } else {
                (0..80).map(|_| rng.below(s.len)).collect()
            };
            for k in points {
                let e = body_len(d, &body[..k]).unwrap_err();
                assert!(e.is_truncated(), "{name}: {} cut at {k}: {e}", s.idstr);
                assert!(decode_fields(d, &body[..k]).unwrap_err().is_truncated());
            }

            // Flipped bytes in the body and what follows it.
            let region_end = (s.start + s.len + 64).min(f.eof);
            for _ in 0..24 {
                let mut region = f.bytes[s.start..region_end].to_vec();
                for _ in 0..1 + rng.below(6) {
                    let at = rng.below(region.len());
                    region[at] ^= 1 << rng.below(8);
                }
                let cut = region.len() - rng.below(region.len() / 4 + 1);
                let _ = body_len(d, &region[..cut]);
                let _ = decode_fields(d, &region[..cut]);
            }

            // Another device's description over this body.
            let other = &f.fulls[rng.below(f.fulls.len())];
            let od = f.desc.device(&other.idstr, other.instance_id).unwrap();
            let _ = body_len(od, &f.bytes[s.start..region_end]);
            let _ = decode_fields(od, &f.bytes[s.start..region_end]);

            // Damaged descriptions over the real body.
            for _ in 0..8 {
                let mut dd = d.clone();
                for _ in 0..1 + rng.below(3) {
                    mutate_desc(std::sync::Arc::make_mut(&mut dd.json), &mut rng);
                }
                let _ = body_len(&dd, &f.bytes[s.start..region_end]);
                let _ = decode_fields(&dd, &f.bytes[s.start..region_end]);
            }
        }

        // The description bytes themselves, damaged, through the finder and
        // the parser.
        for _ in 0..40 {
            let mut tail = f.bytes[f.eof..].to_vec();
            let at = rng.below(tail.len());
            tail[at] ^= 1 << rng.below(8);
            if let Some((eof, range)) = find_trailing_vmdesc(&tail) {
                let _ = VmDescription::parse(&tail[range.clone()]);
                assert!(eof < range.start);
            }
            let _ = VmDescription::parse(&tail[6..]);
        }
    }
}
