//! The control channel: a QMP dialect on a Unix socket (see docs/control-protocol.md and
//! the man page). The connection thread only ever does quick work; migrations run on their
//! own threads, so every command answers at once.

pub mod commands;
mod orphan;
pub mod qmp;

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use serde_json::json;

pub use commands::Helper;
use qmp::{Input, LineReader, QmpError};

/// The greeting, with the QEMU version whose protocol the helper speaks.
pub fn greeting() -> serde_json::Value {
    json!({"QMP": {
        "version": {
            "qemu": {"major": 10, "minor": 0, "micro": 2},
            "package": format!("qemu-migration-helper {}", env!("CARGO_PKG_VERSION")),
        },
        "capabilities": ["oob"],
    }})
}

/// What ended a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnEnd {
    Eof,
    Quit,
}

/// Serves one client until it disconnects or sends `quit`.
pub fn serve_connection(helper: &Arc<Helper>, stream: UnixStream) -> std::io::Result<ConnEnd> {
    let sink = helper.events().clone();
    sink.attach(Some(stream.try_clone()?));
    sink.send_line(&greeting());
    let mut reader = LineReader::new(stream);
    let mut negotiated = false;
    let end = loop {
        let (line, fds) = match reader.read_input() {
            Ok(Input::Line(l, f)) => (l, f),
            Ok(Input::TooLong) => {
                sink.send_line(&qmp::reply_err(
                    &QmpError::generic("command line too long"),
                    &None,
                ));
                continue;
            }
            Ok(Input::Eof) => break ConnEnd::Eof,
            Err(e) => {
                slog::warn!(helper.log(), "control connection read failed"; "error" => %e);
                break ConnEnd::Eof;
            }
        };
        let req = match qmp::parse_request(&line) {
            Ok(r) => r,
            Err((e, id)) => {
                sink.send_line(&qmp::reply_err(&e, &id));
                continue;
            }
        };
        let result = if req.name == "qmp_capabilities" {
            if negotiated {
                Err(QmpError::not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ))
            } else {
                match req.args.get("enable") {
                    None => Ok(json!({})),
                    Some(serde_json::Value::Array(a)) if a.iter().all(|c| c == "oob") => {
                        Ok(json!({}))
                    }
                    Some(_) => Err(QmpError::generic(
                        "only the 'oob' capability can be enabled",
                    )),
                }
                .inspect(|_| negotiated = true)
            }
        } else if !negotiated {
            Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ))
        } else {
            helper.dispatch(&req.name, &req.args, fds)
        };
        let reply = match &result {
            Ok(v) => qmp::reply_ok(v.clone(), &req.id),
            Err(e) => {
                slog::debug!(helper.log(), "command failed"; "command" => &req.name, "error" => &e.desc);
                qmp::reply_err(e, &req.id)
            }
        };
        sink.send_line(&reply);
        if req.name == "quit" && result.is_ok() {
            break ConnEnd::Quit;
        }
    };
    sink.attach(None);
    Ok(end)
}

/// `--control-fd`: serves the parent's end of a socketpair. When the parent goes away
/// (EOF) the helper cancels a precopy migration, or pauses a postcopy one and waits
/// `orphan-timeout` for an adopter, then exits (see `orphan.rs`).
pub fn serve_fd(helper: &Arc<Helper>, fd: OwnedFd) -> std::io::Result<ConnEnd> {
    let stream = UnixStream::from(fd);
    // A read error is the parent gone too: act on it before reporting it.
    let end = serve_connection(helper, stream).unwrap_or(ConnEnd::Eof);
    if end == ConnEnd::Eof {
        slog::info!(
            helper.log(),
            "control connection closed: the parent is gone"
        );
        helper.parent_gone();
    }
    Ok(end)
}

/// `--control-socket`: listens on `path` and serves one client at a time.
pub fn serve_socket(helper: &Arc<Helper>, path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    slog::info!(helper.log(), "listening for control connections"; "path" => %path.display());
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                slog::warn!(helper.log(), "accept failed"; "error" => %e);
                continue;
            }
        };
        if serve_connection(helper, stream)? == ConnEnd::Quit {
            break;
        }
        slog::info!(
            helper.log(),
            "control client disconnected; waiting for the next"
        );
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}
