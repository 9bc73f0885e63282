//! The recovery driver: postcopy-paused until a recovery succeeds. `migrate resume=true`
//! gives a new channel, the destination says per block what it has (RECV_BITMAP), the
//! rest is to send again, POSTCOPY_RESUME / RESUME_ACK, and the push goes on over the new
//! [`Link`]. Any failure on the way pauses again, ready for the next attempt.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compat::wire;
use crate::engine::source::error::{LinkError, RecoveryError};
use crate::engine::source::postcopy::{Link, PostcopyPush, POSTCOPY_SNDBUF};
use crate::engine::source::rp_reader::{ReturnPath, RpEvent, Wait};
use crate::engine::source::writer::{Writer, PAGE};
use crate::engine::source::SourceError;
use crate::engine::state::MigrationStatus;
use crate::transport::{Channel, Uri};
use crate::wire::stream;

/// How long a recovery handshake may take before it counts as failed.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl<'m> PostcopyPush<'m> {
    /// Pauses on `why`: the link is shut down and dropped (its threads joined), requests
    /// pending at the destination are sent again after the recovery. Returns the bytes
    /// sent so far.
    pub(crate) fn pause(
        &mut self,
        mut link: Link<'m>,
        why: &SourceError,
    ) -> Result<u64, SourceError> {
        let ctx = self.ctx;
        ctx.pauses.fetch_add(1, Ordering::Relaxed);
        slog::warn!(ctx.log, "postcopy link failed: paused"; "error" => %why);
        link.out.chan().shutdown();
        self.stop_urgent(&mut link, true);
        ctx.state.note_error(why.to_string());
        ctx.state.transition(MigrationStatus::PostcopyPaused)?;
        let sent = link.out.sent();
        drop(link);
        self.requests.clear();
        Ok(sent)
    }

    /// In postcopy-paused: takes recoveries until one succeeds; its new link.
    pub(crate) fn recover_until_done(&mut self, sent: u64) -> Result<Link<'m>, SourceError> {
        let ctx = self.ctx;
        loop {
            let (uri, fd) = self.commands.wait_recovery()?;
            let t0 = Instant::now();
            match self.recover(uri, fd, sent) {
                Ok(link) => {
                    let took = t0.elapsed();
                    ctx.record_recovery(took);
                    slog::info!(ctx.log, "postcopy recovered"; "ms" => took.as_secs_f64() * 1000.0);
                    return Ok(link);
                }
                Err(e) => {
                    slog::warn!(ctx.log, "postcopy recovery failed: paused again"; "error" => %e);
                    ctx.pauses.fetch_add(1, Ordering::Relaxed);
                    ctx.state.note_error(e.to_string());
                    let _ = ctx.state.transition(MigrationStatus::PostcopyPaused);
                    if !e.stays_paused() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// One recovery attempt on the channel `migrate resume=true` named.
    fn recover(
        &mut self,
        uri: Uri,
        fd: Option<OwnedFd>,
        sent: u64,
    ) -> Result<Link<'m>, SourceError> {
        let ctx = self.ctx;
        ctx.state
            .transition(MigrationStatus::PostcopyRecoverSetup)?;
        let name = uri.to_string();
        let chan = match fd {
            Some(fd) => Channel::from_fd(name.trim_start_matches("fd:"), fd),
            None => Channel::connect(&uri, |_| None, self.commands.cancel_token()),
        }
        .map_err(RecoveryError::Channel)?
        .with_cancel(self.commands.cancel_token().clone());
        if !chan.is_socket {
            return Err(RecoveryError::NotASocket(name).into());
        }
        let chan = ctx
            .secure(chan, "recovery", Some(&uri), ctx.link_timeout())
            .map_err(RecoveryError::Channel)?;
        let chan = Arc::new(chan);
        let r = self.handshake(&uri, chan.clone(), sent);
        if r.is_err() {
            // Registered for cancel, so still open: shut it down for the destination.
            chan.shutdown();
        }
        r
    }

    fn handshake(
        &mut self,
        uri: &Uri,
        chan: Arc<Channel>,
        sent: u64,
    ) -> Result<Link<'m>, SourceError> {
        let ctx = self.ctx;
        if let Ok(fd) = chan.try_clone_fd() {
            ctx.set_channel(Some(fd));
        }
        ctx.state.transition(MigrationStatus::PostcopyRecover)?;
        let rp_chan = chan.try_clone("return-path").map_err(RecoveryError::Dup)?;
        let rp = self
            .rp_shared
            .spawn_reader(rp_chan, self.blocks, &ctx.log)?;
        let mut link = Link {
            out: Writer::new(chan.clone(), sent),
            rp,
            urgent: None,
        };
        chan.set_send_buffer(POSTCOPY_SNDBUF);
        let t = ctx.params().link_timeout;
        chan.set_timeouts((t > 0).then(|| Duration::from_millis(t)));
        self.rp_shared.gate.expect_bitmaps(self.pages.blocks.len());
        // No header on a recovery channel: straight to the bitmap requests.
        for bt in &self.pages.blocks {
            let name = &bt.block.id;
            link.out.put(|o| {
                let mut p = Vec::new();
                stream::put_str8(&mut p, name)?;
                stream::encode_command(o, wire::command::RECV_BITMAP, &p)
            })?;
        }
        link.out.flush()?;
        let mut got = vec![false; self.pages.blocks.len()];
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        while got.iter().any(|g| !g) {
            match next_in_time(&mut link.rp, deadline)? {
                RpEvent::Bitmap(bi, words) => {
                    self.pages.blocks[bi].set_missing(&words);
                    got[bi] = true;
                }
                RpEvent::Request(r) => self.queue_request(r),
                other => return Err(RecoveryError::Unexpected(other).into()),
            }
        }
        if ctx.caps().postcopy_preempt {
            // A new preempt channel to the new address, after the main one (QEMU's order).
            link.urgent = Some(self.connect_preempt(uri).map_err(RecoveryError::Preempt)?);
        }
        link.out
            .put(|o| stream::encode_command(o, wire::command::POSTCOPY_RESUME, &[]))?;
        link.out.flush()?;
        loop {
            match next_in_time(&mut link.rp, deadline)? {
                RpEvent::ResumeAck(1) => break,
                RpEvent::ResumeAck(v) => return Err(RecoveryError::ResumeAck(v).into()),
                RpEvent::Request(r) => self.queue_request(r),
                other => return Err(RecoveryError::Unexpected(other).into()),
            }
        }
        ctx.stats
            .remaining
            .store(self.pages.left() * PAGE as u64, Ordering::Relaxed);
        ctx.state.transition(MigrationStatus::PostcopyActive)?;
        Ok(link)
    }
}

/// The next return-path event before `deadline`; none is the link's failure.
fn next_in_time(rp: &mut ReturnPath, deadline: Instant) -> Result<RpEvent, SourceError> {
    rp.next(Wait::Until(deadline))?
        .ok_or(SourceError::Link(LinkError::NoAnswer))
}
