//! TLS-PSK (`tls-creds-psk`, QEMU 10.0's GnuTLS: TLS 1.3 with an external pre-shared key)
//! between QEMU 10.0 (and 7.2, precopy) and a helper, both ways, and between helpers: precopy, multifd with
//! two channels and postcopy recovered over a fresh PSK socket, RAM byte-identical, with
//! `tls-authz` on the destination checking the username. A wrong key (both ways) and an
//! unknown username fail cleanly: `failed`, an `error-desc` naming the reason, the source
//! guest intact, and no key in any helper's log.

use std::path::Path;

use support::qemu::Qemu;
use support::tls::{
    add_authz, add_psk, set_tls, tls_destination, tls_source, Pki, ServerCert, PSK_USER,
};
use support::util::TempDir;

use super::failures::{assert_reason, assert_source_intact, failed};
use super::{multifd_with, pair, postcopy_recovery_with, precopy_with, HelperClient, Kind, RAM};
use support::migrate::start_fd_migration;

/// PSK on both ends from `pki`'s keys.psk: the source as `PSK_USER`, the destination with
/// `tls-authz` allowing that username (QEMU checks it for PSK too).
fn psk_both(pki: &Pki, s: &mut HelperClient, d: &mut HelperClient) {
    psk_source(s, &pki.psk_dir(), None);
    psk_destination(d, &pki.psk_dir(), Some(PSK_USER));
}

fn psk_source(c: &mut HelperClient, dir: &Path, user: Option<&str>) {
    add_psk(c, "tls0", dir, "client", Some(user.unwrap_or(PSK_USER)))
        .expect("object-add tls-creds-psk (client)");
    set_tls(c, "tls0", None, None).expect("tls-creds");
}

fn psk_destination(c: &mut HelperClient, dir: &Path, authz: Option<&str>) {
    add_psk(c, "tls0", dir, "server", None).expect("object-add tls-creds-psk (server)");
    if let Some(user) = authz {
        add_authz(c, "auth0", user).expect("object-add authz-simple");
    }
    set_tls(c, "tls0", None, authz.map(|_| "auth0")).expect("tls-creds");
}

#[test]
fn tls_psk_qemu10_to_helper() {
    let t = "tls_psk_qemu10_to_helper";
    precopy_with(Kind::Qemu(Qemu::V10), Kind::Helper, t, psk_both);
}

#[test]
fn tls_psk_helper_to_qemu10() {
    let t = "tls_psk_helper_to_qemu10";
    precopy_with(Kind::Helper, Kind::Qemu(Qemu::V10), t, psk_both);
}

#[test]
fn tls_psk_helper_to_helper() {
    precopy_with(
        Kind::Helper,
        Kind::Helper,
        "tls_psk_helper_to_helper",
        psk_both,
    );
}

#[test]
fn tls_psk_helper_to_helper_multifd() {
    let t = "tls_psk_helper_to_helper_multifd";
    multifd_with(Kind::Helper, Kind::Helper, t, psk_both);
}

#[test]
fn tls_psk_qemu10_to_helper_multifd() {
    let t = "tls_psk_qemu10_to_helper_multifd";
    multifd_with(Kind::Qemu(Qemu::V10), Kind::Helper, t, psk_both);
}

#[test]
fn tls_psk_helper_to_qemu10_multifd() {
    let t = "tls_psk_helper_to_qemu10_multifd";
    multifd_with(Kind::Helper, Kind::Qemu(Qemu::V10), t, psk_both);
}

#[test]
fn tls_psk_helper_to_helper_postcopy_recovery() {
    let t = "tls_psk_helper_to_helper_postcopy_recovery";
    postcopy_recovery_with(Kind::Helper, t, psk_both);
}

#[test]
fn tls_psk_qemu10_to_helper_postcopy_recovery() {
    let t = "tls_psk_qemu10_to_helper_postcopy_recovery";
    postcopy_recovery_with(Kind::Qemu(Qemu::V10), t, psk_both);
}

// ---------------------------------------------------------------------------------------
// Failures: what each end says, in its own words (QEMU's measured ones on its side).
// ---------------------------------------------------------------------------------------

const KEY: &str = "5fa0c2d1e3b4968778695a4b3c2d1e0f00112233445566778899aabbccddeeff";
const OTHER_KEY: &str = "5fa0c2d1e3b4968778695a4b3c2d1e0f00112233445566778899aabbccddeefe";

/// A directory whose keys.psk is `lines`.
fn keys(lines: &str) -> TempDir {
    let dir = TempDir::new("qmh-psk-keys");
    std::fs::write(dir.join("keys.psk"), lines).expect("keys.psk");
    dir
}

/// A migration from `src` (keys.psk `src_keys`, username `user`) to `dst` (keys.psk
/// `dst_keys`) that must fail; the source's error names one of `src_words`, a helper
/// destination's one of `dst_words`.
fn psk_fails(
    (src, src_keys, user): (Kind, &str, Option<&str>),
    (dst, dst_keys): (Kind, &str),
    src_words: &[&str],
    dst_words: &[&str],
    test: &str,
) {
    let Some((mut s, mut d)) = pair(src, dst, RAM, test) else {
        return;
    };
    let (sk, dk) = (keys(src_keys), keys(dst_keys));
    let before = s.end.ram().to_vec();
    psk_source(s.end.client(), sk.path(), user);
    psk_destination(d.end.client(), dk.path(), None);
    start_fd_migration(s.end.client(), d.end.client());
    let desc = failed(&mut s, &format!("{test}: source"));
    assert_reason(&desc, src_words, &format!("{test}: source"));
    if d.log.is_some() {
        let desc = failed(&mut d, &format!("{test}: destination"));
        assert_reason(&desc, dst_words, &format!("{test}: destination"));
    }
    assert_source_intact(&mut s, &before, test);
    for p in [&s, &d] {
        let log = p.log_text();
        assert!(
            !log.contains(KEY) && !log.contains(OTHER_KEY),
            "{test}: a helper's log holds a key"
        );
    }
}

/// What a helper client says when QEMU closes on its key: it names the pre-shared key.
const HELPER_CLIENT_KEY: &[&str] = &["pre-shared key"];
/// What a helper server says about a client's wrong key.
const HELPER_SERVER_KEY: &[&str] = &["binder does not verify"];
/// QEMU (GnuTLS) as a client refused by a helper server: the alert it received.
const QEMU_CLIENT_REFUSED: &[&str] = &["alert", "illegal parameter", "decrypt"];

#[test]
fn tls_psk_wrong_key_helper_to_qemu10() {
    psk_fails(
        (Kind::Helper, &format!("qemu:{OTHER_KEY}\n"), None),
        (Kind::Qemu(Qemu::V10), &format!("qemu:{KEY}\n")),
        HELPER_CLIENT_KEY,
        &[],
        "tls_psk_wrong_key_helper_to_qemu10",
    );
}

#[test]
fn tls_psk_wrong_key_qemu10_to_helper() {
    psk_fails(
        (Kind::Qemu(Qemu::V10), &format!("qemu:{OTHER_KEY}\n"), None),
        (Kind::Helper, &format!("qemu:{KEY}\n")),
        QEMU_CLIENT_REFUSED,
        HELPER_SERVER_KEY,
        "tls_psk_wrong_key_qemu10_to_helper",
    );
}

#[test]
fn tls_psk_wrong_key_helper_to_helper() {
    psk_fails(
        (Kind::Helper, &format!("qemu:{OTHER_KEY}\n"), None),
        (Kind::Helper, &format!("qemu:{KEY}\n")),
        &["refused this end's pre-shared key"],
        HELPER_SERVER_KEY,
        "tls_psk_wrong_key_helper_to_helper",
    );
}

/// The source's username is not in the destination's keys.psk.
#[test]
fn tls_psk_unknown_username_qemu10_to_helper() {
    psk_fails(
        (Kind::Qemu(Qemu::V10), &format!("bob:{KEY}\n"), Some("bob")),
        (Kind::Helper, &format!("qemu:{KEY}\n")),
        &["alert", "handshake", "failure"],
        &["Username bob not found in PSK file"],
        "tls_psk_unknown_username_qemu10_to_helper",
    );
}

#[test]
fn tls_psk_unknown_username_helper_to_qemu10() {
    psk_fails(
        (Kind::Helper, &format!("bob:{KEY}\n"), Some("bob")),
        (Kind::Qemu(Qemu::V10), &format!("qemu:{KEY}\n")),
        &["keys.psk has no bob"],
        &[],
        "tls_psk_unknown_username_helper_to_qemu10",
    );
}

#[test]
fn tls_psk_unknown_username_helper_to_helper() {
    psk_fails(
        (Kind::Helper, &format!("bob:{KEY}\n"), Some("bob")),
        (Kind::Helper, &format!("qemu:{KEY}\n")),
        &["no key for bob"],
        &["Username bob not found in PSK file"],
        "tls_psk_unknown_username_helper_to_helper",
    );
}

/// `tls-authz` on a PSK destination: a username it does not allow is refused with QEMU's
/// words, after a handshake that succeeded.
#[test]
fn tls_psk_authz_denied_helper_to_helper() {
    let test = "tls_psk_authz_denied_helper_to_helper";
    let Some((mut s, mut d)) = pair(Kind::Helper, Kind::Helper, RAM, test) else {
        return;
    };
    let k = keys(&format!("qemu:{KEY}\nbob:{OTHER_KEY}\n"));
    let before = s.end.ram().to_vec();
    psk_source(s.end.client(), k.path(), Some("bob"));
    psk_destination(d.end.client(), k.path(), Some("qemu"));
    start_fd_migration(s.end.client(), d.end.client());
    let desc = failed(&mut d, test);
    assert_reason(&desc, &["TLS PSK authz check for bob is denied"], test);
    let desc = failed(&mut s, test);
    eprintln!("{test}: source {desc}");
    assert_source_intact(&mut s, &before, test);
}

/// The helper's log shows each PSK channel's session (cipher, username) and no key.
#[test]
fn tls_psk_log_names_the_session() {
    let test = "tls_psk_log_names_the_session";
    let Some((mut s, mut d)) = pair(Kind::Helper, Kind::Helper, RAM, test) else {
        return;
    };
    let pki = Pki::new();
    psk_both(&pki, s.end.client(), d.end.client());
    start_fd_migration(s.end.client(), d.end.client());
    s.end.wait(&["completed"], super::TIMEOUT);
    d.end.wait(&["completed"], super::TIMEOUT);
    for p in [&s, &d] {
        let log = p.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("TLS session established"))
            .unwrap_or_else(|| panic!("{test}: no session line in {log}"));
        assert!(line.contains("TLS13_AES_128_GCM_SHA256"), "{test}: {line}");
        assert!(line.contains(PSK_USER), "{test}: {line}");
        pki.assert_no_secrets(&log, test);
    }
}

/// QEMU 7.2 (GnuTLS 3.7 too) negotiates the same TLS 1.3 PSK handshake.
#[test]
fn tls_psk_qemu72_to_helper() {
    let t = "tls_psk_qemu72_to_helper";
    precopy_with(Kind::Qemu(Qemu::V72), Kind::Helper, t, psk_both);
}

#[test]
fn tls_psk_helper_to_qemu72() {
    let t = "tls_psk_helper_to_qemu72";
    precopy_with(Kind::Helper, Kind::Qemu(Qemu::V72), t, psk_both);
}

/// Certificates on one end, a pre-shared key on the other: each helper end names the
/// mismatch (a QEMU 10.0 end says what GnuTLS says).
#[test]
fn tls_psk_against_x509_qemu10() {
    let test = "tls_psk_against_x509_qemu10";
    let pki = Pki::new();
    // A helper PSK source, a QEMU x509 server: QEMU presents its certificate.
    if let Some((mut s, mut d)) = pair(Kind::Helper, Kind::Qemu(Qemu::V10), RAM, test) {
        let before = s.end.ram().to_vec();
        psk_source(s.end.client(), &pki.psk_dir(), None);
        tls_destination(d.end.client(), &pki.server_dir(ServerCert::Good), None);
        start_fd_migration(s.end.client(), d.end.client());
        let desc = failed(&mut s, test);
        assert_reason(&desc, &["presented a certificate"], test);
        assert_source_intact(&mut s, &before, test);
        pki.assert_no_secrets(&s.log_text(), test);
    }
    // A QEMU x509 source, a helper PSK server: the client offers no pre-shared key.
    if let Some((mut s, mut d)) = pair(Kind::Qemu(Qemu::V10), Kind::Helper, RAM, test) {
        tls_source(s.end.client(), &pki.client_dir());
        psk_destination(d.end.client(), &pki.psk_dir(), None);
        start_fd_migration(s.end.client(), d.end.client());
        let desc = failed(&mut d, test);
        assert_reason(&desc, &["offered no pre-shared key"], test);
        let desc = failed(&mut s, test);
        eprintln!("{test}: QEMU source: {desc}");
        pki.assert_no_secrets(&d.log_text(), test);
    }
}
