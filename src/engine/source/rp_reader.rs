//! The source's return-path reader: a thread that decodes what the destination sends and
//! hands it to the migration thread, within bounds whatever the destination sends, and the
//! migration thread's handle on it with the one place that triages its events.
//!
//! Page requests are taken only in postcopy (a destination asks for pages only after
//! POSTCOPY_LISTEN; QEMU 10.0's source would queue and serve them in precopy too, without
//! a limit), received bitmaps only when asked for, and the queues towards the migration
//! thread and the preempt sender hold at most [`MAX_QUEUED_EVENTS`] /
//! [`MAX_QUEUED_REQUESTS`] entries: the reader waits for the migration thread (and so the
//! socket fills up), and a request that finds a full queue is dropped, which only
//! delays its page to the background push.
//!
//! The thread ends with the first error (or SHUT) and returns it; the handle joins it when
//! its queue runs dry, so a dead reader is an error, never "nothing yet".

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::compat::wire;
use crate::engine::source::error::PeerError;
pub(crate) use crate::engine::source::rp_event::{PageRequest, RpError, RpEvent};
use crate::engine::source::SourceError;
use crate::transport::{CancelToken, Channel, Woke};
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

/// Validates a page request against the blocks: a known block, page aligned, inside it.
pub(crate) fn check_request(
    blocks: &[(String, u64)],
    block: Option<usize>,
    offset: u64,
    len: u32,
) -> Result<PageRequest, RpError> {
    let bi = block.ok_or(RpError::NoBlockNamed)?;
    let (name, size) = &blocks[bi];
    let len = len as u64;
    let page = PAGE as u64;
    if len == 0
        || offset % page != 0
        || len % page != 0
        || offset.checked_add(len).is_none_or(|e| e > *size)
    {
        return Err(RpError::OutsideBlock {
            offset,
            len,
            block: name.clone(),
            size: *size,
        });
    }
    Ok(PageRequest {
        block: bi,
        offset,
        len,
    })
}

/// The reader thread's state.
struct Reader {
    chan: Arc<Channel>,
    blocks: Vec<(String, u64)>,
    route: Route,
    gate: Arc<RpGate>,
    tx: mpsc::SyncSender<RpEvent>,
    log: slog::Logger,
    buf: Vec<u8>,
    have: usize,
    last_block: Option<usize>,
    /// Rung once events were handed over, for a migration thread that waits in poll(2)
    /// on its socket and on this at once (the postcopy push). A latched signal: `cancel`
    /// rings it, `reset` clears it.
    bell: CancelToken,
    rang: bool,
}

/// Whether the reader goes on after a message.
enum Next {
    More,
    Stop,
}

impl Reader {
    fn run(mut self) -> Result<(), RpError> {
        // In postcopy a vCPU's page request waits while this thread waits for a CPU.
        crate::engine::priority::raise(&self.log, "return-path");
        loop {
            // Decode everything buffered.
            while let Some((n, next)) = self.decode_one()? {
                self.buf.copy_within(n..self.have, 0);
                self.have -= n;
                if let Next::Stop = next {
                    return Ok(());
                }
            }
            if std::mem::take(&mut self.rang) {
                self.bell.cancel();
            }
            if self.have == self.buf.len() {
                // A received bitmap is larger than a message: grow.
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let have = self.have;
            match self.chan.read(&mut self.buf[have..]) {
                Ok(0) => return Err(RpError::Closed),
                Ok(n) => self.have += n,
                Err(e) => return Err(RpError::Io(e)),
            }
        }
    }

    /// Hands an event over; Stop when the migration thread is gone.
    fn send(&mut self, ev: RpEvent) -> Next {
        let ev = match self.tx.try_send(ev) {
            Ok(()) => {
                self.rang = true;
                return Next::More;
            }
            Err(mpsc::TrySendError::Full(ev)) => ev,
            Err(mpsc::TrySendError::Disconnected(_)) => return Next::Stop,
        };
        // Full: the migration thread must take events before this one fits. Wake it even
        // if it waits for its socket.
        self.bell.cancel();
        match self.tx.send(ev) {
            Ok(()) => {
                self.rang = true;
                Next::More
            }
            Err(_) => Next::Stop,
        }
    }

    /// Decodes and handles the first buffered message: how many bytes it took, and whether
    /// to go on. None when it is not all there yet.
    fn decode_one(&mut self) -> Result<Option<(usize, Next)>, RpError> {
        let buf = &self.buf[..self.have];
        let (m, n) = match return_path::decode(buf).map_err(RpError::Decode)? {
            Some(x) => x,
            None => return Ok(None),
        };
        let req = match m {
            RpMessage::Shut(v) => {
                self.send(RpEvent::Shut(v));
                return Ok(Some((n, Next::Stop)));
            }
            RpMessage::Pong(v) => {
                slog::debug!(self.log, "PONG"; "value" => v);
                return Ok(Some((n, self.send(RpEvent::Pong))));
            }
            RpMessage::ReqPagesId { .. } | RpMessage::ReqPages { .. }
                if !self.gate.postcopy.load(Ordering::Acquire) =>
            {
                return Err(RpError::RequestBeforePostcopy);
            }
            RpMessage::ReqPagesId { offset, len, block } => {
                match self.blocks.iter().position(|(n, _)| n == block) {
                    Some(i) => self.last_block = Some(i),
                    None => return Err(RpError::UnknownBlock(block.to_string())),
                }
                check_request(&self.blocks, self.last_block, offset, len)?
            }
            RpMessage::ReqPages { offset, len } => {
                check_request(&self.blocks, self.last_block, offset, len)?
            }
            RpMessage::RecvBitmap { block } if !self.gate.bitmap_expected() => {
                return Err(RpError::BitmapNotAsked(block.to_string()));
            }
            RpMessage::RecvBitmap { block } => {
                let Some(bi) = self.blocks.iter().position(|(n, _)| n == block) else {
                    return Err(RpError::BitmapUnknownBlock(block.to_string()));
                };
                let max = self.blocks[bi].1.div_ceil(PAGE as u64 * 64) * 8;
                return match return_path::decode_bitmap_tail(&buf[n..], max) {
                    Ok(None) => Ok(None),
                    Ok(Some((words, m))) => {
                        self.gate.take_bitmap();
                        Ok(Some((n + m, self.send(RpEvent::Bitmap(bi, words)))))
                    }
                    Err(source) => Err(RpError::BadBitmap {
                        block: block.to_string(),
                        source,
                    }),
                };
            }
            RpMessage::ResumeAck(v) => return Ok(Some((n, self.send(RpEvent::ResumeAck(v))))),
            RpMessage::SwitchoverAck => return Err(RpError::SwitchoverAck),
        };
        // To the preempt sender when one runs, else to the main thread. A request its full
        // queue cannot take is dropped: the page is still on the to-do list and goes with
        // the push.
        let routed = match self
            .route
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|u| u.try_send(req))
        {
            Some(Ok(())) | Some(Err(mpsc::TrySendError::Full(_))) => true,
            Some(Err(mpsc::TrySendError::Disconnected(_))) | None => false,
        };
        let next = if routed {
            Next::More
        } else {
            self.send(RpEvent::Request(req))
        };
        Ok(Some((n, next)))
    }
}

/// How long [`ReturnPath::next`] may wait for an event.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Only what is already there.
    Now,
    /// Until this deadline at most.
    Until(Instant),
}

/// The migration thread's end of the return path: the reader thread, its queue, and what
/// the events said so far (the last PONG, whether SHUT came).
pub(crate) struct ReturnPath {
    rx: mpsc::Receiver<RpEvent>,
    /// Readable once the reader handed events over (reset by [`ReturnPath::wait_writable`]).
    bell: CancelToken,
    /// The reader's channel, shut down to end the reader when the handle goes.
    chan: Arc<Channel>,
    thread: Option<JoinHandle<Result<(), RpError>>>,
    last_pong: Instant,
    shut: bool,
}

impl ReturnPath {
    /// Starts a reader on `chan` (a duplicate of the migration channel's socket).
    pub(crate) fn spawn(
        chan: Channel,
        blocks: Vec<(String, u64)>,
        route: Route,
        gate: Arc<RpGate>,
        log: slog::Logger,
    ) -> Result<Self, SourceError> {
        let chan = Arc::new(chan);
        // Bounded: when the main thread is behind, this thread stops reading the socket and
        // the destination's writes wait (TCP's own flow control), instead of queueing here.
        let (tx, rx) = mpsc::sync_channel(MAX_QUEUED_EVENTS);
        let bell = CancelToken::new().map_err(|source| SourceError::Spawn {
            what: "return-path",
            source,
        })?;
        let reader = Reader {
            bell: bell.clone(),
            rang: false,
            chan: chan.clone(),
            blocks,
            route,
            gate,
            tx,
            log,
            buf: vec![0u8; 4096],
            have: 0,
            last_block: None,
        };
        let ended = bell.clone();
        let thread = std::thread::Builder::new()
            .name("qmh-rp".into())
            .spawn(move || {
                let r = reader.run();
                // Its queue is closed now: a migration thread waiting for events learns
                // why from it.
                ended.cancel();
                r
            })
            .map_err(|source| SourceError::Spawn {
                what: "return-path",
                source,
            })?;
        Ok(ReturnPath {
            rx,
            bell,
            chan,
            thread: Some(thread),
            last_pong: Instant::now(),
            shut: false,
        })
    }

    /// The one triage of return-path events: the next event within `wait`, None when none
    /// came. PONGs are noted here, a failed SHUT and a reader that stopped on an error are
    /// returned as errors; after SHUT 0 nothing more comes.
    pub(crate) fn next(&mut self, wait: Wait) -> Result<Option<RpEvent>, SourceError> {
        loop {
            if self.shut {
                // Nothing more comes; a caller that waits out a deadline (the throttle's)
                // still does.
                if let Wait::Until(d) = wait {
                    std::thread::sleep(d.saturating_duration_since(Instant::now()));
                }
                return Ok(None);
            }
            let ev = match wait {
                Wait::Now => self.rx.try_recv().map_err(|e| match e {
                    mpsc::TryRecvError::Empty => None,
                    mpsc::TryRecvError::Disconnected => Some(()),
                }),
                Wait::Until(d) => self
                    .rx
                    .recv_timeout(d.saturating_duration_since(Instant::now()))
                    .map_err(|e| match e {
                        mpsc::RecvTimeoutError::Timeout => None,
                        mpsc::RecvTimeoutError::Disconnected => Some(()),
                    }),
            };
            return match ev {
                Ok(RpEvent::Pong) => {
                    self.last_pong = Instant::now();
                    continue;
                }
                Ok(RpEvent::Shut(0)) => {
                    self.shut = true;
                    Ok(Some(RpEvent::Shut(0)))
                }
                Ok(RpEvent::Shut(v)) => Err(PeerError::Shut(v).into()),
                Ok(ev) => Ok(Some(ev)),
                Err(None) => Ok(None),
                Err(Some(())) => Err(self.join().into()),
            };
        }
    }

    /// Waits until `chan` can take more without blocking, an event came, or `deadline`;
    /// true when `chan` is writable. A push that waits here instead of in a blocked write
    /// serves a request as soon as it comes.
    pub(crate) fn wait_writable(&self, chan: &Channel, deadline: Instant) -> io::Result<bool> {
        let woke = chan.wait_writable(&self.bell, deadline)?;
        // Reset before the queue is read: an event handed over after this rings again.
        self.bell.reset();
        Ok(woke == Woke::Ready)
    }

    /// When the last PONG came (or the reader started).
    pub(crate) fn last_pong(&self) -> Instant {
        self.last_pong
    }

    /// Whether the destination's SHUT 0 came.
    pub(crate) fn shut(&self) -> bool {
        self.shut
    }

    /// Joins the reader, whose queue is empty and closed: why it stopped.
    fn join(&mut self) -> RpError {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            // It stops without an error only after SHUT, which is taken before this.
            Some(Ok(Ok(()))) | None => RpError::Closed,
            Some(Err(_)) => RpError::Died,
        }
    }
}

impl Drop for ReturnPath {
    /// Ends and joins the reader: after SHUT it has ended already; otherwise its socket is
    /// shut down (the migration is over or paused on it).
    fn drop(&mut self) {
        if let Some(h) = self.thread.take() {
            if !self.shut {
                self.chan.shutdown();
            }
            // The queue goes first: a reader waiting for room in it stops at once.
            let (_, closed) = mpsc::sync_channel(0);
            drop(std::mem::replace(&mut self.rx, closed));
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(postcopy: bool) -> (ReturnPath, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let gate = Arc::new(RpGate::default());
        gate.postcopy.store(postcopy, Ordering::Release);
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let rp = ReturnPath::spawn(
            Channel::from_unix(a, "rp".into()),
            vec![("ram".to_string(), 1 << 20)],
            Route::default(),
            gate,
            log,
        )
        .expect("spawn");
        (rp, b)
    }

    fn send(to: &mut std::os::unix::net::UnixStream, msgs: &[RpMessage<'_>]) {
        use std::io::Write;
        let mut out = Vec::new();
        for m in msgs {
            return_path::encode(&mut out, m).expect("encode");
        }
        to.write_all(&out).expect("write");
    }

    fn soon() -> Wait {
        Wait::Until(Instant::now() + std::time::Duration::from_secs(10))
    }

    /// PONGs are noted, requests and SHUT 0 handed over, nothing after SHUT.
    #[test]
    fn triage_hands_over_requests_and_shut() {
        let (mut rp, mut peer) = reader(true);
        let before = rp.last_pong();
        send(
            &mut peer,
            &[
                RpMessage::ReqPagesId {
                    offset: 4096,
                    len: 4096,
                    block: "ram",
                },
                RpMessage::Pong(7),
                RpMessage::Shut(0),
            ],
        );
        match rp.next(soon()) {
            Ok(Some(RpEvent::Request(r))) => assert_eq!((r.block, r.offset), (0, 4096)),
            other => panic!("expected a request, got {other:?}"),
        }
        assert!(matches!(rp.next(soon()), Ok(Some(RpEvent::Shut(0)))));
        assert!(rp.shut() && rp.last_pong() > before);
        assert!(matches!(rp.next(Wait::Now), Ok(None)));
    }

    /// The postcopy push's wait for room on a full socket: a request ends it (false, and
    /// the request is there to take), the peer draining the socket too (true), and a
    /// deadline with neither (false).
    #[test]
    fn a_request_or_room_ends_the_wait_for_room() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let gate = Arc::new(RpGate::default());
        gate.postcopy.store(true, Ordering::Release);
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let mut rp = ReturnPath::spawn(
            Channel::from_unix(a.try_clone().expect("clone"), "rp".into()),
            vec![("ram".to_string(), 1 << 20)],
            Route::default(),
            gate,
            log,
        )
        .expect("spawn");
        // Fills the socket without making it non-blocking (the reader shares the file).
        let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        while nix::sys::socket::send(a.as_raw_fd(), &[0u8; 4096], flags).is_ok() {}
        let chan = Channel::from_unix(a, "main".into());
        let soon = |ms| Instant::now() + std::time::Duration::from_millis(ms);
        assert!(!rp.wait_writable(&chan, soon(50)).expect("times out"));

        send(
            &mut b,
            &[RpMessage::ReqPagesId {
                offset: 8192,
                len: 4096,
                block: "ram",
            }],
        );
        let t0 = Instant::now();
        assert!(!rp.wait_writable(&chan, soon(10_000)).expect("a request"));
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        match rp.next(Wait::Now) {
            Ok(Some(RpEvent::Request(r))) => assert_eq!(r.offset, 8192),
            other => panic!("expected the request, got {other:?}"),
        }
        // Rung once: with the request taken, the next wait is for room again.
        assert!(!rp.wait_writable(&chan, soon(50)).expect("times out"));

        let mut sink = vec![0u8; 1 << 20];
        b.set_nonblocking(true).expect("nonblocking");
        while matches!(b.read(&mut sink), Ok(n) if n > 0) {}
        assert!(rp.wait_writable(&chan, soon(10_000)).expect("room"));
    }

    /// A reader that stopped is an error: the destination's for what it sent, the link's
    /// when the socket closed.
    #[test]
    fn a_stopped_reader_is_an_error() {
        let (mut rp, mut peer) = reader(false);
        send(
            &mut peer,
            &[RpMessage::ReqPages {
                offset: 0,
                len: 4096,
            }],
        );
        let e = rp.next(soon()).expect_err("refused");
        assert!(!e.is_link_failure(), "{e}");
        assert!(e.to_string().contains("before postcopy"), "{e}");

        let (mut rp, mut peer) = reader(true);
        send(&mut peer, &[RpMessage::Shut(1)]);
        let e = rp.next(soon()).expect_err("SHUT 1");
        assert!(
            e.to_string().contains("SHUT 1") && !e.is_link_failure(),
            "{e}"
        );

        let (mut rp, peer) = reader(true);
        drop(peer);
        let e = rp.next(soon()).expect_err("closed");
        assert!(e.is_link_failure(), "{e}");
        assert_eq!(e.to_string(), "link: return path closed before SHUT");
    }

    /// Dropping the handle ends and joins the reader, even one waiting for room in a full
    /// queue.
    #[test]
    fn drop_joins_a_blocked_reader() {
        let (rp, mut peer) = reader(true);
        let req = RpMessage::ReqPagesId {
            offset: 0,
            len: 4096,
            block: "ram",
        };
        send(&mut peer, &vec![req; MAX_QUEUED_EVENTS + 100]);
        // Likely full by then; the drop must return either way.
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(rp);
    }

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
