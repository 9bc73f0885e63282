//! The source: runs the guest, migrates it through its helper while it runs, and stops it
//! only at switchover.
//!
//! Timeline: boot the guest with KVM dirty logging on -> spawn the helper, hand it RAM and
//! the dirty bitmap -> `migrate` (precopy; a thread ORs KVM's dirty log into the bitmap
//! every HARVEST_INTERVAL) -> the helper converges (or the VMM asks for postcopy) and
//! reports `pre-switchover` -> stop the vCPUs, harvest once more, hand over their state ->
//! `migrate-continue` -> `completed` (in postcopy: `postcopy-active`, pauses recovered on
//! the way, then `completed`). The guest's RAM here stays intact until then.

use std::fmt::Write as _;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_migration_helper::client::ClientError;
use qemu_migration_helper::control::protocol::event;
use serde_json::Value;

use crate::cpu_state::CpuState;
use crate::dirty::{self, DirtyBitmap};
use crate::error::{join, VmmError};
use crate::follow::{Follow, Side};
use crate::helper::{Handover, Helper};
use crate::progress::{children_cpu_s, monotonic_us, quantile, Phase, VcpuControl};
use crate::vm::Vm;
use crate::{vcpu, Options};

/// How often the dirty log goes to the helper while precopy runs: often enough that each
/// of the helper's passes sees recent writes, rarely enough to cost nothing.
const HARVEST_INTERVAL: Duration = Duration::from_millis(20);
/// Passes each vCPU finishes before the migration starts (so it is caught mid-flight).
const WARM_UP_PASSES: u64 = 3;

pub(crate) fn run(opts: &Options, uri: &str) -> Result<(), VmmError> {
    let vm = Vm::new(opts.ram_size, true)?;
    let vcpus = vm.create_vcpus(opts.vcpus)?;
    let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);
    let slow_cycles = u64::from(tsc_khz) * opts.slow.as_micros() as u64 / 1000;
    vm.load_program(u32::try_from(slow_cycles).unwrap_or(u32::MAX))?;
    for (i, v) in vcpus.iter().enumerate() {
        vm.boot_vcpu(v, i as u8, opts.vcpus)?;
    }
    let bitmap = Arc::new(DirtyBitmap::new(vm.ram_size)?);
    let mut handover = Handover::new(opts.helper.clone(), &vm)?;
    handover.dirty_bitmap = Some(bitmap.dup()?);
    handover.capabilities.extend([
        ("pause-before-switchover", true),
        ("auto-converge", opts.auto_converge),
        ("postcopy-ram", opts.postcopy),
        ("postcopy-preempt", opts.preempt),
    ]);
    handover.parameters = opts.params.clone();
    handover.parameters.extend([
        ("max-bandwidth".into(), opts.max_bandwidth.into()),
        (
            "max-postcopy-bandwidth".into(),
            opts.max_postcopy_bandwidth.into(),
        ),
    ]);
    let mut helper = Helper::spawn(&handover)?;

    let ctl = Arc::new(VcpuControl::new(vcpus.len(), Phase::Before));
    let vcpu_threads = vcpu::spawn(vcpus, &ctl, opts.pace)?;
    let (stop_harvest, stop_rx) = mpsc::channel::<()>();
    let harvester = {
        let (bitmap, vm_fd) = (Arc::clone(&bitmap), Arc::clone(&vm.fd));
        std::thread::spawn(move || dirty::harvest_loop(&bitmap, &vm_fd, HARVEST_INTERVAL, &stop_rx))
    };

    let max_throttle = match precopy(&mut helper, &ctl, opts, uri) {
        Ok(max) => max,
        Err(e) => {
            // Before switchover the guest is whole here: it keeps running, as on a QEMU
            // source. Shown for a few passes, then the failure is reported.
            eprintln!("kvm-vmm: migration failed ({e}); the guest keeps running here");
            let _ = helper.client.migrate_cancel();
            ctl.set_throttle(0);
            let before = ctl.progress().passes();
            let p = ctl.wait(opts.timeout, |p| {
                p.passes() >= before + 2 || p.violations > 0
            });
            println!(
                "kvm-vmm: the guest kept running after the failed migration: {} more passes, {} failed checks",
                p.passes() - before,
                p.violations
            );
            drop(stop_harvest);
            let _ = join("harvester", harvester);
            let _ = vcpu_threads.stop();
            let _ = helper.quit();
            return Err(e);
        }
    };
    // Switchover: stop the vCPUs (the downtime starts) and the harvester, then take the
    // last dirty pages: what the vCPUs wrote since the last harvest must reach the
    // destination too.
    let (stopped_at_us, downtime_start) = (monotonic_us(), Instant::now());
    let vcpus = vcpu_threads.stop();
    drop(stop_harvest);
    let harvested = join("harvester", harvester);
    let vcpus = vcpus?;
    harvested?;
    bitmap.harvest(&vm.fd)?;

    let states = vcpus
        .iter()
        .map(CpuState::save)
        .collect::<Result<Vec<_>, _>>()?;
    let sections = states
        .iter()
        .enumerate()
        .map(|(i, s)| s.to_section(i as u32))
        .collect();
    helper.client.device_state_set(Value::Array(sections))?;
    helper.client.migrate_continue()?;
    let mut follow = Follow::new(helper, &handover, Side::Source, uri, opts.timeout);
    follow.until(&["completed"])?;
    let stop_to_completed = downtime_start.elapsed();
    let info = follow.helper.client.query_migrate()?;
    let (pauses, respawns) = (follow.pauses, follow.helper.respawns);
    follow.helper.quit()?;

    let p = ctl.progress();
    let mut line = String::from("result: role=source");
    for (i, (v, s)) in p.vcpus.iter().zip(&states).enumerate() {
        let _ = write!(
            line,
            " last-pass.{i}={} stopped-rdi.{i}={}",
            v.last.unwrap_or(0),
            s.regs.rdi
        );
    }
    let _ = write!(
        line,
        " violations={} stopped-at-us={stopped_at_us} stop-to-completed-ms={} helper-downtime-ms={} \
         max-throttle={max_throttle} postcopy={} pauses={pauses} helper-respawns={respawns} \
         helper-cpu-s={:.2} \
         pages-per-s-before={:.0} pages-per-s-precopy={:.0} slow-steps-before={} tsc-khz={tsc_khz}",
        p.violations,
        stop_to_completed.as_millis(),
        info["downtime"],
        u8::from(opts.postcopy),
        children_cpu_s(),
        quantile(p.rates(Phase::Before), 0.5),
        quantile(p.rates(Phase::Precopy), 0.5),
        p.slow_us(Phase::Before, tsc_khz).len(),
    );
    println!("{line}");
    if p.violations > 0 {
        return Err(VmmError::Guest(format!("{} failed checks", p.violations)));
    }
    Ok(())
}

/// Starts the migration once the guest is running and waits for `pre-switchover`,
/// throttling the vCPUs as the helper asks (auto-converge) and asking for postcopy after
/// `--postcopy-after-ms` meanwhile. Returns the highest throttle asked for.
fn precopy(
    helper: &mut Helper,
    ctl: &VcpuControl,
    opts: &Options,
    uri: &str,
) -> Result<u8, VmmError> {
    let p = ctl.wait(opts.timeout, |p| p.passes() >= WARM_UP_PASSES);
    if p.passes() < WARM_UP_PASSES {
        return Err(VmmError::Guest(format!(
            "only {} passes before the migration (a vCPU stopped?)",
            p.passes()
        )));
    }
    ctl.set_phase(Phase::Precopy);
    let helper = &mut helper.client;
    helper.migrate(uri)?;
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut postcopy_at = opts.postcopy.then(|| started + opts.postcopy_after);
    let mut max_throttle = 0;
    loop {
        let now = Instant::now();
        let until = postcopy_at.map_or(deadline, |t| t.min(deadline));
        let ev = match helper.wait_event(until.saturating_duration_since(now), |e| {
            e.name == event::MIGRATION || e.name == event::CPU_THROTTLE
        }) {
            Ok(ev) => ev,
            Err(ClientError::Timeout { .. })
                if postcopy_at.is_some_and(|t| t <= Instant::now()) =>
            {
                eprintln!("kvm-vmm: switching to postcopy");
                helper.migrate_start_postcopy()?;
                postcopy_at = None;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if ev.name == event::CPU_THROTTLE {
            let percent = ev.data["percentage"].as_u64().unwrap_or(0);
            eprintln!("kvm-vmm: throttling the vCPUs to {percent}%");
            let percent = u8::try_from(percent).unwrap_or(99);
            ctl.set_throttle(percent);
            max_throttle = max_throttle.max(percent);
            continue;
        }
        let status = ev.data["status"].as_str().unwrap_or("");
        println!("kvm-vmm: migration status {status}");
        match status {
            "pre-switchover" => return Ok(max_throttle),
            "failed" | "cancelled" => {
                let info = helper.query_migrate().unwrap_or_default();
                return Err(VmmError::Migration(format!(
                    "{status}: {}",
                    info["error-desc"]
                )));
            }
            _ => {}
        }
    }
}
