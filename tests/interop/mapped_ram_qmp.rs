//! mapped-ram save and restore as libvirt does them (`virsh save --parallel`, `virsh restore
//! --parallel`), driven through QEMU's own Python client (tests/interop/qmp_save.py): the
//! file in an fd set (`add-fd`), the stream after a 4 KiB header of the caller's
//! (`file:/dev/fdset/N,offset=4096`), mapped-ram and multifd on both ends. Each end is a
//! helper or QEMU 10.0; the restored RAM is compared byte for byte with the saved guest.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;

use serde_json::Value;

use crate::bad_input::SocketHelper;
use crate::qmp_client::{have_qemu_qmp, python_with_fds};
use support::helper::Memfd;
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::util::{assert_same_memory, fill_mixed, test_seed, TempDir, MIB};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    Helper,
    Qemu,
}

/// One end: a helper (its socket) or a QEMU 10.0 with a second QMP monitor for the script.
struct Peer {
    _helper: Option<SocketHelper>,
    qemu: Option<QemuVm>,
    sock: std::path::PathBuf,
}

fn peer(end: End, size: u64, incoming: bool, dir: &Path, name: &str) -> Peer {
    match end {
        End::Helper => {
            let h = SocketHelper::spawn_with(&["--log-level", "warn"], Stdio::inherit(), false);
            let sock = h.path.clone();
            Peer {
                _helper: Some(h),
                qemu: None,
                sock,
            }
        }
        End::Qemu => {
            let sock = dir.join(format!("{name}.sock"));
            let base = if incoming {
                VmOpts::incoming()
            } else {
                VmOpts::default()
            };
            let opts = VmOpts {
                extra_args: vec![
                    "-chardev".into(),
                    format!("socket,id=qmp2,path={},server=on,wait=off", sock.display()),
                    "-mon".into(),
                    "chardev=qmp2,mode=control".into(),
                ],
                ..base
            };
            Peer {
                _helper: None,
                qemu: Some(QemuVm::start(Qemu::V10, size, &opts)),
                sock,
            }
        }
    }
}

fn wait_socket(p: &Path) {
    let t0 = std::time::Instant::now();
    while !p.exists() {
        assert!(
            t0.elapsed().as_secs() < 10,
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn save_restore(test: &str, saver: End, loader: End, channels: u8) {
    if !have_qemu_qmp(test) || require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let size = 64 * MIB;
    let dir = TempDir::new("qmh-mrqmp");
    let src_mem = Memfd::new("mr-src", size);
    let dst_mem = Memfd::new("mr-dst", size);
    let s = peer(saver, size, false, dir.path(), "saver");
    let l = peer(loader, size, true, dir.path(), "loader");
    // The saved guest: the helper's memfd, or QEMU's RAM file.
    let seed = test_seed(test);
    match &s.qemu {
        Some(q) => fill_mixed(&mut q.ram_mmap(), seed, 0.3),
        None => fill_mixed(&mut src_mem.map(), seed, 0.3),
    };
    wait_socket(&s.sock);
    wait_socket(&l.sock);
    let file = dir.join("save.img");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/qmp_save.py");
    let (sfd, dfd) = (src_mem.fd.as_raw_fd(), dst_mem.fd.as_raw_fd());
    let kind = |e: End| if e == End::Helper { "helper" } else { "qemu" };
    let args = [
        s.sock.display().to_string(),
        l.sock.display().to_string(),
        file.display().to_string(),
        kind(saver).to_string(),
        kind(loader).to_string(),
        channels.to_string(),
        size.to_string(),
        sfd.to_string(),
        dfd.to_string(),
    ];
    let out = python_with_fds(&script, &args, &[sfd, dfd]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{test}: qmp_save.py failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("qmp_save.py output");
    eprintln!(
        "{test}: saved in {:.2} s, restored in {:.2} s ({} MiB, {channels} channels)",
        v["save_secs"].as_f64().unwrap_or(0.0),
        v["restore_secs"].as_f64().unwrap_or(0.0),
        size >> 20
    );
    assert_eq!(v["saver"]["status"], "completed", "{v}");
    assert_eq!(v["loader"]["status"], "completed", "{v}");
    assert_eq!(
        v["header"], "LibvirtQemudSave",
        "the caller's header is kept: {v}"
    );
    assert_eq!(v["magic"], "QEVM", "the stream starts at the offset: {v}");
    assert_eq!(v["saver_fdsets"][0]["fds"][0]["opaque"], "save", "{v}");
    assert_eq!(v["saver_fdsets_after"], serde_json::json!([]), "{v}");
    let saved = match &s.qemu {
        Some(q) => q.ram_mmap(),
        None => src_mem.map(),
    };
    match &l.qemu {
        Some(q) => assert_same_memory(&saved, &q.ram_mmap(), test),
        None => assert_same_memory(&saved, &dst_mem.map(), test),
    }
}

#[test]
fn qmp_save_helper_restore_qemu10_parallel() {
    save_restore(
        "qmp_save_helper_restore_qemu10_parallel",
        End::Helper,
        End::Qemu,
        2,
    );
}

#[test]
fn qmp_save_qemu10_restore_helper_parallel() {
    save_restore(
        "qmp_save_qemu10_restore_helper_parallel",
        End::Qemu,
        End::Helper,
        2,
    );
}

#[test]
fn qmp_save_helper_restore_helper_one_channel() {
    save_restore(
        "qmp_save_helper_restore_helper_one_channel",
        End::Helper,
        End::Helper,
        0,
    );
}

#[test]
fn qmp_save_helper_restore_helper_parallel() {
    save_restore(
        "qmp_save_helper_restore_helper_parallel",
        End::Helper,
        End::Helper,
        4,
    );
}
