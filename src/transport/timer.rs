//! A channel's I/O timeout (owner: transport): its length and the parameter that set it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Which parameter a channel's I/O timeout comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeoutParam {
    Link,
    Precopy,
}

/// A channel's I/O timeout: its length and the parameter that set it, so that the error
/// a silent peer causes names what to change.
#[derive(Debug, Default)]
pub(crate) struct IoTimer {
    /// Milliseconds; 0: none.
    pub(super) ms: AtomicU64,
    precopy: AtomicBool,
}

impl IoTimer {
    pub(crate) fn set(&self, t: Option<Duration>, param: TimeoutParam) {
        let ms = t.map_or(0, |d| d.as_millis().clamp(1, u64::MAX as u128) as u64);
        self.ms.store(ms, Ordering::Relaxed);
        self.precopy
            .store(param == TimeoutParam::Precopy, Ordering::Relaxed);
    }

    pub(super) fn error(&self, what: &str) -> io::Error {
        let ms = self.ms.load(Ordering::Relaxed);
        let name = if self.precopy.load(Ordering::Relaxed) {
            "precopy-timeout"
        } else {
            "link-timeout"
        };
        let limit = if ms > 0 {
            format!("{name} ({ms} ms)")
        } else {
            "the link timeout".to_string()
        };
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} for {limit}: the peer is silent (link dead?)"),
        )
    }
}
