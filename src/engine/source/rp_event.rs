//! What the return-path reader hands to the migration thread: validated page requests,
//! events, and why it stopped. Apart from the reader so that the source's errors can name
//! them without importing the thread.

use crate::memory::bits::word_masks;
use crate::wire::stream::WireError;

const PAGE: usize = crate::compat::wire::TARGET_PAGE_SIZE;

/// A validated page request: block index, byte offset and length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PageRequest {
    pub(crate) block: usize,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl PageRequest {
    /// The to-do bitmap words the request covers, each with the mask of its pages.
    pub(crate) fn words(&self) -> impl Iterator<Item = (usize, u64)> {
        let first = self.offset / PAGE as u64;
        let last = (self.offset + self.len).div_ceil(PAGE as u64);
        word_masks(first, last)
    }
}

/// What the reader hands to the migration thread.
#[derive(Debug)]
pub(crate) enum RpEvent {
    Shut(u32),
    Request(PageRequest),
    /// A block's received bitmap (recovery).
    Bitmap(usize, Vec<u64>),
    ResumeAck(u32),
    Pong,
}

/// Why the reader stopped (other than SHUT).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RpError {
    #[error("bad return-path message: {0}")]
    Decode(#[source] WireError),
    #[error("page request (REQ_PAGES) before postcopy: a destination asks for pages only after POSTCOPY_LISTEN")]
    RequestBeforePostcopy,
    #[error("page request for unknown RAM block {0:?}")]
    UnknownBlock(String),
    #[error("REQ_PAGES before any REQ_PAGES_ID named a block")]
    NoBlockNamed,
    #[error("page request {offset:#x}+{len:#x} is outside RAM block {block:?} of size {size:#x} or not page aligned")]
    OutsideBlock {
        offset: u64,
        len: u64,
        block: String,
        size: u64,
    },
    #[error("received bitmap for {0:?} that was not asked for")]
    BitmapNotAsked(String),
    #[error("received bitmap for unknown RAM block {0:?}")]
    BitmapUnknownBlock(String),
    #[error("bad received bitmap for {block:?}: {source}")]
    BadBitmap {
        block: String,
        #[source]
        source: WireError,
    },
    #[error("unexpected return-path message: SwitchoverAck")]
    SwitchoverAck,
    #[error("return path closed before SHUT")]
    Closed,
    #[error("return path: {0}")]
    Io(#[source] std::io::Error),
    #[error("the return-path thread died")]
    Died,
}

impl RpError {
    /// The return path broke (EOF, an I/O error), as opposed to carrying something wrong.
    pub(crate) fn is_link_failure(&self) -> bool {
        matches!(self, RpError::Closed | RpError::Io(_))
    }
}
