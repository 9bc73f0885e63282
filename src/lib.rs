//! qemu-migration-helper: move a VMM's guest memory in QEMU's migration stream format.
//!
//! The layout follows the protocol (see ARCHITECTURE.md): [`wire`] holds the pure codecs of
//! the stream, [`vmstate`] the device descriptions, `memory` the parent's guest RAM, `engine`
//! the source and destination, `transport` the channels, [`control`] the control socket and
//! [`client`] the VMM's side of it.
//!
//! # Features
//! - `helper` (default): the helper process itself (engines, transports, the control
//!   server, sandbox, logging and the `qemu-migration-helper` binary). A VMM that only
//!   drives a helper turns default features off and gets [`client`], the protocol's types
//!   ([`control::protocol`]), the codecs ([`wire`], [`vmstate`], [`compat`]) and
//!   [`analyze`], without bindgen/libclang (userfaultfd), clap, slog, seccompiler or
//!   landlock.
//! - `fuzzing`: entry points for the fuzz targets in tests/fuzz (implies `helper`).

// Every unsafe block says why it is sound (guest memory is shared with a running guest).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod analyze;
/// The command line; `pub` only for src/main.rs.
#[cfg(feature = "helper")]
#[doc(hidden)]
pub mod cli;
pub mod client;
pub mod compat;
pub mod control;
#[cfg(feature = "helper")]
#[doc(hidden)]
pub mod demo;
#[cfg(feature = "helper")]
pub(crate) mod engine;
/// Entry points of the fuzz targets (tests/fuzz); built for unit tests too, so they are
/// checked and linted with the rest.
#[cfg(all(feature = "helper", any(test, feature = "fuzzing")))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "helper")]
pub(crate) mod logging;
#[cfg(feature = "helper")]
pub(crate) mod memory;
#[cfg(feature = "helper")]
pub(crate) mod sandbox;
#[cfg(feature = "helper")]
pub(crate) mod transport;
pub mod vmstate;
pub mod wire;
