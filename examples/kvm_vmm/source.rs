//! The source: runs the guest, migrates it through its helper while it runs, and stops it
//! only at switchover.
//!
//! Timeline: boot the guest with KVM dirty logging on -> spawn the helper, hand it RAM and
//! the dirty bitmap -> `migrate` (precopy; a thread ORs KVM's dirty log into the bitmap
//! every HARVEST_INTERVAL) -> the helper converges and reports `pre-switchover` -> stop the
//! vCPU, harvest once more, hand over the vCPU state -> `migrate-continue` -> `completed`.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_migration_helper::client::HelperClient;
use qemu_migration_helper::control::protocol::event;
use serde_json::{json, Value};

use crate::cpu_state::CpuState;
use crate::dirty::{self, DirtyBitmap};
use crate::error::{join, VmmError};
use crate::vcpu::{self, VcpuControl};
use crate::vm::Vm;
use crate::{helper, Options};

/// How often the dirty log goes to the helper while precopy runs: often enough that each
/// of the helper's passes sees recent writes, rarely enough to cost nothing.
const HARVEST_INTERVAL: Duration = Duration::from_millis(20);
/// Passes the guest finishes before the migration starts (so it is caught mid-flight).
const WARM_UP_PASSES: u64 = 3;

pub(crate) fn run(opts: &Options, uri: &str) -> Result<(), VmmError> {
    let vm = Vm::new(opts.ram_size, true)?;
    vm.load_program()?;
    let vcpu = vm.create_vcpu()?;
    vm.boot_vcpu(&vcpu)?;
    let bitmap = Arc::new(DirtyBitmap::new(vm.ram_size)?);
    let (mut helper, child) = helper::spawn(&opts.helper, &vm, Some(&bitmap.file))?;

    let ctl = Arc::new(VcpuControl::default());
    let vcpu_thread = vcpu::spawn(vcpu, Arc::clone(&ctl), opts.pace)?;
    let (stop_harvest, stop_rx) = mpsc::channel::<()>();
    let harvester = {
        let (bitmap, vm_fd) = (Arc::clone(&bitmap), Arc::clone(&vm.fd));
        std::thread::spawn(move || dirty::harvest_loop(&bitmap, &vm_fd, HARVEST_INTERVAL, &stop_rx))
    };

    let precopy = precopy(&mut helper, &ctl, opts, uri);
    // Whatever happened: stop the vCPU (at switchover this is the downtime's start) and
    // the harvester, then take the last dirty pages: what the vCPU wrote since the last
    // harvest must reach the destination too.
    let downtime_start = Instant::now();
    let vcpu = vcpu_thread.stop();
    drop(stop_harvest);
    let harvested = join("harvester", harvester);
    let max_throttle = precopy?;
    let vcpu = vcpu?;
    harvested?;
    bitmap.harvest(&vm.fd)?;

    let state = CpuState::save(&vcpu)?;
    helper.device_state_set(json!([state.to_section(0)]))?;
    helper.migrate_continue()?;
    let info = helper.wait_for_status(&["completed"], opts.timeout)?;
    let p = ctl.progress();
    println!(
        "result: role=source last-pass={} stopped-rdi={} violations={} stop-to-completed-ms={} helper-downtime-ms={} max-throttle={max_throttle}",
        p.last_pass.unwrap_or(0),
        state.regs.rdi,
        p.violations,
        downtime_start.elapsed().as_millis(),
        info["downtime"],
    );
    helper::quit(helper, child)?;
    if p.violations > 0 {
        return Err(VmmError::Guest(format!("{} failed checks", p.violations)));
    }
    Ok(())
}

/// Starts the migration once the guest is running and waits for `pre-switchover`,
/// throttling the vCPU as the helper asks (auto-converge) meanwhile. Returns the highest
/// throttle asked for.
fn precopy(
    helper: &mut HelperClient,
    ctl: &VcpuControl,
    opts: &Options,
    uri: &str,
) -> Result<u8, VmmError> {
    let p = ctl.wait(opts.timeout, |p| p.passes_seen >= WARM_UP_PASSES);
    if p.passes_seen < WARM_UP_PASSES {
        return Err(VmmError::Guest(format!(
            "only {} passes before the migration (the vCPU stopped?)",
            p.passes_seen
        )));
    }
    helper.set_capabilities(&[
        ("events", true),
        ("pause-before-switchover", true),
        ("auto-converge", opts.auto_converge),
    ])?;
    let mut params = opts.params.clone();
    params.insert("max-bandwidth".into(), opts.max_bandwidth.into());
    helper.set_parameters(Value::Object(params))?;
    helper.migrate(uri)?;
    let deadline = Instant::now() + opts.timeout;
    let mut max_throttle = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = helper.wait_event(left, |e| {
            e.name == event::MIGRATION || e.name == event::CPU_THROTTLE
        })?;
        if ev.name == event::CPU_THROTTLE {
            let percent = ev.data["percentage"].as_u64().unwrap_or(0);
            eprintln!("kvm-vmm: throttling the vCPU to {percent}%");
            let percent = u8::try_from(percent).unwrap_or(99);
            ctl.set_throttle(percent);
            max_throttle = max_throttle.max(percent);
            continue;
        }
        match ev.data["status"].as_str() {
            Some("pre-switchover") => return Ok(max_throttle),
            Some(s @ ("failed" | "cancelled")) => {
                let info = helper.query_migrate().unwrap_or(Value::Null);
                return Err(VmmError::Migration(format!("{s}: {}", info["error-desc"])));
            }
            _ => {}
        }
    }
}
