//! Where QMP events go: the control client connected at the moment, if any (QMP drops
//! events nobody is connected to hear).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// A shared handle to the current client's write side.
#[derive(Clone, Default)]
pub struct EventSink {
    writer: Arc<Mutex<Option<UnixStream>>>,
}

impl EventSink {
    /// Points events (and replies, which share the lock so lines never interleave) at `w`.
    pub fn attach(&self, w: Option<UnixStream>) {
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = w;
    }

    /// Writes one line to the client; errors mean the client went away and are ignored
    /// (the connection's reader notices and detaches).
    pub fn send_line(&self, v: &serde_json::Value) {
        let mut line = v.to_string();
        line.push('\n');
        let mut g = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = g.as_mut() {
            if w.write_all(line.as_bytes()).is_err() {
                *g = None;
            }
        }
    }

    pub fn emit(&self, event: &str, data: serde_json::Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.send_line(&serde_json::json!({
            "event": event,
            "data": data,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        }));
    }
}
