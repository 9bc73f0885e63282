//! qemu-migration-helper: move a VMM's guest memory in QEMU's migration stream format.

pub mod analyze;
pub mod client;
pub mod compat;
pub mod control;
pub mod demo;
pub mod destination;
mod device_intake;
pub mod device_state;
pub mod events;
pub mod fault;
pub mod guest_memory;
mod held;
pub mod logging;
pub mod migration;
mod package;
pub mod page_writer;
pub mod postcopy;
pub mod preempt;
pub mod ram;
pub mod return_path;
mod rp_reader;
pub mod source;
pub mod state;
pub mod stream;
pub mod transport;
pub mod vmstate;
