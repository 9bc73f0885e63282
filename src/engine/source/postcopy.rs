//! The postcopy push: the switchover (discards, the device package), then the rest of RAM,
//! pages on request first and in the background otherwise, over a [`Link`] that owns the
//! return path, the keepalive and the preempt sender. A link that fails pauses the push
//! until a recovery gives it a new one (`recovery.rs`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compat::wire;
use crate::engine::migration::{MigrationCtx, Stats};
use crate::engine::source::commands::Commands;
use crate::engine::source::error::{LinkError, PeerError, PreemptError};
use crate::engine::source::pages::{
    bit_runs, Names, Pages, Sink, POSTCOPY_CHUNK, POSTCOPY_CHUNK_SHARED,
};
use crate::engine::source::rp_reader::{
    PageRequest, ReturnPath, Route, RpEvent, RpGate, Wait, MAX_QUEUED_REQUESTS,
};
use crate::engine::source::urgent::Urgent;
use crate::engine::source::writer::{Throttle, Writer};
use crate::engine::source::SourceError;
use crate::engine::state::MigrationStatus;
use crate::memory::block::RamBlock;
use crate::transport::{Channel, Uri};
use crate::wire::device_state::DeviceSection;
use crate::wire::postcopy;
use crate::wire::stream::{self, SectionKind, WireError};

/// The first PING of a postcopy keepalive is this plus one (the stream's own PINGs are 1,
/// 2 and 4).
const FIRST_PING_SEQ: u32 = 100;
/// Socket send buffer in postcopy: small, so requested pages are not queued behind much.
pub(crate) const POSTCOPY_SNDBUF: usize = 64 << 10;
/// How long the source waits for the destination's SHUT at the end.
const SHUT_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection to the destination: the main channel's writer, its return path and,
/// with postcopy-preempt, the preempt sender. Replaced whole by a recovery.
pub(crate) struct Link<'m> {
    pub(crate) out: Writer<'m>,
    pub(crate) rp: ReturnPath,
    pub(crate) urgent: Option<Urgent>,
}

/// Where the push is: sending over a link, or paused without one (until a recovery).
pub(crate) enum Phase<'m> {
    Active(Link<'m>),
    /// `sent`: the bytes sent on the links so far.
    Paused {
        sent: u64,
    },
}

/// What the return-path reader and the migration thread share, for the whole migration
/// (each new return path of a recovery gets them too).
#[derive(Clone, Default)]
pub(crate) struct RpShared {
    pub(crate) route: Route,
    pub(crate) gate: Arc<RpGate>,
}

impl RpShared {
    /// Starts a return-path reader on `fd`, a duplicate of the migration socket.
    pub(crate) fn spawn_reader(
        &self,
        chan: Channel,
        blocks: &[Arc<RamBlock>],
        log: &slog::Logger,
    ) -> Result<ReturnPath, SourceError> {
        let names = blocks.iter().map(|b| (b.id.clone(), b.size)).collect();
        ReturnPath::spawn(
            chan,
            names,
            self.route.clone(),
            self.gate.clone(),
            log.clone(),
        )
    }
}

/// In postcopy with a link timeout: pings the destination at a quarter of the timeout,
/// and declares the link dead when no PONG came for the whole timeout.
pub(crate) struct Keepalive {
    /// When the link was armed: PONGs before it do not count.
    armed: Instant,
    /// None until the first PING on this link, which is due at once.
    last_ping_sent: Option<Instant>,
    seq: u32,
}

impl Keepalive {
    /// Arms the link timeout on `link`'s channel once postcopy runs (precopy may idle for
    /// long, e.g. in pre-switchover).
    pub(crate) fn arm(ctx: &MigrationCtx, link: &Link<'_>, seq: u32) -> Self {
        let t = ctx.params().link_timeout;
        link.out
            .chan()
            .set_timeouts((t > 0).then(|| Duration::from_millis(t)));
        Keepalive {
            armed: Instant::now(),
            last_ping_sent: None,
            seq,
        }
    }

    fn interval(ctx: &MigrationCtx) -> Option<Duration> {
        let t = ctx.params().link_timeout;
        (t > 0).then(|| Duration::from_millis(t / 4))
    }

    /// Fails when the destination has not answered for the whole timeout; sends a PING
    /// when one is due.
    fn tick(
        &mut self,
        ctx: &MigrationCtx,
        out: &mut Writer<'_>,
        rp: &ReturnPath,
    ) -> Result<(), SourceError> {
        let Some(interval) = Self::interval(ctx) else {
            return Ok(());
        };
        let last_pong = rp.last_pong().max(self.armed);
        let pinged_since = self.last_ping_sent.is_some_and(|t| t > last_pong);
        if last_pong.elapsed() > interval * 4 && pinged_since {
            return Err(LinkError::NoPong(last_pong.elapsed().as_millis()).into());
        }
        if self.last_ping_sent.is_none_or(|t| t.elapsed() >= interval) {
            self.seq = self.seq.wrapping_add(1);
            let v = self.seq;
            out.put(|o| stream::encode_command(o, wire::command::PING, &v.to_be_bytes()))?;
            out.flush()?;
            self.last_ping_sent = Some(Instant::now());
        }
        Ok(())
    }

    /// When the next PING is due, at the latest `max` from now.
    fn due(&self, ctx: &MigrationCtx, max: Duration) -> Instant {
        let now = Instant::now();
        let wait = Self::interval(ctx).map_or(max, |i| i.min(max));
        now + wait
    }
}

/// The postcopy push, between links.
pub(crate) struct PostcopyPush<'m> {
    pub(super) ctx: &'m MigrationCtx,
    pub(super) commands: Commands<'m>,
    pub(super) blocks: &'m [Arc<RamBlock>],
    pub(super) pages: Pages<'m>,
    pub(super) rp_shared: RpShared,
    /// postcopy-preempt: where the main channel went (the preempt channel goes there too).
    preempt_uri: Option<Uri>,
    /// Page requests from the destination not yet served.
    pub(super) requests: VecDeque<PageRequest>,
    /// The keepalive's PING numbers go on across links.
    ping_seq: u32,
}

impl<'m> PostcopyPush<'m> {
    /// A push of what `pages` says is left; `preempt_uri` with postcopy-preempt.
    pub(crate) fn new(
        ctx: &'m MigrationCtx,
        blocks: &'m [Arc<RamBlock>],
        pages: Pages<'m>,
        rp_shared: RpShared,
        preempt_uri: Option<Uri>,
    ) -> Self {
        PostcopyPush {
            ctx,
            commands: Commands::new(ctx),
            blocks,
            pages,
            rp_shared,
            preempt_uri,
            requests: VecDeque::new(),
            ping_seq: FIRST_PING_SEQ,
        }
    }

    /// Postcopy switchover on `link` (the precopy's): discards for what is still to send,
    /// the preempt channel, the device package; then postcopy-active.
    pub(crate) fn switchover(
        &mut self,
        link: &mut Link<'m>,
        devices: &[DeviceSection],
        downtime_start: Instant,
    ) -> Result<(), SourceError> {
        let ctx = self.ctx;
        // What is still to send (never sent, or dirtied since) is discarded on the
        // destination so that the guest faults on it instead of reading stale data.
        self.pages.harvest(ctx);
        for bt in &self.pages.blocks {
            let ranges = bit_runs(&bt.words());
            if !ranges.is_empty() {
                let name = &bt.block.id;
                link.out
                    .put(|o| postcopy::encode_discards(o, name, &ranges))?;
            }
        }
        // postcopy-preempt: the second channel exists before the package (a QEMU
        // destination waits for it before loading the device state), and after the last
        // harvest (its sender reads the holes). Failing here still leaves the whole guest
        // on this side.
        if let Some(uri) = self.preempt_uri.clone() {
            link.urgent = Some(self.connect_preempt(&uri).map_err(PeerError::Preempt)?);
        }
        let mut dev = Vec::new();
        for d in devices {
            dev.extend_from_slice(&d.raw);
        }
        let blob = postcopy::encode_package(&dev)?;
        // From LISTEN on the destination may ask for pages.
        self.rp_shared.gate.postcopy.store(true, Ordering::Release);
        let len = u32::try_from(blob.len())
            .ok()
            .filter(|&l| l <= stream::MAX_PACKAGED_LEN)
            .ok_or(WireError::TooLong {
                what: "postcopy package",
                len: blob.len() as u64,
                max: stream::MAX_PACKAGED_LEN as u64,
            })?;
        // postcopy-active before the package goes, as QEMU's source is: once the
        // destination has it, it may report postcopy-active, and a manager that sees that
        // may at once act on this side (`migrate-pause`). Failing to send it still fails
        // the migration here, as in QEMU.
        ctx.state.transition(MigrationStatus::PostcopyActive)?;
        link.out.put(|o| {
            stream::encode_command(o, wire::command::PING, &2u32.to_be_bytes())?;
            stream::encode_command(o, wire::command::PACKAGED, &len.to_be_bytes())?;
            o.extend_from_slice(&blob);
            stream::encode_command(o, wire::command::PING, &4u32.to_be_bytes())
        })?;
        link.out.flush()?;
        ctx.stats.downtime_us.store(
            downtime_start.elapsed().as_micros() as u64,
            Ordering::Relaxed,
        );
        // Keep little queued in the socket, so a requested page does not wait behind
        // megabytes of background pages.
        link.out.chan().set_send_buffer(POSTCOPY_SNDBUF);
        Ok(())
    }

    /// Runs the push from `phase` until the destination has everything, pausing when the
    /// link fails and recovering; returns the bytes sent on the main channels.
    pub(crate) fn run(mut self, mut phase: Phase<'m>) -> Result<u64, SourceError> {
        loop {
            phase = match phase {
                Phase::Active(mut link) => match self.push(&mut link) {
                    Ok(()) => return Ok(link.out.sent()),
                    // From the switchover on a broken link pauses the migration instead of
                    // failing it: neither side has the whole guest.
                    Err(e) if e.is_link_failure() => Phase::Paused {
                        sent: self.pause(link, &e)?,
                    },
                    Err(e) => return Err(e),
                },
                Phase::Paused { sent } => Phase::Active(self.recover_until_done(sent)?),
            };
        }
    }

    /// Pushes the rest of RAM (requests first), ends the stream and waits for SHUT.
    fn push(&mut self, link: &mut Link<'m>) -> Result<(), SourceError> {
        let ctx = self.ctx;
        let mut keepalive = Keepalive::arm(ctx, link, self.ping_seq);
        let r = self.push_on(link, &mut keepalive);
        self.ping_seq = keepalive.seq;
        r
    }

    fn push_on(&mut self, link: &mut Link<'m>, ka: &mut Keepalive) -> Result<(), SourceError> {
        let ctx = self.ctx;
        self.pages.rewind();
        let mut throttle = Throttle::new();
        let mut resume_at: Option<Instant> = None;
        // Without preempt the push keeps the socket at most half full, so that a requested
        // page can always go in at once.
        let room = link.out.chan().send_buffer().unwrap_or(0) / 2;
        loop {
            ka.tick(ctx, &mut link.out, &link.rp)?;
            self.serve_requests(link, Wait::Now)?;
            // The background push waits out its bandwidth window; requests do not.
            if let Some(t) = resume_at {
                if Instant::now() < t {
                    let until = ka.due(ctx, t.saturating_duration_since(Instant::now()));
                    self.serve_requests(link, Wait::Until(until.min(t)))?;
                    continue;
                }
                resume_at = None;
            }
            // Without preempt, requested pages share the socket with the push: the push
            // waits for room here, where a request wakes it, rather than in a write that
            // only returns once the destination has drained most of the socket.
            if link.urgent.is_none() && link.out.chan().unsent().is_some_and(|q| q >= room) {
                let until = ka.due(ctx, SHUT_TIMEOUT);
                let chan = link.out.chan();
                let writable =
                    link.rp
                        .wait_writable(chan, until)
                        .map_err(|source| SourceError::Io {
                            peer: chan.peer.clone(),
                            sent: link.out.sent(),
                            source,
                        })?;
                if !writable {
                    continue;
                }
            }
            let chunk = match link.urgent {
                Some(_) => POSTCOPY_CHUNK,
                None => POSTCOPY_CHUNK_SHARED,
            };
            let Some((bi, wi, word)) = self.pages.next_chunk(chunk) else {
                break;
            };
            let bt = &self.pages.blocks[bi];
            link.out.open_ram(SectionKind::Part)?;
            let sent = bt.send_word(
                &mut link.out,
                Sink::Stream,
                bi,
                wi,
                word,
                &mut Names::Track(None),
            )?;
            sent.count(ctx);
            link.out.close_ram()?;
            link.out.flush()?;
            // On a busy machine, let the return-path thread run: a request it has not read
            // yet cannot overtake the push.
            std::thread::yield_now();
            let limit = ctx.params().max_postcopy_bandwidth;
            if let Some(wait) = throttle.account(sent.bytes, limit) {
                resume_at = Some(Instant::now() + wait);
            }
        }
        self.serve_requests(link, Wait::Now)?;
        link.out.empty_ram(SectionKind::End)?;
        link.out.put(|o| {
            stream::encode_eof(o);
            Ok(())
        })?;
        link.out.flush()?;
        let shut = wait_shut(ctx, &mut link.out, &mut link.rp, Some(ka));
        // The destination has every page; the preempt channel closes after its SHUT.
        self.stop_urgent(link, false);
        shut
    }

    /// Queues a page request, up to a bound: a request beyond it is dropped (its page is
    /// still to send and goes with the push), so a flood cannot grow the queue.
    pub(crate) fn queue_request(&mut self, r: PageRequest) {
        if self.requests.len() < MAX_QUEUED_REQUESTS {
            self.requests.push_back(r);
        }
    }

    /// Takes the return-path events that came within `wait` (the first one waited for,
    /// the rest as they are there), then sends the requested pages that are still to
    /// send, each request in its own PART, flushed at once. Pages already sent are in
    /// flight and are not sent again.
    fn serve_requests(&mut self, link: &mut Link<'m>, wait: Wait) -> Result<(), SourceError> {
        let mut wait = wait;
        while let Some(ev) = link.rp.next(wait)? {
            match ev {
                RpEvent::Request(r) => self.queue_request(r),
                // Before the end: taken when the end comes.
                RpEvent::Shut(_) => {}
                other => return Err(PeerError::Unexpected(other).into()),
            }
            wait = Wait::Now;
        }
        if link.urgent.is_some() {
            // Requests that reached this queue anyway go to the preempt sender.
            let route = self
                .rp_shared
                .route
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = route.as_ref() {
                for r in self.requests.drain(..) {
                    // A full queue drops the request: the push sends the page anyway.
                    let _ = tx.try_send(r);
                }
            }
            return Ok(());
        }
        while let Some(r) = self.requests.pop_front() {
            Stats::add(&self.ctx.stats.postcopy_requests, 1);
            let bt = &self.pages.blocks[r.block];
            let mut framed = false;
            for (wi, mask) in r.words() {
                let word = bt.take(wi, mask);
                if word == 0 {
                    continue;
                }
                if !framed {
                    link.out.open_ram(SectionKind::Part)?;
                    framed = true;
                }
                let sent = bt.send_word(
                    &mut link.out,
                    Sink::Stream,
                    r.block,
                    wi,
                    word,
                    &mut Names::Track(None),
                )?;
                sent.count(self.ctx);
            }
            if framed {
                link.out.close_ram()?;
                link.out.flush()?;
            }
        }
        Ok(())
    }

    /// Connects the postcopy-preempt channel to `uri` (where the main channel went) and
    /// starts its sender; requests queued before now go the same way.
    pub(crate) fn connect_preempt(&mut self, uri: &Uri) -> Result<Urgent, PreemptError> {
        if matches!(uri, Uri::Fd(_) | Uri::File(_)) {
            return Err(PreemptError::NotASocketUri(uri.clone()));
        }
        let c = Channel::connect(uri, |_| None, self.commands.cancel_token())
            .map_err(PreemptError::Connect)?
            .with_cancel(self.commands.cancel_token().clone());
        let t = self.ctx.link_timeout();
        c.set_timeouts(t);
        let (securer, cancel, uri2) = (
            self.ctx.securer(),
            self.ctx.mailbox.cancel_token().clone(),
            uri.clone(),
        );
        let secure = move |c| securer.secure(c, "preempt", Some(&uri2), &cancel, t);
        let blocks = self
            .pages
            .blocks
            .iter()
            .zip(self.blocks)
            .map(|(b, arc)| (arc.clone(), b.todo.clone(), b.holes.clone()))
            .collect();
        let route = self.rp_shared.route.clone();
        let log = self.ctx.log.clone();
        let u = Urgent::spawn(c, secure, blocks, route, self.requests.drain(..), log)
            .map_err(PreemptError::Spawn)?;
        slog::info!(self.ctx.log, "postcopy-preempt channel connected"; "uri" => %uri);
        Ok(u)
    }

    /// Stops `link`'s preempt sender (at the end, or broken with `shut` at a pause) and
    /// adds its figures to the migration's.
    pub(crate) fn stop_urgent(&mut self, link: &mut Link<'m>, shut: bool) {
        if let Some(u) = link.urgent.take() {
            u.stop(self.ctx, shut);
        }
    }
}

/// Waits for the destination's SHUT at the end, ignoring late requests for pages in
/// flight; keeps the link alive meanwhile in postcopy (`keepalive`).
pub(crate) fn wait_shut(
    ctx: &MigrationCtx,
    out: &mut Writer<'_>,
    rp: &mut ReturnPath,
    mut keepalive: Option<&mut Keepalive>,
) -> Result<(), SourceError> {
    let deadline = Instant::now() + SHUT_TIMEOUT;
    while !rp.shut() {
        let mut until = deadline;
        if let Some(ka) = keepalive.as_deref_mut() {
            ka.tick(ctx, out, rp)?;
            until = until.min(ka.due(ctx, SHUT_TIMEOUT));
        }
        match rp.next(Wait::Until(until))? {
            Some(RpEvent::Shut(_)) | Some(RpEvent::Request(_)) => {}
            Some(other) => return Err(PeerError::Unexpected(other).into()),
            None if Instant::now() < deadline => {}
            None => return Err(PeerError::NoShut.into()),
        }
    }
    Ok(())
}
