//! The destination: receives the guest's RAM and vCPU state through its helper, then runs
//! the guest and checks that it carries on where the source stopped it.

use std::io::Write;
use std::sync::Arc;

use serde_json::Value;

use crate::cpu_state::{self, CpuState};
use crate::error::VmmError;
use crate::vcpu::{self, VcpuControl};
use crate::vm::Vm;
use crate::{helper, Options};

pub(crate) fn run(opts: &Options, uri: &str) -> Result<(), VmmError> {
    // No program loaded and no dirty log: RAM and registers arrive with the migration.
    let vm = Vm::new(opts.ram_size, false)?;
    let vcpu = vm.create_vcpu()?;
    let (mut helper, child) = helper::spawn(&opts.helper, &vm, None)?;
    helper.migrate_incoming(uri)?;
    // Whoever starts the source waits for this line: the helper listens now.
    println!("kvm-vmm: listening on {uri}");
    std::io::stdout()
        .flush()
        .map_err(|e| VmmError::Io("stdout", e))?;

    helper.wait_for_status(&["completed"], opts.timeout)?;
    let sections = helper.query_device_state()?;
    let section = cpu_section(&sections)?;
    let state = CpuState::from_section(section)?;
    check_described(section, &state)?;
    helper::quit(helper, child)?;

    state.restore(&vcpu)?;
    let ctl = Arc::new(VcpuControl::default());
    let vcpu_thread = vcpu::spawn(vcpu, Arc::clone(&ctl), opts.pace)?;
    let p = ctl.wait(opts.timeout, |p| {
        p.passes_seen >= opts.passes || p.violations > 0
    });
    vcpu_thread.stop()?;
    println!(
        "result: role=destination resumed-rdi={} first-pass={} last-pass={} passes={} violations={}",
        state.regs.rdi,
        p.first_pass.unwrap_or(0),
        p.last_pass.unwrap_or(0),
        p.passes_seen,
        p.violations,
    );
    if p.violations > 0 {
        return Err(VmmError::Guest(format!("{} failed checks", p.violations)));
    }
    if p.passes_seen < opts.passes {
        return Err(VmmError::Guest(format!(
            "only {} passes after migration, wanted {}",
            p.passes_seen, opts.passes
        )));
    }
    Ok(())
}

/// Our vCPU's section among those `query-device-state` returned.
fn cpu_section(sections: &Value) -> Result<&Value, VmmError> {
    sections["sections"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|s| s["idstr"] == cpu_state::IDSTR && s["instance-id"] == 0)
        })
        .ok_or_else(|| VmmError::CpuState(format!("no {} section received", cpu_state::IDSTR)))
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
        "kvm-vmm: vCPU state received, {} fields described (rip {:#x}, cr0 {:#x})",
        fields.as_object().map_or(0, |f| f.len()),
        state.regs.rip,
        fields["cr0"].as_u64().unwrap_or(0),
    );
    Ok(())
}
