//! TLS on the migration channels, as QEMU does it: every socket channel (main with its
//! return path, preempt, each multifd channel, each recovery socket) runs a TLS 1.3
//! handshake before any migration byte; the destination is the server, the source the
//! client.
//!
//! With x509 credentials rustls (with the `ring` provider) runs the handshake and owns the
//! key schedule; with a pre-shared key (TLS-PSK, which rustls lacks) OpenSSL runs the
//! handshake and the helper keeps the schedule. Either way the session then splits into
//! two halves that encrypt and decrypt records themselves with rustls's record ciphers (the
//! kernel-TLS API, in user space): the sending half and the receiving half are
//! independent, so that a return-path reader and a page writer never wait on each other,
//! and records are sealed in place with one copy of the data.
//!
//! - [`creds`]: the `tls-creds-x509` / `tls-creds-psk` / `authz-simple` objects, read from
//!   their directory when added, and the rustls configurations built from them.
//! - `handshake`: the rustls handshake on a connected socket; `psk`: OpenSSL's; both over
//!   `wire`, bounded by a deadline and a cancel.
//! - [`session`]: the two record halves a [`super::Channel`] does its I/O through;
//!   `schedule`: the keys of a session rustls did not negotiate.

pub(crate) mod creds;
pub(crate) mod dn;
mod handshake;
pub(crate) mod psk;
mod reason;
mod schedule;
pub(crate) mod session;
#[cfg(test)]
mod tests;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use super::{CancelToken, Channel, Uri};

/// Which end of the TLS session a migration end is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// The source: connects, checks the server's certificate against the hostname.
    Client,
    /// The destination: accepts, checks the client's certificate and `tls-authz`.
    Server,
}

impl Endpoint {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Endpoint::Client => "client",
            Endpoint::Server => "server",
        }
    }
}

/// What a migration's channels need for TLS: resolved from `tls-creds`, `tls-hostname` and
/// `tls-authz` when a migration (or a recovery) starts, so that a later `object-del` does not
/// pull it away mid-migration. Shared by every channel of the migration.
#[derive(Clone)]
pub(crate) enum TlsSetup {
    Client(Arc<TlsClient>),
    Server(Arc<TlsServer>),
    PskClient(Arc<psk::PskClient>),
    PskServer(Arc<psk::PskServer>),
}

/// The source's side.
pub(crate) struct TlsClient {
    pub(crate) config: Arc<rustls::ClientConfig>,
    /// `tls-hostname` when set (it wins over the URI's host).
    pub(crate) hostname: Option<String>,
    /// `verify-peer` of the credentials: off, the server's certificate is not checked (and
    /// no hostname is needed), as QEMU does.
    pub(crate) verify_peer: bool,
    /// The credentials' id, for messages.
    pub(crate) creds_id: String,
}

/// The destination's side.
pub(crate) struct TlsServer {
    pub(crate) config: Arc<rustls::ServerConfig>,
    /// `tls-authz`: the identity (distinguished name) the client's certificate must have.
    pub(crate) authz: Option<String>,
    pub(crate) verify_peer: bool,
    pub(crate) creds_id: String,
}

/// What a finished handshake agreed: logged and reported per channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsInfo {
    pub(crate) endpoint: Endpoint,
    /// "TLSv1.3".
    pub(crate) protocol: String,
    /// "TLS13_AES_256_GCM_SHA384".
    pub(crate) cipher: String,
    /// The peer's name as QEMU's `tls-authz` sees it: x509, its certificate's
    /// distinguished name (when it sent one); TLS-PSK, the session's username (identity).
    pub(crate) peer_dn: Option<String>,
}

/// Why a TLS channel could not be set up or broke. The texts become `error-desc`: they name
/// the channel and the reason, never key material.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("TLS handshake on {chan} failed: {reason}")]
    Handshake { chan: String, reason: String },
    #[error(
        "TLS handshake on {chan}: the peer sent no TLS (clear text? is TLS set on both ends?)"
    )]
    ClearText { chan: String },
    #[error("TLS handshake on {chan} did not complete within {timeout:?}")]
    Timeout { chan: String, timeout: Duration },
    #[error("TLS handshake on {chan}: cancelled")]
    Cancelled { chan: String },
    #[error("TLS on {chan}: No hostname for certificate validation (set tls-hostname)")]
    NoHostname { chan: String },
    #[error("TLS on {chan}: TLS x509 authz check for {dn} is denied")]
    AuthzDenied { chan: String, dn: String },
    #[error("TLS on {chan}: TLS PSK authz check for {user} is denied")]
    PskAuthzDenied { chan: String, user: String },
    #[error("TLS on {chan}: {what} needs a socket")]
    NotSocket { chan: String, what: &'static str },
    #[error("TLS I/O on {chan}: {source}")]
    Io {
        chan: String,
        #[source]
        source: std::io::Error,
    },
}

impl TlsSetup {
    /// The `tls-creds` object this setup came from, for logs.
    pub(crate) fn creds_id(&self) -> &str {
        match self {
            TlsSetup::Client(c) => &c.creds_id,
            TlsSetup::Server(s) => &s.creds_id,
            TlsSetup::PskClient(c) => &c.creds_id,
            TlsSetup::PskServer(s) => &s.creds_id,
        }
    }

    /// Runs the handshake on `chan` in this setup's role and returns the channel with its
    /// I/O going through the session. `uri` is the URI the source connected to (its `tcp:`
    /// host is the name checked when `tls-hostname` is unset); the destination ignores it.
    /// Gives up after `timeout` (None: no limit) or on a cancel.
    pub(crate) fn secure(
        &self,
        chan: Channel,
        uri: Option<&Uri>,
        cancel: &CancelToken,
        timeout: Option<Duration>,
    ) -> Result<Channel, TlsError> {
        match self {
            TlsSetup::Client(c) => handshake::client(c, chan, uri, cancel, timeout),
            TlsSetup::Server(s) => handshake::server(s, chan, cancel, timeout),
            TlsSetup::PskClient(c) => psk::client(c, chan, cancel, timeout),
            TlsSetup::PskServer(s) => psk::server(s, chan, cancel, timeout),
        }
    }
}

/// Loads what OpenSSL reads on first use (its configuration file) and seeds its random
/// generator while the filesystem is open: the sandbox then closes it (Landlock), and a
/// TLS-PSK handshake needs nothing more than memory, futexes and getrandom(2).
pub(crate) fn warm_up() {
    openssl::init();
    let _ = openssl::rand::rand_bytes(&mut [0u8; 16]);
}
