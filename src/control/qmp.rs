//! QMP framing on the control socket: one JSON object per line, file descriptors as
//! SCM_RIGHTS ancillary data on the message that carries a command.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::{json, Map, Value};

/// Longest command line accepted; a longer one is dropped with an error reply.
pub const MAX_LINE: usize = 64 << 20;
/// The most fds accepted with one message.
const MAX_FDS: usize = 16;

/// A parsed command.
#[derive(Debug)]
pub struct Request {
    pub name: String,
    pub args: Map<String, Value>,
    pub id: Option<Value>,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
}

pub fn reply_ok(ret: Value, id: &Option<Value>) -> Value {
    let mut v = json!({ "return": ret });
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

pub fn reply_err(e: &QmpError, id: &Option<Value>) -> Value {
    let mut v = json!({ "error": { "class": e.class, "desc": e.desc } });
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// Parses one line into a request, as QEMU's QMP dispatcher validates it.
pub fn parse_request(line: &[u8]) -> Result<Request, (QmpError, Option<Value>)> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| (QmpError::generic(format!("JSON parse error, {e}")), None))?;
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let name = match obj.remove("execute").or_else(|| obj.remove("exec-oob")) {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err((
                QmpError::generic("QMP input member 'execute' must be a string"),
                id,
            ))
        }
        None => return Err((QmpError::generic("QMP input lacks member 'execute'"), id)),
    };
    let args = match obj.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err((
                QmpError::generic("QMP input member 'arguments' must be an object"),
                id,
            ))
        }
    };
    match obj.remove("control") {
        None => {}
        Some(Value::Object(c)) if c.iter().all(|(k, v)| k == "run-oob" && v.is_boolean()) => {}
        Some(_) => {
            return Err((
                QmpError::generic("QMP input member 'control' is invalid"),
                id,
            ))
        }
    }
    if let Some(k) = obj.keys().next() {
        return Err((
            QmpError::generic(format!("QMP input member '{k}' is unexpected")),
            id,
        ));
    }
    Ok(Request { name, args, id })
}

/// Reads lines and their fds from a control connection.
pub struct LineReader {
    stream: UnixStream,
    buf: Vec<u8>,
    /// fds received, with the buffer position of the first byte of the message they came with.
    fds: Vec<(usize, OwnedFd)>,
    /// Set while skipping the rest of an over-long line.
    discarding: bool,
    /// How much of `buf` is known to hold no newline.
    scanned: usize,
}

/// What the reader produced.
pub enum Input {
    Line(Vec<u8>, Vec<OwnedFd>),
    TooLong,
    Eof,
}

impl LineReader {
    pub fn new(stream: UnixStream) -> Self {
        LineReader {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
            discarding: false,
            scanned: 0,
        }
    }

    pub fn read_input(&mut self) -> std::io::Result<Input> {
        loop {
            // Only the bytes not yet searched: a long line must not cost quadratic time.
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let nl = self.scanned + i;
                self.scanned = 0;
                let rest = self.buf.split_off(nl + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                // The fds that came with this line's bytes belong to it.
                let (mine, later): (Vec<_>, Vec<_>) =
                    self.fds.drain(..).partition(|(pos, _)| *pos <= nl);
                self.fds = later
                    .into_iter()
                    .map(|(p, fd)| (p - (nl + 1), fd))
                    .collect();
                let fds = mine.into_iter().map(|(_, fd)| fd).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Input::Line(line, fds));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_LINE {
                // Drop the line; skip what is left of it as it arrives.
                self.buf = Vec::new();
                self.fds.clear();
                self.scanned = 0;
                self.discarding = true;
                return Ok(Input::TooLong);
            }
            let mut chunk = vec![0u8; 256 * 1024];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let msg = match recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let n = msg.bytes;
            let pos = self.buf.len();
            let mut received = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed this fd for us.
                            received.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
            }
            if n == 0 {
                return Ok(Input::Eof);
            }
            let data = &chunk[..n];
            if self.discarding {
                // Still inside the over-long line: keep only what follows its end.
                match data.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.discarding = false;
                        self.buf.extend_from_slice(&data[i + 1..]);
                    }
                    None => continue,
                }
                continue;
            }
            self.fds.extend(received.into_iter().map(|fd| (pos, fd)));
            self.buf.extend_from_slice(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let r = parse_request(br#"{"execute": "query-migrate", "id": 7}"#).unwrap();
        assert_eq!(r.name, "query-migrate");
        assert_eq!(r.id, Some(json!(7)));
        let r = parse_request(br#"{"execute": "migrate-pause", "control": {"run-oob": true}}"#)
            .unwrap();
        assert_eq!(r.name, "migrate-pause");
        for bad in [
            &b"{"[..],
            b"[]",
            br#"{"execute": 5}"#,
            br#"{"arguments": {}}"#,
            br#"{"execute": "x", "arguments": []}"#,
            br#"{"execute": "x", "bogus": 1}"#,
            br#"{"execute": "x", "control": {"run-oob": 1}}"#,
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let (_, id) = parse_request(br#"{"execute": 5, "id": "a"}"#).unwrap_err();
        assert_eq!(id, Some(json!("a")));
    }
}
