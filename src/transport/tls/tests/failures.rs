//! Handshakes and records that must fail: silent, clear-text and forged peers, wrong
//! certificates, names and identities.

use super::*;

#[test]
fn a_silent_peer_times_out_and_a_cancel_ends_the_handshake() {
    let (_, s) = setups();
    let (_a, b) = unix_pair();
    let never = CancelToken::new().unwrap();
    let start = Instant::now();
    let e = s
        .secure(b, None, &never, Some(Duration::from_millis(200)))
        .err()
        .unwrap();
    assert!(matches!(e, TlsError::Timeout { .. }), "{e}");
    assert!(
        e.to_string().contains("did not complete within 200ms"),
        "{e}"
    );
    assert!(start.elapsed() >= Duration::from_millis(200));

    let (c, _) = setups();
    let (a, _b) = unix_pair();
    let cancel = CancelToken::new().unwrap();
    let c2 = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        c2.cancel();
    });
    let e = c.secure(a, None, &cancel, None).err().unwrap();
    assert!(matches!(e, TlsError::Cancelled { .. }), "{e}");
    assert!(e.to_string().contains("cancelled"), "{e}");
    t.join().unwrap();
}

#[test]
fn a_clear_text_peer_is_named() {
    let (c, s) = setups();
    // A source without TLS sends "QEVM" to a TLS destination.
    let (a, b) = unix_pair();
    a.write_all(b"QEVM\0\0\0\x03").unwrap();
    let never = CancelToken::new().unwrap();
    let e = s.secure(b, None, &never, LIMIT).err().unwrap();
    assert!(matches!(e, TlsError::ClearText { .. }), "{e}");
    assert!(e.to_string().contains("clear text"), "{e}");
    // A destination without TLS answers a TLS source with a multifd packet.
    let (a, b) = unix_pair();
    b.write_all(&0x1122_3344u32.to_be_bytes()).unwrap();
    let e = c.secure(a, None, &never, LIMIT).err().unwrap();
    assert!(matches!(e, TlsError::ClearText { .. }), "{e}");
}

/// The server's session on a fresh socket whose other end the test writes raw bytes into.
fn raw_into_server(s: &Channel) -> (UnixStream, Channel) {
    let (p, q) = UnixStream::pair().unwrap();
    let mut ch = Channel::from_unix(q, "forged".into());
    ch.tls = s.tls.clone();
    (p, ch)
}

fn raw_read(ch: &Channel, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let mut got = 0;
    while got < n {
        got += nix::unistd::read(ch.fd.as_raw_fd(), &mut v[got..]).unwrap();
    }
    v
}

#[test]
fn forged_and_corrupted_records_fail_cleanly() {
    use std::io::Write;
    // A header with a length over the limit: refused before anything is sized by it.
    let (_c, s) = ok_pair();
    let (mut p, ch) = raw_into_server(&s);
    p.write_all(&[23, 3, 3, 0xff, 0xff, 1, 2, 3]).unwrap();
    let mut buf = [0u8; 16];
    let e = ch.read(&mut buf).unwrap_err();
    assert!(e.to_string().contains("record of 65535 bytes"), "{e}");
    // The error sticks.
    let e = ch.read(&mut buf).unwrap_err();
    assert!(e.to_string().contains("65535"), "{e}");

    // A wrong content type.
    let (_c, s) = ok_pair();
    let (mut p, ch) = raw_into_server(&s);
    p.write_all(b"QEVM\0\0\0\x03").unwrap();
    let e = ch.read(&mut buf).unwrap_err();
    assert!(e.to_string().contains("content type 81"), "{e}");

    // One flipped ciphertext byte: bad record MAC.
    let (c, s) = ok_pair();
    c.write_all(b"twelve bytes").unwrap();
    let mut rec = raw_read(&s, 5 + 12 + 1 + 16);
    assert_eq!(&rec[..3], &[23, 3, 3]);
    rec[9] ^= 0x40;
    let (mut p, ch) = raw_into_server(&s);
    p.write_all(&rec).unwrap();
    let e = ch.read(&mut buf).unwrap_err();
    assert!(e.to_string().contains("bad record MAC"), "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);

    // A record cut by the peer's close.
    let (c, s) = ok_pair();
    c.write_all(b"twelve bytes").unwrap();
    let rec = raw_read(&s, 5 + 12 + 1 + 16);
    let (mut p, ch) = raw_into_server(&s);
    p.write_all(&rec[..20]).unwrap();
    drop(p);
    let e = ch.read(&mut buf).unwrap_err();
    assert!(
        e.to_string().contains("in the middle of a TLS record"),
        "{e}"
    );
}

fn handshake_errors(client: TlsSetup, server: TlsSetup) -> (String, String) {
    let (c, s) = connect(&client, &server);
    (
        c.err().map(|e| e.to_string()).unwrap_or_default(),
        s.err().map(|e| e.to_string()).unwrap_or_default(),
    )
}

#[test]
fn an_unknown_ca_is_refused_with_qemus_words() {
    let ca1 = ca("CA one");
    let ca2 = ca("CA two");
    let s = leaf(&ca2, &cn("server"), &["localhost"], true, false);
    let c = leaf(&ca1, &client_dn(), &[], false, false);
    let (ce, se) = handshake_errors(
        client_setup(&ca1, c, Some("localhost")),
        server_setup(&ca1, s, None),
    );
    assert!(
        ce.contains("The certificate hasn't got a known issuer"),
        "{ce}"
    );
    assert!(se.contains("the peer sent the TLS alert UnknownCA"), "{se}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let ca = ca("CA");
    let s = leaf(&ca, &cn("server"), &["localhost"], true, true);
    let c = leaf(&ca, &client_dn(), &[], false, false);
    let (ce, _) = handshake_errors(
        client_setup(&ca, c, Some("localhost")),
        server_setup(&ca, s, None),
    );
    assert!(ce.contains("The certificate has expired"), "{ce}");
    // And the client's, checked by the server.
    let s = leaf(&ca, &cn("server"), &["localhost"], true, false);
    let c = leaf(&ca, &client_dn(), &[], false, true);
    let (cr, sr) = connect(
        &client_setup(&ca, c, Some("localhost")),
        &server_setup(&ca, s, None),
    );
    let se = sr.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(se.contains("The certificate has expired"), "{se}");
    // TLS 1.3: the client is done before the server checks its certificate; it learns of
    // the refusal from the alert, at its first read.
    if let Ok(c) = cr {
        let e = c.read(&mut [0u8; 8]).unwrap_err();
        assert!(e.to_string().contains("the peer sent the TLS alert"), "{e}");
    }
}

#[test]
fn a_hostname_mismatch_is_refused() {
    let ca = ca("CA");
    let s = leaf(&ca, &cn("server"), &["localhost"], true, false);
    let c = leaf(&ca, &client_dn(), &[], false, false);
    let (ce, _) = handshake_errors(
        client_setup(&ca, c, Some("dest.example.com")),
        server_setup(&ca, s, None),
    );
    assert!(
        ce.contains("Certificate does not match the hostname dest.example.com"),
        "{ce}"
    );
}

#[test]
fn the_client_dn_must_match_tls_authz() {
    let ca = ca("CA");
    let s = leaf(&ca, &cn("server"), &["localhost"], true, false);
    let c = leaf(&ca, &client_dn(), &[], false, false);
    let (_, se) = handshake_errors(
        client_setup(&ca, c, Some("localhost")),
        server_setup(&ca, s, Some("CN=someone else")),
    );
    assert!(
        se.contains(&format!("TLS x509 authz check for {CLIENT_DN} is denied")),
        "{se}"
    );
}

#[test]
fn no_hostname_with_verify_peer_and_the_hostname_from_a_tcp_uri() {
    let (c, _) = setups();
    let TlsSetup::Client(cl) = &c else {
        panic!("a client setup")
    };
    let no_name = TlsSetup::Client(Arc::new(TlsClient {
        config: cl.config.clone(),
        hostname: None,
        verify_peer: true,
        creds_id: "tls0".into(),
    }));
    let (a, _b) = unix_pair();
    let never = CancelToken::new().unwrap();
    let uri = Uri::Unix("/tmp/x".into());
    let e = no_name.secure(a, Some(&uri), &never, LIMIT).err().unwrap();
    assert!(
        e.to_string()
            .contains("No hostname for certificate validation"),
        "{e}"
    );
    assert_eq!(handshake::tcp_host("[::1]:4444").as_deref(), Some("::1"));
    assert_eq!(
        handshake::tcp_host("dest.example.com:4444").as_deref(),
        Some("dest.example.com")
    );
    assert_eq!(handshake::tcp_host(":4444"), None);
}

#[test]
fn tls_needs_a_socket() {
    let (c, _) = setups();
    let f = tempfile_channel();
    let never = CancelToken::new().unwrap();
    let e = c.secure(f, None, &never, LIMIT).err().unwrap();
    assert!(matches!(e, TlsError::NotSocket { .. }), "{e}");
}

fn tempfile_channel() -> Channel {
    let p = std::env::temp_dir().join(format!("qmh-tls-{}", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    let _ = std::fs::remove_file(&p);
    Channel::from_file(f, "file".into())
}
