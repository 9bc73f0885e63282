//! The record layer against OpenSSL (`openssl s_server`/`s_client`): a second TLS stack.

use super::*;

/// Connects to an `openssl s_server` as soon as it listens (its "ACCEPT" sits in its
/// buffered stdout, so the test tries for up to 10 s).
pub(super) fn connect_when_listening(uri: &Uri, never: &CancelToken) -> Channel {
    let start = Instant::now();
    loop {
        match Channel::connect(uri, |_| None, never) {
            Ok(ch) => return ch,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the `openssl` command runs (tests/install-deps.sh installs it); says SKIP if not.
pub(super) fn have_openssl(test: &str) -> bool {
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
    let ch = connect_when_listening(&uri, &never);
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

/// Writes `cert`, its key and the CA as PEM files into a fresh directory.
fn pem_dir(ca: &Ca, cert: &Leaf, tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("qmh-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = |tag: &str, der: &[u8]| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
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
    let ch = connect_when_listening(&uri, &never);
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
