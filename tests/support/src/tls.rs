//! TLS test credentials and the QMP commands that install them. One `Pki` per test: a CA,
//! a second CA, and server/client certificate directories laid out with QEMU's file names
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem` / `client-cert.pem`,
//! `client-key.pem`), plus a PSK directory (`keys.psk`). QEMU and the helper take the same
//! `object-add` and `migrate-set-parameters`, so the helpers here work on either end.
//!
//! Facts measured on QEMU 10.0 and 7.2 (GnuTLS), /work/briefs/dn-format.txt:
//! - QEMU refuses at `object-add` a server certificate that is expired or not yet valid,
//!   and its own certificate when `ca-cert.pem` did not sign it; a peer that loads such a
//!   certificate anyway is needed to see a client reject it.
//! - The DN `authz-simple` compares is the certificate's subject in ASN.1 order, "," with no
//!   space, a comma in a value escaped as "\,": [`CLIENT_DN`].

use std::path::{Path, PathBuf};

use qemu_migration_helper::client::{ClientError, HelperClient};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use serde_json::{json, Value};
use time::{Duration, OffsetDateTime};

use crate::util::TempDir;

/// The client certificate's subject as QEMU (GnuTLS) prints and compares it for
/// `authz-simple`: the fields in certificate order, a comma inside `O` escaped.
pub const CLIENT_DN: &str =
    "C=GB,ST=Greater London,L=London,O=Acme\\, Inc.,OU=Migration QA,CN=qemu client";
/// The name every good server certificate is valid for (also 127.0.0.1 and ::1).
pub const HOSTNAME: &str = "localhost";
/// The PSK user in `keys.psk` (QEMU's default username).
pub const PSK_USER: &str = "qemu";

/// Which server certificate directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCert {
    /// Signed by the CA, valid now, for localhost, 127.0.0.1 and ::1.
    Good,
    /// Valid until yesterday.
    Expired,
    /// Valid from tomorrow.
    NotYetValid,
    /// Valid, but only for `elsewhere.example`.
    WrongHost,
    /// Signed by the second CA (its `ca-cert.pem` is that CA, so QEMU loads it): a client
    /// trusting the first CA rejects it.
    OtherCa,
}

impl ServerCert {
    pub const ALL: [ServerCert; 5] = [
        ServerCert::Good,
        ServerCert::Expired,
        ServerCert::NotYetValid,
        ServerCert::WrongHost,
        ServerCert::OtherCa,
    ];

    fn dir_name(self) -> &'static str {
        match self {
            ServerCert::Good => "server",
            ServerCert::Expired => "server-expired",
            ServerCert::NotYetValid => "server-not-yet-valid",
            ServerCert::WrongHost => "server-wrong-host",
            ServerCert::OtherCa => "server-other-ca",
        }
    }
}

/// Certificates and keys for one test, in a directory removed on drop.
pub struct Pki {
    dir: TempDir,
    /// Every private key written (PEM), to check that no log holds key material.
    keys: Vec<String>,
}

/// countryName "GB" as a PrintableString, as openssl writes it: rcgen's default,
/// UTF8String, is printed by GnuTLS as "C=#0c024742" (the DER in hex).
fn country() -> DnValue {
    DnValue::PrintableString("GB".try_into().expect("a printable string"))
}

fn key_pair() -> KeyPair {
    KeyPair::generate().expect("generate a key pair")
}

fn validity(p: &mut CertificateParams, from_days: i64, to_days: i64) {
    let now = OffsetDateTime::now_utc();
    p.not_before = now + Duration::days(from_days);
    p.not_after = now + Duration::days(to_days);
}

/// A self-signed CA named `cn`.
fn make_ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CountryName, country());
    p.distinguished_name
        .push(DnType::OrganizationName, "QMH tests");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, -1, 30);
    let key = key_pair();
    let cert = p.self_signed(&key).expect("self-sign the CA");
    (cert.pem(), Issuer::new(p, key))
}

/// A leaf certificate (server or client) signed by `issuer`; its PEM and key PEM.
fn make_leaf(
    issuer: &Issuer<'_, KeyPair>,
    dn: &[(DnType, &str)],
    sans: &[&str],
    server: bool,
    (from_days, to_days): (i64, i64),
) -> (String, String) {
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("subject alt names");
    p.distinguished_name = DistinguishedName::new();
    for (ty, v) in dn {
        if *ty == DnType::CountryName {
            p.distinguished_name.push(DnType::CountryName, country());
        } else {
            p.distinguished_name.push(ty.clone(), *v);
        }
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, from_days, to_days);
    let key = key_pair();
    let cert = p.signed_by(&key, issuer).expect("sign the leaf");
    (cert.pem(), key.serialize_pem())
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl Pki {
    /// Generates every directory (a few ms: ECDSA P-256 keys).
    pub fn new() -> Pki {
        let dir = TempDir::new("qmh-pki");
        let mut keys = Vec::new();
        let (ca_pem, ca) = make_ca("QMH test CA");
        let (ca2_pem, ca2) = make_ca("QMH other CA");
        let server_dn = [
            (DnType::CountryName, "GB"),
            (DnType::OrganizationName, "QMH tests"),
            (DnType::CommonName, HOSTNAME),
        ];
        let good_sans = [HOSTNAME, "127.0.0.1", "::1"];
        for which in ServerCert::ALL {
            let (issuer, ca_text) = match which {
                ServerCert::OtherCa => (&ca2, &ca2_pem),
                _ => (&ca, &ca_pem),
            };
            let (sans, days): (&[&str], _) = match which {
                ServerCert::Good | ServerCert::OtherCa => (&good_sans, (-1, 10)),
                ServerCert::Expired => (&good_sans, (-10, -1)),
                ServerCert::NotYetValid => (&good_sans, (1, 10)),
                ServerCert::WrongHost => (&["elsewhere.example"], (-1, 10)),
            };
            let dn: &[(DnType, &str)] = if which == ServerCert::WrongHost {
                &[(DnType::CommonName, "elsewhere.example")]
            } else {
                &server_dn
            };
            let (cert, key) = make_leaf(issuer, dn, sans, true, days);
            let d = dir.join(which.dir_name());
            std::fs::create_dir(&d).expect("server dir");
            write(&d.join("ca-cert.pem"), ca_text);
            write(&d.join("server-cert.pem"), &cert);
            write(&d.join("server-key.pem"), &key);
            keys.push(key);
        }
        // The client: every DN field QEMU prints, and a comma in O (see CLIENT_DN).
        let client_dn = [
            (DnType::CountryName, "GB"),
            (DnType::StateOrProvinceName, "Greater London"),
            (DnType::LocalityName, "London"),
            (DnType::OrganizationName, "Acme, Inc."),
            (DnType::OrganizationalUnitName, "Migration QA"),
            (DnType::CommonName, "qemu client"),
        ];
        let (cert, key) = make_leaf(&ca, &client_dn, &[], false, (-1, 10));
        let d = dir.join("client");
        std::fs::create_dir(&d).expect("client dir");
        write(&d.join("ca-cert.pem"), &ca_pem);
        write(&d.join("client-cert.pem"), &cert);
        write(&d.join("client-key.pem"), &key);
        keys.push(key);

        let d = dir.join("psk");
        std::fs::create_dir(&d).expect("psk dir");
        let psk: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + 11) as u8))
            .collect();
        write(&d.join("keys.psk"), &format!("{PSK_USER}:{psk}\n"));
        keys.push(psk);
        Pki { dir, keys }
    }

    pub fn server_dir(&self, which: ServerCert) -> PathBuf {
        self.dir.join(which.dir_name())
    }

    pub fn client_dir(&self) -> PathBuf {
        self.dir.join("client")
    }

    pub fn psk_dir(&self) -> PathBuf {
        self.dir.join("psk")
    }

    /// Pieces of every private key written (the base64 lines of the PEM keys, the PSK):
    /// none may appear in a log.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        for k in &self.keys {
            if k.contains("-----BEGIN") {
                // Whole base64 lines: no accidental match in a log, and any leak of a key
                // leaks its lines.
                out.extend(
                    k.lines()
                        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                        .map(str::to_string),
                );
            } else {
                out.push(k.clone());
            }
        }
        out
    }

    /// Panics when `log` holds any piece of key material.
    pub fn assert_no_secrets(&self, log: &str, what: &str) {
        for s in self.secrets() {
            assert!(
                !log.contains(&s),
                "{what}: the log holds key material ({}...)",
                &s[..8]
            );
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// `object-add tls-creds-x509` (QEMU and helper alike).
pub fn add_x509(
    c: &mut HelperClient,
    id: &str,
    dir: &Path,
    endpoint: &str,
    verify_peer: bool,
) -> Result<Value, ClientError> {
    c.execute(
        "object-add",
        json!({
            "qom-type": "tls-creds-x509",
            "id": id,
            "dir": dir.display().to_string(),
            "endpoint": endpoint,
            "verify-peer": verify_peer,
        }),
    )
}

/// `object-add tls-creds-psk`; `username` only on a client.
pub fn add_psk(
    c: &mut HelperClient,
    id: &str,
    dir: &Path,
    endpoint: &str,
    username: Option<&str>,
) -> Result<Value, ClientError> {
    let mut args = json!({
        "qom-type": "tls-creds-psk",
        "id": id,
        "dir": dir.display().to_string(),
        "endpoint": endpoint,
    });
    if let Some(u) = username {
        args["username"] = json!(u);
    }
    c.execute("object-add", args)
}

/// `object-add authz-simple` allowing `identity`.
pub fn add_authz(c: &mut HelperClient, id: &str, identity: &str) -> Result<Value, ClientError> {
    c.execute(
        "object-add",
        json!({"qom-type": "authz-simple", "id": id, "identity": identity}),
    )
}

/// `migrate-set-parameters` tls-creds, and tls-hostname / tls-authz when given.
pub fn set_tls(
    c: &mut HelperClient,
    creds: &str,
    hostname: Option<&str>,
    authz: Option<&str>,
) -> Result<(), ClientError> {
    let mut p = json!({ "tls-creds": creds });
    if let Some(h) = hostname {
        p["tls-hostname"] = json!(h);
    }
    if let Some(a) = authz {
        p["tls-authz"] = json!(a);
    }
    c.set_parameters(p)
}

/// A TLS source (QEMU or helper): x509 client credentials from `dir` as `tls0`, checking
/// the server against [`HOSTNAME`] (needed over fd: and unix:).
pub fn tls_source(c: &mut HelperClient, dir: &Path) {
    add_x509(c, "tls0", dir, "client", true).expect("object-add tls-creds-x509 (client)");
    set_tls(c, "tls0", Some(HOSTNAME), None).expect("migrate-set-parameters tls-creds");
}

/// A TLS destination (QEMU or helper): x509 server credentials from `dir` as `tls0`, and
/// with `authz` an `authz-simple` `auth0` allowing that identity.
pub fn tls_destination(c: &mut HelperClient, dir: &Path, authz: Option<&str>) {
    add_x509(c, "tls0", dir, "server", true).expect("object-add tls-creds-x509 (server)");
    if let Some(identity) = authz {
        add_authz(c, "auth0", identity).expect("object-add authz-simple");
    }
    set_tls(c, "tls0", None, authz.map(|_| "auth0")).expect("migrate-set-parameters tls-creds");
}
