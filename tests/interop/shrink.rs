//! The parent shrinks a guest memfd under a source migration (issue 10): a memfd made with
//! MFD_ALLOW_SEALING is sealed at `ram-block-add`, so the parent's ftruncate() fails with
//! EPERM and the migration completes; an unsealable memfd's SIGBUS becomes a failed
//! migration whose error-desc names the block, and the helper lives on.

use std::os::fd::AsFd;
use std::time::Duration;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use serde_json::json;

use support::helper::{HelperVm, Memfd};
use support::migrate::{socketpair, start_fd_migration};
use support::util::{assert_same_memory, fill_mixed, test_seed, MIB};

const SIZE: u64 = 64 * MIB;
const DEADLINE: Duration = Duration::from_secs(60);

fn memfd(sealable: bool) -> Memfd {
    let mut flags = MemFdCreateFlag::MFD_CLOEXEC;
    if sealable {
        flags |= MemFdCreateFlag::MFD_ALLOW_SEALING;
    }
    let fd = memfd_create(c"qmh-shrink", flags).expect("memfd_create");
    nix::unistd::ftruncate(&fd, SIZE as i64).expect("ftruncate");
    Memfd { fd, size: SIZE }
}

/// A throttled source (8 MiB/s) under way into a destination helper.
fn start(src: &mut HelperVm, dst: &mut HelperVm) {
    src.client
        .set_parameters(json!({"max-bandwidth": 8 * MIB}))
        .expect("params");
    start_fd_migration(&mut src.client, &mut dst.client);
    src.wait(&["active"], DEADLINE);
    std::thread::sleep(Duration::from_millis(500));
}

fn sealed_flag(h: &mut HelperVm) -> serde_json::Value {
    h.client.query_ram_blocks().expect("query-ram-blocks")[0]["shrink-sealed"].clone()
}

#[test]
fn sealable_memfd_cannot_shrink_under_a_source() {
    let test = "sealable_memfd_cannot_shrink_under_a_source";
    let mut src = HelperVm::spawn_with_args(&["--log-level", "warn"]);
    src.add_memfd_block("ram", memfd(true), false);
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.1);
    let mut dst = HelperVm::spawn_with_args(&["--log-level", "warn"]);
    dst.add_block("ram", SIZE, false);
    assert_eq!(sealed_flag(&mut src), true, "{test}");
    assert_eq!(
        sealed_flag(&mut dst),
        false,
        "{test}: a plain memfd cannot be sealed"
    );
    start(&mut src, &mut dst);
    assert_eq!(
        nix::unistd::ftruncate(&src.blocks[0].mem.fd, MIB as i64),
        Err(nix::errno::Errno::EPERM),
        "{test}: the parent could shrink a sealed memfd"
    );
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    src.wait(&["completed"], DEADLINE);
    dst.wait(&["completed"], DEADLINE);
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
}

#[test]
fn unsealable_memfd_shrinking_fails_the_migration_not_the_helper() {
    let test = "unsealable_memfd_shrinking_fails_the_migration_not_the_helper";
    let mut src = HelperVm::spawn_with_args(&["--log-level", "warn"]);
    src.add_memfd_block("ram", memfd(false), false);
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.1);
    let mut dst = HelperVm::spawn_with_args(&["--log-level", "warn"]);
    dst.add_block("ram", SIZE, false);
    assert_eq!(sealed_flag(&mut src), false, "{test}");
    start(&mut src, &mut dst);
    nix::unistd::ftruncate(&src.blocks[0].mem.fd, MIB as i64).expect("shrink");
    let v = src.wait(&["failed", "completed"], DEADLINE);
    eprintln!("{test}: source {}: {}", v["status"], v["error-desc"]);
    assert_eq!(v["status"], "failed", "{test}: {v}");
    let desc = v["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("[\"ram\"] shrank"), "{test}: {desc}");
    let d = dst.wait(&["failed", "completed"], DEADLINE);
    assert_eq!(d["status"], "failed", "{test}: {d}");
    // Alive, answering, and refusing the lost block until it is replaced.
    assert!(src.alive(), "{test}: the helper died");
    let e = src
        .client
        .migrate("fd:none")
        .expect_err("lost block refused");
    assert!(e.to_string().contains("lost its memory"), "{test}: {e}");
    src.client
        .execute("ram-block-del", json!({"id": "ram"}))
        .expect("ram-block-del");
    src.blocks.clear();
    src.add_block("ram", SIZE, false);
    fill_mixed(&mut src.blocks[0].mem.map(), 7, 0.5);
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let (a, b) = socketpair();
    src.client.getfd("mig2", a.as_fd()).expect("getfd");
    dst.client.getfd("mig2", b.as_fd()).expect("getfd");
    drop((a, b));
    dst.client.migrate_incoming("fd:mig2").expect("incoming");
    src.client.migrate("fd:mig2").expect("migrate");
    src.wait(&["completed"], DEADLINE);
    dst.wait(&["completed"], DEADLINE);
    assert_same_memory(&src.blocks[0].mem.map(), &dst.blocks[0].mem.map(), test);
}
