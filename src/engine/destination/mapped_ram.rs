//! mapped-ram on the destination: each RAM block's header and bitmap, read from the file
//! while the RAM block list is parsed, and its pages read from their fixed places (all at
//! once for a full restore, or on demand: see `ondemand`).
//!
//! The stream is a file: the main channel reads the stream itself (block list, device
//! state), and every offset a header names is absolute in that file. The reader skips each
//! block's bitmap and pages with a seek; the pages are read with `preadv` straight into
//! guest memory, on the multifd channels' own fds when there are some.

mod load;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::compat::wire::ram as flag;
use crate::engine::destination::error::{LoadError, Violation};
use crate::engine::destination::loader::{Link, Loader};
use crate::engine::destination::reader::{with_next, ReadReady, Reader};
use crate::engine::migration::{MigrationCtx, Stats};
use crate::memory::block::RamBlock;
use crate::transport::Channel;
use crate::wire::device_state::DeviceSection;
use crate::wire::mapped_ram::{self as codec, Header, Regions};

/// A block's place in a mapped-ram file, read from its header and bitmap and checked.
#[derive(Debug, Clone)]
pub(crate) struct MappedBlock {
    /// Index into the destination's blocks.
    pub(crate) index: usize,
    pub(crate) header: Header,
    pub(crate) regions: Regions,
    /// One bit per page of the block, set where the file holds the page's data; pages
    /// whose bit is clear are zero (their place in the file is a hole).
    pub(crate) bitmap: Vec<u64>,
}

/// What the loader does with a mapped-ram block once its header and bitmap are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum MappedMode {
    /// Read every page now, as QEMU does (and make sure the others are zero).
    #[default]
    Full,
    /// Only keep the [`MappedBlock`]s: the pages are served later, on demand
    /// ([`load_lazy`]).
    Lazy,
}

/// The file a mapped-ram stream comes from.
#[derive(Debug)]
pub(crate) struct MappedFile {
    /// A dup of the main channel's fd: it shares the channel's file position, so seeking
    /// it moves the stream. Bitmaps (and pages, without multifd) are read from it.
    pub(crate) fd: OwnedFd,
    /// Absolute file offset of the stream's first byte (`file:PATH,offset=N`).
    pub(crate) base: u64,
    /// The file's length when the load started: no region may lie past it.
    pub(crate) len: u64,
    /// The multifd channels' fds (O_DIRECT with direct-io): one reader thread each.
    pub(crate) channels: Vec<OwnedFd>,
}

impl MappedFile {
    /// Takes the stream's start (the main channel's position, before anything is read)
    /// and the file's length. The channels stay the caller's; their fds are dup'd.
    pub(crate) fn open(main: &Channel, multifd: &[Channel]) -> Result<Self, MappedError> {
        if main.is_socket {
            return Err(MappedError::NotAFile(main.peer.clone()));
        }
        let dup = |c: &Channel| {
            c.try_clone_fd().map_err(|source| MappedError::File {
                what: "dup",
                source,
            })
        };
        let fd = dup(main)?;
        let file = |what, e: nix::Error| MappedError::File {
            what,
            source: e.into(),
        };
        let base = nix::unistd::lseek(fd.as_raw_fd(), 0, nix::unistd::Whence::SeekCur)
            .map_err(|e| file("lseek", e))?;
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| file("fstat", e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(MappedError::NotAFile(main.peer.clone()));
        }
        let mut channels = Vec::with_capacity(multifd.len());
        for c in multifd {
            if c.is_socket {
                return Err(MappedError::NotAFile(c.peer.clone()));
            }
            channels.push(dup(c)?);
        }
        Ok(MappedFile {
            fd,
            base: base as u64,
            len: st.st_size as u64,
            channels,
        })
    }

    /// The absolute file offset of stream offset `at`.
    fn abs(&self, at: u64) -> Option<u64> {
        self.base.checked_add(at)
    }
}

/// The read buffer of a lazy load: it only reads block entries, headers and the device
/// state (it grows for a larger item), so a small one reads little of a block's bitmap and
/// pages, which the seek skips.
const LAZY_CHUNK: usize = 64 << 10;

/// What a load in [`MappedMode::Lazy`] leaves.
#[derive(Debug)]
pub(crate) struct Lazy {
    /// One per destination block, in the destination's order (`MappedBlock::index`).
    pub(crate) blocks: Vec<MappedBlock>,
    pub(crate) devices: Vec<DeviceSection>,
    /// The stream's file (a dup of the channel's fd), to read pages from.
    pub(crate) file: std::fs::File,
}

/// Loads the mapped-ram stream of file channel `chan` (from its position) as a full load
/// does, in [`MappedMode::Lazy`]: every header checked, every bitmap read, no page read or
/// written, the device state kept. Every destination block must be in the file: a page
/// the file does not have could never be served.
pub(crate) fn load_lazy(
    ctx: &MigrationCtx,
    blocks: &[Arc<RamBlock>],
    chan: &Channel,
) -> Result<Lazy, LoadError> {
    let file =
        MappedFile::open(chan, &[]).map_err(|source| LoadError::Mapped { offset: 0, source })?;
    let mut loader = Loader::new(ctx, blocks, None, Link::default(), None);
    // A lazy load is of a mapped-ram file whatever the capability says.
    loader.mapped_ram = true;
    loader.mapped_mode = MappedMode::Lazy;
    loader.mapped_file = Some(file);
    let mut r = Reader::new(chan, chan.peer.clone(), LAZY_CHUNK);
    super::load_inner(&mut loader, &mut r, Some(chan))?;
    let mut found: Vec<Option<MappedBlock>> = vec![None; blocks.len()];
    for m in std::mem::take(&mut loader.mapped) {
        if let Some(slot) = found.get_mut(m.index) {
            *slot = Some(m);
        }
    }
    let mut out = Vec::with_capacity(blocks.len());
    for (b, m) in blocks.iter().zip(found) {
        let m = m.ok_or_else(|| Loader::invalid(r.offset, Violation::NotInFile(b.id.clone())))?;
        out.push(m);
    }
    // Set above; the loader only reads it.
    let Some(file) = loader.mapped_file.take() else {
        return Err(LoadError::Mapped {
            offset: r.offset,
            source: MappedError::NotAFile(chan.peer.clone()),
        });
    };
    Ok(Lazy {
        blocks: out,
        devices: std::mem::take(&mut loader.devices),
        file: file.fd.into(),
    })
}

/// What went wrong with a mapped-ram file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MappedError {
    #[error("mapped-ram needs the stream in a seekable file, and {0} is not one")]
    NotAFile(String),
    #[error("mapped-ram file: {what}: {source}")]
    File {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("RAM block {block:?}: reading its {what} at file offset {file_offset:#x}: {source}")]
    Io {
        block: String,
        what: &'static str,
        file_offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "RAM block {block:?}: the file ends early: its {what} at file offset {file_offset:#x} \
         (block offset {block_offset:#x}) could not be read"
    )]
    Short {
        block: String,
        what: &'static str,
        file_offset: u64,
        block_offset: u64,
    },
    #[error("RAM block {block:?}: pages [{offset:#x}, +{len:#x}) lie outside the block")]
    Outside {
        block: String,
        offset: u64,
        len: u64,
    },
    #[error("a mapped-ram reader thread: {0}")]
    Thread(String),
}

impl Loader<'_> {
    /// mapped-ram: right after block `bi`'s entry in the block list, its header; checks
    /// it, reads the bitmap, in [`MappedMode::Full`] the pages, and moves the stream past
    /// the pages region (where the next block entry is).
    pub(super) fn mapped_block<R: ReadReady>(
        &mut self,
        r: &mut Reader<R>,
        bi: usize,
    ) -> Result<(), LoadError> {
        let Some(b) = self.blocks.get(bi) else {
            return Ok(());
        };
        // Its pages would have two places.
        if self.mapped.iter().any(|m| m.index == bi) {
            return Err(Self::invalid(
                r.offset,
                Violation::ListedTwice(b.id.clone()),
            ));
        }
        let header = with_next!(r, "in a mapped-ram header", codec::decode_header, |h| h);
        let mapped = |source| LoadError::Mapped {
            offset: r.offset,
            source,
        };
        let Some(file) = self.mapped_file.as_ref() else {
            return Err(mapped(MappedError::NotAFile(r.peer.clone())));
        };
        let after = file
            .abs(r.offset)
            .ok_or_else(|| mapped(MappedError::NotAFile(r.peer.clone())))?;
        let taken: Vec<Regions> = self.mapped.iter().map(|m| m.regions).collect();
        let regions = codec::check(&header, &b.id, b.size, after, Some(file.len), &taken)
            .map_err(|e| r.wire(e))?;
        // Checked: inside the file, and `bitmap_len` of the (local) block's size.
        let len = (regions.bitmap.end - regions.bitmap.start) as usize;
        let mut bytes = vec![0u8; len];
        load::pread_exact(&file.fd, &mut bytes, regions.bitmap.start)
            .map_err(|e| mapped(e.named(&b.id, "bitmap", regions.bitmap.start, 0)))?;
        let bitmap = codec::decode_bitmap(&bytes, b.pages()).map_err(|e| r.wire(e))?;
        Stats::add(&self.ctx.stats.transferred, len as u64);
        let mb = MappedBlock {
            index: bi,
            header,
            regions,
            bitmap,
        };
        // The stream goes on after the pages region, inside the file (checked).
        let to = regions.pages.end - file.base;
        if self.mapped_mode == MappedMode::Full {
            if self.mapped.is_empty() {
                let st = &self.ctx.stats;
                st.remaining.store(st.total.load(Relaxed), Relaxed);
            }
            self.load_mapped(&mb, r.offset)?;
        }
        if let Some(file) = self.mapped_file.as_ref() {
            let (fd, base) = (&file.fd, file.base);
            r.seek(to, |to| {
                let abs = i64::try_from(base + to).map_err(std::io::Error::other)?;
                nix::unistd::lseek(fd.as_raw_fd(), abs, nix::unistd::Whence::SeekSet)
                    .map(drop)
                    .map_err(std::io::Error::from)
            })?;
        }
        self.mapped.push(mb);
        Ok(())
    }

    /// mapped-ram: the records after the block list, up to EOS. The main channel carries
    /// no pages and no sync under mapped-ram: QEMU refuses those records
    /// (`ram_load_precopy`'s `invalid_flags`), and so does this.
    pub(super) fn mapped_ram_body<R: ReadReady>(
        &mut self,
        r: &mut Reader<R>,
    ) -> Result<(), LoadError> {
        const INVALID: u64 =
            flag::HOOK | flag::MULTIFD_FLUSH | flag::PAGE | flag::XBZRLE | flag::ZERO;
        loop {
            while r.data().len() < 8 {
                r.need_more("in a RAM section")?;
            }
            let mut word = [0u8; 8];
            word.copy_from_slice(&r.data()[..8]);
            let flags = u64::from_be_bytes(word) & flag::FLAGS_MASK;
            if flags & INVALID != 0 {
                return Err(Self::invalid(
                    r.offset,
                    Violation::MappedRamFlags(flags & INVALID),
                ));
            }
            let eos = with_next!(
                r,
                "in a RAM section",
                crate::wire::ram::decode_record,
                |rec| match rec {
                    crate::wire::ram::Record::Eos => true,
                    crate::wire::ram::Record::MemSize { .. } =>
                        return Err(Self::invalid(r.offset, Violation::BlockListOutsideStart)),
                    _ => false,
                }
            );
            if eos {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
