//! Test certificates made with rcgen: a CA, a server and a client certificate signed by it,
//! written as QEMU's credentials directories.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SerialNumber,
};

/// A CA that signs certificates.
pub(crate) struct TestCa {
    pub(crate) pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> TestCa {
        TestCa::with(name, |_| {})
    }

    /// A CA whose parameters `tweak` changes before it signs itself.
    pub(crate) fn with(name: &str, tweak: impl FnOnce(&mut CertificateParams)) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        tweak(&mut p);
        let pem = p.self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf certificate for `cn` (SAN localhost) and its key, both PEM; `tweak` changes
    /// the parameters.
    pub(crate) fn leaf(
        &self,
        cn: &str,
        server: bool,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        tweak(&mut p);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A CRL signed by this CA that revokes the certificates with these serial numbers.
    pub(crate) fn crl(&self, revoked: &[u64]) -> String {
        let p = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&n| rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from(n),
                    revocation_time: rcgen::date_time_ymd(2021, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        p.signed_by(&self.issuer).unwrap().pem().unwrap()
    }
}

/// A fresh directory under the temporary directory, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("qmh-creds-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub(crate) fn write(&self, name: &str, content: impl AsRef<[u8]>) {
        std::fs::write(self.0.join(name), content).unwrap();
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn display(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server directory (ca-cert, server-cert, server-key) and a client one (ca-cert,
/// client-cert, client-key) from one CA.
pub(crate) fn server_and_client_dirs(ca: &TestCa) -> (TempDir, TempDir) {
    let server = TempDir::new("server");
    server.write("ca-cert.pem", &ca.pem);
    let (cert, key) = ca.leaf("server", true, |_| {});
    server.write("server-cert.pem", cert);
    server.write("server-key.pem", key);
    let client = TempDir::new("client");
    client.write("ca-cert.pem", &ca.pem);
    let (cert, key) = ca.leaf("client", false, |_| {});
    client.write("client-cert.pem", cert);
    client.write("client-key.pem", key);
    (server, client)
}
