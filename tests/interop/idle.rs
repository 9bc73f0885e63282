//! An idle helper and a helper paused in postcopy use no CPU: over 10 s their threads
//! neither run nor wake (every wait is on an event, none is a timed poll). And waiting on
//! events does not make them slow to react: a recovery reaches postcopy-active at once, and
//! a paused helper whose parent goes away stops as soon as `orphan-timeout` ends (the
//! cancel wakes its migration thread; `migrate_cancel` is refused in postcopy, as QEMU's).

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::json;

use support::helper::HelperVm;
use support::migrate::socketpair;
use support::uffd::UffdGuest;
use support::util::{fill_mixed, test_seed, MIB};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(60);
const WINDOW: Duration = Duration::from_secs(10);
/// Wake-ups (context switches, all threads) a quiet helper may have in [`WINDOW`]: a few
/// for stray signals or the kernel's own work, far below one per second.
const MAX_SWITCHES: u64 = 10;
/// CPU time (utime + stime, clock ticks of 10 ms) a quiet helper may use in [`WINDOW`].
const MAX_TICKS: u64 = 2;
/// How fast a recovery or a cancel must take effect.
const REACT: Duration = Duration::from_secs(2);

/// One thread's counters: CPU ticks and context switches.
#[derive(Debug, Clone, Default)]
struct ThreadStat {
    name: String,
    ticks: u64,
    switches: u64,
}

/// Every thread of `pid`, by TID.
fn threads(pid: u32) -> BTreeMap<u32, ThreadStat> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        // A thread may end between the listing and the reads: skip it then.
        let (Ok(stat), Ok(status), Ok(comm)) = (
            std::fs::read_to_string(p.join("stat")),
            std::fs::read_to_string(p.join("status")),
            std::fs::read_to_string(p.join("comm")),
        ) else {
            continue;
        };
        // Fields after the command name, which may hold spaces: state is field 3,
        // utime 14 and stime 15.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let ticks = field(14).unwrap_or(0) + field(15).unwrap_or(0);
        let switches = status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(
            tid,
            ThreadStat {
                name: comm.trim().to_string(),
                ticks,
                switches,
            },
        );
    }
    out
}

/// What each thread did between two snapshots (a thread that started meanwhile counts
/// from zero); returns the process's totals (ticks, switches) and prints the threads.
fn report(
    what: &str,
    before: &BTreeMap<u32, ThreadStat>,
    after: &BTreeMap<u32, ThreadStat>,
) -> (u64, u64) {
    let (mut ticks, mut switches) = (0, 0);
    let mut lines = Vec::new();
    for (tid, a) in after {
        let b = before.get(tid).cloned().unwrap_or_default();
        let (t, s) = (
            a.ticks - b.ticks.min(a.ticks),
            a.switches - b.switches.min(a.switches),
        );
        ticks += t;
        switches += s;
        lines.push(format!(
            "    {tid:>7} {:<16} cpu {t:>3} ticks, {s:>5} wake-ups",
            a.name
        ));
    }
    for (tid, b) in before {
        if !after.contains_key(tid) {
            lines.push(format!(
                "    {tid:>7} {:<16} (ended during the window)",
                b.name
            ));
        }
    }
    eprintln!(
        "idle: {what}: {ticks} ticks of CPU, {switches} wake-ups in {} s\n{}",
        WINDOW.as_secs(),
        lines.join("\n")
    );
    (ticks, switches)
}

/// A source and a destination helper in postcopy-active (64 MiB, the push throttled so
/// that it is still running), the destination's guest behind a userfaultfd.
fn start_postcopy(seed: u64) -> (HelperVm, HelperVm, UffdGuest) {
    let mut src = HelperVm::spawn();
    src.add_block("ram", RAM, false);
    fill_mixed(&mut src.blocks[0].mem.map(), seed, 0.2);
    let guest = UffdGuest::new(RAM);
    let mut dst = HelperVm::spawn();
    guest.attach(&mut dst, "ram");
    for h in [&mut src, &mut dst] {
        h.client
            .set_capabilities(&[("postcopy-ram", true)])
            .expect("caps");
        h.client
            .set_parameters(json!({"orphan-timeout": 1000}))
            .expect("orphan-timeout");
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
    dst.wait(&["postcopy-active"], TIMEOUT);
    (src, dst, guest)
}

fn pause(src: &mut HelperVm, dst: &mut HelperVm) {
    src.client
        .execute_oob("migrate-pause", json!({}))
        .expect("migrate-pause");
    src.wait(&["postcopy-paused"], TIMEOUT);
    dst.wait(&["postcopy-paused"], TIMEOUT);
}

/// Closes the parent's end of the control connection and returns how long the helper took
/// to exit.
fn time_to_exit(h: &mut HelperVm) -> Duration {
    let t0 = Instant::now();
    h.close_control();
    while !h.exited() {
        assert!(t0.elapsed() < TIMEOUT, "helper {} did not exit", h.pid());
        std::thread::sleep(Duration::from_millis(2));
    }
    t0.elapsed()
}

#[test]
fn idle_and_paused_helpers_use_no_cpu_and_react_at_once() {
    let seed = test_seed("idle_and_paused");
    // A parent's helper with its RAM registered but no migration yet.
    let mut idle = HelperVm::spawn();
    idle.add_block("ram", 16 * MIB, true);
    let (mut src, mut dst, mut guest) = start_postcopy(seed);
    pause(&mut src, &mut dst);
    // Let whatever the pause ended (threads, sockets) settle.
    std::thread::sleep(Duration::from_millis(500));

    // The three windows at once.
    let procs = [
        ("idle helper", idle.pid()),
        ("paused source", src.pid()),
        ("paused destination", dst.pid()),
    ];
    let before: Vec<_> = procs.iter().map(|(_, p)| threads(*p)).collect();
    std::thread::sleep(WINDOW);
    let after: Vec<_> = procs.iter().map(|(_, p)| threads(*p)).collect();
    let totals: Vec<(&str, u64, u64)> = procs
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((what, _), (b, a))| {
            let (t, s) = report(what, b, a);
            (*what, t, s)
        })
        .collect();

    // Still paused after the window (nothing timed out), and a recovery goes through at once.
    assert_eq!(
        src.client.query_migrate().expect("query")["status"],
        "postcopy-paused"
    );
    let (a, b) = socketpair();
    dst.client.getfd("rec", b.as_fd()).expect("getfd");
    src.client.getfd("rec", a.as_fd()).expect("getfd");
    drop((a, b));
    let t0 = Instant::now();
    dst.client
        .execute_oob("migrate-recover", json!({"uri": "fd:rec"}))
        .expect("migrate-recover");
    src.client
        .execute("migrate", json!({"uri": "fd:rec", "resume": true}))
        .expect("migrate resume");
    src.wait(&["postcopy-active", "completed"], TIMEOUT);
    dst.wait(&["postcopy-active", "completed"], TIMEOUT);
    let recovery = t0.elapsed();
    eprintln!(
        "idle: recovery to postcopy-active in {:.1} ms",
        recovery.as_secs_f64() * 1e3
    );

    // Paused again, the parents go away: each helper waits orphan-timeout (1 s) for an
    // adopter, then cancels its migration thread, joins it and exits.
    pause(&mut src, &mut dst);
    let orphan = Duration::from_millis(1000);
    let src_exit = time_to_exit(&mut src);
    let dst_exit = time_to_exit(&mut dst);
    guest.release();
    let idle_exit = time_to_exit(&mut idle);
    eprintln!(
        "idle: exit after the parent went: paused source {:.0} ms, paused destination {:.0} ms (orphan-timeout {} ms), idle {:.0} ms",
        src_exit.as_secs_f64() * 1e3,
        dst_exit.as_secs_f64() * 1e3,
        orphan.as_millis(),
        idle_exit.as_secs_f64() * 1e3
    );

    for (what, ticks, switches) in &totals {
        assert!(
            *switches <= MAX_SWITCHES && *ticks <= MAX_TICKS,
            "{what}: {switches} wake-ups and {ticks} ticks of CPU in {} s (at most {MAX_SWITCHES} and {MAX_TICKS}); see the threads above",
            WINDOW.as_secs()
        );
    }
    assert!(recovery < REACT, "recovery took {recovery:?}");
    for (what, t) in [("source", src_exit), ("destination", dst_exit)] {
        assert!(
            t >= orphan && t < orphan + REACT,
            "paused {what} exited {t:?} after its parent went (orphan-timeout {orphan:?})"
        );
    }
    assert!(idle_exit < REACT, "idle helper exited after {idle_exit:?}");
}
