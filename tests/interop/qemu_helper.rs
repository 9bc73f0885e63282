//! Real QEMU (10.0 and 7.2) on one end, the helper on the other, over a socketpair passed
//! with `getfd`; guest RAM compared byte for byte.

use std::time::Duration;

use serde_json::json;

use support::helper::HelperVm;
use support::migrate::{pass_socketpair, start_fd_migration};
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::util::{assert_same_memory, fill_mixed, test_seed, GIB, MIB};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(120);

fn qemu_to_helper(qemu: Qemu, test: &str, return_path: bool) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let mut src = QemuVm::start(qemu, RAM, &VmOpts::default());
    let mut dst = HelperVm::spawn();
    dst.add_block("ram", RAM, false);
    let zeros = fill_mixed(&mut src.ram_mmap(), test_seed(test), 0.5);
    eprintln!("{test}: {zeros} zero pages of {}", RAM / 4096);

    pass_socketpair(src.qmp(), &mut dst.client, "mig");
    dst.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    src.qmp()
        .set_parameters(json!({"max-bandwidth": 10 * GIB}))
        .expect("params");
    if return_path {
        src.qmp()
            .set_capabilities(&[("return-path", true)])
            .expect("caps");
    }
    src.qmp().migrate("fd:mig").expect("migrate");
    src.wait_migration(&["completed"], TIMEOUT)
        .expect("qemu source completes");
    let v = dst.wait(&["completed"], TIMEOUT);
    assert!(v["ram"]["normal"].as_u64().unwrap() > 0, "{v}");
    assert_same_memory(&src.ram_mmap(), &dst.blocks[0].mem.map(), test);

    // The device sections QEMU sent are kept, described and decoded.
    let ds = dst.client.query_device_state().expect("query-device-state");
    let names: Vec<&str> = ds["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .map(|s| s["idstr"].as_str().unwrap_or(""))
        .collect();
    assert!(
        names.contains(&"timer") && names.contains(&"globalstate"),
        "{names:?}"
    );
    let gs = ds["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["idstr"] == "globalstate")
        .unwrap();
    assert!(gs["fields"].is_object(), "globalstate decoded: {gs}");
}

fn helper_to_qemu(qemu: Qemu, test: &str, return_path: bool) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    let mut dst = QemuVm::start(qemu, RAM, &VmOpts::incoming());
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.5);
    if qemu == Qemu::V72 {
        src.client
            .set_parameters(json!({"compat-version": "7.2"}))
            .expect("compat");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    if return_path {
        src.client
            .set_capabilities(&[("return-path", true)])
            .expect("caps");
        dst.qmp()
            .set_capabilities(&[("return-path", true)])
            .expect("caps");
    }

    start_fd_migration(&mut src.client, dst.qmp());
    src.wait(&["completed"], TIMEOUT);
    dst.wait_migration(&["completed"], TIMEOUT)
        .expect("qemu destination completes");
    assert_same_memory(&src.blocks[0].mem.map(), &dst.ram_mmap(), test);
}

#[test]
fn qemu10_to_helper_fd() {
    qemu_to_helper(Qemu::V10, "qemu10_to_helper_fd", false);
}

#[test]
fn qemu72_to_helper_fd() {
    qemu_to_helper(Qemu::V72, "qemu72_to_helper_fd", false);
}

#[test]
fn helper_to_qemu10_fd() {
    helper_to_qemu(Qemu::V10, "helper_to_qemu10_fd", false);
}

#[test]
fn helper_to_qemu72_fd() {
    helper_to_qemu(Qemu::V72, "helper_to_qemu72_fd", false);
}

/// With the `return-path` capability the destination answers PING with PONG and ends with
/// SHUT; the source waits for it.
#[test]
fn qemu10_to_helper_return_path() {
    qemu_to_helper(Qemu::V10, "qemu10_to_helper_return_path", true);
}

#[test]
fn qemu72_to_helper_return_path() {
    qemu_to_helper(Qemu::V72, "qemu72_to_helper_return_path", true);
}

#[test]
fn helper_to_qemu10_return_path() {
    helper_to_qemu(Qemu::V10, "helper_to_qemu10_return_path", true);
}

#[test]
fn helper_to_qemu72_return_path() {
    helper_to_qemu(Qemu::V72, "helper_to_qemu72_return_path", true);
}
