//! Logs to stderr: human-readable lines by default, one JSON object per line with
//! `--log-format json`.

use slog::Drain;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
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
pub fn logger(format: LogFormat, level: LogLevel) -> slog::Logger {
    let pid = std::process::id();
    match format {
        LogFormat::Human => {
            let dec = slog_term::PlainSyncDecorator::new(std::io::stderr());
            let drain = slog_term::FullFormat::new(dec).build().fuse();
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
