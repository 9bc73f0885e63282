//! Interop tests against real QEMU (see tests/install-deps.sh).

mod bad_input;
mod files;
mod helper;
mod helper_helper;
mod postcopy;
mod qemu;
mod qemu_helper;
mod qemu_qemu;
mod util;
