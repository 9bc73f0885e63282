//! Spawning the helper and handing it the guest's RAM (the same on both sides).

use std::fs::File;
use std::path::PathBuf;
use std::process::Child;

use qemu_migration_helper::client::{HelperClient, RamBlockSpec};

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

/// Spawns a helper and registers the guest RAM with it, with the source's dirty bitmap.
pub(crate) fn spawn(
    binary: &std::path::Path,
    vm: &Vm,
    dirty_bitmap: Option<&File>,
) -> Result<(HelperClient, Child), VmmError> {
    let (mut helper, mut child) = HelperClient::spawn(binary, &["--log-level", "warn"])?;
    match add_ram(&mut helper, vm, dirty_bitmap) {
        Ok(()) => Ok((helper, child)),
        Err(e) => {
            // Not left running (nor unreaped) behind an error.
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn add_ram(
    helper: &mut HelperClient,
    vm: &Vm,
    dirty_bitmap: Option<&File>,
) -> Result<(), VmmError> {
    helper.getfd("ram", &vm.ram_file)?;
    if let Some(bitmap) = dirty_bitmap {
        helper.getfd("dirty", bitmap)?;
    }
    helper.ram_block_add(&RamBlockSpec {
        id: RAM_BLOCK.into(),
        fdname: "ram".into(),
        offset: 0,
        size: vm.ram_size,
        page_size: None,
        host_addr: None,
        dirty_bitmap: dirty_bitmap.map(|_| "dirty".into()),
    })?;
    Ok(())
}

/// Ends the helper after a migration (`quit`, then reap it).
pub(crate) fn quit(mut helper: HelperClient, mut child: Child) -> Result<(), VmmError> {
    let quit = helper.quit();
    let waited = child.wait();
    quit?;
    waited.map_err(|e| VmmError::Io("waiting for the helper", e))?;
    Ok(())
}
