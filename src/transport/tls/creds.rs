//! The credential objects QEMU's `object-add` creates, read from their directory when
//! added, and the rustls configurations built from them (owner: control/creds).

use std::path::PathBuf;
use std::sync::Arc;

use super::Endpoint;

/// An object made by `object-add`.
#[derive(Clone)]
pub(crate) enum TlsObject {
    X509(Arc<X509Creds>),
    Psk(Arc<PskCreds>),
    Authz(Arc<AuthzSimple>),
}

/// `tls-creds-x509`.
pub(crate) struct X509Creds {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    pub(crate) endpoint: Endpoint,
    pub(crate) verify_peer: bool,
}

/// `tls-creds-psk`.
pub(crate) struct PskCreds {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    pub(crate) endpoint: Endpoint,
    pub(crate) username: Option<String>,
}

/// `authz-simple`: the one identity allowed.
pub(crate) struct AuthzSimple {
    pub(crate) id: String,
    pub(crate) identity: String,
}
