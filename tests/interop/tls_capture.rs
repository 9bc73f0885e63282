//! `analyze` on a capture of a TLS migration channel: a relay between two helpers copies
//! each direction to a file; `analyze` must say the file is TLS, name the cipher the
//! destination chose (in its ServerHello, the server-to-client capture) and the server name
//! the source asked for (its ClientHello), and count the encrypted bytes, most of the
//! migrated RAM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use support::helper::{helper_bin, HelperVm};
use support::migrate::{pass_ends, socketpair};
use support::tls::{tls_destination, tls_source, Pki, ServerCert, HOSTNAME};
use support::util::{assert_same_memory, fill_mixed, test_seed, TempDir, MIB};

const RAM: u64 = 32 * MIB;

/// Copies `from` to `to` until EOF, and into `tee`; then shuts `to` for writing.
fn relay(mut from: UnixStream, mut to: UnixStream, tee: PathBuf) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut file = std::fs::File::create(tee).expect("capture file");
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            file.write_all(&buf[..n]).expect("capture write");
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    })
}

fn analyze_json(path: &Path) -> Value {
    let out = Command::new(helper_bin())
        .arg("analyze")
        .arg(path)
        .arg("--json")
        .output()
        .expect("run analyze");
    assert!(
        out.status.success(),
        "analyze {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("analyze --json prints JSON")
}

#[test]
fn tls_capture_analyzed() {
    let test = "tls_capture_analyzed";
    let dir = TempDir::new("qmh-tls-capture");
    let pki = Pki::new();
    let mut s = HelperVm::spawn();
    let mut d = HelperVm::spawn();
    s.add_block("ram", RAM, false);
    d.add_block("ram", RAM, false);
    fill_mixed(&mut s.blocks[0].mem.map(), test_seed(test), 0.3);
    tls_source(&mut s.client, &pki.client_dir());
    tls_destination(&mut d.client, &pki.server_dir(ServerCert::Good), None);
    // source <-> (a | b) relay (c | d) <-> destination
    let (src_end, a) = socketpair();
    let (c, dst_end) = socketpair();
    let (a, c) = (UnixStream::from(a), UnixStream::from(c));
    let c2s = dir.join("to-destination.bin");
    let s2c = dir.join("to-source.bin");
    let t1 = relay(a.try_clone().unwrap(), c.try_clone().unwrap(), c2s.clone());
    let t2 = relay(c, a, s2c.clone());
    let (sfd, dfd) = (src_end, dst_end);
    pass_ends(&mut s.client, &mut d.client, "mig", (sfd, dfd));
    d.client
        .migrate_incoming("fd:mig")
        .expect("migrate-incoming");
    s.client.migrate("fd:mig").expect("migrate");
    s.wait(&["completed"], Duration::from_secs(60));
    d.wait(&["completed"], Duration::from_secs(60));
    assert_same_memory(&s.blocks[0].mem.map(), &d.blocks[0].mem.map(), test);
    drop((s, d));
    t1.join().unwrap();
    t2.join().unwrap();

    let to_dst = analyze_json(&c2s);
    let tls = &to_dst["tls"];
    assert!(tls.is_object(), "{test}: not reported as TLS: {to_dst}");
    let hello = &tls["hellos"][0];
    assert_eq!(hello["kind"], "ClientHello", "{test}: {to_dst}");
    assert_eq!(hello["server-name"], HOSTNAME, "{test}: {to_dst}");
    assert!(
        hello["versions"]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x == "TLSv1.3")),
        "{test}: {to_dst}"
    );
    let bytes = tls["encrypted-bytes"].as_u64().unwrap_or(0);
    assert!(
        bytes > RAM / 2,
        "{test}: {bytes} encrypted bytes toward the destination for {RAM} of RAM: {to_dst}"
    );
    assert!(tls["error"].is_null(), "{test}: {to_dst}");

    let to_src = analyze_json(&s2c);
    let hello = &to_src["tls"]["hellos"][0];
    assert_eq!(hello["kind"], "ServerHello", "{test}: {to_src}");
    assert_eq!(hello["protocol"], "TLSv1.3", "{test}: {to_src}");
    let cipher = hello["cipher-suites"][0].as_str().unwrap_or("");
    assert!(cipher.starts_with("TLS13_"), "{test}: {to_src}");

    // The text report says the same.
    let out = Command::new(helper_bin())
        .arg("analyze")
        .arg(&s2c)
        .output()
        .expect("run analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("TLS") && text.contains(cipher),
        "{test}: {text}"
    );
}
