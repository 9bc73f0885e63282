//! Postcopy: the test is the destination's parent VMM, with a real userfaultfd registered
//! on its own mapping of the guest memfd; reader threads fault pages in through it while the
//! background push goes on.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use support::helper::{HelperVm, Memfd};
use support::migrate::{socketpair, start_migration};
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::stats::latency_dist;
use support::uffd::{Readers, UffdGuest};
use support::util::{assert_same_memory, fill_mixed, test_seed, u64_at, TempDir, MIB};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(120);

/// Polls `f` until it returns Some or the deadline passes; on timeout releases the guest's
/// userfaultfd (so no thread stays blocked) and panics.
fn wait_until<T>(guest: &mut UffdGuest, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t0.elapsed() > TIMEOUT {
            guest.release();
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(h: &mut HelperVm) -> serde_json::Value {
    h.client.query_migrate().expect("query-migrate")
}

/// A completed destination's `postcopy-latency-dist` (QEMU 10.1's 24 log2 buckets of
/// microseconds) holds every timed fault: it sums to `x-postcopy-latency.count` and to
/// `ram.postcopy-requests` (each requested page is timed once, when placed), and its
/// buckets agree with the exact median the helper reports beside it.
pub(crate) fn assert_latency_dist(d: &serde_json::Value) {
    let dist = latency_dist(d);
    assert_eq!(dist.len(), 24, "{d}");
    let sum: u64 = dist.iter().sum();
    assert!(sum > 0, "no fault timed: {d}");
    assert_eq!(sum, u64_at(d, &["x-postcopy-latency", "count"]), "{d}");
    // QEMU 10.1's `postcopy-latency`: the mean in nanoseconds, an integer.
    let mean_ns = d["postcopy-latency"]
        .as_u64()
        .expect("postcopy-latency: an integer");
    let mean_us = d["x-postcopy-latency"]["mean-us"]
        .as_f64()
        .expect("mean-us");
    assert!(
        (mean_ns as f64 - mean_us * 1000.0).abs() <= 1.0,
        "postcopy-latency {mean_ns} ns against mean-us {mean_us}: {d}"
    );
    assert_eq!(sum, u64_at(d, &["ram", "postcopy-requests"]), "{d}");
    // The median sample (nearest rank, as the helper takes it) lies in bucket `b`: the
    // buckets below hold at most `rank` samples, those up to `b` at least `rank + 1`.
    let p50 = d["x-postcopy-latency"]["p50-us"].as_f64().expect("p50-us");
    let b = match p50 as u64 {
        0 => 0,
        us => (us.ilog2() as usize).min(23),
    };
    let rank = ((sum - 1) as f64 * 0.5).round() as u64;
    let below: u64 = dist[..b].iter().sum();
    assert!(
        below <= rank && below + dist[b] > rank,
        "p50 {p50} us is not in bucket {b} of {dist:?}"
    );
}

/// helper -> helper in postcopy: faults served while most of RAM is still missing.
#[test]
fn helper_to_helper_postcopy() {
    helper_to_helper_postcopy_with(false);
}

/// The same with `pause-before-switchover`: `migrate-start-postcopy` goes through
/// `pre-switchover`, where the parent hands over the device state that then arrives in the
/// postcopy package.
#[test]
fn helper_to_helper_postcopy_pre_switchover() {
    helper_to_helper_postcopy_with(true);
}

/// Both helpers with postcopy-preempt, over a `unix:` listener.
#[test]
fn helper_to_helper_postcopy_preempt() {
    helper_to_helper_postcopy_opts(false, true, false);
}

fn helper_to_helper_postcopy_with(pause: bool) {
    helper_to_helper_postcopy_opts(pause, false, false);
}

/// Into a guest whose parent preallocated its memory with junk: the pages never sent
/// before postcopy must be discarded (and not mapped ahead again), so that the parent's
/// reads fault and get the source's content instead of the junk.
#[test]
fn helper_to_helper_postcopy_into_preallocated_memory() {
    helper_to_helper_postcopy_opts(false, false, true);
}

fn helper_to_helper_postcopy_opts(pause: bool, preempt: bool, prealloc: bool) {
    let seed = test_seed("helper_to_helper_postcopy");
    let mut src = HelperVm::spawn();
    src.add_block("pc.ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.3);
    let expected = Arc::new(src.blocks[0].mem.map().to_vec());
    let mut guest = UffdGuest::new(RAM);
    if prealloc {
        guest.preallocate(0x5a);
    }
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "pc.ram");
    for h in [&mut src, &mut dst] {
        h.client
            .set_capabilities(&[("postcopy-ram", true), ("postcopy-preempt", preempt)])
            .expect("caps");
    }
    if pause {
        src.client
            .set_capabilities(&[("pause-before-switchover", true)])
            .expect("caps");
    }
    // Slow enough that postcopy starts with most of RAM missing.
    src.client
        .set_parameters(json!({"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 8 * MIB}))
        .expect("params");
    let dir = TempDir::new("qmh-pc");
    start_migration(&mut src.client, &mut dst.client, &dir, preempt);
    std::thread::sleep(Duration::from_millis(300));
    src.client
        .migrate_start_postcopy()
        .expect("migrate-start-postcopy");
    if pause {
        src.wait(&["pre-switchover"], TIMEOUT);
        let body = base64_encode(b"device state handed over in pre-switchover");
        src.client
            .device_state_set(
                json!([{"idstr": "dev0", "instance-id": 0, "version-id": 1, "data": body}]),
            )
            .expect("device-state-set");
        src.client.migrate_continue().expect("migrate-continue");
    }
    wait_until(&mut guest, "destination postcopy-active", || {
        let v = status(&mut dst);
        assert_ne!(v["status"], "failed", "{v}");
        (v["status"] == "postcopy-active" || v["status"] == "completed").then_some(())
    });
    let readers = Readers::start(&guest, expected.clone(), 4, seed);
    std::thread::sleep(Duration::from_millis(500));
    let mid = status(&mut dst);
    let checked = readers.finish();
    assert!(checked > 100, "readers checked only {checked} pages");
    let v = wait_until(&mut guest, "source completed", || {
        let v = status(&mut src);
        assert_ne!(v["status"], "failed", "{v}");
        (v["status"] == "completed").then_some(v)
    });
    let d = wait_until(&mut guest, "destination completed", || {
        let v = status(&mut dst);
        assert_ne!(v["status"], "failed", "{v}");
        (v["status"] == "completed").then_some(v)
    });
    eprintln!("source: {v}\ndestination mid-postcopy: {mid}\ndestination: {d}");
    if pause {
        let ds = dst.client.query_device_state().expect("query-device-state");
        assert_eq!(ds["sections"][0]["idstr"], "dev0", "{ds}");
        assert_eq!(
            ds["sections"][0]["data"],
            base64_encode(b"device state handed over in pre-switchover")
        );
    }
    assert!(
        v["ram"]["postcopy-requests"].as_u64().unwrap() > 0,
        "no page came by request: {v}"
    );
    assert_latency_dist(&d);
    let on_preempt = d["ram"]["postcopy-preempt-pages"].as_u64().unwrap_or(0);
    assert_eq!(on_preempt > 0, preempt, "pages on the preempt channel: {d}");
    assert_same_memory(&expected, &guest.map, "helper_to_helper_postcopy");
}

/// Real QEMU source in postcopy -> helper destination whose parent (the test) faults pages
/// in from several threads while QEMU pushes the rest slowly.
fn qemu_to_helper_postcopy(qemu: Qemu, test: &str) {
    qemu_to_helper_postcopy_with(qemu, test, false, false, false);
}

/// QEMU's source discards the pages it has not sent when postcopy starts, as the helper's
/// does: into a guest preallocated with junk, the parent still reads QEMU's content.
#[test]
fn qemu10_to_helper_postcopy_into_preallocated_memory() {
    qemu_to_helper_postcopy_with(
        Qemu::V10,
        "qemu10_to_helper_postcopy_into_preallocated_memory",
        false,
        true,
        false,
    );
}

/// With `preempt`, both sides have postcopy-preempt and the migration runs over a `unix:`
/// listener, where QEMU connects its second (preempt) channel.
fn qemu_to_helper_postcopy_with(qemu: Qemu, test: &str, preempt: bool, prealloc: bool, tls: bool) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let seed = test_seed(test);
    let mut src = QemuVm::start(qemu, RAM, &VmOpts::default());
    fill_mixed(&mut src.ram_mmap(), seed, 0.3);
    let expected = Arc::new(src.ram_mmap().to_vec());
    let mut guest = UffdGuest::new(RAM);
    if prealloc {
        guest.preallocate(0x5a);
    }
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "ram");
    let caps = [("postcopy-ram", true), ("postcopy-preempt", preempt)];
    dst.client.set_capabilities(&caps).expect("caps");
    src.qmp().set_capabilities(&caps).expect("qemu caps");
    let pki = tls.then(support::tls::Pki::new);
    if let Some(pki) = &pki {
        support::tls::tls_source(src.qmp(), &pki.client_dir());
        let dir = pki.server_dir(support::tls::ServerCert::Good);
        support::tls::tls_destination(&mut dst.client, &dir, None);
    }
    // QEMU 7.2 applies the postcopy bandwidth limit to requested pages too, so a very low
    // limit makes each fault wait for the next 100 ms window there.
    src.qmp()
        .set_parameters(json!({"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 16 * MIB}))
        .expect("qemu params");
    let dir = TempDir::new("qmh-pc");
    start_migration(src.qmp(), &mut dst.client, &dir, preempt);
    std::thread::sleep(Duration::from_millis(300));
    src.qmp()
        .migrate_start_postcopy()
        .expect("migrate-start-postcopy");
    wait_until(&mut guest, "destination postcopy-active", || {
        let v = status(&mut dst);
        assert_ne!(v["status"], "failed", "{v}");
        (v["status"] == "postcopy-active" || v["status"] == "completed").then_some(())
    });
    // QEMU's device state came in the postcopy package.
    let ds = dst.client.query_device_state().expect("query-device-state");
    let names: Vec<String> = ds["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .map(|s| s["idstr"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        names.iter().any(|n| n == "timer"),
        "device sections from the package: {names:?}"
    );
    let readers = Readers::start(&guest, expected.clone(), 4, seed);
    std::thread::sleep(Duration::from_millis(500));
    let checked = readers.finish();
    assert!(checked > 20, "readers checked only {checked} pages");
    src.wait_migration(&["completed"], TIMEOUT)
        .expect("qemu source completes");
    let d = wait_until(&mut guest, "destination completed", || {
        let v = status(&mut dst);
        assert_ne!(v["status"], "failed", "{v}");
        (v["status"] == "completed").then_some(v)
    });
    eprintln!("{test}: destination {d}");
    assert!(
        d["ram"]["postcopy-requests"].as_u64().unwrap() > 0,
        "no page came by request: {d}"
    );
    assert_latency_dist(&d);
    let on_preempt = d["ram"]["postcopy-preempt-pages"].as_u64().unwrap_or(0);
    if preempt {
        assert!(on_preempt > 0, "no page came on the preempt channel: {d}");
    } else {
        assert_eq!(on_preempt, 0, "{d}");
    }
    assert_same_memory(&expected, &guest.map, test);
}

#[test]
fn qemu10_to_helper_postcopy_preempt() {
    qemu_to_helper_postcopy_with(
        Qemu::V10,
        "qemu10_to_helper_postcopy_preempt",
        true,
        false,
        false,
    );
}

#[test]
fn qemu72_to_helper_postcopy_preempt() {
    qemu_to_helper_postcopy_with(
        Qemu::V72,
        "qemu72_to_helper_postcopy_preempt",
        true,
        false,
        false,
    );
}

/// postcopy-preempt needs postcopy-ram, and a second connection: a listener on the
/// destination, a `unix:` or `tcp:` address on the source.
#[test]
fn postcopy_preempt_refusals() {
    let mut src = HelperVm::spawn();
    src.add_block("ram", MIB, false);
    src.client
        .set_capabilities(&[("postcopy-ram", true), ("postcopy-preempt", true)])
        .expect("caps");
    let (c, _d) = socketpair();
    src.client.getfd("mig", c.as_fd()).expect("getfd");
    let e = src
        .client
        .migrate("fd:mig")
        .expect_err("source preempt on fd:");
    assert!(e.to_string().contains("multi-channel"), "{e}");
    src.client
        .set_capabilities(&[("postcopy-ram", false)])
        .expect("caps");
    let e = src
        .client
        .migrate("unix:/nonexistent/x")
        .expect_err("no postcopy-ram");
    assert!(e.to_string().contains("requires postcopy-ram"), "{e}");

    let mut dst = HelperVm::spawn();
    dst.add_block("ram", MIB, false);
    dst.client
        .set_capabilities(&[("postcopy-preempt", true)])
        .expect("caps");
    let dir = TempDir::new("qmh-pc");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let e = dst
        .client
        .migrate_incoming(&uri)
        .expect_err("no postcopy-ram");
    assert!(e.to_string().contains("requires postcopy-ram"), "{e}");
    dst.client
        .set_capabilities(&[("postcopy-ram", true), ("postcopy-preempt", true)])
        .expect("caps");
    let (a, _b) = socketpair();
    dst.client.getfd("mig", a.as_fd()).expect("getfd");
    let e = dst
        .client
        .migrate_incoming("fd:mig")
        .expect_err("connected fd");
    assert!(e.to_string().contains("multi-channel"), "{e}");
    // Still usable: the right set-up is taken.
    dst.client
        .migrate_incoming(&uri)
        .expect("incoming on a listener");
    assert_eq!(status(&mut dst)["status"], "setup");
}

#[test]
fn qemu10_to_helper_postcopy() {
    qemu_to_helper_postcopy(Qemu::V10, "qemu10_to_helper_postcopy");
}

#[test]
fn qemu72_to_helper_postcopy() {
    qemu_to_helper_postcopy(Qemu::V72, "qemu72_to_helper_postcopy");
}

/// Helper source in postcopy -> real QEMU destination; QEMU faults pages in when the test
/// reads guest memory through its monitor (`xp`), and the helper serves them.
fn helper_to_qemu_postcopy(qemu: Qemu, test: &str) {
    helper_to_qemu_postcopy_with(qemu, test, false, false);
}

#[test]
fn helper_to_qemu10_postcopy_preempt() {
    helper_to_qemu_postcopy_with(Qemu::V10, "helper_to_qemu10_postcopy_preempt", true, false);
}

/// postcopy-preempt under TLS, helper source: its preempt channel's handshake runs in its
/// sender thread (QEMU accepts the channel whenever it comes).
#[test]
fn tls_helper_to_qemu10_postcopy_preempt() {
    helper_to_qemu_postcopy_with(
        Qemu::V10,
        "tls_helper_to_qemu10_postcopy_preempt",
        true,
        true,
    );
}

/// postcopy-preempt under TLS, QEMU source: QEMU waits for the preempt channel, handshake
/// done, before it sends LISTEN, so the helper accepts it from the start.
#[test]
fn tls_qemu10_to_helper_postcopy_preempt() {
    qemu_to_helper_postcopy_with(
        Qemu::V10,
        "tls_qemu10_to_helper_postcopy_preempt",
        true,
        false,
        true,
    );
}

/// With `preempt`, both sides have postcopy-preempt over a `unix:` listener of QEMU's.
fn helper_to_qemu_postcopy_with(qemu: Qemu, test: &str, preempt: bool, tls: bool) {
    if require_qemu(qemu, test).is_none() {
        return;
    }
    let seed = test_seed(test);
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.3);
    let expected = src.blocks[0].mem.map().to_vec();
    let mut dst = QemuVm::start(qemu, RAM, &VmOpts::incoming());
    let caps = [("postcopy-ram", true), ("postcopy-preempt", preempt)];
    dst.qmp().set_capabilities(&caps).expect("qemu caps");
    src.client.set_capabilities(&caps).expect("caps");
    let pki = tls.then(support::tls::Pki::new);
    if let Some(pki) = &pki {
        support::tls::tls_source(&mut src.client, &pki.client_dir());
        let dir = pki.server_dir(support::tls::ServerCert::Good);
        support::tls::tls_destination(dst.qmp(), &dir, None);
    }
    if qemu == Qemu::V72 {
        src.client
            .set_parameters(json!({"compat-version": "7.2"}))
            .expect("compat");
    }
    src.client
        .set_parameters(json!({"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 32 * MIB}))
        .expect("params");
    let dir = TempDir::new("qmh-pc");
    start_migration(&mut src.client, dst.qmp(), &dir, preempt);
    std::thread::sleep(Duration::from_millis(300));
    src.client
        .migrate_start_postcopy()
        .expect("migrate-start-postcopy");
    src.wait(&["postcopy-active", "completed"], TIMEOUT);
    dst.wait_migration(&["postcopy-active", "completed"], TIMEOUT)
        .expect("qemu postcopy-active");
    assert_source_fault_path_raised(src.pid(), preempt, test);
    // Read pages near the end of RAM (pushed last) through QEMU's monitor: each read faults.
    let mut read = 0;
    for i in 0..40u64 {
        let page = RAM / 4096 - 1 - i * 7;
        let addr = page * 4096;
        let out = dst.hmp(&format!("xp /1xg {addr:#x}")).expect("xp");
        let want = u64::from_le_bytes(
            expected[addr as usize..addr as usize + 8]
                .try_into()
                .unwrap(),
        );
        assert!(
            out.contains(&format!("{want:#018x}")),
            "xp at {addr:#x}: {out:?}, want {want:#018x}"
        );
        read += 1;
    }
    let v = src.wait(&["completed"], TIMEOUT);
    dst.wait_migration(&["completed"], TIMEOUT)
        .expect("qemu completes");
    eprintln!("{test}: read {read} pages through QEMU; source {v}");
    assert!(
        v["ram"]["postcopy-requests"].as_u64().unwrap() > 0,
        "QEMU requested no page: {v}"
    );
    let on_preempt = v["ram"]["postcopy-preempt-pages"].as_u64().unwrap_or(0);
    assert_eq!(
        on_preempt > 0,
        preempt,
        "pages sent on the preempt channel: {v}"
    );
    assert_same_memory(&expected, &dst.ram_mmap(), test);
}

#[test]
fn helper_to_qemu10_postcopy() {
    helper_to_qemu_postcopy(Qemu::V10, "helper_to_qemu10_postcopy");
}

#[test]
fn helper_to_qemu72_postcopy() {
    helper_to_qemu_postcopy(Qemu::V72, "helper_to_qemu72_postcopy");
}

/// The nice value of each thread of process `pid` named `name`.
fn thread_nice(pid: u32, name: &str) -> Vec<i64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // After the command's closing parenthesis come fields 3 on: nice is field 19.
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .collect()
}

/// capability(7) number of CAP_SYS_NICE.
const CAP_SYS_NICE: u32 = 23;

/// Whether a child of this process may ask for nice -10: CAP_SYS_NICE, or an RLIMIT_NICE
/// of at least 30 (20 - nice).
fn may_raise_priority() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|c| c & (1 << CAP_SYS_NICE) != 0);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) };
    cap || (r == 0 && lim.rlim_cur >= 30)
}

/// In postcopy a helper source's return-path reader, and with preempt its preempt sender,
/// run at nice -10 (where the helper may raise them): a vCPU's request waits on them.
fn assert_source_fault_path_raised(pid: u32, preempt: bool, test: &str) {
    if !may_raise_priority() {
        println!("SKIP {test} thread priority: no CAP_SYS_NICE or RLIMIT_NICE >= 30 here");
        return;
    }
    let mut names = vec!["qmh-rp"];
    if preempt {
        names.push("qmh-urgent");
    }
    // A thread raises itself as it starts: allow it a moment (postcopy lasts about 2 s at
    // the test's bandwidth). Report what was seen while the threads were there.
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut last = Vec::new();
    loop {
        let seen: Vec<(&str, Vec<i64>)> = names.iter().map(|n| (*n, thread_nice(pid, n))).collect();
        if seen.iter().all(|(_, v)| !v.is_empty()) {
            if seen.iter().all(|(_, v)| v.iter().all(|&n| n == -10)) {
                return;
            }
            last = seen;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: source fault-path threads not at nice -10: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The start of a postcopy stream for one block "ram" of `size`, up to and including RUN,
/// as a source would send it: header, configuration, OPEN_RETURN_PATH, ADVISE, RAM START,
/// the discards, then the package.
fn postcopy_prologue(size: u64, discards: &[(u64, u64)]) -> Vec<u8> {
    use qemu_migration_helper::compat::wire::command;
    use qemu_migration_helper::wire::{postcopy as pc, ram, stream};
    let mut b = Vec::new();
    stream::encode_header(&mut b);
    stream::encode_configuration(&mut b, "none").unwrap();
    stream::encode_command(&mut b, command::OPEN_RETURN_PATH, &[]).unwrap();
    let advise = pc::encode_advise(&pc::Advise {
        page_size_summary: 4096,
        target_page_size: 4096,
    });
    stream::encode_command(&mut b, command::POSTCOPY_ADVISE, &advise).unwrap();
    let h = stream::SectionHeader {
        section_id: 1,
        idstr: "ram".into(),
        instance_id: 0,
        version_id: 4,
    };
    stream::encode_section_start(&mut b, stream::SectionKind::Start, &h).unwrap();
    ram::encode_block_list(
        &mut b,
        &[ram::BlockEntry {
            idstr: "ram".into(),
            used_length: size,
            page_size: None,
        }],
    )
    .unwrap();
    stream::encode_footer(&mut b, 1);
    pc::encode_discards(&mut b, "ram", discards).unwrap();
    let blob = pc::encode_package(&[]).unwrap();
    stream::encode_command(
        &mut b,
        command::PACKAGED,
        &(blob.len() as u32).to_be_bytes(),
    )
    .unwrap();
    b.extend_from_slice(&blob);
    b
}

/// A PART section with one page at `offset` filled with `byte`.
fn page_part(offset: u64, byte: u8) -> Vec<u8> {
    use qemu_migration_helper::compat::wire::ram as flag;
    use qemu_migration_helper::wire::{ram, stream};
    let mut b = Vec::new();
    stream::encode_section_part(&mut b, stream::SectionKind::Part, 1);
    ram::encode_page_header(&mut b, offset, flag::PAGE, Some("ram")).unwrap();
    b.extend_from_slice(&[byte; 4096]);
    ram::encode_eos(&mut b);
    stream::encode_footer(&mut b, 1);
    b
}

/// Feeds `stream` to a helper destination with a userfaultfd guest, from a thread that also
/// drains the return path; returns the destination's final query-migrate.
fn feed_postcopy(guest: &mut UffdGuest, stream: Vec<u8>, want: &[&str]) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "ram");
    let (a, b) = socketpair();
    dst.client.getfd("mig", b.as_fd()).expect("getfd");
    drop(b);
    dst.client.migrate_incoming("fd:mig").expect("incoming");
    let mut s = std::os::unix::net::UnixStream::from(a);
    let mut r = s.try_clone().expect("clone");
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    let _ = s.write_all(&stream);
    let v = wait_until(guest, "destination to finish", || {
        let v = status(&mut dst);
        want.contains(&v["status"].as_str().unwrap_or(""))
            .then_some(v)
    });
    drop(s);
    let _ = dst.client.quit();
    let _ = drain.join();
    v
}

/// A page that arrives twice in postcopy is placed once (EEXIST is not an error), and the
/// stream completes with the first copy's content.
#[test]
fn postcopy_page_arriving_twice() {
    use qemu_migration_helper::wire::stream;
    let size = MIB;
    let mut guest = UffdGuest::new(size);
    let mut s = postcopy_prologue(size, &[(0, size)]);
    s.extend(page_part(0x3000, 0xaa));
    s.extend(page_part(0x3000, 0xbb));
    let mut end = Vec::new();
    stream::encode_section_part(&mut end, stream::SectionKind::End, 1);
    qemu_migration_helper::wire::ram::encode_eos(&mut end);
    stream::encode_footer(&mut end, 1);
    stream::encode_eof(&mut end);
    s.extend(end);
    let v = feed_postcopy(&mut guest, s, &["completed", "failed"]);
    assert_eq!(v["status"], "completed", "{v}");
    assert!(
        guest.map[0x3000..0x4000].iter().all(|&b| b == 0xaa),
        "first copy wins"
    );
}

/// A discard range past the block's end: a clear error, nothing written outside the block.
#[test]
fn postcopy_discard_out_of_bounds() {
    let size = MIB;
    let mut guest = UffdGuest::new(size);
    let s = postcopy_prologue(size, &[(size - 4096, 8192)]);
    let v = feed_postcopy(&mut guest, s, &["failed"]);
    let e = v["error-desc"].as_str().unwrap_or("");
    assert!(e.contains("outside RAM block"), "{v}");
}

/// A fault in the parent outside every registered block (the parent registered another
/// range on the same userfaultfd) stops the destination with a clear error.
#[test]
fn postcopy_fault_outside_blocks() {
    let size = MIB;
    let mut guest = UffdGuest::new(size);
    // Another region of the parent's, registered on the same userfaultfd but no block.
    let other = Memfd::new("other", 64 * 1024);
    let omap = Arc::new(other.map());
    guest
        .uffd
        .as_ref()
        .expect("uffd")
        .register(omap.as_ptr() as *mut _, 64 * 1024)
        .expect("register other");
    let s = postcopy_prologue(size, &[(0, size)]);
    let om = omap.clone();
    let toucher = std::thread::spawn(move || {
        // Wait for postcopy to listen, then fault outside the block.
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: inside our own mapping.
        unsafe { std::ptr::read_volatile(om.as_ptr() as *const u64) }
    });
    let v = feed_postcopy(&mut guest, s, &["failed"]);
    let e = v["error-desc"].as_str().unwrap_or("");
    assert!(e.contains("outside every RAM block"), "{v}");
    // Let the blocked thread go: without a userfaultfd the page reads as zero.
    guest.release();
    assert_eq!(toucher.join().expect("toucher"), 0);
}

/// A helper source with postcopy-ram, `params` and one block "ram" of random pages (from
/// `seed`), whose migration channel's other end is the test's, not yet migrating.
fn postcopy_source_to_test(
    seed: u64,
    params: serde_json::Value,
) -> (HelperVm, std::os::unix::net::UnixStream) {
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    // Random pages, so that precopy cannot finish before postcopy starts.
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.0);
    src.client
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("caps");
    src.client.set_parameters(params).expect("params");
    let (a, b) = socketpair();
    src.client.getfd("mig", a.as_fd()).expect("getfd");
    drop(a);
    (src, std::os::unix::net::UnixStream::from(b))
}

/// A destination (played by the test) that asks a helper source for a page of an unknown
/// block, then for a page past the block's end: the source stops with a clear error.
#[test]
fn postcopy_bad_page_requests() {
    use qemu_migration_helper::wire::return_path::{encode, RpMessage};
    use std::io::{Read, Write};
    for (what, msg) in [
        (
            "unknown RAM block",
            RpMessage::ReqPagesId {
                offset: 0,
                len: 4096,
                block: "nope",
            },
        ),
        (
            "outside RAM block",
            RpMessage::ReqPagesId {
                offset: RAM,
                len: 4096,
                block: "ram",
            },
        ),
    ] {
        let (mut src, mut s) = postcopy_source_to_test(
            9,
            json!({"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 8 * MIB}),
        );
        let mut r = s.try_clone().expect("clone");
        let drain = std::thread::spawn(move || {
            let mut sink = vec![0u8; 1 << 20];
            while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
        });
        src.client.migrate("fd:mig").expect("migrate");
        std::thread::sleep(Duration::from_millis(100));
        src.client.migrate_start_postcopy().expect("postcopy");
        src.wait(&["postcopy-active"], TIMEOUT);
        let mut m = Vec::new();
        encode(&mut m, &msg).unwrap();
        s.write_all(&m).expect("write request");
        let v = src.wait(&["failed"], TIMEOUT);
        assert!(
            v["error-desc"].as_str().unwrap_or("").contains(what),
            "{what}: {v}"
        );
        drop(s);
        let _ = drain.join();
    }
}

/// Without postcopy-preempt a requested page shares the main channel with the background
/// push. A destination (played by the test) stops reading while the push runs, so the
/// socket fills, then asks for the guest's last page: the source has left room for it and
/// sends it at once, right behind what the socket already held. (A push blocked in a
/// write would send the rest of its chunk first, once the test had drained most of the
/// socket: 32 KiB or more ahead of the page.)
#[test]
fn postcopy_requested_page_goes_next_without_preempt() {
    use qemu_migration_helper::wire::return_path::{encode, RpMessage};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    const PAGE: usize = 4096;
    // Precopy slow, so that it is far from done at the switchover; the push unlimited.
    let (mut src, mut s) = postcopy_source_to_test(11, json!({"max-bandwidth": 8 * MIB}));
    // The pages are random: none goes as a ZERO record, and each is found by its contents.
    let last = RAM - PAGE as u64;
    let want = src.blocks[0].mem.map()[last as usize..].to_vec();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Reads slowly (about 12 MiB/s, above precopy's 8) until told to stop, so that the
    // push has sent little of the guest when it does; then reads what is there, so that
    // what stays queued is the push's alone (a partly read record of precopy's larger
    // writes would keep the socket's whole send buffer charged).
    let stop = Arc::new(AtomicBool::new(false));
    let mut r = s.try_clone().expect("clone");
    let stop2 = stop.clone();
    let drain = std::thread::spawn(move || {
        let mut sink = vec![0u8; 64 << 10];
        while !stop2.load(Ordering::Acquire) {
            if !matches!(r.read(&mut sink), Ok(n) if n > 0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        r.set_nonblocking(true).expect("nonblocking");
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
        r.set_nonblocking(false).expect("blocking");
    });
    src.client.migrate("fd:mig").expect("migrate");
    std::thread::sleep(Duration::from_millis(100));
    src.client.migrate_start_postcopy().expect("postcopy");
    src.wait(&["postcopy-active"], TIMEOUT);
    stop.store(true, Ordering::Release);
    drain.join().expect("drain");
    // The push fills the socket as far as it will.
    std::thread::sleep(Duration::from_millis(300));
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, to `queued`; the fd is open.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::FIONREAD,
            &mut queued,
        )
    };
    assert_eq!(rc, 0, "FIONREAD");
    let queued = queued as usize;
    assert!(
        queued >= PAGE,
        "the push sent nothing after the switchover: {queued}"
    );
    let mut m = Vec::new();
    encode(
        &mut m,
        &RpMessage::ReqPagesId {
            offset: last,
            len: PAGE as u32,
            block: "ram",
        },
    )
    .expect("encode");
    s.write_all(&m).expect("write request");
    // Reads until the page's contents show up, or well past where they should be.
    let limit = queued + (256 << 10);
    let mut got = Vec::with_capacity(limit);
    let mut buf = vec![0u8; 16 << 10];
    let found = loop {
        if let Some(i) = got.windows(PAGE).position(|w| w == &want[..]) {
            break Some(i);
        }
        if got.len() >= limit {
            break None;
        }
        match s.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("reading the stream: {other:?} after {} bytes", got.len()),
        }
    };
    let at = found.unwrap_or_else(|| panic!("page not within {limit} bytes ({queued} queued)"));
    println!("requested page at byte {at} after the request, {queued} bytes were queued");
    // Behind what was queued: at most a page record's header (with the block's name) and
    // a section header between them.
    assert!(
        at >= queued && at <= queued + 64,
        "requested page at byte {at} of what followed the request; {queued} bytes were queued"
    );
    drop(s);
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A helper destination with postcopy-preempt on a `unix:` listener, fed by the test: the
/// main channel has had the postcopy prologue (every page discarded) and the destination is
/// postcopy-active; the preempt channel is connected.
struct PreemptDest {
    guest: UffdGuest,
    dst: HelperVm,
    main: std::os::unix::net::UnixStream,
    preempt: std::os::unix::net::UnixStream,
    /// Reads (and drops) the return path.
    drain: std::thread::JoinHandle<()>,
    _dir: TempDir,
}

fn preempt_destination(size: u64, params: serde_json::Value) -> PreemptDest {
    use std::io::{Read, Write};
    let mut guest = UffdGuest::new(size);
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "ram");
    dst.client
        .set_capabilities(&[("postcopy-ram", true), ("postcopy-preempt", true)])
        .expect("caps");
    dst.client.set_parameters(params).expect("params");
    let dir = TempDir::new("qmh-pc");
    let path = dir.join("mig.sock");
    dst.client
        .migrate_incoming(&format!("unix:{}", path.display()))
        .expect("incoming");
    let mut main = std::os::unix::net::UnixStream::connect(&path).expect("connect main");
    let mut rp = main.try_clone().expect("clone");
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = rp.read_to_end(&mut sink);
    });
    main.write_all(&postcopy_prologue(size, &[(0, size)]))
        .expect("prologue");
    wait_until(&mut guest, "postcopy-active", || {
        let v = status(&mut dst);
        assert_ne!(v["status"], "failed", "{v}");
        (v["status"] == "postcopy-active").then_some(())
    });
    let preempt = std::os::unix::net::UnixStream::connect(&path).expect("connect preempt");
    PreemptDest {
        guest,
        dst,
        main,
        preempt,
        drain,
        _dir: dir,
    }
}

/// A malformed postcopy-preempt channel (a page past the block's end) never writes outside
/// the block and does not fail the migration: the destination pauses, as for a broken link,
/// and keeps answering.
#[test]
fn postcopy_preempt_bad_page_pauses() {
    use qemu_migration_helper::compat::wire::ram as flag;
    use std::io::Write;
    let size = MIB;
    let PreemptDest {
        mut guest,
        mut dst,
        main,
        mut preempt,
        drain,
        _dir,
    } = preempt_destination(size, json!({}));
    let mut bad = Vec::new();
    qemu_migration_helper::wire::ram::encode_page_header(&mut bad, size, flag::PAGE, Some("ram"))
        .expect("header");
    bad.extend_from_slice(&[0x5a; 4096]);
    preempt.write_all(&bad).expect("bad page");
    let v = wait_until(&mut guest, "postcopy-paused", || {
        let v = status(&mut dst);
        assert_ne!(v["status"], "failed", "{v}");
        (v["status"] == "postcopy-paused").then_some(v)
    });
    eprintln!("postcopy_preempt_bad_page_pauses: {v}");
    assert_eq!(
        dst.client.query_migrate().expect("still answering")["status"],
        "postcopy-paused"
    );
    drop((main, preempt));
    let _ = dst.client.quit();
    let _ = drain.join();
    guest.release();
}

/// The stream ends (EOF) while a requested page has come on neither channel: the
/// destination must not complete (the page would read as zero) nor fail (neither side has
/// the whole guest). It waits (at least 1 s), then pauses, so that a recovery can send it.
#[test]
fn postcopy_preempt_missing_page_pauses_at_the_end() {
    use qemu_migration_helper::wire::stream;
    use std::io::Write;
    let size = MIB;
    // No silent-link detection: the one thing that may pause here is the missing page
    // (the destination then waits at most 1 s for it).
    let PreemptDest {
        mut guest,
        mut dst,
        mut main,
        preempt: _preempt,
        drain,
        _dir,
    } = preempt_destination(size, json!({"link-timeout": 0}));
    // A vCPU touches page 5; nothing ever sends it.
    let map = guest.map.clone();
    let toucher = std::thread::spawn(move || {
        // SAFETY: inside the mapping; volatile so the read happens.
        unsafe { std::ptr::read_volatile(map.as_ptr().add(5 * 4096)) }
    });
    // query-migrate counts the request as soon as it is sent, before any page comes.
    wait_until(&mut guest, "the page request", || {
        let v = status(&mut dst);
        (v["ram"]["postcopy-requests"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    let mut end = Vec::new();
    stream::encode_section_part(&mut end, stream::SectionKind::End, 1);
    qemu_migration_helper::wire::ram::encode_eos(&mut end);
    stream::encode_footer(&mut end, 1);
    stream::encode_eof(&mut end);
    main.write_all(&end).expect("end of stream");
    let v = wait_until(&mut guest, "postcopy-paused", || {
        let v = status(&mut dst);
        assert!(
            v["status"] != "failed" && v["status"] != "completed",
            "a missing page must pause the migration: {v}"
        );
        (v["status"] == "postcopy-paused").then_some(v)
    });
    eprintln!("postcopy_preempt_missing_page_pauses_at_the_end: {v}");
    assert!(
        !toucher.is_finished(),
        "the faulting thread got a page nobody sent"
    );
    drop(main);
    let _ = dst.client.quit();
    let _ = drain.join();
    guest.release();
    let _ = toucher.join();
}

/// Pages of `fd` (a memfd of `size` bytes) that hold data rather than a hole, found with
/// SEEK_DATA/SEEK_HOLE.
fn data_pages(fd: std::os::fd::BorrowedFd<'_>, size: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let (mut pos, mut pages) = (0i64, 0u64);
    while (pos as u64) < size {
        // SAFETY: lseek on an fd we hold.
        let data = unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole from here on
        }
        // SAFETY: lseek on an fd we hold.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE from {data}: {hole}");
        pages += (hole - data) as u64 / 4096;
        pos = hole;
    }
    pages
}

/// A zero page of the postcopy stream is left a hole on the destination (a hole reads as
/// zero), not allocated: with half the guest zero, the destination's memfd ends up holding
/// exactly the non-zero pages, and the guest is the source's byte for byte. Precopy leaves
/// zero pages as holes too, so this holds for the whole migration.
#[test]
fn postcopy_leaves_zero_pages_as_holes() {
    if std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[force]"))
    {
        eprintln!("SKIP postcopy_leaves_zero_pages_as_holes: shmem THP is on, so memfd data comes in 2 MiB pages");
        return;
    }
    let seed = test_seed("postcopy_leaves_zero_pages_as_holes");
    let mut src = HelperVm::spawn();
    src.add_block("pc.ram", RAM, false);
    let zero = fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.5) as u64;
    let expected = Arc::new(src.blocks[0].mem.map().to_vec());
    let guest = UffdGuest::new(RAM);
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "pc.ram");
    for h in [&mut src, &mut dst] {
        h.client
            .set_capabilities(&[("postcopy-ram", true)])
            .expect("caps");
    }
    // Most of RAM goes in postcopy.
    src.client
        .set_parameters(json!({"max-bandwidth": 8 * MIB}))
        .expect("params");
    let dir = TempDir::new("qmh-pc-holes");
    start_migration(&mut src.client, &mut dst.client, &dir, false);
    std::thread::sleep(Duration::from_millis(200));
    src.client
        .migrate_start_postcopy()
        .expect("migrate-start-postcopy");
    src.wait(&["completed"], TIMEOUT);
    dst.wait(&["completed"], TIMEOUT);
    let d = status(&mut dst);
    let postcopy_pages = u64_at(&d, &["ram", "normal"]) + u64_at(&d, &["ram", "duplicate"]);
    eprintln!("destination: {d}");
    let nonzero = RAM / 4096 - zero;
    // Counted before reading the guest: a read fault on a hole of a shared mapping
    // allocates the page.
    let data = data_pages(guest.mem.fd.as_fd(), RAM);
    assert_eq!(
        data, nonzero,
        "{zero} zero pages of {}: the memfd holds {data} pages of data ({postcopy_pages} pages received)",
        RAM / 4096
    );
    assert_same_memory(&expected, &guest.map, "postcopy_leaves_zero_pages_as_holes");
}
