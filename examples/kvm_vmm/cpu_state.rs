//! The vCPU's state as a device section: registers, special registers and FPU, each a
//! big-endian field, with a VM description naming them so that the destination helper's
//! `query-device-state` (and `analyze` on a saved stream) shows every field decoded.
//!
//! One list of fields ([`visit`]) drives both directions, so the encoding, the decoding
//! and the description cannot drift apart. MSRs: the TSC and those a 32/64-bit OS sets
//! for system calls (this guest touches none; a VMM lists what its guests use).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use serde_json::{json, Value};

use crate::error::{kvm, VmmError};

/// The section's idstr; the instance id is the vCPU index.
pub(crate) const IDSTR: &str = "kvm-vmm/cpu";
const VERSION: u32 = 1;

/// The MSRs carried, by name as in the VM description.
const MSRS: [(&str, u32); 10] = [
    ("tsc", 0x10),
    ("sysenter_cs", 0x174),
    ("sysenter_esp", 0x175),
    ("sysenter_eip", 0x176),
    ("pat", 0x277),
    ("star", 0xc000_0081),
    ("lstar", 0xc000_0082),
    ("cstar", 0xc000_0083),
    ("syscall_mask", 0xc000_0084),
    ("kernel_gs_base", 0xc000_0102),
];

#[derive(Default, Clone, Copy)]
pub(crate) struct CpuState {
    pub(crate) regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    /// Values of [`MSRS`], in order.
    msrs: [u64; MSRS.len()],
}

impl CpuState {
    /// Reads the state of a stopped vCPU (its pending I/O completed, see vcpu.rs).
    pub(crate) fn save(vcpu: &VcpuFd) -> Result<CpuState, VmmError> {
        Ok(CpuState {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
            msrs: get_msrs(vcpu)?,
        })
    }

    /// Loads the state into a vCPU that has not run yet. Special registers first: they
    /// set the mode the general registers are interpreted in.
    pub(crate) fn restore(&self, vcpu: &VcpuFd) -> Result<(), VmmError> {
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(kvm("KVM_SET_FPU"))?;
        set_msrs(vcpu, &self.msrs)?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))
    }

    /// The element of `device-state-set`: body plus VM description.
    pub(crate) fn to_section(mut self, vcpu_index: u32) -> Value {
        let mut w = Writer::default();
        visit(&mut self, &mut w);
        json!({
            "idstr": IDSTR,
            "instance-id": vcpu_index,
            "version-id": VERSION,
            "data": B64.encode(&w.body),
            "description": {
                "name": IDSTR,
                "instance_id": vcpu_index,
                "vmsd_name": IDSTR,
                "version": VERSION,
                "fields": w.fields,
            },
        })
    }

    /// Decodes the element `query-device-state` returned for this vCPU.
    pub(crate) fn from_section(section: &Value) -> Result<CpuState, VmmError> {
        let version = section["version-id"].as_u64();
        if version != Some(u64::from(VERSION)) {
            return Err(VmmError::CpuState(format!("unknown version {version:?}")));
        }
        let data = section["data"]
            .as_str()
            .ok_or_else(|| VmmError::CpuState("section without data".into()))?;
        let body = B64
            .decode(data)
            .map_err(|e| VmmError::CpuState(format!("data is not base64: {e}")))?;
        let mut state = CpuState::default();
        let mut r = Reader {
            body: &body,
            pos: 0,
            short: false,
        };
        visit(&mut state, &mut r);
        if r.short || r.pos != body.len() {
            return Err(VmmError::CpuState(format!(
                "{} bytes of state, expected {}",
                body.len(),
                r.pos
            )));
        }
        Ok(state)
    }
}

/// One field: its name, its VM-description type and its value as big-endian bytes (QEMU's
/// encoding of every integer field).
trait Fields {
    fn field(&mut self, name: String, ty: &'static str, bytes: &mut [u8]);
}

/// Appends the fields to a section body and lists them for the VM description.
#[derive(Default)]
struct Writer {
    body: Vec<u8>,
    fields: Vec<Value>,
}

impl Fields for Writer {
    fn field(&mut self, name: String, ty: &'static str, bytes: &mut [u8]) {
        self.body.extend_from_slice(bytes);
        self.fields
            .push(json!({"name": name, "type": ty, "size": bytes.len()}));
    }
}

/// Takes the fields back out of a section body; `short` if the body ran out.
struct Reader<'a> {
    body: &'a [u8],
    pos: usize,
    short: bool,
}

impl Fields for Reader<'_> {
    fn field(&mut self, _name: String, _ty: &'static str, bytes: &mut [u8]) {
        match self.body.get(self.pos..self.pos + bytes.len()) {
            Some(src) => bytes.copy_from_slice(src),
            None => self.short = true,
        }
        self.pos += bytes.len();
    }
}

macro_rules! int_field {
    ($fn:ident, $t:ty, $ty:literal) => {
        fn $fn(f: &mut impl Fields, name: impl Into<String>, v: &mut $t) {
            let mut b = v.to_be_bytes();
            f.field(name.into(), $ty, &mut b);
            *v = <$t>::from_be_bytes(b);
        }
    };
}
int_field!(u64f, u64, "uint64");
int_field!(u32f, u32, "uint32");
int_field!(u16f, u16, "uint16");
int_field!(u8f, u8, "uint8");

/// Every field, in wire order (tables kept one row per line: they are the format).
#[rustfmt::skip]
fn visit(s: &mut CpuState, f: &mut impl Fields) {
    let r = &mut s.regs;
    for (name, v) in [
        ("rax", &mut r.rax), ("rbx", &mut r.rbx), ("rcx", &mut r.rcx), ("rdx", &mut r.rdx),
        ("rsi", &mut r.rsi), ("rdi", &mut r.rdi), ("rsp", &mut r.rsp), ("rbp", &mut r.rbp),
        ("r8", &mut r.r8), ("r9", &mut r.r9), ("r10", &mut r.r10), ("r11", &mut r.r11),
        ("r12", &mut r.r12), ("r13", &mut r.r13), ("r14", &mut r.r14), ("r15", &mut r.r15),
        ("rip", &mut r.rip), ("rflags", &mut r.rflags),
    ] {
        u64f(f, name, v);
    }
    let sr = &mut s.sregs;
    for (name, seg) in [
        ("cs", &mut sr.cs), ("ds", &mut sr.ds), ("es", &mut sr.es), ("fs", &mut sr.fs),
        ("gs", &mut sr.gs), ("ss", &mut sr.ss), ("tr", &mut sr.tr), ("ldt", &mut sr.ldt),
    ] {
        segment(f, name, seg);
    }
    for (name, t) in [("gdt", &mut sr.gdt), ("idt", &mut sr.idt)] {
        u64f(f, format!("{name}.base"), &mut t.base);
        u16f(f, format!("{name}.limit"), &mut t.limit);
    }
    for (name, v) in [
        ("cr0", &mut sr.cr0), ("cr2", &mut sr.cr2), ("cr3", &mut sr.cr3), ("cr4", &mut sr.cr4),
        ("cr8", &mut sr.cr8), ("efer", &mut sr.efer), ("apic_base", &mut sr.apic_base),
    ] {
        u64f(f, name, v);
    }
    for (i, v) in sr.interrupt_bitmap.iter_mut().enumerate() {
        u64f(f, format!("interrupt_bitmap{i}"), v);
    }
    let fpu = &mut s.fpu;
    for (i, st) in fpu.fpr.iter_mut().enumerate() {
        f.field(format!("st{i}"), "buffer", st);
    }
    u16f(f, "fcw", &mut fpu.fcw);
    u16f(f, "fsw", &mut fpu.fsw);
    u8f(f, "ftwx", &mut fpu.ftwx);
    u16f(f, "last_opcode", &mut fpu.last_opcode);
    u64f(f, "last_ip", &mut fpu.last_ip);
    u64f(f, "last_dp", &mut fpu.last_dp);
    for (i, x) in fpu.xmm.iter_mut().enumerate() {
        f.field(format!("xmm{i}"), "buffer", x);
    }
    u32f(f, "mxcsr", &mut fpu.mxcsr);
    for ((name, _), v) in MSRS.iter().zip(s.msrs.iter_mut()) {
        u64f(f, format!("msr.{name}"), v);
    }
}

#[rustfmt::skip]
fn segment(f: &mut impl Fields, name: &str, seg: &mut kvm_segment) {
    u64f(f, format!("{name}.base"), &mut seg.base);
    u32f(f, format!("{name}.limit"), &mut seg.limit);
    u16f(f, format!("{name}.selector"), &mut seg.selector);
    for (part, v) in [
        ("type", &mut seg.type_), ("present", &mut seg.present), ("dpl", &mut seg.dpl),
        ("db", &mut seg.db), ("s", &mut seg.s), ("l", &mut seg.l), ("g", &mut seg.g),
        ("avl", &mut seg.avl), ("unusable", &mut seg.unusable),
    ] {
        u8f(f, format!("{name}.{part}"), v);
    }
}

fn msr_list(values: &[u64; MSRS.len()]) -> Result<Msrs, VmmError> {
    let entries: Vec<kvm_msr_entry> = MSRS
        .iter()
        .zip(values)
        .map(|(&(_, index), &data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|e| VmmError::CpuState(format!("MSR list: {e:?}")))
}

fn get_msrs(vcpu: &VcpuFd) -> Result<[u64; MSRS.len()], VmmError> {
    let mut list = msr_list(&[0; MSRS.len()])?;
    // KVM reads MSRs in order and stops at the first it does not know.
    let read = vcpu.get_msrs(&mut list).map_err(kvm("KVM_GET_MSRS"))?;
    if read != MSRS.len() {
        return Err(VmmError::CpuState(format!(
            "KVM read no {}",
            msr_name(read)
        )));
    }
    let mut values = [0; MSRS.len()];
    for (v, e) in values.iter_mut().zip(list.as_slice()) {
        *v = e.data;
    }
    Ok(values)
}

fn set_msrs(vcpu: &VcpuFd, values: &[u64; MSRS.len()]) -> Result<(), VmmError> {
    let written = vcpu
        .set_msrs(&msr_list(values)?)
        .map_err(kvm("KVM_SET_MSRS"))?;
    if written != MSRS.len() {
        return Err(VmmError::CpuState(format!(
            "KVM refused {}",
            MSRS[written].0
        )));
    }
    Ok(())
}

fn msr_name(i: usize) -> &'static str {
    MSRS.get(i).map_or("MSR", |m| m.0)
}
