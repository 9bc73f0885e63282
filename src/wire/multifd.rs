//! Multifd channels as QEMU 10.0 writes them (`migration/multifd.h`, `multifd.c`,
//! `multifd-nocomp.c`): the per-channel initial packet (`MultiFDInit_t`) and the packet
//! header (`MultiFDPacket_t` plus its offset array) that precedes each packet's page data.
//! Pure codecs over byte buffers; the channels and the page I/O sit above.
//!
//! A packet on the wire is always [`PACKET_HEADER_LEN`] bytes of header (QEMU's
//! `packet_len`: the fixed part and all 128 offsets, whatever the counts), then
//! `normal_pages` x 4096 bytes of page data (compression "none"). Only the first
//! `normal_pages + zero_pages` offsets mean anything: the normal pages' offsets, then the zero
//! pages'. A SYNC packet from QEMU 9.0 and later carries no pages, `pages_alloc` 0 and an
//! empty block name; older QEMUs could put pages in it, so it is decoded like any other.

use crate::compat::wire::multifd::{
    FLAG_COMPRESSION_MASK, FLAG_DEVICE_STATE, FLAG_NOCOMP, FLAG_SYNC, INIT_PACKET_LEN, MAGIC,
    PACKET_FIXED_LEN, PACKET_HEADER_LEN, PAGES_PER_PACKET, RAMBLOCK_LEN, VERSION,
};
use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::wire::stream::{put_be32, put_be64, Cursor, Decoded, WireError};

/// `MultiFDInit_t`, the first 64 bytes on each multifd channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPacket {
    /// The source VM's UUID (all-zero for a QEMU started without `-uuid`); the destination
    /// compares it with its own.
    pub uuid: [u8; 16],
    /// The channel number, 0 to `multifd-channels` - 1; the caller checks the range.
    pub id: u8,
}

/// Writes the initial packet; the reserved bytes are zero.
pub fn encode_init(out: &mut Vec<u8>, p: &InitPacket) {
    put_be32(out, MAGIC);
    put_be32(out, VERSION);
    out.extend_from_slice(&p.uuid);
    out.push(p.id);
    out.resize(out.len() + (INIT_PACKET_LEN - 25), 0);
}

fn check_magic_version(c: &mut Cursor<'_>, what: &str) -> Result<Option<()>, WireError> {
    let Some(magic) = c.be32() else {
        return Ok(None);
    };
    if magic != MAGIC {
        return Err(WireError::Invalid(format!(
            "multifd {what} has magic {magic:#010x}, expected {MAGIC:#010x}"
        )));
    }
    let Some(version) = c.be32() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(WireError::Invalid(format!(
            "multifd {what} has version {version}, expected {VERSION}"
        )));
    }
    Ok(Some(()))
}

/// Decodes the initial packet, checking magic and version (as QEMU does); the reserved bytes
/// are ignored. The UUID and channel id are the caller's to check.
pub fn decode_init(buf: &[u8]) -> Decoded<InitPacket> {
    let mut c = Cursor::new(buf);
    if check_magic_version(&mut c, "initial packet")?.is_none() {
        return Ok(None);
    }
    if buf.len() < INIT_PACKET_LEN {
        return Ok(None);
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&buf[8..24]);
    Ok(Some((InitPacket { uuid, id: buf[24] }, INIT_PACKET_LEN)))
}

/// A packet header (`MultiFDPacket_t` with the meaningful part of its offset array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketHeader {
    /// `FLAG_SYNC` and nothing else on a RAM packet with compression "none".
    pub flags: u32,
    /// The packet's page capacity: 128 on a data packet, 0 on QEMU 10.0's SYNC packet.
    pub pages_alloc: u32,
    pub normal_pages: u32,
    pub zero_pages: u32,
    /// Bytes of page data after the header: `normal_pages` x 4096 as QEMU 10.0 sends it
    /// without compression (0 on SYNC). QEMU's receiver without compression ignores it, and
    /// so does the decoder.
    pub next_packet_size: u32,
    /// One counter across all channels of a migration.
    pub packet_num: u64,
    /// The RAM block's idstr; empty on a page-less packet.
    pub ramblock: String,
    /// `normal_pages` offsets of the pages whose data follows, then `zero_pages` offsets of
    /// zero pages; byte offsets in the block, page-aligned.
    pub offsets: Vec<u64>,
}

impl PacketHeader {
    /// The page-less SYNC packet QEMU 9.0 and later send (`multifd_send_fill_packet` fills
    /// only the header of a zeroed packet): flags SYNC, no pages, no block.
    pub fn sync(packet_num: u64) -> Self {
        PacketHeader {
            flags: FLAG_SYNC,
            pages_alloc: 0,
            normal_pages: 0,
            zero_pages: 0,
            next_packet_size: 0,
            packet_num,
            ramblock: String::new(),
            offsets: Vec::new(),
        }
    }

    /// Offsets of the pages whose data follows the header, in order.
    pub fn normal_offsets(&self) -> &[u64] {
        &self.offsets[..self.normal_pages as usize]
    }
    /// Offsets of the zero pages.
    pub fn zero_offsets(&self) -> &[u64] {
        &self.offsets[self.normal_pages as usize..]
    }
    /// Bytes of page data after the header (compression "none").
    pub fn data_len(&self) -> usize {
        self.normal_pages as usize * TARGET_PAGE_SIZE
    }
}

fn check_counts(pages_alloc: u32, normal: u32, zero: u32) -> Result<(), WireError> {
    if pages_alloc > PAGES_PER_PACKET {
        return Err(WireError::Invalid(format!(
            "multifd packet has room for {pages_alloc} pages, more than {PAGES_PER_PACKET}"
        )));
    }
    if u64::from(normal) + u64::from(zero) > u64::from(pages_alloc) {
        return Err(WireError::Invalid(format!(
            "multifd packet has {normal} normal and {zero} zero pages, more than its \
             {pages_alloc}"
        )));
    }
    Ok(())
}

fn check_offset(offset: u64) -> Result<(), WireError> {
    if offset % TARGET_PAGE_SIZE as u64 != 0 {
        return Err(WireError::Invalid(format!(
            "multifd packet has page offset {offset:#x}, not a multiple of the page size"
        )));
    }
    Ok(())
}

/// Writes a packet header at its full wire length ([`PACKET_HEADER_LEN`]); the offsets past
/// the counts and the reserved fields are zero. Refuses counts or offsets the decoder would
/// refuse, and a block name that does not fit 255 bytes.
pub fn encode_packet_header(out: &mut Vec<u8>, h: &PacketHeader) -> Result<(), WireError> {
    check_counts(h.pages_alloc, h.normal_pages, h.zero_pages)?;
    let used = h.normal_pages as usize + h.zero_pages as usize;
    if h.offsets.len() != used {
        return Err(WireError::Invalid(format!(
            "multifd packet has {} offsets for {used} pages",
            h.offsets.len()
        )));
    }
    if h.ramblock.len() >= RAMBLOCK_LEN || h.ramblock.as_bytes().contains(&0) {
        return Err(WireError::TooLong {
            what: "multifd RAM block name",
            len: h.ramblock.len() as u64,
            max: RAMBLOCK_LEN as u64 - 1,
        });
    }
    h.offsets.iter().try_for_each(|&o| check_offset(o))?;
    let start = out.len();
    put_be32(out, MAGIC);
    put_be32(out, VERSION);
    put_be32(out, h.flags);
    put_be32(out, h.pages_alloc);
    put_be32(out, h.normal_pages);
    put_be32(out, h.next_packet_size);
    put_be64(out, h.packet_num);
    put_be32(out, h.zero_pages);
    // unused32[1], unused64[3]
    out.resize(out.len() + 4 + 24, 0);
    out.extend_from_slice(h.ramblock.as_bytes());
    out.resize(start + PACKET_FIXED_LEN, 0);
    for &o in &h.offsets {
        put_be64(out, o);
    }
    out.resize(start + PACKET_HEADER_LEN, 0);
    Ok(())
}

/// Decodes a packet header (the page data that follows is the caller's: `data_len()` bytes).
/// Refuses a bad magic or version, a device-state packet, compression other than none, counts
/// above `pages_alloc` or `pages_alloc` above 128, a block name without a NUL within its 256
/// bytes or not UTF-8, and an offset that is not page-aligned. Whether the block exists and
/// every offset lies within its used length needs the block: the caller checks that.
pub fn decode_packet_header(buf: &[u8]) -> Decoded<PacketHeader> {
    let mut c = Cursor::new(buf);
    if check_magic_version(&mut c, "packet")?.is_none() {
        return Ok(None);
    }
    let Some(flags) = c.be32() else {
        return Ok(None);
    };
    if flags & FLAG_DEVICE_STATE != 0 {
        return Err(WireError::Invalid(
            "multifd device-state packet (VFIO) is not supported by the helper".into(),
        ));
    }
    if flags & FLAG_COMPRESSION_MASK != FLAG_NOCOMP {
        return Err(WireError::Invalid(format!(
            "multifd packet flags {flags:#x} ask for compression; only none is supported"
        )));
    }
    if buf.len() < PACKET_HEADER_LEN {
        return Ok(None);
    }
    // The whole header is there: every read below succeeds.
    let fields = (|| {
        let pages_alloc = c.be32()?;
        let normal_pages = c.be32()?;
        let next_packet_size = c.be32()?;
        let packet_num = c.be64()?;
        let zero_pages = c.be32()?;
        c.bytes(4 + 24)?;
        let name = c.bytes(RAMBLOCK_LEN)?;
        Some((
            pages_alloc,
            normal_pages,
            next_packet_size,
            packet_num,
            zero_pages,
            name,
        ))
    })();
    let Some((pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages, name)) = fields
    else {
        return Ok(None);
    };
    check_counts(pages_alloc, normal_pages, zero_pages)?;
    let nul = name
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| WireError::Invalid("multifd RAM block name is not NUL-terminated".into()))?;
    let ramblock = std::str::from_utf8(&name[..nul])
        .map_err(|_| WireError::BadUtf8 {
            what: "multifd RAM block name",
        })?
        .to_string();
    let used = normal_pages as usize + zero_pages as usize;
    let offsets: Vec<u64> = buf[PACKET_FIXED_LEN..PACKET_FIXED_LEN + 8 * used]
        .chunks_exact(8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
        .collect();
    offsets.iter().try_for_each(|&o| check_offset(o))?;
    Ok(Some((
        PacketHeader {
            flags,
            pages_alloc,
            normal_pages,
            zero_pages,
            next_packet_size,
            packet_num,
            ramblock,
            offsets,
        },
        PACKET_HEADER_LEN,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::wire::multifd::FLAG_SYNC;

    fn data_packet() -> PacketHeader {
        PacketHeader {
            flags: 0,
            pages_alloc: PAGES_PER_PACKET,
            normal_pages: 3,
            zero_pages: 2,
            next_packet_size: 0,
            packet_num: 0x0102_0304_0506_0708,
            ramblock: "pc.ram".into(),
            offsets: vec![0x1000, 0x5000, 0x7fff_f000, 0, 0x2000],
        }
    }

    fn encoded(h: &PacketHeader) -> Vec<u8> {
        let mut b = Vec::new();
        encode_packet_header(&mut b, h).unwrap();
        b
    }

    #[test]
    fn init_packet_layout_and_roundtrip() {
        let p = InitPacket {
            uuid: *b"0123456789abcdef",
            id: 3,
        };
        let mut b = Vec::new();
        encode_init(&mut b, &p);
        assert_eq!(b.len(), 64);
        assert_eq!(&b[..8], b"\x11\x22\x33\x44\x00\x00\x00\x01");
        assert_eq!(&b[8..24], b"0123456789abcdef");
        assert_eq!(b[24], 3);
        assert!(b[25..].iter().all(|&x| x == 0));
        assert_eq!(decode_init(&b), Ok(Some((p, 64))));
        for cut in 0..64 {
            assert_eq!(decode_init(&b[..cut]), Ok(None), "cut at {cut}");
        }
        // Reserved bytes are ignored.
        b[30] = 0xff;
        b[63] = 0xff;
        assert_eq!(decode_init(&b), Ok(Some((p, 64))));
    }

    #[test]
    fn init_packet_refusals() {
        let mut b = Vec::new();
        encode_init(
            &mut b,
            &InitPacket {
                uuid: [0; 16],
                id: 0,
            },
        );
        let mut bad = b.clone();
        bad[0] = 0x12;
        assert!(matches!(decode_init(&bad[..4]), Err(WireError::Invalid(_))));
        let mut bad = b.clone();
        bad[7] = 2;
        assert!(matches!(decode_init(&bad[..8]), Err(WireError::Invalid(_))));
        // The main channel's header is not an initial packet.
        assert!(decode_init(b"QEVM\x00\x00\x00\x03").is_err());
    }

    #[test]
    fn packet_header_layout_and_roundtrip() {
        let h = data_packet();
        let b = encoded(&h);
        assert_eq!(b.len(), PACKET_HEADER_LEN);
        assert_eq!(b.len(), 1344);
        assert_eq!(&b[..8], b"\x11\x22\x33\x44\x00\x00\x00\x01");
        assert_eq!(&b[8..12], &[0, 0, 0, 0]);
        assert_eq!(&b[12..16], &128u32.to_be_bytes());
        assert_eq!(&b[16..20], &3u32.to_be_bytes());
        assert_eq!(&b[24..32], &0x0102_0304_0506_0708u64.to_be_bytes());
        assert_eq!(&b[32..36], &2u32.to_be_bytes());
        assert!(b[36..64].iter().all(|&x| x == 0));
        assert_eq!(&b[64..71], b"pc.ram\0");
        assert_eq!(&b[320..328], &0x1000u64.to_be_bytes());
        assert_eq!(&b[352..360], &0x2000u64.to_be_bytes());
        assert!(b[360..].iter().all(|&x| x == 0));
        let (d, n) = decode_packet_header(&b).unwrap().unwrap();
        assert_eq!(n, 1344);
        assert_eq!(d, h);
        assert_eq!(d.normal_offsets(), &[0x1000, 0x5000, 0x7fff_f000]);
        assert_eq!(d.zero_offsets(), &[0, 0x2000]);
        assert_eq!(d.data_len(), 3 * 4096);
        for cut in 0..b.len() {
            assert_eq!(decode_packet_header(&b[..cut]), Ok(None), "cut at {cut}");
        }
        // Bytes after the header (page data) are not consumed.
        let mut more = b.clone();
        more.extend_from_slice(&[0xaa; 100]);
        assert_eq!(decode_packet_header(&more).unwrap().unwrap().1, 1344);
    }

    #[test]
    fn sync_packet_as_qemu_10_sends_it() {
        // multifd_send_fill_packet zeroes the packet and fills only the header for SYNC.
        let mut b = vec![0u8; 1344];
        b[..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&VERSION.to_be_bytes());
        b[8..12].copy_from_slice(&FLAG_SYNC.to_be_bytes());
        b[24..32].copy_from_slice(&7u64.to_be_bytes());
        let h = PacketHeader::sync(7);
        assert_eq!(decode_packet_header(&b), Ok(Some((h.clone(), 1344))));
        assert_eq!(encoded(&h), b);
        // Stale offsets past the counts mean nothing, even unaligned.
        b[400] = 1;
        assert!(decode_packet_header(&b).unwrap().is_some());
    }

    fn refused(b: &[u8]) -> bool {
        decode_packet_header(b).is_err()
    }

    #[test]
    fn packet_header_refusals() {
        let good = encoded(&data_packet());
        let set32 = |at: usize, v: u32| {
            let mut b = good.clone();
            b[at..at + 4].copy_from_slice(&v.to_be_bytes());
            b
        };
        // Magic and version, as soon as they are there.
        assert!(refused(&set32(0, 0x1122_3345)[..4]));
        assert!(refused(&set32(4, 2)[..8]));
        // Compression other than none, device state: as soon as the flags are there.
        for f in [
            1 << 1,
            2 << 1,
            4 << 1,
            8 << 1,
            16 << 1,
            1 << 6,
            FLAG_SYNC | 1 << 1,
        ] {
            assert!(refused(&set32(8, f)[..12]), "flags {f:#x}");
        }
        // Counts.
        assert!(refused(&set32(12, 129)));
        assert!(refused(&set32(12, 4))); // 3 + 2 > 4
        assert!(!refused(&set32(12, 5)));
        assert!(refused(&set32(16, 127))); // 127 + 2 > 128
        assert!(refused(&set32(32, 126))); // 3 + 126 > 128
        assert!(refused(&set32(16, u32::MAX)));
        assert!(refused(&set32(32, u32::MAX)));
        // Block name: no NUL within 256 bytes, or not UTF-8.
        let mut b = good.clone();
        b[64..320].fill(b'a');
        assert!(refused(&b));
        b[319] = 0;
        assert!(!refused(&b));
        let mut b = good.clone();
        b[64] = 0xff;
        assert!(refused(&b));
        // Unaligned offsets, normal and zero.
        let mut b = good.clone();
        b[327] = 0x01;
        assert!(refused(&b));
        let mut b = good.clone();
        b[359] = 0x80;
        assert!(refused(&b));
        // Past the counts, anything goes.
        let mut b = good.clone();
        b[367] = 0x01;
        assert!(!refused(&b));
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        let mut out = Vec::new();
        let mut h = data_packet();
        h.offsets.pop();
        assert!(encode_packet_header(&mut out, &h).is_err());
        let mut h = data_packet();
        h.offsets[0] = 0x1001;
        assert!(encode_packet_header(&mut out, &h).is_err());
        let mut h = data_packet();
        h.pages_alloc = 4;
        assert!(encode_packet_header(&mut out, &h).is_err());
        let mut h = data_packet();
        h.ramblock = "x".repeat(256);
        assert!(encode_packet_header(&mut out, &h).is_err());
        h.ramblock = "x".repeat(255);
        assert!(encode_packet_header(&mut out, &h).is_ok());
        assert_eq!(decode_packet_header(&out).unwrap().unwrap().0, h);
    }
}
