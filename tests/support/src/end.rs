//! One end of a migration, a real QEMU or a helper: both are driven through the same QMP
//! client, so a test or benchmark can run every pairing with one code path.

use std::time::Duration;

use qemu_migration_helper::client::HelperClient;
use serde_json::Value;

use crate::helper::HelperVm;
use crate::map::RamMap;
use crate::qemu::QemuVm;

pub enum End {
    Qemu(QemuVm),
    Helper(HelperVm),
}

impl End {
    /// The QMP client of either end: QEMU's monitor or the helper's control socket.
    pub fn client(&mut self) -> &mut HelperClient {
        match self {
            End::Qemu(q) => q.qmp(),
            End::Helper(h) => &mut h.client,
        }
    }

    pub fn pid(&self) -> u32 {
        match self {
            End::Qemu(q) => q.pid(),
            End::Helper(h) => h.pid(),
        }
    }

    /// Waits until the migration's status is one of `wanted` (`HelperVm::wait`,
    /// `QemuVm::wait_migration`); panics otherwise.
    pub fn wait(&mut self, wanted: &[&str], timeout: Duration) -> Value {
        match self {
            End::Qemu(q) => q
                .wait_migration(wanted, timeout)
                .unwrap_or_else(|e| panic!("QEMU did not reach {wanted:?}: {e}")),
            End::Helper(h) => h.wait(wanted, timeout),
        }
    }

    /// A mapping of the guest RAM: QEMU's block `ram`, or the helper's first block.
    pub fn ram(&self) -> RamMap {
        match self {
            End::Qemu(q) => q.ram_mmap(),
            End::Helper(h) => h.blocks[0].mem.map(),
        }
    }
}
