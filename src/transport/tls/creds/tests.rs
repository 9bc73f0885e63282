use super::testpki::{server_and_client_dirs, TempDir, TestCa};
use super::*;
use rustls::CertificateError;

fn x509(dir: &TempDir, endpoint: Endpoint) -> X509Options {
    X509Options {
        id: "tls0".into(),
        dir: Some(dir.path().to_path_buf()),
        endpoint,
        verify_peer: true,
        sanity_check: true,
    }
}

fn err(r: Result<X509Creds, CredsError>) -> String {
    match r {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_good_pair_of_directories_loads_and_builds_tls13_configs() {
    let ca = TestCa::new("ca");
    let (server, client) = server_and_client_dirs(&ca);
    server.write(CA_CRL, ca.crl(&[]));
    let s = X509Creds::load(x509(&server, Endpoint::Server)).unwrap();
    assert!(s.has_certificate());
    assert_eq!(s.crls.len(), 1);
    let sc = s.server_config().unwrap();
    assert_eq!(sc.send_tls13_tickets, 0);
    assert!(sc.enable_secret_extraction);
    let c = X509Creds::load(x509(&client, Endpoint::Client)).unwrap();
    assert!(c.has_certificate());
    let cc = c.client_config().unwrap();
    assert!(cc.enable_secret_extraction);
    // Only TLS 1.3 suites (rustls is built without its tls12 feature, and the configs ask
    // for TLS 1.3 alone besides).
    assert!(cc
        .crypto_provider()
        .cipher_suites
        .iter()
        .all(|s| s.version() == &rustls::version::TLS13));
    // A client without certificate is fine (QEMU's client files are optional).
    std::fs::remove_file(client.path().join(CLIENT_CERT)).unwrap();
    let c = X509Creds::load(x509(&client, Endpoint::Client)).unwrap();
    assert!(!c.has_certificate());
    c.client_config().unwrap();
    // verify-peer off builds too (the any-certificate verifier).
    let mut o = x509(&client, Endpoint::Client);
    o.verify_peer = false;
    X509Creds::load(o).unwrap().client_config().unwrap();
}

/// Runs a handshake in memory between the two configurations.
fn handshake(
    s: Arc<ServerConfig>,
    c: Arc<ClientConfig>,
) -> Result<(rustls::ServerConnection, rustls::ClientConnection), rustls::Error> {
    let mut srv = rustls::ServerConnection::new(s)?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut cli = rustls::ClientConnection::new(c, name)?;
    while cli.is_handshaking() || srv.is_handshaking() {
        let mut buf = Vec::new();
        cli.write_tls(&mut buf).unwrap();
        srv.read_tls(&mut buf.as_slice()).unwrap();
        srv.process_new_packets()?;
        let mut buf = Vec::new();
        srv.write_tls(&mut buf).unwrap();
        cli.read_tls(&mut buf.as_slice()).unwrap();
        cli.process_new_packets()?;
    }
    Ok((srv, cli))
}

#[test]
fn handshake_between_the_two_configs_completes_in_tls13() {
    let ca = TestCa::new("ca");
    let (server, client) = server_and_client_dirs(&ca);
    let c = X509Creds::load(x509(&client, Endpoint::Client)).unwrap();
    for verify in [true, false] {
        let mut o = x509(&server, Endpoint::Server);
        o.verify_peer = verify;
        let s = X509Creds::load(o).unwrap();
        let (srv, cli) = handshake(s.server_config().unwrap(), c.client_config().unwrap()).unwrap();
        assert_eq!(
            cli.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        // The client certificate is asked for only with verify-peer.
        assert_eq!(srv.peer_certificates().is_some(), verify);
    }
    // A server certificate from another CA: refused with verify-peer, taken without.
    let other = TestCa::new("other");
    let (foreign, _) = server_and_client_dirs(&other);
    let mut o = x509(&foreign, Endpoint::Server);
    o.verify_peer = false;
    let s = X509Creds::load(o).unwrap().server_config().unwrap();
    let e = handshake(s.clone(), c.client_config().unwrap()).unwrap_err();
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{e:?}"
    );
    let mut o = x509(&client, Endpoint::Client);
    o.verify_peer = false;
    let any = X509Creds::load(o).unwrap().client_config().unwrap();
    handshake(s, any).unwrap();
}

#[test]
fn a_revoked_client_certificate_is_refused_by_the_server() {
    let ca = TestCa::new("ca");
    let (server, client) = server_and_client_dirs(&ca);
    let (cert, key) = ca.leaf("client", false, |p| {
        p.serial_number = Some(rcgen::SerialNumber::from(42u64))
    });
    client.write(CLIENT_CERT, cert);
    client.write(CLIENT_KEY, key);
    let c = X509Creds::load(x509(&client, Endpoint::Client)).unwrap();
    server.write(CA_CRL, ca.crl(&[7]));
    let s = X509Creds::load(x509(&server, Endpoint::Server)).unwrap();
    handshake(s.server_config().unwrap(), c.client_config().unwrap()).unwrap();
    server.write(CA_CRL, ca.crl(&[7, 42]));
    let s = X509Creds::load(x509(&server, Endpoint::Server)).unwrap();
    let e = handshake(s.server_config().unwrap(), c.client_config().unwrap()).unwrap_err();
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ),
        "{e:?}"
    );
}

#[test]
fn missing_files_are_reported_as_qemu_does() {
    let ca = TestCa::new("ca");
    let (server, client) = server_and_client_dirs(&ca);
    let d = server.display();
    for (file, endpoint, dir) in [
        (SERVER_KEY, Endpoint::Server, &server),
        (SERVER_CERT, Endpoint::Server, &server),
        (CA_CERT, Endpoint::Server, &server),
        (CA_CERT, Endpoint::Client, &client),
    ] {
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let e = err(X509Creds::load(x509(dir, endpoint)));
        assert_eq!(
            e,
            format!(
                "Unable to access credentials {}/{file}: No such file or directory",
                dir.display()
            )
        );
    }
    let mut o = x509(&server, Endpoint::Server);
    o.dir = None;
    assert_eq!(err(X509Creds::load(o)), "Missing 'dir' property value");
    assert!(d.starts_with('/'));
}

#[test]
fn garbage_and_oversized_files_fail_without_quoting_them() {
    let ca = TestCa::new("ca");
    let (server, _client) = server_and_client_dirs(&ca);
    let d = server.display();
    server.write(SERVER_KEY, "-----BEGIN PRIVATE KEY-----\nsecretsecret\n");
    let e = err(X509Creds::load(x509(&server, Endpoint::Server)));
    assert!(e.starts_with(&format!(
        "Cannot load certificate '{d}/server-cert.pem' & key '{d}/server-key.pem': "
    )));
    assert!(!e.contains("secret"), "{e}");
    // A key that does not match the certificate.
    let (_, other_key) = ca.leaf("other", true, |_| {});
    server.write(SERVER_KEY, other_key);
    let e = err(X509Creds::load(x509(&server, Endpoint::Server)));
    assert!(e.starts_with("Cannot load certificate"), "{e}");
    let (cert, key) = ca.leaf("server", true, |_| {});
    server.write(SERVER_KEY, key);
    server.write(SERVER_CERT, "not a certificate");
    assert_eq!(
        err(X509Creds::load(x509(&server, Endpoint::Server))),
        format!(
            "Unable to import server certificate {d}/server-cert.pem: no certificate found \
             (PEM 'CERTIFICATE')"
        )
    );
    server.write(SERVER_CERT, &cert);
    server.write(CA_CERT, "garbage");
    assert_eq!(
        err(X509Creds::load(x509(&server, Endpoint::Server))),
        format!("Unable to import CA certificate list {d}/ca-cert.pem")
    );
    // Sanity check off: the same garbage fails when it is loaded.
    let mut o = x509(&server, Endpoint::Server);
    o.sanity_check = false;
    assert!(err(X509Creds::load(o))
        .starts_with(&format!("Cannot load CA certificate '{d}/ca-cert.pem': ")));
    server.write(CA_CERT, &ca.pem);
    server.write(CA_CRL, "garbage");
    assert_eq!(
        err(X509Creds::load(x509(&server, Endpoint::Server))),
        format!("Cannot load CRL '{d}/ca-crl.pem': no CRL found (PEM 'X509 CRL')")
    );
    server.write(
        CA_CRL,
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    );
    assert!(err(X509Creds::load(x509(&server, Endpoint::Server)))
        .starts_with(&format!("Cannot load CRL '{d}/ca-crl.pem': ")));
    std::fs::remove_file(server.path().join(CA_CRL)).unwrap();
    // Bounded reads: a file over 1 MiB, and a device.
    server.write(CA_CERT, vec![b'A'; MAX_FILE_SIZE as usize + 1]);
    assert_eq!(
        err(X509Creds::load(x509(&server, Endpoint::Server))),
        format!("Cannot load CA cert list {d}/ca-cert.pem: larger than 1048576 bytes")
    );
    std::fs::remove_file(server.path().join(CA_CERT)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", server.path().join(CA_CERT)).unwrap();
    assert_eq!(
        err(X509Creds::load(x509(&server, Endpoint::Server))),
        format!("Cannot load CA cert list {d}/ca-cert.pem: not a regular file")
    );
}

#[test]
fn sanity_check_failures_use_qemu_messages() {
    let ca = TestCa::new("ca");
    let dir = TempDir::new("sanity");
    let d = dir.display();
    let load = |ca_pem: &str, (cert, key): (String, String)| {
        dir.write(CA_CERT, ca_pem);
        dir.write(SERVER_CERT, cert);
        dir.write(SERVER_KEY, key);
        err(X509Creds::load(x509(&dir, Endpoint::Server)))
    };
    let expired = ca.leaf("s", true, |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    assert_eq!(
        load(&ca.pem, expired),
        format!("The server certificate {d}/server-cert.pem has expired")
    );
    let future = ca.leaf("s", true, |p| {
        p.not_before = rcgen::date_time_ymd(2090, 1, 1);
        p.not_after = rcgen::date_time_ymd(2091, 1, 1);
    });
    assert_eq!(
        load(&ca.pem, future),
        format!("The server certificate {d}/server-cert.pem is not yet active")
    );
    let leaf_ca = ca.leaf("s", true, |p| {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    });
    assert_eq!(
        load(&ca.pem, leaf_ca),
        format!(
            "The certificate {d}/server-cert.pem basic constraints show a CA, but we need one \
             for a server"
        )
    );
    let client_only = ca.leaf("s", true, |p| {
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    });
    assert_eq!(
        load(&ca.pem, client_only),
        format!("Certificate {d}/server-cert.pem usage does not permit digital signature")
    );
    let not_ca = TestCa::with("ca", |p| p.is_ca = rcgen::IsCa::ExplicitNoCa);
    assert_eq!(
        load(&not_ca.pem, not_ca.leaf("s", true, |_| {})),
        format!("The certificate {d}/ca-cert.pem basic constraints do not show a CA")
    );
    let no_bc = TestCa::with("ca", |p| p.is_ca = rcgen::IsCa::NoCa);
    assert_eq!(
        load(&no_bc.pem, no_bc.leaf("s", true, |_| {})),
        format!("The certificate {d}/ca-cert.pem is missing basic constraints for a CA")
    );
    let no_sign = TestCa::with("ca", |p| {
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature]
    });
    assert_eq!(
        load(&no_sign.pem, no_sign.leaf("s", true, |_| {})),
        format!("Certificate {d}/ca-cert.pem usage does not permit certificate signing")
    );
    let other = TestCa::new("other");
    assert_eq!(
        load(&other.pem, ca.leaf("s", true, |_| {})),
        format!(
            "Our own certificate {d}/server-cert.pem failed validation against \
             {d}/ca-cert.pem: The certificate hasn't got a known issuer"
        )
    );
    // With sanity-check off, the foreign CA is not noticed at load.
    dir.write(CA_CERT, &other.pem);
    let mut o = x509(&dir, Endpoint::Server);
    o.sanity_check = false;
    assert!(X509Creds::load(o).is_ok());
}

#[test]
fn psk_files_are_checked_as_qemu_does() {
    let dir = TempDir::new("psk");
    let d = dir.display();
    let psk = |endpoint, username: Option<&str>| {
        PskCreds::load(PskOptions {
            id: "psk0".into(),
            dir: Some(dir.path().to_path_buf()),
            endpoint,
            username: username.map(str::to_string),
        })
        .map(|c| c.username)
        .map_err(|e| e.to_string())
    };
    assert_eq!(
        psk(Endpoint::Server, Some("a")),
        Err("username should not be set when endpoint=server".into())
    );
    assert_eq!(
        psk(Endpoint::Client, None),
        Err(format!(
            "Unable to access credentials {d}/keys.psk: No such file or directory"
        ))
    );
    dir.write(PSK_FILE, "alice:0123abcd\nqemu:zz\nbob:\n");
    assert_eq!(psk(Endpoint::Server, None), Ok(None));
    assert_eq!(
        psk(Endpoint::Client, Some("alice")),
        Ok(Some("alice".into()))
    );
    let e = psk(Endpoint::Client, None).unwrap_err();
    assert_eq!(
        e,
        format!(
            "Cannot set PSK client credentials: the key of qemu in {d}/keys.psk is not \
             hexadecimal (an even number of hex digits, at most 1024)"
        )
    );
    assert!(psk(Endpoint::Client, Some("bob")).is_err());
    assert_eq!(
        psk(Endpoint::Client, Some("carol")),
        Err(format!("Username carol not found in PSK file {d}/keys.psk"))
    );
    // "ali" is not "alice".
    assert!(psk(Endpoint::Client, Some("ali")).is_err());
}
