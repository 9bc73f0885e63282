//! A helper source saves with `mapped-ram` (every page at a fixed place in the file, QEMU
//! 9.0+'s layout) and QEMU 10.0 restores the file (`-incoming defer`, the same
//! capabilities, `migrate-incoming file:...`): guest RAM byte-identical. One channel and
//! multifd; a live source dirtying pages between passes (pages rewritten in place, bits
//! cleared for pages that became zero); a stream at `offset=`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helper_helper::dirty_writer;
use support::helper::HelperVm;
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::util::{
    assert_same_memory, file_uri, fill_mixed, test_seed, u64_at, TempDir, MIB, PAGE_SIZE,
};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(120);

struct Case {
    /// multifd channels; 0: multifd off.
    channels: u8,
    /// The stream starts at this offset in the file (`file:PATH,offset=N`).
    offset: Option<u64>,
    /// A writer dirties pages until pre-switchover: several passes.
    live: bool,
    /// `direct-io`: the multifd channels' fds are O_DIRECT (both ends).
    direct_io: bool,
}

fn save_and_restore(test: &str, c: Case) {
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let seed = test_seed(test);
    let t0 = Instant::now();
    let dir = TempDir::new("qmh-mr-save");
    let path = dir.join("mapped.mig");
    // What lies before the offset is not the helper's: it must stay as it was.
    let prefix = vec![0x5au8; c.offset.unwrap_or(0) as usize];
    std::fs::write(&path, &prefix).expect("prefix");
    let uri = file_uri(&path, c.offset.unwrap_or(0));

    let mut src = HelperVm::spawn_with_args(&["--log-level", "info"]);
    src.add_block("ram", RAM, c.live);
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.4);
    let mut caps = vec![("mapped-ram", true)];
    if c.channels > 0 {
        caps.push(("multifd", true));
    }
    // The restoring QEMU: the same stream capabilities.
    let dst_caps = caps.clone();
    if c.live {
        caps.push(("pause-before-switchover", true));
    }
    src.client.set_capabilities(&caps).expect("caps");
    // Live: a first pass of ~0.6 s, in which the writer dirties more than the downtime
    // budget (64 MiB/s * 20 ms): at least one more dirty pass before the END section.
    let mut params = json!({"max-bandwidth": if c.live { 64 * MIB } else { 0 }});
    if c.live {
        params["downtime-limit"] = json!(20);
    }
    if c.channels > 0 {
        params["multifd-channels"] = json!(c.channels);
    }
    if c.direct_io {
        params["direct-io"] = json!(true);
    }
    src.client.set_parameters(params).expect("params");

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = c.live.then(|| {
        let mem = src.blocks[0].mem.map();
        let bitmap = src.blocks[0].bitmap.as_ref().expect("bitmap").map();
        let (stop, writes) = (stop.clone(), writes.clone());
        std::thread::spawn(move || dirty_writer(mem, bitmap, seed ^ 0x5eed, stop, writes))
    });
    src.client
        .migrate(&uri)
        .expect("migrate file: with mapped-ram");
    if let Some(w) = writer {
        let r = src
            .client
            .wait_for_status(&["pre-switchover"], Duration::from_secs(60));
        stop.store(true, Ordering::Release);
        w.join().expect("writer thread");
        r.unwrap_or_else(|e| panic!("{test}: source reaches pre-switchover: {e}"));
        assert!(
            writes.load(Ordering::Relaxed) > 0,
            "{test}: nothing dirtied"
        );
        src.client.migrate_continue().expect("migrate-continue");
    }
    let info = src.wait(&["completed"], TIMEOUT);
    let len = std::fs::metadata(&path).expect("file").len();
    let pages = RAM / PAGE_SIZE as u64;
    let normal = u64_at(&info, &["ram", "normal"]);
    let dup = u64_at(&info, &["ram", "duplicate"]);
    let transferred = u64_at(&info, &["ram", "transferred"]);
    let syncs = u64_at(&info, &["ram", "dirty-sync-count"]);
    eprintln!(
        "{test}: helper wrote a {len}-byte file in {:?}; {}",
        t0.elapsed(),
        info["ram"]
    );
    // Every page has its place: the file holds at least the whole RAM's span.
    assert!(len >= c.offset.unwrap_or(0) + RAM, "{test}: {len}");
    assert!(
        transferred >= normal * PAGE_SIZE as u64,
        "{test}: transferred counts the pages written: {info}"
    );
    if c.live {
        // The first pass, at least one dirty pass, the END section's.
        assert!(syncs >= 3, "{test}: dirty-sync-count {syncs}: {info}");
        assert!(
            normal + dup > pages,
            "{test}: no page written twice: {info}"
        );
    } else {
        assert!(normal + dup >= pages, "{test}: {info}");
    }
    let head = std::fs::read(&path).expect("read")[..prefix.len()].to_vec();
    assert!(
        head == prefix,
        "{test}: the bytes before the offset changed"
    );

    let mut dst = QemuVm::start(Qemu::V10, RAM, &VmOpts::incoming());
    dst.qmp().set_capabilities(&dst_caps).expect("caps");
    if c.channels > 0 {
        dst.qmp()
            .set_parameters(json!({"multifd-channels": c.channels, "direct-io": c.direct_io}))
            .expect("params");
    }
    dst.qmp()
        .execute("migrate-incoming", json!({ "uri": uri }))
        .expect("migrate-incoming");
    dst.wait_migration(&["completed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: QEMU 10.0 restoring: {e}"));
    assert_same_memory(&src.blocks[0].mem.map(), &dst.ram_mmap(), test);
    eprintln!("{test}: took {:?}", t0.elapsed());
}

#[test]
fn mapped_ram_save_one_channel_qemu10_restores() {
    save_and_restore(
        "mapped_ram_save_one_channel_qemu10_restores",
        Case {
            channels: 0,
            offset: None,
            live: false,
            direct_io: false,
        },
    );
}

#[test]
fn mapped_ram_save_multifd_2ch_qemu10_restores() {
    save_and_restore(
        "mapped_ram_save_multifd_2ch_qemu10_restores",
        Case {
            channels: 2,
            offset: None,
            live: false,
            direct_io: false,
        },
    );
}

#[test]
fn mapped_ram_save_live_at_offset_qemu10_restores() {
    save_and_restore(
        "mapped_ram_save_live_at_offset_qemu10_restores",
        Case {
            channels: 0,
            offset: Some(12345),
            live: true,
            direct_io: false,
        },
    );
}

#[test]
fn mapped_ram_save_live_multifd_2ch_at_offset_qemu10_restores() {
    save_and_restore(
        "mapped_ram_save_live_multifd_2ch_at_offset_qemu10_restores",
        Case {
            channels: 2,
            offset: Some(3 * MIB + 4096),
            live: true,
            direct_io: false,
        },
    );
}

/// direct-io: the channels write pages with O_DIRECT (guest pages and their places in the
/// file are page-aligned; the stream and the bitmaps go through the main fd, without it).
#[test]
fn mapped_ram_save_direct_io_multifd_2ch_qemu10_restores() {
    save_and_restore(
        "mapped_ram_save_direct_io_multifd_2ch_qemu10_restores",
        Case {
            channels: 2,
            offset: Some(4096 + 7),
            live: false,
            direct_io: true,
        },
    );
}
