//! Helper-to-helper TLS over socket pairs, with certificates made by rcgen in each test.

mod failures;
mod measure;
mod openssl;
mod psk;

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
