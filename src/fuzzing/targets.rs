//! The fuzz targets: decode, then check what must hold for any input.

use serde_json::{json, Value};

use crate::compat::wire::{self, command, ram as flag, section};
use crate::control::framing::{self, Frame};
use crate::control::qmp;
use crate::vmstate::{self, DeviceDesc, VmDescription, VmDescriptionBuilder};
use crate::wire::multifd;
use crate::wire::postcopy;
use crate::wire::ram::{self, Record};
use crate::wire::return_path::{self, RpMessage};
use crate::wire::stream::{self, Decoded, Token};

/// Largest received-bitmap the return-path target accepts (the source's limit is the
/// block's bitmap size; any fixed cap exercises the same code).
const MAX_BITMAP: u64 = 1 << 20;
/// Devices of one description walked per input: enough to reach every code path, few
/// enough that one input stays fast.
const MAX_DEVICES: usize = 8;

/// An incremental decoder must say "need more bytes" for every proper prefix of an item
/// it accepted whole. Checks the prefix one byte short and the half, not all of them, so a
/// large item stays cheap.
fn check_prefixes<'a, T: std::fmt::Debug>(
    what: &str,
    item: &'a [u8],
    dec: impl Fn(&'a [u8]) -> Decoded<T>,
) {
    for cut in [item.len().saturating_sub(1), item.len() / 2] {
        if cut < item.len() {
            let r = dec(&item[..cut]);
            assert!(
                matches!(r, Ok(None)),
                "{what}: prefix of {cut} of a {}-byte item gave {r:?}",
                item.len()
            );
        }
    }
}

/// A whole stream, as `analyze` walks it: header, configuration, RAM, device sections
/// delimited by the VM description, PACKAGED, EOF and the description.
pub fn stream(data: &[u8]) {
    let report = match crate::analyze::analyze_bytes(data) {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(report.complete);
    assert_eq!(report.file_size, data.len() as u64);
    let mut end = 0u64;
    for it in &report.items {
        assert!(it.offset >= end, "items overlap: {it:?}");
        end = it.offset + it.size;
        assert!(end <= data.len() as u64, "item past the end: {it:?}");
    }
    for b in &report.blocks {
        assert!(b.zero_pages <= b.pages, "{b:?}");
    }
    let _ = report.to_json();
}

/// Top-level tokens back to back, each START/FULL/PART/END followed by its footer (an
/// empty body). Optionally a header and a configuration section first.
pub fn tokens(data: &[u8]) {
    let mut pos = 0;
    if data.starts_with(&wire::FILE_MAGIC.to_be_bytes()) {
        match stream::decode_header(data) {
            Ok(Some((_, n))) => pos = n,
            _ => return,
        }
    }
    if data.get(pos) == Some(&section::CONFIGURATION) {
        let rest = &data[pos..];
        let Ok(Some((conf, n))) = stream::decode_configuration(rest) else {
            return;
        };
        assert!(n <= rest.len());
        // The decoder peeks at the byte after the section: without it, still "need more".
        check_prefixes(
            "configuration",
            &rest[..n + 1],
            stream::decode_configuration,
        );
        if conf.capabilities.is_empty() && conf.uuid.is_none() && conf.target_page_bits.is_none() {
            let mut out = Vec::new();
            stream::encode_configuration(&mut out, &conf.machine).unwrap();
            assert_eq!(out, &rest[..n], "configuration round trip");
        }
        pos += n;
    }
    while pos < data.len() {
        let rest = &data[pos..];
        let (token, n) = match stream::decode_token(rest) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        };
        assert!(n >= 1 && n <= rest.len());
        check_prefixes("token", &rest[..n], stream::decode_token);
        let mut out = Vec::new();
        let id = match &token {
            Token::Eof => {
                stream::encode_eof(&mut out);
                None
            }
            Token::Start(h) | Token::Full(h) => {
                let kind = if rest[0] == section::START {
                    stream::SectionKind::Start
                } else {
                    stream::SectionKind::Full
                };
                stream::encode_section_start(&mut out, kind, h).unwrap();
                Some(h.section_id)
            }
            Token::Part(id) => {
                stream::encode_section_part(&mut out, stream::SectionKind::Part, *id);
                Some(*id)
            }
            Token::End(id) => {
                stream::encode_section_part(&mut out, stream::SectionKind::End, *id);
                Some(*id)
            }
            Token::Command(c) => {
                stream::encode_command(&mut out, c.cmd, c.payload).unwrap();
                None
            }
            Token::VmDescription(j) => {
                stream::encode_vmdesc(&mut out, j).unwrap();
                None
            }
        };
        assert_eq!(out, &rest[..n], "token round trip: {token:?}");
        pos += n;
        if let Some(id) = id {
            let rest = &data[pos..];
            match stream::decode_footer(rest, id) {
                Ok(Some((_, 5))) => {
                    let mut f = Vec::new();
                    stream::encode_footer(&mut f, id);
                    assert_eq!(f, &rest[..5]);
                    check_prefixes("footer", &rest[..5], |b| stream::decode_footer(b, id));
                    pos += 5;
                }
                Ok(Some((_, n))) => panic!("footer of {n} bytes"),
                Ok(None) | Err(_) => return,
            }
        }
    }
}

/// A RAM section body: records, and the block list after a MEM_SIZE record.
pub fn ram(data: &[u8]) {
    // Which blocks carry a page size is the destination's knowledge; let the input decide.
    let has_page_size = |name: &str| name.len() % 2 == 1;
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        let (rec, n) = match ram::decode_record(rest) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        };
        assert!(n >= 8 && n <= rest.len());
        check_prefixes("RAM record", &rest[..n], ram::decode_record);
        let word = u64::from_be_bytes(rest[..8].try_into().unwrap());
        let mut out = Vec::new();
        match &rec {
            Record::MemSize { total } => {
                assert_eq!(word & !flag::CONTINUE, total | flag::MEM_SIZE);
            }
            Record::Zero {
                offset,
                block,
                fill,
            } => {
                ram::encode_page_header(&mut out, *offset, flag::ZERO, *block).unwrap();
                out.push(*fill);
            }
            Record::Page {
                offset,
                block,
                data,
            } => {
                assert_eq!(data.len(), wire::TARGET_PAGE_SIZE);
                ram::encode_page_header(&mut out, *offset, flag::PAGE, *block).unwrap();
                out.extend_from_slice(data);
            }
            Record::MultifdFlush => assert_eq!(word & flag::FLAGS_MASK, flag::MULTIFD_FLUSH),
            Record::Eos => assert_eq!(word & flag::FLAGS_MASK, flag::EOS),
        }
        if !out.is_empty() {
            assert_eq!(out, &rest[..n], "RAM record round trip: {rec:?}");
        }
        pos += n;
        let Record::MemSize { total } = rec else {
            continue;
        };
        // The block list: entries until their lengths add up to the total.
        let mut seen = 0u64;
        while seen < total {
            let rest = &data[pos..];
            let dec = |b: &[u8]| ram::decode_block_entry(b, &has_page_size);
            let (e, m) = match dec(rest) {
                Ok(Some(e)) => e,
                _ => return,
            };
            check_prefixes("RAM block entry", &rest[..m], dec);
            let mut out = Vec::new();
            ram::encode_block_list(&mut out, std::slice::from_ref(&e)).unwrap();
            assert_eq!(&out[8..out.len() - 8], &rest[..m], "block entry round trip");
            pos += m;
            let Some(s) = seen.checked_add(e.used_length) else {
                return;
            };
            seen = s;
        }
    }
}

/// Return-path messages back to back; a RECV_BITMAP is followed by its bitmap.
pub fn return_path(data: &[u8]) {
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        let (m, n) = match return_path::decode(rest) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        };
        assert!((4..=4 + wire::rp::MAX_PAYLOAD).contains(&n));
        check_prefixes("return-path message", &rest[..n], return_path::decode);
        let mut out = Vec::new();
        return_path::encode(&mut out, &m).unwrap();
        assert_eq!(out, &rest[..n], "return-path round trip: {m:?}");
        pos += n;
        if let RpMessage::RecvBitmap { .. } = m {
            let rest = &data[pos..];
            let dec = |b: &[u8]| return_path::decode_bitmap_tail(b, MAX_BITMAP);
            let (words, n) = match dec(rest) {
                Ok(Some(w)) => w,
                _ => return,
            };
            assert!(words.len() as u64 * 8 <= MAX_BITMAP);
            check_prefixes("received bitmap", &rest[..n], dec);
            let mut out = Vec::new();
            return_path::encode_bitmap_tail(&mut out, &words);
            assert_eq!(out, &rest[..n], "bitmap round trip");
            pos += n;
        }
    }
}

/// One multifd channel as the destination reads it: the initial packet, then packet headers
/// each followed by its page data. When the input does not start with an initial packet,
/// packets from the first byte.
pub fn multifd(data: &[u8]) {
    use wire::multifd::{
        FLAG_COMPRESSION_MASK, FLAG_DEVICE_STATE, INIT_PACKET_LEN, PACKET_FIXED_LEN,
        PACKET_HEADER_LEN, PAGES_PER_PACKET, RAMBLOCK_LEN,
    };
    let mut pos = 0;
    if let Ok(Some((init, n))) = multifd::decode_init(data) {
        assert_eq!(n, INIT_PACKET_LEN);
        check_prefixes("multifd initial packet", &data[..n], multifd::decode_init);
        let mut out = Vec::new();
        multifd::encode_init(&mut out, &init);
        // The reserved bytes are ignored on decode and zero on encode.
        assert_eq!(out.len(), INIT_PACKET_LEN);
        assert_eq!(out[..25], data[..25], "multifd initial packet round trip");
        pos = n;
    }
    while pos < data.len() {
        let rest = &data[pos..];
        let (h, n) = match multifd::decode_packet_header(rest) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        };
        assert_eq!(n, PACKET_HEADER_LEN);
        assert_eq!(h.flags & (FLAG_COMPRESSION_MASK | FLAG_DEVICE_STATE), 0);
        assert!(h.pages_alloc <= PAGES_PER_PACKET, "{h:?}");
        assert!(h.normal_pages + h.zero_pages <= h.pages_alloc, "{h:?}");
        assert_eq!(
            h.offsets.len(),
            h.normal_offsets().len() + h.zero_offsets().len()
        );
        assert!(h
            .offsets
            .iter()
            .all(|o| o % wire::TARGET_PAGE_SIZE as u64 == 0));
        assert!(h.ramblock.len() < RAMBLOCK_LEN);
        check_prefixes(
            "multifd packet header",
            &rest[..n],
            multifd::decode_packet_header,
        );
        // Re-encoding keeps every meaningful byte; reserved fields, the name's padding and
        // the offsets past the counts come back zero, and decode the same.
        let mut out = Vec::new();
        multifd::encode_packet_header(&mut out, &h).unwrap();
        assert_eq!(out.len(), PACKET_HEADER_LEN);
        assert_eq!(out[..36], rest[..36], "multifd packet round trip: {h:?}");
        let name_end = 64 + h.ramblock.len() + 1;
        assert_eq!(out[64..name_end], rest[64..name_end]);
        let used = PACKET_FIXED_LEN + 8 * h.offsets.len();
        assert_eq!(out[PACKET_FIXED_LEN..used], rest[PACKET_FIXED_LEN..used]);
        assert_eq!(
            multifd::decode_packet_header(&out),
            Ok(Some((h.clone(), PACKET_HEADER_LEN)))
        );
        pos += n;
        if data.len() - pos < h.data_len() {
            return;
        }
        pos += h.data_len();
    }
}

/// A capture of a TLS channel as `analyze` reads it: record headers are checked before
/// their length is used, every hello parses or is refused, and the walk accounts for every
/// byte.
pub fn tls(data: &[u8]) {
    use crate::wire::tls::{self, RECORD_HEADER_LEN};
    let c = tls::scan(data);
    assert!(c.encrypted_records <= c.records);
    assert!(c.encrypted_bytes + c.records * RECORD_HEADER_LEN as u64 <= data.len() as u64);
    assert!(c.trailing <= data.len() as u64);
    if let Ok(Some(h)) = tls::decode_record_header(data) {
        assert!(h.len <= tls::MAX_RECORD_BODY);
        for cut in 1..RECORD_HEADER_LEN {
            assert_eq!(tls::decode_record_header(&data[..cut]), Ok(None));
        }
    }
    for h in &c.hellos {
        assert!(!h.server || h.cipher_suites.len() == 1);
    }
}

/// A VM description (JSON), a NUL byte, then a device body: the description is parsed and
/// re-emitted, and the body walked with the first devices' descriptions.
pub fn vmstate(data: &[u8]) {
    // JSON text cannot hold a raw NUL, so the first one ends the description.
    let (json, body) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let desc = match VmDescription::parse(json) {
        Ok(d) => d,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // Re-emitting the devices gives the same description.
    let mut b = VmDescriptionBuilder::new(desc.page_size());
    for d in desc.devices() {
        b.push_device((*d.json).clone());
    }
    let again = VmDescription::parse(&b.to_json_bytes()).expect("re-emitted description");
    assert_eq!(again.page_size(), desc.page_size());
    assert_eq!(again.devices().len(), desc.devices().len());
    for (a, d) in again.devices().iter().zip(desc.devices()) {
        let key = |d: &DeviceDesc| {
            (
                d.name.clone(),
                d.instance_id,
                d.vmsd_name.clone(),
                d.version,
            )
        };
        assert!(
            key(a) == key(d),
            "device {:?} changed on re-emission",
            d.name
        );
        // serde_json's default float parsing may be one ULP off on the way back.
        assert!(
            sans_floats(&a.json) == sans_floats(&d.json),
            "description of {:?} changed on re-emission",
            d.name
        );
    }
    for d in desc
        .devices()
        .iter()
        .chain(desc.configuration())
        .take(MAX_DEVICES)
    {
        walk(d, body);
    }
}

/// `body_len` and `decode_fields` on one body must agree with each other and with
/// themselves on the exact body.
fn walk(d: &DeviceDesc, body: &[u8]) {
    let len = vmstate::body_len(d, body);
    let fields = vmstate::decode_fields(d, body);
    if let Err(e) = &fields {
        assert!(!e.to_string().is_empty());
    }
    match len {
        Ok(n) => {
            assert!(n <= body.len());
            // The walk reads nothing past the body...
            assert_eq!(vmstate::body_len(d, &body[..n]).ok(), Some(n));
            // ...and needs all of it.
            if n > 0 {
                let short = vmstate::body_len(d, &body[..n - 1]);
                assert!(
                    short.as_ref().is_err_and(|e| e.is_truncated()),
                    "{} of {n} bytes: {short:?}",
                    n - 1
                );
            }
            if let Ok(v) = &fields {
                let exact = vmstate::decode_fields(d, &body[..n]).expect("decode of the body");
                assert_eq!(&exact, v);
            }
        }
        Err(e) => {
            // A decode walks at least as much as a length walk.
            assert!(
                fields.is_err(),
                "body_len failed ({e}) but decode_fields did not"
            );
        }
    }
}

/// A PACKAGED blob: LISTEN, device sections, PINGs, RUN; the sections are split again.
pub fn packaged(data: &[u8]) {
    let p = match postcopy::decode_package(data) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let mut out = Vec::new();
    stream::encode_command(&mut out, command::POSTCOPY_LISTEN, &[]).unwrap();
    out.extend_from_slice(p.devices);
    for v in &p.pings {
        stream::encode_command(&mut out, command::PING, &v.to_be_bytes()).unwrap();
    }
    stream::encode_command(&mut out, command::POSTCOPY_RUN, &[]).unwrap();
    assert_eq!(out, data, "package round trip");
    let parts = match postcopy::split_full_sections(p.devices) {
        Ok(parts) => parts,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // The parts cover the device bytes exactly, in order, each a FULL section with its
    // own footer at the end.
    let mut next = 0;
    for (h, r) in &parts {
        assert_eq!(r.start, next, "gap or overlap before {h:?}");
        next = r.end;
        let bytes = &p.devices[r.clone()];
        match stream::decode_token(bytes) {
            Ok(Some((Token::Full(got), _))) => assert_eq!(&got, h),
            other => panic!("part does not start with its FULL header: {other:?}"),
        }
        let tail = &bytes[bytes.len().saturating_sub(5)..];
        assert_eq!(stream::decode_footer(tail, h.section_id), Ok(Some(((), 5))));
    }
    assert_eq!(next, p.devices.len(), "parts do not reach the end");
}

/// The control channel's input as the connection reads it: split into JSON values by the
/// framing scanner, each value parsed as a QMP request. The frames must not depend on how
/// the bytes were cut into reads (the first byte picks a read size), positions only move
/// forward, and no message is longer than the limit.
pub fn control(data: &[u8]) {
    let whole = frames(data, data.len().max(1));
    let chunk = 1 + data.first().map_or(0, |&b| usize::from(b) % 17);
    assert_eq!(
        whole,
        frames(data, chunk),
        "framing depends on read boundaries"
    );
    // Both before and after `qmp_capabilities {"enable": ["oob"]}`.
    let oob = data.len() % 2 == 1;
    for f in whole {
        if let Frame::Message { bytes, .. } = f {
            assert!(bytes.len() <= framing::MAX_MESSAGE);
            request(&bytes, oob);
        }
    }
}

fn frames(data: &[u8], chunk: usize) -> Vec<Frame> {
    let mut s = framing::Splitter::new();
    let mut out = Vec::new();
    let mut last = 0;
    for c in data.chunks(chunk) {
        s.feed(c);
        while let Some(f) = s.next_frame() {
            let end = match &f {
                Frame::Message { end, .. } | Frame::Error { end, .. } | Frame::Skipped { end } => {
                    *end
                }
            };
            assert!(
                end >= last && end <= s.position(),
                "frame end {end} out of order"
            );
            last = end;
            out.push(f);
        }
    }
    out
}

fn request(line: &[u8], oob: bool) {
    let value: Option<Value> = serde_json::from_slice(line).ok();
    match qmp::parse_request(line, oob) {
        Ok(req) => {
            let Some(Value::Object(obj)) = value else {
                panic!("request accepted from input that is not a JSON object");
            };
            let name = obj.get("execute").or_else(|| obj.get("exec-oob"));
            assert_eq!(name, Some(&Value::String(req.name.clone())));
            assert_eq!(obj.get("id"), req.id.as_ref());
            // Written back as a client would, it parses to the same request.
            let mut again = json!({"execute": req.name, "arguments": req.args});
            if let Some(id) = &req.id {
                again["id"] = id.clone();
            }
            let r2 = qmp::parse_request(again.to_string().as_bytes(), oob).expect("re-parse");
            assert_eq!(r2.name, req.name);
            // serde_json's default float parsing may be one ULP off on the way back.
            let args = |m: serde_json::Map<String, Value>| sans_floats(&Value::Object(m));
            assert_eq!(args(r2.args), args(req.args));
            assert_eq!(
                r2.id.as_ref().map(sans_floats),
                req.id.as_ref().map(sans_floats)
            );
        }
        Err((e, id)) => {
            assert!(!e.desc.is_empty());
            // An id is echoed only when the input had that id.
            if let Some(id) = id {
                let had = value.as_ref().and_then(|v| v.get("id"));
                assert_eq!(had, Some(&id));
            }
        }
    }
}

/// `v` with every non-integer number replaced by null.
fn sans_floats(v: &Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => Value::Null,
        Value::Array(a) => Value::Array(a.iter().map(sans_floats).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), sans_floats(v))).collect())
        }
        other => other.clone(),
    }
}
