//! Interop tests against real QEMU (see tests/install-deps.sh).

mod analyze;
mod bad_input;
mod bounds;
mod control;
mod files;
mod helper;
mod helper_helper;
mod idle;
mod lifecycle;
mod logs;
mod manpage;
pub mod postcopy;
mod qemu;
mod qemu_helper;
mod qemu_qemu;
mod qmp_client;
mod recovery;
mod sandbox;
mod shrink;
mod streams;
mod transport;
mod util;
