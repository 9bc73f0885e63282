//! auto-converge (issue 15): the helper computes the vCPU throttle as QEMU does and asks
//! the parent for it (`CPU_THROTTLE` events, `query-migrate`'s `cpu-throttle-percentage`).
//! The test is the parent: its "guest" writes a region faster than `max-bandwidth` moves
//! it and slows down as asked. With auto-converge the migration converges; without it, it
//! does not.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helper_helper::{connect_fd, spawn_helper, spawn_with};
use support::helper::HelperVm;
use support::util::{assert_same_memory, fill_mixed, MIB, PAGE_SIZE};

const RAM: u64 = 128 * MIB;
/// The part of RAM the guest keeps writing: 1.5 s of `BANDWIDTH`, so that each pass
/// outlasts QEMU's one-second throttle period.
const REGION: usize = 96 << 20;
const BANDWIDTH: u64 = 64 * MIB;
/// The guest's unthrottled dirty rate: four times what the link moves.
const DIRTY_RATE: u64 = 4 * BANDWIDTH;
const SLOT: Duration = Duration::from_millis(10);
const TIMEOUT: Duration = Duration::from_secs(90);

/// The parent's vCPU: writes `REGION` page by page at `DIRTY_RATE` (paced in 10 ms slots),
/// running only `100 - throttle`% of each slot, as a VMM throttling its vCPUs would.
fn guest(
    mut mem: support::map::RamMap,
    bitmap: support::map::RamMap,
    throttle: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
) {
    let pages = REGION / PAGE_SIZE;
    let words = bitmap.len() / 8;
    // SAFETY: the bitmap mapping is page aligned, `words * 8` bytes long and lives as long
    // as this function; the helper accesses it atomically too.
    let bits: &[AtomicU64] =
        unsafe { std::slice::from_raw_parts(bitmap.as_ptr() as *const AtomicU64, words) };
    let per_slot = (DIRTY_RATE as f64 * SLOT.as_secs_f64() / PAGE_SIZE as f64) as u64;
    let mut next = 0usize;
    let mut counter = 0u64;
    while !stop.load(Ordering::Acquire) {
        let t = Instant::now();
        let run = 100 - throttle.load(Ordering::Relaxed).min(100) as u64;
        for _ in 0..per_slot * run / 100 {
            counter += 1;
            let page = &mut mem[next * PAGE_SIZE..(next + 1) * PAGE_SIZE];
            page[..8].copy_from_slice(&counter.to_le_bytes());
            page[PAGE_SIZE - 8..].copy_from_slice(&counter.to_le_bytes());
            bits[next / 64].fetch_or((1u64 << (next % 64)).to_le(), Ordering::SeqCst);
            next = (next + 1) % pages;
        }
        writes.fetch_add(per_slot * run / 100, Ordering::Relaxed);
        if let Some(rest) = SLOT.checked_sub(t.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

struct Run {
    src: HelperVm,
    dst: HelperVm,
    throttle: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Run {
    fn start(auto_converge: bool) -> Run {
        let mut src = spawn_helper();
        src.add_block("ram", RAM, true);
        // Incompressible from the start: the first pass takes its full time too.
        fill_mixed(&mut src.blocks[0].mem.map(), 0x5eed, 0.0);
        let mut dst = spawn_with(&[("ram", RAM)]);
        src.client
            .set_capabilities(&[
                ("pause-before-switchover", true),
                ("auto-converge", auto_converge),
            ])
            .expect("caps");
        // Three steps to the ceiling: 50, 75, 99.
        src.client
            .set_parameters(json!({
                "max-bandwidth": BANDWIDTH,
                "downtime-limit": 300,
                "cpu-throttle-initial": 50,
                "cpu-throttle-increment": 25,
            }))
            .expect("params");
        let throttle = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let mem = src.blocks[0].mem.map();
            let bitmap = src.blocks[0].bitmap.as_ref().expect("bitmap").map();
            let (throttle, stop) = (throttle.clone(), stop.clone());
            let writes = Arc::new(AtomicU64::new(0));
            std::thread::spawn(move || guest(mem, bitmap, throttle, stop, writes))
        };
        connect_fd(&mut src, &mut dst, "mig");
        dst.client
            .migrate_incoming("fd:mig")
            .expect("migrate-incoming");
        src.client.migrate("fd:mig").expect("migrate");
        Run {
            src,
            dst,
            throttle,
            stop,
            writer: Some(writer),
        }
    }

    fn stop_guest(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.writer.take() {
            w.join().expect("guest thread");
        }
    }

    /// Plays the parent until the source reaches `pre-switchover` or `deadline`: each
    /// `CPU_THROTTLE` sets the guest's throttle. Returns the percentages asked, in order,
    /// and the last `query-migrate`.
    fn follow(&mut self, deadline: Instant) -> (Vec<u64>, Value) {
        let mut asked = Vec::new();
        loop {
            if let Ok(ev) = self
                .src
                .client
                .wait_event(Duration::from_millis(200), |e| e.name == "CPU_THROTTLE")
            {
                let pct = ev.data["percentage"].as_u64().expect("percentage");
                self.throttle.store(pct as u8, Ordering::Relaxed);
                asked.push(pct);
            }
            let info = self.src.client.query_migrate().expect("query-migrate");
            let status = info["status"].as_str().unwrap_or("").to_string();
            assert!(
                status == "active" || status == "pre-switchover" || status == "setup",
                "source: {info}"
            );
            if status == "pre-switchover" || Instant::now() >= deadline {
                return (asked, info);
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.stop_guest();
    }
}

#[test]
fn auto_converge_throttles_a_fast_guest_until_it_converges() {
    let test = "auto_converge_throttles_a_fast_guest_until_it_converges";
    let t0 = Instant::now();
    let mut r = Run::start(true);
    let (asked, info) = r.follow(Instant::now() + TIMEOUT);
    eprintln!(
        "{test}: throttle asked {asked:?}; {:?}: {info}",
        t0.elapsed()
    );
    assert_eq!(
        info["status"], "pre-switchover",
        "{test}: the source did not converge with auto-converge"
    );
    // QEMU's steps: cpu-throttle-initial, then + cpu-throttle-increment, up to the ceiling.
    assert!(!asked.is_empty(), "{test}: no CPU_THROTTLE event");
    assert_eq!(asked[0], 50, "{test}: {asked:?}");
    assert!(
        asked.windows(2).all(|w| w[1] == (w[0] + 25).min(99)),
        "{test}: {asked:?}"
    );
    assert_eq!(
        info["cpu-throttle-percentage"].as_u64(),
        asked.last().copied(),
        "{test}: query-migrate shows the throttle in force: {info}"
    );
    let params = r
        .src
        .client
        .execute("query-migrate-parameters", json!({}))
        .expect("parameters");
    assert_eq!(params["cpu-throttle-initial"], 50, "{params}");
    assert_eq!(params["cpu-throttle-increment"], 25, "{params}");
    assert_eq!(params["max-cpu-throttle"], 99, "{params}");

    // The parent stops the vCPUs and lets the switchover go.
    r.stop_guest();
    r.src.client.migrate_continue().expect("migrate-continue");
    r.src.wait(&["completed"], TIMEOUT);
    r.dst.wait(&["completed"], TIMEOUT);
    // The throttle is lifted when the migration ends.
    let lift = r
        .src
        .client
        .wait_event(Duration::from_secs(5), |e| e.name == "CPU_THROTTLE")
        .expect("the throttle lifted at the end");
    assert_eq!(lift.data["percentage"], 0, "{test}: {:?}", lift.data);
    let src_ram = r.src.blocks[0].mem.map().to_vec();
    assert_same_memory(&src_ram, &r.dst.blocks[0].mem.map(), test);
}

#[test]
fn without_auto_converge_the_fast_guest_does_not_converge() {
    let test = "without_auto_converge_the_fast_guest_does_not_converge";
    let mut r = Run::start(false);
    // Long enough for the throttled run to have converged (three steps of two periods).
    let (asked, info) = r.follow(Instant::now() + Duration::from_secs(15));
    eprintln!("{test}: {info}");
    assert!(asked.is_empty(), "{test}: throttle asked {asked:?}");
    assert_eq!(info["status"], "active", "{test}: {info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 5,
        "{test}: the passes went on: {info}"
    );
    assert!(
        info.get("cpu-throttle-percentage").is_none(),
        "{test}: no throttle field without auto-converge: {info}"
    );
    r.src.client.migrate_cancel().expect("migrate_cancel");
    r.src.wait(&["cancelled"], TIMEOUT);
}

#[test]
fn throttle_parameters_take_qemus_ranges() {
    let mut h = spawn_helper();
    for (args, words) in [
        (
            json!({"cpu-throttle-initial": 0}),
            "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99",
        ),
        (
            json!({"cpu-throttle-increment": 100}),
            "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99",
        ),
        (
            json!({"throttle-trigger-threshold": 101}),
            "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100",
        ),
        (
            json!({"cpu-throttle-initial": 60, "max-cpu-throttle": 50}),
            "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99",
        ),
        (
            json!({"max-cpu-throttle": 300}),
            "Parameter 'max-cpu-throttle' expects uint8",
        ),
    ] {
        let e = h
            .client
            .set_parameters(args.clone())
            .expect_err("out of range");
        assert!(e.to_string().contains(words), "{args}: {e}");
    }
    // A refused set changes nothing.
    let p = h
        .client
        .execute("query-migrate-parameters", json!({}))
        .expect("parameters");
    assert_eq!(p["cpu-throttle-initial"], 20, "{p}");
    assert_eq!(p["throttle-trigger-threshold"], 50, "{p}");
    assert_eq!(p["cpu-throttle-tailslow"], false, "{p}");
    h.client
        .set_parameters(json!({"cpu-throttle-tailslow": true, "max-cpu-throttle": 80}))
        .expect("in range");
    let p = h
        .client
        .execute("query-migrate-parameters", json!({}))
        .expect("parameters");
    assert_eq!(p["cpu-throttle-tailslow"], true, "{p}");
    assert_eq!(p["max-cpu-throttle"], 80, "{p}");
    let caps = h.client.query_capabilities().expect("caps");
    assert!(
        caps.as_array()
            .expect("list")
            .iter()
            .any(|c| c["capability"] == "auto-converge"),
        "{caps}"
    );
}
