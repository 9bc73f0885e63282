//! Logs to stderr: human-readable lines by default, one JSON object per line with
//! `--log-format json`.
//!
//! Many logged strings come from a peer (machine names, section idstrs, block names, URIs,
//! error descriptions quoting the stream). In the human format every message and value is
//! escaped here, once, so that a newline or a terminal escape sequence in one cannot forge
//! a log line or repaint the operator's terminal. JSON logs are escaped by serde.

use slog::Drain;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn slog(self) -> slog::Level {
        match self {
            LogLevel::Error => slog::Level::Error,
            LogLevel::Warn => slog::Level::Warning,
            LogLevel::Info => slog::Level::Info,
            LogLevel::Debug => slog::Level::Debug,
            LogLevel::Trace => slog::Level::Trace,
        }
    }
}

/// A synchronous logger (so nothing is lost when the process exits right after).
pub(crate) fn logger(format: LogFormat, level: LogLevel) -> slog::Logger {
    let pid = std::process::id();
    match format {
        LogFormat::Human => {
            let dec = slog_term::PlainSyncDecorator::new(std::io::stderr());
            let drain = slog_term::FullFormat::new(dec).build().fuse();
            let drain = Escape(drain);
            let drain = slog::LevelFilter::new(drain, level.slog()).fuse();
            slog::Logger::root(drain, slog::o!("pid" => pid))
        }
        LogFormat::Json => {
            let drain = slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build()
                .fuse();
            let drain = Mutex::new(drain).map(slog::Fuse);
            let drain = slog::LevelFilter::new(drain, level.slog()).fuse();
            slog::Logger::root(drain, slog::o!("pid" => pid))
        }
    }
}

/// Escapes what could forge or disguise a text log line: control characters (C0, DEL, C1;
/// `\n` `\r` `\t` by name, others as `\u{..}`), Unicode bidirectional controls, and the
/// backslash itself so that the escaping is unambiguous.
pub(crate) fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    fn bad(c: char) -> bool {
        c.is_control()
            || c == '\\'
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(bad) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if bad(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A drain that hands its inner drain the record with the message and every value escaped.
struct Escape<D>(D);

/// Key/value pairs already rendered and escaped.
struct Escaped(Vec<(slog::Key, String)>);

impl slog::KV for Escaped {
    fn serialize(&self, _: &slog::Record, s: &mut dyn slog::Serializer) -> slog::Result {
        for (k, v) in &self.0 {
            s.emit_str(k, v)?;
        }
        Ok(())
    }
}

/// Renders each value to text and escapes it.
struct Collect(Vec<(slog::Key, String)>);

impl slog::Serializer for Collect {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        let text = val.to_string();
        self.0.push((key, escape(&text).into_owned()));
        Ok(())
    }
}

impl<D: Drain> Drain for Escape<D> {
    type Ok = D::Ok;
    type Err = D::Err;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<D::Ok, D::Err> {
        use slog::KV;
        let mut kv = Collect(Vec::new());
        let _ = record.kv().serialize(record, &mut kv);
        let mut owned = Collect(Vec::new());
        let _ = values.serialize(record, &mut owned);
        // Serializing visits the pairs in reverse; so does re-serializing: reverse back.
        kv.0.reverse();
        owned.0.reverse();
        let msg = record.msg().to_string();
        let msg = escape(&msg);
        let kv = Escaped(kv.0);
        let values = slog::OwnedKVList::from(slog::OwnedKV(Escaped(owned.0)));
        self.0.log(
            &slog::Record::new(
                &slog::RecordStatic {
                    location: record.location(),
                    level: record.level(),
                    tag: record.tag(),
                },
                &format_args!("{msg}"),
                slog::BorrowedKV(&kv),
            ),
            &values,
        )
    }

    fn is_enabled(&self, level: slog::Level) -> bool {
        self.0.is_enabled(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_a_line() {
        assert_eq!(escape("pc-q35-10.0"), "pc-q35-10.0");
        assert_eq!(
            escape("a\nINFO forged\x1b[31m\\\u{202e}"),
            "a\\nINFO forged\\u{1b}[31m\\\\\\u{202e}"
        );
    }

    #[derive(Clone)]
    struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The whole human line: values and messages escaped, order kept, one line per record.
    #[test]
    fn human_lines_are_escaped() {
        let buf = Buf(Default::default());
        let dec = slog_term::PlainSyncDecorator::new(buf.clone());
        let drain = Escape(slog_term::FullFormat::new(dec).build().fuse()).fuse();
        let log = slog::Logger::root(drain, slog::o!("pid" => 1, "who" => "x\ny"));
        let name = "evil\nDEC 02 00:00:00.000 INFO forged\x1b[31m";
        slog::info!(log, "incoming stream {}", "m\r"; "machine" => name, "n" => 5);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains(r"incoming stream m\r"), "{text}");
        let m = text.find("machine:").unwrap();
        let n = text.find("n: 5").unwrap();
        let p = text.find("pid: 1").unwrap();
        assert!(m < n && n < p, "order changed: {text}");
        assert!(text.contains(r"who: x\ny"), "{text}");
        assert!(text.contains(r"evil\nDEC"), "{text}");
    }

    /// JSON lines need no help: serde escapes control characters.
    #[test]
    fn json_lines_are_escaped_by_serde() {
        let buf = Buf(Default::default());
        let drain = slog_json::Json::new(buf.clone()).build().fuse();
        let log = slog::Logger::root(Mutex::new(drain).map(slog::Fuse), slog::o!());
        slog::info!(log, "incoming stream"; "machine" => "evil\nforged\x1b[31m");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["machine"], "evil\nforged\x1b[31m");
    }
}
