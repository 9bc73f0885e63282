//! Commands on a running migration: `migrate_cancel`, `migrate-continue`,
//! `migrate-start-postcopy`, `migrate-pause`, `quit`, device state, and `query-migrate`.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::{lock, Args, CmdResult, Helper, Role};
use crate::control::qmp::QmpError;
use crate::engine::migration::Command as Mail;
use crate::engine::state::MigrationStatus;
use crate::wire::device_state::DeviceSection;

impl Helper {
    /// `migrate_cancel`.
    pub(super) fn migrate_cancel(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[])?;
        let st = self.ctx.state.status();
        match st {
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => Err(QmpError::generic(
                "Postcopy is not cancellable (the guest would be lost); use migrate-pause",
            )),
            s if s.is_finished() || s == MigrationStatus::Cancelling => Ok(json!({})),
            _ => {
                let _ = self.ctx.state.transition(MigrationStatus::Cancelling);
                self.ctx.request_cancel();
                Ok(json!({}))
            }
        }
    }

    /// `migrate-continue`.
    pub(super) fn migrate_continue(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["state"])?;
        let want = a.str("state")?;
        let st = self.ctx.state.status();
        if want != st.as_str() || st != MigrationStatus::PreSwitchover {
            return Err(QmpError::generic(format!(
                "Migration not in expected state: {want} (it is {})",
                st.as_str()
            )));
        }
        let _ = self.ctx.post(Mail::Continue);
        Ok(json!({}))
    }

    /// `migrate-start-postcopy`.
    pub(super) fn migrate_start_postcopy(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[])?;
        let st = self.ctx.state.status();
        if *lock(&self.role) != Some(Role::Source) || st.is_finished() {
            return Err(QmpError::generic(
                "Postcopy must be started after migration has been started",
            ));
        }
        if !self.ctx.caps().postcopy_ram {
            return Err(QmpError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            ));
        }
        self.ctx
            .post(Mail::StartPostcopy)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(json!({}))
    }

    /// `migrate-pause`.
    pub(super) fn migrate_pause(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[])?;
        let st = self.ctx.state.status();
        if !matches!(
            st,
            MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover
        ) {
            return Err(QmpError::generic(format!(
                "migrate-pause is only allowed in postcopy (status {})",
                st.as_str()
            )));
        }
        // As in QEMU: shut the channel down; the I/O failure pauses both sides.
        self.ctx.shutdown_channel();
        Ok(json!({}))
    }

    /// `quit`.
    pub(super) fn quit(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[])?;
        if self.busy() {
            slog::warn!(self.log, "quit while a migration is running; cancelling it");
            let _ = self.ctx.state.transition(MigrationStatus::Cancelling);
            self.ctx.request_cancel();
        }
        Ok(json!({}))
    }

    /// `device-state-set`.
    pub(super) fn device_state_set(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["sections"])?;
        let v =
            a.0.get("sections")
                .ok_or_else(|| QmpError::generic("Parameter 'sections' is missing"))?;
        let list =
            DeviceSection::list_from_json(v).map_err(|e| QmpError::generic(e.to_string()))?;
        let st = self.ctx.state.status();
        if matches!(st, MigrationStatus::Device | MigrationStatus::Completed)
            && *lock(&self.role) == Some(Role::Source)
        {
            return Err(QmpError::generic("device state was already sent"));
        }
        *lock(&self.ctx.device_out) = list;
        Ok(json!({}))
    }

    /// `query-device-state`.
    pub(super) fn query_device_state(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[])?;
        Ok(json!({
            "sections": lock(&self.ctx.device_in).iter().map(DeviceSection::to_json).collect::<Vec<_>>(),
        }))
    }

    pub(super) fn query_migrate(&self) -> Value {
        let st = self.ctx.state.status();
        let mut v = json!({"status": st.as_str()});
        if st == MigrationStatus::None {
            return v;
        }
        v["ram"] = self.ctx.stats.to_json();
        let s = &self.ctx.stats;
        let total_ms = if st.is_finished() {
            s.total_time_us.load(Ordering::Relaxed) / 1000
        } else {
            lock(&self.ctx.started)
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0)
        };
        v["total-time"] = json!(total_ms);
        v["setup-time"] = json!(s.setup_time_us.load(Ordering::Relaxed) / 1000);
        if st == MigrationStatus::Completed {
            v["downtime"] = json!(s.downtime_us.load(Ordering::Relaxed) / 1000);
        }
        if let Some(r) = *lock(&self.role) {
            v["role"] = json!(if r == Role::Source {
                "source"
            } else {
                "destination"
            });
            if r == Role::Source && self.ctx.caps().auto_converge {
                // As QEMU: the throttle in force, while auto-converge is on.
                v["cpu-throttle-percentage"] = json!(s.cpu_throttle.load(Ordering::Relaxed));
            }
            if r == Role::Destination {
                // Page-fault service latency (fault read -> page placed), as QEMU 10.1
                // reports it: the mean in nanoseconds, and faults per [2^N, 2^(N+1)) us.
                v["postcopy-latency"] = json!(self.ctx.latency.mean_ns());
                v["postcopy-latency-dist"] = self.ctx.latency.dist_json();
                // The helper's own summary, in microseconds: an extension, hence `x-`.
                v["x-postcopy-latency"] = self.ctx.latency.to_json();
            }
            // Postcopy recovery figures: pauses, and each recovery's time (new channel ->
            // postcopy-active) in milliseconds.
            v["postcopy-pauses"] = json!(self.ctx.pauses.load(Ordering::Relaxed));
            v["postcopy-recoveries-ms"] = json!(*lock(&self.ctx.recoveries));
        }
        // Paused postcopy shows why it paused, as QEMU shows its error in any state but
        // cancelled.
        let paused = matches!(
            st,
            MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::PostcopyRecover
        );
        if st == MigrationStatus::Failed || paused {
            if let Some(e) = self.ctx.state.error_desc() {
                v["error-desc"] = json!(e);
            }
        }
        let tls = lock(&self.ctx.tls_channels);
        if !tls.is_empty() {
            // Which channels ran under TLS and what they agreed (not in QEMU's schema).
            v["tls-channels"] = tls
                .iter()
                .map(|(what, i)| {
                    json!({"channel": what, "protocol": i.protocol, "cipher": i.cipher})
                })
                .collect();
        }
        v
    }
}
