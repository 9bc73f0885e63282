//! The helper's commands. Each handler validates its arguments, changes shared state under
//! short locks, and returns; migrations run on worker threads.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde_json::{json, Map, Value};

use super::qmp::QmpError;
use crate::compat::QemuVersion;
use crate::control::events::EventSink;
use crate::engine::migration::{Capabilities, Command, MigrationCtx};
use crate::engine::state::MigrationStatus;
use crate::memory::block::{map_present_in_background, RamBlock, RamBlockSpec};
use crate::transport::{Channel, Incoming, Uri};
use crate::wire::device_state::DeviceSection;

type CmdResult = Result<Value, QmpError>;

/// The helper's state as the control channel sees it.
pub struct Helper {
    log: slog::Logger,
    events: EventSink,
    ctx: Arc<MigrationCtx>,
    fds: Mutex<HashMap<String, OwnedFd>>,
    blocks: Mutex<Vec<Arc<RamBlock>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    role: Mutex<Option<Role>>,
    /// The parent's userfaultfd (`userfaultfd-set`), for postcopy destinations.
    uffd: Mutex<Option<OwnedFd>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Source,
    Destination,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Argument accessors with QMP-style messages.
struct Args<'a>(&'a Map<String, Value>);

impl<'a> Args<'a> {
    fn str(&self, k: &str) -> Result<&'a str, QmpError> {
        match self.0.get(k) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: string"
            ))),
            None => Err(QmpError::generic(format!("Parameter '{k}' is missing"))),
        }
    }
    fn opt_str(&self, k: &str) -> Result<Option<&'a str>, QmpError> {
        match self.0.get(k) {
            None => Ok(None),
            Some(_) => self.str(k).map(Some),
        }
    }
    fn opt_u64(&self, k: &str) -> Result<Option<u64>, QmpError> {
        match self.0.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                QmpError::generic(format!(
                    "Invalid parameter type for '{k}', expected: integer >= 0"
                ))
            }),
        }
    }
    fn u64(&self, k: &str) -> Result<u64, QmpError> {
        self.opt_u64(k)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{k}' is missing")))
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>, QmpError> {
        match self.0.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: boolean"
            ))),
        }
    }
    /// Refuses arguments the command does not know, as QMP does.
    fn only(&self, known: &[&str]) -> Result<(), QmpError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

/// Most fds held under a name at once (`getfd` beyond it is refused).
pub const MAX_NAMED_FDS: usize = 256;

/// Commands the helper knows, for `query-commands` and the man page.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "getfd",
    "closefd",
    "ram-block-add",
    "ram-block-del",
    "query-ram-blocks",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "migrate-continue",
    "migrate-start-postcopy",
    "migrate-pause",
    "migrate-recover",
    "userfaultfd-set",
    "query-migrate",
    "device-state-set",
    "query-device-state",
    "quit",
];

impl Helper {
    pub fn new(log: slog::Logger) -> std::io::Result<Arc<Self>> {
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
        }))
    }

    pub fn log(&self) -> &slog::Logger {
        &self.log
    }

    pub fn events(&self) -> &EventSink {
        &self.events
    }

    pub fn ctx(&self) -> &Arc<MigrationCtx> {
        &self.ctx
    }

    /// The parent went away (`--control-fd` closed): cancels a precopy migration, pauses
    /// a postcopy one and waits `orphan-timeout` for an adopter (see `orphan.rs`), then
    /// stops the migration thread, waiting a bounded time for it.
    pub fn parent_gone(&self) {
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

    pub fn dispatch(
        &self,
        name: &str,
        args: &Map<String, Value>,
        mut fds: Vec<OwnedFd>,
    ) -> CmdResult {
        let a = Args(args);
        if name != "getfd" && !fds.is_empty() {
            slog::warn!(self.log, "closing fds sent with a command that takes none"; "command" => name, "count" => fds.len());
            fds.clear();
        }
        match name {
            "query-version" => {
                a.only(&[])?;
                Ok(super::greeting()["QMP"]["version"].clone())
            }
            "query-commands" => {
                a.only(&[])?;
                Ok(Value::Array(
                    COMMANDS.iter().map(|c| json!({"name": c})).collect(),
                ))
            }
            "getfd" => {
                a.only(&["fdname"])?;
                let fdname = a.str("fdname")?;
                if fdname.is_empty() || fdname.starts_with(|c: char| c.is_ascii_digit()) {
                    return Err(QmpError::generic(
                        "Parameter 'fdname' expects a name not starting with a digit",
                    ));
                }
                if fds.len() != 1 {
                    return Err(QmpError::generic(format!(
                        "getfd needs exactly one file descriptor sent with SCM_RIGHTS, got {}",
                        fds.len()
                    )));
                }
                let fd = fds.pop().ok_or_else(|| {
                    QmpError::generic("No file descriptor supplied via SCM_RIGHTS")
                })?;
                let mut named = lock(&self.fds);
                // A bound on what a client can make the helper hold (the fd table is finite).
                if named.len() >= MAX_NAMED_FDS && !named.contains_key(fdname) {
                    return Err(QmpError::generic(format!(
                        "too many named file descriptors (limit {MAX_NAMED_FDS}); closefd some first"
                    )));
                }
                named.insert(fdname.to_string(), fd);
                Ok(json!({}))
            }
            "closefd" => {
                a.only(&["fdname"])?;
                let fdname = a.str("fdname")?;
                lock(&self.fds)
                    .remove(fdname)
                    .map(|_| json!({}))
                    .ok_or_else(|| {
                        QmpError::generic(format!("File descriptor named '{fdname}' not found"))
                    })
            }
            "ram-block-add" => self.ram_block_add(&a),
            "ram-block-del" => {
                a.only(&["id"])?;
                let id = a.str("id")?;
                if self.busy() {
                    return Err(QmpError::generic(
                        "cannot remove a RAM block while a migration is running",
                    ));
                }
                let mut blocks = lock(&self.blocks);
                let before = blocks.len();
                blocks.retain(|b| b.id != id);
                if blocks.len() == before {
                    return Err(QmpError::generic(format!("no RAM block '{id}'")));
                }
                Ok(json!({}))
            }
            "query-ram-blocks" => {
                a.only(&[])?;
                Ok(Value::Array(
                    lock(&self.blocks)
                        .iter()
                        .map(|b| {
                            let mut v = json!({
                                "id": b.id, "fdname": b.fdname, "offset": b.offset,
                                "size": b.size, "page-size": b.page_size,
                                "mapped-ahead": b.mapped_ahead(),
                                "shrink-sealed": b.shrink_sealed,
                            });
                            if let Some(h) = b.host_addr {
                                v["host-addr"] = json!(h);
                            }
                            if let Some(d) = &b.dirty_bitmap_name {
                                v["dirty-bitmap"] = json!(d);
                            }
                            v
                        })
                        .collect(),
                ))
            }
            "migrate-set-capabilities" => self.set_capabilities(&a),
            "query-migrate-capabilities" => {
                a.only(&[])?;
                let caps = self.ctx.caps();
                Ok(Value::Array(
                    Capabilities::NAMES
                        .iter()
                        .map(|n| json!({"capability": n, "state": caps.get(n).unwrap_or(false)}))
                        .collect(),
                ))
            }
            "migrate-set-parameters" => self.set_parameters(&a),
            "query-migrate-parameters" => {
                a.only(&[])?;
                let p = self.ctx.params();
                Ok(json!({
                    "max-bandwidth": p.max_bandwidth,
                    "downtime-limit": p.downtime_limit,
                    "max-postcopy-bandwidth": p.max_postcopy_bandwidth,
                    "machine-type": p.machine_type,
                    "compat-version": p.compat_version.to_string(),
                    "link-timeout": p.link_timeout,
                    "precopy-timeout": p.precopy_timeout,
                    "orphan-timeout": p.orphan_timeout,
                    "load-threads": p.load_threads,
                }))
            }
            "migrate" => self.migrate(&a),
            "migrate-incoming" => self.migrate_incoming(&a),
            "migrate_cancel" => {
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
            "migrate-continue" => {
                a.only(&["state"])?;
                let want = a.str("state")?;
                let st = self.ctx.state.status();
                if want != st.as_str() || st != MigrationStatus::PreSwitchover {
                    return Err(QmpError::generic(format!(
                        "Migration not in expected state: {want} (it is {})",
                        st.as_str()
                    )));
                }
                let _ = self.ctx.post(Command::Continue);
                Ok(json!({}))
            }
            "migrate-start-postcopy" => {
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
                    .post(Command::StartPostcopy)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            "migrate-pause" => {
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
            "migrate-recover" => {
                a.only(&["uri"])?;
                let uri: Uri =
                    a.str("uri")?
                        .parse()
                        .map_err(|e: crate::transport::TransportError| {
                            QmpError::generic(e.to_string())
                        })?;
                let role = *lock(&self.role);
                let fresh = self.ctx.state.status().is_finished();
                if role != Some(Role::Destination) && !fresh {
                    return Err(QmpError::generic(
                        "migrate-recover is for the destination; the source resumes with migrate {\"resume\": true}",
                    ));
                }
                let st = self.ctx.state.status();
                // A fresh helper (the previous one died) adopts the paused migration.
                let adopt = st.is_finished() && self.ctx.caps().postcopy_ram;
                if st != MigrationStatus::PostcopyPaused && !adopt {
                    return Err(QmpError::generic(format!(
                        "Migrate recover can only be run when postcopy is paused (status {})",
                        st.as_str()
                    )));
                }
                if adopt {
                    let blocks = self.migration_blocks()?;
                    let uffd = lock(&self.uffd)
                        .as_ref()
                        .map(|fd| fd.try_clone())
                        .transpose()
                        .map_err(|e| QmpError::generic(e.to_string()))?
                        .ok_or_else(|| {
                            QmpError::generic("adopting a postcopy migration needs userfaultfd-set")
                        })?;
                    let incoming = Incoming::open(&uri, |n| self.take_fd(n))
                        .map_err(|e| QmpError::generic(e.to_string()))?;
                    slog::info!(self.log, "migrate-recover: adopting a paused postcopy migration"; "uri" => %uri);
                    self.ctx
                        .offer_recovery(crate::engine::migration::Recovery::Destination(incoming));
                    return self.start_adopt(Role::Destination, move |ctx| {
                        crate::engine::destination::adopt(ctx, blocks, uffd)
                            .map_err(|e| e.to_string())
                    });
                }
                let incoming = Incoming::open(&uri, |n| self.take_fd(n))
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                slog::info!(self.log, "migrate-recover"; "uri" => %uri);
                self.ctx
                    .offer_recovery(crate::engine::migration::Recovery::Destination(incoming));
                Ok(json!({}))
            }
            "userfaultfd-set" => {
                a.only(&["fdname"])?;
                let name = a.str("fdname")?;
                let fd = self.dup_fd(name)?;
                crate::engine::destination::fault::check_userfaultfd(name, &fd)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                if self.busy() && *lock(&self.role) == Some(Role::Destination) {
                    return Err(QmpError::generic(
                        "cannot change the userfaultfd of a running migration",
                    ));
                }
                *lock(&self.uffd) = Some(fd);
                Ok(json!({}))
            }
            "query-migrate" => {
                a.only(&[])?;
                Ok(self.query_migrate())
            }
            "device-state-set" => {
                a.only(&["sections"])?;
                let v = args
                    .get("sections")
                    .ok_or_else(|| QmpError::generic("Parameter 'sections' is missing"))?;
                let list = DeviceSection::list_from_json(v)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                let st = self.ctx.state.status();
                if matches!(st, MigrationStatus::Device | MigrationStatus::Completed)
                    && *lock(&self.role) == Some(Role::Source)
                {
                    return Err(QmpError::generic("device state was already sent"));
                }
                *lock(&self.ctx.device_out) = list;
                Ok(json!({}))
            }
            "query-device-state" => {
                a.only(&[])?;
                Ok(json!({
                    "sections": lock(&self.ctx.device_in).iter().map(DeviceSection::to_json).collect::<Vec<_>>(),
                }))
            }
            "quit" => {
                a.only(&[])?;
                if self.busy() {
                    slog::warn!(self.log, "quit while a migration is running; cancelling it");
                    let _ = self.ctx.state.transition(MigrationStatus::Cancelling);
                    self.ctx.request_cancel();
                }
                Ok(json!({}))
            }
            other => Err(QmpError::not_found(format!(
                "The command {other} has not been found"
            ))),
        }
    }

    fn ram_block_add(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[
            "id",
            "fdname",
            "offset",
            "size",
            "page-size",
            "host-addr",
            "dirty-bitmap",
        ])?;
        if self.busy() {
            return Err(QmpError::generic(
                "cannot add a RAM block while a migration is running",
            ));
        }
        let id = a.str("id")?.to_string();
        if lock(&self.blocks).iter().any(|b| b.id == id) {
            return Err(QmpError::generic(format!(
                "RAM block '{id}' already exists"
            )));
        }
        let fdname = a.str("fdname")?.to_string();
        let fd = self.dup_fd(&fdname)?;
        let dirty_bitmap = match a.opt_str("dirty-bitmap")? {
            Some(n) => Some((n.to_string(), self.dup_fd(n)?)),
            None => None,
        };
        let spec = RamBlockSpec {
            id: id.clone(),
            fdname,
            offset: a.u64("offset")?,
            size: a.u64("size")?,
            page_size: a.opt_u64("page-size")?,
            host_addr: a.opt_u64("host-addr")?,
            dirty_bitmap,
        };
        let block = RamBlock::new(spec, fd).map_err(|e| QmpError::generic(e.to_string()))?;
        slog::info!(self.log, "RAM block added"; "id" => &block.id, "size" => block.size, "page_size" => block.page_size);
        let block = Arc::new(block);
        map_present_in_background(&block, &self.log);
        lock(&self.blocks).push(block);
        Ok(json!({}))
    }

    fn set_capabilities(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["capabilities"])?;
        if self.busy() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        let list =
            a.0.get("capabilities")
                .and_then(Value::as_array)
                .ok_or_else(|| QmpError::generic("Parameter 'capabilities' must be an array"))?;
        let mut caps = self.ctx.caps();
        for item in list {
            let o = item
                .as_object()
                .ok_or_else(|| QmpError::generic("each capability must be an object"))?;
            let ia = Args(o);
            ia.only(&["capability", "state"])?;
            let name = ia.str("capability")?;
            let on = ia
                .opt_bool("state")?
                .ok_or_else(|| QmpError::generic("Parameter 'state' is missing"))?;
            if !caps.set(name, on) {
                return Err(QmpError::generic(format!(
                    "Parameter 'capability' does not accept value '{name}'"
                )));
            }
        }
        *lock(&self.ctx.caps) = caps;
        Ok(json!({}))
    }

    fn set_parameters(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[
            "max-bandwidth",
            "downtime-limit",
            "max-postcopy-bandwidth",
            "machine-type",
            "compat-version",
            "link-timeout",
            "precopy-timeout",
            "orphan-timeout",
            "load-threads",
        ])?;
        let mut p = self.ctx.params();
        if let Some(v) = a.opt_u64("max-bandwidth")? {
            p.max_bandwidth = v;
        }
        if let Some(v) = a.opt_u64("downtime-limit")? {
            // QEMU's limit: 2000 s.
            if v > 2_000_000 {
                return Err(QmpError::generic("Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 milliseconds"));
            }
            p.downtime_limit = v;
        }
        if let Some(v) = a.opt_u64("max-postcopy-bandwidth")? {
            p.max_postcopy_bandwidth = v;
        }
        if let Some(v) = a.opt_u64("link-timeout")? {
            if v != 0 && v < 100 {
                return Err(QmpError::generic(
                    "link-timeout is 0 (off) or at least 100 ms",
                ));
            }
            p.link_timeout = v;
        }
        if let Some(v) = a.opt_u64("precopy-timeout")? {
            if v != 0 && v < 100 {
                return Err(QmpError::generic(
                    "precopy-timeout is 0 (off) or at least 100 ms",
                ));
            }
            p.precopy_timeout = v;
        }
        if let Some(v) = a.opt_u64("orphan-timeout")? {
            // At most a day: the helper must exit in bounded time after its parent.
            if v > 86_400_000 {
                return Err(QmpError::generic("orphan-timeout is 0 to 86400000 ms"));
            }
            p.orphan_timeout = v;
        }
        if let Some(v) = a.opt_u64("load-threads")? {
            let max = crate::memory::page_writer::MAX_THREADS;
            if v == 0 || v > max as u64 {
                return Err(QmpError::generic(format!(
                    "load-threads must be 1 to {max}"
                )));
            }
            // Read when a migration starts: a running one keeps its threads.
            p.load_threads = v as usize;
        }
        let running = self.busy();
        if let Some(m) = a.opt_str("machine-type")? {
            if running {
                return Err(QmpError::generic(
                    "machine-type cannot change while a migration is running",
                ));
            }
            if m.is_empty() || m.len() > 255 {
                return Err(QmpError::generic("machine-type must be 1 to 255 bytes"));
            }
            p.machine_type = m.to_string();
        }
        if let Some(v) = a.opt_str("compat-version")? {
            if running {
                return Err(QmpError::generic(
                    "compat-version cannot change while a migration is running",
                ));
            }
            p.compat_version = v
                .parse::<QemuVersion>()
                .map_err(|e| QmpError::generic(e.to_string()))?;
        }
        *lock(&self.ctx.params) = p;
        Ok(json!({}))
    }

    /// Starts a migration thread after the state moved to `setup`.
    fn start_worker(
        &self,
        role: Role,
        f: impl FnOnce(&MigrationCtx) -> Result<(), String> + Send + 'static,
    ) -> CmdResult {
        self.spawn_worker(role, true, f)
    }

    /// Resets the shared state and runs `f` on a migration thread; `setup` moves the status
    /// to `setup` first (a new migration, not an adopted one).
    fn spawn_worker(
        &self,
        role: Role,
        setup: bool,
        f: impl FnOnce(&MigrationCtx) -> Result<(), String> + Send + 'static,
    ) -> CmdResult {
        // Reap the previous worker (finished, since the status is final).
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
        self.ctx.reset_for_new_migration();
        if setup {
            self.ctx
                .state
                .transition(MigrationStatus::Setup)
                .map_err(|e| QmpError::generic(e.to_string()))?;
        }
        *lock(&self.role) = Some(role);
        *lock(&self.ctx.started) = Some(std::time::Instant::now());
        let ctx = self.ctx.clone();
        // To name a block that shrank under the migration in its error.
        let blocks = lock(&self.blocks).clone();
        let h = std::thread::Builder::new()
            .name(format!("qmh-{role:?}").to_lowercase())
            .spawn(move || {
                let r = f(&ctx);
                ctx.set_channel(None);
                // Failed and cancelled runs report how long they ran too.
                if ctx.stats.total_time_us.load(Ordering::Relaxed) == 0 {
                    if let Some(t) = *lock(&ctx.started) {
                        ctx.stats
                            .total_time_us
                            .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                }
                match r {
                    Ok(()) => {}
                    Err(_)
                        if ctx.cancelled() && ctx.state.status() == MigrationStatus::Cancelling =>
                    {
                        let _ = ctx.state.transition(MigrationStatus::Cancelled);
                    }
                    Err(e) => ctx.state.fail(crate::memory::guard::explain(&blocks, e)),
                }
            })
            .map_err(|e| QmpError::generic(format!("cannot start the migration thread: {e}")))?;
        *lock(&self.worker) = Some(h);
        Ok(json!({}))
    }

    /// Starts the thread of an adopted postcopy migration: it moves to postcopy-paused
    /// itself (the recovery is already offered); the reply waits until it has.
    fn start_adopt(
        &self,
        role: Role,
        f: impl FnOnce(&MigrationCtx) -> Result<(), String> + Send + 'static,
    ) -> CmdResult {
        self.spawn_worker(role, false, f)?;
        self.ctx
            .state
            .wait_for(std::time::Duration::from_secs(2), |s| !s.is_finished());
        Ok(json!({}))
    }

    fn migration_blocks(&self) -> Result<Vec<Arc<RamBlock>>, QmpError> {
        let blocks = lock(&self.blocks).clone();
        if blocks.is_empty() {
            return Err(QmpError::generic(
                "no RAM blocks registered (use ram-block-add)",
            ));
        }
        if let Some(b) = blocks.iter().find(|b| b.memory_lost()) {
            return Err(QmpError::generic(format!(
                "RAM block '{}' lost its memory: its fd shrank; remove the block and add it again",
                b.id
            )));
        }
        Ok(blocks)
    }

    fn check_can_start(&self) -> Result<(), QmpError> {
        if self.busy() {
            return Err(QmpError::generic(format!(
                "There's a migration process in progress (status {})",
                self.ctx.state.status().as_str()
            )));
        }
        Ok(())
    }

    fn migrate(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["uri", "resume", "detach", "blk", "inc"])?;
        let uri: Uri = a
            .str("uri")?
            .parse()
            .map_err(|e: crate::transport::TransportError| QmpError::generic(e.to_string()))?;
        if a.opt_bool("resume")?.unwrap_or(false) {
            let st = self.ctx.state.status();
            // A fresh helper (the previous one died) adopts the paused migration.
            let adopt = st.is_finished() && self.ctx.caps().postcopy_ram;
            if !adopt
                && (*lock(&self.role) != Some(Role::Source)
                    || st != MigrationStatus::PostcopyPaused)
            {
                return Err(QmpError::generic(format!(
                    "Cannot resume if there is no paused migration (status {})",
                    st.as_str()
                )));
            }
            // A passed fd is taken now and checked to be a connected socket.
            let fd = match &uri {
                Uri::Fd(n) => {
                    let fd = self.take_fd(n).ok_or_else(|| {
                        QmpError::generic(format!("File descriptor named '{n}' not found"))
                    })?;
                    let chan =
                        Channel::from_fd(n, fd).map_err(|e| QmpError::generic(e.to_string()))?;
                    if !chan.is_socket {
                        return Err(QmpError::generic(format!("fd '{n}' is not a socket")));
                    }
                    Some(
                        chan.try_clone_fd()
                            .map_err(|e| QmpError::generic(e.to_string()))?,
                    )
                }
                _ => None,
            };
            slog::info!(self.log, "migrate resume"; "uri" => %uri, "adopt" => adopt);
            if adopt {
                let blocks = self.migration_blocks()?;
                self.ctx
                    .offer_recovery(crate::engine::migration::Recovery::Source(uri, fd));
                return self.start_adopt(Role::Source, move |ctx| {
                    crate::engine::source::adopt(ctx, blocks).map_err(|e| e.to_string())
                });
            }
            self.ctx
                .offer_recovery(crate::engine::migration::Recovery::Source(uri, fd));
            return Ok(json!({}));
        }
        self.check_can_start()?;
        let caps = self.ctx.caps();
        if caps.postcopy_preempt {
            if !caps.postcopy_ram {
                return Err(QmpError::generic("Postcopy preempt requires postcopy-ram"));
            }
            if !matches!(uri, Uri::Unix(_) | Uri::Tcp(_)) {
                return Err(QmpError::generic(
                    "Migration requires multi-channel URIs (e.g. tcp): postcopy-preempt needs unix: or tcp:",
                ));
            }
            if self.ctx.params().compat_version == crate::compat::QemuVersion::V7_2 {
                return Err(QmpError::generic(
                    "postcopy-preempt towards QEMU 7.2 is not supported (7.2 takes the second channel at the start)",
                ));
            }
        }
        let blocks = self.migration_blocks()?;
        // Take a passed fd now, so a second migrate cannot race for it.
        let fd = match &uri {
            Uri::Fd(n) => Some(self.take_fd(n).ok_or_else(|| {
                QmpError::generic(format!("File descriptor named '{n}' not found"))
            })?),
            _ => None,
        };
        let chan = match fd {
            Some(fd) => {
                let Uri::Fd(n) = &uri else { unreachable!() };
                Some(Channel::from_fd(n, fd).map_err(|e| QmpError::generic(e.to_string()))?)
            }
            None => None,
        };
        slog::info!(self.log, "migrate"; "uri" => %uri, "blocks" => blocks.len());
        self.start_worker(Role::Source, move |ctx| {
            let chan = match chan {
                Some(c) => c,
                None => Channel::connect(&uri, |_| None, &ctx.cancel).map_err(|e| e.to_string())?,
            }
            .with_cancel(ctx.cancel.clone());
            // Precopy: a destination that stops reading fails the migration after
            // precopy-timeout; only the sending side is timed (the return path may idle).
            chan.set_precopy_timeouts(ctx.precopy_timeout(), false);
            if let Ok(fd) = chan.try_clone_fd() {
                ctx.set_channel(Some(fd));
            }
            crate::engine::source::run(ctx, blocks, chan, uri).map_err(|e| e.to_string())
        })
    }

    fn migrate_incoming(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["uri", "exit-on-error"])?;
        let uri: Uri = a
            .str("uri")?
            .parse()
            .map_err(|e: crate::transport::TransportError| QmpError::generic(e.to_string()))?;
        self.check_can_start()?;
        let caps = self.ctx.caps();
        if caps.postcopy_preempt && !caps.postcopy_ram {
            return Err(QmpError::generic("Postcopy preempt requires postcopy-ram"));
        }
        let blocks = self.migration_blocks()?;
        // Listen now so that a peer may connect as soon as this returns.
        let incoming = Incoming::open(&uri, |n| self.take_fd(n))
            .map_err(|e| QmpError::generic(e.to_string()))?;
        if caps.postcopy_preempt && !incoming.is_listener() {
            return Err(QmpError::generic(
                "Migration requires multi-channel URIs (e.g. tcp): postcopy-preempt needs a listening unix:, tcp: or fd: socket",
            ));
        }
        lock(&self.ctx.device_in).clear();
        slog::info!(self.log, "migrate-incoming"; "uri" => %uri);
        let uffd = match lock(&self.uffd).as_ref() {
            Some(fd) => Some(fd.try_clone().map_err(|e| {
                QmpError::generic(format!("cannot duplicate the userfaultfd: {e}"))
            })?),
            None => None,
        };
        self.start_worker(Role::Destination, move |ctx| {
            // With postcopy-preempt the first connection is the main channel and the next
            // one, later, the preempt channel (QEMU tells them apart by order alone).
            let (chan, preempt) = if caps.postcopy_preempt {
                let c = incoming
                    .accept_another(&ctx.cancel)
                    .map_err(|e| e.to_string())?;
                (c, Some(incoming))
            } else {
                (
                    incoming.accept(&ctx.cancel).map_err(|e| e.to_string())?,
                    None,
                )
            };
            let chan = chan.with_cancel(ctx.cancel.clone());
            // Precopy: a source silent for precopy-timeout (once connected) fails the load.
            chan.set_precopy_timeouts(ctx.precopy_timeout(), true);
            if let Ok(fd) = chan.try_clone_fd() {
                ctx.set_channel(Some(fd));
            }
            crate::engine::destination::run(ctx, blocks, chan, uffd, preempt)
                .map_err(|e| e.to_string())
        })
    }

    fn query_migrate(&self) -> Value {
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
            if r == Role::Destination {
                // Page-fault service latency (fault read -> page placed), in microseconds.
                v["postcopy-latency"] = self.ctx.latency.to_json();
            }
            // Postcopy recovery figures: pauses, and each recovery's time (new channel ->
            // postcopy-active) in milliseconds.
            v["postcopy-pauses"] = json!(self.ctx.pauses.load(Ordering::Relaxed));
            v["postcopy-recoveries-ms"] = json!(*lock(&self.ctx.recoveries));
        }
        if st == MigrationStatus::Failed {
            if let Some(e) = self.ctx.state.error_desc() {
                v["error-desc"] = json!(e);
            }
        }
        v
    }
}
