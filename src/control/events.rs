//! Where replies and QMP events go: the control client connected at the moment, if any
//! (QMP drops events nobody is connected to hear).
//!
//! Lines are queued to a writer thread per connection, so neither the control loop nor a
//! migration thread ever blocks on a client that does not read. A client that lets the
//! queue overflow is disconnected (it sees EOF) rather than silently missing lines.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::protocol::Event;

/// Lines queued for a client before it counts as not reading.
const QUEUE: usize = 8192;
/// How long one write may block before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

struct Conn {
    tx: SyncSender<String>,
    stream: UnixStream,
    writer: JoinHandle<()>,
}

/// A shared handle to the current client's write side.
#[derive(Clone, Default)]
pub(crate) struct EventSink {
    conn: Arc<Mutex<Option<Conn>>>,
}

impl EventSink {
    /// Points replies and events at `w` (or nowhere). Detaching waits until what was queued
    /// has been written, so a reply to `quit` reaches the client before the process exits.
    pub(crate) fn attach(&self, w: Option<UnixStream>) {
        let new = w.and_then(|stream| {
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let mut out = stream.try_clone().ok()?;
            let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
            let writer = std::thread::Builder::new()
                .name("qmh-qmp-out".into())
                .spawn(move || {
                    for line in rx {
                        if out.write_all(line.as_bytes()).is_err() {
                            let _ = out.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                })
                .ok()?;
            Some(Conn { tx, stream, writer })
        });
        let old = std::mem::replace(
            &mut *self.conn.lock().unwrap_or_else(|e| e.into_inner()),
            new,
        );
        if let Some(c) = old {
            drop(c.tx);
            let _ = c.writer.join();
        }
    }

    /// Queues one line for the client.
    pub(crate) fn send_line(&self, v: &serde_json::Value) {
        let mut line = v.to_string();
        line.push('\n');
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = g.as_ref() else { return };
        match c.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                // The client stopped reading: hang up on it instead of dropping lines.
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
                *g = None;
            }
            Err(TrySendError::Disconnected(_)) => *g = None,
        }
    }

    /// Sends event `name` with `data`, stamped now.
    pub(crate) fn emit(&self, name: &str, data: serde_json::Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let event = Event {
            name: name.to_owned(),
            data,
            timestamp: (now.as_secs(), now.subsec_micros()),
        };
        self.send_line(&event.to_json());
    }
}
