//! Postcopy commands on the wire: POSTCOPY_ADVISE, POSTCOPY_RAM_DISCARD and the PACKAGED
//! blob. Pure codecs.

use std::collections::HashMap;

use crate::compat::wire::{self, command, section};
use crate::wire::stream::{self, Cursor, SectionHeader, Token, WireError};

/// QEMU's postcopy_ram_discard_version.
pub const DISCARD_VERSION: u8 = 0;
/// Ranges per discard command (QEMU's MAX_DISCARDS_PER_COMMAND).
pub const MAX_DISCARDS_PER_COMMAND: usize = 12;

/// POSTCOPY_ADVISE payload: the OR of all block page sizes and the target page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advise {
    pub page_size_summary: u64,
    pub target_page_size: u64,
}

pub fn encode_advise(a: &Advise) -> Vec<u8> {
    let mut p = Vec::with_capacity(16);
    stream::put_be64(&mut p, a.page_size_summary);
    stream::put_be64(&mut p, a.target_page_size);
    p
}

/// Decodes an ADVISE payload; an empty payload (bitmaps only, no postcopy-ram) is `None`.
pub fn decode_advise(payload: &[u8]) -> Result<Option<Advise>, WireError> {
    if payload.is_empty() {
        return Ok(None);
    }
    let mut c = Cursor::new(payload);
    match (c.be64(), c.be64(), c.remaining()) {
        (Some(page_size_summary), Some(target_page_size), 0) => Ok(Some(Advise {
            page_size_summary,
            target_page_size,
        })),
        _ => Err(WireError::Invalid(format!(
            "POSTCOPY_ADVISE payload of {} bytes (expected 0 or 16)",
            payload.len()
        ))),
    }
}

/// One POSTCOPY_RAM_DISCARD command: byte ranges of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discard<'a> {
    pub block: &'a str,
    /// (offset, length) in bytes.
    pub ranges: Vec<(u64, u64)>,
}

/// Encodes discard commands for `ranges` of `block`, 12 ranges per command.
pub fn encode_discards(
    out: &mut Vec<u8>,
    block: &str,
    ranges: &[(u64, u64)],
) -> Result<(), WireError> {
    for chunk in ranges.chunks(MAX_DISCARDS_PER_COMMAND) {
        let mut p = vec![DISCARD_VERSION];
        stream::put_str8(&mut p, block)?;
        p.push(0);
        for &(o, l) in chunk {
            stream::put_be64(&mut p, o);
            stream::put_be64(&mut p, l);
        }
        stream::encode_command(out, command::POSTCOPY_RAM_DISCARD, &p)?;
    }
    Ok(())
}

pub fn decode_discard(payload: &[u8]) -> Result<Discard<'_>, WireError> {
    let bad = |m: &str| WireError::Invalid(format!("POSTCOPY_RAM_DISCARD: {m}"));
    let mut c = Cursor::new(payload);
    match c.u8() {
        Some(DISCARD_VERSION) => {}
        Some(v) => return Err(bad(&format!("version {v}, expected 0"))),
        None => return Err(bad("empty")),
    }
    let block = c
        .str8("discard block name")?
        .ok_or_else(|| bad("truncated block name"))?;
    if c.u8() != Some(0) {
        return Err(bad("block name not NUL-terminated"));
    }
    if c.remaining() % 16 != 0 {
        return Err(bad("ranges are not 16-byte pairs"));
    }
    let mut ranges = Vec::with_capacity(c.remaining() / 16);
    while c.remaining() > 0 {
        let (Some(o), Some(l)) = (c.be64(), c.be64()) else {
            return Err(bad("truncated range"));
        };
        ranges.push((o, l));
    }
    Ok(Discard { block, ranges })
}

/// What a PACKAGED blob holds: the device sections between LISTEN and RUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package<'a> {
    /// The bytes of the device sections, exactly as sent (FULL sections with footers).
    pub devices: &'a [u8],
    /// PING values seen inside the package, in order.
    pub pings: Vec<u32>,
}

/// Builds the PACKAGED blob QEMU sends: LISTEN, the device sections, PING 3, RUN.
pub fn encode_package(devices: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut b = Vec::with_capacity(devices.len() + 32);
    stream::encode_command(&mut b, command::POSTCOPY_LISTEN, &[])?;
    b.extend_from_slice(devices);
    stream::encode_command(&mut b, command::PING, &3u32.to_be_bytes())?;
    stream::encode_command(&mut b, command::POSTCOPY_RUN, &[])?;
    Ok(b)
}

/// Splits a PACKAGED blob. It must start with LISTEN and end with RUN; PINGs may precede
/// RUN. The device sections in between are returned whole; `split_full_sections` splits them.
pub fn decode_package(blob: &[u8]) -> Result<Package<'_>, WireError> {
    let bad = |m: String| WireError::Invalid(format!("PACKAGED: {m}"));
    let (listen, n) = stream::decode_token(blob)?.ok_or_else(|| bad("truncated".into()))?;
    if listen
        != Token::Command(stream::Command {
            cmd: command::POSTCOPY_LISTEN,
            payload: &[],
        })
    {
        return Err(bad("does not start with POSTCOPY_LISTEN".into()));
    }
    // Walk the trailing commands back from the end: RUN (5 bytes), PINGs (9 bytes each).
    let run = [section::COMMAND, 0, command::POSTCOPY_RUN as u8, 0, 0];
    if blob.len() < n + run.len() || blob[blob.len() - run.len()..] != run {
        return Err(bad("does not end with POSTCOPY_RUN".into()));
    }
    let mut end = blob.len() - run.len();
    let mut pings = Vec::new();
    while end >= n + 9 && blob[end - 9..end - 4] == [section::COMMAND, 0, command::PING as u8, 0, 4]
    {
        let v = &blob[end - 4..end];
        pings.push(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        end -= 9;
    }
    pings.reverse();
    Ok(Package {
        devices: &blob[n..end],
        pings,
    })
}

/// Splits concatenated FULL sections without a VM description, using the footers: each
/// section ends with 0x7E + its id, followed by the next FULL section or the end. Where a
/// body happens to contain its own footer pattern, the split that accounts for every byte
/// is taken (the last footer of that id from which the rest splits too).
///
/// Linear: one backward sweep marks every offset from which the rest splits (a bitmap of
/// an eighth of the input), remembering per section id the last footer that ends at such
/// an offset; a forward pass then follows them. At most `MAX_SECTIONS` sections and
/// `MAX_FOOTER_IDS` distinct footer ids, so memory stays bounded whatever the bytes are.
pub fn split_full_sections(
    bytes: &[u8],
) -> Result<Vec<(SectionHeader, std::ops::Range<usize>)>, WireError> {
    let fail = |why: &str| {
        WireError::Invalid(format!(
            "device sections in the postcopy package cannot be split into FULL sections ({why})"
        ))
    };
    let n = bytes.len();
    // good[p]: the bytes from p split into whole FULL sections (p == n included).
    let mut good = vec![0u64; n / 64 + 1];
    let is_good = |g: &[u64], p: usize| g.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0);
    let id_at = |p: usize| {
        bytes
            .get(p..p.checked_add(4)?)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    // Section id -> offset of its last footer that ends where a split continues.
    let mut last_footer: HashMap<u32, usize> = HashMap::new();
    if let Some(w) = good.get_mut(n / 64) {
        *w |= 1 << (n % 64);
    }
    for p in (0..n).rev() {
        match bytes[p] {
            section::FOOTER => {
                if let (Some(id), Some(next)) = (id_at(p + 1), p.checked_add(5)) {
                    if next <= n && is_good(&good, next) {
                        if last_footer.len() >= MAX_FOOTER_IDS && !last_footer.contains_key(&id) {
                            return Err(fail("too many distinct footers"));
                        }
                        last_footer.entry(id).or_insert(p);
                    }
                }
            }
            section::FULL => {
                // Only a header whose id has a usable footer further on is decoded.
                let Some(&f) = id_at(p + 1).and_then(|id| last_footer.get(&id)) else {
                    continue;
                };
                if let Ok(Some((Token::Full(_), hl))) = stream::decode_token(&bytes[p..]) {
                    if f >= p + hl {
                        good[p / 64] |= 1 << (p % 64);
                    }
                }
            }
            _ => {}
        }
    }
    if !is_good(&good, 0) {
        return Err(fail("no split accounts for every byte"));
    }
    let mut out = Vec::new();
    let mut p = 0;
    while p < n {
        if out.len() >= MAX_SECTIONS {
            return Err(fail("too many sections"));
        }
        // good[p] guarantees a FULL header whose id has a footer after it.
        let Ok(Some((Token::Full(h), _))) = stream::decode_token(&bytes[p..]) else {
            return Err(fail("internal: lost the split"));
        };
        let Some(&f) = last_footer.get(&h.section_id) else {
            return Err(fail("internal: lost the footer"));
        };
        out.push((h, p..f + 5));
        p = f + 5;
    }
    Ok(out)
}

/// Most sections a package may hold (the destination keeps no more in a whole stream).
const MAX_SECTIONS: usize = crate::wire::device_intake::MAX_DEVICE_SECTIONS;
/// Most distinct section ids among the footers that could end a section.
const MAX_FOOTER_IDS: usize = 4 * MAX_SECTIONS;

/// The target page size x86 sends in ADVISE.
pub const TARGET_PAGE_SIZE: u64 = wire::TARGET_PAGE_SIZE as u64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::stream::SectionKind;

    #[test]
    fn advise_roundtrip() {
        let a = Advise {
            page_size_summary: 4096,
            target_page_size: 4096,
        };
        assert_eq!(decode_advise(&encode_advise(&a)), Ok(Some(a)));
        assert_eq!(decode_advise(&[]), Ok(None));
        assert!(decode_advise(&[0; 8]).is_err());
    }

    #[test]
    fn discard_roundtrip_and_chunking() {
        let ranges: Vec<(u64, u64)> = (0..30).map(|i| (i * 8192, 4096)).collect();
        let mut b = Vec::new();
        encode_discards(&mut b, "pc.ram", &ranges).unwrap();
        let mut pos = 0;
        let mut got = Vec::new();
        while pos < b.len() {
            let (t, n) = stream::decode_token(&b[pos..]).unwrap().unwrap();
            let Token::Command(c) = t else { panic!() };
            assert_eq!(c.cmd, command::POSTCOPY_RAM_DISCARD);
            let d = decode_discard(c.payload).unwrap();
            assert_eq!(d.block, "pc.ram");
            assert!(d.ranges.len() <= 12);
            got.extend(d.ranges);
            pos += n;
        }
        assert_eq!(got, ranges);
        assert!(decode_discard(&[1, 0, 0]).is_err());
        assert!(decode_discard(&[0, 1, b'a', 1]).is_err());
        assert!(decode_discard(&[0, 1, b'a', 0, 1]).is_err());
    }

    fn full(id: u32, name: &str, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        stream::encode_section_start(
            &mut b,
            SectionKind::Full,
            &SectionHeader {
                section_id: id,
                idstr: name.into(),
                instance_id: 0,
                version_id: 1,
            },
        )
        .unwrap();
        b.extend_from_slice(body);
        stream::encode_footer(&mut b, id);
        b
    }

    #[test]
    fn package_roundtrip_and_split() {
        // The first body contains its own footer followed by 0x04: a false split point.
        let mut devs = full(3, "timer", &[0x7e, 0, 0, 0, 3, 4, 9, 9]);
        devs.extend(full(4, "globalstate", &[1, 2, 3]));
        let blob = encode_package(&devs).unwrap();
        let p = decode_package(&blob).unwrap();
        assert_eq!(p.devices, &devs[..]);
        assert_eq!(p.pings, vec![3]);
        let parts = split_full_sections(p.devices).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0.idstr, "timer");
        assert_eq!(parts[1].0.idstr, "globalstate");
        assert_eq!(parts[1].1.end, devs.len());
        assert!(decode_package(&blob[..blob.len() - 1]).is_err());
        assert!(split_full_sections(&devs[..devs.len() - 1]).is_err());
        assert_eq!(split_full_sections(&[]).unwrap().len(), 0);
    }

    #[test]
    fn split_is_linear_on_crafted_input() {
        // Footer patterns everywhere, each followed by 0x04: the backtracking splitter
        // rescanned the blob from every candidate (a 100 KB file took 32 s).
        let mut b = Vec::new();
        for _ in 0..(1 << 20) / 10 {
            b.extend_from_slice(&[0x04, 0, 0, 0, 3, 0x7e, 0, 0, 0, 3]);
        }
        let mut devs = full(3, "timer", &b);
        devs.extend(full(3, "timer", &[]));
        let t0 = std::time::Instant::now();
        let r = split_full_sections(&devs);
        let took = t0.elapsed();
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        // Splits, one way or another, into sections covering everything.
        let parts = r.unwrap();
        assert_eq!(parts.last().unwrap().1.end, devs.len());
        // Without its last byte nothing splits: found out as fast.
        let t0 = std::time::Instant::now();
        assert!(split_full_sections(&devs[..devs.len() - 1]).is_err());
        assert!(t0.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn split_caps_the_section_count() {
        let mut devs = Vec::new();
        for i in 0..=MAX_SECTIONS as u32 {
            devs.extend(full(i, "d", &[]));
        }
        let e = split_full_sections(&devs).unwrap_err();
        assert!(e.to_string().contains("too many"), "{e}");
    }
}
