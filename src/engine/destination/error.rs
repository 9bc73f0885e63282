//! The destination's errors. The variant decides what a failure does: in postcopy a
//! broken link ([`LoadError::is_link`]) pauses for a recovery, anything else fails.

use std::sync::Arc;

use crate::engine::destination::fault::FaultError;
use crate::engine::destination::mapped_ram::MappedError;
use crate::engine::destination::multifd::MultifdError;
use crate::engine::destination::package::PackageError;
use crate::engine::destination::place::PlaceError;
use crate::engine::destination::preempt::PreemptError;
use crate::engine::destination::reader::{ReadError, Reader};
use crate::engine::destination::return_path::RpError;
use crate::memory::page_writer::PageWriteError;
use crate::transport::TransportError;
use crate::vmstate;
use crate::wire::device_intake::IntakeError;
use crate::wire::ram::Record;
use crate::wire::stream::WireError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    /// The link broke while reading: an I/O error or EOF.
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("at stream offset {offset}: {source}")]
    Wire {
        offset: u64,
        #[source]
        source: WireError,
    },
    #[error("at stream offset {offset}: {source}")]
    Invalid {
        offset: u64,
        #[source]
        source: Violation,
    },
    #[error("at stream offset {offset}: {source}")]
    Page {
        offset: u64,
        #[source]
        source: PlaceError,
    },
    #[error("at stream offset {offset}: {source}")]
    PageWrite {
        offset: u64,
        #[source]
        source: PageWriteError,
    },
    #[error("at stream offset {offset}: {source}")]
    Postcopy {
        offset: u64,
        #[source]
        source: FaultError,
    },
    #[error("at stream offset {offset}: {source}")]
    Preempt {
        offset: u64,
        #[source]
        source: PreemptError,
    },
    /// The fault thread failed: the cause of whatever the loader saw after it.
    #[error("at stream offset {offset}: postcopy fault handling: {source}")]
    Faults {
        offset: u64,
        #[source]
        source: Arc<FaultError>,
    },
    #[error("at stream offset {offset}: {source}")]
    Package {
        offset: u64,
        #[source]
        source: PackageError,
    },
    #[error("at stream offset {offset}: {source}")]
    Intake {
        offset: u64,
        #[source]
        source: IntakeError,
    },
    #[error("at stream offset {offset}: discard in {block:?}: {source}")]
    Discard {
        offset: u64,
        block: String,
        #[source]
        source: std::io::Error,
    },
    #[error("at stream offset {offset}, section {section:?}: {source}")]
    Device {
        offset: u64,
        section: String,
        #[source]
        source: vmstate::VmStateError,
    },
    /// A multifd channel (numbered by its id) failed: the cause of whatever the loader
    /// saw after it.
    #[error("multifd channel {channel}: {source}")]
    Multifd {
        channel: usize,
        #[source]
        source: MultifdError,
    },
    #[error("at stream offset {offset}: {source}")]
    Mapped {
        offset: u64,
        #[source]
        source: MappedError,
    },
    #[error("waiting for the multifd channels to sync: {0}")]
    MultifdWait(#[source] std::io::Error),
    #[error("cancelled")]
    Cancelled,
    #[error("recovery: {0}")]
    Recovery(#[source] RecoveryError),
    #[error("link: {0}")]
    Link(#[source] LinkError),
    #[error("{0}")]
    State(#[from] crate::engine::state::BadTransition),
}

impl LoadError {
    /// The link broke (read error or EOF), as opposed to a bad stream.
    pub(crate) fn is_link(&self) -> bool {
        matches!(self, LoadError::Read(_) | LoadError::Link(_))
    }

    /// A recovery that failed on its own (its channel, its handshake): paused again.
    pub(crate) fn is_recovery(&self) -> bool {
        matches!(self, LoadError::Recovery(_))
    }
}

impl<R> Reader<R> {
    /// A codec error at the reader's offset.
    pub(crate) fn wire(&self, source: WireError) -> LoadError {
        LoadError::Wire {
            offset: self.offset,
            source,
        }
    }
}

impl From<RecoveryError> for LoadError {
    fn from(e: RecoveryError) -> Self {
        LoadError::Recovery(e)
    }
}

impl From<LinkError> for LoadError {
    fn from(e: LinkError) -> Self {
        LoadError::Link(e)
    }
}

/// A stream that breaks the protocol.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Violation {
    #[error("block list outside the RAM START section")]
    BlockListOutsideStart,
    #[error("target page bits {0}, the helper supports 12 (4 KiB)")]
    TargetPageBits(u32),
    #[error("RAM section version {version} instance {instance} (expected 4, 0)")]
    RamVersion { version: u32, instance: u32 },
    #[error("a second RAM START section")]
    SecondRamStart,
    #[error("RAM START begins with {0}, not the block list")]
    NoBlockList(String),
    #[error(
        "the source has RAM block {name:?}, which is not registered here (registered: {known:?})"
    )]
    UnknownBlock { name: String, known: Vec<String> },
    #[error("RAM block {name:?} is {source_len:#x} bytes at the source and {local:#x} here")]
    BlockSize {
        name: String,
        source_len: u64,
        local: u64,
    },
    #[error("RAM block lengths exceed the announced total")]
    BlockTotal,
    #[error("OPEN_RETURN_PATH on a channel that is not a socket")]
    ReturnPathNotSocket,
    #[error("unexpected command {0} in a precopy stream")]
    UnexpectedCommand(u16),
    #[error("postcopy target page size {0} (this helper has 4096)")]
    TargetPageSize(u64),
    #[error("postcopy needs matching RAM page sizes: the source has {source_sizes:#x}, this side {local:#x}")]
    PageSizes { source_sizes: u64, local: u64 },
    #[error("POSTCOPY_ADVISE without a return path")]
    AdviseWithoutReturnPath,
    #[error("POSTCOPY_RAM_DISCARD without POSTCOPY_ADVISE")]
    DiscardWithoutAdvise,
    #[error("discard for unknown RAM block {0:?}")]
    DiscardUnknownBlock(String),
    #[error("discard range {off:#x}+{len:#x} is outside RAM block {block:?} of size {size:#x}")]
    DiscardOutside {
        off: u64,
        len: u64,
        block: String,
        size: u64,
    },
    #[error("POSTCOPY_LISTEN without POSTCOPY_ADVISE")]
    ListenWithoutAdvise,
    #[error("a second POSTCOPY_LISTEN")]
    SecondListen,
    #[error("PART/END for section {0}, which was never started")]
    SectionNotStarted(u32),
    #[error("VM description before EOF")]
    DescriptionBeforeEof,
    #[error("data after EOF that is not a VM description")]
    DataAfterEof,
    #[error("device sections do not end at EOF")]
    DevicesPastEof,
    #[error("device section {idstr:?} instance {instance} is not in the VM description")]
    NotDescribed { idstr: String, instance: u32 },
    #[error("device state larger than {mib} MiB without a VM description")]
    HeldTooLarge { mib: usize },
    /// QEMU's `configuration_validate_capabilities`, in its words.
    #[error(
        "Capability {name} is {}, but received capability is {}",
        on_off(*local),
        on_off(*received)
    )]
    Capability {
        name: String,
        local: bool,
        received: bool,
    },
    /// A page, zero page, XBZRLE, HOOK or MULTIFD_FLUSH record on the main channel under
    /// mapped-ram (QEMU's `invalid_flags`, in its words).
    #[error("Unexpected RAM flags: {0}")]
    MappedRamFlags(u64),
    /// mapped-ram: a block's entry (and header) a second time in the block list.
    #[error("RAM block {0:?} is listed twice")]
    ListedTwice(String),
    /// An on-demand restore: a destination block the file does not have.
    #[error("RAM block {0:?} is not in the file: its pages could never be served")]
    NotInFile(String),
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

impl Violation {
    pub(crate) fn no_block_list(rec: &Record<'_>) -> Self {
        Violation::NoBlockList(format!("{rec:?}"))
    }
}

/// Why a postcopy link counts as broken (it pauses).
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error(transparent)]
    ReturnPath(#[from] RpError),
    #[error("{missing} requested pages had not arrived on either channel {ms} ms after the end of the stream")]
    RequestedMissing { missing: usize, ms: u128 },
}

/// Why a postcopy recovery failed (it pauses again).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecoveryError {
    #[error("{0}")]
    Accept(#[source] TransportError),
    #[error("{0} is not a socket")]
    NotASocket(String),
    #[error("{0}")]
    Dup(#[source] std::io::Error),
    #[error(transparent)]
    ReturnPath(#[from] RpError),
    #[error("{0}")]
    Preempt(#[source] PreemptError),
    #[error("no postcopy to recover")]
    NoPostcopy,
    #[error("expected RECV_BITMAP or POSTCOPY_RESUME, got {0}")]
    Unexpected(String),
    #[error("RECV_BITMAP without a block name")]
    NoBlockName,
    #[error("RECV_BITMAP for unknown RAM block {0:?}")]
    UnknownBlock(String),
    #[error("unexpected command {0} during recovery")]
    UnexpectedCommand(u16),
    #[error("device sections after a postcopy recovery")]
    DeviceSections,
}
