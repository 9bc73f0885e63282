//! Why a handshake failed, in words an operator acts on: QEMU's own where it has them
//! (crypto/tlssession.c), so that both ends of a mixed migration say the same thing.

use rustls::{AlertDescription, CertificateError, Error, PeerIncompatible};

/// The reason text for a rustls error; `host` is the name the certificate was checked
/// against, when there was one.
pub(super) fn describe(e: &Error, host: Option<&str>) -> String {
    match e {
        Error::InvalidCertificate(c) => certificate(c, host),
        Error::AlertReceived(a) => alert(*a),
        Error::PeerIncompatible(p) => incompatible(p),
        Error::NoCertificatesPresented => {
            "the peer sent no certificate (verify-peer is on at this end)".into()
        }
        Error::InvalidMessage(m) => format!(
            "the peer sent a malformed TLS message ({m:?}): is it speaking TLS, and the same \
             migration protocol?"
        ),
        Error::DecryptError => "bad record MAC: a handshake record does not decrypt".into(),
        Error::PeerMisbehaved(m) => format!("the peer broke the TLS protocol ({m:?})"),
        other => other.to_string(),
    }
}

fn certificate(c: &CertificateError, host: Option<&str>) -> String {
    match c {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "The certificate has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "The certificate is not yet activated".into()
        }
        CertificateError::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "Certificate does not match the hostname {}",
                host.unwrap_or("(none)")
            )
        }
        CertificateError::Revoked => "The certificate has been revoked".into(),
        CertificateError::BadSignature => {
            "The certificate is not trusted (its signature does not verify)".into()
        }
        CertificateError::BadEncoding => "The certificate is malformed".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "The certificate is not for this use (its extended key usage does not allow a TLS \
             server or client)"
                .into()
        }
        CertificateError::UnknownRevocationStatus => {
            "The certificate's revocation status is unknown (the CRL does not cover its issuer)"
                .into()
        }
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => {
            "The certificate revocation list (ca-crl.pem) has expired".into()
        }
        other => format!("The certificate is not trusted ({other:?})"),
    }
}

fn alert(a: AlertDescription) -> String {
    let why = match a {
        AlertDescription::BadCertificate
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateUnknown => ": it refused this end's certificate",
        AlertDescription::UnknownCA => {
            ": it does not trust the CA that signed this end's certificate"
        }
        AlertDescription::CertificateExpired => ": this end's certificate has expired",
        AlertDescription::CertificateRevoked => ": this end's certificate is revoked",
        AlertDescription::CertificateRequired => {
            ": it wants a client certificate (verify-peer) and this end sent none"
        }
        AlertDescription::ProtocolVersion => ": no TLS version in common (TLS 1.3 only here)",
        AlertDescription::HandshakeFailure | AlertDescription::InsufficientSecurity => {
            ": no cipher suite, group or signature scheme in common, or the two ends use \
             different kinds of credentials (tls-creds-x509, tls-creds-psk)"
        }
        AlertDescription::AccessDenied => ": access denied",
        _ => "",
    };
    format!("the peer sent the TLS alert {a:?}{why}")
}

fn incompatible(p: &PeerIncompatible) -> String {
    match p {
        PeerIncompatible::SupportedVersionsExtensionRequired
        | PeerIncompatible::ServerDoesNotSupportTls12Or13
        | PeerIncompatible::Tls12NotOffered
        | PeerIncompatible::Tls12NotOfferedOrEnabled
        | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig => {
            "the peer offers no TLS 1.3 (the helper speaks only TLS 1.3, which QEMU's GnuTLS \
             negotiates; is the peer's TLS priority limited to TLS 1.2?)"
                .into()
        }
        PeerIncompatible::NoCipherSuitesInCommon => {
            "no TLS 1.3 cipher suite in common with the peer".into()
        }
        PeerIncompatible::NoKxGroupsInCommon | PeerIncompatible::KeyShareExtensionRequired => {
            "no key exchange group in common with the peer".into()
        }
        PeerIncompatible::NoSignatureSchemesInCommon
        | PeerIncompatible::NoCertificateRequestSignatureSchemesInCommon => {
            "no signature scheme in common with the peer (certificate key type?)".into()
        }
        other => format!("the peer is incompatible ({other:?})"),
    }
}

/// Why a server had no key for the client's username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookup {
    NoUser,
    BadKey,
}

/// What a failed TLS-PSK handshake knew, for its reason.
pub(super) struct PskFacts<'a> {
    pub(super) endpoint: super::Endpoint,
    /// The client's username: its own, or (server) the one it sent; None: it sent none.
    pub(super) identity: Option<String>,
    /// Server: the look-up of that username failed so.
    pub(super) lookup: Option<Lookup>,
    /// `DIR/keys.psk`.
    pub(super) file: &'a str,
    /// Client: the server presented a certificate.
    pub(super) peer_cert: bool,
}

impl PskFacts<'_> {
    fn user(&self) -> &str {
        self.identity.as_deref().unwrap_or("?")
    }
}

/// OpenSSL's reason codes (ssl/sslerr.h) that get their own words.
const SSL_R_BINDER_DOES_NOT_VERIFY: i32 = 253;
const SSL_R_UNSUPPORTED_PROTOCOL: i32 = 258;
const SSL_R_NO_PROTOCOLS_AVAILABLE: i32 = 191;
/// A received alert is reported as this plus its description.
const SSL_AD_REASON_OFFSET: i32 = 1000;

/// The reason text for a failed TLS-PSK handshake (OpenSSL's error and what the callbacks
/// saw). QEMU (GnuTLS) says "An illegal parameter has been received" for a bad binder and
/// an unknown username alike, and closes without an alert: the client says both.
pub(super) fn psk(e: &openssl::ssl::Error, f: &PskFacts<'_>) -> String {
    let server = f.endpoint == super::Endpoint::Server;
    let user = f.user();
    let file = f.file;
    match (server, f.lookup) {
        (true, Some(Lookup::NoUser)) => {
            return format!("Username {user} not found in PSK file {file} (the client's username)")
        }
        (true, Some(Lookup::BadKey)) => {
            return format!(
                "the key of {user} in {file} is not hexadecimal (an even number of hex digits, \
                 at most {})",
                2 * super::creds::psk::MAX_KEY_LEN
            )
        }
        (true, None) if f.identity.is_none() => {
            return "the client offered no pre-shared key: it does not use TLS-PSK \
                    (tls-creds-x509 on its end?)"
                .into()
        }
        (false, _) if f.peer_cert => {
            return "the server presented a certificate: it uses tls-creds-x509 while this \
                    end uses tls-creds-psk"
                .into()
        }
        _ => {}
    }
    let first = e.ssl_error().and_then(|s| s.errors().first());
    let code = first.map_or(0, |x| x.reason_code());
    match code {
        SSL_R_BINDER_DOES_NOT_VERIFY => format!(
            "the client's pre-shared key for {user} is not the one in {file} (its binder does \
             not verify; QEMU: An illegal parameter has been received)"
        ),
        SSL_R_UNSUPPORTED_PROTOCOL | SSL_R_NO_PROTOCOLS_AVAILABLE => {
            "the peer offers no TLS 1.3 (the helper speaks only TLS 1.3, which QEMU's GnuTLS \
             negotiates; is the peer's TLS priority limited to TLS 1.2?)"
                .into()
        }
        c if (SSL_AD_REASON_OFFSET..SSL_AD_REASON_OFFSET + 256).contains(&c) => {
            let a = AlertDescription::from((c - SSL_AD_REASON_OFFSET) as u8);
            match a {
                AlertDescription::DecryptError | AlertDescription::IllegalParameter if !server => {
                    format!(
                        "the peer sent the TLS alert {a:?}: it refused this end's pre-shared \
                         key (the key of {user} in {file} is not the one in its keys.psk)"
                    )
                }
                AlertDescription::HandshakeFailure | AlertDescription::UnknownPSKIdentity
                    if !server =>
                {
                    format!(
                        "the peer sent the TLS alert {a:?}: it has no key for {user} (not in \
                         its keys.psk?), or it does not use TLS-PSK"
                    )
                }
                a => alert(a),
            }
        }
        _ => match first.and_then(|x| x.reason()) {
            Some(r) => format!("OpenSSL: {r}"),
            None => e.to_string(),
        },
    }
}

/// The reason when the peer closed the connection in the middle of a TLS-PSK handshake.
pub(super) fn psk_eof(f: &PskFacts<'_>) -> String {
    match f.endpoint {
        super::Endpoint::Client => format!(
            "the peer closed the connection during the handshake: QEMU does so when it \
             refuses the pre-shared key (the key of {} in {} is not its key, or its keys.psk \
             has no {}), or when it does not use TLS-PSK",
            f.user(),
            f.file,
            f.user()
        ),
        super::Endpoint::Server => "the client closed the connection during the handshake (is \
                                    TLS-PSK set on both ends?)"
            .into(),
    }
}
