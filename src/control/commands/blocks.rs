//! RAM blocks: `ram-block-add`, `ram-block-del`, `query-ram-blocks`. The protocol's
//! [`RamBlockSpec`] (fd names) becomes the memory side's spec (fds) here.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde_json::{json, Value};

use super::{lock, Args, CmdResult, Helper};
use crate::control::protocol::RamBlockSpec;
use crate::control::qmp::QmpError;
use crate::memory::block::{self, map_present_in_background, RamBlock};

impl Helper {
    /// `ram-block-add`. Checks in the order the helper always has (state, id, fds, then the
    /// numbers), so a request with several faults gets the same error as before.
    pub(super) fn ram_block_add(&self, a: &Args<'_>) -> CmdResult {
        a.only(RamBlockSpec::ARGS)?;
        if self.busy() {
            return Err(QmpError::generic(
                "cannot add a RAM block while a migration is running",
            ));
        }
        let id = a.str("id")?.to_string();
        if lock(&self.blocks).iter().any(|b| b.id == id) {
            return Err(QmpError::generic(format!(
                "RAM block '{id}' already exists"
            )));
        }
        let fdname = a.str("fdname")?.to_string();
        let fd = self.dup_fd(&fdname)?;
        let dirty_bitmap = a.opt_str("dirty-bitmap")?.map(str::to_owned);
        let bitmap_fd = match &dirty_bitmap {
            Some(n) => Some(self.dup_fd(n)?),
            None => None,
        };
        let spec = RamBlockSpec {
            id,
            fdname,
            offset: a.u64("offset")?,
            size: a.u64("size")?,
            page_size: a.opt_u64("page-size")?,
            host_addr: a.opt_u64("host-addr")?,
            dirty_bitmap,
        };
        let block = RamBlock::new(memory_spec(spec, bitmap_fd), fd)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        slog::info!(self.log, "RAM block added"; "id" => &block.id, "size" => block.size, "page_size" => block.page_size);
        let block = Arc::new(block);
        map_present_in_background(&block, &self.log);
        lock(&self.blocks).push(block);
        Ok(json!({}))
    }

    /// `ram-block-del`.
    pub(super) fn ram_block_del(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["id"])?;
        let id = a.str("id")?;
        if self.busy() {
            return Err(QmpError::generic(
                "cannot remove a RAM block while a migration is running",
            ));
        }
        let mut blocks = lock(&self.blocks);
        let before = blocks.len();
        blocks.retain(|b| b.id != id);
        if blocks.len() == before {
            return Err(QmpError::generic(format!("no RAM block '{id}'")));
        }
        Ok(json!({}))
    }

    /// `query-ram-blocks`.
    pub(super) fn query_ram_blocks(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[])?;
        Ok(Value::Array(
            lock(&self.blocks)
                .iter()
                .map(|b| {
                    let mut v = json!({
                        "id": b.id, "fdname": b.fdname, "offset": b.offset,
                        "size": b.size, "page-size": b.page_size,
                        "mapped-ahead": b.mapped_ahead(),
                        "shrink-sealed": b.shrink_sealed,
                    });
                    if let Some(h) = b.host_addr {
                        v["host-addr"] = json!(h);
                    }
                    if let Some(d) = &b.dirty_bitmap_name {
                        v["dirty-bitmap"] = json!(d);
                    }
                    v
                })
                .collect(),
        ))
    }

    pub(super) fn migration_blocks(&self) -> Result<Vec<Arc<RamBlock>>, QmpError> {
        let blocks = lock(&self.blocks).clone();
        if blocks.is_empty() {
            return Err(QmpError::generic(
                "no RAM blocks registered (use ram-block-add)",
            ));
        }
        if let Some(b) = blocks.iter().find(|b| b.memory_lost()) {
            return Err(QmpError::generic(format!(
                "RAM block '{}' lost its memory: its fd shrank; remove the block and add it again",
                b.id
            )));
        }
        Ok(blocks)
    }
}

/// The protocol's spec names fds; the memory side's holds the dirty bitmap's fd itself.
fn memory_spec(spec: RamBlockSpec, bitmap_fd: Option<OwnedFd>) -> block::RamBlockSpec {
    block::RamBlockSpec {
        id: spec.id,
        fdname: spec.fdname,
        offset: spec.offset,
        size: spec.size,
        page_size: spec.page_size,
        host_addr: spec.host_addr,
        dirty_bitmap: spec.dirty_bitmap.zip(bitmap_fd),
    }
}
