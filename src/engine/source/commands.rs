//! The one place where the source looks at, and waits for, the control channel's commands
//! (cancel, migrate-start-postcopy, migrate-continue, a recovery). Everything else the
//! source waits for is on its own channels: the return path's queue and the sockets.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::engine::migration::{MigrationCtx, Recovery};
use crate::engine::source::SourceError;
use crate::transport::Uri;

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

    /// Cancelled: the error that ends the migration.
    pub(crate) fn check_cancel(&self) -> Result<(), SourceError> {
        if self.ctx.cancelled() {
            return Err(SourceError::Cancelled);
        }
        Ok(())
    }

    /// `migrate-start-postcopy` was given.
    pub(crate) fn postcopy_requested(&self) -> bool {
        self.ctx
            .postcopy_requested
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The bandwidth limit's wait: `d` (a real deadline), cut short by cancel.
    pub(crate) fn throttle(&self, d: Duration) -> Result<(), SourceError> {
        self.check_cancel()?;
        std::thread::sleep(d);
        self.check_cancel()
    }

    /// In pre-switchover: waits for `migrate-continue` until `deadline`.
    pub(crate) fn wait_continue(&self, deadline: Instant) -> Result<Switchover, SourceError> {
        let max = deadline.saturating_duration_since(Instant::now());
        match self.ctx.gate.wait_for(&self.ctx.cancel, max) {
            Some(true) => Ok(Switchover::Continue),
            Some(false) => Err(SourceError::Cancelled),
            None => Ok(Switchover::Idle),
        }
    }

    /// In postcopy-paused: waits for a recovery (`migrate resume=true`): where to connect,
    /// or the channel to use.
    pub(crate) fn wait_recovery(&self) -> Result<(Uri, Option<OwnedFd>), SourceError> {
        loop {
            match self.ctx.wait_recovery() {
                None => return Err(SourceError::Cancelled),
                Some(Recovery::Source(uri, fd)) => return Ok((uri, fd)),
                // A destination's recovery is not for us.
                Some(Recovery::Destination(_)) => continue,
            }
        }
    }
}
