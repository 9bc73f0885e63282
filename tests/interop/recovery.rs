//! Postcopy failure recovery: the link dies during postcopy, both sides pause, the parent
//! passes fresh sockets, the ends exchange received bitmaps and postcopy goes on; faults
//! pending across the cut are served after it.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::helper::{socketpair, HelperVm};
use crate::postcopy::UffdGuest;
use crate::util::{assert_same_memory, fill_mixed, test_seed, MIB};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(60);

fn wait(h: &mut HelperVm, guest: &mut UffdGuest, want: &[&str]) -> serde_json::Value {
    match h.client.wait_for_status(want, TIMEOUT) {
        Ok(v) => v,
        Err(e) => {
            guest.release();
            panic!("helper {} did not reach {want:?}: {e}", h.pid());
        }
    }
}

/// Pauses with `migrate-pause` on `pause_on_source` side, then recovers over a fresh
/// socketpair passed with getfd: destination `migrate-recover fd:`, source
/// `migrate resume=true fd:`.
fn cut_and_recover(
    src: &mut HelperVm,
    dst: &mut HelperVm,
    guest: &mut UffdGuest,
    n: usize,
    pause_on_source: bool,
) {
    let who = if pause_on_source {
        &mut *src
    } else {
        &mut *dst
    };
    who.client
        .execute_oob("migrate-pause", json!({}))
        .expect("migrate-pause");
    wait(src, guest, &["postcopy-paused"]);
    wait(dst, guest, &["postcopy-paused"]);
    // The control channel answers while paused.
    assert_eq!(
        src.client.query_migrate().expect("query")["status"],
        "postcopy-paused"
    );
    let (a, b) = socketpair();
    let name = format!("mig{n}");
    dst.client.getfd(&name, b.as_fd()).expect("getfd");
    dst.client
        .execute_oob("migrate-recover", json!({"uri": format!("fd:{name}")}))
        .expect("migrate-recover");
    src.client.getfd(&name, a.as_fd()).expect("getfd");
    drop((a, b));
    src.client
        .execute(
            "migrate",
            json!({"uri": format!("fd:{name}"), "resume": true}),
        )
        .expect("migrate resume");
    wait(src, guest, &["postcopy-active", "completed"]);
    wait(dst, guest, &["postcopy-active", "completed"]);
}

#[test]
fn helper_to_helper_recovery_twice_with_pending_faults() {
    let seed = test_seed("helper_to_helper_recovery");
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.2);
    let expected = Arc::new(src.blocks[0].mem.map().to_vec());
    let mut guest = UffdGuest::new(RAM);
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "ram");
    for h in [&mut src, &mut dst] {
        h.client
            .set_capabilities(&[("postcopy-ram", true)])
            .expect("caps");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("params");
    let (a, b) = socketpair();
    src.client.getfd("mig", a.as_fd()).expect("getfd");
    dst.client.getfd("mig", b.as_fd()).expect("getfd");
    drop((a, b));
    dst.client.migrate_incoming("fd:mig").expect("incoming");
    src.client.migrate("fd:mig").expect("migrate");
    std::thread::sleep(Duration::from_millis(200));
    src.client.migrate_start_postcopy().expect("postcopy");
    wait(&mut dst, &mut guest, &["postcopy-active"]);

    // Readers fault pages in throughout, across both cuts.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (map, exp, stop) = (guest.map.clone(), expected.clone(), stop.clone());
            std::thread::spawn(move || {
                let pages = exp.len() / 4096;
                let mut x = seed ^ (t as u64 + 11).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = (x % pages as u64) as usize;
                    if map[p * 4096..(p + 1) * 4096] != exp[p * 4096..(p + 1) * 4096] {
                        return Err(format!("page {p} differs"));
                    }
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    cut_and_recover(&mut src, &mut dst, &mut guest, 1, true);
    std::thread::sleep(Duration::from_millis(200));
    cut_and_recover(&mut src, &mut dst, &mut guest, 2, false);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut checked = 0;
    for r in readers {
        checked += r
            .join()
            .expect("reader")
            .expect("reader saw the right data");
    }
    assert!(checked > 0);
    // Let the push finish quickly now.
    src.client
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("params");
    let s = wait(&mut src, &mut guest, &["completed"]);
    let d = wait(&mut dst, &mut guest, &["completed"]);
    eprintln!("source {s}\ndestination {d}");
    for v in [&s, &d] {
        assert_eq!(v["postcopy-pauses"], 2, "{v}");
        assert_eq!(
            v["postcopy-recoveries-ms"].as_array().map(|a| a.len()),
            Some(2),
            "{v}"
        );
    }
    assert_same_memory(&expected, &guest.map, "recovered twice");
}
