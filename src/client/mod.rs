//! Client side of the helper's control protocol: what a VMM (or a test, or the `demo`) uses
//! to drive a `qemu-migration-helper` process.
//!
//! The protocol is a dialect of QMP carried over one `AF_UNIX` stream socket (see the man
//! page, CONTROL PROTOCOL): one JSON object per line, a greeting from the helper,
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
//!
//! The messages themselves (command and status names, [`RamBlockSpec`], [`Event`]) are in
//! [`crate::control::protocol`], which the helper's server uses too.

mod commands;
mod conn;
mod spawn;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::control::protocol::{Command, Message};
pub use crate::control::protocol::{Event, RamBlockSpec};

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
    /// Wraps an already connected control socket and does the handshake: reads the greeting
    /// and sends `qmp_capabilities` (enabling `oob` if the helper offers it).
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
        self.execute(Command::QmpCapabilities.as_str(), args)?;
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

    /// Closes the control connection without `quit`, as a parent that goes away would.
    /// Later calls fail with a protocol error.
    pub fn disconnect(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.closed = true;
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
    Message::parse(line)
        .map(Some)
        .map_err(|why| ClientError::Protocol(format!("{why}: {}", show_line(line))))
}
