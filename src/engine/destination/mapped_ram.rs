//! mapped-ram on the destination: each RAM block's header and bitmap, read from the file
//! while the RAM block list is parsed, and its pages read from their fixed places (all at
//! once for a full restore, or on demand: see `ondemand`).

use crate::wire::mapped_ram::{Header, Regions};

/// A block's place in a mapped-ram file, read from its header and bitmap and checked.
#[derive(Debug, Clone)]
pub(crate) struct MappedBlock {
    /// Index into the destination's blocks.
    pub(crate) index: usize,
    pub(crate) header: Header,
    pub(crate) regions: Regions,
    /// One bit per page of the block, set where the file holds the page's data; pages
    /// whose bit is clear are zero (their place in the file is a hole).
    pub(crate) bitmap: Vec<u64>,
}

/// What the loader does with a mapped-ram block once its header and bitmap are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum MappedMode {
    /// Read every page now, as QEMU does (and make sure the others are zero).
    #[default]
    Full,
    /// Only keep the [`MappedBlock`]s: the pages are served later, on demand.
    Lazy,
}
