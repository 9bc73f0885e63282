//! qemu-migration-helper: move a VMM's guest memory in QEMU's migration stream format.

pub mod analyze;
pub mod client;
pub mod compat;
pub mod control;
pub mod demo;
pub mod destination;
pub mod device_state;
pub mod events;
pub mod fault;
/// Entry points of the fuzz targets (tests/fuzz); built for unit tests too, so they are
/// checked and linted with the rest.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod guest_memory;
pub mod logging;
pub mod migration;
pub mod page_writer;
pub mod postcopy;
pub mod preempt;
pub mod ram;
pub mod return_path;
pub mod source;
pub mod state;
pub mod stream;
pub mod transport;
pub mod vmstate;
