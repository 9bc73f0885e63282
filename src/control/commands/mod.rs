//! The helper's commands. Each handler validates its arguments, changes shared state under
//! short locks, and returns; migrations run on worker threads, which the control side
//! drives through the migration context's mailbox (continue, start postcopy, recover,
//! pause, cancel), never by waiting on them.
//!
//! [`Helper::dispatch`] maps a [`Command`] to its handler: `fds` (named fds, userfaultfd),
//! `blocks` (RAM blocks), `settings` (capabilities, parameters), `start` (migrate,
//! migrate-incoming, migrate-recover and the migration thread), `running` (commands on a
//! running migration and `query-migrate`); `args` reads arguments with QEMU's messages.

mod args;
mod blocks;
mod fds;
mod fdsets;
mod files;
#[cfg(test)]
mod files_tests;
#[cfg(test)]
mod multifd_tests;
mod objects;
mod running;
mod settings;
mod start;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde_json::{json, Map, Value};

use self::args::Args;
use super::events::EventSink;
use super::protocol::{self, Command};
use super::qmp::QmpError;
use crate::engine::migration::MigrationCtx;
use crate::memory::block::RamBlock;

type CmdResult = Result<Value, QmpError>;

/// The helper's state as the control channel sees it: named fds, RAM blocks, the
/// migration thread and its shared context. `pub` (hidden) for the binary only.
pub(crate) struct Helper {
    log: slog::Logger,
    events: EventSink,
    ctx: Arc<MigrationCtx>,
    fds: Mutex<HashMap<String, OwnedFd>>,
    blocks: Mutex<Vec<Arc<RamBlock>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    role: Mutex<Option<Role>>,
    /// The parent's userfaultfd (`userfaultfd-set`), for postcopy destinations.
    uffd: Mutex<Option<OwnedFd>>,
    /// Objects made by `object-add` (TLS credentials, authz), by id.
    objects: Mutex<HashMap<String, crate::transport::tls::creds::TlsObject>>,
    /// fd sets (`add-fd`), for `file:/dev/fdset/N`.
    fdsets: Mutex<fdsets::Fdsets>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Source,
    Destination,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most fds held under a name at once (`getfd` beyond it is refused).
const MAX_NAMED_FDS: usize = 256;

impl Helper {
    pub(crate) fn new(log: slog::Logger) -> std::io::Result<Arc<Self>> {
        let events = EventSink::default();
        Ok(Arc::new(Helper {
            ctx: MigrationCtx::new(log.clone(), events.clone())?,
            log,
            events,
            fds: Mutex::new(HashMap::new()),
            blocks: Mutex::new(Vec::new()),
            worker: Mutex::new(None),
            role: Mutex::new(None),
            uffd: Mutex::new(None),
            objects: Mutex::new(HashMap::new()),
            fdsets: Mutex::new(Default::default()),
        }))
    }

    pub(crate) fn log(&self) -> &slog::Logger {
        &self.log
    }

    pub(crate) fn events(&self) -> &EventSink {
        &self.events
    }

    /// The parent went away (`--control-fd` closed): cancels a precopy migration, pauses
    /// a postcopy one and waits `orphan-timeout` for an adopter (see `orphan.rs`), then
    /// stops the migration thread, waiting a bounded time for it.
    pub(crate) fn parent_gone(&self) {
        super::orphan::parent_gone(&self.ctx, &self.log);
        if let Some(h) = lock(&self.worker).take() {
            super::orphan::join_bounded(h, &self.log);
        }
    }

    fn take_fd(&self, name: &str) -> Option<OwnedFd> {
        lock(&self.fds).remove(name)
    }

    fn dup_fd(&self, name: &str) -> Result<OwnedFd, QmpError> {
        let fds = lock(&self.fds);
        let fd = fds.get(name).ok_or_else(|| {
            QmpError::generic(format!("File descriptor named '{name}' not found"))
        })?;
        fd.try_clone()
            .map_err(|e| QmpError::generic(format!("cannot duplicate fd '{name}': {e}")))
    }

    fn busy(&self) -> bool {
        !self.ctx.state.status().is_finished()
    }

    /// Runs command `name`. The fds that came with it are for `getfd` only; any other
    /// command closes them.
    pub(crate) fn dispatch(
        &self,
        name: &str,
        args: &Map<String, Value>,
        mut fds: Vec<OwnedFd>,
    ) -> CmdResult {
        let a = Args(args);
        let cmd = Command::from_name(name);
        if !matches!(cmd, Some(Command::Getfd | Command::AddFd)) && !fds.is_empty() {
            slog::warn!(self.log, "closing fds sent with a command that takes none"; "command" => name, "count" => fds.len());
            fds.clear();
        }
        match cmd {
            Some(Command::QueryVersion) => {
                a.only(&[])?;
                Ok(protocol::greeting()["QMP"]["version"].clone())
            }
            Some(Command::QueryCommands) => {
                a.only(&[])?;
                Ok(Value::Array(
                    Command::ALL
                        .iter()
                        .map(|c| json!({"name": c.as_str()}))
                        .collect(),
                ))
            }
            Some(Command::Getfd) => self.getfd(&a, fds),
            Some(Command::Closefd) => self.closefd(&a),
            Some(Command::AddFd) => self.add_fd(&a, fds),
            Some(Command::RemoveFd) => self.remove_fd(&a),
            Some(Command::QueryFdsets) => self.query_fdsets(&a),
            Some(Command::RamBlockAdd) => self.ram_block_add(&a),
            Some(Command::RamBlockDel) => self.ram_block_del(&a),
            Some(Command::QueryRamBlocks) => self.query_ram_blocks(&a),
            Some(Command::MigrateSetCapabilities) => self.set_capabilities(&a),
            Some(Command::QueryMigrateCapabilities) => self.query_capabilities(&a),
            Some(Command::MigrateSetParameters) => self.set_parameters(&a),
            Some(Command::QueryMigrateParameters) => self.query_parameters(&a),
            Some(Command::Migrate) => self.migrate(&a),
            Some(Command::MigrateIncoming) => self.migrate_incoming(&a),
            Some(Command::MigrateCancel) => self.migrate_cancel(&a),
            Some(Command::MigrateContinue) => self.migrate_continue(&a),
            Some(Command::MigrateStartPostcopy) => self.migrate_start_postcopy(&a),
            Some(Command::MigratePause) => self.migrate_pause(&a),
            Some(Command::MigrateRecover) => self.migrate_recover(&a),
            Some(Command::UserfaultfdSet) => self.userfaultfd_set(&a),
            Some(Command::QueryMigrate) => {
                a.only(&[])?;
                Ok(self.query_migrate())
            }
            Some(Command::DeviceStateSet) => self.device_state_set(&a),
            Some(Command::QueryDeviceState) => self.query_device_state(&a),
            Some(Command::ObjectAdd) => self.object_add(&a),
            Some(Command::ObjectDel) => self.object_del(&a),
            Some(Command::Quit) => self.quit(&a),
            // The connection answers `qmp_capabilities` itself; here it is unknown, as in
            // QEMU once the negotiation is over.
            Some(Command::QmpCapabilities) | None => Err(QmpError::not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    }
}

/// What the command tests share: a helper, and a command run on it.
#[cfg(test)]
mod testing {
    use super::*;

    pub(super) fn helper() -> Arc<Helper> {
        Helper::new(slog::Logger::root(slog::Discard, slog::o!())).unwrap()
    }

    pub(super) fn run(h: &Helper, name: &str, args: Value) -> CmdResult {
        let Value::Object(args) = args else {
            panic!("arguments must be an object")
        };
        h.dispatch(name, &args, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{helper, run};
    use super::*;
    use crate::control::protocol::{ErrorClass, COMMANDS};

    #[test]
    fn query_commands_lists_the_protocol_in_order() {
        let v = run(&helper(), "query-commands", json!({})).unwrap();
        let names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, COMMANDS);
    }

    #[test]
    fn unknown_commands_and_a_late_handshake_are_not_found() {
        let h = helper();
        for name in ["nope", "qmp_capabilities"] {
            let e = run(&h, name, json!({})).unwrap_err();
            assert_eq!(e.class, ErrorClass::CommandNotFound);
            assert_eq!(e.desc, format!("The command {name} has not been found"));
        }
    }

    #[test]
    fn ram_block_add_reports_in_the_old_order() {
        let h = helper();
        let e = run(&h, "ram-block-add", json!({"id": "ram", "bogus": 1})).unwrap_err();
        assert_eq!(e.desc, "Parameter 'bogus' is unexpected");
        // The fd is looked up before the numbers are read.
        let e = run(&h, "ram-block-add", json!({"id": "ram", "fdname": "x"})).unwrap_err();
        assert_eq!(e.desc, "File descriptor named 'x' not found");
        let memfd = nix::sys::memfd::memfd_create(
            c"commands-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        nix::unistd::ftruncate(&memfd, 1 << 20).unwrap();
        let args = json!({"fdname": "ram0"});
        let Value::Object(args) = args else {
            unreachable!()
        };
        h.dispatch("getfd", &args, vec![memfd]).unwrap();
        let e = run(
            &h,
            "ram-block-add",
            json!({"id": "ram", "fdname": "ram0", "dirty-bitmap": "bm"}),
        )
        .unwrap_err();
        assert_eq!(e.desc, "File descriptor named 'bm' not found");
        let e = run(&h, "ram-block-add", json!({"id": "ram", "fdname": "ram0"})).unwrap_err();
        assert_eq!(e.desc, "Parameter 'offset' is missing");
        run(
            &h,
            "ram-block-add",
            json!({"id": "ram", "fdname": "ram0", "offset": 0, "size": 1 << 20}),
        )
        .unwrap();
        let blocks = run(&h, "query-ram-blocks", json!({})).unwrap();
        assert_eq!(blocks[0]["id"], "ram");
        assert_eq!(blocks[0]["size"], 1 << 20);
        let e = run(&h, "ram-block-add", json!({"id": "ram", "fdname": "ram0"})).unwrap_err();
        assert_eq!(e.desc, "RAM block 'ram' already exists");
    }
}
