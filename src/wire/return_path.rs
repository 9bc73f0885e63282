//! Return-path messages (destination -> source on the same socket): be16 type, be16
//! length, payload. Pure codecs.

use crate::compat::wire::rp;
use crate::wire::stream::{put_be16, put_be32, put_be64, put_str8, Cursor, Decoded, WireError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMessage<'a> {
    Shut(u32),
    Pong(u32),
    ReqPagesId {
        offset: u64,
        len: u32,
        block: &'a str,
    },
    ReqPages {
        offset: u64,
        len: u32,
    },
    /// The bitmap follows the message, outside its length (see `decode_recv_bitmap`).
    RecvBitmap {
        block: &'a str,
    },
    ResumeAck(u32),
    SwitchoverAck,
}

pub fn encode(out: &mut Vec<u8>, m: &RpMessage<'_>) -> Result<(), WireError> {
    let mut p = Vec::new();
    let ty = match m {
        RpMessage::Shut(v) => {
            put_be32(&mut p, *v);
            rp::SHUT
        }
        RpMessage::Pong(v) => {
            put_be32(&mut p, *v);
            rp::PONG
        }
        RpMessage::ReqPagesId { offset, len, block } => {
            put_be64(&mut p, *offset);
            put_be32(&mut p, *len);
            put_str8(&mut p, block)?;
            rp::REQ_PAGES_ID
        }
        RpMessage::ReqPages { offset, len } => {
            put_be64(&mut p, *offset);
            put_be32(&mut p, *len);
            rp::REQ_PAGES
        }
        RpMessage::RecvBitmap { block } => {
            put_str8(&mut p, block)?;
            rp::RECV_BITMAP
        }
        RpMessage::ResumeAck(v) => {
            put_be32(&mut p, *v);
            rp::RESUME_ACK
        }
        RpMessage::SwitchoverAck => rp::SWITCHOVER_ACK,
    };
    put_be16(out, ty);
    put_be16(out, p.len() as u16);
    out.extend_from_slice(&p);
    Ok(())
}

/// Decodes one message, refusing what QEMU's source refuses: payloads over 512 bytes and
/// lengths that do not match a fixed-size type.
pub fn decode(buf: &[u8]) -> Decoded<RpMessage<'_>> {
    let mut c = Cursor::new(buf);
    let (Some(ty), Some(len)) = (c.be16(), c.be16()) else {
        return Ok(None);
    };
    if len as usize > rp::MAX_PAYLOAD {
        return Err(WireError::TooLong {
            what: "return-path message",
            len: len as u64,
            max: rp::MAX_PAYLOAD as u64,
        });
    }
    let fixed = match ty {
        rp::SHUT | rp::PONG | rp::RESUME_ACK => Some(4),
        rp::REQ_PAGES => Some(12),
        rp::SWITCHOVER_ACK => Some(0),
        rp::REQ_PAGES_ID | rp::RECV_BITMAP => None,
        other => {
            return Err(WireError::Invalid(format!(
                "unknown return-path message type {other}"
            )))
        }
    };
    if let Some(f) = fixed {
        if len != f {
            return Err(WireError::Invalid(format!(
                "return-path message {ty} has length {len}, expected {f}"
            )));
        }
    }
    let Some(payload) = c.bytes(len as usize) else {
        return Ok(None);
    };
    let mut p = Cursor::new(payload);
    let short = || WireError::Invalid(format!("return-path message {ty} is too short"));
    let m = match ty {
        rp::SHUT => RpMessage::Shut(p.be32().ok_or_else(short)?),
        rp::PONG => RpMessage::Pong(p.be32().ok_or_else(short)?),
        rp::RESUME_ACK => RpMessage::ResumeAck(p.be32().ok_or_else(short)?),
        rp::REQ_PAGES => RpMessage::ReqPages {
            offset: p.be64().ok_or_else(short)?,
            len: p.be32().ok_or_else(short)?,
        },
        rp::REQ_PAGES_ID => {
            let offset = p.be64().ok_or_else(short)?;
            let len = p.be32().ok_or_else(short)?;
            let block = p.str8("block name")?.ok_or_else(short)?;
            RpMessage::ReqPagesId { offset, len, block }
        }
        rp::RECV_BITMAP => RpMessage::RecvBitmap {
            block: p.str8("block name")?.ok_or_else(short)?,
        },
        _ => RpMessage::SwitchoverAck,
    };
    if p.remaining() != 0 {
        return Err(WireError::Invalid(format!(
            "return-path message {ty} has {} bytes past its fields",
            p.remaining()
        )));
    }
    Ok(Some((m, c.pos())))
}

/// The received-bitmap that follows an RP RECV_BITMAP message, as QEMU writes it: be64 size
/// (bitmap bytes rounded up to 8), the bitmap as little-endian u64 words, be64 end mark.
pub fn encode_bitmap_tail(out: &mut Vec<u8>, words: &[u64]) {
    put_be64(out, (words.len() * 8) as u64);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    put_be64(out, rp::RECV_BITMAP_ENDING);
}

/// Decodes a bitmap tail of at most `max_bytes` bitmap bytes.
pub fn decode_bitmap_tail(buf: &[u8], max_bytes: u64) -> Decoded<Vec<u64>> {
    let mut c = Cursor::new(buf);
    let Some(size) = c.be64() else {
        return Ok(None);
    };
    if size % 8 != 0 || size > max_bytes {
        return Err(WireError::Invalid(format!(
            "received bitmap of {size} bytes (expected a multiple of 8, at most {max_bytes})"
        )));
    }
    let Some(bytes) = c.bytes(size as usize) else {
        return Ok(None);
    };
    let Some(end) = c.be64() else { return Ok(None) };
    if end != rp::RECV_BITMAP_ENDING {
        return Err(WireError::Invalid(format!(
            "received bitmap ends with {end:#x}, not the end mark {:#x}",
            rp::RECV_BITMAP_ENDING
        )));
    }
    let words = bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .collect();
    Ok(Some((words, c.pos())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bitmap_tail() {
        let mut b = Vec::new();
        encode_bitmap_tail(&mut b, &[0b1011, u64::MAX]);
        assert_eq!(b.len(), 8 + 16 + 8);
        let (w, n) = decode_bitmap_tail(&b, 16).unwrap().unwrap();
        assert_eq!(w, vec![0b1011, u64::MAX]);
        assert_eq!(n, b.len());
        assert!(decode_bitmap_tail(&b, 8).is_err());
        for cut in 0..b.len() {
            assert_eq!(decode_bitmap_tail(&b[..cut], 16), Ok(None));
        }
        let n = b.len();
        b[n - 1] ^= 1;
        assert!(decode_bitmap_tail(&b, 16).is_err());
    }

    use super::*;

    #[test]
    fn roundtrip() {
        for m in [
            RpMessage::Shut(0),
            RpMessage::Pong(1),
            RpMessage::ReqPagesId {
                offset: 0x1000,
                len: 4096,
                block: "pc.ram",
            },
            RpMessage::ReqPages {
                offset: 0x2000,
                len: 4096,
            },
            RpMessage::ResumeAck(1),
            RpMessage::SwitchoverAck,
        ] {
            let mut b = Vec::new();
            encode(&mut b, &m).unwrap();
            let (d, n) = decode(&b).unwrap().unwrap();
            assert_eq!(d, m);
            assert_eq!(n, b.len());
            for cut in 0..b.len() {
                assert_eq!(decode(&b[..cut]), Ok(None));
            }
        }
    }

    #[test]
    fn refuses_bad_lengths() {
        assert!(decode(&[0, 1, 0, 3, 0, 0, 0]).is_err());
        assert!(decode(&[0, 3, 2, 1]).is_err());
        assert!(decode(&[0, 99, 0, 0]).is_err());
    }
}
