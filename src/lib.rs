//! qemu-migration-helper: move a VMM's guest memory in QEMU's migration stream format.
//!
//! The layout follows the protocol (see ARCHITECTURE.md): [`wire`] holds the pure codecs of
//! the stream, [`vmstate`] the device descriptions, `memory` the parent's guest RAM, `engine`
//! the source and destination, [`transport`] the channels, [`control`] the control socket and
//! [`client`] the VMM's side of it.

pub mod analyze;
pub mod client;
pub mod compat;
pub mod control;
pub mod demo;
pub mod engine;
/// Entry points of the fuzz targets (tests/fuzz); built for unit tests too, so they are
/// checked and linted with the rest.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod memory;
pub mod sandbox;
pub mod transport;
pub mod vmstate;
pub mod wire;
