//! Migration channels under hostile or unusual paths and peers (issue 10): `unix:` never
//! unlinks what is not a socket, `file:` output is private and never follows a symlink,
//! `file:` input refuses what a cancel could not interrupt, `fd:` of a listening TCP
//! socket accepts TCP, and `precopy-timeout` bounds a silent peer in precopy on both ends
//! while a slow but live precopy runs to the end.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use serde_json::json;

use support::helper::HelperVm;
use support::migrate::{pass_socketpair, socketpair};
use support::util::{assert_same_memory, fill_mixed, test_seed, TempDir, MIB};

const QUIET: &[&str] = &["--log-level", "warn"];
const DEADLINE: Duration = Duration::from_secs(60);

fn helper(size: u64) -> HelperVm {
    let mut h = HelperVm::spawn_with_args(QUIET);
    h.add_block("ram", size, false);
    h
}

/// A source helper whose guest is random, and a destination with the same block.
fn pair(size: u64, test: &str) -> (HelperVm, HelperVm) {
    let src = helper(size);
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.1);
    (src, helper(size))
}

fn error_of(r: Result<(), qemu_migration_helper::client::ClientError>) -> String {
    match r {
        Ok(()) => panic!("the command succeeded"),
        Err(e) => e.to_string(),
    }
}

/// Migrates `src` -> `dst` over a fresh socketpair and checks the memory.
fn migrate_ok(src: &mut HelperVm, dst: &mut HelperVm, name: &str, test: &str) {
    let (a, b) = socketpair();
    dst.client.getfd(name, b.as_fd()).expect("getfd");
    src.client.getfd(name, a.as_fd()).expect("getfd");
    drop((a, b));
    dst.client
        .migrate_incoming(&format!("fd:{name}"))
        .expect("incoming");
    src.client.migrate(&format!("fd:{name}")).expect("migrate");
    src.wait(&["completed"], DEADLINE);
    dst.wait(&["completed"], DEADLINE);
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
}

#[test]
fn unix_listen_keeps_a_regular_file_at_its_path() {
    let test = "unix_listen_keeps_a_regular_file_at_its_path";
    let dir = TempDir::new("qmh-tr");
    let path = dir.join("not-a-socket");
    std::fs::write(&path, b"precious").unwrap();
    let (mut src, mut dst) = pair(4 * MIB, test);
    let e = error_of(
        dst.client
            .migrate_incoming(&format!("unix:{}", path.display())),
    );
    assert!(e.contains("is a regular file, not a socket"), "{test}: {e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious", "{test}");
    // The helper still migrates, over unix: at a free path.
    let sock = dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    dst.client.migrate_incoming(&uri).expect("incoming");
    src.client.migrate(&uri).expect("migrate");
    src.wait(&["completed"], DEADLINE);
    dst.wait(&["completed"], DEADLINE);
    assert!(
        !sock.exists(),
        "{test}: the listener's socket was left behind"
    );
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
}

#[test]
fn file_output_is_0600_and_refuses_a_symlink() {
    let test = "file_output_is_0600_and_refuses_a_symlink";
    let dir = TempDir::new("qmh-tr");
    let (mut src, mut dst) = pair(4 * MIB, test);
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    src.client
        .migrate(&format!("file:{}", link.display()))
        .expect("migrate starts");
    let v = src.wait(&["failed", "completed"], DEADLINE);
    assert_eq!(v["status"], "failed", "{test}: {v}");
    let desc = v["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("symbolic link"), "{test}: {desc}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{test}");
    // A device is no output either (a write could block where no cancel reaches).
    src.client
        .migrate("file:/dev/ptmx")
        .expect("migrate starts");
    let v = src.wait(&["failed", "completed"], DEADLINE);
    let desc = v["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("character device"), "{test}: {v}");

    let out = dir.join("out.mig");
    let uri = format!("file:{}", out.display());
    src.client.migrate(&uri).expect("migrate");
    src.wait(&["completed"], DEADLINE);
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{test}: created {mode:o}");
    dst.client.migrate_incoming(&uri).expect("incoming");
    dst.wait(&["completed"], DEADLINE);
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
}

/// The case: `migrate-incoming file:/dev/ptmx` then `migrate_cancel` stuck in
/// `cancelling` for good. Now a character device (or a directory) is refused at once, and
/// the helper takes the next migration.
#[test]
fn file_input_refuses_devices_and_directories() {
    let test = "file_input_refuses_devices_and_directories";
    let (mut src, mut dst) = pair(4 * MIB, test);
    let dir = TempDir::new("qmh-tr");
    for bad in ["/dev/ptmx", "/dev/zero", dir.path().to_str().unwrap()] {
        let t = Instant::now();
        let e = error_of(dst.client.migrate_incoming(&format!("file:{bad}")));
        eprintln!("{test}: file:{bad}: {e} ({:?})", t.elapsed());
        assert!(e.contains("regular file or a FIFO"), "{test}: {bad}: {e}");
        // Nothing started, so nothing is left to cancel.
        dst.client.migrate_cancel().expect("cancel answers");
        let v = dst.client.query_migrate().expect("query");
        assert!(
            ["none", "failed", "cancelled", "completed"]
                .contains(&v["status"].as_str().unwrap_or("")),
            "{test}: {bad}: {v}"
        );
    }
    migrate_ok(&mut src, &mut dst, "mig", test);
}

/// `fd:NAME` of a listening TCP socket on the destination: the helper accepts the source's
/// TCP connection on it (it used to take it for a Unix listener and drop the connection).
#[test]
fn fd_tcp_listener_accepts_a_tcp_source() {
    let test = "fd_tcp_listener_accepts_a_tcp_source";
    let (mut src, mut dst) = pair(16 * MIB, test);
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let l = match std::net::TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{test}: skipping {addr}: cannot listen there ({e})");
                continue;
            }
        };
        let port = l.local_addr().unwrap().port();
        let host = if addr.starts_with('[') {
            "[::1]"
        } else {
            "127.0.0.1"
        };
        dst.client.getfd("lis", l.as_fd()).expect("getfd");
        drop(l);
        dst.client.migrate_incoming("fd:lis").expect("incoming");
        src.client
            .migrate(&format!("tcp:{host}:{port}"))
            .expect("migrate");
        src.wait(&["completed"], DEADLINE);
        dst.wait(&["completed"], DEADLINE);
        assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
        fill_mixed(&mut src.blocks[0].mem.map(), port as u64, 0.5);
    }
}

/// Copies `from` -> `to` until `budget` bytes have passed, then goes silent: reads
/// nothing more and sends nothing more, keeping both sockets open.
fn relay_then_stall(from: OwnedFd, to: OwnedFd, budget: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = std::fs::File::from(from);
        let mut w = std::fs::File::from(to);
        let mut buf = vec![0u8; 64 << 10];
        let mut left = budget;
        while left > 0 {
            let n = match r.read(&mut buf[..left.min(64 << 10)]) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if w.write_all(&buf[..n]).is_err() {
                return;
            }
            left -= n;
        }
        // Silent, with both ends still open, until the helpers have given up.
        std::thread::sleep(Duration::from_secs(30));
    })
}

/// A peer that goes silent in the middle of precopy: with `precopy-timeout` 1 s the
/// destination (no data) and the source (cannot send) both fail within a few seconds, with
/// an error-desc naming the timeout, and both still answer.
#[test]
fn precopy_silent_peer_fails_both_ends_after_precopy_timeout() {
    let test = "precopy_silent_peer_fails_both_ends_after_precopy_timeout";
    let (mut src, mut dst) = pair(64 * MIB, test);
    for h in [&mut src, &mut dst] {
        h.client
            .set_parameters(json!({"precopy-timeout": 1000}))
            .expect("params");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let (sa, sb) = socketpair();
    let (da, db) = socketpair();
    src.client.getfd("mig", sa.as_fd()).expect("getfd");
    dst.client.getfd("mig", db.as_fd()).expect("getfd");
    drop((sa, db));
    let relay = relay_then_stall(sb, da, 2 << 20);
    dst.client.migrate_incoming("fd:mig").expect("incoming");
    let t0 = Instant::now();
    src.client.migrate("fd:mig").expect("migrate");
    let d = dst.wait(&["failed", "completed"], DEADLINE);
    let dt = t0.elapsed();
    let s = src.wait(&["failed", "completed"], DEADLINE);
    let st = t0.elapsed();
    eprintln!(
        "{test}: destination {} after {dt:?}: {}",
        d["status"], d["error-desc"]
    );
    eprintln!(
        "{test}: source {} after {st:?}: {}",
        s["status"], s["error-desc"]
    );
    for (what, v, t) in [("destination", &d, dt), ("source", &s, st)] {
        assert_eq!(v["status"], "failed", "{test}: {what}: {v}");
        let desc = v["error-desc"].as_str().unwrap_or_default();
        assert!(
            desc.contains("precopy-timeout (1000 ms)"),
            "{test}: {what}: {desc}"
        );
        assert!(t < Duration::from_secs(15), "{test}: {what} took {t:?}");
        assert!(
            t >= Duration::from_millis(1000),
            "{test}: {what} after {t:?}"
        );
    }
    assert!(src.alive() && dst.alive(), "{test}: a helper died");
    drop(relay);
}

/// Slow but live precopy never times out: the destination waits in `migrate-incoming` for
/// 3x precopy-timeout before the source connects, the source is throttled so that the
/// migration takes several precopy-timeouts, and it waits in `pre-switchover` for 4x
/// precopy-timeout (its empty RAM parts keep the destination's timer from firing).
#[test]
fn precopy_slow_but_live_does_not_time_out() {
    let test = "precopy_slow_but_live_does_not_time_out";
    let (mut src, mut dst) = pair(8 * MIB, test);
    for h in [&mut src, &mut dst] {
        h.client
            .set_parameters(json!({"precopy-timeout": 500}))
            .expect("params");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 4 * MIB}))
        .expect("params");
    src.client
        .set_capabilities(&[("pause-before-switchover", true)])
        .expect("caps");
    let dir = TempDir::new("qmh-tr");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    dst.client.migrate_incoming(&uri).expect("incoming");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(dst.client.query_migrate().unwrap()["status"], "setup");
    let t0 = Instant::now();
    src.client.migrate(&uri).expect("migrate");
    src.wait(&["pre-switchover"], DEADLINE);
    let pass = t0.elapsed();
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(dst.client.query_migrate().unwrap()["status"], "active");
    src.client.migrate_continue().expect("continue");
    src.wait(&["completed"], DEADLINE);
    dst.wait(&["completed"], DEADLINE);
    eprintln!("{test}: first pass {pass:?}, total {:?}", t0.elapsed());
    assert!(
        pass > Duration::from_millis(1000),
        "{test}: not throttled ({pass:?})"
    );
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
}

/// `migrate tcp:` to a host that never answers the handshake (here: a listener whose
/// accept queue is full, so the kernel drops the SYNs): `migrate_cancel` ends it at once
/// (a blocking connect(2) kept the helper in `cancelling` for the kernel's SYN retries,
/// about two minutes), and the helper migrates again.
#[test]
fn cancel_ends_a_tcp_connect_that_gets_no_answer() {
    use nix::sys::socket::{listen, Backlog};
    let test = "cancel_ends_a_tcp_connect_that_gets_no_answer";
    let (mut src, mut dst) = pair(4 * MIB, test);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listen(&l, Backlog::new(0).unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    // Fill the accept queue; these connections are never accepted.
    let fillers: Vec<_> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()
        })
        .collect();
    src.client.migrate(&format!("tcp:{addr}")).expect("migrate");
    std::thread::sleep(Duration::from_millis(1000));
    let v = src.client.query_migrate().expect("query");
    if v["status"] != "setup" {
        eprintln!("{test}: skipped: the connect was not left unanswered here ({v})");
        return;
    }
    let t = Instant::now();
    src.client.migrate_cancel().expect("cancel");
    let v = src.wait(&["cancelled", "failed"], DEADLINE);
    let took = t.elapsed();
    eprintln!(
        "{test}: {} after {took:?} ({} fillers)",
        v["status"],
        fillers.len()
    );
    assert_eq!(v["status"], "cancelled", "{test}: {v}");
    assert!(
        took < Duration::from_secs(5),
        "{test}: cancel took {took:?}"
    );
    drop((fillers, l));
    migrate_ok(&mut src, &mut dst, "again", test);
}

/// A real QEMU 10.0 source connecting with `tcp:` to a helper destination that was given
/// a listening TCP socket as `fd:NAME`.
#[test]
fn qemu10_source_to_fd_tcp_listener() {
    use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
    let test = "qemu10_source_to_fd_tcp_listener";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let size = 64 * MIB;
    let mut src = QemuVm::start(Qemu::V10, size, &VmOpts::default());
    fill_mixed(&mut src.ram_mmap(), test_seed(test), 0.3);
    let mut dst = helper(size);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    dst.client.getfd("lis", l.as_fd()).expect("getfd");
    drop(l);
    dst.client.migrate_incoming("fd:lis").expect("incoming");
    src.qmp()
        .set_parameters(json!({"max-bandwidth": 1u64 << 33}))
        .expect("params");
    src.qmp()
        .migrate(&format!("tcp:127.0.0.1:{port}"))
        .expect("migrate");
    src.wait_migration(&["completed"], DEADLINE)
        .expect("qemu completes");
    dst.wait(&["completed"], DEADLINE);
    assert_same_memory(&src.ram_mmap(), &dst.blocks[0].mem.map(), test);
}

/// What the man page says of QEMU: a QEMU 10.0 source paused in `pre-switchover` sends
/// nothing, so a helper destination with a shorter precopy-timeout fails (the documented
/// remedy: precopy-timeout 0 or longer than the pause on such a destination), while a
/// short link-timeout (postcopy's) does not touch it and the same pause completes.
#[test]
fn qemu10_source_silent_in_pre_switchover() {
    use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
    let test = "qemu10_source_silent_in_pre_switchover";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let size = 32 * MIB;
    for (params, fails) in [
        (json!({"precopy-timeout": 1000}), true),
        (json!({"link-timeout": 1000}), false),
    ] {
        let mut src = QemuVm::start(Qemu::V10, size, &VmOpts::default());
        fill_mixed(&mut src.ram_mmap(), test_seed(test), 0.3);
        let mut dst = helper(size);
        dst.client.set_parameters(params.clone()).expect("params");
        pass_socketpair(src.qmp(), &mut dst.client, "mig");
        dst.client.migrate_incoming("fd:mig").expect("incoming");
        src.qmp()
            .set_capabilities(&[("pause-before-switchover", true)])
            .expect("caps");
        src.qmp()
            .set_parameters(json!({"max-bandwidth": 1u64 << 33}))
            .expect("params");
        src.qmp().migrate("fd:mig").expect("migrate");
        src.wait_migration(&["pre-switchover"], DEADLINE)
            .expect("qemu pauses");
        std::thread::sleep(Duration::from_millis(3000));
        let v = dst.client.query_migrate().expect("query");
        eprintln!(
            "{test}: {params}: destination {} {}",
            v["status"], v["error-desc"]
        );
        if fails {
            assert_eq!(v["status"], "failed", "{test}: {v}");
            let desc = v["error-desc"].as_str().unwrap_or_default();
            assert!(desc.contains("precopy-timeout (1000 ms)"), "{test}: {desc}");
            continue;
        }
        assert_eq!(v["status"], "active", "{test}: {v}");
        src.qmp().migrate_continue().expect("continue");
        src.wait_migration(&["completed"], DEADLINE)
            .expect("qemu completes");
        dst.wait(&["completed"], DEADLINE);
        assert_same_memory(&src.ram_mmap(), &dst.blocks[0].mem.map(), test);
    }
}
