//! Postcopy failure recovery: the link dies during postcopy, both sides pause, the parent
//! passes fresh sockets, the ends exchange received bitmaps and postcopy goes on; faults
//! pending across the cut are served after it.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use support::helper::HelperVm;
use support::migrate::{
    recover_over, recover_over_socketpair, socketpair, start_fd_migration, start_fd_migration_over,
};
use support::uffd::{Readers, UffdGuest};
use support::util::{assert_same_memory, fill_mixed, test_seed, MIB};

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
    recover_over_socketpair(&mut src.client, &mut dst.client, &format!("mig{n}"), true);
    wait(src, guest, &["postcopy-active", "completed"]);
    wait(dst, guest, &["postcopy-active", "completed"]);
}

#[test]
fn helper_to_helper_recovery_twice_with_pending_faults() {
    let seed = test_seed("helper_to_helper_recovery");
    let (mut src, mut dst, mut guest, expected) = start_postcopy(seed);

    // Readers fault pages in throughout, across both cuts.
    let readers = Readers::start_paced(&guest, expected.clone(), 3, seed, Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(200));
    cut_and_recover(&mut src, &mut dst, &mut guest, 1, true);
    std::thread::sleep(Duration::from_millis(200));
    cut_and_recover(&mut src, &mut dst, &mut guest, 2, false);
    std::thread::sleep(Duration::from_millis(200));
    let checked = readers.finish();
    assert!(checked > 0);
    // Let the push finish quickly now.
    let (s, d) = finish(&mut src, &mut dst, &mut guest);
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

use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};

/// Real QEMU source -> helper destination; the link (a forwarder the test owns) is cut twice
/// and recovered over fresh socketpairs; the parent's reader threads fault pages throughout.
fn qemu_to_helper_recovery(qemu: Qemu, test: &str) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let seed = test_seed(test);
    let mut src = QemuVm::start(qemu, RAM, &VmOpts::default());
    fill_mixed(&mut src.ram_mmap(), seed, 0.2);
    let expected = Arc::new(src.ram_mmap().to_vec());
    let mut guest = UffdGuest::new(RAM);
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "ram");
    dst.client
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("caps");
    src.qmp()
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("qemu caps");
    src.qmp()
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("qemu params");
    // A link the test owns, so that it can be cut.
    let (mut link, a, b) = Link::new();
    start_fd_migration_over(src.qmp(), &mut dst.client, (a, b));
    std::thread::sleep(Duration::from_millis(200));
    src.qmp().migrate_start_postcopy().expect("postcopy");
    wait(&mut dst, &mut guest, &["postcopy-active"]);
    let reader = Readers::start_paced(&guest, expected.clone(), 1, seed, Duration::from_millis(1));
    for n in 1..=2 {
        std::thread::sleep(Duration::from_millis(200));
        link.cut();
        src.wait_migration(&["postcopy-paused"], TIMEOUT)
            .expect("qemu paused");
        wait(&mut dst, &mut guest, &["postcopy-paused"]);
        let (l, a, b) = Link::new();
        link = l;
        recover_over(src.qmp(), &mut dst.client, &format!("mig{n}"), true, (a, b));
        src.wait_migration(&["postcopy-active", "completed"], TIMEOUT)
            .expect("qemu resumed");
        wait(&mut dst, &mut guest, &["postcopy-active", "completed"]);
    }
    std::thread::sleep(Duration::from_millis(200));
    reader.finish();
    src.qmp()
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("params");
    src.wait_migration(&["completed"], TIMEOUT)
        .expect("qemu completes");
    let d = wait(&mut dst, &mut guest, &["completed"]);
    assert_eq!(d["postcopy-pauses"], 2, "{d}");
    assert_same_memory(&expected, &guest.map, test);
}

#[test]
fn qemu10_to_helper_recovery() {
    qemu_to_helper_recovery(Qemu::V10, "qemu10_to_helper_recovery");
}

/// Helper source -> real QEMU destination, the link (a forwarder) cut twice;
/// QEMU's destination recovers with migrate-recover over a passed fd.
fn helper_to_qemu_recovery(qemu: Qemu, test: &str) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let seed = test_seed(test);
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.2);
    let expected = src.blocks[0].mem.map().to_vec();
    let mut dst = QemuVm::start(qemu, RAM, &VmOpts::incoming());
    dst.qmp()
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("qemu caps");
    src.client
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("caps");
    if qemu == Qemu::V72 {
        src.client
            .set_parameters(json!({"compat-version": "7.2"}))
            .expect("compat");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("params");
    // A link the test owns, so that it can be cut.
    let (mut link, a, b) = Link::new();
    start_fd_migration_over(&mut src.client, dst.qmp(), (a, b));
    std::thread::sleep(Duration::from_millis(200));
    src.client.migrate_start_postcopy().expect("postcopy");
    src.wait(&["postcopy-active"], TIMEOUT);
    dst.wait_migration(&["postcopy-active"], TIMEOUT)
        .expect("qemu postcopy-active");
    for n in 1..=2 {
        // A page fault on QEMU's side that stays pending across the cut.
        let addr = RAM - 4096 * (n as u64 * 3 + 1);
        let _ = dst.hmp(&format!("xp /1xg {addr:#x}"));
        link.cut();
        src.wait(&["postcopy-paused"], TIMEOUT);
        dst.wait_migration(&["postcopy-paused"], TIMEOUT)
            .expect("qemu paused");
        let (l, a, b) = Link::new();
        link = l;
        recover_over(
            &mut src.client,
            dst.qmp(),
            &format!("mig{n}"),
            false,
            (a, b),
        );
        src.wait(&["postcopy-active", "completed"], TIMEOUT);
        dst.wait_migration(&["postcopy-active", "completed"], TIMEOUT)
            .expect("qemu resumed");
    }
    src.client
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("params");
    let v = src.wait(&["completed"], TIMEOUT);
    dst.wait_migration(&["completed"], TIMEOUT)
        .expect("qemu completes");
    assert_eq!(v["postcopy-pauses"], 2, "{v}");
    assert_same_memory(&expected, &dst.ram_mmap(), test);
}

#[test]
fn helper_to_qemu10_recovery() {
    helper_to_qemu_recovery(Qemu::V10, "helper_to_qemu10_recovery");
}

#[test]
fn qemu72_to_helper_recovery() {
    qemu_to_helper_recovery(Qemu::V72, "qemu72_to_helper_recovery");
}

#[test]
fn helper_to_qemu72_recovery() {
    helper_to_qemu_recovery(Qemu::V72, "helper_to_qemu72_recovery");
}

/// Lets the postcopy push run at full speed and waits until both helpers completed; their
/// final query-migrate.
fn finish(
    src: &mut HelperVm,
    dst: &mut HelperVm,
    guest: &mut UffdGuest,
) -> (serde_json::Value, serde_json::Value) {
    src.client
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("params");
    let s = wait(src, guest, &["completed"]);
    let d = wait(dst, guest, &["completed"]);
    (s, d)
}

/// A helper source with RAM filled from `seed`, a helper destination on a guest with a
/// userfaultfd (as its parent holds it), both with the capabilities `caps`; and the
/// source's content.
fn helper_pair(seed: u64, caps: &[(&str, bool)]) -> (HelperVm, HelperVm, UffdGuest, Arc<Vec<u8>>) {
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.2);
    let expected = Arc::new(src.blocks[0].mem.map().to_vec());
    let guest = UffdGuest::new(RAM);
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "ram");
    for h in [&mut src, &mut dst] {
        h.client.set_capabilities(caps).expect("caps");
    }
    (src, dst, guest, expected)
}

/// Starts a helper -> helper postcopy migration of RAM with a slow push; returns the two
/// helpers, the destination's guest and the source content.
fn start_postcopy(seed: u64) -> (HelperVm, HelperVm, UffdGuest, Arc<Vec<u8>>) {
    let (mut src, mut dst, mut guest, expected) = helper_pair(seed, &[("postcopy-ram", true)]);
    src.client
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("params");
    start_fd_migration(&mut src.client, &mut dst.client);
    std::thread::sleep(Duration::from_millis(200));
    src.client.migrate_start_postcopy().expect("postcopy");
    wait(&mut dst, &mut guest, &["postcopy-active"]);
    (src, dst, guest, expected)
}

/// Recovery started wrongly (wrong side, unknown fd, an fd that is not a socket) gets a
/// clear error and leaves the migration paused; recoveries over dead sockets (the link dies
/// during the handshake) pause again, several times in a row; then a good one completes.
#[test]
fn recovery_errors_and_failures_in_a_row() {
    let seed = test_seed("recovery_errors");
    let (mut src, mut dst, mut guest, expected) = start_postcopy(seed);
    src.client
        .execute_oob("migrate-pause", json!({}))
        .expect("migrate-pause");
    wait(&mut src, &mut guest, &["postcopy-paused"]);
    wait(&mut dst, &mut guest, &["postcopy-paused"]);

    // Wrong side, unknown fd, not a socket.
    let e = src
        .client
        .execute("migrate-recover", json!({"uri": "fd:x"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("destination"), "{e}");
    let e = dst
        .client
        .execute("migrate", json!({"uri": "fd:x", "resume": true}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no paused migration") || e.contains("paused"),
        "{e}"
    );
    let e = src
        .client
        .execute("migrate", json!({"uri": "fd:nope", "resume": true}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    let file = support::helper::Memfd::new("not-a-socket", 4096);
    src.client.getfd("file", file.fd.as_fd()).expect("getfd");
    let e = src
        .client
        .execute("migrate", json!({"uri": "fd:file", "resume": true}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a socket"), "{e}");
    for h in [&mut src, &mut dst] {
        assert_eq!(
            h.client.query_migrate().expect("query")["status"],
            "postcopy-paused"
        );
    }

    // Dead links during recovery, three times in a row on each side.
    src.client.take_events();
    dst.client.take_events();
    for n in 0..3 {
        let (a, b) = socketpair();
        let (c, d) = socketpair();
        // Each side gets a socket whose peer is already gone.
        drop(b);
        drop(d);
        dst.client
            .getfd(&format!("dead{n}"), a.as_fd())
            .expect("getfd");
        src.client
            .getfd(&format!("dead{n}"), c.as_fd())
            .expect("getfd");
        drop((a, c));
        dst.client
            .execute_oob("migrate-recover", json!({"uri": format!("fd:dead{n}")}))
            .expect("migrate-recover");
        src.client
            .execute(
                "migrate",
                json!({"uri": format!("fd:dead{n}"), "resume": true}),
            )
            .expect("migrate resume");
        // Each attempt ends in postcopy-paused again (events, since the status was
        // postcopy-paused before the attempt too).
        for h in [&mut src, &mut dst] {
            h.client
                .wait_event(TIMEOUT, |e| {
                    e.name == "MIGRATION" && e.data["status"] == "postcopy-paused"
                })
                .expect("paused again");
        }
    }
    let events: Vec<String> = src
        .client
        .take_events()
        .iter()
        .filter(|e| e.name == "MIGRATION")
        .map(|e| e.data["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        events
            .windows(2)
            .any(|w| w[0] == "postcopy-recover-setup" || w[1] == "postcopy-paused"),
        "{events:?}"
    );

    // A good recovery still completes.
    recover_over_socketpair(&mut src.client, &mut dst.client, "good", true);
    let (_, d) = finish(&mut src, &mut dst, &mut guest);
    assert!(d["postcopy-pauses"].as_u64().unwrap() >= 4, "{d}");
    assert_same_memory(&expected, &guest.map, "after failed recoveries");
}

/// A link the test owns: two socketpairs with a forwarder between them that can stop
/// forwarding without closing anything (a peer host gone, a cable pulled).
struct Link {
    stall: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The forwarder's own ends, to cut the link (both sides see EOF / EPIPE).
    ends: Vec<std::os::unix::net::UnixStream>,
}

impl Link {
    fn new() -> (Link, std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let (src_end, a) = socketpair();
        let (dst_end, b) = socketpair();
        let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, b) = (UnixStream::from(a), UnixStream::from(b));
        let ends = vec![a.try_clone().unwrap(), b.try_clone().unwrap()];
        let mut threads = Vec::new();
        for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
            let (stall, stop) = (stall.clone(), stop.clone());
            from.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if stall.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    match from.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
                // Keep both sockets open until the test ends: a stalled link says nothing.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }));
        }
        (
            Link {
                stall,
                stop,
                threads,
                ends,
            },
            src_end,
            dst_end,
        )
    }

    /// Cuts the link: shuts down the forwarder's sockets in both directions.
    fn cut(&self) {
        for e in &self.ends {
            let _ = e.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A link that dies silently (no error, no data) is noticed within the link timeout on
/// both sides, which pause by themselves; then the migration recovers and completes.
#[test]
fn silent_link_death_pauses_then_recovers() {
    let seed = test_seed("silent_link_death");
    let (mut src, mut dst, mut guest, expected) = helper_pair(seed, &[("postcopy-ram", true)]);
    for h in [&mut src, &mut dst] {
        h.client
            .set_parameters(json!({"link-timeout": 600}))
            .expect("link-timeout");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("params");
    let (link, a, b) = Link::new();
    start_fd_migration_over(&mut src.client, &mut dst.client, (a, b));
    std::thread::sleep(Duration::from_millis(200));
    src.client.migrate_start_postcopy().expect("postcopy");
    wait(&mut dst, &mut guest, &["postcopy-active"]);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    link.stall.store(true, std::sync::atomic::Ordering::Relaxed);
    wait(&mut src, &mut guest, &["postcopy-paused"]);
    wait(&mut dst, &mut guest, &["postcopy-paused"]);
    let took = t0.elapsed();
    eprintln!("silent link death noticed after {} ms", took.as_millis());
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} with a 600 ms link timeout"
    );
    recover_over_socketpair(&mut src.client, &mut dst.client, "mig2", true);
    finish(&mut src, &mut dst, &mut guest);
    drop(link);
    assert_same_memory(&expected, &guest.map, "after a silent link death");
}

/// Kills a helper with SIGKILL.
fn kill(h: &mut HelperVm) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(h.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    for _ in 0..100 {
        if !h.alive() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("helper {} did not die", h.pid());
}

/// Both helpers killed mid-postcopy, one after the other: the parent starts a new helper
/// with the same memfds (and, on the destination, its userfaultfd), passes a fresh socket,
/// and the migration recovers and completes: no guest is lost.
#[test]
fn helpers_killed_and_respawned() {
    let seed = test_seed("helpers_killed");
    let (mut src, mut dst, mut guest, expected) = start_postcopy(seed);
    std::thread::sleep(Duration::from_millis(300));

    // The source helper dies; the destination pauses by itself.
    let src_mem = std::mem::take(&mut src.blocks);
    kill(&mut src);
    wait(&mut dst, &mut guest, &["postcopy-paused"]);
    let mut src = HelperVm::spawn();
    src.client
        .getfd("ram", src_mem[0].mem.fd.as_fd())
        .expect("getfd");
    src.client
        .ram_block_add(&qemu_migration_helper::client::RamBlockSpec {
            id: "ram".into(),
            fdname: "ram".into(),
            offset: 0,
            size: RAM,
            ..Default::default()
        })
        .expect("ram-block-add");
    src.client
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("caps");
    src.client
        .set_parameters(json!({"max-postcopy-bandwidth": 4 * MIB}))
        .expect("params");
    recover_over_socketpair(&mut src.client, &mut dst.client, "mig1", true);
    wait(&mut src, &mut guest, &["postcopy-active"]);
    wait(&mut dst, &mut guest, &["postcopy-active"]);
    std::thread::sleep(Duration::from_millis(300));

    // Now the destination helper dies; the source pauses; a new destination helper takes
    // the same guest memfd and userfaultfd.
    kill(&mut dst);
    wait(&mut src, &mut guest, &["postcopy-paused"]);
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "ram");
    dst.client
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("caps");
    recover_over_socketpair(&mut src.client, &mut dst.client, "mig2", true);
    finish(&mut src, &mut dst, &mut guest);
    assert_same_memory(&expected, &guest.map, "after both helpers were killed");
    drop(src_mem);
}

/// Fault injection: helper -> helper postcopy through a link that is cut at random moments,
/// during postcopy and during the recoveries themselves, many times; the seed is printed.
/// QMH_STRESS_CUTS raises the number of cuts for the recovery soak (README): when one
/// migration completes before all its cuts, another starts, until the total is reached;
/// every migration's RAM is checked page by page while in postcopy and byte for byte at the
/// end.
#[test]
fn fault_injection_random_cuts() {
    let seed = test_seed("fault_injection_random_cuts");
    let cuts: usize = std::env::var("QMH_STRESS_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let (mut total, mut during_recovery, mut checked, mut round) = (0, 0, 0, 0u64);
    while total < cuts {
        let r = cut_round(seed.wrapping_add(round), cuts - total);
        total += r.cuts;
        during_recovery += r.during_recovery;
        checked += r.checked_pages;
        round += 1;
    }
    eprintln!(
        "fault injection (seed {seed}): {total} cuts in postcopy, {during_recovery} during recovery, \
         over {round} migrations of {} MiB; {checked} pages checked while in postcopy, \
         every migration identical byte for byte at the end",
        RAM / MIB
    );
}

/// What one migration of the fault-injection test did.
struct CutRound {
    cuts: usize,
    during_recovery: usize,
    checked_pages: u64,
}

/// One helper -> helper postcopy migration with up to `max_cuts` random cuts; panics on a
/// lost or corrupt page.
fn cut_round(seed: u64, max_cuts: usize) -> CutRound {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let (mut src, mut dst, mut guest, expected) = helper_pair(seed, &[("postcopy-ram", true)]);
    // Slow enough that the push outlives all the cuts (or as slow as the helper allows).
    let push = (RAM / (max_cuts as u64 + 4)).max(MIB);
    src.client
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": push}))
        .expect("params");
    let (mut link, a, b) = Link::new();
    start_fd_migration_over(&mut src.client, &mut dst.client, (a, b));
    std::thread::sleep(Duration::from_millis(100));
    src.client.migrate_start_postcopy().expect("postcopy");
    wait(&mut dst, &mut guest, &["postcopy-active"]);
    let reader = Readers::start_paced(&guest, expected.clone(), 1, seed, Duration::from_millis(1));
    let mut n = 0;
    let mut during_recovery = 0;
    while n < max_cuts {
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..250)));
        let st = src.client.query_migrate().expect("query")["status"].clone();
        if st == "completed" {
            break;
        }
        link.cut();
        n += 1;
        wait(&mut src, &mut guest, &["postcopy-paused", "completed"]);
        wait(&mut dst, &mut guest, &["postcopy-paused", "completed"]);
        if src.client.query_migrate().expect("query")["status"] == "completed" {
            break;
        }
        // Recover; sometimes cut the new link again at once, in the middle of the handshake.
        loop {
            let (l, a, b) = Link::new();
            link = l;
            let name = format!("m{n}-{during_recovery}");
            recover_over(&mut src.client, &mut dst.client, &name, true, (a, b));
            if rng.gen_bool(0.3) {
                std::thread::sleep(Duration::from_micros(rng.gen_range(0..2000)));
                link.cut();
                during_recovery += 1;
                // The handshake may have finished and the migration with it before the
                // cut (the source completes only after the destination's SHUT).
                let mut done = false;
                for h in [&mut src, &mut dst] {
                    let st = wait(
                        h,
                        &mut guest,
                        &["postcopy-paused", "postcopy-active", "completed"],
                    );
                    done |= st["status"] == "completed";
                }
                if done {
                    break;
                }
                // If the handshake had finished, the cut hit postcopy itself: pause first.
                for h in [&mut src, &mut dst] {
                    wait(h, &mut guest, &["postcopy-paused"]);
                }
                continue;
            }
            break;
        }
        wait(&mut src, &mut guest, &["postcopy-active", "completed"]);
        wait(&mut dst, &mut guest, &["postcopy-active", "completed"]);
    }
    let checked_pages = reader.finish();
    let (s, d) = finish(&mut src, &mut dst, &mut guest);
    eprintln!(
        "fault injection round (seed {seed}): {n} cuts in postcopy, {during_recovery} during recovery; source pauses {}, destination pauses {}",
        s["postcopy-pauses"], d["postcopy-pauses"]
    );
    assert!(n > 0, "no cut happened");
    drop(link);
    assert_same_memory(&expected, &guest.map, "after random cuts");
    CutRound {
        cuts: n,
        during_recovery,
        checked_pages,
    }
}

/// QEMU's own postcopy recovery test cases, with real QEMU 10.0 as the destination peer:
/// a double failure at reconnect (the source cannot connect: postcopy-recover-setup, then
/// postcopy-paused), a double failure in the handshake (both sides paused again from
/// postcopy-recover), then a recovery that completes with identical RAM.
#[test]
fn qemu10_double_failures_then_recovery() {
    let test = "qemu10_double_failures_then_recovery";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let seed = test_seed(test);
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.2);
    let expected = src.blocks[0].mem.map().to_vec();
    let mut dst = QemuVm::start(Qemu::V10, RAM, &VmOpts::incoming());
    dst.qmp()
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("qemu caps");
    src.client
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("caps");
    src.client
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("params");
    start_fd_migration(&mut src.client, dst.qmp());
    std::thread::sleep(Duration::from_millis(200));
    src.client.migrate_start_postcopy().expect("postcopy");
    src.wait(&["postcopy-active"], TIMEOUT);
    dst.wait_migration(&["postcopy-active"], TIMEOUT)
        .expect("qemu postcopy-active");

    src.client
        .execute_oob("migrate-pause", json!({}))
        .expect("migrate-pause");
    src.wait(&["postcopy-paused"], TIMEOUT);
    dst.wait_migration(&["postcopy-paused"], TIMEOUT)
        .expect("qemu paused");
    src.client.take_events();

    // 1. Double failure at reconnect: nothing listens at the URI.
    let nowhere = std::env::temp_dir().join(format!("qmh-nowhere-{}", std::process::id()));
    src.client
        .execute(
            "migrate",
            json!({"uri": format!("unix:{}", nowhere.display()), "resume": true}),
        )
        .expect("resume");
    // Wait for the attempt itself (the status was paused already before it started).
    src.client
        .wait_event(TIMEOUT, |e| {
            e.name == "MIGRATION" && e.data["status"] == "postcopy-paused"
        })
        .expect("paused again after the failed reconnect");
    let mut seen: Vec<String> = src
        .client
        .take_events()
        .iter()
        .filter(|e| e.name == "MIGRATION")
        .map(|e| e.data["status"].as_str().unwrap_or("").to_string())
        .collect();
    seen.push("postcopy-paused".into());
    assert_eq!(
        seen,
        vec!["postcopy-recover-setup", "postcopy-paused"],
        "source states during the failed reconnect"
    );

    // 2. Double failure in the handshake: both recovery sockets lead nowhere useful.
    let (qa, qb) = socketpair();
    let (ha, hb) = socketpair();
    dst.qmp().getfd("rec1", qb.as_fd()).expect("qemu getfd");
    dst.qmp()
        .execute("migrate-recover", json!({"uri": "fd:rec1"}))
        .expect("qemu recover");
    drop(hb);
    src.client.getfd("rec1", ha.as_fd()).expect("getfd");
    drop((qb, ha));
    src.client
        .execute("migrate", json!({"uri": "fd:rec1", "resume": true}))
        .expect("resume");
    src.client
        .wait_event(TIMEOUT, |e| {
            e.name == "MIGRATION" && e.data["status"] == "postcopy-paused"
        })
        .expect("paused again after the failed handshake");
    dst.wait_migration(&["postcopy-recover", "postcopy-paused"], TIMEOUT)
        .expect("qemu in recovery");
    drop(qa);
    dst.wait_migration(&["postcopy-paused"], TIMEOUT)
        .expect("qemu paused again");

    // 3. A good recovery completes.
    recover_over_socketpair(&mut src.client, dst.qmp(), "rec2", false);
    src.client
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("params");
    let v = src.wait(&["completed"], TIMEOUT);
    dst.wait_migration(&["completed"], TIMEOUT)
        .expect("qemu completes");
    assert!(v["postcopy-pauses"].as_u64().unwrap() >= 3, "{v}");
    assert_same_memory(&expected, &dst.ram_mmap(), test);
}

/// A parent that goes away (closes the control socket) while postcopy is paused: the helper
/// does not hang forever waiting for a recovery only the parent could start; it waits
/// `orphan-timeout` for an adopter, then exits, and the guest stays in the parent's memfds
/// for a new helper to adopt.
#[test]
fn paused_helper_exits_when_its_parent_goes_away() {
    let seed = test_seed("paused_parent_gone");
    let (mut src, mut dst, mut guest, _expected) = start_postcopy(seed);
    src.client
        .set_parameters(json!({"orphan-timeout": 1000}))
        .expect("orphan-timeout");
    src.client
        .execute_oob("migrate-pause", json!({}))
        .expect("migrate-pause");
    wait(&mut src, &mut guest, &["postcopy-paused"]);
    wait(&mut dst, &mut guest, &["postcopy-paused"]);
    // Close the source's control connection without `quit`.
    src.close_control();
    let took = wait_exit(&mut src, Duration::from_secs(15));
    eprintln!("paused_helper_exits_when_its_parent_goes_away: exited after {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "did not wait orphan-timeout: {took:?}"
    );
    guest.release();
}

/// Waits until the helper process has exited; returns how long that took.
fn wait_exit(h: &mut HelperVm, limit: Duration) -> Duration {
    let t0 = std::time::Instant::now();
    while !h.exited() {
        assert!(
            t0.elapsed() < limit,
            "helper {} did not exit within {limit:?}",
            h.pid()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// The parent of a source in postcopy-active goes away: the helper pauses the migration
/// (the destination pauses too, and keeps answering), waits `orphan-timeout` for an
/// adopter, then exits. A new source helper adopting with the same memfd completes it.
#[test]
fn postcopy_source_pauses_and_exits_when_its_parent_goes_away() {
    let test = "postcopy_source_pauses_and_exits_when_its_parent_goes_away";
    let seed = test_seed(test);
    let (mut src, mut dst, mut guest, expected) = start_postcopy(seed);
    src.client
        .set_parameters(json!({"orphan-timeout": 2000}))
        .expect("orphan-timeout");
    let mem = src.blocks[0].mem.fd.try_clone().expect("dup memfd");
    src.close_control();
    let d = wait(&mut dst, &mut guest, &["postcopy-paused", "completed"]);
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!src.exited(), "{test}: exited before orphan-timeout");
    let took = wait_exit(&mut src, Duration::from_secs(20)) + Duration::from_millis(1000);
    eprintln!(
        "{test}: destination {}, source exited {took:?} after the pause",
        d["status"]
    );
    assert!(took >= Duration::from_millis(1500), "{test}: {took:?}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    if d["status"] == "completed" {
        eprintln!("{test}: the migration completed before the pause; nothing to adopt");
        guest.release();
        return;
    }
    // A fresh helper adopts the paused migration with the parent's memfd.
    let mut fresh = HelperVm::spawn();
    fresh.add_memfd_block("ram", support::helper::Memfd { fd: mem, size: RAM }, false);
    fresh
        .client
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("caps");
    recover_over_socketpair(&mut fresh.client, &mut dst.client, "adopt", true);
    wait(&mut fresh, &mut guest, &["completed"]);
    wait(&mut dst, &mut guest, &["completed"]);
    assert_same_memory(&expected, &guest.map, test);
}

/// postcopy-preempt across pauses: QEMU 10.0 -> helper over `unix:` listeners, paused twice
/// with QEMU's `migrate-pause`; each recovery brings a new main channel and then a new
/// preempt channel to the address given to `migrate-recover`.
#[test]
fn qemu10_to_helper_preempt_recovery() {
    let test = "qemu10_to_helper_preempt_recovery";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    let seed = test_seed(test);
    let mut src = QemuVm::start(Qemu::V10, RAM, &VmOpts::default());
    fill_mixed(&mut src.ram_mmap(), seed, 0.2);
    let expected = Arc::new(src.ram_mmap().to_vec());
    let mut guest = UffdGuest::new(RAM);
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "ram");
    let caps = [("postcopy-ram", true), ("postcopy-preempt", true)];
    dst.client.set_capabilities(&caps).expect("caps");
    src.qmp().set_capabilities(&caps).expect("qemu caps");
    src.qmp()
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("qemu params");
    let dir = support::util::TempDir::new("qmh-rec");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    dst.client.migrate_incoming(&uri).expect("incoming");
    src.qmp().migrate(&uri).expect("migrate");
    std::thread::sleep(Duration::from_millis(200));
    src.qmp().migrate_start_postcopy().expect("postcopy");
    wait(&mut dst, &mut guest, &["postcopy-active"]);
    let reader = Readers::start_paced(&guest, expected.clone(), 2, seed, Duration::from_millis(1));
    for n in 1..=2 {
        std::thread::sleep(Duration::from_millis(200));
        src.qmp().migrate_pause().expect("qemu migrate-pause");
        src.wait_migration(&["postcopy-paused"], TIMEOUT)
            .expect("qemu paused");
        wait(&mut dst, &mut guest, &["postcopy-paused"]);
        let uri = format!("unix:{}", dir.join(&format!("rec{n}.sock")).display());
        dst.client
            .execute_oob("migrate-recover", json!({"uri": uri}))
            .expect("migrate-recover");
        src.qmp().migrate_resume(&uri).expect("qemu migrate resume");
        src.wait_migration(&["postcopy-active", "completed"], TIMEOUT)
            .expect("qemu resumed");
        wait(&mut dst, &mut guest, &["postcopy-active", "completed"]);
    }
    std::thread::sleep(Duration::from_millis(200));
    let checked = reader.finish();
    assert!(checked > 10, "the readers checked only {checked} pages");
    src.qmp()
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("params");
    src.wait_migration(&["completed"], TIMEOUT)
        .expect("qemu completes");
    let d = wait(&mut dst, &mut guest, &["completed"]);
    eprintln!("{test}: destination {d}");
    assert_eq!(d["postcopy-pauses"], 2, "{d}");
    assert!(
        d["ram"]["postcopy-preempt-pages"].as_u64().unwrap_or(0) > 0,
        "no page came on a preempt channel: {d}"
    );
    assert_same_memory(&expected, &guest.map, test);
}

/// postcopy-preempt on both helpers across two `migrate-pause`s: each resume connects a new
/// main and a new preempt channel to the address of `migrate-recover`.
#[test]
fn helper_to_helper_preempt_recovery() {
    unix_recovery("helper_to_helper_preempt_recovery", true, false, false);
}

/// The same under TLS: every main, preempt and recovery connection runs its handshake
/// (`tls-channels` lists them all).
#[test]
fn tls_helper_to_helper_preempt_recovery() {
    unix_recovery("tls_helper_to_helper_preempt_recovery", true, false, true);
}

/// Multifd, postcopy-preempt and two recoveries under TLS (compat-version 10.1).
#[test]
fn tls_helper_to_helper_multifd_postcopy_preempt_recovery() {
    unix_recovery(
        "tls_helper_to_helper_multifd_postcopy_preempt_recovery",
        true,
        true,
        true,
    );
}

/// Multifd with postcopy as QEMU 10.1 has it (compat-version 10.1 on both helpers): the
/// precopy pages go over the multifd channels, which stop when postcopy starts; postcopy
/// goes on over the main channel, is cut twice and recovered.
#[test]
fn helper_to_helper_multifd_postcopy_recovery() {
    unix_recovery(
        "helper_to_helper_multifd_postcopy_recovery",
        false,
        true,
        false,
    );
}

/// The same with postcopy-preempt: its channel is the connection after the multifd ones.
#[test]
fn helper_to_helper_multifd_postcopy_preempt_recovery() {
    unix_recovery(
        "helper_to_helper_multifd_postcopy_preempt_recovery",
        true,
        true,
        false,
    );
}

/// Helper -> helper postcopy over `unix:` (so that the preempt and multifd channels can
/// connect), paused from either end in turn and recovered twice at new addresses while the
/// parent's readers fault pages in.
fn unix_recovery(test: &str, preempt: bool, multifd: bool, tls: bool) {
    let seed = test_seed(test);
    let (mut src, mut dst, mut guest, expected) = helper_pair(seed, &[]);
    let pki = tls.then(support::tls::Pki::new);
    if let Some(pki) = &pki {
        support::tls::tls_source(&mut src.client, &pki.client_dir());
        support::tls::tls_destination(
            &mut dst.client,
            &pki.server_dir(support::tls::ServerCert::Good),
            None,
        );
    }
    for h in [&mut src, &mut dst] {
        if multifd {
            // compat-version first: under 10.0 the capabilities are refused together.
            h.client
                .set_parameters(json!({"compat-version": "10.1", "multifd-channels": 2}))
                .expect("params");
        }
        h.client
            .set_capabilities(&[
                ("postcopy-ram", true),
                ("postcopy-preempt", preempt),
                ("multifd", multifd),
            ])
            .expect("caps");
    }
    // With multifd, some pages go that way before postcopy starts.
    let precopy_bw = if multifd { 16 * MIB } else { 4 * MIB };
    src.client
        .set_parameters(json!({"max-bandwidth": precopy_bw, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("params");
    let dir = support::util::TempDir::new("qmh-rec");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    dst.client.migrate_incoming(&uri).expect("incoming");
    src.client.migrate(&uri).expect("migrate");
    std::thread::sleep(Duration::from_millis(300));
    src.client.migrate_start_postcopy().expect("postcopy");
    wait(&mut dst, &mut guest, &["postcopy-active"]);
    let reader = Readers::start_paced(&guest, expected.clone(), 2, seed, Duration::from_millis(1));
    for n in 1..=2 {
        std::thread::sleep(Duration::from_millis(200));
        let who = if n == 1 { &mut src } else { &mut dst };
        who.client
            .execute_oob("migrate-pause", json!({}))
            .expect("migrate-pause");
        wait(&mut src, &mut guest, &["postcopy-paused"]);
        wait(&mut dst, &mut guest, &["postcopy-paused"]);
        let uri = format!("unix:{}", dir.join(&format!("rec{n}.sock")).display());
        dst.client
            .execute_oob("migrate-recover", json!({"uri": uri}))
            .expect("migrate-recover");
        src.client
            .execute("migrate", json!({"uri": uri, "resume": true}))
            .expect("migrate resume");
        wait(&mut src, &mut guest, &["postcopy-active", "completed"]);
        wait(&mut dst, &mut guest, &["postcopy-active", "completed"]);
    }
    std::thread::sleep(Duration::from_millis(200));
    let checked = reader.finish();
    assert!(checked > 10, "the readers checked only {checked} pages");
    let (s, d) = finish(&mut src, &mut dst, &mut guest);
    eprintln!("{test}: source {s}\ndestination {d}");
    assert_eq!(d["postcopy-pauses"], 2, "{d}");
    if tls {
        // Main and 2 recoveries, a preempt channel each time, the multifd channels once.
        let want = 3 * (1 + usize::from(preempt)) + if multifd { 2 } else { 0 };
        for v in [&s, &d] {
            let chans = v["tls-channels"].as_array().map_or(0, Vec::len);
            assert!(
                chans >= want,
                "{test}: {chans} TLS channels, want {want}: {v}"
            );
            for name in ["main", "recovery"]
                .into_iter()
                .chain(preempt.then_some("preempt"))
                .chain(multifd.then_some("multifd 1"))
            {
                assert!(
                    v["tls-channels"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|c| c["channel"] == name)),
                    "{test}: no TLS channel {name}: {v}"
                );
            }
        }
    }
    let count = |v: &serde_json::Value, k: &str| v["ram"][k].as_u64().unwrap_or(0);
    if preempt {
        let (sent, got) = (
            count(&s, "postcopy-preempt-pages"),
            count(&d, "postcopy-preempt-pages"),
        );
        assert!(
            sent > 0 && got > 0,
            "preempt pages: sent {sent}, received {got}"
        );
    }
    if multifd {
        let (sent, got) = (count(&s, "multifd-bytes"), count(&d, "multifd-bytes"));
        assert!(
            sent > 0 && got == sent,
            "multifd bytes: sent {sent}, received {got}"
        );
        // multifd stopped at postcopy: the rest went over the main (and preempt) channel.
        assert!(
            count(&s, "transferred") > sent,
            "nothing after multifd: {s}"
        );
    }
    assert_same_memory(&expected, &guest.map, test);
}

/// `migrate-recover unix:PATH` where PATH is a regular file: refused, the file is left as it
/// was, the migration stays paused, and a recovery at a free path completes it.
#[test]
fn recover_unix_keeps_a_regular_file_at_its_path() {
    let test = "recover_unix_keeps_a_regular_file_at_its_path";
    let (mut src, mut dst, mut guest, expected) = start_postcopy(test_seed(test));
    src.client
        .execute_oob("migrate-pause", json!({}))
        .expect("migrate-pause");
    wait(&mut src, &mut guest, &["postcopy-paused"]);
    wait(&mut dst, &mut guest, &["postcopy-paused"]);
    let dir = support::util::TempDir::new("qmh-rec");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let e = dst
        .client
        .execute_oob(
            "migrate-recover",
            json!({"uri": format!("unix:{}", file.display())}),
        )
        .expect_err("refused");
    assert!(
        e.to_string().contains("is a regular file, not a socket"),
        "{test}: {e}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"precious", "{test}");
    assert_eq!(
        dst.client.query_migrate().unwrap()["status"],
        "postcopy-paused"
    );
    let uri = format!("unix:{}", dir.join("rec.sock").display());
    dst.client
        .execute_oob("migrate-recover", json!({"uri": uri}))
        .expect("migrate-recover");
    src.client
        .execute("migrate", json!({"uri": uri, "resume": true}))
        .expect("resume");
    finish(&mut src, &mut dst, &mut guest);
    assert_same_memory(&expected, &guest.map, test);
}
