//! On-demand restore from a mapped-ram file: QEMU 10.0 saves its guest with `mapped-ram`;
//! a helper destination with the test as its parent (a userfaultfd over the guest memfd)
//! restores it with `postcopy-ram` + `mapped-ram`: the guest is runnable (postcopy-active)
//! right after the block headers, bitmaps and device state are read, faulting pages are
//! read from the file, the rest is filled in the background.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::helper::HelperVm;
use support::qemu::{require_qemu, MappedRamSave, Qemu, QemuVm, VmOpts};
use support::uffd::{Readers, UffdGuest};
use support::util::{assert_same_memory, file_uri, fill_mixed, test_seed, TempDir, GIB, MIB};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(120);

/// A guest that QEMU 10.0 saved with mapped-ram.
struct Saved {
    /// Holds the file, removed on drop: bind it for as long as the file is used.
    dir: TempDir,
    file: PathBuf,
    /// The guest's memory.
    expected: Arc<Vec<u8>>,
    seed: u64,
}

/// QEMU 10.0 saves a guest of `ram` bytes (`zero` of its pages zero) to `name` in a new
/// directory; None (the test skipped) without QEMU 10.0.
fn qemu_save(test: &str, name: &str, ram: u64, zero: f64) -> Option<Saved> {
    require_qemu(Qemu::V10, test)?;
    let seed = test_seed(test);
    let dir = TempDir::new("qmh-od");
    let file = dir.join(name);
    let mut src = QemuVm::start(Qemu::V10, ram, &VmOpts::default());
    fill_mixed(&mut src.ram_mmap(), seed, zero);
    src.save_mapped_ram(&file, MappedRamSave::default(), TIMEOUT)
        .expect("QEMU saves with mapped-ram");
    Some(Saved {
        dir,
        file,
        expected: Arc::new(src.ram_mmap().to_vec()),
        seed,
    })
}

/// A helper destination whose block `ram` is `guest`, with the on-demand capabilities.
fn destination(guest: &UffdGuest, bandwidth: u64) -> HelperVm {
    let mut dst = HelperVm::spawn_with_args(&["--log-level", "info"]);
    guest.attach(&mut dst, "ram");
    dst.client
        .set_capabilities(&[("postcopy-ram", true), ("mapped-ram", true)])
        .expect("caps");
    dst.client
        .set_parameters(json!({"max-postcopy-bandwidth": bandwidth}))
        .expect("params");
    dst
}

fn status(h: &mut HelperVm) -> Value {
    h.client.query_migrate().expect("query-migrate")
}

/// Polls until the status is one of `wanted` (a failure or the timeout panics, releasing
/// the guest's userfaultfd first so that no reader stays blocked).
fn wait_status(h: &mut HelperVm, guest: &mut UffdGuest, wanted: &[&str]) -> Value {
    let t0 = Instant::now();
    loop {
        let v = status(h);
        let s = v["status"].as_str().unwrap_or("");
        if wanted.contains(&s) {
            return v;
        }
        if s == "failed" || t0.elapsed() > TIMEOUT {
            guest.release();
            panic!("waiting for {wanted:?}: {v}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Starts the restore; returns the time from migrate-incoming to postcopy-active as the
/// test saw it (polling every millisecond).
fn start(dst: &mut HelperVm, guest: &mut UffdGuest, file: &Path) -> Duration {
    let t0 = Instant::now();
    dst.client
        .migrate_incoming(&file_uri(file, 0))
        .expect("migrate-incoming file:");
    let v = wait_status(dst, guest, &["postcopy-active", "completed"]);
    let took = t0.elapsed();
    assert_eq!(
        v["status"], "postcopy-active",
        "runnable before the fill: {v}"
    );
    took
}

/// Where block `ram`'s bitmap is in a `-M none` mapped-ram file: its mapped-ram header
/// follows the block entry (`\x03ram`, used_length), the second "ram" in the file (the
/// first is the RAM section's name).
fn bitmap_offset(bytes: &[u8]) -> usize {
    let entry = bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w == b"\x03ram")
        .nth(1)
        .map(|(i, _)| i)
        .expect("block entry");
    let h = entry + 4 + 8;
    u64::from_be_bytes(bytes[h + 12..h + 20].try_into().unwrap()) as usize
}

#[test]
fn qemu10_mapped_ram_on_demand_restore() {
    let test = "qemu10_mapped_ram_on_demand_restore";
    let Some(Saved {
        file,
        expected,
        seed,
        dir: _dir,
    }) = qemu_save(test, "saved.mig", RAM, 0.3)
    else {
        return;
    };
    let mut guest = UffdGuest::new(RAM);
    // A parent that preallocated its guest: the restore starts from holes all the same.
    guest.preallocate(0x5a);
    // Slow enough that the readers run while most pages are still in the file.
    let mut dst = destination(&guest, 8 * MIB);
    let took = start(&mut dst, &mut guest, &file);
    eprintln!("{test}: postcopy-active {took:?} after migrate-incoming");
    let ds = dst.client.query_device_state().expect("query-device-state");
    let names: Vec<&str> = ds["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .filter_map(|s| s["idstr"].as_str())
        .collect();
    assert!(
        names.contains(&"timer"),
        "device state handed over: {names:?}"
    );
    let mid = status(&mut dst);
    assert!(mid["ram"]["remaining"].as_u64().unwrap() > 0, "{mid}");
    let readers = Readers::start_paced(&guest, expected.clone(), 4, seed, Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(300));
    let checked = readers.finish();
    assert!(checked > 20, "readers checked only {checked} pages");
    let mid = status(&mut dst);
    assert_eq!(
        mid["status"], "postcopy-active",
        "the fill is still going: {mid}"
    );
    // The limit is re-read: lifting it ends the fill.
    dst.client
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("params");
    let d = wait_status(&mut dst, &mut guest, &["completed"]);
    eprintln!("{test}: {d}");
    crate::postcopy::assert_latency_dist(&d);
    assert_eq!(d["ram"]["remaining"], 0, "{d}");
    assert_same_memory(&expected, &guest.map, test);
}

/// The file is truncated under a running restore: postcopy-paused with the reason, the
/// faulting readers wait; a file with another bitmap is refused (still paused); a good
/// copy resumes and completes.
#[test]
fn on_demand_restore_pauses_on_a_truncated_file_and_recovers() {
    let test = "on_demand_restore_pauses_on_a_truncated_file_and_recovers";
    let Some(Saved {
        dir,
        file: good,
        expected,
        seed,
    }) = qemu_save(test, "good.mig", RAM, 0.3)
    else {
        return;
    };
    let work: PathBuf = dir.join("work.mig");
    std::fs::copy(&good, &work).expect("copy");
    let bytes = std::fs::read(&good).expect("read");
    let other = dir.join("other.mig");
    let mut changed = bytes.clone();
    changed[bitmap_offset(&bytes) + 100] ^= 1;
    std::fs::write(&other, &changed).expect("write other");

    let mut guest = UffdGuest::new(RAM);
    let mut dst = destination(&guest, 4 * MIB);
    start(&mut dst, &mut guest, &work);
    // Cut the file 2 MiB into the pages: the fill or a fault reads past the end.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&work)
        .and_then(|f| f.set_len(2 * MIB))
        .expect("truncate");
    let readers = Readers::start_paced(&guest, expected.clone(), 4, seed, Duration::from_millis(2));
    let p = wait_status(&mut dst, &mut guest, &["postcopy-paused"]);
    let why = p["error-desc"].as_str().unwrap_or("");
    assert!(why.contains("work.mig") && why.contains("RAM block"), "{p}");

    dst.client
        .migrate_recover(&file_uri(&other, 0))
        .expect("migrate-recover other");
    std::thread::sleep(Duration::from_millis(300));
    let v = wait_status(&mut dst, &mut guest, &["postcopy-paused"]);
    let why = v["error-desc"].as_str().unwrap_or("");
    assert!(why.contains("is not the restore's file"), "{v}");

    dst.client
        .migrate_recover(&file_uri(&good, 0))
        .expect("migrate-recover good");
    wait_status(&mut dst, &mut guest, &["postcopy-active", "completed"]);
    std::thread::sleep(Duration::from_millis(300));
    dst.client
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("params");
    let d = wait_status(&mut dst, &mut guest, &["completed"]);
    let checked = readers.finish();
    eprintln!("{test}: readers checked {checked} pages; {d}");
    assert!(d["postcopy-pauses"].as_u64().unwrap() >= 2, "{d}");
    assert_same_memory(&expected, &guest.map, test);
}

/// By hand: `QMH_OD_GIB=4 cargo test --profile ci --test interop ondemand_measure --
/// --ignored --nocapture`: time to postcopy-active for a guest of that size (10% of its
/// pages data), and fault latency while the fill runs (unlimited bandwidth).
#[test]
#[ignore]
fn ondemand_measure() {
    let test = "ondemand_measure";
    let gib: u64 = std::env::var("QMH_OD_GIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let t = Instant::now();
    let Some(Saved {
        file,
        expected,
        seed,
        dir: _dir,
    }) = qemu_save(test, "big.mig", gib * GIB, 0.9)
    else {
        return;
    };
    eprintln!(
        "{test}: QEMU saved {gib} GiB in {:?} ({} bytes in the file)",
        t.elapsed(),
        std::fs::metadata(&file).unwrap().len()
    );
    let mut guest = UffdGuest::new(gib * GIB);
    let mut dst = destination(&guest, 0);
    let took = start(&mut dst, &mut guest, &file);
    eprintln!("{test}: {gib} GiB: postcopy-active {took:?} after migrate-incoming");
    let readers = Readers::start(&guest, expected.clone(), 2, seed);
    let mid = status(&mut dst);
    std::thread::sleep(Duration::from_millis(1000));
    let checked = readers.finish();
    let during = status(&mut dst);
    eprintln!(
        "{test}: readers checked {checked} pages; remaining at start {}; latency during the fill {}",
        mid["ram"]["remaining"], during["x-postcopy-latency"]
    );
    let d = wait_status(&mut dst, &mut guest, &["completed"]);
    eprintln!("{test}: {d}");
    assert_same_memory(&expected, &guest.map, test);
}
