//! qemu-migration-helper: move a VMM's guest memory in QEMU's migration stream format.

pub mod analyze;
pub mod client;
pub mod compat;
pub mod control;
pub mod demo;
pub mod destination;
mod device_intake;
pub mod device_state;
mod dirty_bitmap;
pub mod events;
pub mod fault;
/// Entry points of the fuzz targets (tests/fuzz); built for unit tests too, so they are
/// checked and linted with the rest.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod guest_memory;
mod held;
pub mod logging;
pub mod memory_guard;
pub mod migration;
mod package;
pub mod page_writer;
pub mod postcopy;
pub mod preempt;
pub mod ram;
pub mod return_path;
mod rp_reader;
pub mod sandbox;
pub mod source;
pub mod state;
pub mod stream;
pub mod transport;
pub mod vmstate;
