//! Harness self-tests: real QEMU to real QEMU of the same version, so a failure here is
//! the harness (or the machine), never the crate.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use serde_json::json;

use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::util::{assert_same_memory, fill_mixed, test_seed, GIB, MIB};

const RAM: u64 = 64 * MIB;
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Source and destination of `qemu` connected by a socketpair handed to both with
/// `getfd`; 64 MiB of mixed zero/random pages must arrive byte-identical.
fn qemu_to_qemu_fd(qemu: Qemu, test: &str) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let t0 = Instant::now();
    let mut src = QemuVm::start(qemu, RAM, &VmOpts::default());
    let mut dst = QemuVm::start(qemu, RAM, &VmOpts::incoming());
    let started = t0.elapsed();

    let seed = test_seed(test);
    let zero_pages = {
        let mut ram = src.ram_mmap();
        fill_mixed(&mut ram, seed, 0.5)
    };
    eprintln!(
        "{test}: {zero_pages} of {} pages zero",
        RAM as usize / support::util::PAGE_SIZE
    );

    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    src.qmp().getfd("mig", a.as_fd()).expect("source getfd");
    dst.qmp()
        .getfd("mig", b.as_fd())
        .expect("destination getfd");
    // QEMU holds its own copies now; ours must go so that EOF propagates.
    drop((a, b));

    dst.qmp()
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    src.qmp()
        .set_parameters(json!({ "max-bandwidth": 10 * GIB }))
        .expect("migrate-set-parameters");
    let t1 = Instant::now();
    src.qmp().migrate("fd:mig").expect("migrate");
    let info = src
        .wait_migration(&["completed"], MIGRATION_TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: source: {e}"));
    dst.wait_migration(&["completed"], MIGRATION_TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: destination: {e}"));
    let migrated = t1.elapsed();

    assert_same_memory(&src.ram_mmap(), &dst.ram_mmap(), test);
    eprintln!(
        "{test}: {} (accel {}): start {started:?}, migration {migrated:?}, total {:?}; \
         source ram stats {}",
        qemu.name(),
        src.accel().arg(),
        t0.elapsed(),
        info.get("ram").cloned().unwrap_or_default()
    );
}

#[test]
fn qemu10_to_qemu10_fd() {
    qemu_to_qemu_fd(Qemu::V10, "qemu10_to_qemu10_fd");
}

#[test]
fn qemu72_to_qemu72_fd() {
    qemu_to_qemu_fd(Qemu::V72, "qemu72_to_qemu72_fd");
}
