//! The multifd capability and parameters over the command handlers: set, query, and the
//! refusals at set time and at migrate/migrate-incoming time.

use std::time::Duration;

use serde_json::{json, Value};

use super::testing::{helper, run};
use super::{CmdResult, Helper};
use crate::engine::state::MigrationStatus;

fn err(h: &Helper, name: &str, args: Value) -> String {
    run(h, name, args).expect_err("refused").desc
}

fn getfd(h: &Helper, name: &str, fd: std::os::fd::OwnedFd) {
    let Value::Object(args) = json!({ "fdname": name }) else {
        unreachable!()
    };
    h.dispatch("getfd", &args, vec![fd]).unwrap();
}

/// A 1 MiB block, so that migrate/migrate-incoming get past their block check.
fn add_block(h: &Helper) {
    let memfd = nix::sys::memfd::memfd_create(
        c"multifd-test",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .unwrap();
    nix::unistd::ftruncate(&memfd, 1 << 20).unwrap();
    getfd(h, "ram0", memfd);
    run(
        h,
        "ram-block-add",
        json!({"id": "ram", "fdname": "ram0", "offset": 0, "size": 1 << 20}),
    )
    .unwrap();
}

fn set_caps(h: &Helper, caps: &[(&str, bool)]) -> CmdResult {
    let caps: Vec<Value> = caps
        .iter()
        .map(|(c, s)| json!({"capability": c, "state": s}))
        .collect();
    run(
        h,
        "migrate-set-capabilities",
        json!({ "capabilities": caps }),
    )
}

fn params(h: &Helper) -> Value {
    run(h, "query-migrate-parameters", json!({})).unwrap()
}

#[test]
fn the_multifd_capability_is_listed_and_set() {
    let h = helper();
    let caps = run(&h, "query-migrate-capabilities", json!({})).unwrap();
    assert!(caps
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "multifd", "state": false})));
    set_caps(&h, &[("multifd", true)]).unwrap();
    let caps = run(&h, "query-migrate-capabilities", json!({})).unwrap();
    assert!(caps
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "multifd", "state": true})));
}

#[test]
fn multifd_parameters_have_qemus_defaults_and_checks() {
    let h = helper();
    let p = params(&h);
    assert_eq!(p["multifd-channels"], 2);
    assert_eq!(p["multifd-compression"], "none");
    assert_eq!(p["zero-page-detection"], "multifd", "QEMU 10.0's default");
    assert_eq!(p["vm-uuid"], "00000000-0000-0000-0000-000000000000");
    for n in [0, 256] {
        assert_eq!(
            err(&h, "migrate-set-parameters", json!({"multifd-channels": n})),
            "Parameter 'multifd_channels' expects a value between 1 and 255"
        );
    }
    let set = |v: Value| run(&h, "migrate-set-parameters", v);
    set(json!({"multifd-channels": 255})).unwrap();
    assert_eq!(params(&h)["multifd-channels"], 255);
    set(json!({"multifd-compression": "none"})).unwrap();
    assert_eq!(
        err(
            &h,
            "migrate-set-parameters",
            json!({"multifd-compression": "zstd"})
        ),
        "multifd-compression 'zstd' is not supported by the helper (only 'none')"
    );
    assert_eq!(
        err(
            &h,
            "migrate-set-parameters",
            json!({"multifd-compression": "lz4"})
        ),
        "Parameter 'multifd-compression' does not accept value 'lz4'"
    );
    assert_eq!(
        err(
            &h,
            "migrate-set-parameters",
            json!({"zero-page-detection": "all"})
        ),
        "Parameter 'zero-page-detection' does not accept value 'all'"
    );
    // Unset, it follows the compat version; set, it stays.
    set(json!({"compat-version": "7.2"})).unwrap();
    assert_eq!(params(&h)["zero-page-detection"], "legacy");
    set(json!({"zero-page-detection": "none"})).unwrap();
    set(json!({"compat-version": "10.0"})).unwrap();
    assert_eq!(params(&h)["zero-page-detection"], "none");
    let e = err(
        &h,
        "migrate-set-parameters",
        json!({"vm-uuid": "not-a-uuid"}),
    );
    assert!(e.contains("vm-uuid") && e.contains("8-4-4-4-12"), "{e}");
    set(json!({"vm-uuid": "6BA7B810-9DAD-11D1-80B4-00C04FD430C8"})).unwrap();
    assert_eq!(
        params(&h)["vm-uuid"],
        "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
    );
    // A refused argument leaves the others of the same command unset.
    let e = err(
        &h,
        "migrate-set-parameters",
        json!({"multifd-channels": 3, "vm-uuid": "x"}),
    );
    assert!(e.contains("vm-uuid"), "{e}");
    assert_eq!(params(&h)["multifd-channels"], 255);
}

#[test]
fn multifd_with_postcopy_needs_compat_10_1() {
    let h = helper();
    set_caps(&h, &[("multifd", true)]).unwrap();
    assert_eq!(
        set_caps(&h, &[("postcopy-ram", true)]).unwrap_err().desc,
        "Postcopy is not yet compatible with multifd"
    );
    let caps = run(&h, "query-migrate-capabilities", json!({})).unwrap();
    assert!(caps
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "postcopy-ram", "state": false})));
    run(
        &h,
        "migrate-set-parameters",
        json!({"compat-version": "10.1"}),
    )
    .unwrap();
    set_caps(&h, &[("postcopy-ram", true)]).unwrap();
    // compat-version may go back: migrate and migrate-incoming check again.
    run(
        &h,
        "migrate-set-parameters",
        json!({"compat-version": "10.0"}),
    )
    .unwrap();
    add_block(&h);
    for cmd in ["migrate", "migrate-incoming"] {
        assert_eq!(
            err(&h, cmd, json!({"uri": "unix:/nonexistent/x"})),
            "Postcopy is not yet compatible with multifd",
            "{cmd}"
        );
    }
}

#[test]
fn zero_pages_in_packets_are_refused_towards_a_pre_9_0_peer() {
    let h = helper();
    add_block(&h);
    run(
        &h,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    )
    .unwrap();
    run(
        &h,
        "migrate-set-parameters",
        json!({"zero-page-detection": "multifd", "compat-version": "7.2"}),
    )
    .unwrap();
    for cmd in ["migrate", "migrate-incoming"] {
        let e = err(&h, cmd, json!({"uri": "unix:/nonexistent/x"}));
        assert!(
            e.contains("zero-page-detection 'multifd'") && e.contains("7.2"),
            "{cmd}: {e}"
        );
    }
    // So does a machine type of 8.2.
    run(
        &h,
        "migrate-set-parameters",
        json!({"compat-version": "10.0", "machine-type": "pc-q35-8.2"}),
    )
    .unwrap();
    assert!(err(&h, "migrate", json!({"uri": "unix:/nonexistent/x"})).contains("8.2"));
}

#[test]
fn multifd_over_fd_needs_every_named_channel_and_refuses_files() {
    let h = helper();
    add_block(&h);
    set_caps(&h, &[("multifd", true)]).unwrap();
    let (a, _a) = std::os::unix::net::UnixStream::pair().unwrap();
    let (b, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    for cmd in ["migrate", "migrate-incoming"] {
        assert_eq!(
            err(&h, cmd, json!({"uri": "fd:m"})),
            "File descriptor named 'm' not found",
            "{cmd}: the main one first"
        );
    }
    getfd(&h, "m", a.into());
    getfd(&h, "m-multifd-0", b.into());
    for cmd in ["migrate", "migrate-incoming"] {
        assert_eq!(
            err(&h, cmd, json!({"uri": "fd:m"})),
            "multifd needs 2 channels: fd 'm-multifd-1' not found",
            "{cmd}"
        );
    }
    // Nothing was taken: both fds are still there.
    run(&h, "closefd", json!({"fdname": "m"})).unwrap();
    run(&h, "closefd", json!({"fdname": "m-multifd-0"})).unwrap();
    let dir = std::env::temp_dir().join(format!("qmh-mfd-file-{}", std::process::id()));
    let uri = format!("file:{}", dir.display());
    for cmd in ["migrate", "migrate-incoming"] {
        let e = err(&h, cmd, json!({ "uri": uri }));
        assert!(e.contains("mapped-ram"), "{cmd}: {e}");
    }
    assert!(!dir.exists());
}

#[test]
fn multifd_settings_stay_while_a_migration_runs_and_cancel_ends_the_wait() {
    let h = helper();
    add_block(&h);
    set_caps(&h, &[("multifd", true)]).unwrap();
    let dir = std::env::temp_dir().join(format!("qmh-mfd-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let sock = dir.join("s");
    run(
        &h,
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    )
    .unwrap();
    // The main channel alone: the destination keeps waiting for the multifd ones.
    let _main = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    for (k, v) in [
        ("multifd-channels", json!(4)),
        ("zero-page-detection", json!("none")),
        ("vm-uuid", json!("6ba7b810-9dad-11d1-80b4-00c04fd430c8")),
    ] {
        assert_eq!(
            err(&h, "migrate-set-parameters", json!({ k: v })),
            format!("{k} cannot change while a migration is running")
        );
    }
    run(&h, "migrate_cancel", json!({})).unwrap();
    let st = h
        .ctx
        .state
        .wait_for(Duration::from_secs(5), |s| s == MigrationStatus::Cancelled);
    assert_eq!(st, MigrationStatus::Cancelled);
    assert!(!sock.exists(), "the listener's path is removed");
    run(&h, "migrate-set-parameters", json!({"multifd-channels": 4})).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
