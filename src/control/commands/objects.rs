//! `object-add` and `object-del` for the objects a TLS migration needs (`tls-creds-x509`,
//! `tls-creds-psk`, `authz-simple`), and resolving `tls-creds`/`tls-authz` into the
//! [`TlsSetup`] a migration's channels use (owner: control/creds).
//!
//! `object-add` takes its properties flat beside `qom-type` and `id`, as QEMU 10.0's
//! QAPI-typed command does, with QEMU's messages (`qom/object_interfaces.c`,
//! `migration/tls.c`, `crypto/tlscreds.c`, `authz/base.c`).

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use super::{lock, Args, CmdResult, Helper, Role};
use crate::control::qmp::QmpError;
use crate::engine::migration::Parameters;
use crate::transport::tls::creds::{
    AuthzSimple, PskCreds, PskOptions, TlsObject, X509Creds, X509Options,
};
use crate::transport::tls::psk::{PskClient, PskServer};
use crate::transport::tls::{Endpoint, TlsClient, TlsServer, TlsSetup};

/// Most objects held at once (each holds a few files of at most 1 MiB).
pub(super) const MAX_OBJECTS: usize = 64;

/// Object types QEMU knows that the helper does not make: refused with a reason rather
/// than QAPI's "does not accept value".
const QEMU_ONLY_TYPES: &[&str] = &[
    "tls-creds-anon",
    "tls-cipher-suites",
    "authz-list",
    "authz-listfile",
    "authz-pam",
    "secret",
    "secret_keyring",
];

/// The properties every `tls-creds-*` takes (QAPI's `TlsCredsProperties`).
const TLS_CREDS_PROPS: &[&str] = &[
    "qom-type",
    "id",
    "dir",
    "endpoint",
    "verify-peer",
    "priority",
];

/// QEMU's `id_wellformed`: a letter, then letters, digits, '-', '.' and '_'.
pub(super) fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The `tls-creds` properties common to x509 and psk.
struct CredsProps {
    dir: Option<PathBuf>,
    endpoint: Endpoint,
    verify_peer: bool,
}

impl Helper {
    /// `object-add`.
    pub(super) fn object_add(&self, a: &Args<'_>) -> CmdResult {
        let qom_type = a.str("qom-type")?;
        let id = a.str("id")?;
        let object = match qom_type {
            "tls-creds-x509" => {
                let mut known = TLS_CREDS_PROPS.to_vec();
                known.extend(["sanity-check", "passwordid"]);
                let props = self.creds_props(a)?;
                let sanity_check = a.opt_bool("sanity-check")?.unwrap_or(true);
                if a.opt_str("passwordid")?.is_some() {
                    return Err(QmpError::generic(
                        "passwordid (an encrypted private key) is not supported by the \
                         helper: give an unencrypted key",
                    ));
                }
                a.only(&known)?;
                self.check_new_id(id)?;
                let creds = X509Creds::load(X509Options {
                    id: id.to_string(),
                    dir: props.dir,
                    endpoint: props.endpoint,
                    verify_peer: props.verify_peer,
                    sanity_check,
                })
                .map_err(generic)?;
                slog::info!(self.log, "TLS credentials added"; "id" => id,
                    "type" => qom_type, "dir" => %creds.dir.display(),
                    "endpoint" => creds.endpoint.as_str(), "verify_peer" => creds.verify_peer,
                    "sanity_check" => sanity_check, "certificate" => creds.has_certificate());
                TlsObject::X509(Arc::new(creds))
            }
            "tls-creds-psk" => {
                let mut known = TLS_CREDS_PROPS.to_vec();
                known.push("username");
                let props = self.creds_props(a)?;
                let username = a.opt_str("username")?.map(str::to_string);
                a.only(&known)?;
                self.check_new_id(id)?;
                let creds = PskCreds::load(PskOptions {
                    id: id.to_string(),
                    dir: props.dir,
                    endpoint: props.endpoint,
                    username,
                })
                .map_err(generic)?;
                slog::info!(self.log, "TLS credentials added";
                    "id" => id, "type" => qom_type, "dir" => %creds.dir.display(),
                    "endpoint" => creds.endpoint.as_str(), "username" => creds.username.as_deref());
                TlsObject::Psk(Arc::new(creds))
            }
            "authz-simple" => {
                let identity = a.str("identity")?;
                a.only(&["qom-type", "id", "identity"])?;
                self.check_new_id(id)?;
                slog::info!(self.log, "authorization object added"; "id" => id,
                    "type" => qom_type, "identity" => identity);
                TlsObject::Authz(Arc::new(AuthzSimple {
                    id: id.to_string(),
                    identity: identity.to_string(),
                }))
            }
            t if QEMU_ONLY_TYPES.contains(&t) => {
                return Err(QmpError::generic(format!(
                    "object type '{t}' is not supported by the helper (only tls-creds-x509, \
                     tls-creds-psk and authz-simple)"
                )))
            }
            t => {
                return Err(QmpError::generic(format!(
                    "Parameter 'qom-type' does not accept value '{t}'"
                )))
            }
        };
        // Checked again: the files were read without the lock.
        let mut objects = lock(&self.objects);
        self.check_id_free(&objects, id)?;
        objects.insert(id.to_string(), object);
        Ok(json!({}))
    }

    /// `object-del`. A migration that started keeps what it resolved.
    pub(super) fn object_del(&self, a: &Args<'_>) -> CmdResult {
        let id = a.str("id")?;
        a.only(&["id"])?;
        match lock(&self.objects).remove(id) {
            Some(o) => {
                slog::info!(self.log, "object deleted"; "id" => o.id(), "type" => o.qom_type());
                Ok(json!({}))
            }
            None => Err(QmpError::generic(format!("object '{id}' not found"))),
        }
    }

    fn creds_props(&self, a: &Args<'_>) -> Result<CredsProps, QmpError> {
        let dir = a.opt_str("dir")?.map(PathBuf::from);
        let endpoint = match a.opt_str("endpoint")? {
            None | Some("client") => Endpoint::Client,
            Some("server") => Endpoint::Server,
            Some(v) => {
                return Err(QmpError::generic(format!(
                    "Parameter 'endpoint' does not accept value '{v}'"
                )))
            }
        };
        let verify_peer = a.opt_bool("verify-peer")?.unwrap_or(true);
        if let Some(p) = a.opt_str("priority")? {
            // GnuTLS priority strings have no rustls meaning: the suites are TLS 1.3's.
            slog::info!(self.log, "tls-creds 'priority' ignored: the helper negotiates TLS 1.3 with rustls's suites";
                "priority" => p);
        }
        Ok(CredsProps {
            dir,
            endpoint,
            verify_peer,
        })
    }

    /// Before the files are read: a well-formed id that is free, room for one more.
    fn check_new_id(&self, id: &str) -> Result<(), QmpError> {
        if !id_wellformed(id) {
            return Err(QmpError::generic("Parameter 'id' expects an identifier"));
        }
        self.check_id_free(&lock(&self.objects), id)
    }

    fn check_id_free(
        &self,
        objects: &std::collections::HashMap<String, TlsObject>,
        id: &str,
    ) -> Result<(), QmpError> {
        if objects.contains_key(id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        if objects.len() >= MAX_OBJECTS {
            return Err(QmpError::generic(format!(
                "too many objects (at most {MAX_OBJECTS}): object-del one first"
            )));
        }
        Ok(())
    }

    /// The TLS setup for a migration in `role` from `tls-creds`, `tls-hostname` and
    /// `tls-authz` as they are now; None when `tls-creds` is empty.
    pub(super) fn tls_setup(&self, role: Role) -> Result<Option<TlsSetup>, QmpError> {
        let p = self.ctx.params();
        if p.tls_creds.is_empty() {
            return Ok(None);
        }
        let (object, authz) = {
            let objects = lock(&self.objects);
            let authz = (role == Role::Destination && !p.tls_authz.is_empty())
                .then(|| objects.get(&p.tls_authz).cloned());
            (objects.get(&p.tls_creds).cloned(), authz)
        };
        let want = match role {
            Role::Source => Endpoint::Client,
            Role::Destination => Endpoint::Server,
        };
        let id = &p.tls_creds;
        let psk = match object {
            None => {
                return Err(QmpError::generic(format!(
                    "No TLS credentials with id '{id}'"
                )))
            }
            Some(TlsObject::Authz(_)) => {
                return Err(QmpError::generic(format!(
                    "Object with id '{id}' is not TLS credentials"
                )))
            }
            Some(TlsObject::Psk(c)) => c,
            Some(TlsObject::X509(c)) => return x509_setup(&c, role, want, &p, authz).map(Some),
        };
        check_endpoint(psk.endpoint, want)?;
        let setup = match role {
            Role::Source => TlsSetup::PskClient(Arc::new(PskClient::new(&psk).map_err(generic)?)),
            Role::Destination => {
                let authz = resolve_authz(authz, &p.tls_authz)?;
                TlsSetup::PskServer(Arc::new(PskServer::new(&psk, authz).map_err(generic)?))
            }
        };
        Ok(Some(setup))
    }
}

/// The setup of x509 credentials `creds` in `role`.
fn x509_setup(
    creds: &X509Creds,
    role: Role,
    want: Endpoint,
    p: &Parameters,
    authz: Option<Option<TlsObject>>,
) -> Result<TlsSetup, QmpError> {
    check_endpoint(creds.endpoint, want)?;
    Ok(match role {
        Role::Source => TlsSetup::Client(Arc::new(TlsClient {
            config: creds.client_config().map_err(generic)?,
            hostname: (!p.tls_hostname.is_empty()).then(|| p.tls_hostname.clone()),
            verify_peer: creds.verify_peer,
            creds_id: creds.id.clone(),
        })),
        Role::Destination => TlsSetup::Server(Arc::new(TlsServer {
            config: creds.server_config().map_err(generic)?,
            authz: resolve_authz(authz, &p.tls_authz)?,
            verify_peer: creds.verify_peer,
            creds_id: creds.id.clone(),
        })),
    })
}

/// `tls-authz` (looked up as `found`, None when unset): the identity it allows.
fn resolve_authz(found: Option<Option<TlsObject>>, id: &str) -> Result<Option<String>, QmpError> {
    match found {
        None => Ok(None),
        Some(Some(TlsObject::Authz(z))) => Ok(Some(z.identity.clone())),
        Some(None) => Err(QmpError::generic(format!(
            "Cannot find QAuthZ object ID {id}"
        ))),
        Some(Some(_)) => Err(QmpError::generic(format!(
            "Object '{id}' is not a QAuthZ subclass"
        ))),
    }
}

/// QEMU's `qcrypto_tls_creds_check_endpoint`.
fn check_endpoint(have: Endpoint, want: Endpoint) -> Result<(), QmpError> {
    if have != want {
        return Err(QmpError::generic(format!(
            "Expected TLS credentials for a {} endpoint",
            want.as_str()
        )));
    }
    Ok(())
}

#[cfg(test)]
#[path = "objects_tests.rs"]
mod tests;
