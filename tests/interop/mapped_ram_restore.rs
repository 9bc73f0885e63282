//! mapped-ram restore: QEMU 10.0 saves a guest with the capability to a file (one channel,
//! two multifd channels, at an offset into the file), the helper restores it in full; its
//! RAM must equal the guest QEMU had, byte for byte, zero pages included (the helper's
//! memory starts filled with something else). A file cut short fails the restore with the
//! block named, and a restore without the capability fails in QEMU's words.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use support::helper::HelperVm;
use support::qemu::{require_qemu, MappedRamSave, Qemu, QemuVm, VmOpts};
use support::util::{assert_same_memory, file_uri, fill_mixed, test_seed, TempDir, MIB};

const TIMEOUT: Duration = Duration::from_secs(120);
/// What the helper's memory holds before the restore: every zero page must be made zero.
const PREFILL: u8 = 0xa5;

/// QEMU 10.0 saves a `size` guest of mixed pages (30% zero) to `file:PATH,offset=N` with
/// mapped-ram (and multifd with `channels` > 0). Returns the VM (its RAM is the saved
/// guest: it stays paused) and the file.
fn qemu_save(test: &str, dir: &Path, size: u64, channels: u8, offset: u64) -> (QemuVm, PathBuf) {
    let mut vm = QemuVm::start(Qemu::V10, size, &VmOpts::default());
    fill_mixed(&mut vm.ram_mmap(), test_seed(test), 0.3);
    let file = dir.join("guest.img");
    let how = MappedRamSave {
        offset,
        channels,
        direct_io: direct_io(test),
    };
    vm.save_mapped_ram(&file, how, TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: QEMU's save: {e}"));
    (vm, file)
}

/// The tests named so read (and write) the multifd channels with O_DIRECT.
fn direct_io(test: &str) -> bool {
    test.contains("direct_io")
}

/// A helper with one block `ram` of `size`, prefilled, set up for a mapped-ram restore.
fn helper(size: u64, mapped_ram: bool, channels: u8, direct: bool) -> HelperVm {
    let mut h = HelperVm::spawn();
    if direct {
        h.client
            .set_parameters(json!({"direct-io": true}))
            .expect("direct-io");
    }
    h.add_block("ram", size, false);
    h.blocks[0].mem.map().fill(PREFILL);
    let mut caps = vec![("mapped-ram", mapped_ram)];
    if channels > 0 {
        caps.push(("multifd", true));
        h.client
            .set_parameters(json!({"multifd-channels": channels}))
            .expect("multifd-channels");
    }
    h.client.set_capabilities(&caps).expect("capabilities");
    h
}

fn restore(h: &mut HelperVm, file: &Path, offset: u64) -> Value {
    h.client
        .migrate_incoming(&file_uri(file, offset))
        .expect("migrate-incoming");
    h.client
        .wait_for_status(&["completed", "failed"], TIMEOUT)
        .expect("the restore ends")
}

fn save_and_restore(test: &str, channels: u8, offset: u64) {
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let size = 64 * MIB;
    let dir = TempDir::new("qmh-mrrestore");
    let (vm, file) = qemu_save(test, dir.path(), size, channels, offset);
    let mut h = helper(size, true, channels, direct_io(test));
    let t0 = std::time::Instant::now();
    let v = restore(&mut h, &file, offset);
    assert_eq!(v["status"], "completed", "{test}: {v}");
    eprintln!(
        "{test}: restored {} MiB in {:?} ({channels} channels)",
        size >> 20,
        t0.elapsed()
    );
    assert_same_memory(&vm.ram_mmap(), &h.blocks[0].mem.map(), test);
    let ram = &v["ram"];
    let (normal, dup) = (ram["normal"].as_u64(), ram["duplicate"].as_u64());
    let (Some(normal), Some(dup)) = (normal, dup) else {
        panic!("{test}: no page counts in {v}");
    };
    assert_eq!(normal + dup, size / 4096, "{test}: every page counted: {v}");
    assert!(normal > 0 && dup > 0, "{test}: {v}");
    assert!(
        ram["transferred"].as_u64().unwrap_or(0) >= normal * 4096,
        "{test}: {v}"
    );
    assert_eq!(ram["remaining"], 0, "{test}: {v}");
}

#[test]
fn qemu10_mapped_ram_restores_in_the_helper() {
    save_and_restore("qemu10_mapped_ram_restores_in_the_helper", 0, 0);
}

#[test]
fn qemu10_mapped_ram_multifd_restores_in_the_helper() {
    save_and_restore("qemu10_mapped_ram_multifd_restores_in_the_helper", 2, 0);
}

#[test]
fn qemu10_mapped_ram_at_an_offset_restores_in_the_helper() {
    save_and_restore(
        "qemu10_mapped_ram_at_an_offset_restores_in_the_helper",
        2,
        8192 + 512,
    );
}

#[test]
fn qemu10_mapped_ram_multifd_direct_io_restores_in_the_helper() {
    save_and_restore(
        "qemu10_mapped_ram_multifd_direct_io_restores_in_the_helper",
        2,
        0,
    );
}

/// A QEMU file cut in its pages region, or loaded without the capability, fails with the
/// reason; the helper stays up.
#[test]
fn qemu10_mapped_ram_file_cut_short_or_capability_off_fails() {
    let test = "qemu10_mapped_ram_file_cut_short_or_capability_off_fails";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let size = 16 * MIB;
    let dir = TempDir::new("qmh-mrrestore");
    let (_vm, file) = qemu_save(test, dir.path(), size, 0, 0);
    let mut h = helper(size, false, 0, false);
    let v = restore(&mut h, &file, 0);
    assert_eq!(v["status"], "failed", "{v}");
    let e = v["error-desc"].as_str().unwrap_or("");
    assert!(
        e.contains("Capability mapped-ram is off, but received capability is on"),
        "{e}"
    );
    // The pages region is 16 MiB from 1 MiB on: cut it in the middle.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_len(8 * MIB))
        .expect("truncate");
    let mut h = helper(size, true, 0, false);
    let v = restore(&mut h, &file, 0);
    assert_eq!(v["status"], "failed", "{v}");
    let e = v["error-desc"].as_str().unwrap_or("");
    assert!(
        e.contains("mapped-ram block \"ram\"") && e.contains("outside the file"),
        "{e}"
    );
}
