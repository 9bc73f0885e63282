//! The helper driven by QEMU's own Python client, `qemu.qmp` (PyPI, installed by
//! tests/install-deps.sh): whole migrations from a helper to a helper and to QEMU 10.0
//! through tests/interop/qmp_client.py, fds passed with its `send_fd_scm`, RAM compared
//! byte for byte. Without qemu.qmp the tests are skipped, or fail with `QMH_REQUIRE_QEMU=1`.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::bad_input::SocketHelper;
use support::helper::Memfd;
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::util::{assert_same_memory, fill_mixed, test_seed, TempDir, MIB};

/// Whether `python3` can import qemu.qmp; skips (or fails when required) if not.
pub(crate) fn have_qemu_qmp(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("QMH_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!(
                "{test}: python3 cannot import qemu.qmp and QMH_REQUIRE_QEMU=1 \
                 (run tests/install-deps.sh)"
            );
        }
        eprintln!("{test}: skipped: python3 cannot import qemu.qmp (run tests/install-deps.sh)");
    }
    ok
}

#[test]
fn qemu_qmp_client_drives_a_migration() {
    qmp_client_migration("qemu_qmp_client_drives_a_migration", false);
}

/// The same client drives a helper source and a QEMU 10.0 destination (through a second
/// QMP monitor of that QEMU).
#[test]
fn qemu_qmp_client_drives_helper_to_qemu10() {
    qmp_client_migration("qemu_qmp_client_drives_helper_to_qemu10", true);
}

fn qmp_client_migration(test: &str, to_qemu: bool) {
    if !have_qemu_qmp(test) {
        return;
    }
    if to_qemu && require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let size = 64 * MIB;
    let seed = test_seed(test);
    let src_mem = Memfd::new("qmp-src", size);
    fill_mixed(&mut src_mem.map(), seed, 0.3);
    let dst_mem = Memfd::new("qmp-dst", size);
    let quiet = ["--log-level", "warn"];
    let src = SocketHelper::spawn_with(&quiet, Stdio::inherit(), false);
    let qmp_dir = TempDir::new("qmh-qmp-qemu");
    let (dst_helper, dst_qemu, dst_path) = if to_qemu {
        let path = qmp_dir.join("qmp.sock");
        let opts = VmOpts {
            extra_args: vec![
                "-chardev".into(),
                format!("socket,id=qmp2,path={},server=on,wait=off", path.display()),
                "-mon".into(),
                "chardev=qmp2,mode=control".into(),
            ],
            ..VmOpts::incoming()
        };
        (None, Some(QemuVm::start(Qemu::V10, size, &opts)), path)
    } else {
        let h = SocketHelper::spawn_with(&quiet, Stdio::inherit(), false);
        let path = h.path.clone();
        (Some(h), None, path)
    };
    for path in [&src.path, &dst_path] {
        // qemu.qmp does not retry: wait until the sockets exist.
        let t0 = std::time::Instant::now();
        while !path.exists() {
            assert!(
                t0.elapsed().as_secs() < 10,
                "{} never appeared",
                path.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/qmp_client.py");
    let (sfd, dfd) = (src_mem.fd.as_raw_fd(), dst_mem.fd.as_raw_fd());
    let args = [
        src.path.display().to_string(),
        dst_path.display().to_string(),
        sfd.to_string(),
        dfd.to_string(),
        size.to_string(),
        (if to_qemu { "qemu" } else { "helper" }).to_string(),
    ];
    let t0 = std::time::Instant::now();
    let out = python_with_fds(&script, &args, &[sfd, dfd]);

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qmp_client.py failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("qmp_client.py output");
    eprintln!(
        "{test}: qemu.qmp migrated {} MiB in {:?}",
        size >> 20,
        t0.elapsed()
    );
    assert_eq!(v["src"]["status"], "completed", "{v}");
    assert_eq!(v["dst"]["status"], "completed", "{v}");
    assert_eq!(v["version"]["qemu"]["major"], 10, "{v}");
    drop(dst_helper);
    assert_eq!(v["greeting"], serde_json::json!(["oob"]), "{v}");
    let oob = v["oob_error"].as_str().unwrap_or_default();
    assert!(oob.contains("does not support OOB"), "{v}");
    let events: Vec<&str> = v["dst_events"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        events.contains(&"completed"),
        "destination events {events:?}"
    );
    match &dst_qemu {
        Some(q) => assert_same_memory(&src_mem.map(), &q.ram_mmap(), test),
        None => assert_same_memory(&src_mem.map(), &dst_mem.map(), test),
    }
}

/// Runs `python3 script args...` with `fds` (close-on-exec in the test) inherited, and
/// returns what it printed.
pub(crate) fn python_with_fds(
    script: &Path,
    args: &[String],
    fds: &[std::os::fd::RawFd],
) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("python3");
    cmd.arg(script).args(args);
    let fds = fds.to_vec();
    // SAFETY: fcntl is async-signal-safe; runs in the child only.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.output().expect("python3")
}
