//! Interop tests against real QEMU (see tests/install-deps.sh).

mod analyze;
mod bad_input;
mod files;
mod helper;
mod helper_helper;
mod logs;
mod manpage;
pub mod postcopy;
mod qemu;
mod qemu_helper;
mod qemu_qemu;
mod recovery;
mod sandbox;
mod util;
