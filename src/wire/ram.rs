//! The RAM section ("ram", version 4): block list and page records, as `migration/ram.c`
//! writes them. Pure codecs; the sender and loader sit above.

use crate::compat::wire::{ram as flag, TARGET_PAGE_SIZE};
use crate::wire::stream::{put_be64, put_str8, Cursor, Decoded, WireError};

/// One entry of the block list in the RAM START section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    pub idstr: String,
    pub used_length: u64,
    /// Sent only for huge-page blocks when postcopy-ram is on.
    pub page_size: Option<u64>,
}

/// Writes the START body: total | MEM_SIZE, the block entries, then EOS.
pub fn encode_block_list(out: &mut Vec<u8>, blocks: &[BlockEntry]) -> Result<(), WireError> {
    encode_block_entries(out, blocks)?;
    put_be64(out, flag::EOS);
    Ok(())
}

/// Writes the START body without its EOS: with multifd, QEMU's `ram_save_setup` syncs the
/// channels (and sends `MULTIFD_FLUSH`) between the list and the EOS.
pub fn encode_block_entries(out: &mut Vec<u8>, blocks: &[BlockEntry]) -> Result<(), WireError> {
    let total = blocks
        .iter()
        .try_fold(0u64, |acc, b| acc.checked_add(b.used_length))
        .ok_or_else(|| WireError::Invalid("RAM blocks add up to more than 2^64".into()))?;
    put_be64(out, total | flag::MEM_SIZE);
    for b in blocks {
        put_str8(out, &b.idstr)?;
        put_be64(out, b.used_length);
        if let Some(ps) = b.page_size {
            put_be64(out, ps);
        }
    }
    Ok(())
}

/// Decodes one block entry; `has_page_size` says, for a block name, whether the sender
/// appends the page size (the destination knows: postcopy advised and a huge-page block).
pub fn decode_block_entry<'a>(
    buf: &'a [u8],
    has_page_size: &dyn Fn(&str) -> bool,
) -> Decoded<BlockEntry> {
    let mut c = Cursor::new(buf);
    let Some(idstr) = c.str8("RAM block name")? else {
        return Ok(None);
    };
    let Some(used_length) = c.be64() else {
        return Ok(None);
    };
    let page_size = if has_page_size(idstr) {
        match c.be64() {
            Some(p) => Some(p),
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some((
        BlockEntry {
            idstr: idstr.to_string(),
            used_length,
            page_size,
        },
        c.pos(),
    )))
}

/// One record of a RAM section body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// Start of the block list; entries follow until their lengths add up to `total`.
    MemSize {
        total: u64,
    },
    /// A page whose every byte is `fill` (QEMU 10.0 only sends 0).
    Zero {
        offset: u64,
        block: Option<&'a str>,
        fill: u8,
    },
    /// A whole target page.
    Page {
        offset: u64,
        block: Option<&'a str>,
        data: &'a [u8],
    },
    MultifdFlush,
    Eos,
}

/// Decodes the next record. A block name is present unless CONTINUE is set; `None` in the
/// record then means "the block of the previous record".
pub fn decode_record(buf: &[u8]) -> Decoded<Record<'_>> {
    let mut c = Cursor::new(buf);
    let Some(word) = c.be64() else {
        return Ok(None);
    };
    let flags = word & flag::FLAGS_MASK;
    let offset = word & !flag::FLAGS_MASK;
    let kind = flags & !flag::CONTINUE;
    // QEMU's loader takes exactly one kind per record (besides CONTINUE).
    let record = match kind {
        flag::MEM_SIZE => Record::MemSize { total: offset },
        flag::ZERO | flag::PAGE => {
            let block = if flags & flag::CONTINUE != 0 {
                None
            } else {
                match c.str8("RAM block name")? {
                    Some(n) => Some(n),
                    None => return Ok(None),
                }
            };
            if kind == flag::ZERO {
                let Some(fill) = c.u8() else { return Ok(None) };
                Record::Zero {
                    offset,
                    block,
                    fill,
                }
            } else {
                let Some(data) = c.bytes(TARGET_PAGE_SIZE) else {
                    return Ok(None);
                };
                Record::Page {
                    offset,
                    block,
                    data,
                }
            }
        }
        flag::MULTIFD_FLUSH if flags & flag::CONTINUE == 0 => Record::MultifdFlush,
        flag::EOS if flags & flag::CONTINUE == 0 => Record::Eos,
        flag::XBZRLE => return Err(WireError::UnsupportedRam { what: "XBZRLE" }),
        flag::COMPRESS_PAGE => {
            return Err(WireError::UnsupportedRam {
                what: "COMPRESS_PAGE",
            })
        }
        flag::HOOK => {
            return Err(WireError::UnsupportedRam {
                what: "HOOK (RDMA)",
            })
        }
        _ => return Err(WireError::UnknownRamFlags { flags, offset }),
    };
    Ok(Some((record, c.pos())))
}

/// Writes a page record header (everything but the page data).
pub fn encode_page_header(
    out: &mut Vec<u8>,
    offset: u64,
    kind: u64,
    block: Option<&str>,
) -> Result<(), WireError> {
    debug_assert!(offset & flag::FLAGS_MASK == 0);
    match block {
        Some(name) => {
            put_be64(out, offset | kind);
            put_str8(out, name)?;
        }
        None => put_be64(out, offset | kind | flag::CONTINUE),
    }
    Ok(())
}

/// Writes a zero-page record.
pub fn encode_zero_page(
    out: &mut Vec<u8>,
    offset: u64,
    block: Option<&str>,
) -> Result<(), WireError> {
    encode_page_header(out, offset, flag::ZERO, block)?;
    out.push(0);
    Ok(())
}

pub fn encode_eos(out: &mut Vec<u8>) {
    put_be64(out, flag::EOS);
}

/// Writes a MULTIFD_FLUSH record: the multifd channels have synced up to here.
pub fn encode_multifd_flush(out: &mut Vec<u8>) {
    put_be64(out, flag::MULTIFD_FLUSH);
}

/// Whether a page is all zero. Word-wise OR so the compiler vectorises it; early exit per
/// 256-byte chunk keeps random pages cheap.
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    // SAFETY: any 8 bytes are a valid u64; align_to only views the aligned middle as such.
    let (pre, mid, post) = unsafe { page.align_to::<u64>() };
    if pre.iter().chain(post).any(|&b| b != 0) {
        return false;
    }
    mid.chunks(32)
        .all(|c| c.iter().fold(0u64, |a, &w| a | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_list_as_qemu_writes_it() {
        // From none-16M-pattern-qemu10.0.bin.
        let wire = b"\x00\x00\x00\x00\x01\x00\x00\x04\x03ram\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10";
        let mut out = Vec::new();
        encode_block_list(
            &mut out,
            &[BlockEntry {
                idstr: "ram".into(),
                used_length: 16 << 20,
                page_size: None,
            }],
        )
        .unwrap();
        assert_eq!(&out[..], &wire[..]);
        let (r, n) = decode_record(wire).unwrap().unwrap();
        assert_eq!(r, Record::MemSize { total: 16 << 20 });
        let (e, m) = decode_block_entry(&wire[n..], &|_| false).unwrap().unwrap();
        assert_eq!(e.idstr, "ram");
        assert_eq!(e.used_length, 16 << 20);
        assert_eq!(
            decode_record(&wire[n + m..]).unwrap().unwrap().0,
            Record::Eos
        );
    }

    #[test]
    fn pages_roundtrip() {
        let mut b = Vec::new();
        encode_zero_page(&mut b, 0, Some("ram")).unwrap();
        encode_page_header(&mut b, 0x1000, flag::PAGE, None).unwrap();
        b.extend_from_slice(&[0xab; 4096]);
        // The second record of the 10.0 fixture: PAGE|CONTINUE at 0x1000.
        assert_eq!(&b[13..21], b"\x00\x00\x00\x00\x00\x00\x10\x28");
        let (r, n) = decode_record(&b).unwrap().unwrap();
        assert_eq!(
            r,
            Record::Zero {
                offset: 0,
                block: Some("ram"),
                fill: 0
            }
        );
        let (r2, m) = decode_record(&b[n..]).unwrap().unwrap();
        assert!(
            matches!(r2, Record::Page { offset: 0x1000, block: None, data } if data[0] == 0xab)
        );
        assert_eq!(n + m, b.len());
        for cut in 0..n {
            assert_eq!(decode_record(&b[..cut]), Ok(None), "cut at {cut}");
        }
        for cut in n..b.len() {
            assert_eq!(decode_record(&b[n..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn bad_flags() {
        let w = |v: u64| v.to_be_bytes();
        assert!(matches!(
            decode_record(&w(0x1000 | flag::ZERO | flag::PAGE)),
            Err(WireError::UnknownRamFlags { .. })
        ));
        assert!(matches!(
            decode_record(&w(flag::XBZRLE)),
            Err(WireError::UnsupportedRam { .. })
        ));
        assert!(matches!(
            decode_record(&w(flag::EOS | flag::CONTINUE)),
            Err(WireError::UnknownRamFlags { .. })
        ));
        assert!(matches!(
            decode_record(&w(0x800)),
            Err(WireError::UnknownRamFlags { .. })
        ));
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero_page(&p));
    }
}
