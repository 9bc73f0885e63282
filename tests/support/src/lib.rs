//! Test support shared by the interop tests (`tests/interop`) and the benchmarks
//! (`tests/bench`): the process under test (`helper`), real QEMU (`qemu`), both driven
//! through the library's own QMP client (`qemu_migration_helper::client::HelperClient`;
//! `end` for code that runs every pairing, `migrate` to connect and start them),
//! guest memory as the parent VMM holds it (`map`, `uffd`), TLS credentials (`tls`), and small helpers (`util`,
//! `stats`).
//!
//! Items are `pub` for the test and bench crates; not every one uses every item.

pub mod end;
pub mod helper;
pub mod kvm_vmm;
pub mod map;
pub mod migrate;
pub mod qemu;
pub mod stats;
pub mod tls;
pub mod uffd;
pub mod util;
