//! The credential objects QEMU's `object-add` creates, read from their directory when
//! added, and the rustls configurations built from them (owner: control/creds).
//!
//! Every file is read when the object is added, as QEMU does, so that a later sandbox
//! refusal or a file changed under the helper's feet cannot break a migration half-way;
//! the messages are QEMU's (`crypto/tlscreds.c`, `crypto/tlscredsx509.c`,
//! `crypto/tlscredspsk.c`). No key material is ever put in a message or a log.

pub(super) mod psk;
mod sanity;
#[cfg(test)]
pub(crate) mod testpki;
#[cfg(test)]
mod tests;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};

use super::Endpoint;

pub(crate) use self::psk::{decode_hex, PskCreds, PskLookup, PskOptions};

/// The largest credentials file read: certificates, keys and CRLs are a few KiB; a path
/// that names a device (`/dev/zero`) must not grow memory without bound.
pub(crate) const MAX_FILE_SIZE: u64 = 1 << 20;

/// File names in the credentials directory, as QEMU names them.
pub(crate) const CA_CERT: &str = "ca-cert.pem";
pub(crate) const CA_CRL: &str = "ca-crl.pem";
pub(crate) const SERVER_CERT: &str = "server-cert.pem";
pub(crate) const SERVER_KEY: &str = "server-key.pem";
pub(crate) const CLIENT_CERT: &str = "client-cert.pem";
pub(crate) const CLIENT_KEY: &str = "client-key.pem";
pub(crate) const PSK_FILE: &str = "keys.psk";

/// An object made by `object-add`.
#[derive(Clone)]
pub(crate) enum TlsObject {
    X509(Arc<X509Creds>),
    Psk(Arc<PskCreds>),
    Authz(Arc<AuthzSimple>),
}

impl TlsObject {
    /// The object's id.
    pub(crate) fn id(&self) -> &str {
        match self {
            TlsObject::X509(o) => &o.id,
            TlsObject::Psk(o) => &o.id,
            TlsObject::Authz(o) => &o.id,
        }
    }

    /// The object's QOM type, for messages and the log.
    pub(crate) fn qom_type(&self) -> &'static str {
        match self {
            TlsObject::X509(_) => "tls-creds-x509",
            TlsObject::Psk(_) => "tls-creds-psk",
            TlsObject::Authz(_) => "authz-simple",
        }
    }
}

/// Why credentials could not be loaded or turned into a TLS configuration. The texts are
/// QEMU's where it has one; they name files, never their content.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredsError {
    #[error("Missing 'dir' property value")]
    NoDir,
    #[error("Unable to access credentials {path}: {reason}")]
    Access { path: String, reason: String },
    /// Reading a certificate failed (QEMU words it so for every certificate file).
    #[error("Cannot load CA cert list {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("Cannot read credentials file {path}: {reason}")]
    ReadOther { path: String, reason: String },
    #[error("Unable to import CA certificate list {path}")]
    CaList { path: String },
    #[error("Unable to import {who} certificate {path}: {reason}")]
    ImportCert {
        who: &'static str,
        path: String,
        reason: String,
    },
    /// A `sanity-check` failure, worded by QEMU.
    #[error("{0}")]
    Sanity(String),
    #[error("Cannot load CA certificate '{path}': {reason}")]
    LoadCa { path: String, reason: String },
    #[error("Cannot load certificate '{cert}' & key '{key}': {reason}")]
    CertKey {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("Cannot load CRL '{path}': {reason}")]
    Crl { path: String, reason: String },
    #[error("Cannot read PSK file {path}: {reason}")]
    PskRead { path: String, reason: String },
    #[error("Username {user} not found in PSK file {path}")]
    PskUser { user: String, path: String },
    #[error("username should not be set when endpoint=server")]
    PskServerUsername,
    #[error(
        "Cannot set PSK client credentials: the key of {user} in {path} is not hexadecimal (an \
         even number of hex digits, at most {max})",
        max = 2 * psk::MAX_KEY_LEN
    )]
    PskKey { user: String, path: String },
    #[error("TLS credentials '{id}': {reason}")]
    Config { id: String, reason: String },
}

/// `tls-creds-x509`, with its files as read when it was added.
pub(crate) struct X509Creds {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    pub(crate) endpoint: Endpoint,
    pub(crate) verify_peer: bool,
    /// `ca-cert.pem`: the trust anchors for the peer's certificate.
    ca: Vec<CertificateDer<'static>>,
    /// `ca-crl.pem` (server only, as in QEMU).
    crls: Vec<CertificateRevocationListDer<'static>>,
    /// Our certificate chain and key (the server's always; the client's when both files
    /// are there). Never printed: this type has no Debug.
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

/// `authz-simple`: the one identity allowed.
pub(crate) struct AuthzSimple {
    pub(crate) id: String,
    pub(crate) identity: String,
}

/// What `object-add` gives for a `tls-creds-x509`.
pub(crate) struct X509Options {
    pub(crate) id: String,
    pub(crate) dir: Option<PathBuf>,
    pub(crate) endpoint: Endpoint,
    pub(crate) verify_peer: bool,
    pub(crate) sanity_check: bool,
}

/// The provider every configuration uses, named explicitly so that no process-wide default
/// (or another crate's feature) picks a different one. AES-128-GCM comes first: it seals a
/// page in fewer rounds than AES-256-GCM, and guest RAM at several GB/s makes the cipher
/// the cost of a TLS migration. The peer's order still decides where it chooses (a rustls
/// server follows the client's order; GnuTLS, QEMU's, follows its own priority).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// `dir/name`, spelled as QEMU spells it in messages.
pub(super) fn cred_path(dir: &Path, name: &str) -> String {
    format!("{}/{}", dir.display(), name)
}

/// The strerror text of an I/O error (QEMU's `error_setg_errno` appends it), with the
/// sandbox's advice when Landlock refused the path.
pub(super) fn reason(path: &str, e: std::io::Error) -> String {
    let e = crate::sandbox::explain_creds(Path::new(path), e);
    match e.raw_os_error() {
        Some(n) if e.get_ref().is_none() => nix::errno::Errno::from_raw(n).desc().to_string(),
        _ => e.to_string(),
    }
}

/// QEMU's `qcrypto_tls_creds_get_path` and the read after it: None for a missing optional
/// file; the content, bounded, otherwise.
fn read_cred(dir: &Path, name: &str, required: bool) -> Result<Option<Vec<u8>>, CredsError> {
    let path = cred_path(dir, name);
    if let Err(e) = std::fs::metadata(&path) {
        if e.kind() == std::io::ErrorKind::NotFound && !required {
            return Ok(None);
        }
        let reason = reason(&path, e);
        return Err(CredsError::Access { path, reason });
    }
    read_bounded(&path).map(Some).map_err(|reason| {
        if name.ends_with("-cert.pem") {
            CredsError::Read { path, reason }
        } else {
            CredsError::ReadOther { path, reason }
        }
    })
}

/// Reads a regular file of at most [`MAX_FILE_SIZE`] bytes. Opened non-blocking so that a
/// FIFO cannot hang the control thread; anything but a regular file is refused.
pub(super) fn read_bounded(path: &str) -> Result<Vec<u8>, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| reason(path, e))?;
    let meta = f.metadata().map_err(|e| reason(path, e))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut buf = Vec::new();
    f.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| reason(path, e))?;
    if buf.len() as u64 > MAX_FILE_SIZE {
        return Err(format!("larger than {MAX_FILE_SIZE} bytes"));
    }
    Ok(buf)
}

/// The certificates of a PEM file, in order; an error names no content.
pub(super) fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "malformed PEM".to_string())?;
    if certs.is_empty() {
        return Err("no certificate found (PEM 'CERTIFICATE')".into());
    }
    Ok(certs)
}

impl X509Creds {
    /// Loads the directory as QEMU's `qcrypto_tls_creds_x509_load` does: the paths in
    /// QEMU's order, the sanity check, then the certificates, key and CRL.
    pub(crate) fn load(o: X509Options) -> Result<X509Creds, CredsError> {
        let dir = o.dir.ok_or(CredsError::NoDir)?;
        crate::sandbox::note_creds(&dir);
        let server = o.endpoint == Endpoint::Server;
        let (ca, crl, cert, key, cert_name, key_name) = if server {
            let ca = read_cred(&dir, CA_CERT, true)?;
            let crl = read_cred(&dir, CA_CRL, false)?;
            let cert = read_cred(&dir, SERVER_CERT, true)?;
            let key = read_cred(&dir, SERVER_KEY, true)?;
            (ca, crl, cert, key, SERVER_CERT, SERVER_KEY)
        } else {
            let ca = read_cred(&dir, CA_CERT, true)?;
            let cert = read_cred(&dir, CLIENT_CERT, false)?;
            let key = read_cred(&dir, CLIENT_KEY, false)?;
            (ca, None, cert, key, CLIENT_CERT, CLIENT_KEY)
        };
        // A required file is Some here.
        let ca = ca.unwrap_or_default();
        let ca_path = cred_path(&dir, CA_CERT);
        let cert_path = cred_path(&dir, cert_name);
        if o.sanity_check {
            sanity::check(server, &ca, &ca_path, cert.as_deref(), &cert_path)?;
        }
        let ca = pem_certs(&ca).map_err(|reason| CredsError::LoadCa {
            path: ca_path.clone(),
            reason,
        })?;
        let mut roots = RootCertStore::empty();
        for c in &ca {
            roots.add(c.clone()).map_err(|e| CredsError::LoadCa {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
        }
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(load_identity(
                &cert,
                &key,
                &cert_path,
                &cred_path(&dir, key_name),
            )?),
            _ => None,
        };
        let crls = match crl {
            Some(pem) => {
                let path = cred_path(&dir, CA_CRL);
                let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| CredsError::Crl {
                        path: path.clone(),
                        reason: "malformed PEM".into(),
                    })?;
                if crls.is_empty() {
                    return Err(CredsError::Crl {
                        path,
                        reason: "no CRL found (PEM 'X509 CRL')".into(),
                    });
                }
                // Parsed now, with QEMU's message, rather than when a verifier is built.
                client_verifier(Arc::new(roots), crls.clone())
                    .map_err(|e| CredsError::Crl { path, reason: e })?;
                crls
            }
            None => Vec::new(),
        };
        let creds = X509Creds {
            id: o.id,
            dir,
            endpoint: o.endpoint,
            verify_peer: o.verify_peer,
            ca,
            crls,
            identity,
        };
        // Build the configuration once now, so that a bad key or CRL fails `object-add`
        // rather than the migration.
        match creds.endpoint {
            Endpoint::Client => creds.client_config().map(drop)?,
            Endpoint::Server => creds.server_config().map(drop)?,
        }
        Ok(creds)
    }

    /// Whether a certificate (and key) of our own was loaded.
    pub(crate) fn has_certificate(&self) -> bool {
        self.identity.is_some()
    }

    fn config_error(&self, reason: impl std::fmt::Display) -> CredsError {
        CredsError::Config {
            id: self.id.clone(),
            reason: reason.to_string(),
        }
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, CredsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|e| self.config_error(e))?;
        }
        Ok(Arc::new(roots))
    }

    /// The source's configuration: TLS 1.3 only, secrets extractable for the record layer,
    /// no resumption. With verify-peer the server's certificate is checked against the CA
    /// (the name by the handshake); without, any certificate is taken, as QEMU does, but
    /// the handshake signature is still checked.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, CredsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.config_error(e))?;
        let builder = if self.verify_peer {
            let verifier = WebPkiServerVerifier::builder_with_provider(self.roots()?, provider)
                .build()
                .map_err(|e| self.config_error(e))?;
            builder.with_webpki_verifier(verifier)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCert { provider }))
        };
        let mut config = match &self.identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| self.identity_error(e))?,
            None => builder.with_no_client_auth(),
        };
        config.enable_secret_extraction = true;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// The destination's configuration: TLS 1.3 only, secrets extractable, no session
    /// tickets. With verify-peer a client certificate is required and checked against the
    /// CA and its CRL; without, none is asked for.
    pub(crate) fn server_config(&self) -> Result<Arc<ServerConfig>, CredsError> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.config_error(e))?;
        let builder = if self.verify_peer {
            let verifier = client_verifier(self.roots()?, self.crls.clone())
                .map_err(|e| self.config_error(e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let Some((chain, key)) = &self.identity else {
            return Err(self.config_error("no server certificate and key"));
        };
        let mut config = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| self.identity_error(e))?;
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    fn identity_error(&self, e: rustls::Error) -> CredsError {
        let (cert, key) = match self.endpoint {
            Endpoint::Server => (SERVER_CERT, SERVER_KEY),
            Endpoint::Client => (CLIENT_CERT, CLIENT_KEY),
        };
        CredsError::CertKey {
            cert: cred_path(&self.dir, cert),
            key: cred_path(&self.dir, key),
            reason: e.to_string(),
        }
    }
}

/// The server's check of client certificates: signed by the CA and, as GnuTLS checks them,
/// not listed in a CRL that covers them (a certificate no CRL covers passes; the CA
/// certificates themselves are trusted as they are).
fn client_verifier(
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| e.to_string())
}

/// Our certificate chain and its key. The key's parse error is not shown: it could quote
/// a line of the key.
fn load_identity(
    cert: &[u8],
    key: &[u8],
    cert_path: &str,
    key_path: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CredsError> {
    let err = |reason: String| CredsError::CertKey {
        cert: cert_path.to_string(),
        key: key_path.to_string(),
        reason,
    };
    let chain = pem_certs(cert).map_err(err)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| {
        err("no unencrypted private key found (PEM 'PRIVATE KEY', 'RSA PRIVATE KEY' or 'EC PRIVATE KEY')".into())
    })?;
    // The key must be one ring signs with and must match the certificate.
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
        .map_err(|e| err(e.to_string()))?;
    Ok((chain, key))
}

/// The source's verifier with verify-peer off: QEMU then checks nothing about the server's
/// certificate, but the handshake signature still proves the server holds its key.
#[derive(Debug)]
struct AnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
