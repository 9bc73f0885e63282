//! Constants of QEMU's migration stream (migration/savevm.c, ram.c, migration.h).

/// "QEVM"
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// Stream version 3 (2 is refused as obsolete by QEMU).
pub const FILE_VERSION: u32 = 3;

/// Section type bytes.
pub mod section {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

/// `QEMU_VM_COMMAND` ids.
pub mod command {
    pub const OPEN_RETURN_PATH: u16 = 1;
    pub const PING: u16 = 2;
    pub const POSTCOPY_ADVISE: u16 = 3;
    pub const POSTCOPY_LISTEN: u16 = 4;
    pub const POSTCOPY_RUN: u16 = 5;
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    pub const PACKAGED: u16 = 7;
    pub const ENABLE_COLO: u16 = 8;
    pub const POSTCOPY_RESUME: u16 = 9;
    pub const RECV_BITMAP: u16 = 10;
    pub const SWITCHOVER_START: u16 = 11;
}

/// Return-path message types (destination -> source).
pub mod rp {
    pub const SHUT: u16 = 1;
    pub const PONG: u16 = 2;
    pub const REQ_PAGES_ID: u16 = 3;
    pub const REQ_PAGES: u16 = 4;
    pub const RECV_BITMAP: u16 = 5;
    pub const RESUME_ACK: u16 = 6;
    pub const SWITCHOVER_ACK: u16 = 7;
    /// The source refuses longer return-path payloads.
    pub const MAX_PAYLOAD: usize = 512;
    /// End mark after a received-bitmap.
    pub const RECV_BITMAP_ENDING: u64 = 0x0123_4567_89ab_cdef;
}

/// RAM record flags, the low bits of the be64 that carries the page offset.
pub mod ram {
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const XBZRLE: u64 = 0x40;
    pub const HOOK: u64 = 0x80;
    pub const COMPRESS_PAGE: u64 = 0x100;
    pub const MULTIFD_FLUSH: u64 = 0x200;
    /// x86 masks the flags with the target page size minus one.
    pub const FLAGS_MASK: u64 = 0xfff;
    /// The RAM section's version id.
    pub const VERSION: u32 = 4;
    /// The RAM section's idstr.
    pub const IDSTR: &str = "ram";
}

/// x86's target page size.
pub const TARGET_PAGE_SIZE: usize = 4096;

/// Multifd channels (QEMU 10.0 `migration/multifd.h`, `multifd.c`, `multifd-nocomp.c`).
pub mod multifd {
    /// Magic of the per-channel initial packet and of every packet header.
    pub const MAGIC: u32 = 0x1122_3344;
    /// The only packet version QEMU knows.
    pub const VERSION: u32 = 1;
    /// Packet flag: the channel's sync point (a page-less packet since QEMU 9.0).
    pub const FLAG_SYNC: u32 = 1 << 0;
    /// Packet flags bits 1-5: the compression method; 0 is none.
    pub const FLAG_COMPRESSION_MASK: u32 = 0x1f << 1;
    /// Compression "none".
    pub const FLAG_NOCOMP: u32 = 0;
    /// Packet flag: a device-state packet (VFIO), with a different layout.
    pub const FLAG_DEVICE_STATE: u32 = 1 << 6;
    /// Pages per packet: `MULTIFD_PACKET_SIZE` (512 KiB) over x86's 4 KiB target page.
    pub const PAGES_PER_PACKET: u32 = 128;
    /// `MultiFDInit_t`: magic, version, `uuid[16]`, id, `unused1[7]`, `unused2[4]` (u64).
    pub const INIT_PACKET_LEN: usize = 64;
    /// `MultiFDPacket_t` without its offset array.
    pub const PACKET_FIXED_LEN: usize = 320;
    /// Length of the `ramblock` field (the block's idstr, NUL-padded).
    pub const RAMBLOCK_LEN: usize = 256;
    /// What QEMU sends and reads per packet before the page data: the fixed part and the
    /// whole offset array, whatever the counts (`packet_len`).
    pub const PACKET_HEADER_LEN: usize = PACKET_FIXED_LEN + 8 * PAGES_PER_PACKET as usize;
}

/// mapped-ram (`migration/ram.c`, QEMU 9.0+): each RAM block's fixed place in a file.
pub mod mapped_ram {
    /// `MAPPED_RAM_HDR_VERSION`.
    pub const VERSION: u32 = 1;
    /// `sizeof(MappedRamHeader)`: version (be32), page_size, bitmap_offset, pages_offset
    /// (be64 each), packed.
    pub const HEADER_LEN: usize = 28;
    /// `MAPPED_RAM_FILE_OFFSET_ALIGNMENT`: a block's pages start at a multiple of this (for
    /// O_DIRECT on any block size). A reader only requires page alignment, as QEMU's.
    pub const FILE_OFFSET_ALIGNMENT: u64 = 0x10_0000;
    /// `MAPPED_RAM_LOAD_BUF_SIZE`: QEMU reads the pages region this much at a time.
    pub const LOAD_BUF_SIZE: u64 = 0x10_0000;
    /// The capability's name in the configuration section's list (validated there).
    pub const CAPABILITY: &str = "mapped-ram";
}
