//! Interop tests against real QEMU (see tests/install-deps.sh). What they share with the
//! benchmarks (helpers, QEMUs, the QMP client, guest memory) is the `support` crate,
//! tests/support.

mod analyze;
mod autoconverge;
mod bad_input;
mod bounds;
mod control;
mod files;
mod helper_helper;
mod idle;
mod kvm_vmm;
mod lifecycle;
mod logs;
mod manpage;
mod mapped_ram_qmp;
mod mapped_ram_restore;
mod mapped_ram_save;
mod multifd;
mod multifd_wire;
mod ondemand;
mod postcopy;
mod qemu_helper;
mod qemu_qemu;
mod qmp_client;
mod recovery;
mod sandbox;
mod shrink;
mod streams;
mod tls;
mod tls_capture;
mod tls_recovery;
mod transport;
mod util;
