//! TLS-PSK: the key schedule against RFC 8448's vectors, helper client <-> helper server
//! over socket pairs (data both ways, key updates, the failures), and against
//! `openssl s_server -psk` (a KeyUpdate from another stack).

use super::openssl::{connect_when_listening, have_openssl};
use super::*;
use crate::transport::tls::creds::testpki::TempDir;
use crate::transport::tls::creds::{PskCreds, PskOptions, PSK_FILE};
use crate::transport::tls::psk::{printable, PskClient, PskServer};
use crate::transport::tls::schedule::{next_secret, traffic_keys, Schedule};
use rustls::crypto::ring::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::crypto::tls13::OkmBlock;
use rustls::ConnectionTrafficSecrets;

const KEY: &str = "0b30557a9fc4e90e33587da2c7ec11365b80a5caef14395e83a8cdf2173c6186";
const OTHER_KEY: &str = "0b30557a9fc4e90e33587da2c7ec11365b80a5caef14395e83a8cdf2173c6187";

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    crate::transport::tls::creds::decode_hex(s.as_bytes()).unwrap()
}

fn aes128(s: ConnectionTrafficSecrets) -> (Vec<u8>, Vec<u8>) {
    match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            (key.as_ref().to_vec(), iv.as_ref().to_vec())
        }
        _ => panic!("not AES-128-GCM"),
    }
}

/// RFC 8448 section 3 (a simple 1-RTT handshake, TLS_AES_128_GCM_SHA256): the record key
/// and IV of each direction from its application traffic secret.
#[test]
fn traffic_keys_match_rfc_8448() {
    let suite = TLS13_AES_128_GCM_SHA256.tls13().unwrap();
    let cases = [
        (
            "9e 40 64 6c e7 9a 7f 9d c0 5a f8 88 9b ce 65 52 87 5a fa 0b 06 df 00 87 f7 92 eb b7 c1 75 04 a5",
            "17 42 2d da 59 6e d5 d9 ac d8 90 e3 c6 3f 50 51",
            "5b 78 92 3d ee 08 57 90 33 e5 23 d9",
        ),
        (
            "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43",
            "9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56",
            "cf 78 2b 88 dd 83 54 9a ad f1 e9 84",
        ),
    ];
    for (secret, key, iv) in cases {
        let got = aes128(traffic_keys(suite, &OkmBlock::new(&unhex(secret))).unwrap());
        assert_eq!(got, (unhex(key), unhex(iv)), "secret {secret}");
    }
    // The schedule hands out the same first keys, each direction its own.
    let (c, s) = (unhex(cases[0].0), unhex(cases[1].0));
    let sched = Schedule::new(suite, &c, &s).unwrap();
    assert_eq!(aes128(sched.current(true).unwrap()).0, unhex(cases[0].1));
    assert_eq!(aes128(sched.current(false).unwrap()).0, unhex(cases[1].1));
    // A secret of the wrong length is refused.
    assert!(Schedule::new(suite, &c[..31], &s).is_err());
}

/// A KeyUpdate moves one direction only, to HKDF-Expand-Label(secret, "traffic upd", "",
/// 32); the update's own keys come from the new secret. (OpenSSL checks the same chain in
/// `key_update_against_openssl_s_server`.)
#[test]
fn a_key_update_moves_one_direction_along_its_chain() {
    let suite = TLS13_AES_128_GCM_SHA256.tls13().unwrap();
    let c = unhex(KEY);
    let s = unhex(OTHER_KEY);
    let mut sched = Schedule::new(suite, &c, &s).unwrap();
    let rx0 = aes128(sched.current(false).unwrap());
    let tx1 = aes128(sched.update(true).unwrap());
    let next = next_secret(suite, &OkmBlock::new(&c));
    assert_eq!(next.as_ref().len(), 32);
    assert_ne!(next.as_ref(), &c[..]);
    assert_eq!(tx1, aes128(traffic_keys(suite, &next).unwrap()));
    assert_eq!(aes128(sched.current(false).unwrap()), rx0);
    let tx2 = aes128(sched.update(true).unwrap());
    assert_eq!(
        tx2,
        aes128(traffic_keys(suite, &next_secret(suite, &next)).unwrap())
    );
    // ChaCha20-Poly1305 (QEMU's first SHA-256 suite) takes its 32-byte key the same way.
    let chacha = TLS13_CHACHA20_POLY1305_SHA256.tls13().unwrap();
    assert!(matches!(
        traffic_keys(chacha, &OkmBlock::new(&c)).unwrap(),
        ConnectionTrafficSecrets::Chacha20Poly1305 { .. }
    ));
}

/// A `keys.psk` of `lines` and the PSK setups made from it: a client as `user`, a server
/// with `authz`.
struct Psk {
    dir: TempDir,
}

impl Psk {
    fn new(lines: &str) -> Psk {
        let dir = TempDir::new("psk-hs");
        dir.write(PSK_FILE, lines);
        Psk { dir }
    }

    fn creds(&self, endpoint: Endpoint, user: Option<&str>) -> PskCreds {
        PskCreds::load(PskOptions {
            id: "psk0".into(),
            dir: Some(self.dir.path().to_path_buf()),
            endpoint,
            username: user.map(str::to_string),
        })
        .unwrap()
    }

    fn client(&self, user: Option<&str>) -> TlsSetup {
        let c = self.creds(Endpoint::Client, user);
        TlsSetup::PskClient(Arc::new(PskClient::new(&c).unwrap()))
    }

    fn server(&self, authz: Option<&str>) -> TlsSetup {
        let c = Arc::new(self.creds(Endpoint::Server, None));
        TlsSetup::PskServer(Arc::new(
            PskServer::new(&c, authz.map(str::to_string)).unwrap(),
        ))
    }

    fn file(&self) -> String {
        format!("{}/keys.psk", self.dir.display())
    }
}

fn psk_pair() -> (Channel, Channel) {
    let p = Psk::new(&format!("alice:00ff\nqemu:{KEY}\n"));
    let (c, s) = connect(&p.client(None), &p.server(Some("qemu")));
    (c.unwrap(), s.unwrap())
}

#[test]
fn psk_handshake_reports_suite_and_username_and_carries_data_both_ways() {
    let (c, s) = psk_pair();
    let ci = c.tls_info().unwrap();
    let si = s.tls_info().unwrap();
    assert_eq!(
        (ci.endpoint, si.endpoint),
        (Endpoint::Client, Endpoint::Server)
    );
    assert_eq!(ci.protocol, "TLSv1.3");
    // The server prefers AES-128-GCM; named as rustls names it on the x509 path.
    assert_eq!(ci.cipher, "TLS13_AES_128_GCM_SHA256");
    assert_eq!(si.cipher, ci.cipher);
    assert_eq!(si.peer_dn.as_deref(), Some("qemu"));
    assert_eq!(ci.peer_dn.as_deref(), Some("qemu"));
    // The client's first bytes may come with its Finished: they survive the handoff.
    c.write_all(b"QEVM").unwrap();
    assert_eq!(read_all(&s, 4), b"QEVM");
    s.write_all(b"back").unwrap();
    assert_eq!(read_all(&c, 4), b"back");
    let big = pattern(4 << 20, 3);
    let c_w = c.try_clone("c-w").unwrap();
    let b2 = big.clone();
    let t = std::thread::spawn(move || c_w.write_all(&b2).unwrap());
    assert!(read_all(&s, big.len()) == big);
    t.join().unwrap();
    c.close_notify().unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

/// Key updates both ways under the helper's own schedule (the PSK path), then many
/// records under the new keys, and the update rustls would do at the cipher limit.
#[test]
fn psk_key_updates_both_ways_keep_the_stream() {
    let (c, s) = psk_pair();
    c.write_all(b"before").unwrap();
    let ct = c.tls.as_ref().unwrap();
    ct.request_key_update(&c.tls_io()).unwrap();
    c.write_all(b"after").unwrap();
    assert_eq!(read_all(&s, 11), b"beforeafter");
    // The server was asked for one in return: it goes before its next record.
    s.write_all(b"reply").unwrap();
    assert_eq!(read_all(&c, 5), b"reply");
    let st = s.tls.as_ref().unwrap();
    st.request_key_update(&s.tls_io()).unwrap();
    s.write_all(b"again").unwrap();
    assert_eq!(read_all(&c, 5), b"again");
    c.write_all(b"ok").unwrap();
    assert_eq!(read_all(&s, 2), b"ok");
    // The sender's own update before the AES-GCM limit.
    ct.skip_tx_records(session::KEY_UPDATE_AFTER - 1);
    st.skip_rx_records(session::KEY_UPDATE_AFTER - 1);
    c.write_all(b"xy").unwrap();
    c.write_all(b"z").unwrap();
    assert_eq!(read_all(&s, 3), b"xyz");
    assert!(st.rx_seq() < 4, "the receiver did not follow the update");
}

/// Runs both handshakes expecting failure; the two reasons.
fn both_fail(client: &TlsSetup, server: &TlsSetup) -> (String, String) {
    let (c, s) = connect(client, server);
    let c = c
        .err()
        .expect("the client's handshake succeeded")
        .to_string();
    let s = s
        .err()
        .expect("the server's handshake succeeded")
        .to_string();
    eprintln!("client: {c}\nserver: {s}");
    (c, s)
}

#[test]
fn a_wrong_key_fails_both_ends_naming_the_key() {
    let good = Psk::new(&format!("qemu:{KEY}\n"));
    let bad = Psk::new(&format!("qemu:{OTHER_KEY}\n"));
    let (c, s) = both_fail(&bad.client(None), &good.server(None));
    assert!(
        s.contains("pre-shared key for qemu is not the one in") && s.contains(&good.file()),
        "{s}"
    );
    assert!(s.contains("binder"), "{s}");
    assert!(
        c.contains("refused this end's pre-shared key")
            && (c.contains("IllegalParameter") || c.contains("DecryptError")),
        "{c}"
    );
}

#[test]
fn an_unknown_username_fails_naming_it() {
    let p = Psk::new(&format!("qemu:{KEY}\nbob:{KEY}\n"));
    let only_qemu = Psk::new(&format!("qemu:{KEY}\n"));
    let (c, s) = both_fail(&p.client(Some("bob")), &only_qemu.server(None));
    assert!(
        s.contains(&format!(
            "Username bob not found in PSK file {}",
            only_qemu.file()
        )),
        "{s}"
    );
    assert!(c.contains("no key for bob"), "{c}");
    // A line whose key is not hex is named as such.
    let broken = Psk::new("bob:xyz0\n");
    let (_, s) = both_fail(&p.client(Some("bob")), &broken.server(None));
    assert!(
        s.contains("the key of bob in") && s.contains("not hexadecimal"),
        "{s}"
    );
}

#[test]
fn psk_authz_checks_the_username() {
    let p = Psk::new(&format!("qemu:{KEY}\nbob:{KEY}\n"));
    let (c, s) = connect(&p.client(Some("bob")), &p.server(Some("qemu")));
    let e = s.err().expect("authz passed").to_string();
    assert!(e.contains("TLS PSK authz check for bob is denied"), "{e}");
    drop(c);
    let (c, s) = connect(&p.client(Some("bob")), &p.server(Some("bob")));
    assert!(c.is_ok() && s.is_ok());
}

/// x509 on one end and PSK on the other: both fail, the PSK end saying which is which.
#[test]
fn x509_against_psk_fails_naming_the_mismatch() {
    let p = Psk::new(&format!("qemu:{KEY}\n"));
    let (x509_client, x509_server) = setups();
    let (c, s) = both_fail(&x509_client, &p.server(None));
    assert!(s.contains("offered no pre-shared key"), "{s}");
    assert!(c.contains("tls-creds-psk"), "{c}");
    let (c, _) = both_fail(&p.client(None), &x509_server);
    assert!(c.contains("presented a certificate"), "{c}");
    assert!(c.contains("tls-creds-x509"), "{c}");
}

/// A client's username reaches messages and logs with its control characters escaped.
#[test]
fn usernames_are_printed_safely() {
    assert_eq!(printable(b"qemu"), "qemu");
    assert_eq!(printable("h\u{e9}l\u{e8}ne".as_bytes()), "h\u{e9}l\u{e8}ne");
    assert_eq!(
        printable(b"a\nINFO forged\x1b[0m"),
        "a\\nINFO forged\\u{1b}[0m"
    );
    assert_eq!(printable(b"\xff"), "\u{fffd}");
}

/// Clear text toward a PSK server is named as such, as on the x509 path.
#[test]
fn psk_server_names_a_clear_text_peer() {
    let p = Psk::new(&format!("qemu:{KEY}\n"));
    let (a, b) = unix_pair();
    let server = p.server(None);
    let t = std::thread::spawn(move || {
        let never = CancelToken::new().unwrap();
        server.secure(b, None, &never, LIMIT)
    });
    a.write_all(b"QEVM\0\0\0\x03").unwrap();
    let e = t.join().unwrap().err().unwrap();
    assert!(matches!(e, TlsError::ClearText { .. }), "{e}");
}

/// The helper as a PSK client of `openssl s_server -psk` (another TLS 1.3 stack): data
/// both ways, and s_server's KeyUpdate ("K": update and ask for one back) followed.
#[test]
fn key_update_against_openssl_s_server() {
    if !have_openssl("key_update_against_openssl_s_server") {
        return;
    }
    use std::io::{BufRead, Write};
    use std::process::{Command, Stdio};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("openssl")
        .args(["s_server", "-tls1_3", "-naccept", "1", "-nocert"])
        .args(["-psk", KEY, "-psk_identity", "qemu"])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let uri = Uri::Tcp(format!("127.0.0.1:{port}"));
    let never = CancelToken::new().unwrap();
    let ch = connect_when_listening(&uri, &never);
    let p = Psk::new(&format!("qemu:{KEY}\n"));
    let ch = p
        .client(None)
        .secure(ch, Some(&uri), &never, LIMIT)
        .unwrap();
    let mut lines: Vec<String> = Vec::new();
    let mut wait_line = |want: &str, lines: &mut Vec<String>| {
        while !lines.iter().any(|l| l.contains(want)) {
            let mut line = String::new();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "s_server exited: {lines:?}"
            );
            lines.push(line);
        }
    };
    ch.write_all(b"hello from the helper\n").unwrap();
    wait_line("hello from the helper", &mut lines);
    let mut stdin = child.stdin.take().unwrap();
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
    // Our KeyUpdate in return goes first, then data under the new key; then one of ours.
    ch.write_all(b"after the key update\n").unwrap();
    wait_line("after the key update", &mut lines);
    ch.tls
        .as_ref()
        .unwrap()
        .request_key_update(&ch.tls_io())
        .unwrap();
    ch.write_all(b"after our update\n").unwrap();
    wait_line("after our update", &mut lines);
    ch.close_notify().unwrap();
    drop(stdin);
    let _ = child.wait();
}
