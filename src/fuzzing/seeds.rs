//! Seed inputs for the fuzz targets: small pieces cut from real QEMU streams (the
//! fixtures), plus built-in ones for what the fixtures do not hold (return path, control
//! commands, postcopy). Seeds are made at fuzz start, so no binary corpus is committed.

use std::ops::Range;

use crate::compat::wire::{self, command, ram as flag};
use crate::vmstate::{self, DeviceDesc, VmDescription, VmDescriptionBuilder};
use crate::wire::multifd::{self, InitPacket, PacketHeader};
use crate::wire::postcopy;
use crate::wire::ram::{self, Record};
use crate::wire::return_path::{self, RpMessage};
use crate::wire::stream::{self, Token};

/// RAM records kept per RAM section (the first ones and the last one).
const RECORDS_KEPT: usize = 3;
/// Device sections per cut-down stream or package: small seeds mutate faster.
const DEVICES_PER_SEED: usize = 4;
/// Largest seed kept: libFuzzer mutates up to the largest seed's length, and small inputs
/// run (and shrink) faster.
const MAX_SEED: usize = 32 << 10;

type Seeds = Vec<(&'static str, Vec<u8>)>;

struct RamSection {
    /// Section header, then the block list (START only).
    head: Range<usize>,
    records: Vec<Range<usize>>,
    /// The EOS record and the footer.
    tail: Range<usize>,
}

struct Device {
    head: Range<usize>,
    body: Range<usize>,
    footer: Range<usize>,
    desc: DeviceDesc,
}

/// What a fixture is made of, as byte ranges into it.
struct Layout {
    /// Header and configuration section.
    prologue: Range<usize>,
    ram: Vec<RamSection>,
    devices: Vec<Device>,
    desc: VmDescription,
    configuration_body: Option<Range<usize>>,
}

fn layout(s: &[u8]) -> Result<Layout, String> {
    let (desc, _) = vmstate::find_trailing_vmdesc(s)
        .ok_or("no VM description at the end")
        .and_then(|(eof, r)| {
            VmDescription::parse(&s[r])
                .map(|d| (d, eof))
                .map_err(|_| "bad VM description")
        })?;
    let e = |what: &str, pos: usize| format!("{what} at offset {pos:#x}");
    let next =
        |pos: usize, dec: &dyn Fn(&[u8]) -> stream::Decoded<usize>| -> Result<usize, String> {
            match dec(&s[pos..]) {
                Ok(Some((_, n))) => Ok(pos + n),
                _ => Err(e("cannot decode", pos)),
            }
        };
    let mut pos = next(0, &|b| {
        stream::decode_header(b).map(|o| o.map(|(_, n)| (n, n)))
    })?;
    let mut configuration_body = None;
    if s.get(pos) == Some(&crate::compat::wire::section::CONFIGURATION) {
        let end = next(pos, &|b| {
            stream::decode_configuration(b).map(|o| o.map(|(_, n)| (n, n)))
        })?;
        configuration_body = Some(pos + 1..end);
        pos = end;
    }
    let mut l = Layout {
        prologue: 0..pos,
        ram: Vec::new(),
        devices: Vec::new(),
        desc,
        configuration_body,
    };
    let mut ram_id = None;
    loop {
        let start = pos;
        let (token, n) = match stream::decode_token(&s[pos..]) {
            Ok(Some(t)) => t,
            _ => return Err(e("bad token", pos)),
        };
        pos += n;
        match token {
            Token::Eof => return Ok(l),
            Token::Start(h) if h.idstr == flag::IDSTR => {
                ram_id = Some(h.section_id);
                let total = match ram::decode_record(&s[pos..]) {
                    Ok(Some((Record::MemSize { total }, n))) => {
                        pos += n;
                        total
                    }
                    _ => return Err(e("no block list", pos)),
                };
                let mut seen = 0u64;
                while seen < total {
                    match ram::decode_block_entry(&s[pos..], &|_| false) {
                        Ok(Some((b, n))) => {
                            seen = seen.saturating_add(b.used_length);
                            pos += n;
                        }
                        _ => return Err(e("bad block entry", pos)),
                    }
                }
                pos = ram_section(s, start, pos, h.section_id, &mut l.ram)?;
            }
            Token::Part(id) | Token::End(id) if Some(id) == ram_id => {
                pos = ram_section(s, start, pos, id, &mut l.ram)?;
            }
            Token::Start(h) | Token::Full(h) => {
                let d = l
                    .desc
                    .device(&h.idstr, h.instance_id)
                    .ok_or_else(|| e("undescribed device", start))?
                    .clone();
                let n = vmstate::body_len(&d, &s[pos..]).map_err(|x| x.to_string())?;
                let body = pos..pos + n;
                let footer = body.end..body.end + 5;
                if stream::decode_footer(&s[footer.start..], h.section_id) != Ok(Some(((), 5))) {
                    return Err(e("bad footer", footer.start));
                }
                pos = footer.end;
                l.devices.push(Device {
                    head: start..body.start,
                    body,
                    footer,
                    desc: d,
                });
            }
            Token::Command(_) => {}
            _ => return Err(e("unexpected token", start)),
        }
    }
}

/// Records a RAM section whose body starts at `pos`; returns the offset after its footer.
fn ram_section(
    s: &[u8],
    start: usize,
    mut pos: usize,
    id: u32,
    out: &mut Vec<RamSection>,
) -> Result<usize, String> {
    let head = start..pos;
    let mut records = Vec::new();
    loop {
        match ram::decode_record(&s[pos..]) {
            Ok(Some((Record::Eos, n))) => {
                let tail = pos..pos + n + 5;
                if stream::decode_footer(&s[pos + n..], id) != Ok(Some(((), 5))) {
                    return Err(format!("bad RAM footer at {:#x}", pos + n));
                }
                out.push(RamSection {
                    head,
                    records,
                    tail: tail.clone(),
                });
                return Ok(tail.end);
            }
            Ok(Some((_, n))) => {
                records.push(pos..pos + n);
                pos += n;
            }
            _ => return Err(format!("bad RAM record at {pos:#x}")),
        }
    }
}

/// A RAM section with only its first and last records (CONTINUE records whose block
/// record was dropped still decode; the walkers then report them, which is fine).
fn ram_cut(s: &[u8], r: &RamSection, with_head: bool, with_footer: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if with_head {
        out.extend_from_slice(&s[r.head.clone()]);
    }
    let keep = r.records.len().min(RECORDS_KEPT);
    for rec in r.records[..keep]
        .iter()
        .chain(r.records.iter().skip(keep).last())
    {
        out.extend_from_slice(&s[rec.clone()]);
    }
    let tail = &s[r.tail.clone()];
    out.extend_from_slice(if with_footer { tail } else { &tail[..8] });
    out
}

fn vmdesc_token(desc: &VmDescription, devices: &[&Device], machine_len: Option<usize>) -> Vec<u8> {
    let mut b = VmDescriptionBuilder::new(desc.page_size());
    if let Some(n) = machine_len {
        b.configuration(n);
    }
    for d in devices {
        b.push_device((*d.desc.json).clone());
    }
    let mut out = vec![crate::compat::wire::section::EOF];
    // A description of a few devices is far below the limit.
    stream::encode_vmdesc(&mut out, &b.to_json_bytes()).unwrap_or_default();
    out
}

/// Seeds for every target, cut from one stream as QEMU writes it.
pub fn seeds_from_stream(s: &[u8]) -> Result<Seeds, String> {
    let l = layout(s)?;
    let mut seeds: Seeds = Vec::new();
    let prologue = &s[l.prologue.clone()];
    let machine_len = l.configuration_body.as_ref().map(|r| r.len() - 4);
    let machine_len = machine_len.filter(|_| l.desc.configuration().is_some());
    let ram_start = l
        .ram
        .first()
        .map(|r| ram_cut(s, r, true, true))
        .unwrap_or_default();

    for r in l.ram.iter().take(3) {
        // The body without the section header: the block list (START) stays in `head`.
        let mut body = Vec::new();
        let hdr_len = match stream::decode_token(&s[r.head.clone()]) {
            Ok(Some((_, n))) => n,
            _ => 0,
        };
        body.extend_from_slice(&s[r.head.start + hdr_len..r.head.end]);
        body.extend(ram_cut(s, r, false, false));
        seeds.push(("ram", body));
    }

    let mut devs: Vec<&Device> = l.devices.iter().collect();
    devs.sort_by_key(|d| d.body.len());
    for group in devs.chunks(DEVICES_PER_SEED).take(8) {
        let mut st = prologue.to_vec();
        st.extend_from_slice(&ram_start);
        let mut sections = Vec::new();
        for d in group {
            sections.extend_from_slice(&s[d.head.start..d.footer.end]);
        }
        st.extend_from_slice(&sections);
        st.extend(vmdesc_token(&l.desc, group, machine_len));
        seeds.push(("stream", st));

        // The same sections in a postcopy package, as QEMU sends them after ADVISE.
        if let Ok(pkg) = postcopy::encode_package(&sections) {
            let mut st = prologue.to_vec();
            let advise = postcopy::encode_advise(&postcopy::Advise {
                page_size_summary: 4096,
                target_page_size: 4096,
            });
            let _ = stream::encode_command(&mut st, command::POSTCOPY_ADVISE, &advise);
            st.extend_from_slice(&ram_start);
            let _ = stream::encode_command(
                &mut st,
                command::PACKAGED,
                &(pkg.len() as u32).to_be_bytes(),
            );
            st.extend_from_slice(&pkg);
            st.extend(vmdesc_token(&l.desc, group, machine_len));
            seeds.push(("stream", st));
            seeds.push(("packaged", pkg));
        }
    }

    // Tokens with empty bodies: every kind of header the stream has, once.
    let mut tk = prologue.to_vec();
    for r in l.ram.iter().take(2) {
        if let Ok(Some((_, n))) = stream::decode_token(&s[r.head.clone()]) {
            tk.extend_from_slice(&s[r.head.start..r.head.start + n]);
            tk.extend_from_slice(&s[r.tail.end - 5..r.tail.end]);
        }
    }
    for d in devs.iter().take(2) {
        tk.extend_from_slice(&s[d.head.clone()]);
        tk.extend_from_slice(&s[d.footer.clone()]);
    }
    tk.extend(vmdesc_token(
        &l.desc,
        &devs[..devs.len().min(1)],
        machine_len,
    ));
    seeds.push(("tokens", tk));

    // One description + body per device (and the configuration section's).
    for d in &devs {
        let mut b = VmDescriptionBuilder::new(l.desc.page_size());
        b.push_device((*d.desc.json).clone());
        let mut v = b.to_json_bytes();
        v.push(0);
        v.extend_from_slice(&s[d.body.start..d.footer.end]);
        seeds.push(("vmstate", v));
    }
    if let (Some(n), Some(body)) = (machine_len, &l.configuration_body) {
        let mut b = VmDescriptionBuilder::new(l.desc.page_size());
        b.configuration(n);
        let mut v = b.to_json_bytes();
        v.push(0);
        v.extend_from_slice(&s[body.clone()]);
        seeds.push(("vmstate", v));
    }
    seeds.retain(|(_, s)| s.len() <= MAX_SEED);
    Ok(seeds)
}

/// Seeds that need no fixture: return-path traffic, control commands, small streams.
pub fn builtin_seeds() -> Seeds {
    let mut seeds: Seeds = super::mapped::seeds();

    let mut rpath = Vec::new();
    for m in [
        RpMessage::Pong(1),
        RpMessage::ReqPagesId {
            offset: 0x1000,
            len: 4096,
            block: "pc.ram",
        },
        RpMessage::ReqPages {
            offset: 0x2000,
            len: 8192,
        },
        RpMessage::SwitchoverAck,
        RpMessage::ResumeAck(1),
        RpMessage::Shut(0),
    ] {
        let _ = return_path::encode(&mut rpath, &m);
    }
    seeds.push(("return_path", rpath));
    let mut bm = Vec::new();
    let _ = return_path::encode(&mut bm, &RpMessage::RecvBitmap { block: "ram" });
    return_path::encode_bitmap_tail(&mut bm, &[0b1011, u64::MAX, 0]);
    let _ = return_path::encode(&mut bm, &RpMessage::Shut(1));
    seeds.push(("return_path", bm));

    // A multifd channel as QEMU 10.0 starts one: initial packet, the setup's SYNC, a packet
    // of pages (its data after it), the SYNC at the end of a pass.
    let mut mf = Vec::new();
    multifd::encode_init(
        &mut mf,
        &InitPacket {
            uuid: [0; 16],
            id: 1,
        },
    );
    let sync = PacketHeader::sync;
    let _ = multifd::encode_packet_header(&mut mf, &sync(1));
    let pages = PacketHeader {
        flags: 0,
        pages_alloc: wire::multifd::PAGES_PER_PACKET,
        normal_pages: 2,
        zero_pages: 1,
        next_packet_size: 2 * 4096,
        packet_num: 2,
        ramblock: "pc.ram".into(),
        offsets: vec![0x3000, 0x1000, 0x2000],
    };
    let _ = multifd::encode_packet_header(&mut mf, &pages);
    mf.extend((0..2 * 4096).map(|i| (i % 251) as u8));
    let _ = multifd::encode_packet_header(&mut mf, &sync(5));
    seeds.push(("multifd", mf));

    // The start of a TLS channel as captured: a ClientHello (TLS 1.3 and 1.2 offered, two
    // suites, SNI "dst"), a ServerHello choosing TLS 1.3, CCS, two encrypted records.
    let record = |t: u8, body: &[u8]| {
        let mut v = vec![t, 3, 3];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    };
    let hs = |kind: u8, body: &[u8]| {
        let mut v = vec![kind];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        v.extend_from_slice(body);
        v
    };
    let mut ch = vec![3, 3];
    ch.extend_from_slice(&[0x11; 32]);
    ch.extend_from_slice(&[0, 0, 4, 0x13, 0x02, 0x13, 0x01, 1, 0]);
    ch.extend_from_slice(&[0, 17, 0, 43, 0, 5, 4, 3, 4, 3, 3]);
    ch.extend_from_slice(&[0, 0, 0, 8, 0, 6, 0, 0, 3, b'd', b's', b't']);
    let mut sh = vec![3, 3];
    sh.extend_from_slice(&[0x22; 32]);
    sh.extend_from_slice(&[0, 0x13, 0x02, 0, 0, 6, 0, 43, 0, 2, 3, 4]);
    let mut cap = record(22, &hs(1, &ch));
    cap.extend(record(22, &hs(2, &sh)));
    cap.extend(record(20, &[1]));
    cap.extend(record(23, &[0x5a; 40]));
    cap.extend(record(23, &[0xa5; 17]));
    seeds.push(("tls", cap));

    for line in [
        r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#,
        r#"{"execute": "getfd", "arguments": {"fdname": "mem0"}, "id": 1}"#,
        r#"{"execute": "ram-block-add", "arguments": {"id": "pc.ram", "fdname": "mem0", "offset": 0, "size": 134217728, "page-size": 4096, "host-addr": 140000000000, "dirty-bitmap": "bm0"}, "id": "a"}"#,
        r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "postcopy-ram", "state": true}]}}"#,
        r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1e9, "machine-type": "pc-q35-10.0", "compat-version": "7.2"}}"#,
        r#"{"execute": "migrate", "arguments": {"uri": "unix:/tmp/m.sock", "resume": false}, "control": {"run-oob": true}}"#,
        r#"{"exec-oob": "migrate-pause", "id": [null, -1.5e-3, "\u00e9\n"]}"#,
        r#"{"execute": "device-state-set", "arguments": {"sections": [{"idstr": "timer", "instance-id": 0, "version-id": 2, "data": "AAAAAA=="}, {"raw": "BA=="}]}}"#,
        r#"{"execute": "query-migrate"}"#,
    ] {
        seeds.push(("control", format!("{line}\n").into_bytes()));
    }

    // A tiny package whose first body holds a false footer (as postcopy's unit test).
    let full = |id: u32, name: &str, body: &[u8]| {
        let mut b = Vec::new();
        let h = stream::SectionHeader {
            section_id: id,
            idstr: name.into(),
            instance_id: 0,
            version_id: 1,
        };
        let _ = stream::encode_section_start(&mut b, stream::SectionKind::Full, &h);
        b.extend_from_slice(body);
        stream::encode_footer(&mut b, id);
        b
    };
    let mut devs = full(3, "timer", &[0x7e, 0, 0, 0, 3, 4, 9, 9]);
    devs.extend(full(4, "globalstate", &[1, 2, 3]));
    if let Ok(p) = postcopy::encode_package(&devs) {
        seeds.push(("packaged", p));
    }

    // A minimal stream: header, configuration, one RAM block of two pages, a device
    // described after EOF.
    let mut st = Vec::new();
    stream::encode_header(&mut st);
    let _ = stream::encode_configuration(&mut st, "none");
    let ram_hdr = stream::SectionHeader {
        section_id: 1,
        idstr: flag::IDSTR.into(),
        instance_id: 0,
        version_id: flag::VERSION,
    };
    let _ = stream::encode_section_start(&mut st, stream::SectionKind::Start, &ram_hdr);
    let _ = ram::encode_block_list(
        &mut st,
        &[ram::BlockEntry {
            idstr: "ram".into(),
            used_length: 8192,
            page_size: None,
        }],
    );
    stream::encode_footer(&mut st, 1);
    stream::encode_section_part(&mut st, stream::SectionKind::End, 1);
    let _ = ram::encode_zero_page(&mut st, 0, Some("ram"));
    let _ = ram::encode_page_header(&mut st, 0x1000, flag::PAGE, None);
    st.extend_from_slice(&[0x5a; 4096]);
    ram::encode_eos(&mut st);
    stream::encode_footer(&mut st, 1);
    let dev = stream::SectionHeader {
        section_id: 2,
        idstr: "timer".into(),
        instance_id: 0,
        version_id: 2,
    };
    let _ = stream::encode_section_start(&mut st, stream::SectionKind::Full, &dev);
    st.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 7, 5, 7, b'a', b'b', b'c', b'd', b'e', b'f', b'g', 0, 0, 0, 1, 9,
    ]);
    stream::encode_footer(&mut st, 2);
    let timer = serde_json::json!({"name": "timer", "instance_id": 0, "vmsd_name": "timer",
        "version": 2, "fields": [{"name": "ticks", "type": "int64", "size": 8}],
        "subsections": [{"vmsd_name": "abcdefg", "version": 1,
            "fields": [{"name": "x", "type": "uint8", "size": 1}]}]});
    let mut b = VmDescriptionBuilder::new(4096);
    b.configuration(4).push_device(timer);
    let desc = b.to_json_bytes();
    stream::encode_eof(&mut st);
    let _ = stream::encode_vmdesc(&mut st, &desc);
    seeds.push(("stream", st.clone()));
    seeds.push(("tokens", st[..st.len().min(48)].to_vec()));
    let mut cmds = Vec::new();
    let _ = stream::encode_command(&mut cmds, command::PING, &3u32.to_be_bytes());
    let _ = stream::encode_command(&mut cmds, command::OPEN_RETURN_PATH, &[]);
    let _ = postcopy::encode_discards(&mut cmds, "pc.ram", &[(0, 4096), (8192, 4096)]);
    seeds.push(("tokens", cmds));
    let mut v = desc;
    v.push(0);
    v.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 7, 5, 7, b'a', b'b', b'c', b'd', b'e', b'f', b'g', 0, 0, 0, 1, 9,
    ]);
    seeds.push(("vmstate", v));
    let mut rb = Vec::new();
    let _ = ram::encode_zero_page(&mut rb, 0x3000, Some("pc.ram"));
    rb.extend_from_slice(&(flag::MULTIFD_FLUSH).to_be_bytes());
    ram::encode_eos(&mut rb);
    seeds.push(("ram", rb));
    seeds
}
