//! TLS failures, against QEMU 10.0 and against a helper: wrong CA, expired and not yet valid
//! server certificates, hostname mismatch, authz mismatch, a clear-text peer, a handshake
//! that never completes, PSK credentials. Each ends `failed` with an `error-desc` naming
//! the reason, the source guest intact (the helper's RAM unchanged, QEMU still running),
//! and no key material in any helper's log.
//!
//! What QEMU itself prints in each case (measured, /work/briefs/dn-format.txt) is what the
//! QEMU-side assertions expect.

use std::os::fd::AsFd;
use std::time::Duration;

use serde_json::json;

use support::end::End;
use support::migrate::{socketpair, start_fd_migration};
use support::qemu::Qemu;
use support::tls::{
    add_authz, add_psk, add_x509, set_tls, tls_destination, tls_source, Pki, ServerCert, CLIENT_DN,
    PSK_USER,
};
use support::util::MIB;

use super::{pair, stub, Kind, Peer};

const RAM: u64 = 32 * MIB;
/// How long an end may take to give up.
const FAIL_TIMEOUT: Duration = Duration::from_secs(30);

/// `desc` names the reason: it holds one of `words` (case-insensitive).
pub(super) fn assert_reason(desc: &str, words: &[&str], what: &str) {
    let low = desc.to_lowercase();
    assert!(
        words.iter().any(|w| low.contains(&w.to_lowercase())),
        "{what}: error {desc:?} names none of {words:?}"
    );
}

/// Waits for `failed` on `p` and returns its error-desc.
pub(super) fn failed(p: &mut Peer, what: &str) -> String {
    let v = p.end.wait(&["failed"], FAIL_TIMEOUT);
    let desc = v["error-desc"].as_str().unwrap_or("").to_string();
    assert!(
        !desc.is_empty(),
        "{what}: failed without an error-desc: {v}"
    );
    eprintln!("{what}: error-desc {desc:?}");
    desc
}

/// The source guest is intact after a failure: a helper's RAM is what it was before and
/// the helper answers; a QEMU is still running and answers.
pub(super) fn assert_source_intact(s: &mut Peer, before: &[u8], what: &str) {
    match &mut s.end {
        End::Helper(h) => {
            assert!(h.alive(), "{what}: the source helper exited");
            h.client.query_migrate().expect("the source helper answers");
        }
        End::Qemu(q) => {
            assert!(q.try_wait().is_none(), "{what}: the source QEMU exited");
            q.execute("query-status", json!({}))
                .expect("the source QEMU answers");
        }
    }
    assert!(
        s.end.ram()[..] == before[..],
        "{what}: the source's RAM changed"
    );
}

/// A migration from `src` to `dst` whose destination has server credentials `cert` (QEMU
/// loads these) must fail at the source's check of the server, naming `words`.
fn client_rejects(src: Kind, dst: Kind, cert: ServerCert, words: &[&str], test: &str) {
    let Some((mut s, mut d)) = pair(src, dst, RAM, test) else {
        return;
    };
    let pki = Pki::new();
    let before = s.end.ram().to_vec();
    tls_source(s.end.client(), &pki.client_dir());
    tls_destination(d.end.client(), &pki.server_dir(cert), None);
    start_fd_migration(s.end.client(), d.end.client());
    let desc = failed(&mut s, test);
    assert_reason(&desc, words, test);
    assert_source_intact(&mut s, &before, test);
    s.assert_no_secrets(&pki, test);
    d.assert_no_secrets(&pki, test);
}

const ISSUER: &[&str] = &["issuer", "unknown ca", "not trusted"];
const HOST: &[&str] = &["hostname", "not valid for name", "does not match"];

#[test]
fn tls_wrong_ca_helper_to_qemu10() {
    let (k, t) = (Kind::Qemu(Qemu::V10), "tls_wrong_ca_helper_to_qemu10");
    client_rejects(Kind::Helper, k, ServerCert::OtherCa, ISSUER, t);
}

#[test]
fn tls_wrong_ca_qemu10_to_helper() {
    let (k, t) = (Kind::Qemu(Qemu::V10), "tls_wrong_ca_qemu10_to_helper");
    client_rejects(k, Kind::Helper, ServerCert::OtherCa, ISSUER, t);
}

#[test]
fn tls_wrong_ca_helper_to_helper() {
    let t = "tls_wrong_ca_helper_to_helper";
    client_rejects(Kind::Helper, Kind::Helper, ServerCert::OtherCa, ISSUER, t);
}

#[test]
fn tls_wrong_host_helper_to_qemu10() {
    let (k, t) = (Kind::Qemu(Qemu::V10), "tls_wrong_host_helper_to_qemu10");
    client_rejects(Kind::Helper, k, ServerCert::WrongHost, HOST, t);
}

#[test]
fn tls_wrong_host_qemu10_to_helper() {
    let (k, t) = (Kind::Qemu(Qemu::V10), "tls_wrong_host_qemu10_to_helper");
    client_rejects(k, Kind::Helper, ServerCert::WrongHost, HOST, t);
}

#[test]
fn tls_wrong_host_helper_to_helper() {
    let t = "tls_wrong_host_helper_to_helper";
    client_rejects(Kind::Helper, Kind::Helper, ServerCert::WrongHost, HOST, t);
}

/// An expired or not-yet-valid server certificate. QEMU refuses to load one (object-add
/// fails naming the dates); a helper source must reject it when a server presents it
/// anyway (the stub); a helper destination either refuses it at object-add as QEMU does,
/// or a QEMU 10.0 and a helper source reject it in the handshake.
fn bad_dates(cert: ServerCert, words: &[&str], test: &str) {
    let pki = Pki::new();
    let dir = pki.server_dir(cert);

    // 1. A helper source against a server presenting the certificate.
    let mut s = Peer::new(Kind::Helper, true, RAM, test).expect("a helper");
    let before = s.end.ram().to_vec();
    tls_source(s.end.client(), &pki.client_dir());
    let (a, b) = socketpair();
    let server = stub::serve(&dir, b);
    s.end.client().getfd("mig", a.as_fd()).expect("getfd");
    drop(a);
    s.end.client().migrate("fd:mig").expect("migrate");
    let desc = failed(&mut s, test);
    assert_reason(&desc, words, test);
    assert_source_intact(&mut s, &before, test);
    s.assert_no_secrets(&pki, test);
    let how = server.join().expect("stub thread");
    eprintln!("{test}: the stub's handshake ended: {how}");
    assert_ne!(
        how, "handshake completed",
        "{test}: the source accepted the certificate"
    );

    // 2. A helper destination given the certificate: refused at object-add as QEMU does,
    // or (a fresh destination per source) rejected by a QEMU 10.0 and a helper source.
    for src in [Kind::Qemu(Qemu::V10), Kind::Helper] {
        let mut d = Peer::new(Kind::Helper, false, RAM, test).expect("a helper");
        if let Err(e) = add_x509(d.end.client(), "tls0", &dir, "server", true) {
            eprintln!("{test}: the helper refused the certificate as QEMU does: {e}");
            assert_reason(&e.to_string(), words, test);
            d.assert_no_secrets(&pki, test);
            break;
        }
        set_tls(d.end.client(), "tls0", None, None).expect("tls-creds");
        let Some(mut s) = Peer::new(src, true, RAM, test) else {
            continue;
        };
        let before = s.end.ram().to_vec();
        tls_source(s.end.client(), &pki.client_dir());
        start_fd_migration(s.end.client(), d.end.client());
        let desc = failed(&mut s, test);
        // QEMU (GnuTLS) says "The certificate is not trusted" for both dates.
        let qemu_words: &[&str] = &["not trusted", "expired", "not yet"];
        let w = if src == Kind::Helper {
            words
        } else {
            qemu_words
        };
        assert_reason(&desc, w, test);
        assert_source_intact(&mut s, &before, test);
        s.assert_no_secrets(&pki, test);
        d.assert_no_secrets(&pki, test);
    }
}

#[test]
fn tls_expired_server_cert() {
    bad_dates(ServerCert::Expired, &["expired"], "tls_expired_server_cert");
}

#[test]
fn tls_not_yet_valid_server_cert() {
    bad_dates(
        ServerCert::NotYetValid,
        &["not yet", "notvalidyet", "not valid yet", "not valid until"],
        "tls_not_yet_valid_server_cert",
    );
}

/// The exact text QEMU prints and the helper reports when `tls-authz` denies the client.
fn authz_denied_text() -> String {
    format!("TLS x509 authz check for {CLIENT_DN} is denied")
}

/// `tls-authz` allowing another identity: the destination refuses the client naming its
/// DN in QEMU's format; the source fails, intact.
fn authz_denied(src: Kind, dst: Kind, test: &str) {
    let Some((mut s, mut d)) = pair(src, dst, RAM, test) else {
        return;
    };
    let pki = Pki::new();
    let before = s.end.ram().to_vec();
    tls_source(s.end.client(), &pki.client_dir());
    tls_destination(
        d.end.client(),
        &pki.server_dir(ServerCert::Good),
        Some("C=GB,O=Nobody,CN=someone else"),
    );
    start_fd_migration(s.end.client(), d.end.client());
    match &mut d.end {
        End::Helper(_) => {
            let desc = failed(&mut d, test);
            assert!(
                desc.contains(&authz_denied_text()),
                "{test}: destination error {desc:?} lacks {:?}",
                authz_denied_text()
            );
        }
        End::Qemu(q) => {
            // QEMU says so on stderr only; its query-migrate stays in setup.
            let deadline = std::time::Instant::now() + FAIL_TIMEOUT;
            while !q.stderr_tail(20).contains(&authz_denied_text()) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{test}: QEMU never denied: {}",
                    q.stderr_tail(20)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    if src == Kind::Helper {
        // The source only sees the connection go: it must fail, not hang or complete.
        failed(&mut s, test);
    }
    assert_source_intact(&mut s, &before, test);
    s.assert_no_secrets(&pki, test);
    d.assert_no_secrets(&pki, test);
}

#[test]
fn tls_authz_denied_qemu10_to_helper() {
    authz_denied(
        Kind::Qemu(Qemu::V10),
        Kind::Helper,
        "tls_authz_denied_qemu10_to_helper",
    );
}

#[test]
fn tls_authz_denied_helper_to_qemu10() {
    authz_denied(
        Kind::Helper,
        Kind::Qemu(Qemu::V10),
        "tls_authz_denied_helper_to_qemu10",
    );
}

#[test]
fn tls_authz_denied_helper_to_helper() {
    authz_denied(
        Kind::Helper,
        Kind::Helper,
        "tls_authz_denied_helper_to_helper",
    );
}

const CLEAR: &[&str] = &["clear text", "clear-text", "cleartext", "no tls", "not tls"];

/// One end with TLS, the other without. A TLS destination facing clear text names it; a
/// TLS source facing a clear-text destination fails in its handshake.
fn clear_text(src: Kind, dst: Kind, tls_on_source: bool, test: &str) {
    let Some((mut s, mut d)) = pair(src, dst, RAM, test) else {
        return;
    };
    let pki = Pki::new();
    let before = s.end.ram().to_vec();
    if tls_on_source {
        tls_source(s.end.client(), &pki.client_dir());
    } else {
        tls_destination(d.end.client(), &pki.server_dir(ServerCert::Good), None);
    }
    // The destination gives up on a silent source after this (a QEMU source that got a
    // reset may stay quiet; a helper destination waits for more).
    if dst == Kind::Helper {
        d.end
            .client()
            .set_parameters(json!({"precopy-timeout": 5000}))
            .expect("precopy-timeout");
    }
    start_fd_migration(s.end.client(), d.end.client());
    if tls_on_source {
        let desc = failed(&mut s, test);
        assert_reason(&desc, &["tls", "handshake"], test);
    } else if dst == Kind::Helper {
        let desc = failed(&mut d, test);
        assert_reason(&desc, CLEAR, test);
    }
    if src == Kind::Helper && !tls_on_source {
        failed(&mut s, test);
    }
    assert_source_intact(&mut s, &before, test);
    s.assert_no_secrets(&pki, test);
    d.assert_no_secrets(&pki, test);
}

#[test]
fn tls_clear_text_qemu10_source_to_tls_helper() {
    let t = "tls_clear_text_qemu10_source_to_tls_helper";
    clear_text(Kind::Qemu(Qemu::V10), Kind::Helper, false, t);
}

#[test]
fn tls_helper_source_to_clear_text_qemu10() {
    let t = "tls_helper_source_to_clear_text_qemu10";
    clear_text(Kind::Helper, Kind::Qemu(Qemu::V10), true, t);
}

#[test]
fn tls_clear_text_helper_source_to_tls_helper() {
    let t = "tls_clear_text_helper_source_to_tls_helper";
    clear_text(Kind::Helper, Kind::Helper, false, t);
}

#[test]
fn tls_helper_source_to_clear_text_helper() {
    let t = "tls_helper_source_to_clear_text_helper";
    clear_text(Kind::Helper, Kind::Helper, true, t);
}

const TIMED_OUT: &[&str] = &["did not complete", "timed out", "timeout", "time out"];

/// A peer that accepts and says nothing: the handshake gives up after `precopy-timeout`,
/// on a helper source (waiting for ServerHello) and on a helper destination (waiting for
/// ClientHello).
#[test]
fn tls_handshake_never_completes() {
    let test = "tls_handshake_never_completes";
    let pki = Pki::new();
    for source in [true, false] {
        let what = format!("{test} ({})", if source { "source" } else { "destination" });
        let mut p = Peer::new(Kind::Helper, source, RAM, test).expect("a helper");
        let before = p.end.ram().to_vec();
        if source {
            tls_source(p.end.client(), &pki.client_dir());
        } else {
            tls_destination(p.end.client(), &pki.server_dir(ServerCert::Good), None);
        }
        p.end
            .client()
            .set_parameters(json!({"precopy-timeout": 1000}))
            .expect("precopy-timeout");
        // The test holds the other end open and silent.
        let (a, _silent) = socketpair();
        p.end.client().getfd("mig", a.as_fd()).expect("getfd");
        drop(a);
        let t0 = std::time::Instant::now();
        if source {
            p.end.client().migrate("fd:mig").expect("migrate");
        } else {
            p.end
                .client()
                .migrate_incoming("fd:mig")
                .expect("migrate-incoming");
        }
        let desc = failed(&mut p, &what);
        eprintln!("{what}: gave up after {:?}", t0.elapsed());
        assert_reason(&desc, TIMED_OUT, &what);
        if source {
            assert_source_intact(&mut p, &before, &what);
        }
        p.assert_no_secrets(&pki, &what);
    }
}

/// `tls-creds-psk` objects are taken as QEMU takes them: a username missing from keys.psk
/// is refused by both at object-add, a present one accepted. (Migrations with them:
/// `super::psk`.)
#[test]
fn tls_psk_objects_like_qemu() {
    let test = "tls_psk_objects_like_qemu";
    let pki = Pki::new();
    let psk = pki.psk_dir();
    let mut ends: Vec<Peer> = Vec::new();
    if let Some(q) = Peer::new(Kind::Qemu(Qemu::V10), true, RAM, test) {
        ends.push(q);
    }
    ends.push(Peer::new(Kind::Helper, true, RAM, test).expect("a helper"));
    for p in ends.iter_mut() {
        let who = if p.log.is_some() { "helper" } else { "QEMU" };
        let e = add_psk(p.end.client(), "bad", &psk, "client", Some("nobody"))
            .expect_err("an unknown PSK username must be refused");
        assert_reason(&e.to_string(), &["nobody"], &format!("{test}: {who}"));
        add_psk(p.end.client(), "psk0", &psk, "client", Some(PSK_USER))
            .unwrap_or_else(|e| panic!("{test}: {who}: client PSK creds: {e}"));
        add_psk(p.end.client(), "psk1", &psk, "server", Some(PSK_USER))
            .expect_err("a server with a username must be refused");
        add_psk(p.end.client(), "psk1", &psk, "server", None)
            .unwrap_or_else(|e| panic!("{test}: {who}: server PSK creds: {e}"));
        pki.assert_no_secrets(&p.log_text(), test);
    }
}

/// `object-add` of an `authz-simple` and x509 creds on a QEMU and on a helper take the same
/// arguments; a missing directory is refused by both.
#[test]
fn tls_objects_like_qemu() {
    let test = "tls_objects_like_qemu";
    let pki = Pki::new();
    let mut ends = vec![Peer::new(Kind::Helper, false, RAM, test).expect("a helper")];
    if let Some(q) = Peer::new(Kind::Qemu(Qemu::V10), false, RAM, test) {
        ends.push(q);
    }
    for p in ends.iter_mut() {
        let c = p.end.client();
        add_x509(c, "tls0", &pki.server_dir(ServerCert::Good), "server", true)
            .expect("x509 server creds");
        add_authz(c, "auth0", CLIENT_DN).expect("authz-simple");
        set_tls(c, "tls0", None, Some("auth0")).expect("tls parameters");
        let params = c.query_parameters().expect("query-migrate-parameters");
        assert_eq!(params["tls-creds"], "tls0", "{params}");
        assert_eq!(params["tls-authz"], "auth0", "{params}");
        let missing = pki.server_dir(ServerCert::Good).join("nowhere");
        add_x509(c, "tls1", &missing, "server", true)
            .expect_err("a missing credentials directory must be refused");
    }
}
