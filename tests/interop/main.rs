//! Interop tests against real QEMU (see tests/install-deps.sh).

mod helper;
mod helper_helper;
mod qemu;
mod qemu_helper;
mod qemu_qemu;
mod util;
