//! A `--control-fd` helper whose parent goes away in precopy (issue 10, lifecycle): the
//! helper cancels and exits within bounds; a source's guest is untouched, and the peer
//! fails with an error-desc and keeps answering.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::json;

use support::helper::HelperVm;
use support::migrate::{socketpair, start_fd_migration};
use support::util::{assert_same_memory, fill_mixed, test_seed, MIB};

const QUIET: &[&str] = &["--log-level", "info"];
const SIZE: u64 = 64 * MIB;

/// A throttled precopy (8 MiB/s for 64 MiB: about 8 s) under way between two helpers.
fn running_precopy(test: &str) -> (HelperVm, HelperVm, Vec<u8>) {
    let mut src = HelperVm::spawn_with_args(QUIET);
    src.add_block("ram", SIZE, false);
    fill_mixed(&mut src.blocks[0].mem.map(), test_seed(test), 0.1);
    let image = src.blocks[0].mem.map().to_vec();
    let mut dst = HelperVm::spawn_with_args(QUIET);
    dst.add_block("ram", SIZE, false);
    src.client
        .set_parameters(json!({"max-bandwidth": 8 * MIB}))
        .expect("params");
    start_fd_migration(&mut src.client, &mut dst.client);
    src.wait(&["active"], Duration::from_secs(20));
    dst.wait(&["active"], Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    (src, dst, image)
}

fn wait_exit(h: &mut HelperVm, limit: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    while !h.exited() {
        assert!(
            t0.elapsed() < limit,
            "{what}: helper {} still running after {limit:?}",
            h.pid()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

#[test]
fn precopy_source_cancels_and_exits_when_its_parent_goes_away() {
    let test = "precopy_source_cancels_and_exits_when_its_parent_goes_away";
    let (mut src, mut dst, image) = running_precopy(test);
    src.close_control();
    let took = wait_exit(&mut src, Duration::from_secs(10), test);
    let d = dst.wait(&["failed", "completed"], Duration::from_secs(30));
    eprintln!(
        "{test}: source exited after {took:?}; destination {}: {}",
        d["status"], d["error-desc"]
    );
    assert_eq!(d["status"], "failed", "{test}: {d}");
    assert!(
        d["error-desc"].as_str().is_some_and(|e| !e.is_empty()),
        "{d}"
    );
    // The source's guest is untouched.
    assert_same_memory(&image, &src.blocks[0].mem.map(), test);
    assert!(dst.alive());
}

#[test]
fn precopy_destination_cancels_and_exits_when_its_parent_goes_away() {
    let test = "precopy_destination_cancels_and_exits_when_its_parent_goes_away";
    let (mut src, mut dst, image) = running_precopy(test);
    dst.close_control();
    let took = wait_exit(&mut dst, Duration::from_secs(10), test);
    let s = src.wait(&["failed", "completed"], Duration::from_secs(30));
    eprintln!(
        "{test}: destination exited after {took:?}; source {}: {}",
        s["status"], s["error-desc"]
    );
    assert_eq!(s["status"], "failed", "{test}: {s}");
    assert!(
        s["error-desc"].as_str().is_some_and(|e| !e.is_empty()),
        "{s}"
    );
    assert_same_memory(&image, &src.blocks[0].mem.map(), test);
    // The source helper takes a new migration.
    let v = src.client.query_migrate().expect("source answers");
    assert_eq!(v["status"], "failed");
}

/// A parent that goes away while its helper is idle or waiting for the first connection:
/// the helper exits at once.
#[test]
fn listening_destination_exits_when_its_parent_goes_away() {
    let test = "listening_destination_exits_when_its_parent_goes_away";
    let mut dst = HelperVm::spawn_with_args(QUIET);
    dst.add_block("ram", 4 * MIB, false);
    let (_a, b) = socketpair();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    dst.client.getfd("lis", l.as_fd()).expect("getfd");
    drop(b);
    dst.client.migrate_incoming("fd:lis").expect("incoming");
    dst.close_control();
    let took = wait_exit(&mut dst, Duration::from_secs(10), test);
    eprintln!("{test}: exited after {took:?}");
}
