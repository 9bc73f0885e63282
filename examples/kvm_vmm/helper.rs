//! Spawning the helper and handing it the guest (the same on both sides), and spawning a
//! new one with the same hand-over if it dies.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Child;

use qemu_migration_helper::client::{HelperClient, RamBlockSpec};
use serde_json::Value;

use crate::error::VmmError;
use crate::vm::Vm;

/// The RAM block's id on the wire; both sides must use the same ids and sizes.
const RAM_BLOCK: &str = "pc.ram";

/// The helper binary: `--helper`, else `QMH_HELPER_BIN`, else the one cargo built beside
/// this example (`target/<profile>/examples/kvm-vmm` -> `target/<profile>/`).
pub(crate) fn default_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("QMH_HELPER_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("qemu-migration-helper")))
        .unwrap_or_else(|| PathBuf::from("qemu-migration-helper"))
}

/// Everything a helper is given before a migration starts: what a new helper must be
/// given again to take over a paused migration.
pub(crate) struct Handover {
    pub(crate) binary: PathBuf,
    ram: File,
    ram_size: u64,
    /// The source's dirty bitmap.
    pub(crate) dirty_bitmap: Option<File>,
    /// The destination's userfaultfd and the address its RAM is registered at (postcopy).
    pub(crate) userfaultfd: Option<(OwnedFd, u64)>,
    pub(crate) capabilities: Vec<(&'static str, bool)>,
    pub(crate) parameters: serde_json::Map<String, Value>,
}

impl Handover {
    pub(crate) fn new(binary: PathBuf, vm: &Vm) -> Result<Handover, VmmError> {
        Ok(Handover {
            binary,
            ram: vm
                .ram_file
                .try_clone()
                .map_err(|e| VmmError::Io("dup guest RAM fd", e))?,
            ram_size: vm.ram_size,
            dirty_bitmap: None,
            userfaultfd: None,
            capabilities: vec![("events", true)],
            parameters: serde_json::Map::new(),
        })
    }
}

/// A running helper: its control connection and its process.
pub(crate) struct Helper {
    pub(crate) client: HelperClient,
    child: Child,
    /// How many times it was replaced after dying.
    pub(crate) respawns: u32,
}

impl Helper {
    /// Spawns a helper and gives it the guest (`handover`).
    pub(crate) fn spawn(handover: &Handover) -> Result<Helper, VmmError> {
        let (mut client, mut child) =
            HelperClient::spawn(&handover.binary, &["--log-level", "warn"])?;
        println!("kvm-vmm: helper pid {}", child.id());
        match give(&mut client, handover) {
            Ok(()) => Ok(Helper {
                client,
                child,
                respawns: 0,
            }),
            Err(e) => {
                // Not left running (nor unreaped) behind an error.
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Replaces a dead helper with a new one given the same guest; the caller then issues
    /// the recovery command, with which the new helper adopts the paused migration.
    pub(crate) fn respawn(&mut self, handover: &Handover) -> Result<(), VmmError> {
        // Its control connection broke: it is gone or going. Make sure, and reap it.
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => eprintln!("kvm-vmm: helper {} ended: {status}", self.child.id()),
            Err(e) => eprintln!("kvm-vmm: helper {}: {e}", self.child.id()),
        }
        let respawns = self.respawns + 1;
        *self = Helper::spawn(handover)?;
        self.respawns = respawns;
        Ok(())
    }

    /// Ends the helper after a migration (`quit`, then reap it).
    pub(crate) fn quit(mut self) -> Result<(), VmmError> {
        let quit = self.client.quit();
        let waited = self.child.wait();
        quit?;
        waited.map_err(|e| VmmError::Io("waiting for the helper", e))?;
        Ok(())
    }
}

fn give(helper: &mut HelperClient, h: &Handover) -> Result<(), VmmError> {
    helper.getfd("ram", &h.ram)?;
    if let Some(bitmap) = &h.dirty_bitmap {
        helper.getfd("dirty", bitmap)?;
    }
    if let Some((uffd, _)) = &h.userfaultfd {
        helper.getfd("uffd", uffd.as_fd())?;
        helper.userfaultfd_set("uffd")?;
    }
    helper.ram_block_add(&RamBlockSpec {
        id: RAM_BLOCK.into(),
        fdname: "ram".into(),
        offset: 0,
        size: h.ram_size,
        page_size: None,
        host_addr: h.userfaultfd.as_ref().map(|&(_, addr)| addr),
        dirty_bitmap: h.dirty_bitmap.as_ref().map(|_| "dirty".into()),
    })?;
    helper.set_capabilities(&h.capabilities)?;
    if !h.parameters.is_empty() {
        helper.set_parameters(Value::Object(h.parameters.clone()))?;
    }
    Ok(())
}
