//! mapped-ram save and restore: `cargo bench --bench mapped_ram`.
//!
//! Saves an incompressible guest to a file with the `mapped-ram` capability and restores it,
//! QEMU 10.0 (KVM where /dev/kvm opens) and the helper, without multifd ("1 channel": the
//! main channel writes the pages) and with multifd's N file channels; each end restores its
//! own save. Prints per case the wall seconds, MB/s of guest RAM and the CPU seconds of the
//! process (utime+stime from /proc), medians over the rounds, and helper/QEMU ratios.
//!
//! Environment: QMH_BENCH_SIZE (default 4G), QMH_BENCH_REPEAT (default 3),
//! QMH_BENCH_CHANNELS (default "1,2"; 1 = no multifd, N > 1 = multifd with N channels),
//! QMH_BENCH_ENDS (default "qemu,helper"), QMH_BENCH_DIR (where the files go, default
//! /var/tmp; needs the size free per end).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_migration_helper::client::HelperClient;
use qemu_migration_helper::demo::{parse_size, process_cpu_secs};
use serde_json::{json, Value};

use support::helper::HelperVm;
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::stats::{bench_requested, env_size, median, repeat};
use support::util::{assert_same_memory, fill_mixed};

const TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Default)]
struct Figures {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Figures {
    fn push(&mut self, (w, c): (f64, f64)) {
        self.wall.push(w);
        self.cpu.push(c);
    }
}

fn configure(c: &mut HelperClient, channels: usize) {
    let mut caps = vec![("mapped-ram", true)];
    if channels > 1 {
        caps.push(("multifd", true));
    }
    c.set_capabilities(&caps).expect("capabilities");
    // QEMU's default max-bandwidth (128 MiB/s) would be the figure otherwise.
    c.set_parameters(json!({"max-bandwidth": 10u64 << 30}))
        .expect("max-bandwidth");
    if channels > 1 {
        c.set_parameters(json!({"multifd-channels": channels}))
            .expect("multifd-channels");
    }
}

/// The save is a mapped-ram file indeed (an engine without it would write a plain stream
/// and the figures would mean something else).
fn check_mapped(file: &Path, who: &str) {
    let r = qemu_migration_helper::analyze::analyze(file, None)
        .unwrap_or_else(|e| panic!("{who}'s save does not analyse: {e}"));
    assert!(
        r.capabilities.iter().any(|c| c == "mapped-ram")
            && r.blocks.iter().all(|b| b.mapped.is_some()),
        "{who}'s save is not a mapped-ram file (capabilities {:?})",
        r.capabilities
    );
}

fn status(v: &Value) -> &str {
    v.get("status").and_then(Value::as_str).unwrap_or("")
}

/// Polls query-migrate until completed (a failure panics with QEMU's or the helper's words).
fn wait_done(c: &mut HelperClient, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let v = c.query_migrate().expect("query-migrate");
        match status(&v) {
            "completed" => return,
            "failed" => panic!("{what}: {v}"),
            _ if Instant::now() > deadline => panic!("{what}: not completed: {v}"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Save then restore with QEMU: wall and CPU of each.
fn qemu_round(size: u64, channels: usize, file: &Path) -> ((f64, f64), (f64, f64)) {
    let _ = std::fs::remove_file(file);
    let mut src = QemuVm::start(Qemu::V10, size, &VmOpts::default());
    fill_mixed(&mut src.ram_mmap(), 7, 0.0);
    configure(src.qmp(), channels);
    let (c0, t0) = (process_cpu_secs(src.pid()), Instant::now());
    src.qmp()
        .migrate(&format!("file:{}", file.display()))
        .expect("migrate");
    wait_done(src.qmp(), "QEMU save");
    let save = (t0.elapsed().as_secs_f64(), process_cpu_secs(src.pid()) - c0);
    check_mapped(file, "QEMU");
    let mut dst = QemuVm::start(Qemu::V10, size, &VmOpts::incoming());
    configure(dst.qmp(), channels);
    let (c0, t0) = (process_cpu_secs(dst.pid()), Instant::now());
    dst.qmp()
        .migrate_incoming(&format!("file:{}", file.display()))
        .expect("migrate-incoming");
    dst.wait_migration(&["completed"], TIMEOUT)
        .expect("QEMU restore");
    let restore = (t0.elapsed().as_secs_f64(), process_cpu_secs(dst.pid()) - c0);
    assert_same_memory(&src.ram_mmap(), &dst.ram_mmap(), "QEMU mapped-ram restore");
    (save, restore)
}

/// Save then restore with helpers (the control side's `file:` + mapped-ram).
fn helper_round(size: u64, channels: usize, file: &Path) -> ((f64, f64), (f64, f64)) {
    let _ = std::fs::remove_file(file);
    // The sandbox allows files under /tmp and /dev/shm only: allow the bench's directory.
    let d = file.parent().unwrap_or(file).display().to_string();
    let helper = || HelperVm::spawn_with_args(&["--log-level", "warn", "--sandbox-allow-path", &d]);
    let mut src = helper();
    src.add_block("ram", size, false);
    fill_mixed(&mut src.blocks[0].mem.map(), 7, 0.0);
    configure(&mut src.client, channels);
    let (c0, t0) = (process_cpu_secs(src.pid()), Instant::now());
    src.client
        .migrate(&format!("file:{}", file.display()))
        .expect("migrate");
    wait_done(&mut src.client, "helper save");
    let save = (t0.elapsed().as_secs_f64(), process_cpu_secs(src.pid()) - c0);
    check_mapped(file, "the helper");
    let mut dst = helper();
    dst.add_block("ram", size, false);
    configure(&mut dst.client, channels);
    let (c0, t0) = (process_cpu_secs(dst.pid()), Instant::now());
    dst.client
        .migrate_incoming(&format!("file:{}", file.display()))
        .expect("migrate-incoming");
    wait_done(&mut dst.client, "helper restore");
    let restore = (t0.elapsed().as_secs_f64(), process_cpu_secs(dst.pid()) - c0);
    assert_same_memory(
        &src.blocks[0].mem.map(),
        &dst.blocks[0].mem.map(),
        "helper mapped-ram restore",
    );
    (save, restore)
}

fn main() {
    if !bench_requested("mapped_ram") {
        return;
    }
    let size = env_size("QMH_BENCH_SIZE", "4G", parse_size);
    let repeat = repeat();
    let channels: Vec<usize> = std::env::var("QMH_BENCH_CHANNELS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let ends = std::env::var("QMH_BENCH_ENDS").unwrap_or_else(|_| "qemu,helper".into());
    let dir: PathBuf = std::env::var_os("QMH_BENCH_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
        .join(format!("qmh-mapped-ram-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let qemu = ends.contains("qemu") && require_qemu(Qemu::V10, "mapped_ram bench").is_some();
    println!(
        "mapped-ram save/restore: {} MiB incompressible guest, {repeat} rounds, files in {} \
         (load: {})",
        size >> 20,
        dir.display(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mb = size as f64 / 1e6;
    for &ch in &channels {
        let mut rows: Vec<(&str, Figures, Figures)> = Vec::new();
        for (end, on) in [("QEMU 10.0", qemu), ("helper", ends.contains("helper"))] {
            if !on {
                continue;
            }
            let (mut save, mut restore) = (Figures::default(), Figures::default());
            for r in 0..repeat {
                let file = dir.join("save.bin");
                let (s, l) = if end == "helper" {
                    helper_round(size, ch, &file)
                } else {
                    qemu_round(size, ch, &file)
                };
                println!(
                    "  {end}, {ch} channel(s), round {r}: save {:.3} s ({:.2} CPU s), \
                     restore {:.3} s ({:.2} CPU s)",
                    s.0, s.1, l.0, l.1
                );
                save.push(s);
                restore.push(l);
                let _ = std::fs::remove_file(&file);
            }
            rows.push((end, save, restore));
        }
        println!(
            "\n{ch} channel(s){}:",
            if ch > 1 { " (multifd)" } else { "" }
        );
        for (end, s, l) in &rows {
            for (what, f) in [("save", s), ("restore", l)] {
                let (w, c) = (median(&f.wall), median(&f.cpu));
                println!(
                    "  {end:<10} {what:<8} {w:7.3} s  {:7.0} MB/s  {c:6.2} CPU s",
                    mb / w
                );
            }
        }
        if let [(_, qs, ql), (_, hs, hl)] = &rows[..] {
            println!(
                "  helper/QEMU: save {:.2}x wall, {:.2}x CPU; restore {:.2}x wall, {:.2}x CPU",
                median(&hs.wall) / median(&qs.wall),
                median(&hs.cpu) / median(&qs.cpu),
                median(&hl.wall) / median(&ql.wall),
                median(&hl.cpu) / median(&ql.cpu)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
