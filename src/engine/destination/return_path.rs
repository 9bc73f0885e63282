//! The destination's one return-path sender, shared by the loader (PONG, SHUT, the
//! recovery handshake) and the fault thread (page requests).

use std::sync::Mutex;

use crate::transport::Channel;
use crate::wire::return_path::{self, RpMessage};
use crate::wire::stream::WireError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RpError {
    #[error("return path: {0}")]
    Encode(#[source] WireError),
    #[error("return path: {0}")]
    Io(#[source] std::io::Error),
    /// An adopted migration before its recovery channel came.
    #[error("return path: not connected yet")]
    Detached,
}

pub(crate) struct RpWriter {
    inner: Mutex<RpInner>,
}

struct RpInner {
    chan: Option<Channel>,
    /// The block named in the last request: REQ_PAGES may omit it.
    last_block: Option<String>,
}

impl RpWriter {
    pub(crate) fn new(chan: Channel) -> Self {
        Self::with(Some(chan))
    }

    /// A return path whose channel comes with a recovery (adoption): until then every
    /// send fails as on a broken link, and page requests stay pending.
    pub(crate) fn detached() -> Self {
        Self::with(None)
    }

    fn with(chan: Option<Channel>) -> Self {
        RpWriter {
            inner: Mutex::new(RpInner {
                chan,
                last_block: None,
            }),
        }
    }

    /// Continues on a new channel (postcopy recovery).
    pub(crate) fn replace(&self, chan: Channel) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.chan = Some(chan);
        g.last_block = None;
    }

    pub(crate) fn send(&self, m: &RpMessage<'_>) -> Result<(), RpError> {
        let mut b = Vec::with_capacity(32);
        return_path::encode(&mut b, m).map_err(RpError::Encode)?;
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        write(&g, &b)
    }

    /// The received bitmap of `block`, answering the source's RECV_BITMAP.
    pub(crate) fn send_bitmap(&self, block: &str, words: &[u64]) -> Result<(), RpError> {
        let mut b = Vec::with_capacity(words.len() * 8 + 64);
        return_path::encode(&mut b, &RpMessage::RecvBitmap { block }).map_err(RpError::Encode)?;
        return_path::encode_bitmap_tail(&mut b, words);
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        write(&g, &b)
    }

    /// Requests one page, naming the block only when it changed (as QEMU does).
    pub(crate) fn request(&self, block: &str, offset: u64, len: u32) -> Result<(), RpError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let m = if g.last_block.as_deref() == Some(block) {
            RpMessage::ReqPages { offset, len }
        } else {
            RpMessage::ReqPagesId { offset, len, block }
        };
        let mut b = Vec::with_capacity(32 + block.len());
        return_path::encode(&mut b, &m).map_err(RpError::Encode)?;
        write(&g, &b)?;
        g.last_block = Some(block.to_string());
        Ok(())
    }
}

fn write(g: &RpInner, b: &[u8]) -> Result<(), RpError> {
    g.chan
        .as_ref()
        .ok_or(RpError::Detached)?
        .write_all(b)
        .map_err(RpError::Io)
}
