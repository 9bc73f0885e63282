//! The source's errors. The variant decides what a failure does in postcopy: a failure of
//! the link pauses the migration (neither side has the whole guest), anything else fails it.

use crate::engine::source::rp_event::{RpError, RpEvent};
use crate::transport::TransportError;
use crate::wire::stream::WireError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SourceError {
    #[error("write to {peer} failed after {sent} bytes: {source}")]
    Io {
        peer: String,
        sent: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("cancelled")]
    Cancelled,
    #[error("destination: {0}")]
    Peer(#[from] PeerError),
    #[error("{0}")]
    State(#[from] crate::engine::state::BadTransition),
    #[error("link: {0}")]
    Link(#[from] LinkError),
    #[error("recovery: {0}")]
    Recovery(#[from] RecoveryError),
    #[error("{0}")]
    Multifd(#[from] MultifdError),
    #[error("{0}")]
    MappedRam(#[from] MappedRamError),
    #[error("cannot start the {what} thread: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A multifd channel failed; names the channel and its peer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MultifdError {
    #[error("multifd channel {id} to {peer}: write failed after {sent} bytes: {source}")]
    Io {
        id: u8,
        peer: String,
        sent: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("multifd channel {id} to {peer}: {source}")]
    Wire {
        id: u8,
        peer: String,
        #[source]
        source: WireError,
    },
    #[error("multifd channel {id} to {peer}: page {offset:#x} is outside block {block}")]
    OutsideBlock {
        id: u8,
        peer: String,
        block: String,
        offset: u64,
    },
    #[error("multifd channel {id} to {peer}: its thread ended unexpectedly")]
    Gone { id: u8, peer: String },
    #[error("multifd channel {id}: {source}")]
    File {
        id: u8,
        #[source]
        source: MappedRamError,
    },
    #[error("cannot start multifd channel {id}'s thread: {source}")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
}

/// mapped-ram: writing a page, a bitmap or the stream at its place in the file failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MappedRamError {
    #[error("mapped-ram: write of {len} bytes to {file} at offset {offset:#x} failed: {source}")]
    Write {
        file: String,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapped-ram: seek in {file} to offset {offset:#x} failed: {source}")]
    Seek {
        file: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapped-ram: cannot duplicate the fd of {file}: {source}")]
    Dup {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mapped-ram: {0}")]
    Layout(#[source] WireError),
    #[error("mapped-ram: RAM block #{0} has no place in the file")]
    NoBlock(usize),
    #[error("mapped-ram: page {0:#x} lies outside its block")]
    Outside(u64),
    #[error("mapped-ram needs a file to save to; {0} is not one")]
    NotAFile(String),
    #[error("mapped-ram: the file layout is fixed once the multifd channels run")]
    Shared,
}

/// The destination did something wrong, or a setup the destination needs failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("{0}")]
    ReturnPath(RpError),
    #[error("destination failed to load the stream (SHUT {0})")]
    Shut(u32),
    #[error("unexpected return-path message {0:?}")]
    Unexpected(RpEvent),
    #[error("no SHUT from the destination")]
    NoShut,
    #[error("postcopy needs a socket (for the return path); {0} is not one")]
    NotASocket(String),
    #[error("cannot establish the postcopy-preempt channel: {0}")]
    Preempt(#[source] PreemptError),
}

/// The link failed: postcopy pauses on these.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("{0}")]
    ReturnPath(RpError),
    #[error("the destination did not answer in time")]
    NoAnswer,
    #[error("no answer from the destination for {0} ms")]
    NoPong(u128),
}

/// A recovery attempt failed: postcopy stays paused for the next one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecoveryError {
    #[error("{0}")]
    Channel(#[source] TransportError),
    #[error("{0} is not a socket")]
    NotASocket(String),
    #[error("{0}")]
    Dup(#[source] std::io::Error),
    #[error("unexpected {0:?} during recovery")]
    Unexpected(RpEvent),
    #[error("RESUME_ACK {0}, expected 1")]
    ResumeAck(u32),
    #[error("{0}")]
    Preempt(#[source] PreemptError),
}

/// The postcopy-preempt channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PreemptError {
    #[error("postcopy-preempt needs a unix: or tcp: URI for its second connection, not {0}")]
    NotASocketUri(crate::transport::Uri),
    #[error("{0}")]
    Connect(#[source] TransportError),
    #[error("cannot start the preempt sender: {0}")]
    Spawn(#[source] std::io::Error),
}

impl From<RpError> for SourceError {
    /// A return path that broke is the link's failure; one that read something wrong is
    /// the destination's.
    fn from(e: RpError) -> Self {
        if e.is_link_failure() {
            SourceError::Link(LinkError::ReturnPath(e))
        } else {
            SourceError::Peer(PeerError::ReturnPath(e))
        }
    }
}

impl SourceError {
    /// A failure of the link (not of either side's state): postcopy pauses on it.
    pub(crate) fn is_link_failure(&self) -> bool {
        matches!(self, SourceError::Io { .. } | SourceError::Link(_))
    }

    /// In postcopy-paused: whether a failed recovery attempt leaves the migration paused
    /// for the next one (else it fails).
    pub(crate) fn stays_paused(&self) -> bool {
        self.is_link_failure() || matches!(self, SourceError::Recovery(_))
    }
}
