//! The start of a mapped-ram file, read with pread: the stream header, the configuration
//! (which must list `mapped-ram`), the RAM block list with each block's header and bitmap
//! (checked by `wire::mapped_ram::check` before they size a read), and where the stream
//! goes on after the last block's pages. Then the rest of the stream (device sections,
//! EOF, VM description) goes through the loader.
//!
//! Interim: the loader's own mapped-ram parsing (`MappedMode::Lazy`) replaces `layout`'s
//! first half once it lands; the comparison for a recovery stays.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::compat::wire::{self, mapped_ram::CAPABILITY};
use crate::engine::destination::error::{LoadError, Violation};
use crate::engine::destination::held;
use crate::engine::destination::loader::{Loader, LoopEnd, RamSection};
use crate::engine::destination::mapped_ram::MappedBlock;
use crate::engine::destination::reader::{with_next, ReadError, Reader};
use crate::memory::block::RamBlock;
use crate::transport::Channel;
use crate::vmstate::VmDescription;
use crate::wire::mapped_ram::{self as mr, Regions};
use crate::wire::ram::{self, Record};
use crate::wire::stream::{self, Decoded, Token, WireError};

/// Largest single item read from the file's start (a block entry, the configuration).
const MAX_ITEM: u64 = 1 << 20;

/// Where every block's pages are, and where the stream goes on.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// One per destination block, in the destination's order (`MappedBlock::index`).
    pub(super) blocks: Vec<MappedBlock>,
    pub(super) ram_section: u32,
    /// Absolute offset of the stream after the last block's pages.
    pub(super) stream_at: u64,
}

impl Layout {
    /// Whether `other` (a file offered by a recovery) places every page where this one
    /// does: same headers, same bitmaps.
    pub(super) fn same_as(&self, other: &Layout) -> Result<(), String> {
        for (a, b) in self.blocks.iter().zip(&other.blocks) {
            if a.header != b.header {
                return Err(format!(
                    "block {}: header {:?} differs from the restore's {:?}",
                    a.index, b.header, a.header
                ));
            }
            if a.bitmap != b.bitmap {
                return Err(format!(
                    "block {}: its bitmap differs from the restore's",
                    a.index
                ));
            }
        }
        Ok(())
    }
}

/// A pread cursor over the file.
struct At<'f> {
    file: &'f File,
    peer: &'f str,
    pos: u64,
    len: u64,
}

impl At<'_> {
    fn read(&self, at: u64, n: u64) -> Result<Vec<u8>, LoadError> {
        let mut buf = vec![0u8; n as usize];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|source| ReadError::Io {
                peer: self.peer.into(),
                offset: at,
                source,
            })?;
        Ok(buf)
    }

    /// Decodes one item at the cursor, reading more of the file until it is whole.
    fn next<T>(
        &mut self,
        context: &'static str,
        f: impl Fn(&[u8]) -> Decoded<T>,
    ) -> Result<T, LoadError> {
        let mut want = 4096u64;
        loop {
            let n = want.min(self.len.saturating_sub(self.pos));
            let buf = self.read(self.pos, n)?;
            match f(&buf) {
                Ok(Some((v, used))) => {
                    self.pos += used as u64;
                    return Ok(v);
                }
                Ok(None) if n < want || want >= MAX_ITEM => {
                    return Err(ReadError::Truncated {
                        offset: self.pos + n,
                        context,
                    }
                    .into())
                }
                Ok(None) => want *= 4,
                Err(source) => {
                    return Err(LoadError::Wire {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
    }

    fn invalid(&self, why: String) -> LoadError {
        LoadError::Wire {
            offset: self.pos,
            source: WireError::Invalid(why),
        }
    }
}

/// Reads the file's start from absolute offset `start` up to the end of the RAM block
/// list: every block of `blocks` must be in it, with the same size.
pub(super) fn layout(
    file: &File,
    peer: &str,
    start: u64,
    blocks: &[std::sync::Arc<RamBlock>],
) -> Result<Layout, LoadError> {
    let len = file
        .metadata()
        .map_err(|source| ReadError::Io {
            peer: peer.into(),
            offset: start,
            source,
        })?
        .len();
    let mut at = At {
        file,
        peer,
        pos: start,
        len,
    };
    at.next("in the stream header", stream::decode_header)?;
    let conf = at.next("in the configuration section", stream::decode_configuration)?;
    if !conf.capabilities.iter().any(|c| c == CAPABILITY) {
        return Err(at.invalid(
            "an on-demand restore needs a mapped-ram file (its configuration does not list \
             mapped-ram)"
                .into(),
        ));
    }
    if let Some(cap) = conf.capabilities.iter().find(|c| *c != CAPABILITY) {
        return Err(LoadError::Wire {
            offset: at.pos,
            source: WireError::UnsupportedCapability(cap.clone()),
        });
    }
    if let Some(bits) = conf.target_page_bits.filter(|&b| b != 12) {
        return Err(Loader::invalid(at.pos, Violation::TargetPageBits(bits)));
    }
    let h = at.next("at the RAM section", |b| {
        Ok(match stream::decode_token(b)? {
            Some((Token::Start(h), n)) => Some((Some(h), n)),
            Some((_, n)) => Some((None, n)),
            None => None,
        })
    })?;
    let h = match h {
        Some(h) if h.idstr == wire::ram::IDSTR => h,
        _ => return Err(at.invalid("the RAM section does not come first".into())),
    };
    if h.version_id != wire::ram::VERSION || h.instance_id != 0 {
        return Err(Loader::invalid(
            at.pos,
            Violation::RamVersion {
                version: h.version_id,
                instance: h.instance_id,
            },
        ));
    }
    let total = at.next("in the RAM block list", |b| {
        Ok(match ram::decode_record(b)? {
            Some((Record::MemSize { total }, n)) => Some((Some(total), n)),
            Some((_, n)) => Some((None, n)),
            None => None,
        })
    })?;
    let Some(total) = total else {
        return Err(at.invalid("the RAM section does not start with its block list".into()));
    };
    let mut found: Vec<Option<MappedBlock>> = vec![None; blocks.len()];
    let mut taken: Vec<Regions> = Vec::new();
    let mut seen = 0u64;
    while seen < total {
        let e = at.next("in the RAM block list", |b| {
            ram::decode_block_entry(b, &|_| false)
        })?;
        let Some(index) = blocks.iter().position(|b| b.id == e.idstr) else {
            return Err(Loader::invalid(
                at.pos,
                Violation::UnknownBlock {
                    name: e.idstr,
                    known: blocks.iter().map(|b| b.id.clone()).collect(),
                },
            ));
        };
        let b = &blocks[index];
        if b.size != e.used_length {
            return Err(Loader::invalid(
                at.pos,
                Violation::BlockSize {
                    name: e.idstr,
                    source_len: e.used_length,
                    local: b.size,
                },
            ));
        }
        seen = seen
            .checked_add(e.used_length)
            .filter(|&s| s <= total)
            .ok_or_else(|| Loader::invalid(at.pos, Violation::BlockTotal))?;
        let header = at.next("in a mapped-ram header", mr::decode_header)?;
        let regions =
            mr::check(&header, &b.id, b.size, at.pos, Some(len), &taken).map_err(|source| {
                LoadError::Wire {
                    offset: at.pos,
                    source,
                }
            })?;
        taken.push(regions);
        // Checked: inside the file, sized by the local block.
        let bytes = at.read(
            regions.bitmap.start,
            regions.bitmap.end - regions.bitmap.start,
        )?;
        let bitmap = mr::decode_bitmap(&bytes, b.pages()).map_err(|source| LoadError::Wire {
            offset: regions.bitmap.start,
            source,
        })?;
        if found[index].is_some() {
            return Err(at.invalid(format!("block {:?} is listed twice", b.id)));
        }
        found[index] = Some(MappedBlock {
            index,
            header,
            regions,
            bitmap,
        });
        at.pos = regions.pages.end;
    }
    let mut out = Vec::with_capacity(blocks.len());
    for (b, m) in blocks.iter().zip(found) {
        match m {
            Some(m) => out.push(m),
            None => {
                return Err(at.invalid(format!(
                    "RAM block {:?} is not in the file: its pages could never be served",
                    b.id
                )))
            }
        }
    }
    Ok(Layout {
        blocks: out,
        ram_section: h.section_id,
        stream_at: at.pos,
    })
}

/// The rest of the stream after the block list (the RAM section's EOS and footer, the
/// other RAM parts, device sections, EOF, the VM description), through the loader, which
/// places no page: a mapped-ram stream carries none there. Returns the device sections.
pub(super) fn rest(
    loader: &mut Loader<'_>,
    chan: &Channel,
    at: u64,
    ram_section: u32,
) -> Result<Vec<crate::wire::device_state::DeviceSection>, LoadError> {
    let fd = chan.try_clone_fd().map_err(|source| ReadError::Io {
        peer: chan.peer.clone(),
        offset: at,
        source,
    })?;
    let seek = nix::unistd::lseek(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        at as i64,
        nix::unistd::Whence::SeekSet,
    );
    if let Err(e) = seek {
        return Err(ReadError::Io {
            peer: chan.peer.clone(),
            offset: at,
            source: e.into(),
        }
        .into());
    }
    let mut r = Reader::new(chan, chan.peer.clone(), 1 << 20);
    r.offset = at;
    let eos = with_next!(r, "in the RAM section", ram::decode_record, |rec| matches!(
        rec,
        Record::Eos
    ));
    if !eos {
        return Err(r.wire(WireError::Invalid(
            "a mapped-ram stream carries no page after the block list".into(),
        )));
    }
    with_next!(
        r,
        "at a section footer",
        |b| stream::decode_footer(b, ram_section),
        |_x| ()
    );
    loader.ram = RamSection::Started(ram_section);
    match loader.sections(&mut r, None, None)? {
        LoopEnd::Done => {}
        LoopEnd::NeedDescription => {
            // As the loader does: hold the rest until the description has come.
            let (start, base) = (r.data().to_vec(), r.offset);
            let held::Held {
                bytes: mut held,
                eof_at,
                json,
            } = held::hold(&mut r.src, start, base, &r.peer)?;
            let desc =
                VmDescription::parse(&held[json.clone()]).map_err(|source| LoadError::Device {
                    offset: base + json.start as u64,
                    section: "VM description".into(),
                    source,
                })?;
            held.truncate(eof_at + 1);
            let mut h = Reader::over(held, r.peer.clone(), base);
            match loader.sections(&mut h, None, Some(&desc))? {
                LoopEnd::Done if h.data().is_empty() && h.eof_or_fill()? => {}
                _ => return Err(Loader::invalid(h.offset, Violation::DevicesPastEof)),
            }
        }
    }
    Ok(std::mem::take(&mut loader.devices))
}
