//! Following a migration to its end on either side, through postcopy failures: a pause
//! (link cut or silent) is recovered over a new connection to the same address, and a
//! helper that died mid-postcopy is replaced by a new one that adopts the migration.

use std::time::{Duration, Instant};

use qemu_migration_helper::client::ClientError;
use qemu_migration_helper::control::protocol::event;

use crate::error::VmmError;
use crate::helper::{Handover, Helper};

/// The source retries `migrate resume` this often while the destination is not yet
/// listening again (each attempt is one connect).
const RESUME_RETRY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Source,
    Destination,
}

pub(crate) struct Follow<'a> {
    pub(crate) helper: Helper,
    handover: &'a Handover,
    side: Side,
    uri: &'a str,
    deadline: Instant,
    /// Set once the migration is in postcopy: from then on a failure is recovered, never
    /// fatal, since neither side has the whole guest.
    pub(crate) postcopy: bool,
    /// Pauses seen (link failures and dead helpers; not failed recovery attempts).
    pub(crate) pauses: u32,
    /// A recovery was issued and postcopy-active has not been seen since.
    recovering: bool,
    /// A recovery command was issued and the helper has not moved since: a
    /// `postcopy-paused` now is the pause a new helper adopted, not a new failure.
    pending: bool,
}

impl<'a> Follow<'a> {
    pub(crate) fn new(
        helper: Helper,
        handover: &'a Handover,
        side: Side,
        uri: &'a str,
        timeout: Duration,
    ) -> Follow<'a> {
        Follow {
            helper,
            handover,
            side,
            uri,
            deadline: Instant::now() + timeout,
            postcopy: false,
            pauses: 0,
            recovering: false,
            pending: false,
        }
    }

    /// Waits for one of the `wanted` statuses (MIGRATION events), recovering from pauses
    /// and dead helpers on the way; `failed` or `cancelled` end it with an error.
    pub(crate) fn until(&mut self, wanted: &[&str]) -> Result<String, VmmError> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            let ev = match self
                .helper
                .client
                .wait_event(left, |e| e.name == event::MIGRATION)
            {
                Ok(ev) => ev,
                Err(e) if self.postcopy && helper_gone(&e) => {
                    self.replace_helper(&e)?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let status = ev.data["status"].as_str().unwrap_or("").to_string();
            println!("kvm-vmm: migration status {status}");
            if status == "postcopy-active" {
                self.postcopy = true;
                self.recovering = false;
            }
            if status != "postcopy-paused" {
                self.pending = false;
            }
            if wanted.contains(&status.as_str()) {
                return Ok(status);
            }
            match status.as_str() {
                "postcopy-paused" if self.pending => {}
                "postcopy-paused" => {
                    if self.recovering && self.side == Side::Source {
                        // The last attempt failed (most likely the destination is not
                        // listening yet): do not spin on connects.
                        std::thread::sleep(RESUME_RETRY);
                    }
                    self.paused();
                    self.recover()?;
                }
                "failed" | "cancelled" => {
                    let info = self.helper.client.query_migrate().unwrap_or_default();
                    return Err(VmmError::Migration(format!(
                        "{status}: {}",
                        info["error-desc"]
                    )));
                }
                _ => {}
            }
        }
    }

    /// The helper's control connection broke: it died (or is dying). Reap it, start a new
    /// one with the same guest, and issue the recovery command, which makes it adopt the
    /// paused migration (see README, "Postcopy failure recovery").
    fn replace_helper(&mut self, why: &ClientError) -> Result<(), VmmError> {
        eprintln!("kvm-vmm: lost the helper ({why}); starting a new one");
        self.paused();
        self.helper.respawn(self.handover)?;
        println!("kvm-vmm: helper respawned");
        self.recover()
    }

    /// Counts a pause, unless it is a failed recovery of the last one.
    fn paused(&mut self) {
        if !self.recovering {
            self.pauses += 1;
        }
        self.recovering = true;
    }

    /// The side's recovery command over a new connection to the same address: the
    /// destination listens again, the source connects again (a new helper adopts the
    /// paused migration with it). A refusal is logged, not fatal: the next pause retries.
    fn recover(&mut self) -> Result<(), VmmError> {
        let tried = match self.side {
            Side::Destination => self.helper.client.migrate_recover(self.uri),
            Side::Source => self.helper.client.migrate_resume(self.uri),
        };
        self.pending = true;
        match tried {
            Err(ClientError::Command { desc, .. }) => {
                eprintln!("kvm-vmm: recovery refused: {desc}");
                Ok(())
            }
            other => Ok(other?),
        }
    }
}

/// Whether the error means the control connection (so the helper) is gone, rather than
/// an answer or our own deadline.
fn helper_gone(e: &ClientError) -> bool {
    matches!(e, ClientError::Io { .. } | ClientError::Protocol(_))
}
