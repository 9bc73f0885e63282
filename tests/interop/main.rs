//! Interop tests against real QEMU (see tests/install-deps.sh).

mod qemu;
mod qemu_qemu;
mod util;
