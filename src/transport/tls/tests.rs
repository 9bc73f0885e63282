//! Helper-to-helper TLS over socket pairs, with certificates made by rcgen in each test.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use vm_memory::VolatileSlice;

use super::*;
use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::memory::page::{GuestPage, IoVecs};
use crate::transport::{wait_fd, Never, Woke};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let der = params.self_signed(&key).unwrap().der().clone();
    Ca { params, key, der }
}

struct Leaf {
    der: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn leaf(ca: &Ca, dn: &[(DnType, DnValue)], names: &[&str], server: bool, expired: bool) -> Leaf {
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    for (t, v) in dn {
        p.distinguished_name.push(t.clone(), v.clone());
    }
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(1999, 1, 1);
        p.not_after = rcgen::date_time_ymd(2000, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let der = p.signed_by(&key, &issuer).unwrap().der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Leaf { der, key }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Ca) -> rustls::RootCertStore {
    let mut r = rustls::RootCertStore::empty();
    r.add(ca.der.clone()).unwrap();
    r
}

const CLIENT_DN: &str = "C=GB,ST=London,O=Acme,CN=client";

/// As QEMU's tests make them: countryName a PrintableString (X.520), the rest UTF-8.
fn client_dn() -> Vec<(DnType, DnValue)> {
    vec![
        (DnType::CountryName, printable("GB")),
        (DnType::StateOrProvinceName, "London".into()),
        (DnType::OrganizationName, "Acme".into()),
        (DnType::CommonName, "client".into()),
    ]
}

fn printable(s: &str) -> DnValue {
    DnValue::PrintableString(s.try_into().unwrap())
}

fn cn(s: &str) -> Vec<(DnType, DnValue)> {
    vec![(DnType::CommonName, s.into())]
}

fn client_setup(trust: &Ca, cert: Leaf, hostname: Option<&str>) -> TlsSetup {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(trust))
        .with_client_auth_cert(vec![cert.der], cert.key)
        .unwrap();
    c.enable_secret_extraction = true;
    c.resumption = rustls::client::Resumption::disabled();
    TlsSetup::Client(Arc::new(TlsClient {
        config: Arc::new(c),
        hostname: hostname.map(str::to_string),
        verify_peer: true,
        creds_id: "tls0".into(),
    }))
}

fn server_setup(trust: &Ca, cert: Leaf, authz: Option<&str>) -> TlsSetup {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(trust)),
        provider(),
    )
    .build()
    .unwrap();
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.der], cert.key)
        .unwrap();
    c.enable_secret_extraction = true;
    // As creds.rs: a ticket the source never reads would make its close a reset.
    c.send_tls13_tickets = 0;
    TlsSetup::Server(Arc::new(TlsServer {
        config: Arc::new(c),
        authz: authz.map(str::to_string),
        verify_peer: true,
        creds_id: "tls0".into(),
    }))
}

/// A CA, and client and server setups it signed.
fn setups() -> (TlsSetup, TlsSetup) {
    let ca = ca("Test CA");
    let s = leaf(&ca, &cn("server"), &["localhost"], true, false);
    let c = leaf(&ca, &client_dn(), &[], false, false);
    (
        client_setup(&ca, c, Some("localhost")),
        server_setup(&ca, s, Some(CLIENT_DN)),
    )
}

fn unix_pair() -> (Channel, Channel) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        Channel::from_unix(a, "client-chan".into()),
        Channel::from_unix(b, "server-chan".into()),
    )
}

const LIMIT: Option<Duration> = Some(Duration::from_secs(20));

/// Both handshakes, the server's in a thread.
fn connect(
    client: &TlsSetup,
    server: &TlsSetup,
) -> (Result<Channel, TlsError>, Result<Channel, TlsError>) {
    let (a, b) = unix_pair();
    let server = server.clone();
    let t = std::thread::spawn(move || {
        let never = CancelToken::new().unwrap();
        server.secure(b, None, &never, LIMIT)
    });
    let never = CancelToken::new().unwrap();
    let c = client.secure(a, None, &never, LIMIT);
    if c.is_err() {
        // The server may wait for a flight that never comes: the client's end is gone, so
        // its read returns.
    }
    (c, t.join().unwrap())
}

fn ok_pair() -> (Channel, Channel) {
    let (c, s) = setups();
    let (c, s) = connect(&c, &s);
    (c.unwrap(), s.unwrap())
}

fn read_all(c: &Channel, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let k = c.read(&mut v[got..]).unwrap();
        assert!(k > 0, "early EOF after {got} of {n}");
        got += k;
    }
    v
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn handshake_both_roles_reports_suite_and_peer_dn() {
    let (c, s) = ok_pair();
    let ci = c.tls_info().unwrap();
    let si = s.tls_info().unwrap();
    assert_eq!(ci.endpoint, Endpoint::Client);
    assert_eq!(si.endpoint, Endpoint::Server);
    assert_eq!(ci.protocol, "TLSv1.3");
    assert!(ci.cipher.starts_with("TLS13_"), "{}", ci.cipher);
    assert_eq!(ci.cipher, si.cipher);
    assert_eq!(si.peer_dn.as_deref(), Some(CLIENT_DN));
    assert_eq!(ci.peer_dn.as_deref(), Some("CN=server"));
    c.write_all(b"QEVM").unwrap();
    assert_eq!(read_all(&s, 4), b"QEVM");
    s.write_all(b"back").unwrap();
    assert_eq!(read_all(&c, 4), b"back");
}

#[test]
fn data_both_ways_at_once_through_a_return_path_clone() {
    let (c, s) = ok_pair();
    let c_rp = c.try_clone("client-rp").unwrap();
    let s_rp = s.try_clone("server-rp").unwrap();
    const N: usize = 8 << 20;
    let up = pattern(N, 1);
    let down = pattern(N, 7);
    let down2 = down.clone();
    // The destination writes its return path while it reads the main stream, and the
    // source reads the return path while it writes: four threads, two halves each.
    let w_dest = std::thread::spawn(move || {
        for chunk in down2.chunks(100_000) {
            s_rp.write_all(chunk).unwrap();
        }
    });
    let r_src = std::thread::spawn(move || read_all(&c_rp, N));
    let up2 = up.clone();
    let w_src = std::thread::spawn(move || {
        let mut bufs: Vec<std::io::IoSlice<'_>> =
            up2.chunks(5000).map(std::io::IoSlice::new).collect();
        for b in bufs.chunks_mut(300) {
            c.write_all_vectored(b).unwrap();
        }
    });
    assert!(read_all(&s, N) == up);
    assert!(r_src.join().unwrap() == down);
    w_dest.join().unwrap();
    w_src.join().unwrap();
}

/// Guest "pages" backed by a test buffer.
fn pages(buf: &mut [u8]) -> Vec<GuestPage<'_>> {
    let vs = VolatileSlice::from(buf);
    (0..vs.len() / TARGET_PAGE_SIZE)
        .map(|i| GuestPage::new(vs.subslice(i * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE).unwrap()))
        .collect()
}

#[test]
fn sixty_four_mib_of_guest_pages_through_iovecs() {
    let (c, s) = ok_pair();
    const N: usize = 64 << 20;
    let mut src = pattern(N, 3);
    let expect = src.clone();
    let header = b"packet header".to_vec();
    let t = std::thread::spawn(move || {
        let ps = pages(&mut src);
        for group in ps.chunks(128) {
            let mut iov = IoVecs::with_capacity(129);
            iov.push_bytes(&header);
            for p in group {
                iov.push_page(*p);
            }
            c.write_all_iovecs(&mut iov).unwrap();
            assert!(iov.is_empty());
        }
        c
    });
    let mut dst = vec![0u8; N];
    {
        let ps = pages(&mut dst);
        for group in ps.chunks(128) {
            assert_eq!(read_all(&s, 13), b"packet header");
            let mut iov = IoVecs::with_capacity(128);
            for p in group {
                iov.push_page_to_fill(*p);
            }
            s.read_exact_iovecs(&mut iov).unwrap();
            assert!(iov.is_empty());
        }
    }
    assert!(dst == expect, "the pages arrived changed");
    drop(t.join().unwrap());
    // The writer is gone without close_notify: a short read is UnexpectedEof.
    let mut one = vec![0u8; TARGET_PAGE_SIZE];
    let ps = pages(&mut one);
    let mut iov = IoVecs::with_capacity(1);
    iov.push_page_to_fill(ps[0]);
    let e = s.read_exact_iovecs(&mut iov).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
}

#[test]
fn read_ready_returns_only_what_arrived() {
    let (c, s) = ok_pair();
    let mut buf = [0u8; 64];
    assert_eq!(s.read_ready(&mut buf).unwrap(), 0);
    c.write_all(b"ready").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < 5 {
        let woke = wait_fd(
            s.fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
            &Never,
            Some(deadline),
        );
        assert_eq!(woke.unwrap(), Woke::Ready);
        let n = s.read_ready(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"ready");
    assert_eq!(s.read_ready(&mut buf).unwrap(), 0);
}

#[test]
fn close_notify_ends_the_stream_and_premature_eof_is_strict_or_not() {
    // close_notify: a clean end, strict or not.
    let (c, s) = ok_pair();
    s.set_tls_strict_eof(true);
    c.write_all(b"last").unwrap();
    c.close_notify().unwrap();
    assert_eq!(read_all(&s, 4), b"last");
    let mut buf = [0u8; 8];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    let e = c.write_all(b"more").unwrap_err();
    assert!(e.to_string().contains("after close_notify"), "{e}");

    // No close_notify, relaxed (the default): a plain EOF, as clear text.
    let (c, s) = ok_pair();
    drop(c);
    assert_eq!(s.read(&mut buf).unwrap(), 0);

    // No close_notify, strict: an error that says so.
    let (c, s) = ok_pair();
    s.set_tls_strict_eof(true);
    drop(c);
    let e = s.read(&mut buf).unwrap_err();
    assert!(
        e.to_string()
            .contains("without close_notify (premature termination)"),
        "{e}"
    );
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
}

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

#[test]
fn key_updates_both_ways_keep_the_stream() {
    let (c, s) = ok_pair();
    c.write_all(b"before").unwrap();
    c.tls
        .as_ref()
        .unwrap()
        .request_key_update(&c.tls_io())
        .unwrap();
    c.write_all(b"after").unwrap();
    assert_eq!(read_all(&s, 11), b"beforeafter");
    // The server was asked for an update in return: its next write sends it first.
    s.write_all(b"reply").unwrap();
    assert_eq!(read_all(&c, 5), b"reply");
    // Many records under the new keys, both ways (a writer thread: they exceed the socket
    // buffer).
    let big = pattern(1 << 20, 9);
    let c_w = c.try_clone("c-w").unwrap();
    let b2 = big.clone();
    let t = std::thread::spawn(move || c_w.write_all(&b2).unwrap());
    assert!(read_all(&s, big.len()) == big);
    t.join().unwrap();
    let s_w = s.try_clone("s-w").unwrap();
    let b2 = big.clone();
    let t = std::thread::spawn(move || {
        s_w.tls
            .as_ref()
            .unwrap()
            .request_key_update(&s_w.tls_io())
            .unwrap();
        s_w.write_all(&b2).unwrap()
    });
    assert!(read_all(&c, big.len()) == big);
    t.join().unwrap();
}

#[test]
fn dn_format_escapes_specials() {
    let ca = ca("CA");
    let c = leaf(
        &ca,
        &[
            (DnType::OrganizationName, "Acme, Inc.".into()),
            (DnType::CommonName, " a+b ".into()),
        ],
        &[],
        false,
        false,
    );
    assert_eq!(
        dn::distinguished_name(c.der.as_ref()).as_deref(),
        Some("O=Acme\\, Inc.,CN=\\ a\\+b\\ ")
    );
    assert_eq!(dn::distinguished_name(b"not a certificate"), None);
    // tst's measurement (/work/briefs/dn-format.txt): QEMU 10.0 and 7.2 print this.
    let qemu = [
        (DnType::CountryName, printable("GB")),
        (DnType::StateOrProvinceName, "Greater London".into()),
        (DnType::LocalityName, "London".into()),
        (DnType::OrganizationName, "Acme, Inc.".into()),
        (DnType::OrganizationalUnitName, "Migration QA".into()),
        (DnType::CommonName, "qemu client".into()),
    ];
    let c = leaf(&ca, &qemu, &[], false, false);
    assert_eq!(
        dn::distinguished_name(c.der.as_ref()).as_deref(),
        Some("C=GB,ST=Greater London,L=London,O=Acme\\, Inc.,OU=Migration QA,CN=qemu client")
    );
    // A UTF8String countryName (rcgen's default): GnuTLS, and so QEMU, print its DER.
    let mut utf8 = qemu.to_vec();
    utf8[0] = (DnType::CountryName, "GB".into());
    let c = leaf(&ca, &utf8, &[], false, false);
    let dn = dn::distinguished_name(c.der.as_ref()).unwrap();
    assert!(dn.starts_with("C=#0c024742,ST=Greater London,"), "{dn}");
}

/// Throughput of the record layer: one writer thread sealing guest pages, one reader
/// opening them into guest pages, over a Unix socket pair. Run with
/// `cargo test --profile ci --lib tls::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn throughput() {
    const TOTAL: usize = 4 << 30;
    const BUF: usize = 64 << 20;
    for tls in [false, true] {
        let (c, s) = if tls { ok_pair() } else { unix_pair() };
        let start = Instant::now();
        let t = std::thread::spawn(move || {
            let mut src = pattern(BUF, 5);
            let ps = pages(&mut src);
            for _ in 0..TOTAL / BUF {
                for group in ps.chunks(128) {
                    let mut iov = IoVecs::with_capacity(128);
                    for p in group {
                        iov.push_page(*p);
                    }
                    c.write_all_iovecs(&mut iov).unwrap();
                }
            }
        });
        let mut dst = vec![0u8; BUF];
        let ps = pages(&mut dst);
        for _ in 0..TOTAL / BUF {
            for group in ps.chunks(128) {
                let mut iov = IoVecs::with_capacity(128);
                for p in group {
                    iov.push_page_to_fill(*p);
                }
                s.read_exact_iovecs(&mut iov).unwrap();
            }
        }
        t.join().unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{}: {:.2} GB/s",
            if tls { "TLS" } else { "clear" },
            TOTAL as f64 / secs / 1e9
        );
    }
}

/// The record cipher alone, single-threaded: the ceiling of the record layer.
#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn cipher_throughput() {
    use rustls::crypto::cipher::{AeadKey, Iv, OutboundChunks, OutboundPlainMessage};
    let suites = rustls::crypto::ring::default_provider().cipher_suites;
    let data = pattern(1 << 14, 1);
    for s in suites {
        #[allow(irrefutable_let_patterns)]
        let rustls::SupportedCipherSuite::Tls13(t) = s
        else {
            continue;
        };
        if t.aead_alg.key_len() != 32 {
            continue;
        }
        let mut enc = t
            .aead_alg
            .encrypter(AeadKey::from([7u8; 32]), Iv::from([1u8; 12]));
        let n = 20_000u64;
        let start = Instant::now();
        for seq in 0..n {
            let msg = OutboundPlainMessage {
                typ: rustls::ContentType::ApplicationData,
                version: rustls::ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(&data),
            };
            let r = enc.encrypt(msg, seq).unwrap();
            std::hint::black_box(r.encode());
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:?} seal: {:.2} GB/s",
            s.suite(),
            n as f64 * data.len() as f64 / secs / 1e9
        );
    }
}

#[test]
fn over_tcp_the_uri_host_is_the_name_checked() {
    let ca = ca("CA");
    let run = |san: &str| {
        let s = leaf(&ca, &cn("server"), &[san], true, false);
        let c = leaf(&ca, &client_dn(), &[], false, false);
        let server = server_setup(&ca, s, None);
        let client = client_setup(&ca, c, None);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = Uri::Tcp(l.local_addr().unwrap().to_string());
        let t = std::thread::spawn(move || {
            let (sock, _) = l.accept().unwrap();
            let ch = Channel::from_tcp(sock, "tcp-in".into());
            server.secure(ch, None, &CancelToken::new().unwrap(), LIMIT)
        });
        let never = CancelToken::new().unwrap();
        let ch = Channel::connect(&uri, |_| None, &never).unwrap();
        let r = client.secure(ch, Some(&uri), &never, LIMIT);
        (r, t.join().unwrap())
    };
    let (c, s) = run("127.0.0.1");
    let (c, s) = (c.unwrap(), s.unwrap());
    c.write_all(b"over tcp").unwrap();
    assert_eq!(read_all(&s, 8), b"over tcp");
    let (c, _) = run("elsewhere.example");
    let e = c.err().unwrap().to_string();
    assert!(
        e.contains("Certificate does not match the hostname 127.0.0.1"),
        "{e}"
    );
}

#[test]
fn shutdown_unblocks_a_tls_reader_and_socket_timeouts_still_apply() {
    let (c, s) = ok_pair();
    let s2 = s.try_clone("s2").unwrap();
    let t = std::thread::spawn(move || s2.read(&mut [0u8; 16]));
    std::thread::sleep(Duration::from_millis(100));
    s.shutdown();
    assert_eq!(t.join().unwrap().unwrap(), 0);
    drop(c);

    let (_c, s) = ok_pair();
    s.set_timeouts(Some(Duration::from_millis(200)));
    let e = s.read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(
        e.to_string().contains("no data for link-timeout (200 ms)"),
        "{e}"
    );
}

/// Whether the `openssl` command runs (tests/install-deps.sh installs it); says SKIP if not.
fn have_openssl(test: &str) -> bool {
    let ok = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "SKIP {test}: the openssl command is missing (tests/install-deps.sh installs it)"
        );
    }
    ok
}

/// The record layer against a TLS stack that is not rustls: `openssl s_server`, which
/// also sends KeyUpdates on request ("K": update and ask for one back).
#[test]
fn interop_with_openssl_s_server() {
    if !have_openssl("interop_with_openssl_s_server") {
        return;
    }
    use std::io::{BufRead, Write};
    use std::process::{Command, Stdio};
    let ca = ca("CA");
    let s = leaf(&ca, &cn("server"), &["127.0.0.1"], true, false);
    let c = leaf(&ca, &client_dn(), &[], false, false);
    let dir = pem_dir(&ca, &s, "ossl");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("openssl")
        .args(["s_server", "-tls1_3", "-naccept", "1", "-Verify", "1"])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(dir.join("cert.pem"))
        .arg("-key")
        .arg(dir.join("key.pem"))
        .arg("-CAfile")
        .arg(dir.join("ca.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let uri = Uri::Tcp(format!("127.0.0.1:{port}"));
    let never = CancelToken::new().unwrap();
    // s_server's "ACCEPT" sits in its buffered stdout: try until it listens.
    let start = Instant::now();
    let ch = loop {
        match Channel::connect(&uri, |_| None, &never) {
            Ok(ch) => break ch,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let client = client_setup(&ca, c, None);
    let ch = client.secure(ch, Some(&uri), &never, LIMIT).unwrap();
    ch.write_all(b"hello from the helper\n").unwrap();
    let mut line = String::new();
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("hello from the helper"))
    {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "s_server exited: {lines:?}"
        );
        lines.push(line.clone());
    }
    let mut stdin = child.stdin.take().unwrap();
    // s_server takes a command only as a whole read of its stdin: give it its own.
    stdin.write_all(b"K\n").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(b"hello from openssl\n").unwrap();
    stdin.flush().unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("hello from openssl") {
        let mut b = [0u8; 256];
        let n = ch.read(&mut b).unwrap();
        assert!(n > 0, "EOF from s_server");
        got.extend_from_slice(&b[..n]);
    }
    // Our KeyUpdate in return goes first, then data under the new key.
    ch.write_all(b"after the key update\n").unwrap();
    while !lines
        .iter()
        .any(|l: &String| l.contains("after the key update"))
    {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "s_server exited: {lines:?}"
        );
        lines.push(line.clone());
    }
    ch.close_notify().unwrap();
    drop(stdin);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Writes `cert`, its key and the CA as PEM files into a fresh directory.
fn pem_dir(ca: &Ca, cert: &Leaf, tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("qmh-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = |tag: &str, der: &[u8]| {
        let b64 = base64_encode(der);
        let mut out = format!("-----BEGIN {tag}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {tag}-----\n"));
        out
    };
    std::fs::write(dir.join("ca.pem"), pem("CERTIFICATE", ca.der.as_ref())).unwrap();
    std::fs::write(dir.join("cert.pem"), pem("CERTIFICATE", cert.der.as_ref())).unwrap();
    std::fs::write(
        dir.join("key.pem"),
        pem("PRIVATE KEY", cert.key.secret_der()),
    )
    .unwrap();
    dir
}

/// A TLS 1.2-only peer, either side: the error says TLS 1.3 is what is missing.
#[test]
fn a_tls12_only_peer_is_named() {
    if !have_openssl("a_tls12_only_peer_is_named") {
        return;
    }
    use std::process::{Command, Stdio};
    let ca = ca("CA");
    let s = leaf(&ca, &cn("server"), &["127.0.0.1"], true, false);
    let dir = pem_dir(&ca, &s, "tls12");
    // The helper as the client, openssl as a TLS 1.2 server.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let mut child = Command::new("openssl")
        .args(["s_server", "-tls1_2", "-naccept", "1"])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(dir.join("cert.pem"))
        .arg("-key")
        .arg(dir.join("key.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let uri = Uri::Tcp(format!("127.0.0.1:{port}"));
    let never = CancelToken::new().unwrap();
    let start = Instant::now();
    let ch = loop {
        match Channel::connect(&uri, |_| None, &never) {
            Ok(ch) => break ch,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let c = leaf(&ca, &client_dn(), &[], false, false);
    let e = client_setup(&ca, c, None)
        .secure(ch, Some(&uri), &never, LIMIT)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("TLS 1.3"), "{e}");
    let _ = child.kill();
    let _ = child.wait();
    // The helper as the server, openssl as a TLS 1.2 client.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-tls1_2",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (sock, _) = l.accept().unwrap();
    let ch = Channel::from_tcp(sock, "tcp-in".into());
    let s = leaf(&ca, &cn("server"), &["127.0.0.1"], true, false);
    let e = server_setup(&ca, s, None)
        .secure(ch, None, &never, LIMIT)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("TLS 1.3"), "{e}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_sender_updates_its_key_before_the_cipher_limit() {
    let (c, s) = ok_pair();
    let (ct, st) = (c.tls.as_ref().unwrap(), s.tls.as_ref().unwrap());
    c.write_all(b"one").unwrap();
    assert_eq!(read_all(&s, 3), b"one");
    // Both ends one record short of the limit (as after 2^23 records).
    let n = session::KEY_UPDATE_AFTER - 1 - st.rx_seq();
    ct.skip_tx_records(n);
    st.skip_rx_records(n);
    // "two" is the last record under the first key; "three" follows a KeyUpdate.
    c.write_all(b"two").unwrap();
    c.write_all(b"three").unwrap();
    assert_eq!(read_all(&s, 8), b"twothree");
    assert_eq!(st.rx_seq(), 1, "the receiver switched keys");
}

/// A QEMU source writes "QEVM" as soon as its handshake is done: the destination may read
/// it together with the client's Finished, and rustls then decrypts it during the
/// handshake. It must reach the first read.
#[test]
fn data_that_came_with_the_last_handshake_flight_is_kept() {
    use std::io::{Read, Write};
    let (client, server) = setups();
    let (a, mut a_peer) = UnixStream::pair().unwrap();
    let (mut b_peer, b) = UnixStream::pair().unwrap();
    let server_t = std::thread::spawn(move || {
        let ch = Channel::from_unix(b, "server-chan".into());
        server.secure(ch, None, &CancelToken::new().unwrap(), LIMIT)
    });
    let mut b_in = b_peer.try_clone().unwrap();
    let mut a_out = a_peer.try_clone().unwrap();
    // Server to client: as it comes.
    let relay = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            match b_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if a_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let client_t = std::thread::spawn(move || {
        let ch = Channel::from_unix(a, "client-chan".into());
        let ch = client
            .secure(ch, None, &CancelToken::new().unwrap(), LIMIT)
            .unwrap();
        ch.write_all(b"QEVM early").unwrap();
        ch
    });
    // Client to server: the ClientHello at once, the rest held until the client is done
    // and has written, then all in one write.
    let mut hdr = [0u8; 5];
    a_peer.read_exact(&mut hdr).unwrap();
    let mut hello = vec![0u8; u16::from_be_bytes([hdr[3], hdr[4]]) as usize];
    a_peer.read_exact(&mut hello).unwrap();
    b_peer.write_all(&hdr).unwrap();
    b_peer.write_all(&hello).unwrap();
    let c = client_t.join().unwrap();
    a_peer.set_nonblocking(true).unwrap();
    let mut rest = Vec::new();
    let _ = a_peer.read_to_end(&mut rest);
    assert!(
        rest.len() > 40,
        "the Finished and the data: {} bytes",
        rest.len()
    );
    b_peer.write_all(&rest).unwrap();
    let s = server_t.join().unwrap().unwrap();
    assert_eq!(read_all(&s, 10), b"QEVM early");
    drop(s);
    drop(b_peer);
    relay.join().unwrap();
    drop(c);
}
