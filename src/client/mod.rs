//! Client side of the helper's control protocol: what a VMM (or a test, or the `demo`) uses
//! to drive a `qemu-migration-helper` process.
//!
//! The protocol is a dialect of QMP carried over one `AF_UNIX` stream socket (see
//! `docs/control-protocol.md`): one JSON object per line, a greeting from the helper,
//! `qmp_capabilities` before anything else, commands answered by replies carrying the same
//! `id`, and asynchronous events interleaved with replies. File descriptors (guest RAM, dirty
//! bitmaps, migration sockets, userfaultfd) are passed with `getfd`, attached as
//! `SCM_RIGHTS` to the very message that carries the command.
//!
//! [`HelperClient`] does the framing, the handshake, the fd passing and the bookkeeping of
//! events that arrive while a command is in flight; it never panics on what the helper sends
//! (a malformed line is a [`ClientError::Protocol`]) and never blocks for longer than its
//! timeout (see [`HelperClient::set_timeout`]).
//!
//! # Example: a VMM migrating its guest RAM out through a source helper
//!
//! ```no_run
//! use std::os::unix::net::UnixStream;
//! use std::path::Path;
//! use std::time::Duration;
//!
//! use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
//! use qemu_migration_helper::client::{HelperClient, RamBlockSpec};
//! use serde_json::json;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     const RAM_SIZE: u64 = 512 << 20;
//!
//!     // The guest RAM lives in a memfd that the VMM maps for its vCPUs; the helper maps
//!     // the same pages MAP_SHARED, so nothing is copied.
//!     let ram = memfd_create(c"guest-ram", MemFdCreateFlag::MFD_CLOEXEC)?;
//!     nix::unistd::ftruncate(&ram, RAM_SIZE as i64)?;
//!
//!     // Spawn the helper on a socketpair (it gets `--control-fd N`); the handshake is done.
//!     let (mut helper, mut child) = HelperClient::spawn(
//!         Path::new("/usr/libexec/qemu-migration-helper"),
//!         &["--log-format", "json"],
//!     )?;
//!
//!     // Hand over the guest RAM and describe it as QEMU's `-M pc` would (`pc.ram`).
//!     helper.getfd("ram0", &ram)?;
//!     helper.ram_block_add(&RamBlockSpec {
//!         id: "pc.ram".into(),
//!         fdname: "ram0".into(),
//!         offset: 0,
//!         size: RAM_SIZE,
//!         page_size: None,
//!         host_addr: None,
//!         // A running guest would also pass a dirty bitmap memfd here
//!         // (`getfd` it first, then name it).
//!         dirty_bitmap: None,
//!     })?;
//!
//!     // The connection to the destination (a QEMU, or another helper running
//!     // `migrate-incoming`), passed to the helper as `fd:mig`.
//!     let mig = UnixStream::connect("/run/vm42/incoming.sock")?;
//!     helper.getfd("mig", &mig)?;
//!     drop(mig); // the helper holds its own copy now
//!
//!     helper.set_capabilities(&[("events", true)])?;
//!     helper.set_parameters(json!({
//!         "max-bandwidth": 1_000_000_000u64,
//!         "downtime-limit": 300,
//!         "machine-type": "pc-q35-10.0",
//!     }))?;
//!     helper.migrate("fd:mig")?;
//!
//!     let info = helper.wait_for_status(&["completed"], Duration::from_secs(600))?;
//!     println!("migrated {} bytes", info["ram"]["transferred"]);
//!     for ev in helper.take_events() {
//!         println!("event {} {}", ev.name, ev.data);
//!     }
//!
//!     helper.quit()?;
//!     child.wait()?;
//!     Ok(())
//! }
//! ```

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::Serialize;
use serde_json::{json, Map, Value};

/// Default time to wait for the greeting or for the reply to a command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time [`HelperClient::connect`] keeps retrying while the socket does not exist yet
/// or nobody listens on it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest line accepted from the helper (device state can be large, but not this large).
const MAX_LINE: usize = 256 << 20;

/// Events kept while nobody takes them; beyond this the oldest are dropped.
const MAX_QUEUED_EVENTS: usize = 65536;

/// Interval at which [`HelperClient::wait_for_status`] polls `query-migrate`.
const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Anything that can go wrong while driving a helper.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A system call failed (spawning, connecting, reading or writing the control socket).
    #[error("{context}: {source}")]
    Io {
        /// What the client was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The helper sent something that is not the protocol: a malformed line, a bad
    /// greeting, a reply to a command never sent, or it closed the connection.
    #[error("control protocol error: {0}")]
    Protocol(String),
    /// The helper answered a command with an error reply.
    #[error("{command}: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QMP error class (normally `GenericError`).
        class: String,
        /// Human-readable description from the helper.
        desc: String,
    },
    /// The migration entered state `failed` (while waiting for another state).
    #[error("migration failed: {desc}")]
    MigrationFailed {
        /// The helper's `error-desc`.
        desc: String,
    },
    /// A deadline passed.
    #[error("timed out waiting for {what}{}", last_status.as_ref().map(|s| format!(" (last status: {s})")).unwrap_or_default())]
    Timeout {
        /// What the client was waiting for.
        what: String,
        /// For [`HelperClient::wait_for_status`]: the last migration status seen.
        last_status: Option<String>,
    },
}

impl ClientError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        ClientError::Io {
            context: context.into(),
            source,
        }
    }
}

/// An asynchronous event from the helper, e.g. `MIGRATION {"status": "active"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name (`MIGRATION`, `MIGRATION_PASS`, ...).
    pub name: String,
    /// The `data` member (`Value::Null` if the event had none).
    pub data: Value,
    /// `(seconds, microseconds)` since the Unix epoch, as sent by the helper.
    pub timestamp: (u64, u32),
}

/// One RAM block for `ram-block-add` (see [`HelperClient::ram_block_add`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamBlockSpec {
    /// RAMBlock idstr sent on the wire (`ram` for QEMU's `-M none`, `pc.ram` for `-M pc`).
    pub id: String,
    /// Name (given to `getfd`) of the fd holding the block's memory.
    pub fdname: String,
    /// Offset of the block in that fd.
    pub offset: u64,
    /// Size of the block in bytes.
    pub size: u64,
    /// Page size; default: the fd's page size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Address at which the parent mapped the block (postcopy on the destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_addr: Option<u64>,
    /// Name (given to `getfd`) of the block's dirty bitmap memfd (source with a running guest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_bitmap: Option<String>,
}

/// A parsed line from the helper.
enum Message {
    Event(Event),
    Reply {
        id: Option<Value>,
        result: Result<Value, (String, String)>,
    },
}

/// A control connection to one helper, after the QMP handshake.
///
/// Commands are synchronous: each `execute*` call sends one command and reads until the reply
/// with its id, queuing the events that arrive meanwhile (see [`HelperClient::take_events`]
/// and [`HelperClient::wait_event`]).
#[derive(Debug)]
pub struct HelperClient {
    stream: UnixStream,
    /// Bytes read but not yet returned as lines.
    rbuf: Vec<u8>,
    /// How much of `rbuf` is known to contain no newline.
    scanned: usize,
    events: VecDeque<Event>,
    greeting: Value,
    next_id: u64,
    timeout: Duration,
    oob: bool,
    /// The helper closed the connection (EOF, EPIPE, ECONNRESET).
    closed: bool,
}

impl HelperClient {
    /// Spawns `binary --control-fd N args...` with one end of a fresh socketpair as fd `N`,
    /// and does the handshake. The child's stdin is `/dev/null`; stdout and stderr are
    /// inherited. If the handshake fails the child is killed and reaped.
    pub fn spawn(binary: &Path, args: &[&str]) -> Result<(HelperClient, Child), ClientError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| ClientError::io("creating the control socketpair", e.into()))?;
        let child_fd: RawFd = theirs.as_raw_fd();

        let mut cmd = Command::new(binary);
        cmd.arg("--control-fd")
            .arg(child_fd.to_string())
            .args(args)
            .stdin(Stdio::null());
        // SAFETY: the closure only calls fcntl(2), which is async-signal-safe, on an fd that
        // is open in the forked child (it is the same fd table as ours at fork time).
        unsafe {
            cmd.pre_exec(move || {
                // Keep the child's end across exec; it is CLOEXEC everywhere else, so
                // children spawned concurrently by other threads never inherit it.
                if libc::fcntl(child_fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ClientError::io(format!("spawning {}", binary.display()), e))?;
        drop(theirs);

        match Self::from_stream(UnixStream::from(ours)) {
            Ok(client) => Ok((client, child)),
            Err(err) => {
                // A helper that exited closes its end before it becomes reapable: give it
                // a moment so that its own exit status, not our SIGKILL, is reported.
                let grace = Instant::now() + Duration::from_millis(500);
                let status = loop {
                    match child.try_wait() {
                        Ok(Some(status)) => break Some(status),
                        Ok(None) if Instant::now() < grace => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        _ => {
                            let _ = child.kill();
                            break child.wait().ok();
                        }
                    }
                };
                Err(match (err, status) {
                    (ClientError::Protocol(msg), Some(status)) => {
                        ClientError::Protocol(format!("{msg} (helper {status})"))
                    }
                    (err, _) => err,
                })
            }
        }
    }

    /// Connects to a helper started with `--control-socket PATH` and does the handshake.
    /// Retries for up to [`DEFAULT_CONNECT_TIMEOUT`] while the socket does not exist yet or
    /// refuses connections (the helper may still be starting).
    pub fn connect(path: &Path) -> Result<HelperClient, ClientError> {
        Self::connect_timeout(path, DEFAULT_CONNECT_TIMEOUT)
    }

    /// [`HelperClient::connect`] with an explicit retry deadline.
    pub fn connect_timeout(path: &Path, timeout: Duration) -> Result<HelperClient, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Self::from_stream(stream),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound
                            | io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(ClientError::io(
                        format!("connecting to {}", path.display()),
                        e,
                    ))
                }
            }
        }
    }

    /// Wraps an already connected control socket and does the handshake: reads the greeting
    /// and sends `qmp_capabilities` (enabling `oob` if the helper offers it).
    /// Closes the control connection without `quit`, as a parent that goes away would.
    /// Later calls fail with a protocol error.
    pub fn disconnect(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.closed = true;
    }

    pub fn from_stream(stream: UnixStream) -> Result<HelperClient, ClientError> {
        stream
            .set_nonblocking(false)
            .map_err(|e| ClientError::io("configuring the control socket", e))?;
        let mut client = HelperClient {
            stream,
            rbuf: Vec::new(),
            scanned: 0,
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
            oob: false,
            closed: false,
        };
        client.set_timeout(DEFAULT_TIMEOUT)?;
        client.handshake()?;
        Ok(client)
    }

    fn handshake(&mut self) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.timeout;
        let line = loop {
            match self.read_line(deadline)? {
                None => {
                    return Err(ClientError::Timeout {
                        what: "the QMP greeting".into(),
                        last_status: None,
                    })
                }
                Some(line) if is_blank(&line) => continue,
                Some(line) => break line,
            }
        };
        let greeting: Value = serde_json::from_slice(&line).map_err(|e| {
            ClientError::Protocol(format!("bad greeting {}: {e}", show_line(&line)))
        })?;
        let qmp = match greeting.get("QMP") {
            Some(qmp @ Value::Object(_)) => qmp,
            _ => {
                return Err(ClientError::Protocol(format!(
                    "expected a QMP greeting, got {}",
                    show_line(&line)
                )))
            }
        };
        let offers_oob = qmp
            .get("capabilities")
            .and_then(Value::as_array)
            .is_some_and(|caps| caps.iter().any(|c| c == "oob"));
        self.greeting = greeting;
        let args = if offers_oob {
            json!({"enable": ["oob"]})
        } else {
            Value::Null
        };
        self.execute("qmp_capabilities", args)?;
        self.oob = offers_oob;
        Ok(())
    }

    /// The greeting the helper sent, the whole object: `{"QMP": {"version": ..., ...}}`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Whether out-of-band execution was negotiated in the handshake.
    pub fn oob_enabled(&self) -> bool {
        self.oob
    }

    /// The current timeout for greetings, replies and writes.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets how long to wait for a reply (and for a write to go through) before giving up
    /// with [`ClientError::Timeout`]. Default [`DEFAULT_TIMEOUT`]. A reply that arrives after
    /// its command timed out is recognised by its id and skipped.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| ClientError::io("setting the control socket's write timeout", e))?;
        self.timeout = timeout;
        Ok(())
    }

    // ---------------------------------------------------------------- raw commands

    /// Runs `cmd` with `args` (a JSON object, or `Value::Null` for none) and returns the
    /// `return` member of its reply. Events arriving before the reply are queued.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, ClientError> {
        self.execute_inner(cmd, args, false, None)
    }

    /// Like [`HelperClient::execute`], with `"control": {"run-oob": true}`.
    pub fn execute_oob(&mut self, cmd: &str, args: Value) -> Result<Value, ClientError> {
        self.execute_inner(cmd, args, true, None)
    }

    /// Like [`HelperClient::execute`], with `fd` attached (`SCM_RIGHTS`) to the message that
    /// carries the command. The helper gets its own copy; the caller keeps `fd`.
    pub fn execute_with_fd(
        &mut self,
        cmd: &str,
        args: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, ClientError> {
        self.execute_inner(cmd, args, false, Some(fd))
    }

    fn execute_inner(
        &mut self,
        cmd: &str,
        args: Value,
        oob: bool,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(cmd.into()));
        if !args.is_null() {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), Value::from(id));
        if oob {
            msg.insert("control".into(), json!({"run-oob": true}));
        }
        let mut line = serde_json::to_vec(&Value::Object(msg))
            .map_err(|e| ClientError::Protocol(format!("cannot encode {cmd}: {e}")))?;
        line.push(b'\n');
        self.send(cmd, &line, fd)?;
        self.wait_reply(cmd, id)
    }

    /// Writes `buf`; the first `sendmsg` carries `fd` if any. MSG_NOSIGNAL so that a dead
    /// helper is an EPIPE error, never a SIGPIPE.
    fn send(
        &mut self,
        cmd: &str,
        buf: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ClientError> {
        let raw_fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw_fds)];
        let mut cmsgs: &[ControlMessage<'_>] = if raw_fds.is_empty() { &[] } else { &rights };
        let mut sent = 0;
        while sent < buf.len() {
            let iov = [IoSlice::new(&buf[sent..])];
            match sendmsg::<UnixAddr>(
                self.stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => {
                    sent += n;
                    // The fd went with the first byte(s); never send it twice.
                    cmsgs = &[];
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    return Err(ClientError::Timeout {
                        what: format!("the helper to accept command {cmd}"),
                        last_status: None,
                    })
                }
                Err(e) => {
                    if matches!(e, Errno::EPIPE | Errno::ECONNRESET) {
                        self.closed = true;
                    }
                    return Err(ClientError::io(format!("sending {cmd}"), e.into()));
                }
            }
        }
        Ok(())
    }

    fn wait_reply(&mut self, cmd: &str, id: u64) -> Result<Value, ClientError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let Some(line) = self.read_line(deadline)? else {
                return Err(ClientError::Timeout {
                    what: format!("the reply to {cmd}"),
                    last_status: None,
                });
            };
            match parse_message(&line)? {
                None => continue,
                Some(Message::Event(ev)) => self.queue_event(ev),
                Some(Message::Reply {
                    id: reply_id,
                    result,
                }) => {
                    match reply_id {
                        Some(ref v) if v.as_u64() == Some(id) => {}
                        // An error reply without id: the helper could not even parse the
                        // command's id (QMP does this for malformed input); it is ours.
                        None if result.is_err() => {}
                        Some(ref v) if v.as_u64().is_some_and(|old| old < id) => {
                            // Late reply to a command that timed out earlier.
                            continue;
                        }
                        _ => {
                            return Err(ClientError::Protocol(format!(
                                "reply {} while waiting for the reply to {cmd} (id {id})",
                                show_line(&line)
                            )))
                        }
                    }
                    return result.map_err(|(class, desc)| ClientError::Command {
                        command: cmd.into(),
                        class,
                        desc,
                    });
                }
            }
        }
    }

    /// Reads one line (without its newline). `Ok(None)` when `deadline` passed first.
    fn read_line(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            if let Some(pos) = self.rbuf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let mut line: Vec<u8> = self.rbuf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return Ok(Some(line));
            }
            self.scanned = self.rbuf.len();
            if self.rbuf.len() > MAX_LINE {
                return Err(ClientError::Protocol(format!(
                    "line longer than {MAX_LINE} bytes from the helper"
                )));
            }
            if self.closed {
                return Err(closed_error());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(wait))
                .map_err(|e| ClientError::io("setting the control socket's read timeout", e))?;
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    if !self.rbuf.is_empty() {
                        return Err(ClientError::Protocol(format!(
                            "the helper closed the control connection in the middle of a line: {}",
                            show_line(&self.rbuf)
                        )));
                    }
                    return Err(closed_error());
                }
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    if e.kind() == io::ErrorKind::ConnectionReset {
                        self.closed = true;
                    }
                    return Err(ClientError::io("reading the control socket", e));
                }
            }
        }
    }

    fn queue_event(&mut self, ev: Event) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    /// Reads whatever the helper sends until `deadline`, or until `stop` matches an event
    /// (which is then returned rather than queued). Replies to nothing in flight are stale
    /// (their command timed out) and skipped.
    fn pump(
        &mut self,
        deadline: Instant,
        mut stop: impl FnMut(&Event) -> bool,
    ) -> Result<Option<Event>, ClientError> {
        while let Some(line) = self.read_line(deadline)? {
            match parse_message(&line)? {
                None => {}
                Some(Message::Event(ev)) => {
                    if stop(&ev) {
                        return Ok(Some(ev));
                    }
                    self.queue_event(ev);
                }
                Some(Message::Reply { id, .. }) => {
                    let stale = id
                        .as_ref()
                        .and_then(Value::as_u64)
                        .is_some_and(|old| old < self.next_id);
                    if !stale {
                        return Err(ClientError::Protocol(format!(
                            "reply {} with no command in flight",
                            show_line(&line)
                        )));
                    }
                }
            }
        }
        Ok(None)
    }

    // ---------------------------------------------------------------- events

    /// Removes and returns every queued event, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Returns the first event (already queued, or read within `timeout`) for which `pred`
    /// holds, removing it from the queue. Events that do not match stay queued, in order.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event, ClientError> {
        if let Some(pos) = self.events.iter().position(&mut pred) {
            return Ok(self.events.remove(pos).expect("index from position"));
        }
        let deadline = Instant::now() + timeout;
        match self.pump(deadline, pred)? {
            Some(ev) => Ok(ev),
            None => Err(ClientError::Timeout {
                what: "an event".into(),
                last_status: None,
            }),
        }
    }

    /// Polls `query-migrate` (every ~10 ms, queuing events meanwhile) until its `status` is
    /// one of `wanted`, and returns that `query-migrate` result. Fails with
    /// [`ClientError::MigrationFailed`] if the status becomes `failed` (unless `failed` is
    /// wanted), and with [`ClientError::Timeout`] naming the last status at the deadline.
    pub fn wait_for_status(
        &mut self,
        wanted: &[&str],
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            let status = info
                .get("status")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ClientError::Protocol(format!("query-migrate without a status: {info}"))
                })?
                .to_owned();
            if wanted.contains(&status.as_str()) {
                return Ok(info);
            }
            if status == "failed" {
                let desc = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("(no error-desc)")
                    .to_owned();
                return Err(ClientError::MigrationFailed { desc });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout {
                    what: format!("migration status {}", wanted.join("|")),
                    last_status: Some(status),
                });
            }
            self.pump((now + STATUS_POLL_INTERVAL).min(deadline), |_| false)?;
        }
    }

    // ---------------------------------------------------------------- fds

    /// `getfd {"fdname": name}` with `fd` attached. The caller keeps its own `fd`.
    pub fn getfd(&mut self, name: &str, fd: impl AsFd) -> Result<(), ClientError> {
        self.execute_with_fd("getfd", json!({"fdname": name}), fd.as_fd())
            .map(drop)
    }

    /// `closefd {"fdname": name}`.
    pub fn closefd(&mut self, name: &str) -> Result<(), ClientError> {
        self.execute("closefd", json!({"fdname": name})).map(drop)
    }

    // ---------------------------------------------------------------- typed commands

    /// `ram-block-add` (the fd and the dirty bitmap must have been passed with `getfd`).
    pub fn ram_block_add(&mut self, spec: &RamBlockSpec) -> Result<(), ClientError> {
        let args = serde_json::to_value(spec)
            .map_err(|e| ClientError::Protocol(format!("cannot encode ram-block-add: {e}")))?;
        self.execute("ram-block-add", args).map(drop)
    }

    /// `query-ram-blocks`.
    pub fn query_ram_blocks(&mut self) -> Result<Value, ClientError> {
        self.execute("query-ram-blocks", Value::Null)
    }

    /// `userfaultfd-set {"fdname": name}` (the userfaultfd passed with `getfd`).
    pub fn userfaultfd_set(&mut self, fdname: &str) -> Result<(), ClientError> {
        self.execute("userfaultfd-set", json!({"fdname": fdname}))
            .map(drop)
    }

    /// `migrate-set-capabilities` with `(capability, state)` pairs.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), ClientError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(name, state)| json!({"capability": name, "state": state}))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
            .map(drop)
    }

    /// `query-migrate-capabilities`.
    pub fn query_capabilities(&mut self) -> Result<Value, ClientError> {
        self.execute("query-migrate-capabilities", Value::Null)
    }

    /// `migrate-set-parameters` with `params` as the arguments object, e.g.
    /// `json!({"max-bandwidth": 1e9 as u64, "compat-version": "7.2"})`.
    pub fn set_parameters(&mut self, params: Value) -> Result<(), ClientError> {
        self.execute("migrate-set-parameters", params).map(drop)
    }

    /// `query-migrate-parameters`.
    pub fn query_parameters(&mut self) -> Result<Value, ClientError> {
        self.execute("query-migrate-parameters", Value::Null)
    }

    /// `migrate {"uri": uri}` (outgoing migration; `fd:NAME`, `unix:`, `tcp:`, `file:`).
    pub fn migrate(&mut self, uri: &str) -> Result<(), ClientError> {
        self.execute("migrate", json!({"uri": uri})).map(drop)
    }

    /// `migrate {"uri": uri, "resume": true}` (resume a paused postcopy on the source).
    pub fn migrate_resume(&mut self, uri: &str) -> Result<(), ClientError> {
        self.execute("migrate", json!({"uri": uri, "resume": true}))
            .map(drop)
    }

    /// `migrate-incoming {"uri": uri}` (destination).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), ClientError> {
        self.execute("migrate-incoming", json!({"uri": uri}))
            .map(drop)
    }

    /// `migrate-recover {"uri": uri}` (a paused postcopy on the destination).
    pub fn migrate_recover(&mut self, uri: &str) -> Result<(), ClientError> {
        self.execute("migrate-recover", json!({"uri": uri}))
            .map(drop)
    }

    /// `migrate_cancel`.
    pub fn migrate_cancel(&mut self) -> Result<(), ClientError> {
        self.execute("migrate_cancel", Value::Null).map(drop)
    }

    /// `migrate-continue {"state": "pre-switchover"}`.
    pub fn migrate_continue(&mut self) -> Result<(), ClientError> {
        self.execute("migrate-continue", json!({"state": "pre-switchover"}))
            .map(drop)
    }

    /// `migrate-start-postcopy`.
    pub fn migrate_start_postcopy(&mut self) -> Result<(), ClientError> {
        self.execute("migrate-start-postcopy", Value::Null)
            .map(drop)
    }

    /// `migrate-pause`.
    pub fn migrate_pause(&mut self) -> Result<(), ClientError> {
        self.execute("migrate-pause", Value::Null).map(drop)
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<Value, ClientError> {
        self.execute("query-migrate", Value::Null)
    }

    /// `query-device-state` (destination: the device sections received, in order).
    pub fn query_device_state(&mut self) -> Result<Value, ClientError> {
        self.execute("query-device-state", Value::Null)
    }

    /// `device-state-set {"sections": sections}` (source: the device sections to send at
    /// switchover; `sections` is the JSON array described in the protocol).
    pub fn device_state_set(&mut self, sections: Value) -> Result<(), ClientError> {
        self.execute("device-state-set", json!({ "sections": sections }))
            .map(drop)
    }

    /// `quit`. Succeeds also if the helper closes the connection instead of replying.
    pub fn quit(&mut self) -> Result<(), ClientError> {
        match self.execute("quit", Value::Null) {
            Ok(_) => Ok(()),
            Err(_) if self.closed => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn closed_error() -> ClientError {
    ClientError::Protocol("the helper closed the control connection".into())
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// A line for an error message: lossy UTF-8, shortened.
fn show_line(line: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&line[..line.len().min(MAX)]);
    if line.len() > MAX {
        format!("{text:?}... ({} bytes)", line.len())
    } else {
        format!("{text:?}")
    }
}

/// Parses one line from the helper. `Ok(None)` for a blank line.
fn parse_message(line: &[u8]) -> Result<Option<Message>, ClientError> {
    if is_blank(line) {
        return Ok(None);
    }
    let bad = |why: &str| ClientError::Protocol(format!("{why}: {}", show_line(line)));
    let value: Value = serde_json::from_slice(line).map_err(|_| bad("not JSON"))?;
    let Value::Object(mut obj) = value else {
        return Err(bad("not a JSON object"));
    };
    if let Some(name) = obj.get("event") {
        let name = name
            .as_str()
            .ok_or_else(|| bad("event name is not a string"))?
            .to_owned();
        let ts = obj
            .get("timestamp")
            .ok_or_else(|| bad("event without timestamp"))?;
        let seconds = ts.get("seconds").and_then(Value::as_u64);
        let micros = ts
            .get("microseconds")
            .and_then(Value::as_u64)
            .and_then(|u| u32::try_from(u).ok());
        let (Some(seconds), Some(micros)) = (seconds, micros) else {
            return Err(bad("bad event timestamp"));
        };
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(Some(Message::Event(Event {
            name,
            data,
            timestamp: (seconds, micros),
        })));
    }
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Ok(Some(Message::Reply {
            id,
            result: Ok(ret),
        }));
    }
    if let Some(err) = obj.get("error") {
        let class = err.get("class").and_then(Value::as_str);
        let desc = err.get("desc").and_then(Value::as_str);
        let (Some(class), Some(desc)) = (class, desc) else {
            return Err(bad("malformed error reply"));
        };
        return Ok(Some(Message::Reply {
            id,
            result: Err((class.to_owned(), desc.to_owned())),
        }));
    }
    if obj.contains_key("QMP") {
        return Err(bad("unexpected second greeting"));
    }
    Err(bad("neither a reply nor an event"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use nix::sys::stat::fstat;
    use std::io::{IoSliceMut, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::thread::JoinHandle;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "qemu-migration-helper 0.1.0"}, "capabilities": ["oob"]}}"#;

    /// The scripted helper side: reads lines with recvmsg, collecting any passed fds.
    struct Peer {
        sock: UnixStream,
        buf: Vec<u8>,
        /// Fds received, each with the bytes of the recvmsg that carried it.
        fds: Vec<(OwnedFd, Vec<u8>)>,
    }

    impl Peer {
        fn new(sock: UnixStream) -> Self {
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            Peer {
                sock,
                buf: Vec::new(),
                fds: Vec::new(),
            }
        }

        fn send(&mut self, line: &str) {
            self.sock.write_all(line.as_bytes()).unwrap();
            self.sock.write_all(b"\n").unwrap();
        }

        /// Reads one command; `None` at EOF.
        fn recv(&mut self) -> Option<Value> {
            loop {
                if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=pos).collect();
                    return Some(serde_json::from_slice(&line).unwrap());
                }
                let mut data = [0u8; 4096];
                let mut cmsg = nix::cmsg_space!([RawFd; 4]);
                let (n, got) = {
                    let mut iov = [IoSliceMut::new(&mut data)];
                    let msg = recvmsg::<UnixAddr>(
                        self.sock.as_raw_fd(),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    )
                    .unwrap();
                    let mut got = Vec::new();
                    for c in msg.cmsgs().unwrap() {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            got.extend(fds);
                        }
                    }
                    (msg.bytes, got)
                };
                for fd in got {
                    // SAFETY: freshly received, owned by nobody else.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    self.fds.push((fd, data[..n].to_vec()));
                }
                if n == 0 {
                    return None;
                }
                self.buf.extend_from_slice(&data[..n]);
            }
        }

        /// Reads one command, checks its name, returns (id, arguments).
        fn expect(&mut self, name: &str) -> (Value, Value) {
            let cmd = self.recv().expect("command");
            assert_eq!(cmd["execute"], name, "{cmd}");
            (
                cmd["id"].clone(),
                cmd.get("arguments").cloned().unwrap_or(Value::Null),
            )
        }

        fn reply(&mut self, id: &Value, ret: Value) {
            self.send(&json!({"return": ret, "id": id}).to_string());
        }

        fn handshake(&mut self) {
            self.send(GREETING);
            let (id, args) = self.expect("qmp_capabilities");
            assert_eq!(args, json!({"enable": ["oob"]}));
            self.reply(&id, json!({}));
        }
    }

    fn event(name: &str, data: Value) -> String {
        json!({"event": name, "data": data, "timestamp": {"seconds": 1700000000u64, "microseconds": 42}})
            .to_string()
    }

    /// A client connected to a scripted peer running `script` in a thread.
    fn with_peer<F>(script: F) -> (HelperClient, JoinHandle<()>)
    where
        F: FnOnce(&mut Peer) + Send + 'static,
    {
        let (a, b) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut peer = Peer::new(b);
            peer.handshake();
            script(&mut peer);
        });
        let client = HelperClient::from_stream(a).unwrap();
        (client, peer)
    }

    #[test]
    fn handshake_stores_greeting_and_enables_oob() {
        let (mut client, peer) = with_peer(|p| {
            let (id, args) = p.expect("query-migrate");
            assert_eq!(args, Value::Null);
            p.reply(&id, json!({"status": "none"}));
        });
        assert_eq!(client.greeting()["QMP"]["version"]["qemu"]["major"], 10);
        assert!(client.oob_enabled());
        assert_eq!(client.query_migrate().unwrap()["status"], "none");
        peer.join().unwrap();
    }

    #[test]
    fn command_encoding() {
        let (mut client, peer) = with_peer(|p| {
            let cmd = p.recv().unwrap();
            assert_eq!(cmd["execute"], "migrate-pause");
            assert_eq!(cmd["control"], json!({"run-oob": true}));
            assert!(cmd.get("arguments").is_none());
            p.reply(&cmd["id"], json!({}));

            let (id, args) = p.expect("migrate-set-capabilities");
            assert_eq!(
                args,
                json!({"capabilities": [
                    {"capability": "postcopy-ram", "state": true},
                    {"capability": "events", "state": false}]})
            );
            p.reply(&id, json!({}));

            let (id, args) = p.expect("ram-block-add");
            assert_eq!(
                args,
                json!({"id": "pc.ram", "fdname": "ram0", "offset": 0, "size": 4096,
                       "host-addr": 140000000000u64})
            );
            p.reply(&id, json!({}));

            let (id, args) = p.expect("migrate");
            assert_eq!(args, json!({"uri": "unix:/x", "resume": true}));
            p.reply(&id, json!({}));

            let (id, args) = p.expect("migrate-continue");
            assert_eq!(args, json!({"state": "pre-switchover"}));
            p.reply(&id, json!({}));

            let (id, args) = p.expect("migrate_cancel");
            assert_eq!(args, Value::Null);
            p.reply(&id, json!({}));

            let (id, args) = p.expect("device-state-set");
            assert_eq!(args, json!({"sections": [{"raw": "AAEC"}]}));
            p.reply(&id, json!({}));
        });
        client.execute_oob("migrate-pause", Value::Null).unwrap();
        client
            .set_capabilities(&[("postcopy-ram", true), ("events", false)])
            .unwrap();
        client
            .ram_block_add(&RamBlockSpec {
                id: "pc.ram".into(),
                fdname: "ram0".into(),
                offset: 0,
                size: 4096,
                host_addr: Some(140000000000),
                ..Default::default()
            })
            .unwrap();
        client.migrate_resume("unix:/x").unwrap();
        client.migrate_continue().unwrap();
        client.migrate_cancel().unwrap();
        client.device_state_set(json!([{"raw": "AAEC"}])).unwrap();
        peer.join().unwrap();
    }

    #[test]
    fn events_before_reply_are_queued() {
        let (mut client, peer) = with_peer(|p| {
            let (id, _) = p.expect("migrate");
            p.send(&event("MIGRATION", json!({"status": "setup"})));
            p.send("");
            p.send(&event("MIGRATION_PASS", json!({"pass": 1})));
            p.reply(&id, json!({}));
            p.send(r#"{"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 6}}"#);
            p.send(&event("MIGRATION", json!({"status": "active"})));
            p.send(&event("MIGRATION", json!({"status": "completed"})));
        });
        client.migrate("fd:mig").unwrap();
        let evs = client.take_events();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].name, "MIGRATION");
        assert_eq!(evs[0].data, json!({"status": "setup"}));
        assert_eq!(evs[0].timestamp, (1700000000, 42));
        assert_eq!(evs[1].name, "MIGRATION_PASS");
        assert!(client.take_events().is_empty());

        let ev = client
            .wait_event(Duration::from_secs(5), |e| e.data["status"] == "completed")
            .unwrap();
        assert_eq!(ev.name, "MIGRATION");
        let rest = client.take_events();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].name, "STOP");
        assert_eq!(rest[0].data, Value::Null);
        assert_eq!(rest[0].timestamp, (5, 6));
        assert_eq!(rest[1].data, json!({"status": "active"}));
        peer.join().unwrap();

        // Nothing more will come: the wait times out (the peer is gone: EOF is an error).
        let err = client
            .wait_event(Duration::from_millis(50), |_| true)
            .unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    }

    #[test]
    fn wait_event_takes_queued_events_first_and_times_out() {
        let (a, b) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut p = Peer::new(b);
            p.handshake();
            let (id, _) = p.expect("query-migrate");
            p.send(&event("A", json!(1)));
            p.send(&event("B", json!(2)));
            p.send(&event("C", json!(3)));
            p.reply(&id, json!({"status": "active"}));
            // Keep the socket open until the client is done.
            assert!(p.recv().is_none());
        });
        let mut client = HelperClient::from_stream(a).unwrap();
        client.query_migrate().unwrap();
        let b = client
            .wait_event(Duration::from_secs(1), |e| e.name == "B")
            .unwrap();
        assert_eq!(b.data, json!(2));
        let start = Instant::now();
        let err = client
            .wait_event(Duration::from_millis(100), |e| e.name == "D")
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        assert!(start.elapsed() >= Duration::from_millis(100));
        let names: Vec<String> = client.take_events().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["A", "C"]);
        drop(client);
        peer.join().unwrap();
    }

    #[test]
    fn error_reply_is_command_error() {
        let (mut client, peer) = with_peer(|p| {
            let (id, _) = p.expect("migrate-incoming");
            p.send(
                &json!({"error": {"class": "GenericError", "desc": "no such fd 'x'"}, "id": id})
                    .to_string(),
            );
            // An error without id (the helper could not parse the command) is ours too.
            let _ = p.expect("bogus");
            p.send(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#);
            let (id, _) = p.expect("query-migrate");
            p.reply(&id, json!({"status": "none"}));
        });
        match client.migrate_incoming("fd:x").unwrap_err() {
            ClientError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "migrate-incoming");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "no such fd 'x'");
            }
            e => panic!("unexpected {e:?}"),
        }
        let err = client.execute("bogus", json!({})).unwrap_err();
        assert!(matches!(err, ClientError::Command { .. }), "{err}");
        // The connection is still usable.
        assert_eq!(client.query_migrate().unwrap()["status"], "none");
        peer.join().unwrap();
    }

    #[test]
    fn garbage_is_protocol_error() {
        for garbage in [
            "this is not json",
            "[1, 2, 3]",
            r#"{"neither": 1}"#,
            r#"{"error": "not an object"}"#,
            r#"{"event": 5, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
            r#"{"event": "X", "timestamp": {"seconds": -1, "microseconds": 2}}"#,
            r#"{"event": "X"}"#,
            "\u{fffd}\u{0}\u{1}",
        ] {
            let (mut client, peer) = with_peer(move |p| {
                let _ = p.expect("query-migrate");
                p.send(garbage);
            });
            let err = client.query_migrate().unwrap_err();
            assert!(matches!(err, ClientError::Protocol(_)), "{garbage}: {err}");
            peer.join().unwrap();
        }
        // Invalid UTF-8 and a reply with a foreign id.
        let (mut client, peer) = with_peer(|p| {
            let _ = p.expect("query-migrate");
            p.sock.write_all(b"\xff\xfe{\n").unwrap();
        });
        assert!(matches!(
            client.query_migrate(),
            Err(ClientError::Protocol(_))
        ));
        peer.join().unwrap();
        let (mut client, peer) = with_peer(|p| {
            let _ = p.expect("query-migrate");
            p.send(r#"{"return": {}, "id": "someone-else"}"#);
        });
        assert!(matches!(
            client.query_migrate(),
            Err(ClientError::Protocol(_))
        ));
        peer.join().unwrap();
    }

    #[test]
    fn bad_handshakes() {
        for (greeting, reply_caps) in [
            (Some("garbage"), false),
            (Some(r#"{"return": {}}"#), false),
            (None, false),
            (Some(GREETING), true),
        ] {
            let (a, b) = UnixStream::pair().unwrap();
            let peer = std::thread::spawn(move || {
                let mut p = Peer::new(b);
                if let Some(g) = greeting {
                    p.send(g);
                }
                if reply_caps {
                    let (id, _) = p.expect("qmp_capabilities");
                    p.send(
                        &json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id})
                            .to_string(),
                    );
                }
            });
            let err = HelperClient::from_stream(a).unwrap_err();
            if reply_caps {
                assert!(matches!(err, ClientError::Command { .. }), "{err}");
            } else {
                assert!(matches!(err, ClientError::Protocol(_)), "{err}");
            }
            peer.join().unwrap();
        }
    }

    #[test]
    fn reply_timeout_then_late_reply_is_skipped() {
        let (mut client, peer) = with_peer(|p| {
            let (late_id, _) = p.expect("query-migrate");
            let (id, _) = p.expect("query-migrate");
            p.reply(&late_id, json!({"status": "stale"}));
            p.reply(&id, json!({"status": "fresh"}));
        });
        client.set_timeout(Duration::from_millis(50)).unwrap();
        let err = client.query_migrate().unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        client.set_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(client.query_migrate().unwrap()["status"], "fresh");
        peer.join().unwrap();
    }

    #[test]
    fn getfd_passes_the_same_file() {
        let memfd = memfd_create(c"client-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        let want = fstat(memfd.as_raw_fd()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (mut client, peer) = with_peer(move |p| {
            assert!(p.fds.is_empty());
            let (id, args) = p.expect("getfd");
            assert_eq!(args, json!({"fdname": "ram0"}));
            assert_eq!(p.fds.len(), 1);
            let (fd, bytes) = p.fds.pop().unwrap();
            // The fd came on the very message that carried the whole command line.
            assert!(bytes.ends_with(b"\n"));
            let cmd: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(cmd["execute"], "getfd");
            let st = fstat(fd.as_raw_fd()).unwrap();
            tx.send((st.st_dev, st.st_ino)).unwrap();
            p.reply(&id, json!({}));

            let (id, args) = p.expect("closefd");
            assert_eq!(args, json!({"fdname": "ram0"}));
            assert!(p.fds.is_empty());
            p.reply(&id, json!({}));
        });
        client.getfd("ram0", &memfd).unwrap();
        client.closefd("ram0").unwrap();
        peer.join().unwrap();
        assert_eq!(rx.recv().unwrap(), (want.st_dev, want.st_ino));
    }

    #[test]
    fn wait_for_status_polls_until_wanted() {
        let (mut client, peer) = with_peer(|p| {
            for (i, status) in ["setup", "active", "active", "completed"]
                .iter()
                .enumerate()
            {
                let (id, _) = p.expect("query-migrate");
                p.send(&event("MIGRATION_PASS", json!({"pass": i})));
                p.reply(&id, json!({"status": status, "ram": {"transferred": i}}));
            }
        });
        let info = client
            .wait_for_status(&["completed", "cancelled"], Duration::from_secs(5))
            .unwrap();
        assert_eq!(info["ram"]["transferred"], 3);
        assert_eq!(client.take_events().len(), 4);
        peer.join().unwrap();
    }

    #[test]
    fn wait_for_status_failed_and_timeout() {
        let (mut client, peer) = with_peer(|p| {
            let (id, _) = p.expect("query-migrate");
            p.reply(
                &id,
                json!({"status": "failed", "error-desc": "connection reset"}),
            );
            let (id, _) = p.expect("query-migrate");
            p.reply(&id, json!({"status": "failed"}));
            loop {
                let Some(cmd) = p.recv() else { break };
                p.reply(&cmd["id"], json!({"status": "postcopy-paused"}));
            }
        });
        match client
            .wait_for_status(&["completed"], Duration::from_secs(5))
            .unwrap_err()
        {
            ClientError::MigrationFailed { desc } => assert_eq!(desc, "connection reset"),
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(
            client
                .wait_for_status(&["failed"], Duration::from_secs(5))
                .unwrap()["status"],
            "failed"
        );
        match client
            .wait_for_status(&["postcopy-active"], Duration::from_millis(100))
            .unwrap_err()
        {
            ClientError::Timeout { last_status, .. } => {
                assert_eq!(last_status.as_deref(), Some("postcopy-paused"))
            }
            e => panic!("unexpected {e:?}"),
        }
        drop(client);
        peer.join().unwrap();
    }

    #[test]
    fn quit_tolerates_hangup() {
        let (mut client, peer) = with_peer(|p| {
            let _ = p.expect("quit");
        });
        client.quit().unwrap();
        peer.join().unwrap();
        // Writing to a dead helper is an error, not a SIGPIPE.
        assert!(client.query_migrate().is_err());
    }

    #[test]
    fn connect_retries_until_the_socket_appears() {
        let dir = std::env::temp_dir().join(format!("qmh-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let _ = std::fs::remove_file(&path);
        let listen_path = path.clone();
        let peer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let listener = std::os::unix::net::UnixListener::bind(&listen_path).unwrap();
            let (conn, _) = listener.accept().unwrap();
            let mut p = Peer::new(conn);
            p.handshake();
            let _ = p.expect("quit");
        });
        let mut client = HelperClient::connect(&path).unwrap();
        client.quit().unwrap();
        peer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        let err = HelperClient::connect_timeout(&dir.join("nope"), Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(err, ClientError::Io { .. }), "{err}");
    }

    #[test]
    fn spawn_passes_the_control_fd() {
        let dir = std::env::temp_dir().join(format!("qmh-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("fake-helper");
        // A fake helper in bash: checks its arguments, greets on fd N, answers two commands.
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/bash
[ "$1" = --control-fd ] || exit 2
fd=$2
[ "$3" = --log-format ] && [ "$4" = json ] || exit 3
echo '{GREETING}' >&$fd
read -r -u $fd line
id=$(sed 's/.*"id":\([0-9]*\).*/\1/' <<<"$line")
echo '{{"return": {{}}, "id": '$id'}}' >&$fd
read -r -u $fd line
id=$(sed 's/.*"id":\([0-9]*\).*/\1/' <<<"$line")
echo '{{"return": {{"status": "none", "fd": '$fd'}}, "id": '$id'}}' >&$fd
read -r -u $fd line || exit 0
exit 4
"#
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (mut client, mut child) =
            HelperClient::spawn(&script, &["--log-format", "json"]).unwrap();
        assert_eq!(client.greeting()["QMP"]["capabilities"], json!(["oob"]));
        let info = client.query_migrate().unwrap();
        assert_eq!(info["status"], "none");
        drop(client); // EOF on the helper's side makes it exit 0
        assert!(child.wait().unwrap().success());

        // A helper that dies before greeting: a Protocol error naming its exit status.
        let err = HelperClient::spawn(&script, &[]).unwrap_err();
        assert!(
            matches!(&err, ClientError::Protocol(m) if m.contains("exit status: 3")),
            "{err}"
        );
        let err = HelperClient::spawn(&dir.join("missing"), &[]).unwrap_err();
        assert!(matches!(err, ClientError::Io { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
