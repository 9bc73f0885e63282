//! QMP on the control socket: a JSON stream (see `framing`), file descriptors as
//! SCM_RIGHTS ancillary data on the message that carries a command.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde_json::{Map, Value};

use super::framing::{Frame, Splitter};
use super::protocol::{self, Command, ErrorClass};

/// A parsed command.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) name: String,
    pub(crate) args: Map<String, Value>,
    pub(crate) id: Option<Value>,
    /// Sent with `exec-oob`.
    pub(crate) oob: bool,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QmpError {
    pub(crate) class: ErrorClass,
    pub(crate) desc: String,
}

impl QmpError {
    pub(crate) fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
    pub(crate) fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

pub(crate) fn reply_err(e: &QmpError, id: &Option<Value>) -> Value {
    protocol::reply_err(e.class.as_str(), &e.desc, id)
}

/// Parses one message into a request, as QEMU's QMP dispatcher validates it. `exec-oob`
/// is a member only once the client enabled the `oob` capability, as in QEMU.
pub(crate) fn parse_request(
    msg: &[u8],
    allow_oob: bool,
) -> Result<Request, (QmpError, Option<Value>)> {
    let v: Value = serde_json::from_slice(msg)
        .map_err(|e| (QmpError::generic(format!("JSON parse error, {e}")), None))?;
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let err = |desc: String| Err((QmpError::generic(desc), id.clone()));
    let exec = obj.remove("execute");
    let exec_oob = if allow_oob {
        obj.remove("exec-oob")
    } else {
        None
    };
    let (name, oob) = match (exec, exec_oob) {
        (Some(_), Some(_)) => {
            return err("QMP input member 'execute' clashes with 'exec-oob'".into())
        }
        (Some(Value::String(s)), None) => (s, false),
        (None, Some(Value::String(s))) => (s, true),
        (Some(_), None) => return err("QMP input member 'execute' must be a string".into()),
        (None, Some(_)) => return err("QMP input member 'exec-oob' must be a string".into()),
        (None, None) => {
            // Before the check for a missing `execute`, as QEMU reports an unexpected
            // `exec-oob` first.
            if obj.contains_key("exec-oob") {
                return err("QMP input member 'exec-oob' is unexpected".into());
            }
            return err("QMP input lacks member 'execute'".into());
        }
    };
    let args = match obj.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return err("QMP input member 'arguments' must be an object".into()),
    };
    match obj.remove("control") {
        None => {}
        Some(Value::Object(c)) if c.iter().all(|(k, v)| k == "run-oob" && v.is_boolean()) => {}
        Some(_) => return err("QMP input member 'control' is invalid".into()),
    }
    if let Some(k) = obj.keys().next() {
        return err(format!("QMP input member '{k}' is unexpected"));
    }
    Ok(Request {
        name,
        args,
        id,
        oob,
    })
}

/// QEMU's check after finding the command: `exec-oob` only for commands that allow it.
pub(crate) fn check_oob(req: &Request) -> Result<(), QmpError> {
    if req.oob && !Command::from_name(&req.name).is_some_and(Command::allows_oob) {
        return Err(QmpError::generic(format!(
            "The command {} does not support OOB",
            req.name
        )));
    }
    Ok(())
}

/// The most fds the kernel passes with one message (SCM_MAX_FD).
pub(crate) const SCM_MAX_FD: usize = 253;
/// fds held for messages not yet complete. Past this, new ones are closed at once and the
/// command they came with is refused, so a client cannot fill the helper's fd table.
const MAX_PENDING_FDS: usize = 2 * SCM_MAX_FD;
/// One read from the socket.
const CHUNK: usize = 256 * 1024;

/// One recvmsg: bytes read, the fds that came with them (owned at once, so none can leak),
/// and whether the kernel truncated the ancillary data (MSG_CTRUNC). Plain libc because
/// nix refuses to walk a truncated control buffer, which would leave the fds that did
/// arrive open and unowned.
fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<OwnedFd>, bool)> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((SCM_MAX_FD * std::mem::size_of::<RawFd>()) as u32) };
    // u64 elements: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut mhdr: libc::msghdr = unsafe { std::mem::zeroed() };
    mhdr.msg_iov = &mut iov;
    mhdr.msg_iovlen = 1;
    mhdr.msg_control = control.as_mut_ptr().cast();
    mhdr.msg_controllen = control.len() * 8;
    // SAFETY: mhdr points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut mhdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_controllen bytes of `control` with well-formed cmsgs;
    // CMSG_* walk only within them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mhdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(
                        data.add(i * std::mem::size_of::<RawFd>()).cast::<RawFd>(),
                    );
                    // The kernel just installed this fd for us.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&mhdr, c);
        }
    }
    Ok((n as usize, fds, mhdr.msg_flags & libc::MSG_CTRUNC != 0))
}

/// The fds one recvmsg brought, or why they were closed.
enum FdBatch {
    Fds(Vec<OwnedFd>),
    /// MSG_CTRUNC: the kernel dropped some; the ones that arrived were closed.
    Truncated,
    /// Over MAX_PENDING_FDS; closed.
    TooMany(usize),
}

/// What the reader produced.
pub(crate) enum Input {
    /// A complete value with the fds that came with its bytes; `fd_error` says why the
    /// command must be refused instead (its fds are then already closed).
    Message {
        bytes: Vec<u8>,
        fds: Vec<OwnedFd>,
        fd_error: Option<QmpError>,
    },
    /// Bad framing or a broken limit: an error reply without id, as QEMU sends.
    Error(QmpError),
    Eof,
}

/// Reads QMP messages and their fds from a control connection.
pub(crate) struct MessageReader {
    stream: UnixStream,
    splitter: Splitter,
    chunk: Vec<u8>,
    /// fds received, with the stream position of the first byte of the message they came
    /// with: they belong to the value whose bytes that message carried (or, if it carried
    /// only whitespace, to the next value, as `qemu.qmp`'s `send_fd_scm` relies on).
    fds: VecDeque<(u64, FdBatch)>,
    pending_fds: usize,
}

impl MessageReader {
    pub(crate) fn new(stream: UnixStream) -> Self {
        MessageReader {
            stream,
            splitter: Splitter::new(),
            chunk: vec![0u8; CHUNK],
            fds: VecDeque::new(),
            pending_fds: 0,
        }
    }

    /// Removes the fds that came before stream position `end`.
    fn take_fds(&mut self, end: u64) -> (Vec<OwnedFd>, Option<QmpError>) {
        let mut fds = Vec::new();
        let mut err = None;
        while self.fds.front().is_some_and(|(pos, _)| *pos < end) {
            let Some((_, batch)) = self.fds.pop_front() else {
                break;
            };
            match batch {
                FdBatch::Fds(v) => {
                    self.pending_fds -= v.len();
                    fds.extend(v);
                }
                FdBatch::Truncated => {
                    err = Some(QmpError::generic(format!(
                        "file descriptors lost: more than {SCM_MAX_FD} sent with one message, or \
                         the helper has no fd slots left; all that arrived were closed"
                    )))
                }
                FdBatch::TooMany(n) => {
                    err = Some(QmpError::generic(format!(
                        "too many file descriptors before the end of a command ({n} more \
                         while {MAX_PENDING_FDS} were pending); they were closed"
                    )))
                }
            }
        }
        if err.is_some() {
            fds.clear();
        }
        (fds, err)
    }

    pub(crate) fn read_input(&mut self) -> std::io::Result<Input> {
        loop {
            match self.splitter.next_frame() {
                Some(Frame::Message { bytes, end }) => {
                    let (fds, fd_error) = self.take_fds(end);
                    return Ok(Input::Message {
                        bytes,
                        fds,
                        fd_error,
                    });
                }
                Some(Frame::Error { desc, end }) => {
                    drop(self.take_fds(end));
                    return Ok(Input::Error(QmpError::generic(desc)));
                }
                Some(Frame::Skipped { end }) => {
                    drop(self.take_fds(end));
                    continue;
                }
                None => {}
            }
            let (n, received, truncated) = match recv_with_fds(&self.stream, &mut self.chunk) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(Input::Eof);
            }
            let pos = self.splitter.position();
            if truncated {
                // The fds that did arrive are closed here: the command gets an error.
                drop(received);
                self.fds.push_back((pos, FdBatch::Truncated));
            } else if !received.is_empty() {
                if self.pending_fds + received.len() > MAX_PENDING_FDS {
                    self.fds.push_back((pos, FdBatch::TooMany(received.len())));
                } else {
                    self.pending_fds += received.len();
                    self.fds.push_back((pos, FdBatch::Fds(received)));
                }
            }
            self.splitter.feed(&self.chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests() {
        let r = parse_request(br#"{"execute": "query-migrate", "id": 7}"#, false).unwrap();
        assert_eq!(r.name, "query-migrate");
        assert_eq!(r.id, Some(json!(7)));
        let r = parse_request(
            br#"{"execute": "migrate-pause", "control": {"run-oob": true}}"#,
            false,
        )
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
                parse_request(bad, true).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let (_, id) = parse_request(br#"{"execute": 5, "id": "a"}"#, false).unwrap_err();
        assert_eq!(id, Some(json!("a")));
    }

    #[test]
    fn exec_oob_as_qemu() {
        let oob = br#"{"exec-oob": "migrate-pause", "id": 1}"#;
        let (e, id) = parse_request(oob, false).unwrap_err();
        assert_eq!(e.desc, "QMP input member 'exec-oob' is unexpected");
        assert_eq!(id, Some(json!(1)));
        let r = parse_request(oob, true).unwrap();
        assert!(r.oob && r.name == "migrate-pause");
        assert_eq!(check_oob(&r), Ok(()));
        let r = parse_request(br#"{"exec-oob": "query-migrate"}"#, true).unwrap();
        assert_eq!(
            check_oob(&r).unwrap_err().desc,
            "The command query-migrate does not support OOB"
        );
        let (e, _) = parse_request(br#"{"execute": "a", "exec-oob": "b"}"#, true).unwrap_err();
        assert!(e.desc.contains("clashes"), "{}", e.desc);
    }
}
