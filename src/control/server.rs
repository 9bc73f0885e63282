//! The control server: one connection at a time, the QMP handshake, then commands handed
//! to [`Helper::dispatch`]. The connection thread only ever does quick work; migrations run
//! on their own threads, so every command answers at once.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use serde_json::json;

use super::commands::Helper;
use super::listen;
use super::protocol::{self, Command};
use super::qmp::{self, Input, MessageReader, QmpError};

/// What ended a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ConnEnd {
    Eof,
    Quit,
}

/// The reply to `qmp_capabilities`, which QEMU handles in the monitor itself. Returns
/// whether `oob` was enabled.
fn capabilities(args: &serde_json::Map<String, serde_json::Value>) -> Result<bool, QmpError> {
    if let Some(k) = args.keys().find(|k| *k != "enable") {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    match args.get("enable") {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Array(a)) => {
            for (i, c) in a.iter().enumerate() {
                match c.as_str() {
                    Some("oob") => {}
                    Some(other) => {
                        return Err(QmpError::generic(format!(
                            "Parameter 'enable[{i}]' does not accept value '{other}'"
                        )))
                    }
                    None => {
                        return Err(QmpError::generic(format!(
                            "Invalid parameter type for 'enable[{i}]', expected: string"
                        )))
                    }
                }
            }
            Ok(!a.is_empty())
        }
        Some(_) => Err(QmpError::generic(
            "Invalid parameter type for 'enable', expected: array",
        )),
    }
}

/// Serves one client until it disconnects or sends `quit`.
pub(crate) fn serve_connection(
    helper: &Arc<Helper>,
    stream: UnixStream,
) -> std::io::Result<ConnEnd> {
    let sink = helper.events().clone();
    sink.attach(Some(stream.try_clone()?));
    sink.send_line(&protocol::greeting());
    let mut reader = MessageReader::new(stream);
    let mut negotiated = false;
    let mut oob = false;
    let end = loop {
        let (msg, fds, fd_error) = match reader.read_input() {
            Ok(Input::Message {
                bytes,
                fds,
                fd_error,
            }) => (bytes, fds, fd_error),
            Ok(Input::Error(e)) => {
                slog::debug!(helper.log(), "bad control input"; "error" => &e.desc);
                sink.send_line(&qmp::reply_err(&e, &None));
                continue;
            }
            Ok(Input::Eof) => break ConnEnd::Eof,
            Err(e) => {
                slog::warn!(helper.log(), "control connection read failed"; "error" => %e);
                break ConnEnd::Eof;
            }
        };
        let req = match qmp::parse_request(&msg, oob) {
            Ok(r) => r,
            Err((e, id)) => {
                sink.send_line(&qmp::reply_err(&e, &id));
                continue;
            }
        };
        drop(msg);
        let known = Command::from_name(&req.name).is_some();
        let result = if let Some(e) = fd_error {
            Err(e)
        } else if !negotiated {
            if req.name == "qmp_capabilities" {
                qmp::check_oob(&req)
                    .and_then(|()| capabilities(&req.args))
                    .map(|o| {
                        negotiated = true;
                        oob = o;
                        json!({})
                    })
            } else {
                Err(QmpError::not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ))
            }
        } else if req.name == "qmp_capabilities" {
            Err(QmpError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            ))
        } else if known && req.oob {
            qmp::check_oob(&req).and_then(|()| helper.dispatch(&req.name, &req.args, fds))
        } else {
            helper.dispatch(&req.name, &req.args, fds)
        };
        let reply = match &result {
            Ok(v) => protocol::reply_ok(v.clone(), &req.id),
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
pub(crate) fn serve_fd(helper: &Arc<Helper>, fd: OwnedFd) {
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
}

/// `--control-socket`: listens on `path` (created 0600, see `listen`) and serves one client
/// at a time. A client whose uid is neither the helper's nor in `allow_uids` is logged and
/// closed before the greeting. Named fds, blocks and a migration in flight outlive a
/// connection, as with QEMU's monitor.
pub(crate) fn serve_socket(
    helper: &Arc<Helper>,
    listener: listen::ControlListener,
    allow_uids: &[u32],
) -> Result<(), listen::ListenError> {
    slog::info!(helper.log(), "listening for control connections"; "path" => %listener.path().display());
    let own = listen::own_uid();
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                slog::warn!(helper.log(), "accept failed"; "error" => %e);
                continue;
            }
        };
        match listen::peer(&stream) {
            Ok((uid, pid)) if uid == own || allow_uids.contains(&uid) => {
                slog::debug!(helper.log(), "control client connected"; "uid" => uid, "pid" => pid);
            }
            Ok((uid, pid)) => {
                slog::warn!(helper.log(), "refused a control connection from another user";
                    "uid" => uid, "pid" => pid, "allowed" => format!("{own} {allow_uids:?}"));
                continue;
            }
            Err(e) => {
                slog::warn!(helper.log(), "refused a control connection: no peer credentials"; "error" => %e);
                continue;
            }
        }
        if serve_connection(helper, stream).map_err(listen::ListenError::Io)? == ConnEnd::Quit {
            break;
        }
        slog::info!(
            helper.log(),
            "control client disconnected; waiting for the next"
        );
    }
    Ok(())
}
