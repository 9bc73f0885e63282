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
            ": no cipher suite, group or signature scheme in common"
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
