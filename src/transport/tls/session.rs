//! An established TLS session split into its sending and receiving halves (owner:
//! transport TLS). [`crate::transport::Channel`] routes its I/O through it.

use super::TlsInfo;

/// The two record halves of one TLS session, shared by every handle of a channel (the
/// return path's clone too).
pub(crate) struct Session {
    pub(crate) info: TlsInfo,
}
