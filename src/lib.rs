//! qemu-migration-helper: move a VMM's guest memory in QEMU's migration stream format.

pub mod compat;
pub mod events;
pub mod guest_memory;
pub mod ram;
pub mod state;
pub mod stream;
pub mod vmstate;
