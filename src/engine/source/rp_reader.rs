//! The source's return-path reader: a thread that decodes what the destination sends and
//! hands it to the migration thread, within bounds whatever the destination sends.
//!
//! Page requests are taken only in postcopy (a destination asks for pages only after
//! POSTCOPY_LISTEN; QEMU 10.0's source would queue and serve them in precopy too, without
//! a limit), received bitmaps only when asked for, and the queues towards the migration
//! thread and the preempt sender hold at most [`MAX_QUEUED_EVENTS`] /
//! [`MAX_QUEUED_REQUESTS`] entries: the reader waits for the migration thread (and so the
//! socket fills up), and a request that finds a full queue is dropped, which only
//! delays its page to the background push.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::compat::wire;
use crate::transport::Channel;
use crate::wire::return_path::{self, RpMessage};

const PAGE: usize = wire::TARGET_PAGE_SIZE;

/// Events the reader may have handed over and the migration thread not yet taken.
pub(crate) const MAX_QUEUED_EVENTS: usize = 1024;
/// Page requests the migration thread or the preempt sender keeps queued.
pub(crate) const MAX_QUEUED_REQUESTS: usize = 4096;

/// The preempt sender's request queue, as the return-path reader sees it.
pub(crate) type Route = Arc<Mutex<Option<mpsc::SyncSender<PageRequest>>>>;

/// What the migration thread tells the reader about the migration's phase.
#[derive(Debug, Default)]
pub(crate) struct RpGate {
    /// Set before the package with POSTCOPY_LISTEN is sent: page requests are valid.
    pub(crate) postcopy: AtomicBool,
    /// Received bitmaps asked for (RECV_BITMAP commands sent) and not yet come.
    bitmaps: AtomicUsize,
    /// Page requests dropped because a queue was full.
    pub(crate) dropped: AtomicU64,
}

impl RpGate {
    pub(crate) fn expect_bitmaps(&self, n: usize) {
        self.bitmaps.store(n, Ordering::Release);
    }

    /// Whether a bitmap is expected; checked when its header arrives (its tail may take
    /// several reads, the header is decoded again after each).
    fn bitmap_expected(&self) -> bool {
        self.bitmaps.load(Ordering::Acquire) > 0
    }

    /// Counts a bitmap that has arrived whole.
    fn take_bitmap(&self) -> bool {
        self.bitmaps
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

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

#[derive(Debug)]
pub(crate) enum RpEvent {
    Shut(u32),
    /// The destination sent something wrong.
    Error(String),
    /// The return path broke (EOF or an I/O error).
    LinkDown(String),
    Request(PageRequest),
    /// A block's received bitmap (recovery).
    Bitmap(usize, Vec<u64>),
    ResumeAck(u32),
    Pong,
}

/// The bitmap words that bits `first..last` fall in, each with the mask of those bits: a
/// range costs one step per 64 pages, not one per page.
pub(crate) fn word_masks(first: u64, last: u64) -> impl Iterator<Item = (usize, u64)> {
    let (fw, lw) = (first / 64, last.div_ceil(64));
    (fw..lw).map(move |w| {
        let lo = first.max(w * 64) - w * 64;
        let hi = last.min(w * 64 + 64) - w * 64;
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (w as usize, mask)
    })
}

/// Validates a page request against the blocks: a known block, page aligned, inside it.
pub(crate) fn check_request(
    blocks: &[(String, u64)],
    block: Option<usize>,
    offset: u64,
    len: u32,
) -> Result<PageRequest, String> {
    let bi = block.ok_or("REQ_PAGES before any REQ_PAGES_ID named a block")?;
    let (name, size) = &blocks[bi];
    let len = len as u64;
    let page = PAGE as u64;
    if len == 0
        || offset % page != 0
        || len % page != 0
        || offset.checked_add(len).is_none_or(|e| e > *size)
    {
        return Err(format!(
            "page request {offset:#x}+{len:#x} is outside RAM block {name:?} of size {size:#x} or not page aligned"
        ));
    }
    Ok(PageRequest {
        block: bi,
        offset,
        len,
    })
}

/// Reads the return path on its own thread and forwards what matters.
pub(crate) fn spawn_rp_reader(
    chan: Channel,
    blocks: Vec<(String, u64)>,
    route: Route,
    gate: Arc<RpGate>,
    log: slog::Logger,
) -> mpsc::Receiver<RpEvent> {
    // Bounded: when the main thread is behind, this thread stops reading the socket and
    // the destination's writes wait (TCP's own flow control), instead of queueing here.
    let (tx, rx) = mpsc::sync_channel(MAX_QUEUED_EVENTS);
    std::thread::Builder::new()
        .name("qmh-rp".into())
        .spawn(move || {
            let mut buf = vec![0u8; 4096];
            let mut have = 0usize;
            let mut last_block: Option<usize> = None;
            let fail = |e: String| {
                let _ = tx.send(RpEvent::Error(e));
            };
            loop {
                // Decode everything buffered.
                loop {
                    let (m, n) = match return_path::decode(&buf[..have]) {
                        Ok(Some(x)) => x,
                        Ok(None) => break,
                        Err(e) => return fail(format!("bad return-path message: {e}")),
                    };
                    let ev = match m {
                        RpMessage::Shut(v) => {
                            let _ = tx.send(RpEvent::Shut(v));
                            return;
                        }
                        RpMessage::Pong(v) => {
                            slog::debug!(log, "PONG"; "value" => v);
                            let _ = tx.send(RpEvent::Pong);
                            None
                        }
                        RpMessage::ReqPagesId { .. } | RpMessage::ReqPages { .. }
                            if !gate.postcopy.load(Ordering::Acquire) =>
                        {
                            return fail(
                                "page request (REQ_PAGES) before postcopy: a destination asks for pages only after POSTCOPY_LISTEN".into(),
                            );
                        }
                        RpMessage::ReqPagesId { offset, len, block } => {
                            match blocks.iter().position(|(n, _)| n == block) {
                                Some(i) => last_block = Some(i),
                                None => {
                                    return fail(format!(
                                        "page request for unknown RAM block {block:?}"
                                    ))
                                }
                            }
                            Some(check_request(&blocks, last_block, offset, len))
                        }
                        RpMessage::ReqPages { offset, len } => {
                            Some(check_request(&blocks, last_block, offset, len))
                        }
                        RpMessage::RecvBitmap { block } if !gate.bitmap_expected() => {
                            return fail(format!(
                                "received bitmap for {block:?} that was not asked for"
                            ));
                        }
                        RpMessage::RecvBitmap { block } => {
                            let Some(bi) = blocks.iter().position(|(n, _)| n == block) else {
                                return fail(format!(
                                    "received bitmap for unknown RAM block {block:?}"
                                ));
                            };
                            let max = blocks[bi].1.div_ceil(PAGE as u64 * 64) * 8;
                            match return_path::decode_bitmap_tail(&buf[n..have], max) {
                                Ok(None) => break,
                                Ok(Some((words, m))) => {
                                    gate.take_bitmap();
                                    let _ = tx.send(RpEvent::Bitmap(bi, words));
                                    buf.copy_within(n + m..have, 0);
                                    have -= n + m;
                                    continue;
                                }
                                Err(e) => {
                                    return fail(format!("bad received bitmap for {block:?}: {e}"))
                                }
                            }
                        }
                        RpMessage::ResumeAck(v) => {
                            let _ = tx.send(RpEvent::ResumeAck(v));
                            None
                        }
                        other => return fail(format!("unexpected return-path message: {other:?}")),
                    };
                    match ev {
                        Some(Ok(r)) => {
                            // To the preempt sender when one runs, else to the main thread.
                            // A request its full queue cannot take is dropped: the page
                            // is still on the to-do list and goes with the push.
                            let routed = match route
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .as_ref()
                                .map(|u| u.try_send(r))
                            {
                                Some(Ok(())) => true,
                                Some(Err(mpsc::TrySendError::Full(_))) => {
                                    gate.dropped.fetch_add(1, Ordering::Relaxed);
                                    true
                                }
                                Some(Err(mpsc::TrySendError::Disconnected(_))) | None => false,
                            };
                            if !routed && tx.send(RpEvent::Request(r)).is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => return fail(e),
                        _ => {}
                    }
                    buf.copy_within(n..have, 0);
                    have -= n;
                }
                if have == buf.len() {
                    // A received bitmap is larger than a message: grow.
                    buf.resize(buf.len() * 2, 0);
                }
                match chan.read(&mut buf[have..]) {
                    Ok(0) => {
                        let _ = tx.send(RpEvent::LinkDown("return path closed before SHUT".into()));
                        return;
                    }
                    Ok(n) => have += n,
                    Err(e) => {
                        let _ = tx.send(RpEvent::LinkDown(format!("return path: {e}")));
                        return;
                    }
                }
            }
        })
        .ok();
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_cover_exactly_their_pages() {
        let r = |offset: u64, pages: u64| PageRequest {
            block: 0,
            offset: offset * PAGE as u64,
            len: pages * PAGE as u64,
        };
        let w = |q: PageRequest| q.words().collect::<Vec<_>>();
        assert_eq!(w(r(3, 1)), vec![(0, 1 << 3)]);
        assert_eq!(w(r(63, 2)), vec![(0, 1 << 63), (1, 1)]);
        assert_eq!(w(r(0, 64)), vec![(0, u64::MAX)]);
        assert_eq!(
            w(r(129, 130)),
            vec![(2, u64::MAX << 1), (3, u64::MAX), (4, 0b111)]
        );
        let total: u32 = r(129, 130).words().map(|(_, m)| m.count_ones()).sum();
        assert_eq!(total, 130);
    }

    #[test]
    fn requests_are_checked() {
        let b = vec![("ram".to_string(), 1 << 20)];
        assert!(check_request(&b, Some(0), 4096, 4096).is_ok());
        assert!(check_request(&b, None, 4096, 4096).is_err());
        assert!(check_request(&b, Some(0), 1 << 20, 4096).is_err());
        assert!(check_request(&b, Some(0), 100, 4096).is_err());
        assert!(check_request(&b, Some(0), u64::MAX - 4095, 4096).is_err());
        assert!(check_request(&b, Some(0), 0, 0).is_err());
    }

    #[test]
    fn word_masks_match_bit_by_bit() {
        for (first, last) in [(0, 0), (5, 5), (0, 64), (3, 200), (64, 65), (63, 129)] {
            let mut want = vec![0u64; 4];
            for p in first..last {
                want[(p / 64) as usize] |= 1 << (p % 64);
            }
            let mut got = vec![0u64; 4];
            for (w, m) in word_masks(first, last) {
                got[w] |= m;
            }
            assert_eq!(got, want, "{first}..{last}");
        }
        // A whole 64 GiB block is 262144 words, not 16 M pages.
        assert_eq!(word_masks(0, 16 << 20).count(), 262_144);
    }

    #[test]
    fn bitmaps_only_when_asked() {
        let g = RpGate::default();
        assert!(!g.bitmap_expected());
        g.expect_bitmaps(2);
        // Checking does not count: a header decoded again while its tail arrives.
        assert!(g.bitmap_expected() && g.bitmap_expected());
        assert!(g.take_bitmap());
        assert!(g.take_bitmap());
        assert!(!g.bitmap_expected());
        assert!(!g.take_bitmap());
    }
}
