//! The example VMM on KVM (examples/kvm_vmm) as a benchmark: `cargo bench --bench kvm_vmm`.
//!
//! Two VMM processes on this host, each with its own helper, a guest with two vCPUs
//! rewriting its RAM (QMH_BENCH_KVM_RAM_MIB, default 256) over a unix socket:
//! - precopy at three dirty rates (the guest's `--pace-ms` after each pass: 0, 500, 2000):
//!   the dirty rate the guest reached before migration (both vCPUs), the downtime (the source's vCPUs
//!   stopped -> the destination's running, CLOCK_MONOTONIC of one host), the helper's own
//!   `downtime`, and each side's helper CPU seconds;
//! - postcopy (after 300 ms of precopy at 64 MiB/s, push at full speed), without and with
//!   postcopy-preempt: the fault latency the guest measured (`rdtsc` around each page step,
//!   steps over `--slow-us` 30 us, p50/p99; the same figure after the migration is the
//!   host's noise floor), the helper's own (fault read -> page placed), its request count,
//!   and the guest's progress (MiB/s written per vCPU) before migration, during postcopy
//!   and after.
//!
//! Medians over QMH_BENCH_REPEAT runs (default 3). No QEMU column: QEMU cannot run this
//! VMM's guest; `cargo bench --bench postcopy` compares fault service with QEMU.

use std::path::Path;

use support::kvm_vmm::{args, kvm_missing, migrate, vmm_bin, VmmResult};
use support::stats::{bench_requested, env_u64, median, repeat};
use support::util::TempDir;

const FINISH: std::time::Duration = std::time::Duration::from_secs(300);

/// One migration; both result lines.
fn run(vmm: &Path, common: &[String], src_extra: &[&str]) -> (VmmResult, VmmResult) {
    let dir = TempDir::new("kvm-bench");
    let o = migrate(
        vmm,
        dir.path(),
        common,
        &args(src_extra),
        &args(&["--passes", "3"]),
        FINISH,
    );
    let [s, d] = o.results();
    (s, d)
}

fn med(runs: &[(VmmResult, VmmResult)], f: impl Fn(&VmmResult, &VmmResult) -> f64) -> f64 {
    median(&runs.iter().map(|(s, d)| f(s, d)).collect::<Vec<_>>())
}

/// Pages per second to MiB/s.
fn mib_s(pages_per_s: f64) -> f64 {
    pages_per_s * 4096.0 / (1 << 20) as f64
}

fn main() {
    if !bench_requested("kvm_vmm") {
        return;
    }
    if let Some(why) = kvm_missing() {
        println!("SKIP kvm_vmm bench: {why}");
        return;
    }
    let vmm = vmm_bin();
    let ram_mib = env_u64("QMH_BENCH_KVM_RAM_MIB", 256);
    let common: Vec<String> = [
        "--ram-mib",
        &ram_mib.to_string(),
        "--vcpus",
        "2",
        "--timeout-s",
        "240",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let n = repeat();

    println!("\nprecopy, {ram_mib} MiB, 2 vCPUs, medians of {n}");
    println!(
        "{:>8} {:>12} {:>12} {:>13} {:>12} {:>12}",
        "pace-ms", "dirty MiB/s", "downtime ms", "helper dt ms", "src cpu-s", "dst cpu-s"
    );
    for pace in ["0", "500", "2000"] {
        let mut c = common.clone();
        c.extend(["--pace-ms".to_string(), pace.to_string()]);
        let runs: Vec<_> = (0..n).map(|_| run(&vmm, &c, &[])).collect();
        println!(
            "{pace:>8} {:>12.0} {:>12.1} {:>13.0} {:>12.2} {:>12.2}",
            med(&runs, |s, _| 2.0 * mib_s(s.f("pages-per-s-before"))),
            med(&runs, |s, d| (d.f("running-at-us") - s.f("stopped-at-us"))
                / 1000.0),
            med(&runs, |s, _| s.f("helper-downtime-ms")),
            med(&runs, |s, _| s.f("helper-cpu-s")),
            med(&runs, |_, d| d.f("helper-cpu-s")),
        );
    }

    println!(
        "\npostcopy, {ram_mib} MiB, 2 vCPUs, medians of {n} (latencies in us, progress in MiB/s per vCPU)"
    );
    println!(
        "{:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "case",
        "downtime",
        "guest50",
        "guest99",
        "faults",
        "requests",
        "helper50",
        "helper99",
        "noise50",
        "noise99",
        "prog-bef",
        "prog-pc",
        "prog-after",
        "src cpu",
        "dst cpu"
    );
    for (name, extra) in [("no-pre", &[][..]), ("preempt", &["--preempt"][..])] {
        let mut c = common.clone();
        c.extend(extra.iter().map(|s| s.to_string()));
        let src_extra = [
            "--postcopy",
            "--postcopy-after-ms",
            "300",
            "--max-bandwidth",
            "67108864",
        ];
        let runs: Vec<_> = (0..n).map(|_| run(&vmm, &c, &src_extra)).collect();
        for (s, d) in &runs {
            eprintln!("{name}: source {s:?}\n{name}: destination {d:?}");
        }
        println!(
            "{name:>9} {:>9.1} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>9.0} {:>9.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>8.2} {:>8.2}",
            med(&runs, |s, d| (d.f("running-at-us") - s.f("stopped-at-us")) / 1000.0),
            med(&runs, |_, d| d.f("fault-p50-us")),
            med(&runs, |_, d| d.f("fault-p99-us")),
            med(&runs, |_, d| d.f("slow-steps-postcopy")),
            med(&runs, |_, d| d.f("postcopy-requests")),
            med(&runs, |_, d| d.f("helper-p50-us")),
            med(&runs, |_, d| d.f("helper-p99-us")),
            med(&runs, |_, d| d.f("slow-p50-us-after")),
            med(&runs, |_, d| d.f("slow-p99-us-after")),
            med(&runs, |s, _| mib_s(s.f("pages-per-s-before"))),
            med(&runs, |_, d| mib_s(d.f("pages-per-s-postcopy"))),
            med(&runs, |_, d| mib_s(d.f("pages-per-s-after"))),
            med(&runs, |s, _| s.f("helper-cpu-s")),
            med(&runs, |_, d| d.f("helper-cpu-s")),
        );
    }
}
