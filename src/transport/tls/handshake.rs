//! The TLS handshake on a connected socket channel (owner: transport TLS).

use std::time::Duration;

use super::{TlsClient, TlsError, TlsServer};
use crate::transport::{CancelToken, Channel, Uri};

/// The source's handshake: SNI and the certificate check use `tls-hostname`, else the
/// `tcp:` host of `uri`; none with `verify-peer` on is QEMU's "No hostname" failure.
pub(super) fn client(
    _setup: &TlsClient,
    chan: Channel,
    _uri: Option<&Uri>,
    _cancel: &CancelToken,
    _timeout: Option<Duration>,
) -> Result<Channel, TlsError> {
    Err(TlsError::Handshake {
        chan: chan.peer.clone(),
        reason: "not implemented yet".into(),
    })
}

/// The destination's handshake: client certificate (verify-peer) and `tls-authz`.
pub(super) fn server(
    _setup: &TlsServer,
    chan: Channel,
    _cancel: &CancelToken,
    _timeout: Option<Duration>,
) -> Result<Channel, TlsError> {
    Err(TlsError::Handshake {
        chan: chan.peer.clone(),
        reason: "not implemented yet".into(),
    })
}
