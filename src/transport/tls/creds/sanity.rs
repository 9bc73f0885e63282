//! `sanity-check` of a `tls-creds-x509` object: the cheap checks QEMU makes on its own
//! certificate and the CA's when the object is added (`qcrypto_tls_creds_x509_sanity_check`),
//! with QEMU's messages, so that a bad directory fails `object-add` rather than a handshake.

use std::sync::Arc;

use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::{pem_certs, provider, CredsError};

/// GnuTLS imports at most this many CA certificates (QEMU's `MAX_CERTS`).
const MAX_CA_CERTS: usize = 16;

/// Checks our certificate (when there is one) and every CA certificate, then that ours is
/// signed by the CA. `server`: the object's endpoint is the server.
pub(super) fn check(
    server: bool,
    ca_pem: &[u8],
    ca_path: &str,
    cert_pem: Option<&[u8]>,
    cert_path: &str,
) -> Result<(), CredsError> {
    let who = if server { "server" } else { "client" };
    let cert = match cert_pem {
        Some(pem) => {
            let import = |reason: String| CredsError::ImportCert {
                who,
                path: cert_path.to_string(),
                reason,
            };
            // As GnuTLS, the first certificate of the file is ours.
            let mut certs = pem_certs(pem).map_err(import)?;
            let first = certs.swap_remove(0);
            X509Certificate::from_der(&first)
                .map_err(|e| import(format!("not a valid X.509 certificate ({e})")))?;
            Some(first)
        }
        None => None,
    };
    let cas = pem_certs(ca_pem)
        .ok()
        .filter(|c| c.len() <= MAX_CA_CERTS)
        .ok_or_else(|| CredsError::CaList {
            path: ca_path.to_string(),
        })?;
    let now = now_secs();
    if let Some(c) = &cert {
        check_cert(&parse(c, cert_path)?, cert_path, server, false, now)?;
    }
    for ca in &cas {
        let parsed =
            X509Certificate::from_der(ca)
                .map(|(_, c)| c)
                .map_err(|_| CredsError::CaList {
                    path: ca_path.to_string(),
                })?;
        check_cert(&parsed, ca_path, server, true, now)?;
    }
    if let Some(c) = &cert {
        check_pair(c, cert_path, &cas, ca_path, server)?;
    }
    Ok(())
}

fn parse<'a>(der: &'a CertificateDer<'_>, path: &str) -> Result<X509Certificate<'a>, CredsError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CredsError::Sanity(format!("Unable to parse certificate {path}: {e}")))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// QEMU's `qcrypto_tls_creds_check_cert`: validity times, basic constraints, key usage and,
/// for our own certificate, its purpose.
fn check_cert(
    cert: &X509Certificate<'_>,
    path: &str,
    server: bool,
    ca: bool,
    now: i64,
) -> Result<(), CredsError> {
    let fail = |m: String| Err(CredsError::Sanity(m));
    let whose = if ca {
        "CA"
    } else if server {
        "server"
    } else {
        "client"
    };
    let validity = cert.validity();
    if validity.not_after.timestamp() < now {
        return fail(format!("The {whose} certificate {path} has expired"));
    }
    if validity.not_before.timestamp() > now {
        return fail(format!("The {whose} certificate {path} is not yet active"));
    }
    let end = if server { "server" } else { "client" };
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca && !ca => {
            return fail(format!(
                "The certificate {path} basic constraints show a CA, but we need one for a {end}"
            ))
        }
        Ok(Some(bc)) if !bc.value.ca && ca => {
            return fail(format!(
                "The certificate {path} basic constraints do not show a CA"
            ))
        }
        Ok(None) if ca => {
            return fail(format!(
                "The certificate {path} is missing basic constraints for a CA"
            ))
        }
        Ok(_) => {}
        Err(e) => {
            return fail(format!(
                "Unable to query certificate {path} basic constraints: {e}"
            ))
        }
    }
    // A usage left out is only fatal when the extension is critical, as in QEMU.
    match cert.key_usage() {
        Ok(Some(ku)) if ku.critical => {
            let u = ku.value;
            if ca && !u.key_cert_sign() {
                return fail(format!(
                    "Certificate {path} usage does not permit certificate signing"
                ));
            }
            if !ca && !u.digital_signature() {
                return fail(format!(
                    "Certificate {path} usage does not permit digital signature"
                ));
            }
            if !ca && !u.key_encipherment() {
                return fail(format!(
                    "Certificate {path} usage does not permit key encipherment"
                ));
            }
        }
        Ok(_) => {}
        Err(e) => {
            return fail(format!("Unable to query certificate {path} key usage: {e}"));
        }
    }
    if ca {
        return Ok(());
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.critical => {
            let p = eku.value;
            let allowed = p.any || if server { p.server_auth } else { p.client_auth };
            if !allowed {
                return fail(format!(
                    "Certificate {path} purpose does not allow use with a TLS {end}"
                ));
            }
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => fail(format!(
            "Unable to query certificate {path} key purpose: {e}"
        )),
    }
}

/// QEMU's `qcrypto_tls_creds_check_cert_pair`: our certificate chains to the CA file.
fn check_pair(
    cert: &CertificateDer<'static>,
    cert_path: &str,
    cas: &[CertificateDer<'static>],
    ca_path: &str,
    server: bool,
) -> Result<(), CredsError> {
    let end = if server { "server" } else { "client" };
    let unverifiable = || {
        CredsError::Sanity(format!(
            "Unable to verify {end} certificate {cert_path} against CA certificate {ca_path}"
        ))
    };
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(|_| unverifiable())?;
    }
    let provider = provider();
    let now = UnixTime::now();
    let result = if server {
        let parsed = ParsedCertificate::try_from(cert).map_err(|_| unverifiable())?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            now,
            provider.signature_verification_algorithms.all,
        )
    } else {
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|_| unverifiable())?
            .verify_client_cert(cert, &[], now)
            .map(drop)
    };
    let Err(e) = result else { return Ok(()) };
    let reason = match &e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
            CertificateError::BadSignature => "The certificate is not trusted".into(),
            CertificateError::Revoked => "The certificate has been revoked".into(),
            CertificateError::UnsupportedSignatureAlgorithmContext { .. }
            | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                "The certificate uses an insecure algorithm".into()
            }
            other => format!("Invalid certificate ({other})"),
        },
        other => format!("Invalid certificate ({other})"),
    };
    Err(CredsError::Sanity(format!(
        "Our own certificate {cert_path} failed validation against {ca_path}: {reason}"
    )))
}
