//! The VM: guest RAM in a memfd, mapped with vm-memory and given to KVM as one memslot,
//! and the boot vCPU set up in 32-bit protected mode.

use std::fs::File;
use std::sync::Arc;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::error::{kvm, VmmError};
use crate::guest;

pub(crate) const PAGE_SIZE: u64 = 4096;
/// The one memslot: all of guest RAM, from guest physical address 0.
pub(crate) const RAM_SLOT: u32 = 0;

pub(crate) struct Vm {
    pub(crate) fd: Arc<VmFd>,
    /// Kept open for the helper (`getfd`): it maps the same pages, so nothing is copied.
    pub(crate) ram_file: File,
    pub(crate) ram_size: u64,
    /// The VMM's own mapping; KVM's memslot points at it.
    memory: GuestMemoryMmap,
    /// The /dev/kvm handle the VM was created from.
    _kvm: Kvm,
}

impl Vm {
    /// Creates the VM with `ram_size` bytes of RAM. `log_dirty`: KVM records the pages the
    /// guest writes (KVM_MEM_LOG_DIRTY_PAGES), which a migration source harvests.
    pub(crate) fn new(ram_size: u64, log_dirty: bool) -> Result<Vm, VmmError> {
        let kvm_sys = Kvm::new().map_err(kvm("opening /dev/kvm"))?;
        let fd = kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        // Intel needs three pages for the real-mode TSS somewhere; out of the guest's way.
        fd.set_tss_address(0xfffb_d000)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;

        // A memfd, so that the helper can map the same RAM; sealable so that the helper can
        // seal it against shrinking (a truncated memfd would SIGBUS it).
        let memfd = memfd_create(
            c"kvm-vmm-ram",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(|e| VmmError::Io("memfd_create", e.into()))?;
        let ram_file = File::from(memfd);
        ram_file
            .set_len(ram_size)
            .map_err(|e| VmmError::Io("sizing guest RAM", e))?;
        let map_file = ram_file
            .try_clone()
            .map_err(|e| VmmError::Io("dup guest RAM fd", e))?;
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            ram_size as usize,
            Some(FileOffset::new(map_file, 0)),
        )])
        .map_err(|e| VmmError::Memory(e.to_string()))?;
        let host = memory
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        let slot = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: ram_size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host+ram_size` is the mapping `memory` owns, which lives as long as
        // `self` and so as long as the VM (declared before `memory`, dropped first).
        unsafe { fd.set_user_memory_region(slot) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(Vm {
            fd: Arc::new(fd),
            ram_file,
            ram_size,
            memory,
            _kvm: kvm_sys,
        })
    }

    /// Pages of the region the guest program rewrites (from REGION_ADDR to the end).
    pub(crate) fn region_pages(&self) -> u64 {
        (self.ram_size - guest::REGION_ADDR) / PAGE_SIZE
    }

    /// Copies the guest program into RAM (a fresh VM only: a destination gets it migrated).
    pub(crate) fn load_program(&self) -> Result<(), VmmError> {
        self.memory
            .write_slice(&guest::PROGRAM, GuestAddress(guest::CODE_ADDR))
            .map_err(|e| VmmError::Memory(e.to_string()))
    }

    pub(crate) fn create_vcpu(&self) -> Result<VcpuFd, VmmError> {
        self.fd.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))
    }

    /// Puts a fresh vCPU at the program's entry in flat 32-bit protected mode (no GDT in
    /// memory: KVM takes the segment caches as given, and the guest never reloads them).
    pub(crate) fn boot_vcpu(&self, vcpu: &VcpuFd) -> Result<(), VmmError> {
        let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: 0,
            db: 1, // 32-bit operands and addresses
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3, // read/write, accessed
            ..code
        };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.cr0 |= 1; // PE: protected mode, paging off
        vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

        let mut regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        regs.rip = guest::CODE_ADDR;
        regs.rflags = 0x2; // bit 1 is reserved and must be set
        regs.rbx = guest::REGION_ADDR;
        regs.rbp = self.region_pages();
        regs.rdi = 1; // the first pass
        vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
    }
}
