//! The control channel against hostile and careless clients: QMP framing as QEMU's (a JSON
//! stream), crafted messages that would blow up a parser, fds that must not leak, who may
//! connect to `--control-socket`, and logs that a peer's strings cannot forge.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use qemu_migration_helper::client::HelperClient;
use serde_json::{json, Value};

use crate::bad_input::{Raw, SocketHelper};
use support::helper::{helper_bin, HelperVm};
use support::migrate::socketpair;
use support::util::{TempDir, MIB};

/// Peak RSS a helper may reach while refusing every crafted message below. The biggest
/// legitimate buffer is one 64 MiB message; nothing may grow with what the client sends.
const CRAFTED_PEAK_MIB: u64 = 160;
/// Peak RSS with a legitimate 40 MiB device-state-set (53 MiB of base64): the message, the
/// parsed string and the decoded bytes.
const LARGE_LEGIT_PEAK_MIB: u64 = 400;
/// The nobody user the access tests connect as.
const NOBODY: u32 = 65534;

/// Writes `mib` MiB of `byte` to the control socket, a MiB at a time.
fn write_mib(s: &mut UnixStream, byte: u8, mib: usize) {
    let chunk = vec![byte; MIB as usize];
    for _ in 0..mib {
        s.write_all(&chunk).unwrap();
    }
}

fn pid_of(h: &SocketHelper) -> u32 {
    h.child.id()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

fn memfds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| memfd_create(c"qmh-fd-test", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd"))
        .collect()
}

/// Sends `data` with `fds` on one sendmsg (the rest of `data`, if any, without fds).
fn send_with_fds(c: &mut Raw, data: &[u8], fds: &[RawFd]) {
    let n = sendmsg::<()>(
        c.s.as_raw_fd(),
        &[IoSlice::new(data)],
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .expect("sendmsg");
    c.s.write_all(&data[n..]).unwrap();
}

fn error_desc(r: &Value) -> String {
    r["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error reply, got {r}"))
        .to_string()
}

/// Waits until the helper's fd count is `want` (closing is synchronous, but give the
/// reply a moment to be sent before the count is read).
fn wait_fd_count(pid: u32, want: usize, what: &str) {
    let t0 = Instant::now();
    loop {
        let n = fd_count(pid);
        if n == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: helper holds {n} fds, baseline {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Objects without separators, `\r\n`, several per write and one split across writes, as
/// QEMU's parser takes them; oob negotiated as QEMU does; garbage gets one error reply and
/// the stream resynchronises.
#[test]
fn control_json_stream_framing_like_qemu() {
    let mut h = SocketHelper::spawn();
    let mut c = h.connect();
    // exec-oob before oob is enabled is an unexpected member (and not negotiation).
    c.s.write_all(br#"{"exec-oob":"qmp_capabilities","id":0}"#)
        .unwrap();
    let r = c.read_msg();
    assert!(error_desc(&r).contains("'exec-oob' is unexpected"), "{r}");
    let r = c.cmd(r#"{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}"#);
    assert!(error_desc(&r).contains("bogus"), "{r}");
    // No newline at all, as qemu.qmp sends.
    c.s.write_all(br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}"#)
        .unwrap();
    let r = c.read_msg();
    assert_eq!(r, json!({"return": {}, "id": 1}));
    c.s.write_all(b"{\"execute\":\"query-migrate\",\"id\":2}{\"execute\":\"query-version\",\"id\":3}\r\n{\"execute\":")
        .unwrap();
    assert_eq!(c.read_msg()["id"], 2);
    assert_eq!(c.read_msg()["id"], 3);
    c.s.write_all(b" \"query-migrate\", \"id\": 4}").unwrap();
    assert_eq!(c.read_msg()["id"], 4);
    // QEMU's single-quoted strings.
    let r = c.cmd(r#"{'execute': 'query-migrate', 'id': 'q'}"#);
    assert_eq!(r["id"], "q", "{r}");
    // exec-oob with oob enabled: allowed for migrate-pause (which then fails: nothing to
    // pause), refused for a command without allow-oob.
    let r = c.cmd(r#"{"exec-oob":"migrate-pause","id":5}"#);
    assert!(!error_desc(&r).contains("OOB"), "{r}");
    assert_eq!(r["id"], 5);
    let r = c.cmd(r#"{"exec-oob":"query-migrate","id":6}"#);
    assert_eq!(
        error_desc(&r),
        "The command query-migrate does not support OOB",
        "{r}"
    );
    let r = c.cmd(r#"{"exec-oob":"no-such","id":7}"#);
    assert!(error_desc(&r).contains("not been found"), "{r}");
    // Garbage: one error, then the next object on the stream is served.
    c.s.write_all(b"@#$ garbage\n{\"execute\":\"query-migrate\",\"id\":8}")
        .unwrap();
    let r = c.read_msg();
    assert!(error_desc(&r).contains("stray"), "{r}");
    assert_eq!(c.read_msg()["id"], 8);
    // An object cut short by a control character.
    c.s.write_all(b"{\"execute\": \"query-mig\x01rate\"}{\"execute\":\"query-migrate\",\"id\":9}")
        .unwrap();
    let r = c.read_msg();
    assert!(error_desc(&r).contains("JSON parse error"), "{r}");
    // `rate"}` is skipped up to the `}` that the recovery stops at, which is then an
    // unbalanced value of its own: a second error, as QEMU sends.
    let r = c.read_msg();
    assert!(r.get("error").is_some(), "{r}");
    assert_eq!(c.read_msg()["id"], 9);
    assert_eq!(c.status(), "none");
    assert!(h.alive());
}

/// Crafted messages: a 60 MB array of small numbers, 10 M levels of nesting, an 80 MiB
/// string, a 70 MiB unterminated string. Each gets one error reply while it is still
/// arriving; the helper keeps answering, and its peak RSS stays under CRAFTED_PEAK_MIB.
/// A legitimate 40 MiB device-state-set still fits.
#[test]
fn control_crafted_messages_bounded() {
    let t0 = Instant::now();
    let mut h = SocketHelper::spawn();
    let mut c = h.connect();
    c.ok(r#"{"execute":"qmp_capabilities"}"#);
    c.s.set_write_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let before = h.peak_rss_kib();
    let mut timings = Vec::new();
    let mut check = |c: &mut Raw, what: &str, keyword: &str, t: Instant| {
        let r = c.read_msg_within(Duration::from_secs(120));
        let desc = error_desc(&r);
        assert!(desc.contains(keyword), "{what}: {r}");
        assert_eq!(c.status(), "none", "{what}: still answering");
        timings.push(format!("{what}: {:?}", t.elapsed()));
    };

    // 60 MB: [1,1,1,...,1]
    let t = Instant::now();
    c.s.write_all(b"[").unwrap();
    let chunk = b"1,".repeat(MIB as usize / 2);
    for _ in 0..60 {
        c.s.write_all(&chunk).unwrap();
    }
    c.s.write_all(b"1]").unwrap();
    check(&mut c, "60 MB array", "token count limit", t);

    // 10 M opening brackets; the client then resynchronises with 0xFF, as QEMU documents.
    let t = Instant::now();
    write_mib(&mut c.s, b'[', 10);
    c.s.write_all(b"\xff\n").unwrap();
    check(&mut c, "deep nesting", "nesting depth limit", t);

    // An 80 MiB message (a device-state-set whose base64 is too big).
    let t = Instant::now();
    c.s.write_all(br#"{"execute":"device-state-set","arguments":{"sections":[{"raw":""#)
        .unwrap();
    write_mib(&mut c.s, b'A', 80);
    c.s.write_all(br#""}]}}"#).unwrap();
    check(&mut c, "80 MiB message", "too long", t);

    // A 70 MiB string that never ends; the newline ends it (a control character may not
    // appear in a string), which resynchronises.
    let t = Instant::now();
    c.s.write_all(br#"{"execute":"query-migrate","arguments":{"a":""#)
        .unwrap();
    write_mib(&mut c.s, b'b', 70);
    c.s.write_all(b"\n").unwrap();
    check(&mut c, "70 MiB unterminated string", "too long", t);

    // A short unterminated string: the error quotes its start, not all of it.
    let t = Instant::now();
    c.s.write_all(b"{\"execute\":\"query-migrate\",\"arguments\":{\"a\":\"")
        .unwrap();
    c.s.write_all(&vec![b'c'; MIB as usize]).unwrap();
    c.s.write_all(b"\n").unwrap();
    check(&mut c, "1 MiB unterminated string", "stray", t);

    let crafted_peak = h.peak_rss_kib();
    let crafted_time = t0.elapsed();

    // A legitimate large message: 40 MiB of device state, as base64 (53 MiB).
    let data = vec![0x5au8; 40 * MIB as usize];
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    drop(data);
    let msg = format!(
        r#"{{"execute":"device-state-set","arguments":{{"sections":[{{"idstr":"big","instance-id":0,"version-id":1,"data":"{b64}"}}]}},"id":"big"}}"#
    );
    drop(b64);
    let t = Instant::now();
    c.s.write_all(msg.as_bytes()).unwrap();
    drop(msg);
    let r = c.read_msg_within(Duration::from_secs(120));
    assert_eq!(
        r,
        json!({"return": {}, "id": "big"}),
        "40 MiB device-state-set"
    );
    let legit_time = t.elapsed();
    assert_eq!(c.status(), "none");
    let legit_peak = h.peak_rss_kib();
    assert!(h.alive());
    eprintln!(
        "control_crafted_messages_bounded: helper VmHWM {before} KiB at start, {crafted_peak} KiB \
         after the crafted messages ({crafted_time:?}; {}), {legit_peak} KiB after a 40 MiB \
         device-state-set ({legit_time:?})",
        timings.join(", ")
    );
    assert!(
        crafted_peak < CRAFTED_PEAK_MIB * 1024,
        "crafted messages took the helper to {crafted_peak} KiB (bound {CRAFTED_PEAK_MIB} MiB)"
    );
    assert!(
        legit_peak < LARGE_LEGIT_PEAK_MIB * 1024,
        "a 40 MiB device-state-set took the helper to {legit_peak} KiB (bound {LARGE_LEGIT_PEAK_MIB} MiB)"
    );
    assert!(
        crafted_time < Duration::from_secs(120),
        "the crafted messages took {crafted_time:?}"
    );
}

/// fds that come with a command that takes none, with a getfd that gets several, or that
/// the kernel truncates, are all closed; the helper's fd count returns to its baseline and
/// later getfds work. The named-fd cap refuses the 257th name.
#[test]
fn control_fds_never_leak() {
    let mut h = SocketHelper::spawn();
    let pid = pid_of(&h);
    let mut c = h.connect();
    c.ok(r#"{"execute":"qmp_capabilities"}"#);
    // The connection's own fds are open by now; the baseline is taken after a round trip.
    assert_eq!(c.status(), "none");
    let base = fd_count(pid);

    let twenty = memfds(20);
    let raw20: Vec<RawFd> = twenty.iter().map(|f| f.as_raw_fd()).collect();
    send_with_fds(&mut c, br#"{"execute":"query-migrate","id":1}"#, &raw20);
    let r = c.read_msg();
    assert!(r.get("return").is_some(), "{r}");
    wait_fd_count(pid, base, "20 fds with query-migrate");
    send_with_fds(
        &mut c,
        br#"{"execute":"getfd","arguments":{"fdname":"x"}}"#,
        &raw20,
    );
    let r = c.read_msg();
    assert!(error_desc(&r).contains("got 20"), "{r}");
    wait_fd_count(pid, base, "20 fds with getfd");

    // SCM_MAX_FD (253) at once: all arrive (the old 16-slot buffer truncated them).
    let many = memfds(253);
    let raw253: Vec<RawFd> = many.iter().map(|f| f.as_raw_fd()).collect();
    send_with_fds(&mut c, br#"{"execute":"query-migrate","id":2}"#, &raw253);
    let r = c.read_msg();
    assert!(r.get("return").is_some(), "{r}");
    wait_fd_count(pid, base, "253 fds with query-migrate");
    // Several messages of fds, then a command: all of them go with it and are closed.
    for chunk in raw253.chunks(100) {
        send_with_fds(&mut c, b" ", chunk);
    }
    c.s.write_all(br#"{"execute":"query-migrate","id":3}"#)
        .unwrap();
    let r = c.read_msg();
    assert_eq!(r["id"], 3, "{r}");
    wait_fd_count(pid, base, "fds sent ahead of a command");
    // 759 fds ahead of one command: past the 506 held for an unfinished command, the rest
    // are closed on arrival and the command is refused.
    for _ in 0..3 {
        send_with_fds(&mut c, b" ", &raw253);
    }
    c.s.write_all(br#"{"execute":"query-migrate","id":"many"}"#)
        .unwrap();
    let r = c.read_msg();
    assert!(error_desc(&r).contains("too many file descriptors"), "{r}");
    assert_eq!(r["id"], "many", "{r}");
    wait_fd_count(pid, base, "759 fds ahead of a command");

    // MSG_CTRUNC: with its fd limit lowered, the helper can take only some of 253; those
    // are closed and the command is refused.
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall on another process with valid pointers.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let lim = libc::rlimit {
        rlim_cur: (base + 20) as libc::rlim_t,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    send_with_fds(
        &mut c,
        br#"{"execute":"getfd","arguments":{"fdname":"trunc"},"id":4}"#,
        &raw253,
    );
    let r = c.read_msg();
    assert!(error_desc(&r).contains("lost"), "{r}");
    assert_eq!(r["id"], 4, "{r}");
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &old, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
    wait_fd_count(pid, base, "a truncated message");
    let r = c.cmd(r#"{"execute":"closefd","arguments":{"fdname":"trunc"}}"#);
    assert!(error_desc(&r).contains("not found"), "{r}");

    // getfd still works, up to the cap of 256 names.
    for i in 0..256 {
        let line = format!(r#"{{"execute":"getfd","arguments":{{"fdname":"n{i}"}}}}"#);
        let r = c.cmd_fds(&line, &[raw253[i % 253]]);
        assert!(r.get("return").is_some(), "getfd n{i}: {r}");
    }
    assert_eq!(fd_count(pid), base + 256);
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"one-too-many"}}"#,
        &[raw253[0]],
    );
    assert!(error_desc(&r).contains("limit 256"), "{r}");
    // Replacing a name is not a new one.
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"n0"}}"#,
        &[raw253[1]],
    );
    assert!(r.get("return").is_some(), "{r}");
    for i in 0..256 {
        c.ok(&format!(
            r#"{{"execute":"closefd","arguments":{{"fdname":"n{i}"}}}}"#
        ));
    }
    wait_fd_count(pid, base, "after closefd of every name");
    assert!(h.alive());
}

/// Runs a client as `nobody` that connects to `path` and prints what it read within 3 s
/// (the greeting, or nothing when the helper hangs up).
fn connect_as_nobody(path: &std::path::Path) -> String {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect failed:", e.errno); sys.exit(0)
s.settimeout(3)
data = b""
try:
    while b"\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except socket.timeout:
    pass
print("read:", data.decode(errors="replace").strip())
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("python3 as nobody");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The socket is 0600 even under umask 000; a peer of another uid is refused (logged, no
/// greeting) unless allowed with --allow-uid; a regular file at the path is left alone; a
/// reconnecting client finds its named fds and blocks.
#[test]
fn control_socket_only_the_owner_gets_in() {
    if qemu_migration_helper::control::listen::own_uid() != 0 {
        eprintln!(
            "control_socket_only_the_owner_gets_in: skipped, needs root to run a client as nobody"
        );
        return;
    }
    let dir = TempDir::new("qmh-control-log");
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let mut h = SocketHelper::spawn_with(&["--log-level", "info"], Stdio::from(log), true);
    let mut c = h.connect();
    let mode = std::fs::symlink_metadata(&h.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o} under umask 000");
    c.ok(r#"{"execute":"qmp_capabilities"}"#);
    let mem = memfds(1);
    nix::unistd::ftruncate(&mem[0], MIB as i64).unwrap();
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"m"}}"#,
        &[mem[0].as_raw_fd()],
    );
    assert!(r.get("return").is_some(), "{r}");
    c.ok(r#"{"execute":"ram-block-add","arguments":{"id":"ram","fdname":"m","offset":0,"size":1048576}}"#);
    let (a, _b) = socketpair();
    let r = c.cmd_fds(
        r#"{"execute":"getfd","arguments":{"fdname":"kept"}}"#,
        &[a.as_raw_fd()],
    );
    assert!(r.get("return").is_some(), "{r}");
    drop(c);

    // As root, the 0600 socket can be opened up to test the peer check itself.
    std::fs::set_permissions(&h.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let seen = connect_as_nobody(&h.path);
    assert_eq!(seen, "read:", "nobody was not refused before the greeting");

    // The owner reconnects: named fds and blocks are still there.
    let mut c = h.connect();
    c.ok(r#"{"execute":"qmp_capabilities"}"#);
    let blocks = c.ok(r#"{"execute":"query-ram-blocks"}"#);
    assert_eq!(blocks[0]["id"], "ram", "{blocks}");
    c.ok(r#"{"execute":"closefd","arguments":{"fdname":"kept"}}"#);
    c.ok(r#"{"execute":"quit"}"#);
    drop(c);
    let _ = h.child.wait();
    let text = std::fs::read_to_string(dir.join("log")).unwrap();
    let refused = text
        .lines()
        .find(|l| l.contains("refused a control connection"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{text}"));
    assert!(refused.contains(&format!("uid: {NOBODY}")), "{refused}");
    assert!(refused.contains("pid: "), "{refused}");
    assert!(!h.path.exists(), "socket removed on quit");

    // --allow-uid lets nobody in.
    let h = SocketHelper::spawn_with(
        &["--log-level", "warn", "--allow-uid", &NOBODY.to_string()],
        Stdio::inherit(),
        false,
    );
    drop(HelperClient::connect(&h.path).expect("owner connects"));
    std::fs::set_permissions(&h.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let seen = connect_as_nobody(&h.path);
    assert!(seen.contains("\"QMP\""), "allowed uid got: {seen}");
    drop(h);

    // A regular file at the path is neither removed nor replaced.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let out = Command::new(helper_bin())
        .arg("--control-socket")
        .arg(&file)
        .output()
        .expect("helper");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

/// A peer's machine name with a newline and an ANSI escape: the text log gets one escaped
/// line, no forged line and no raw ESC.
#[test]
fn control_logs_escape_stream_strings() {
    let dir = TempDir::new("qmh-log-escape");
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let mut h = HelperVm::spawn_on_socket(&["--log-level", "info"], Stdio::from(log));
    h.add_block("ram", MIB, false);
    let c = &mut h.client;
    let (ours, theirs) = socketpair();
    c.getfd("mig", theirs.as_fd()).expect("getfd");
    drop(theirs);
    c.migrate_incoming("fd:mig").expect("incoming");
    let evil = "pc\nDec 02 06:00:00.000 INFO forged line, role: admin\x1b[31m";
    let mut stream = Vec::new();
    qemu_migration_helper::wire::stream::encode_header(&mut stream);
    qemu_migration_helper::wire::stream::encode_configuration(&mut stream, evil).unwrap();
    stream.extend_from_slice(&[0xee; 16]); // then garbage: the load fails
    let mut s = UnixStream::from(ours);
    let _ = s.write_all(&stream);
    drop(s);
    let end = c
        .wait_for_status(&["failed", "completed"], Duration::from_secs(60))
        .expect("status");
    assert_eq!(end["status"], "failed", "{end}");
    h.quit_and_wait(Duration::from_secs(60));
    let mut text = String::new();
    std::fs::File::open(dir.join("log"))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(!text.contains('\x1b'), "raw ESC in the log:\n{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("Dec 02 06:00:00.000")),
        "forged line in the log:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("incoming stream"))
        .unwrap_or_else(|| panic!("no 'incoming stream' line:\n{text}"));
    assert!(
        line.contains(r"machine: pc\nDec 02 06:00:00.000 INFO forged line, role: admin\u{1b}[31m"),
        "{line}"
    );
}
