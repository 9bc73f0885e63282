//! The destination: receives the guest's RAM and vCPU state through its helper and runs
//! the guest, at once in postcopy (missing pages fault through its userfaultfd and the
//! helper serves them), after `completed` in precopy; then checks that the guest carries
//! on where the source stopped it.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Arc;

use serde_json::Value;

use crate::cpu_state::{self, CpuState};
use crate::error::VmmError;
use crate::follow::{Follow, Side};
use crate::helper::{Handover, Helper};
use crate::progress::{children_cpu_s, monotonic_us, quantile, Phase, VcpuControl};
use crate::uffd::GuestFaults;
use crate::vm::Vm;
use crate::{vcpu, Options};

pub(crate) fn run(opts: &Options, uri: &str) -> Result<(), VmmError> {
    // No program loaded and no dirty log: RAM and registers arrive with the migration.
    let vm = Vm::new(opts.ram_size, false)?;
    let vcpus = vm.create_vcpus(opts.vcpus)?;
    let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);
    // Ready for postcopy whatever the source does (as a QEMU destination with
    // postcopy-ram): a vCPU must never touch a page that has not arrived unnoticed.
    let faults = GuestFaults::register(vm.host_addr()?, vm.ram_size)?;
    let mut handover = Handover::new(opts.helper.clone(), &vm)?;
    handover.userfaultfd = Some((faults.dup()?, faults.addr()));
    handover
        .capabilities
        .extend([("postcopy-ram", true), ("postcopy-preempt", opts.preempt)]);
    handover.parameters = opts.params.clone();
    let mut helper = Helper::spawn(&handover)?;
    helper.client.migrate_incoming(uri)?;
    // Whoever starts the source waits for this line: the helper listens now.
    println!("kvm-vmm: listening on {uri}");
    std::io::stdout()
        .flush()
        .map_err(|e| VmmError::Io("stdout", e))?;

    let mut follow = Follow::new(helper, &handover, Side::Destination, uri, opts.timeout);
    let status = follow.until(&["postcopy-active", "completed"])?;
    let postcopy = status == "postcopy-active";
    // In postcopy the device state came in the package, before this status.
    let sections = follow.helper.client.query_device_state()?;
    let states = (0..vcpus.len())
        .map(|i| CpuState::from_section(cpu_section(&sections, i)?))
        .collect::<Result<Vec<_>, VmmError>>()?;
    for (state, vcpu) in states.iter().zip(&vcpus) {
        state.restore(vcpu)?;
    }
    let ctl = Arc::new(VcpuControl::new(
        vcpus.len(),
        if postcopy {
            Phase::Postcopy
        } else {
            Phase::After
        },
    ));
    if !postcopy {
        // Every page is here; a page never sent is a hole that must read as zeros, not a
        // missing-page fault nobody serves any more.
        faults.unregister()?;
    }
    let (running_at_us, running) = (monotonic_us(), std::time::Instant::now());
    let vcpu_threads = vcpu::spawn(vcpus, &ctl, opts.pace)?;

    let finished = if postcopy {
        follow.until(&["completed"]).map(|_| ())
    } else {
        Ok(())
    };
    ctl.set_phase(Phase::After);
    // The VM description comes at the end of the stream, and only in precopy (QEMU omits
    // it in postcopy): only then can the helper's decoding be checked.
    let described = match finished {
        Ok(()) if !postcopy => check_all_described(&mut follow.helper, &states),
        _ => Ok(()),
    };
    // After `completed` every page is in place; after a failure this wakes any vCPU
    // blocked on a missing page, so that it can be stopped.
    let unregistered = if postcopy {
        faults.unregister()
    } else {
        Ok(())
    };
    let postcopy_ms = running.elapsed().as_secs_f64() * 1000.0;
    let info = follow.helper.client.query_migrate().unwrap_or_default();
    let (pauses, respawns) = (follow.pauses, follow.helper.respawns);
    let quit = follow.helper.quit();

    let p = match finished {
        Ok(()) => ctl.wait(opts.timeout, |p| {
            p.passes() >= opts.passes || p.violations > 0
        }),
        Err(_) => ctl.progress(),
    };
    vcpu_threads.stop()?;
    finished?;
    described?;
    unregistered?;
    quit?;

    let mut line = String::from("result: role=destination");
    for (i, (v, s)) in p.vcpus.iter().zip(&states).enumerate() {
        let _ = write!(
            line,
            " first-pass.{i}={} resumed-rdi.{i}={}",
            v.first.unwrap_or(0),
            s.regs.rdi
        );
    }
    // Slow steps in postcopy are mostly faults on missing pages; those after completion
    // are the baseline (the host preempting the vCPU, KVM mapping a page): both printed.
    let faults_us = p.slow_us(Phase::Postcopy, tsc_khz);
    let after_us = p.slow_us(Phase::After, tsc_khz);
    let _ = write!(
        line,
        " passes={} violations={} running-at-us={running_at_us} postcopy={} pauses={pauses} \
         helper-respawns={respawns} helper-cpu-s={:.2} postcopy-ms={:.0} postcopy-requests={} \
         helper-p50-us={} helper-p99-us={} slow-steps-postcopy={} \
         fault-p50-us={:.1} fault-p99-us={:.1} slow-steps-after={} slow-p50-us-after={:.1} \
         slow-p99-us-after={:.1} pages-per-s-postcopy={:.0} \
         pages-per-s-after={:.0} tsc-khz={tsc_khz}",
        p.passes(),
        p.violations,
        u8::from(postcopy),
        children_cpu_s(),
        if postcopy { postcopy_ms } else { 0.0 },
        info["ram"]["postcopy-requests"].as_u64().unwrap_or(0),
        info["x-postcopy-latency"]["p50-us"].as_f64().unwrap_or(0.0),
        info["x-postcopy-latency"]["p99-us"].as_f64().unwrap_or(0.0),
        faults_us.len(),
        quantile(&faults_us, 0.5),
        quantile(&faults_us, 0.99),
        after_us.len(),
        quantile(&after_us, 0.5),
        quantile(&after_us, 0.99),
        quantile(p.rates(Phase::Postcopy), 0.5),
        quantile(p.rates(Phase::After), 0.5),
    );
    println!("{line}");
    if p.violations > 0 {
        return Err(VmmError::Guest(format!("{} failed checks", p.violations)));
    }
    if p.passes() < opts.passes {
        return Err(VmmError::Guest(format!(
            "only {} passes after migration, wanted {}",
            p.passes(),
            opts.passes
        )));
    }
    Ok(())
}

/// vCPU `index`'s section among those `query-device-state` returned.
fn cpu_section(sections: &Value, index: usize) -> Result<&Value, VmmError> {
    sections["sections"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|s| s["idstr"] == cpu_state::IDSTR && s["instance-id"] == index)
        })
        .ok_or_else(|| {
            VmmError::CpuState(format!("no {} section {index} received", cpu_state::IDSTR))
        })
}

fn check_all_described(helper: &mut Helper, states: &[CpuState]) -> Result<(), VmmError> {
    let sections = helper.client.query_device_state()?;
    for (i, state) in states.iter().enumerate() {
        check_described(cpu_section(&sections, i)?, state)?;
    }
    Ok(())
}

/// The helper decoded the section with the VM description the source sent: its view of
/// the registers must be ours (a check of the description, not needed to run the guest).
fn check_described(section: &Value, state: &CpuState) -> Result<(), VmmError> {
    let fields = &section["fields"];
    for (name, ours) in [("rip", state.regs.rip), ("rdi", state.regs.rdi)] {
        if fields[name].as_u64() != Some(ours) {
            return Err(VmmError::CpuState(format!(
                "the helper decoded {name} = {}, the section holds {ours:#x}",
                fields[name]
            )));
        }
    }
    eprintln!(
        "kvm-vmm: vCPU {} state received, {} fields described (rip {:#x}, cr0 {:#x})",
        section["instance-id"],
        fields.as_object().map_or(0, |f| f.len()),
        state.regs.rip,
        fields["cr0"].as_u64().unwrap_or(0),
    );
    Ok(())
}
