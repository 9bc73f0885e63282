//! qemu-migration-helper: move a VMM's guest memory in QEMU's migration stream format.

pub mod compat;
pub mod vmstate;
