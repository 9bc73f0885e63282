//! The sandbox (`--sandbox on|log|off`, see SANDBOX in the man page): a forbidden system
//! call kills the helper with SIGSYS and a line naming it; Landlock refuses `file:` paths
//! outside the allowed directories (symlinks included) with an error that says so, while
//! the helper keeps answering. The rest of the suite runs with the sandbox on (the default).

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use qemu_migration_helper::client::HelperClient;

use support::helper::{helper_bin, HelperVm};
use support::util::{TempDir, MIB};

/// Runs the hidden self-test (`QMH_SANDBOX_SELFTEST=execve`: the helper tries execve(2)
/// right after entering the sandbox) and returns the exit status and stderr.
fn selftest(mode: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(helper_bin())
        .args(["--control-fd", "0", "--sandbox", mode])
        .env("QMH_SANDBOX_SELFTEST", "execve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run helper");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn execve_kills_the_helper_with_the_sandbox_on() {
    let (status, err) = selftest("on");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}: {err}");
    assert!(
        err.contains("forbidden system call 59 "),
        "the SIGSYS handler names execve (59): {err}"
    );
    assert!(!err.contains("not refused"), "{err}");
}

#[test]
fn execve_is_not_refused_with_the_sandbox_off_or_logging() {
    for mode in ["off", "log"] {
        let (status, err) = selftest(mode);
        assert!(status.success(), "--sandbox {mode}: {status:?}: {err}");
        // The path does not exist: an execve that was let through says ENOENT.
        assert!(
            err.contains("execve was not refused") && err.contains("No such file"),
            "--sandbox {mode}: {err}"
        );
    }
}

/// Whether this kernel has Landlock (the ABI version query).
fn landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only
    // returns a number.
    unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, 0usize, 0usize, 1u32) }
}

fn migrate_incoming_error(c: &mut HelperClient, uri: &str) -> Option<String> {
    c.migrate_incoming(uri).err().map(|e| e.to_string())
}

#[test]
fn landlock_refuses_files_outside_the_allowed_directories() {
    let abi = landlock_abi();
    if abi < 1 {
        eprintln!("SKIP landlock_refuses_files_outside_the_allowed_directories: no Landlock in this kernel");
        return;
    }
    let dir = TempDir::new("qmh-sandbox");
    // A symlink in an allowed directory does not lead out of it.
    let link = dir.join("passwd-link");
    std::os::unix::fs::symlink("/etc/passwd", &link).expect("symlink");

    let mut h = HelperVm::spawn_with_args(&["--log-level", "warn"]);
    h.add_block("ram", MIB, false);
    for uri in [
        "file:/etc/passwd".to_string(),
        format!("file:{}", link.display()),
    ] {
        let e = migrate_incoming_error(&mut h.client, &uri)
            .unwrap_or_else(|| panic!("{uri} was opened under the sandbox"));
        assert!(
            e.contains("refused by the sandbox") && e.contains("--sandbox-allow-path"),
            "{uri}: {e}"
        );
    }
    // Still answering, and an allowed path is opened (then fails as a stream, later).
    let st = h
        .client
        .query_migrate()
        .expect("query-migrate after a refusal");
    assert!(
        st.get("status").is_none() || st["status"] != "active",
        "{st}"
    );
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"not a migration stream").unwrap();
    assert_eq!(
        migrate_incoming_error(&mut h.client, &format!("file:{}", junk.display())),
        None,
        "a file in the temporary directory is allowed"
    );
    h.wait(&["failed"], Duration::from_secs(30));

    // --sandbox-allow-path opens another directory.
    let mut h = HelperVm::spawn_with_args(&["--log-level", "warn", "--sandbox-allow-path", "/etc"]);
    h.add_block("ram", MIB, false);
    assert_eq!(
        migrate_incoming_error(&mut h.client, "file:/etc/passwd"),
        None,
        "allowed with --sandbox-allow-path /etc"
    );
    h.wait(&["failed"], Duration::from_secs(30));
}

/// Waits for `child` to exit, killing it after `timeout`.
/// `--sandbox log` refuses nothing but says in the helper's log what `on` would refuse.
#[test]
fn log_mode_reports_what_on_would_refuse() {
    let dir = TempDir::new("qmh-sandbox-log");
    let log_path = dir.join("log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut h = HelperVm::spawn_on_socket(&["--sandbox", "log"], Stdio::from(log));
    h.add_block("ram", MIB, false);
    assert_eq!(
        migrate_incoming_error(&mut h.client, "file:/etc/passwd"),
        None
    );
    h.client
        .wait_for_status(&["failed"], Duration::from_secs(30))
        .expect("failed: /etc/passwd is no stream");
    h.quit_and_wait(Duration::from_secs(10));
    let text = std::fs::read_to_string(&log_path).expect("log");
    assert!(
        text.contains("sandbox entered") && text.contains("mode: Log"),
        "{text}"
    );
    assert!(
        text.contains("--sandbox on would refuse this path") && text.contains("/etc/passwd"),
        "{text}"
    );
}
