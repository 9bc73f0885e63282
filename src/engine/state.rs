//! The migration state machine: QEMU's MigrationStatus names, and the one place where
//! transitions happen (`StateMachine::transition`), which also logs them and emits the
//! `MIGRATION` event.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::control::events::EventSink;
use crate::control::protocol::event;

/// QEMU's `MigrationStatus`: its names are the control protocol's.
pub(crate) use crate::control::protocol::MigrationStatus;

impl MigrationStatus {
    /// Whether `self -> next` is a transition QEMU makes.
    pub(crate) fn can_become(self, next: MigrationStatus) -> bool {
        use MigrationStatus::*;
        if self == next {
            return false;
        }
        match next {
            // Any unfinished migration may fail or start cancelling (postcopy refuses
            // cancel at the command level, not here).
            Failed => !self.is_finished(),
            Cancelling => matches!(self, Setup | Active | PreSwitchover | Device),
            Cancelled => self == Cancelling,
            Setup => self.is_finished(),
            Active => self == Setup,
            PreSwitchover => matches!(self, Active),
            Device => matches!(self, Active | PreSwitchover),
            PostcopyActive => matches!(self, Active | PreSwitchover | Device | PostcopyRecover),
            // From a finished state: a new helper adopting a paused postcopy migration.
            PostcopyPaused => {
                matches!(
                    self,
                    PostcopyActive | PostcopyRecoverSetup | PostcopyRecover
                ) || self.is_finished()
            }
            PostcopyRecoverSetup => self == PostcopyPaused,
            PostcopyRecover => matches!(self, PostcopyPaused | PostcopyRecoverSetup),
            Completed => matches!(self, Active | Device | PostcopyActive),
            None => false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("migration is {from}, cannot become {to}", from = .from.as_str(), to = .to.as_str())]
pub(crate) struct BadTransition {
    pub from: MigrationStatus,
    pub to: MigrationStatus,
}

#[derive(Debug)]
struct Inner {
    status: MigrationStatus,
    error_desc: Option<String>,
}

/// The status of the helper's (one) migration.
pub(crate) struct StateMachine {
    inner: Mutex<Inner>,
    changed: Condvar,
    events: EventSink,
    log: slog::Logger,
}

impl StateMachine {
    pub(crate) fn new(events: EventSink, log: slog::Logger) -> Self {
        StateMachine {
            inner: Mutex::new(Inner {
                status: MigrationStatus::None,
                error_desc: None,
            }),
            changed: Condvar::new(),
            events,
            log,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking holder cannot leave Inner inconsistent (two plain fields).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn status(&self) -> MigrationStatus {
        self.lock().status
    }

    pub(crate) fn error_desc(&self) -> Option<String> {
        self.lock().error_desc.clone()
    }

    /// The single place where the status changes.
    pub(crate) fn transition(&self, to: MigrationStatus) -> Result<(), BadTransition> {
        self.transition_with(to, None)
    }

    /// Records why a postcopy migration paused: `error-desc` while it is paused (as QEMU
    /// keeps its error), replaced by the next pause's reason or a failure's.
    pub(crate) fn note_error(&self, desc: String) {
        self.lock().error_desc = Some(desc);
    }

    /// Moves to `failed` with a description, unless the migration already finished.
    pub(crate) fn fail(&self, desc: String) {
        if self
            .transition_with(MigrationStatus::Failed, Some(desc.clone()))
            .is_err()
        {
            slog::debug!(self.log, "late failure ignored"; "error" => desc);
        }
    }

    fn transition_with(
        &self,
        to: MigrationStatus,
        error: Option<String>,
    ) -> Result<(), BadTransition> {
        let mut g = self.lock();
        let from = g.status;
        if !from.can_become(to) {
            return Err(BadTransition { from, to });
        }
        g.status = to;
        if to == MigrationStatus::Setup {
            g.error_desc = None;
        }
        if let Some(e) = error {
            slog::error!(self.log, "migration failed"; "error" => &e, "from" => from.as_str());
            g.error_desc = Some(e);
        } else {
            slog::info!(self.log, "migration status"; "from" => from.as_str(), "to" => to.as_str());
        }
        // Emit while holding the lock so events leave in transition order.
        self.events
            .emit(event::MIGRATION, serde_json::json!({"status": to.as_str()}));
        drop(g);
        self.changed.notify_all();
        Ok(())
    }

    /// Emits an event other than `MIGRATION` (e.g. `MIGRATION_PASS`).
    pub(crate) fn emit_event(&self, name: &str, data: serde_json::Value) {
        self.events.emit(name, data);
    }

    /// Waits until the status satisfies `pred` or `timeout` passes; returns the status.
    pub(crate) fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(MigrationStatus) -> bool,
    ) -> MigrationStatus {
        let g = self.lock();
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |i| !pred(i.status))
            .unwrap_or_else(|e| e.into_inner());
        g.status
    }
}

#[cfg(test)]
mod tests {
    use super::MigrationStatus::*;
    use super::*;

    #[test]
    fn qemu_paths() {
        let path = [Setup, Active, PreSwitchover, Device, Completed];
        let mut s = None;
        for n in path {
            assert!(s.can_become(n), "{s:?} -> {n:?}");
            s = n;
        }
        assert!(Completed.can_become(Setup));
        assert!(!Completed.can_become(Failed));
        assert!(!Active.can_become(PostcopyPaused));
        assert!(PostcopyActive.can_become(PostcopyPaused));
        assert!(PostcopyPaused.can_become(PostcopyRecoverSetup));
        assert!(PostcopyRecoverSetup.can_become(PostcopyPaused));
        assert!(PostcopyRecover.can_become(PostcopyActive));
        assert!(!Active.can_become(Active));
    }

    #[test]
    fn machine_rejects_and_records() {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let m = StateMachine::new(EventSink::default(), log);
        assert!(m.transition(Active).is_err());
        m.transition(Setup).unwrap();
        m.fail("boom".into());
        assert_eq!(m.status(), Failed);
        assert_eq!(m.error_desc().as_deref(), Some("boom"));
        m.transition(Setup).unwrap();
        assert_eq!(m.error_desc(), Option::None);
    }
}
