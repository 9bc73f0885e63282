//! What every channel does with a RAM record it decoded: the checks that turn it into a
//! page of a known block (the main channel, the postcopy-preempt channel, the look-ahead
//! for requested pages, and the multifd packets), before a sink places it: the
//! precopy sink through the page writer, the postcopy sink through the userfaultfd
//! ([`PostcopyDest::place`](super::fault::PostcopyDest::place)).

use std::sync::Arc;

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::memory::block::RamBlock;
use crate::memory::page::Page as PageBytes;
use crate::wire::ram::Record;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PlaceError {
    #[error("page for unknown RAM block {0:?}")]
    UnknownBlock(String),
    #[error("CONTINUE page with no previous block")]
    NoPreviousBlock,
    #[error("page offset {offset:#x} is outside RAM block {block:?} of size {size:#x}")]
    Outside {
        block: String,
        offset: u64,
        size: u64,
    },
    #[error("a page record of {0} bytes")]
    PageLength(usize),
}

/// A received page, resolved to its block.
pub(crate) struct Page<'a> {
    /// Index into the blocks.
    pub(crate) bi: usize,
    /// Page-aligned and inside the block.
    pub(crate) offset: u64,
    pub(crate) data: PageData<'a>,
}

pub(crate) enum PageData<'a> {
    /// Every byte is this value (ZERO records; QEMU 10.0 only sends 0).
    Fill(u8),
    /// The page's bytes, in the channel's read buffer.
    Bytes(&'a PageBytes),
}

impl Page<'_> {
    pub(crate) fn index(&self) -> u64 {
        self.offset / TARGET_PAGE_SIZE as u64
    }
}

/// The block context of one channel: a CONTINUE record means the block last named on it.
#[derive(Clone, Copy, Default)]
pub(crate) struct BlockCursor {
    pub(crate) last: Option<usize>,
}

impl BlockCursor {
    /// The page a ZERO or PAGE record carries; None for any other record (which the
    /// channel handles itself).
    pub(crate) fn page<'a>(
        &mut self,
        blocks: &[Arc<RamBlock>],
        rec: &Record<'a>,
    ) -> Result<Option<Page<'a>>, PlaceError> {
        let (offset, block, data) = match *rec {
            Record::Zero {
                offset,
                block,
                fill,
            } => (offset, block, PageData::Fill(fill)),
            Record::Page {
                offset,
                block,
                data,
            } => {
                let page = data
                    .try_into()
                    .map_err(|_| PlaceError::PageLength(data.len()))?;
                (offset, block, PageData::Bytes(page))
            }
            _ => return Ok(None),
        };
        let bi = match block {
            Some(name) => block_index(blocks, name)?,
            None => self.last.ok_or(PlaceError::NoPreviousBlock)?,
        };
        self.last = Some(bi);
        check_offset(&blocks[bi], offset)?;
        Ok(Some(Page { bi, offset, data }))
    }
}

/// The index of the block a page names.
pub(crate) fn block_index(blocks: &[Arc<RamBlock>], name: &str) -> Result<usize, PlaceError> {
    blocks
        .iter()
        .position(|b| b.id == name)
        .ok_or_else(|| PlaceError::UnknownBlock(name.to_string()))
}

/// A page offset must be page-aligned and inside the block: checked before anything is
/// written there.
pub(crate) fn check_offset(b: &RamBlock, offset: u64) -> Result<(), PlaceError> {
    if offset % TARGET_PAGE_SIZE as u64 != 0 || offset >= b.size {
        return Err(PlaceError::Outside {
            block: b.id.clone(),
            offset,
            size: b.size,
        });
    }
    Ok(())
}
