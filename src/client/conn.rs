//! The connection: commands out (with an fd as SCM_RIGHTS), lines in, replies matched by
//! id, events queued.

use std::io::{self, IoSlice, Read};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use serde_json::{json, Map, Value};

use crate::control::protocol::MigrationStatus;

use super::{
    closed_error, parse_message, show_line, ClientError, Event, HelperClient, Message, MAX_LINE,
    MAX_QUEUED_EVENTS, STATUS_POLL_INTERVAL,
};

impl HelperClient {
    /// Runs `cmd` with `args` (a JSON object, or `Value::Null` for none) and returns the
    /// `return` member of its reply. Events arriving before the reply are queued.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, ClientError> {
        self.execute_inner(cmd, args, false, None)
    }

    /// Like [`HelperClient::execute`], with `"control": {"run-oob": true}`.
    pub fn execute_oob(&mut self, cmd: &str, args: Value) -> Result<Value, ClientError> {
        self.execute_inner(cmd, args, true, None)
    }

    /// Like [`HelperClient::execute`], with `fd` attached (`SCM_RIGHTS`) to the message that
    /// carries the command. The helper gets its own copy; the caller keeps `fd`.
    pub fn execute_with_fd(
        &mut self,
        cmd: &str,
        args: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, ClientError> {
        self.execute_inner(cmd, args, false, Some(fd))
    }

    pub(super) fn execute_inner(
        &mut self,
        cmd: &str,
        args: Value,
        oob: bool,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(cmd.into()));
        if !args.is_null() {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), Value::from(id));
        if oob {
            msg.insert("control".into(), json!({"run-oob": true}));
        }
        let mut line = serde_json::to_vec(&Value::Object(msg))
            .map_err(|e| ClientError::Protocol(format!("cannot encode {cmd}: {e}")))?;
        line.push(b'\n');
        self.send(cmd, &line, fd)?;
        self.wait_reply(cmd, id)
    }

    /// Writes `buf`; the first `sendmsg` carries `fd` if any. MSG_NOSIGNAL so that a dead
    /// helper is an EPIPE error, never a SIGPIPE.
    pub(super) fn send(
        &mut self,
        cmd: &str,
        buf: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ClientError> {
        let raw_fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw_fds)];
        let mut cmsgs: &[ControlMessage<'_>] = if raw_fds.is_empty() { &[] } else { &rights };
        let mut sent = 0;
        while sent < buf.len() {
            let iov = [IoSlice::new(&buf[sent..])];
            match sendmsg::<UnixAddr>(
                self.stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => {
                    sent += n;
                    // The fd went with the first byte(s); never send it twice.
                    cmsgs = &[];
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    return Err(ClientError::Timeout {
                        what: format!("the helper to accept command {cmd}"),
                        last_status: None,
                    })
                }
                Err(e) => {
                    if matches!(e, Errno::EPIPE | Errno::ECONNRESET) {
                        self.closed = true;
                    }
                    return Err(ClientError::io(format!("sending {cmd}"), e.into()));
                }
            }
        }
        Ok(())
    }

    pub(super) fn wait_reply(&mut self, cmd: &str, id: u64) -> Result<Value, ClientError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let Some(line) = self.read_line(deadline)? else {
                return Err(ClientError::Timeout {
                    what: format!("the reply to {cmd}"),
                    last_status: None,
                });
            };
            match parse_message(&line)? {
                None => continue,
                Some(Message::Event(ev)) => self.queue_event(ev),
                Some(Message::Reply {
                    id: reply_id,
                    result,
                }) => {
                    match reply_id {
                        Some(ref v) if v.as_u64() == Some(id) => {}
                        // An error reply without id: the helper could not even parse the
                        // command's id (QMP does this for malformed input); it is ours.
                        None if result.is_err() => {}
                        Some(ref v) if v.as_u64().is_some_and(|old| old < id) => {
                            // Late reply to a command that timed out earlier.
                            continue;
                        }
                        _ => {
                            return Err(ClientError::Protocol(format!(
                                "reply {} while waiting for the reply to {cmd} (id {id})",
                                show_line(&line)
                            )))
                        }
                    }
                    return result.map_err(|e| ClientError::Command {
                        command: cmd.into(),
                        class: e.class,
                        desc: e.desc,
                    });
                }
            }
        }
    }

    /// Reads one line (without its newline). `Ok(None)` when `deadline` passed first.
    pub(super) fn read_line(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            if let Some(pos) = self.rbuf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let mut line: Vec<u8> = self.rbuf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return Ok(Some(line));
            }
            self.scanned = self.rbuf.len();
            if self.rbuf.len() > MAX_LINE {
                return Err(ClientError::Protocol(format!(
                    "line longer than {MAX_LINE} bytes from the helper"
                )));
            }
            if self.closed {
                return Err(closed_error());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(wait))
                .map_err(|e| ClientError::io("setting the control socket's read timeout", e))?;
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    if !self.rbuf.is_empty() {
                        return Err(ClientError::Protocol(format!(
                            "the helper closed the control connection in the middle of a line: {}",
                            show_line(&self.rbuf)
                        )));
                    }
                    return Err(closed_error());
                }
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    if e.kind() == io::ErrorKind::ConnectionReset {
                        self.closed = true;
                    }
                    return Err(ClientError::io("reading the control socket", e));
                }
            }
        }
    }

    pub(super) fn queue_event(&mut self, ev: Event) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    /// Reads whatever the helper sends until `deadline`, or until `stop` matches an event
    /// (which is then returned rather than queued). Replies to nothing in flight are stale
    /// (their command timed out) and skipped.
    pub(super) fn pump(
        &mut self,
        deadline: Instant,
        mut stop: impl FnMut(&Event) -> bool,
    ) -> Result<Option<Event>, ClientError> {
        while let Some(line) = self.read_line(deadline)? {
            match parse_message(&line)? {
                None => {}
                Some(Message::Event(ev)) => {
                    if stop(&ev) {
                        return Ok(Some(ev));
                    }
                    self.queue_event(ev);
                }
                Some(Message::Reply { id, .. }) => {
                    let stale = id
                        .as_ref()
                        .and_then(Value::as_u64)
                        .is_some_and(|old| old < self.next_id);
                    if !stale {
                        return Err(ClientError::Protocol(format!(
                            "reply {} with no command in flight",
                            show_line(&line)
                        )));
                    }
                }
            }
        }
        Ok(None)
    }

    // ---------------------------------------------------------------- events

    /// Removes and returns every queued event, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Returns the first event (already queued, or read within `timeout`) for which `pred`
    /// holds, removing it from the queue. Events that do not match stay queued, in order.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event, ClientError> {
        if let Some(pos) = self.events.iter().position(&mut pred) {
            return Ok(self.events.remove(pos).expect("index from position"));
        }
        let deadline = Instant::now() + timeout;
        match self.pump(deadline, pred)? {
            Some(ev) => Ok(ev),
            None => Err(ClientError::Timeout {
                what: "an event".into(),
                last_status: None,
            }),
        }
    }

    /// Polls `query-migrate` (every ~10 ms, queuing events meanwhile) until its `status` is
    /// one of `wanted`, and returns that `query-migrate` result. Fails with
    /// [`ClientError::MigrationFailed`] if the status becomes `failed` (unless `failed` is
    /// wanted), and with [`ClientError::Timeout`] naming the last status at the deadline.
    pub fn wait_for_status(
        &mut self,
        wanted: &[&str],
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            let status = info
                .get("status")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ClientError::Protocol(format!("query-migrate without a status: {info}"))
                })?
                .to_owned();
            if wanted.contains(&status.as_str()) {
                return Ok(info);
            }
            if status == MigrationStatus::Failed.as_str() {
                let desc = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("(no error-desc)")
                    .to_owned();
                return Err(ClientError::MigrationFailed { desc });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout {
                    what: format!("migration status {}", wanted.join("|")),
                    last_status: Some(status),
                });
            }
            self.pump((now + STATUS_POLL_INTERVAL).min(deadline), |_| false)?;
        }
    }
}
