//! The recovery driver: in postcopy a broken link pauses (neither side has the whole
//! guest); the loader waits in postcopy-paused for a recovery channel, answers the
//! source's RECV_BITMAPs and POSTCOPY_RESUME, asks again for the pages still pending, and
//! loads the rest of the stream on the new channel.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::compat::wire::command;
use crate::engine::destination::error::{LoadError, RecoveryError};
use crate::engine::destination::loader::{Link, Loader, LoopEnd, Phase, READ_CHUNK};
use crate::engine::destination::preempt::PreemptConn;
use crate::engine::destination::reader::{with_next, Reader};
use crate::engine::migration::Recovery;
use crate::engine::state::MigrationStatus;
use crate::transport::{Channel, Incoming};
use crate::wire::return_path::RpMessage;
use crate::wire::stream::{self, Token};

impl Loader<'_> {
    pub(super) fn pause_and_recover(&mut self, why: &LoadError) -> Result<(), LoadError> {
        // The source closes the preempt channel too when it pauses.
        if let Some(s) = self.postcopy() {
            s.stop_preempt();
        }
        let ctx = self.ctx;
        ctx.pauses.fetch_add(1, Ordering::Relaxed);
        slog::warn!(ctx.log, "postcopy link failed: paused"; "error" => %why);
        ctx.state.note_error(why.to_string());
        ctx.state.transition(MigrationStatus::PostcopyPaused)?;
        self.wait_and_recover()
    }

    /// In postcopy-paused: takes recoveries until one succeeds and the stream has loaded.
    pub(super) fn wait_and_recover(&mut self) -> Result<(), LoadError> {
        let ctx = self.ctx;
        loop {
            let Some(rec) = ctx.wait_recovery() else {
                return Err(LoadError::Cancelled);
            };
            let Recovery::Destination(incoming) = rec else {
                continue;
            };
            match self.recover_on(incoming) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_link() || e.is_recovery() => {
                    let phase = if ctx.state.status() == MigrationStatus::PostcopyActive {
                        "postcopy link failed: paused"
                    } else {
                        "postcopy recovery failed: paused again"
                    };
                    slog::warn!(ctx.log, "{}", phase; "error" => %e);
                    ctx.state.note_error(e.to_string());
                    if ctx.state.status() != MigrationStatus::PostcopyPaused {
                        ctx.state.transition(MigrationStatus::PostcopyPaused)?;
                    }
                    ctx.pauses.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes the new channel, answers the source's RECV_BITMAPs and POSTCOPY_RESUME, asks
    /// again for the pages still pending, and loads the rest of the stream.
    fn recover_on(&mut self, incoming: Incoming) -> Result<(), LoadError> {
        let ctx = self.ctx;
        // With postcopy-preempt the source connects a new preempt channel after the main
        // one, to the same address.
        let preempt = ctx.caps().postcopy_preempt && incoming.is_listener();
        let (chan, incoming) = if preempt {
            let c = incoming.accept_another(ctx.mailbox.cancel_token());
            (c, Some(incoming))
        } else {
            (incoming.accept(ctx.mailbox.cancel_token()), None)
        };
        let chan = chan
            .map_err(RecoveryError::Accept)?
            .with_cancel(ctx.mailbox.cancel_token().clone());
        let chan = ctx
            .secure(chan, "recovery", None, ctx.link_timeout())
            .map_err(RecoveryError::Accept)?;

        let t0 = Instant::now();
        if !chan.is_socket {
            return Err(RecoveryError::NotASocket(chan.peer.clone()).into());
        }
        let dup = |c: &Channel| c.try_clone_fd().map_err(RecoveryError::Dup);
        ctx.set_channel(Some(dup(&chan)?));
        self.link = Link {
            fd: Some(dup(&chan)?),
            timer: Some(chan.timer()),
        };
        let main = self.link.dup_fd();
        let blocks = self.blocks;
        let Phase::Postcopy(sink) = &mut self.phase else {
            return Err(RecoveryError::NoPostcopy.into());
        };
        if let Some(incoming) = incoming {
            sink.start_preempt(ctx, blocks, PreemptConn::Listen(incoming), main)
                .map_err(RecoveryError::Preempt)?;
        }
        self.arm_link_timeout();
        self.postcopy_loading();
        let Some(rp) = self.rp.clone() else {
            return Err(RecoveryError::NoPostcopy.into());
        };
        rp.replace(chan.try_clone("return-path").map_err(RecoveryError::Dup)?);
        ctx.state.transition(MigrationStatus::PostcopyRecover)?;
        let mut r = Reader::new(&chan, chan.peer.clone(), READ_CHUNK);
        // Recovery happens only in postcopy: read what comes, do not gather.
        r.top_up = false;
        // No header on a recovery channel: RECV_BITMAP per block, then POSTCOPY_RESUME.
        loop {
            let (cmd, payload) = with_next!(
                r,
                "in the recovery handshake",
                stream::decode_token,
                |t| match t {
                    Token::Command(c) => (c.cmd, c.payload.to_vec()),
                    other => {
                        return Err(RecoveryError::Unexpected(format!("{other:?}")).into());
                    }
                }
            );
            match cmd {
                command::RECV_BITMAP => {
                    let mut c = stream::Cursor::new(&payload);
                    let name = c
                        .str8("block name")
                        .map_err(|e| r.wire(e))?
                        .ok_or(RecoveryError::NoBlockName)?;
                    let bi = self
                        .block_index(name)
                        .ok_or_else(|| RecoveryError::UnknownBlock(name.to_string()))?;
                    rp.send_bitmap(name, &self.received[bi].words())
                        .map_err(RecoveryError::ReturnPath)?;
                }
                command::POSTCOPY_RESUME => {
                    rp.send(&RpMessage::ResumeAck(1))
                        .map_err(RecoveryError::ReturnPath)?;
                    break;
                }
                other => return Err(RecoveryError::UnexpectedCommand(other).into()),
            }
        }
        ctx.state.transition(MigrationStatus::PostcopyActive)?;
        ctx.record_recovery(t0.elapsed());
        slog::info!(ctx.log, "postcopy recovered"; "ms" => t0.elapsed().as_secs_f64() * 1000.0);
        // The source forgot the requests of the old link.
        self.cursor.last = None;
        if let Some(s) = self.postcopy() {
            s.new_link();
            s.resend_pending();
        }
        match self.sections(&mut r, None, None)? {
            LoopEnd::Done => Ok(()),
            LoopEnd::NeedDescription => Err(RecoveryError::DeviceSections.into()),
        }
    }
}
