//! fd sets (`add-fd`, `remove-fd`, `query-fdsets`) and the checks and opening of `file:`
//! migrations (mapped-ram, offsets, `/dev/fdset/N`) over the command handlers.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::testing::{helper, run};
use super::{CmdResult, Helper};

fn err(h: &Helper, name: &str, args: Value) -> String {
    run(h, name, args).expect_err("refused").desc
}

fn with_fds(h: &Helper, name: &str, args: Value, fds: Vec<OwnedFd>) -> CmdResult {
    let Value::Object(args) = args else {
        unreachable!()
    };
    h.dispatch(name, &args, fds)
}

fn set_caps(h: &Helper, caps: &[(&str, bool)]) {
    let caps: Vec<Value> = caps
        .iter()
        .map(|(c, s)| json!({"capability": c, "state": s}))
        .collect();
    run(
        h,
        "migrate-set-capabilities",
        json!({ "capabilities": caps }),
    )
    .unwrap();
}

fn add_block(h: &Helper) {
    let memfd =
        nix::sys::memfd::memfd_create(c"files-test", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap();
    nix::unistd::ftruncate(&memfd, 1 << 20).unwrap();
    with_fds(h, "getfd", json!({"fdname": "ram0"}), vec![memfd]).unwrap();
    run(
        h,
        "ram-block-add",
        json!({"id": "ram", "fdname": "ram0", "offset": 0, "size": 1 << 20}),
    )
    .unwrap();
}

struct Tmp(PathBuf);
impl Tmp {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("qmh-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        Tmp(d)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(p: &std::path::Path, write: bool, direct: bool) -> OwnedFd {
    let mut o = OpenOptions::new();
    o.read(!write).write(write).create(write);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(p).unwrap().into()
}

#[test]
fn fd_sets_as_qemu_keeps_them() {
    let h = helper();
    let t = Tmp::new("sets");
    let f = t.0.join("f");
    assert_eq!(
        err(&h, "add-fd", json!({})),
        "No file descriptor supplied via SCM_RIGHTS"
    );
    let a = with_fds(
        &h,
        "add-fd",
        json!({"opaque": "rw"}),
        vec![open(&f, true, false)],
    )
    .unwrap();
    assert_eq!(a["fdset-id"], 0, "the first free set");
    let b = with_fds(&h, "add-fd", json!({}), vec![open(&f, false, false)]).unwrap();
    assert_eq!(b["fdset-id"], 1);
    let c = with_fds(
        &h,
        "add-fd",
        json!({"fdset-id": 0}),
        vec![open(&f, false, false)],
    )
    .unwrap();
    assert_eq!(c["fdset-id"], 0);
    assert_eq!(
        err(&h, "add-fd", json!({"fdset-id": -1})),
        "Parameter 'fdset-id' expects a non-negative value"
    );
    let q = run(&h, "query-fdsets", json!({})).unwrap();
    assert_eq!(
        q,
        json!([
            {"fdset-id": 0, "fds": [{"fd": a["fd"], "opaque": "rw"}, {"fd": c["fd"]}]},
            {"fdset-id": 1, "fds": [{"fd": b["fd"]}]},
        ])
    );
    run(&h, "remove-fd", json!({"fdset-id": 0, "fd": a["fd"]})).unwrap();
    assert_eq!(
        err(&h, "remove-fd", json!({"fdset-id": 0, "fd": a["fd"]})),
        format!(
            "File descriptor named 'fdset-id:0, fd:{}' not found",
            a["fd"]
        )
    );
    run(&h, "remove-fd", json!({"fdset-id": 1})).unwrap();
    assert_eq!(
        err(&h, "remove-fd", json!({"fdset-id": 1})),
        "File descriptor named 'fdset-id:1' not found"
    );
    let q = run(&h, "query-fdsets", json!({})).unwrap();
    assert_eq!(q, json!([{"fdset-id": 0, "fds": [{"fd": c["fd"]}]}]));
    // The set's read-only fd cannot be opened for writing.
    let e = h
        .fdset_dup(0, nix::fcntl::OFlag::O_WRONLY)
        .expect_err("no writable fd");
    assert_eq!(
        e.desc,
        "Failed to find file descriptor with matching flags=0x1"
    );
    assert!(h.fdset_dup(0, nix::fcntl::OFlag::O_RDONLY).is_ok());
    assert_eq!(
        h.fdset_dup(5, nix::fcntl::OFlag::O_RDONLY)
            .unwrap_err()
            .desc,
        "Failed to find fdset /dev/fdset/5"
    );
}

#[test]
fn fd_sets_are_bounded() {
    let h = helper();
    let t = Tmp::new("bound");
    let f = t.0.join("f");
    for _ in 0..super::fdsets::MAX_FDSET_FDS {
        with_fds(
            &h,
            "add-fd",
            json!({"fdset-id": 3}),
            vec![open(&f, true, false)],
        )
        .unwrap();
    }
    let e = with_fds(&h, "add-fd", json!({}), vec![open(&f, true, false)]).unwrap_err();
    assert!(e.desc.contains("too many fds in fd sets"), "{}", e.desc);
}

#[test]
fn mapped_ram_is_refused_where_qemu_refuses_it() {
    let h = helper();
    add_block(&h);
    let t = Tmp::new("refuse");
    let file = format!("file:{}", t.0.join("f").display());
    set_caps(&h, &[("mapped-ram", true)]);
    assert_eq!(
        err(&h, "migrate", json!({"uri": "unix:/nonexistent"})),
        "Migration requires seekable transport (e.g. file)"
    );
    set_caps(&h, &[("postcopy-ram", true)]);
    assert_eq!(
        err(&h, "migrate", json!({"uri": file})),
        "Mapped-ram migration is incompatible with postcopy"
    );
    assert!(err(&h, "migrate-incoming", json!({"uri": file})).contains("userfaultfd-set first"));
    set_caps(
        &h,
        &[
            ("postcopy-ram", false),
            ("mapped-ram", false),
            ("multifd", true),
        ],
    );
    assert!(err(&h, "migrate", json!({"uri": file}))
        .starts_with("Migration requires multi-channel URIs (e.g. tcp)"));
    set_caps(&h, &[("mapped-ram", true)]);
    run(&h, "migrate-set-parameters", json!({"direct-io": true})).unwrap();
    assert_eq!(
        run(&h, "query-migrate-parameters", json!({})).unwrap()["direct-io"],
        true
    );
    with_fds(
        &h,
        "getfd",
        json!({"fdname": "f"}),
        vec![open(&t.0.join("g"), true, false)],
    )
    .unwrap();
    assert_eq!(
        err(&h, "migrate", json!({"uri": "fd:f"})),
        "Migration requires a transport that allows for extra fds (e.g. file)"
    );
    // A FIFO cannot be seeked in.
    let fifo = t.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert!(err(
        &h,
        "migrate",
        json!({"uri": format!("file:{}", fifo.display())})
    )
    .contains("is a FIFO"));
    // A file offset QEMU's parser would refuse.
    assert!(
        err(&h, "migrate", json!({"uri": format!("{file},offset=12Q")})).contains("bad offset 12Q")
    );
}

fn wait_done(h: &Helper) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = run(h, "query-migrate", json!({})).unwrap();
        if q["status"] == "completed" || q["status"] == "failed" {
            return q;
        }
        assert!(Instant::now() < deadline, "no end: {q}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// libvirt's way: its own header in the file, then the stream from an offset, through an
/// fd set; the header is kept, the stream starts at the offset.
#[test]
fn a_stream_goes_into_an_fd_set_at_an_offset() {
    let h = helper();
    add_block(&h);
    let t = Tmp::new("fdset");
    let p = t.0.join("save");
    std::fs::write(&p, vec![0x4c; 8192]).unwrap();
    let fd = open(&p, true, false);
    let raw = fd.as_raw_fd();
    with_fds(&h, "add-fd", json!({"fdset-id": 4}), vec![fd]).unwrap();
    run(
        &h,
        "migrate",
        json!({"uri": "file:/dev/fdset/4,offset=4096"}),
    )
    .unwrap();
    let q = wait_done(&h);
    assert_eq!(q["status"], "completed", "{q} (fd {raw})");
    let bytes = std::fs::read(&p).unwrap();
    assert!(bytes[..4096].iter().all(|&b| b == 0x4c), "the header stays");
    assert_eq!(
        &bytes[4096..4100],
        b"QEVM",
        "the stream starts at the offset"
    );
    drop(File::open(&p).unwrap());
}
