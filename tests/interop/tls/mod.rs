//! TLS on the migration channels (issue 13): QEMU 10.0 and 7.2 <-> helper and helper <->
//! helper with x509 credentials (precopy, postcopy with a recovery over a fresh TLS socket,
//! multifd), the client's DN checked by `tls-authz`; RAM byte-identical. The failure cases
//! are in `failures`; `stub` is a TLS server that presents certificates QEMU refuses to
//! load (expired, not yet valid). Credentials: `support::tls`.
//!
//! Every helper here logs at debug level to a file, and no log may hold key material.

mod failures;
mod psk;
mod stub;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use qemu_migration_helper::client::HelperClient;
use support::end::End;
use support::helper::HelperVm;
use support::migrate::{recover_over_socketpair, start_fd_migration};
use support::qemu::{require_qemu, Qemu, QemuVm, VmOpts};
use support::tls::{tls_destination, tls_source, Pki, ServerCert, CLIENT_DN};
use support::uffd::{Readers, UffdGuest};
use support::util::{assert_same_memory, fill_mixed, test_seed, TempDir, GIB, MIB, PAGE_SIZE};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(120);

/// What runs an end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Qemu(Qemu),
    Helper,
}

/// One end of a test migration, with the helper's log file.
struct Peer {
    end: End,
    log: Option<PathBuf>,
    _dir: TempDir,
}

impl Peer {
    /// A source (RAM filled from `seed`, bandwidth unlimited) or a destination (fresh RAM)
    /// of `kind`; `None` (after a SKIP line) when that QEMU is missing.
    fn new(kind: Kind, source: bool, ram: u64, test: &str) -> Option<Peer> {
        let dir = TempDir::new("qmh-tls");
        let (end, log) = match kind {
            Kind::Qemu(q) => {
                require_qemu(q, test)?;
                let opts = if source {
                    VmOpts::default()
                } else {
                    VmOpts::incoming()
                };
                let mut vm = QemuVm::start(q, ram, &opts);
                if source {
                    vm.qmp()
                        .set_parameters(json!({"max-bandwidth": 10 * GIB}))
                        .expect("max-bandwidth");
                }
                (End::Qemu(vm), None)
            }
            Kind::Helper => {
                let log = dir.join("helper.log");
                let file = std::fs::File::create(&log).expect("log file");
                let mut h = HelperVm::spawn_on_socket(&["--log-level", "debug"], Stdio::from(file));
                h.add_block("ram", ram, false);
                if source {
                    h.client
                        .set_parameters(json!({"max-bandwidth": 0}))
                        .expect("max-bandwidth");
                }
                (End::Helper(h), Some(log))
            }
        };
        let p = Peer {
            end,
            log,
            _dir: dir,
        };
        if source {
            fill_mixed(&mut p.end.ram(), test_seed(test), 0.5);
        }
        Some(p)
    }

    fn log_text(&self) -> String {
        self.log
            .as_ref()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The helper's log holds none of `pki`'s keys (nothing to check on a QEMU).
    fn assert_no_secrets(&self, pki: &Pki, what: &str) {
        if self.log.is_some() {
            let log = self.log_text();
            assert!(
                !log.is_empty(),
                "{what}: the helper logged nothing at debug level"
            );
            pki.assert_no_secrets(&log, what);
        }
    }
}

/// A helper's `query-migrate` lists at least `min` channels that ran TLS 1.3 (its
/// `tls-channels`, not in QEMU's schema), and one named `named` when given: the migration
/// did not fall back to clear text. Nothing to check on a QEMU (it reports no such thing,
/// and its peer would have refused clear text).
fn assert_tls_channels(p: &Peer, info: &Value, min: usize, named: Option<&str>, what: &str) {
    if p.log.is_none() {
        return;
    }
    let chans = info["tls-channels"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no tls-channels in {info}"));
    assert!(
        chans.len() >= min,
        "{what}: {} TLS channels, want {min}: {info}",
        chans.len()
    );
    for c in chans {
        assert_eq!(c["protocol"], "TLSv1.3", "{what}: {c}");
        assert!(
            c["cipher"].as_str().is_some_and(|s| !s.is_empty()),
            "{what}: {c}"
        );
    }
    if let Some(n) = named {
        assert!(
            chans
                .iter()
                .any(|c| c["channel"].as_str().is_some_and(|s| s.contains(n))),
            "{what}: no TLS channel named like {n:?}: {info}"
        );
    }
}

/// A source of `src` and a destination of `dst` (a helper facing QEMU 7.2 speaks 7.2).
fn pair(src: Kind, dst: Kind, ram: u64, test: &str) -> Option<(Peer, Peer)> {
    let mut s = Peer::new(src, true, ram, test)?;
    let mut d = Peer::new(dst, false, ram, test)?;
    for (p, other) in [(&mut s, dst), (&mut d, src)] {
        if other == Kind::Qemu(Qemu::V72) && p.log.is_some() {
            p.end
                .client()
                .set_parameters(json!({"compat-version": "7.2"}))
                .expect("compat-version");
        }
    }
    Some((s, d))
}

/// Sets TLS up on a source's and a destination's QMP clients (QEMU's or a helper's).
type SetTls = fn(&Pki, &mut HelperClient, &mut HelperClient);

/// TLS on both ends: good server credentials on the destination (with `tls-authz` for the
/// test client's DN), client credentials on the source.
fn tls_both(pki: &Pki, s: &mut Peer, d: &mut Peer) {
    x509_both(pki, s.end.client(), d.end.client());
}

fn x509_both(pki: &Pki, s: &mut HelperClient, d: &mut HelperClient) {
    tls_source(s, &pki.client_dir());
    tls_destination(d, &pki.server_dir(ServerCert::Good), Some(CLIENT_DN));
}

/// Precopy over a socketpair with TLS and `tls-authz` on the destination; RAM compared.
fn precopy(src: Kind, dst: Kind, test: &str) {
    precopy_with(src, dst, test, x509_both);
}

fn precopy_with(src: Kind, dst: Kind, test: &str, set_tls: SetTls) {
    let Some((mut s, mut d)) = pair(src, dst, RAM, test) else {
        return;
    };
    let pki = Pki::new();
    set_tls(&pki, s.end.client(), d.end.client());
    let t0 = Instant::now();
    start_fd_migration(s.end.client(), d.end.client());
    let si = s.end.wait(&["completed"], TIMEOUT);
    let di = d.end.wait(&["completed"], TIMEOUT);
    eprintln!("{test}: {:?}\nsource {si}\ndestination {di}", t0.elapsed());
    assert_same_memory(&s.end.ram(), &d.end.ram(), test);
    assert_tls_channels(&s, &si, 1, Some("main"), test);
    assert_tls_channels(&d, &di, 1, Some("main"), test);
    s.assert_no_secrets(&pki, test);
    d.assert_no_secrets(&pki, test);
}

/// The test harness's own credentials against QEMU itself: `CLIENT_DN` is exactly the DN
/// QEMU's `tls-authz` compares, and QEMU takes the certificates the tests make.
#[test]
fn tls_qemu10_to_qemu10_authz() {
    precopy(
        Kind::Qemu(Qemu::V10),
        Kind::Qemu(Qemu::V10),
        "tls_qemu10_to_qemu10_authz",
    );
}

#[test]
fn tls_qemu72_to_qemu72_authz() {
    precopy(
        Kind::Qemu(Qemu::V72),
        Kind::Qemu(Qemu::V72),
        "tls_qemu72_to_qemu72_authz",
    );
}

#[test]
fn tls_qemu10_to_helper() {
    precopy(Kind::Qemu(Qemu::V10), Kind::Helper, "tls_qemu10_to_helper");
}

#[test]
fn tls_helper_to_qemu10() {
    precopy(Kind::Helper, Kind::Qemu(Qemu::V10), "tls_helper_to_qemu10");
}

#[test]
fn tls_qemu72_to_helper() {
    precopy(Kind::Qemu(Qemu::V72), Kind::Helper, "tls_qemu72_to_helper");
}

#[test]
fn tls_helper_to_qemu72() {
    precopy(Kind::Helper, Kind::Qemu(Qemu::V72), "tls_helper_to_qemu72");
}

#[test]
fn tls_helper_to_helper() {
    precopy(Kind::Helper, Kind::Helper, "tls_helper_to_helper");
}

/// With the return path on: the destination's answers travel the main channel's TLS
/// session back (the return path is a clone sharing it).
#[test]
fn tls_helper_to_helper_return_path() {
    let test = "tls_helper_to_helper_return_path";
    let Some((mut s, mut d)) = pair(Kind::Helper, Kind::Helper, RAM, test) else {
        return;
    };
    let pki = Pki::new();
    tls_both(&pki, &mut s, &mut d);
    for p in [&mut s, &mut d] {
        p.end
            .client()
            .set_capabilities(&[("return-path", true)])
            .expect("return-path");
    }
    start_fd_migration(s.end.client(), d.end.client());
    let si = s.end.wait(&["completed"], TIMEOUT);
    let di = d.end.wait(&["completed"], TIMEOUT);
    assert_same_memory(&s.end.ram(), &d.end.ram(), test);
    assert_tls_channels(&s, &si, 1, None, test);
    assert_tls_channels(&d, &di, 1, None, test);
}

// ---------------------------------------------------------------------------------------
// Multifd: every channel (main and each multifd one) runs its own handshake.
// ---------------------------------------------------------------------------------------

fn multifd(src: Kind, dst: Kind, test: &str) {
    multifd_with(src, dst, test, x509_both);
}

fn multifd_with(src: Kind, dst: Kind, test: &str, set_tls: SetTls) {
    let Some((mut s, mut d)) = pair(src, dst, RAM, test) else {
        return;
    };
    let pki = Pki::new();
    set_tls(&pki, s.end.client(), d.end.client());
    for p in [&mut s, &mut d] {
        let c = p.end.client();
        c.set_capabilities(&[("multifd", true)]).expect("multifd");
        c.set_parameters(json!({"multifd-channels": 2}))
            .expect("multifd-channels");
    }
    let dir = TempDir::new("qmh-tls-mfd");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    d.end
        .client()
        .migrate_incoming(&uri)
        .expect("migrate-incoming");
    s.end.client().migrate(&uri).expect("migrate");
    let si = s.end.wait(&["completed"], TIMEOUT);
    let di = d.end.wait(&["completed"], TIMEOUT);
    eprintln!("{test}: source {}\ndestination {}", si["ram"], di["ram"]);
    assert_same_memory(&s.end.ram(), &d.end.ram(), test);
    // Main and both multifd channels each ran their handshake.
    assert_tls_channels(&s, &si, 3, Some("multifd"), test);
    assert_tls_channels(&d, &di, 3, Some("multifd"), test);
    // The pages went over the multifd channels (QEMU's and the helper's ram stats alike).
    let info = if src == Kind::Helper { &si } else { &di };
    let mb = info["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
    if src == Kind::Helper || dst == Kind::Helper {
        assert!(mb >= PAGE_SIZE as u64, "{test}: multifd-bytes {mb}: {info}");
    }
    s.assert_no_secrets(&pki, test);
    d.assert_no_secrets(&pki, test);
}

#[test]
fn tls_helper_to_helper_multifd() {
    multifd(Kind::Helper, Kind::Helper, "tls_helper_to_helper_multifd");
}

#[test]
fn tls_qemu10_to_helper_multifd() {
    multifd(
        Kind::Qemu(Qemu::V10),
        Kind::Helper,
        "tls_qemu10_to_helper_multifd",
    );
}

#[test]
fn tls_helper_to_qemu10_multifd() {
    multifd(
        Kind::Helper,
        Kind::Qemu(Qemu::V10),
        "tls_helper_to_qemu10_multifd",
    );
}

// ---------------------------------------------------------------------------------------
// Postcopy, paused and recovered over a fresh socket: the recovery runs a new handshake.
// ---------------------------------------------------------------------------------------

fn wait_uffd(h: &mut HelperVm, guest: &mut UffdGuest, want: &[&str]) -> Value {
    match h.client.wait_for_status(want, TIMEOUT) {
        Ok(v) => v,
        Err(e) => {
            guest.release();
            panic!("helper {} did not reach {want:?}: {e}", h.pid());
        }
    }
}

/// `src` (helper or QEMU 10.0) -> helper destination on a userfaultfd guest, postcopy with
/// a slow push, reader threads faulting pages throughout; paused once with `migrate-pause`
/// on the source and recovered over a fresh socketpair; RAM compared at the end.
fn postcopy_recovery(src: Kind, test: &str) {
    postcopy_recovery_with(src, test, x509_both);
}

fn postcopy_recovery_with(src: Kind, test: &str, set_tls: SetTls) {
    let Some(mut s) = Peer::new(src, true, RAM, test) else {
        return;
    };
    let expected = Arc::new(s.end.ram().to_vec());
    let mut guest = UffdGuest::new(RAM);
    let dir = TempDir::new("qmh-tls-pc");
    let log = dir.join("helper.log");
    let file = std::fs::File::create(&log).expect("log file");
    let mut dst = HelperVm::spawn_on_socket(&["--log-level", "debug"], Stdio::from(file));
    guest.attach(&mut dst, "ram");
    if src == Kind::Qemu(Qemu::V72) {
        dst.client
            .set_parameters(json!({"compat-version": "7.2"}))
            .expect("compat-version");
    }
    let pki = Pki::new();
    set_tls(&pki, s.end.client(), &mut dst.client);
    s.end
        .client()
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("postcopy-ram");
    dst.client
        .set_capabilities(&[("postcopy-ram", true)])
        .expect("postcopy-ram");
    s.end
        .client()
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("bandwidth");
    start_fd_migration(s.end.client(), &mut dst.client);
    std::thread::sleep(Duration::from_millis(200));
    s.end.client().migrate_start_postcopy().expect("postcopy");
    wait_uffd(&mut dst, &mut guest, &["postcopy-active"]);
    let seed = test_seed(test);
    let readers = Readers::start_paced(&guest, expected.clone(), 2, seed, Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(200));

    s.end
        .client()
        .execute_oob("migrate-pause", json!({}))
        .or_else(|_| s.end.client().execute("migrate-pause", json!({})))
        .expect("migrate-pause");
    s.end.wait(&["postcopy-paused"], TIMEOUT);
    wait_uffd(&mut dst, &mut guest, &["postcopy-paused"]);
    recover_over_socketpair(s.end.client(), &mut dst.client, "mig1", true);
    s.end.wait(&["postcopy-active", "completed"], TIMEOUT);
    wait_uffd(&mut dst, &mut guest, &["postcopy-active", "completed"]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(readers.finish() > 0, "{test}: the readers checked no page");

    s.end
        .client()
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("bandwidth");
    let si = s.end.wait(&["completed"], TIMEOUT);
    let d = wait_uffd(&mut dst, &mut guest, &["completed"]);
    eprintln!("{test}: destination {d}");
    // The recovery socket ran its own handshake.
    assert_tls_channels(&s, &si, 2, Some("recover"), test);
    let dpeer = Peer {
        end: End::Helper(dst),
        log: Some(log.clone()),
        _dir: dir,
    };
    assert_tls_channels(&dpeer, &d, 2, Some("recover"), test);
    assert_eq!(d["postcopy-pauses"], 1, "{test}: {d}");
    assert_same_memory(&expected, &guest.map, test);
    s.assert_no_secrets(&pki, test);
    dpeer.assert_no_secrets(&pki, test);
}

#[test]
fn tls_helper_to_helper_postcopy_recovery() {
    postcopy_recovery(Kind::Helper, "tls_helper_to_helper_postcopy_recovery");
}

#[test]
fn tls_qemu10_to_helper_postcopy_recovery() {
    postcopy_recovery(
        Kind::Qemu(Qemu::V10),
        "tls_qemu10_to_helper_postcopy_recovery",
    );
}

#[test]
fn tls_qemu72_to_helper_postcopy_recovery() {
    postcopy_recovery(
        Kind::Qemu(Qemu::V72),
        "tls_qemu72_to_helper_postcopy_recovery",
    );
}

#[test]
fn tls_helper_to_qemu10_postcopy_recovery() {
    helper_to_qemu_postcopy_recovery(Qemu::V10, "tls_helper_to_qemu10_postcopy_recovery");
}

#[test]
fn tls_helper_to_qemu72_postcopy_recovery() {
    helper_to_qemu_postcopy_recovery(Qemu::V72, "tls_helper_to_qemu72_postcopy_recovery");
}

/// Helper source -> QEMU destination, postcopy paused with `migrate-pause` on the helper and
/// recovered over a fresh socketpair (QEMU's `migrate-recover`): QEMU runs the server side
/// of the recovery's handshake.
fn helper_to_qemu_postcopy_recovery(q: Qemu, test: &str) {
    let Some((mut s, mut d)) = pair(Kind::Helper, Kind::Qemu(q), RAM, test) else {
        return;
    };
    let expected = s.end.ram().to_vec();
    let pki = Pki::new();
    tls_both(&pki, &mut s, &mut d);
    for p in [&mut s, &mut d] {
        p.end
            .client()
            .set_capabilities(&[("postcopy-ram", true)])
            .expect("postcopy-ram");
    }
    s.end
        .client()
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("bandwidth");
    start_fd_migration(s.end.client(), d.end.client());
    std::thread::sleep(Duration::from_millis(200));
    s.end.client().migrate_start_postcopy().expect("postcopy");
    s.end.wait(&["postcopy-active"], TIMEOUT);
    d.end.wait(&["postcopy-active"], TIMEOUT);
    std::thread::sleep(Duration::from_millis(200));
    s.end
        .client()
        .execute_oob("migrate-pause", json!({}))
        .expect("migrate-pause");
    s.end.wait(&["postcopy-paused"], TIMEOUT);
    d.end.wait(&["postcopy-paused"], TIMEOUT);
    recover_over_socketpair(s.end.client(), d.end.client(), "mig1", false);
    s.end.wait(&["postcopy-active", "completed"], TIMEOUT);
    s.end
        .client()
        .set_parameters(json!({"max-postcopy-bandwidth": 0}))
        .expect("bandwidth");
    let si = s.end.wait(&["completed"], TIMEOUT);
    d.end.wait(&["completed"], TIMEOUT);
    assert_eq!(si["postcopy-pauses"], 1, "{test}: {si}");
    assert_tls_channels(&s, &si, 2, Some("recover"), test);
    assert_same_memory(&expected, &d.end.ram(), test);
    s.assert_no_secrets(&pki, test);
}

// ---------------------------------------------------------------------------------------
// The name checked: tls-hostname, else the tcp: URI's host; none over fd: is an error.
// ---------------------------------------------------------------------------------------

/// Over `tcp:127.0.0.1:PORT` without `tls-hostname` the source checks the server's
/// certificate against 127.0.0.1 (an IP SAN of the good certificate) and completes.
fn tcp_without_hostname(src: Kind, dst: Kind, test: &str) {
    let Some((mut s, mut d)) = pair(src, dst, RAM, test) else {
        return;
    };
    let pki = Pki::new();
    support::tls::add_x509(s.end.client(), "tls0", &pki.client_dir(), "client", true)
        .expect("client creds");
    support::tls::set_tls(s.end.client(), "tls0", None, None).expect("tls-creds");
    tls_destination(d.end.client(), &pki.server_dir(ServerCert::Good), None);
    // A port free a moment ago (the destination listens on it next).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    d.end
        .client()
        .migrate_incoming(&uri)
        .expect("migrate-incoming");
    s.end.client().migrate(&uri).expect("migrate");
    let si = s.end.wait(&["completed"], TIMEOUT);
    let di = d.end.wait(&["completed"], TIMEOUT);
    assert_same_memory(&s.end.ram(), &d.end.ram(), test);
    assert_tls_channels(&s, &si, 1, None, test);
    assert_tls_channels(&d, &di, 1, None, test);
}

#[test]
fn tls_helper_to_qemu10_tcp_without_hostname() {
    tcp_without_hostname(
        Kind::Helper,
        Kind::Qemu(Qemu::V10),
        "tls_helper_to_qemu10_tcp_without_hostname",
    );
}

#[test]
fn tls_qemu10_to_helper_tcp_without_hostname() {
    tcp_without_hostname(
        Kind::Qemu(Qemu::V10),
        Kind::Helper,
        "tls_qemu10_to_helper_tcp_without_hostname",
    );
}

/// Over `fd:` there is no host to check: without `tls-hostname` the source fails as QEMU
/// does ("No hostname for certificate validation"), its guest intact.
#[test]
fn tls_fd_without_hostname_fails() {
    let test = "tls_fd_without_hostname_fails";
    let Some((mut s, mut d)) = pair(Kind::Helper, Kind::Helper, RAM, test) else {
        return;
    };
    let before = s.end.ram().to_vec();
    let pki = Pki::new();
    support::tls::add_x509(s.end.client(), "tls0", &pki.client_dir(), "client", true)
        .expect("client creds");
    support::tls::set_tls(s.end.client(), "tls0", None, None).expect("tls-creds");
    tls_destination(d.end.client(), &pki.server_dir(ServerCert::Good), None);
    start_fd_migration(s.end.client(), d.end.client());
    let v = s.end.wait(&["failed"], TIMEOUT);
    let desc = v["error-desc"].as_str().unwrap_or("");
    assert!(
        desc.contains("No hostname for certificate validation"),
        "{test}: {v}"
    );
    assert!(
        s.end.ram()[..] == before[..],
        "{test}: the source's RAM changed"
    );
    s.assert_no_secrets(&pki, test);
}
