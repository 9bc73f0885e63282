//! The client against a scripted helper on a socketpair.

use super::*;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::sys::stat::fstat;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread::JoinHandle;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "qemu-migration-helper 0.1.0"}, "capabilities": ["oob"]}}"#;

/// The scripted helper side: reads lines with recvmsg, collecting any passed fds.
struct Peer {
    sock: UnixStream,
    buf: Vec<u8>,
    /// Fds received, each with the bytes of the recvmsg that carried it.
    fds: Vec<(OwnedFd, Vec<u8>)>,
}

impl Peer {
    fn new(sock: UnixStream) -> Self {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Peer {
            sock,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    fn send(&mut self, line: &str) {
        self.sock.write_all(line.as_bytes()).unwrap();
        self.sock.write_all(b"\n").unwrap();
    }

    /// Reads one command; `None` at EOF.
    fn recv(&mut self) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            let mut data = [0u8; 4096];
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let (n, got) = {
                let mut iov = [IoSliceMut::new(&mut data)];
                let msg = recvmsg::<UnixAddr>(
                    self.sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .unwrap();
                let mut got = Vec::new();
                for c in msg.cmsgs().unwrap() {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        got.extend(fds);
                    }
                }
                (msg.bytes, got)
            };
            for fd in got {
                // SAFETY: freshly received, owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                self.fds.push((fd, data[..n].to_vec()));
            }
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&data[..n]);
        }
    }

    /// Reads one command, checks its name, returns (id, arguments).
    fn expect(&mut self, name: &str) -> (Value, Value) {
        let cmd = self.recv().expect("command");
        assert_eq!(cmd["execute"], name, "{cmd}");
        (
            cmd["id"].clone(),
            cmd.get("arguments").cloned().unwrap_or(Value::Null),
        )
    }

    fn reply(&mut self, id: &Value, ret: Value) {
        self.send(&json!({"return": ret, "id": id}).to_string());
    }

    fn handshake(&mut self) {
        self.send(GREETING);
        let (id, args) = self.expect("qmp_capabilities");
        assert_eq!(args, json!({"enable": ["oob"]}));
        self.reply(&id, json!({}));
    }
}

fn event(name: &str, data: Value) -> String {
    json!({"event": name, "data": data, "timestamp": {"seconds": 1700000000u64, "microseconds": 42}})
        .to_string()
}

/// A client connected to a scripted peer running `script` in a thread.
fn with_peer<F>(script: F) -> (HelperClient, JoinHandle<()>)
where
    F: FnOnce(&mut Peer) + Send + 'static,
{
    let (a, b) = UnixStream::pair().unwrap();
    let peer = std::thread::spawn(move || {
        let mut peer = Peer::new(b);
        peer.handshake();
        script(&mut peer);
    });
    let client = HelperClient::from_stream(a).unwrap();
    (client, peer)
}

#[test]
fn handshake_stores_greeting_and_enables_oob() {
    let (mut client, peer) = with_peer(|p| {
        let (id, args) = p.expect("query-migrate");
        assert_eq!(args, Value::Null);
        p.reply(&id, json!({"status": "none"}));
    });
    assert_eq!(client.greeting()["QMP"]["version"]["qemu"]["major"], 10);
    assert!(client.oob_enabled());
    assert_eq!(client.query_migrate().unwrap()["status"], "none");
    peer.join().unwrap();
}

#[test]
fn command_encoding() {
    let (mut client, peer) = with_peer(|p| {
        let cmd = p.recv().unwrap();
        assert_eq!(cmd["execute"], "migrate-pause");
        assert_eq!(cmd["control"], json!({"run-oob": true}));
        assert!(cmd.get("arguments").is_none());
        p.reply(&cmd["id"], json!({}));

        let (id, args) = p.expect("migrate-set-capabilities");
        assert_eq!(
            args,
            json!({"capabilities": [
                {"capability": "postcopy-ram", "state": true},
                {"capability": "events", "state": false}]})
        );
        p.reply(&id, json!({}));

        let (id, args) = p.expect("ram-block-add");
        assert_eq!(
            args,
            json!({"id": "pc.ram", "fdname": "ram0", "offset": 0, "size": 4096,
                   "host-addr": 140000000000u64})
        );
        p.reply(&id, json!({}));

        let (id, args) = p.expect("migrate");
        assert_eq!(args, json!({"uri": "unix:/x", "resume": true}));
        p.reply(&id, json!({}));

        let (id, args) = p.expect("migrate-continue");
        assert_eq!(args, json!({"state": "pre-switchover"}));
        p.reply(&id, json!({}));

        let (id, args) = p.expect("migrate_cancel");
        assert_eq!(args, Value::Null);
        p.reply(&id, json!({}));

        let (id, args) = p.expect("device-state-set");
        assert_eq!(args, json!({"sections": [{"raw": "AAEC"}]}));
        p.reply(&id, json!({}));
    });
    client.execute_oob("migrate-pause", Value::Null).unwrap();
    client
        .set_capabilities(&[("postcopy-ram", true), ("events", false)])
        .unwrap();
    client
        .ram_block_add(&RamBlockSpec {
            id: "pc.ram".into(),
            fdname: "ram0".into(),
            offset: 0,
            size: 4096,
            host_addr: Some(140000000000),
            ..Default::default()
        })
        .unwrap();
    client.migrate_resume("unix:/x").unwrap();
    client.migrate_continue().unwrap();
    client.migrate_cancel().unwrap();
    client.device_state_set(json!([{"raw": "AAEC"}])).unwrap();
    peer.join().unwrap();
}

#[test]
fn events_before_reply_are_queued() {
    let (mut client, peer) = with_peer(|p| {
        let (id, _) = p.expect("migrate");
        p.send(&event("MIGRATION", json!({"status": "setup"})));
        p.send("");
        p.send(&event("MIGRATION_PASS", json!({"pass": 1})));
        p.reply(&id, json!({}));
        p.send(r#"{"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 6}}"#);
        p.send(&event("MIGRATION", json!({"status": "active"})));
        p.send(&event("MIGRATION", json!({"status": "completed"})));
    });
    client.migrate("fd:mig").unwrap();
    let evs = client.take_events();
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[0].name, "MIGRATION");
    assert_eq!(evs[0].data, json!({"status": "setup"}));
    assert_eq!(evs[0].timestamp, (1700000000, 42));
    assert_eq!(evs[1].name, "MIGRATION_PASS");
    assert!(client.take_events().is_empty());

    let ev = client
        .wait_event(Duration::from_secs(5), |e| e.data["status"] == "completed")
        .unwrap();
    assert_eq!(ev.name, "MIGRATION");
    let rest = client.take_events();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[0].name, "STOP");
    assert_eq!(rest[0].data, Value::Null);
    assert_eq!(rest[0].timestamp, (5, 6));
    assert_eq!(rest[1].data, json!({"status": "active"}));
    peer.join().unwrap();

    // Nothing more will come: the wait times out (the peer is gone: EOF is an error).
    let err = client
        .wait_event(Duration::from_millis(50), |_| true)
        .unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
}

#[test]
fn wait_event_takes_queued_events_first_and_times_out() {
    let (a, b) = UnixStream::pair().unwrap();
    let peer = std::thread::spawn(move || {
        let mut p = Peer::new(b);
        p.handshake();
        let (id, _) = p.expect("query-migrate");
        p.send(&event("A", json!(1)));
        p.send(&event("B", json!(2)));
        p.send(&event("C", json!(3)));
        p.reply(&id, json!({"status": "active"}));
        // Keep the socket open until the client is done.
        assert!(p.recv().is_none());
    });
    let mut client = HelperClient::from_stream(a).unwrap();
    client.query_migrate().unwrap();
    let b = client
        .wait_event(Duration::from_secs(1), |e| e.name == "B")
        .unwrap();
    assert_eq!(b.data, json!(2));
    let start = Instant::now();
    let err = client
        .wait_event(Duration::from_millis(100), |e| e.name == "D")
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(100));
    let names: Vec<String> = client.take_events().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["A", "C"]);
    drop(client);
    peer.join().unwrap();
}

#[test]
fn error_reply_is_command_error() {
    let (mut client, peer) = with_peer(|p| {
        let (id, _) = p.expect("migrate-incoming");
        p.send(
            &json!({"error": {"class": "GenericError", "desc": "no such fd 'x'"}, "id": id})
                .to_string(),
        );
        // An error without id (the helper could not parse the command) is ours too.
        let _ = p.expect("bogus");
        p.send(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#);
        let (id, _) = p.expect("query-migrate");
        p.reply(&id, json!({"status": "none"}));
    });
    match client.migrate_incoming("fd:x").unwrap_err() {
        ClientError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "migrate-incoming");
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "no such fd 'x'");
        }
        e => panic!("unexpected {e:?}"),
    }
    let err = client.execute("bogus", json!({})).unwrap_err();
    assert!(matches!(err, ClientError::Command { .. }), "{err}");
    // The connection is still usable.
    assert_eq!(client.query_migrate().unwrap()["status"], "none");
    peer.join().unwrap();
}

#[test]
fn garbage_is_protocol_error() {
    for garbage in [
        "this is not json",
        "[1, 2, 3]",
        r#"{"neither": 1}"#,
        r#"{"error": "not an object"}"#,
        r#"{"event": 5, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
        r#"{"event": "X", "timestamp": {"seconds": -1, "microseconds": 2}}"#,
        r#"{"event": "X"}"#,
        "\u{fffd}\u{0}\u{1}",
    ] {
        let (mut client, peer) = with_peer(move |p| {
            let _ = p.expect("query-migrate");
            p.send(garbage);
        });
        let err = client.query_migrate().unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{garbage}: {err}");
        peer.join().unwrap();
    }
    // Invalid UTF-8 and a reply with a foreign id.
    let (mut client, peer) = with_peer(|p| {
        let _ = p.expect("query-migrate");
        p.sock.write_all(b"\xff\xfe{\n").unwrap();
    });
    assert!(matches!(
        client.query_migrate(),
        Err(ClientError::Protocol(_))
    ));
    peer.join().unwrap();
    let (mut client, peer) = with_peer(|p| {
        let _ = p.expect("query-migrate");
        p.send(r#"{"return": {}, "id": "someone-else"}"#);
    });
    assert!(matches!(
        client.query_migrate(),
        Err(ClientError::Protocol(_))
    ));
    peer.join().unwrap();
}

#[test]
fn bad_handshakes() {
    for (greeting, reply_caps) in [
        (Some("garbage"), false),
        (Some(r#"{"return": {}}"#), false),
        (None, false),
        (Some(GREETING), true),
    ] {
        let (a, b) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut p = Peer::new(b);
            if let Some(g) = greeting {
                p.send(g);
            }
            if reply_caps {
                let (id, _) = p.expect("qmp_capabilities");
                p.send(
                    &json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id})
                        .to_string(),
                );
            }
        });
        let err = HelperClient::from_stream(a).unwrap_err();
        if reply_caps {
            assert!(matches!(err, ClientError::Command { .. }), "{err}");
        } else {
            assert!(matches!(err, ClientError::Protocol(_)), "{err}");
        }
        peer.join().unwrap();
    }
}

#[test]
fn reply_timeout_then_late_reply_is_skipped() {
    let (mut client, peer) = with_peer(|p| {
        let (late_id, _) = p.expect("query-migrate");
        let (id, _) = p.expect("query-migrate");
        p.reply(&late_id, json!({"status": "stale"}));
        p.reply(&id, json!({"status": "fresh"}));
    });
    client.set_timeout(Duration::from_millis(50)).unwrap();
    let err = client.query_migrate().unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    client.set_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(client.query_migrate().unwrap()["status"], "fresh");
    peer.join().unwrap();
}

#[test]
fn getfd_passes_the_same_file() {
    let memfd = memfd_create(c"client-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
    let want = fstat(memfd.as_raw_fd()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (mut client, peer) = with_peer(move |p| {
        assert!(p.fds.is_empty());
        let (id, args) = p.expect("getfd");
        assert_eq!(args, json!({"fdname": "ram0"}));
        assert_eq!(p.fds.len(), 1);
        let (fd, bytes) = p.fds.pop().unwrap();
        // The fd came on the very message that carried the whole command line.
        assert!(bytes.ends_with(b"\n"));
        let cmd: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(cmd["execute"], "getfd");
        let st = fstat(fd.as_raw_fd()).unwrap();
        tx.send((st.st_dev, st.st_ino)).unwrap();
        p.reply(&id, json!({}));

        let (id, args) = p.expect("closefd");
        assert_eq!(args, json!({"fdname": "ram0"}));
        assert!(p.fds.is_empty());
        p.reply(&id, json!({}));
    });
    client.getfd("ram0", &memfd).unwrap();
    client.closefd("ram0").unwrap();
    peer.join().unwrap();
    assert_eq!(rx.recv().unwrap(), (want.st_dev, want.st_ino));
}

#[test]
fn wait_for_status_polls_until_wanted() {
    let (mut client, peer) = with_peer(|p| {
        for (i, status) in ["setup", "active", "active", "completed"]
            .iter()
            .enumerate()
        {
            let (id, _) = p.expect("query-migrate");
            p.send(&event("MIGRATION_PASS", json!({"pass": i})));
            p.reply(&id, json!({"status": status, "ram": {"transferred": i}}));
        }
    });
    let info = client
        .wait_for_status(&["completed", "cancelled"], Duration::from_secs(5))
        .unwrap();
    assert_eq!(info["ram"]["transferred"], 3);
    assert_eq!(client.take_events().len(), 4);
    peer.join().unwrap();
}

#[test]
fn wait_for_status_failed_and_timeout() {
    let (mut client, peer) = with_peer(|p| {
        let (id, _) = p.expect("query-migrate");
        p.reply(
            &id,
            json!({"status": "failed", "error-desc": "connection reset"}),
        );
        let (id, _) = p.expect("query-migrate");
        p.reply(&id, json!({"status": "failed"}));
        loop {
            let Some(cmd) = p.recv() else { break };
            p.reply(&cmd["id"], json!({"status": "postcopy-paused"}));
        }
    });
    match client
        .wait_for_status(&["completed"], Duration::from_secs(5))
        .unwrap_err()
    {
        ClientError::MigrationFailed { desc } => assert_eq!(desc, "connection reset"),
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(
        client
            .wait_for_status(&["failed"], Duration::from_secs(5))
            .unwrap()["status"],
        "failed"
    );
    match client
        .wait_for_status(&["postcopy-active"], Duration::from_millis(100))
        .unwrap_err()
    {
        ClientError::Timeout { last_status, .. } => {
            assert_eq!(last_status.as_deref(), Some("postcopy-paused"))
        }
        e => panic!("unexpected {e:?}"),
    }
    drop(client);
    peer.join().unwrap();
}

#[test]
fn quit_tolerates_hangup() {
    let (mut client, peer) = with_peer(|p| {
        let _ = p.expect("quit");
    });
    client.quit().unwrap();
    peer.join().unwrap();
    // Writing to a dead helper is an error, not a SIGPIPE.
    assert!(client.query_migrate().is_err());
}

#[test]
fn connect_retries_until_the_socket_appears() {
    let dir = std::env::temp_dir().join(format!("qmh-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.sock");
    let _ = std::fs::remove_file(&path);
    let listen_path = path.clone();
    let peer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let listener = std::os::unix::net::UnixListener::bind(&listen_path).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut p = Peer::new(conn);
        p.handshake();
        let _ = p.expect("quit");
    });
    let mut client = HelperClient::connect(&path).unwrap();
    client.quit().unwrap();
    peer.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let err =
        HelperClient::connect_timeout(&dir.join("nope"), Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, ClientError::Io { .. }), "{err}");
}

#[test]
fn spawn_passes_the_control_fd() {
    let dir = std::env::temp_dir().join(format!("qmh-spawn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("fake-helper");
    // A fake helper in bash: checks its arguments, greets on fd N, answers two commands.
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/bash
[ "$1" = --control-fd ] || exit 2
fd=$2
[ "$3" = --log-format ] && [ "$4" = json ] || exit 3
echo '{GREETING}' >&$fd
read -r -u $fd line
id=$(sed 's/.*"id":\([0-9]*\).*/\1/' <<<"$line")
echo '{{"return": {{}}, "id": '$id'}}' >&$fd
read -r -u $fd line
id=$(sed 's/.*"id":\([0-9]*\).*/\1/' <<<"$line")
echo '{{"return": {{"status": "none", "fd": '$fd'}}, "id": '$id'}}' >&$fd
read -r -u $fd line || exit 0
exit 4
"#
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (mut client, mut child) = HelperClient::spawn(&script, &["--log-format", "json"]).unwrap();
    assert_eq!(client.greeting()["QMP"]["capabilities"], json!(["oob"]));
    let info = client.query_migrate().unwrap();
    assert_eq!(info["status"], "none");
    drop(client); // EOF on the helper's side makes it exit 0
    assert!(child.wait().unwrap().success());

    // A helper that dies before greeting: a Protocol error naming its exit status.
    let err = HelperClient::spawn(&script, &[]).unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("exit status: 3")),
        "{err}"
    );
    let err = HelperClient::spawn(&dir.join("missing"), &[]).unwrap_err();
    assert!(matches!(err, ClientError::Io { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
