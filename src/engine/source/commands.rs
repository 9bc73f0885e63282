//! The one place where the source looks at, and waits for, the control channel's commands
//! (cancel, migrate-start-postcopy, migrate-continue, a recovery), all through the
//! mailbox. Everything else the source waits for is on its own channels: the return
//! path's queue and the sockets (which cancel and pause shut down).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::engine::mailbox::{GateWait, Recovery};
use crate::engine::migration::MigrationCtx;
use crate::engine::source::SourceError;
use crate::transport::{CancelToken, Uri};

/// The control channel's commands as the source thread sees them.
#[derive(Clone, Copy)]
pub(crate) struct Commands<'m> {
    ctx: &'m MigrationCtx,
}

/// What ended a wait in pre-switchover.
pub(crate) enum Switchover {
    /// `migrate-continue`.
    Continue,
    /// The keepalive deadline passed first.
    Idle,
}

impl<'m> Commands<'m> {
    pub(crate) fn new(ctx: &'m MigrationCtx) -> Self {
        Commands { ctx }
    }

    /// The token that cancel sets: for channels' waits.
    pub(crate) fn cancel_token(&self) -> &'m CancelToken {
        self.ctx.mailbox.cancel_token()
    }

    /// Cancelled: the error that ends the migration.
    pub(crate) fn check_cancel(&self) -> Result<(), SourceError> {
        if self.ctx.mailbox.cancelled() {
            return Err(SourceError::Cancelled);
        }
        Ok(())
    }

    /// `migrate-start-postcopy` was given.
    pub(crate) fn postcopy_requested(&self) -> bool {
        self.ctx.mailbox.postcopy_requested()
    }

    /// The bandwidth limit's wait: `d` (a real deadline), ended at once by cancel.
    pub(crate) fn throttle(&self, d: Duration) -> Result<(), SourceError> {
        match self.cancel_token().wait_timeout(Some(d)) {
            Ok(false) => Ok(()),
            Ok(true) => Err(SourceError::Cancelled),
            // poll(2) on the eventfd failed: wait the time out without it.
            Err(_) => {
                std::thread::sleep(d);
                self.check_cancel()
            }
        }
    }

    /// In pre-switchover: waits for `migrate-continue` until `deadline`.
    pub(crate) fn wait_continue(&self, deadline: Instant) -> Result<Switchover, SourceError> {
        let max = deadline.saturating_duration_since(Instant::now());
        match self.ctx.mailbox.wait_continue(Some(max)) {
            GateWait::Opened => Ok(Switchover::Continue),
            GateWait::Cancelled => Err(SourceError::Cancelled),
            GateWait::TimedOut => Ok(Switchover::Idle),
        }
    }

    /// In postcopy-paused: waits for a recovery (`migrate resume=true`): where to connect,
    /// or the channel to use.
    pub(crate) fn wait_recovery(&self) -> Result<(Uri, Option<OwnedFd>), SourceError> {
        loop {
            match self.ctx.mailbox.wait_recovery() {
                None => return Err(SourceError::Cancelled),
                Some(Recovery::Source(uri, fd)) => return Ok((uri, fd)),
                // A destination's recovery is not for us.
                Some(Recovery::Destination(_)) => continue,
            }
        }
    }
}
