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

    /// Where the VMM mapped guest RAM: the address KVM's memslot points at, which a
    /// postcopy destination registers with its userfaultfd and gives the helper.
    pub(crate) fn host_addr(&self) -> Result<u64, VmmError> {
        let host = self
            .memory
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        Ok(host as u64)
    }

    /// The slice of the region vCPU `index` of `count` rewrites: first page's address and
    /// number of pages (the last vCPU takes what the division leaves).
    fn slice(&self, index: u64, count: u64) -> (u64, u64) {
        let pages = (self.ram_size - guest::REGION_ADDR) / PAGE_SIZE;
        let each = pages / count;
        let len = if index + 1 == count {
            pages - each * index
        } else {
            each
        };
        (guest::REGION_ADDR + index * each * PAGE_SIZE, len)
    }

    /// Copies the guest program into RAM (a fresh VM only: a destination gets it migrated).
    /// `slow_cycles`: the page step the guest reports as slow (see guest.rs).
    pub(crate) fn load_program(&self, slow_cycles: u32) -> Result<(), VmmError> {
        self.memory
            .write_slice(&guest::program(slow_cycles), GuestAddress(guest::CODE_ADDR))
            .map_err(|e| VmmError::Memory(e.to_string()))
    }

    pub(crate) fn create_vcpus(&self, count: u8) -> Result<Vec<VcpuFd>, VmmError> {
        (0..count)
            .map(|i| {
                self.fd
                    .create_vcpu(u64::from(i))
                    .map_err(kvm("KVM_CREATE_VCPU"))
            })
            .collect()
    }

    /// Puts fresh vCPU `index` of `count` at the program's entry in flat 32-bit protected
    /// mode (no GDT in memory: KVM takes the segment caches as given, and the guest never
    /// reloads them), on its own slice of the region.
    pub(crate) fn boot_vcpu(&self, vcpu: &VcpuFd, index: u8, count: u8) -> Result<(), VmmError> {
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
        (regs.rbx, regs.rbp) = self.slice(u64::from(index), u64::from(count));
        regs.rdi = 1; // the first pass
        vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
    }
}
