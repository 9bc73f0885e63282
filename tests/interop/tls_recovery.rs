//! A postcopy recovery whose TLS handshake fails (the source now checks the server against
//! a name its certificate does not carry) leaves both helpers `postcopy-paused`, each with
//! an `error-desc` saying why, the guest's pages intact; a second recovery with the right
//! name completes and the RAM matches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use qemu_migration_helper::client::HelperClient;
use support::helper::HelperVm;
use support::migrate::{recover_over_socketpair, start_fd_migration};
use support::tls::{tls_destination, tls_source, Pki, ServerCert, HOSTNAME};
use support::uffd::{Readers, UffdGuest};
use support::util::{assert_same_memory, fill_mixed, test_seed, MIB};

const RAM: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `query-migrate` until `ok` holds (or panics after TIMEOUT with the last reply).
fn until(c: &mut HelperClient, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let v = c.query_migrate().expect("query-migrate");
        if ok(&v) {
            return v;
        }
        assert!(t0.elapsed() < TIMEOUT, "{what}: gave up waiting: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tls_failed_recovery_handshake_stays_paused() {
    let test = "tls_failed_recovery_handshake_stays_paused";
    let pki = Pki::new();
    let mut s = HelperVm::spawn();
    s.add_block("ram", RAM, false);
    fill_mixed(&mut s.blocks[0].mem.map(), test_seed(test), 0.3);
    let expected = Arc::new(s.blocks[0].mem.map().to_vec());
    let guest = UffdGuest::new(RAM);
    let mut d = HelperVm::spawn();
    guest.attach(&mut d, "ram");
    tls_source(&mut s.client, &pki.client_dir());
    tls_destination(&mut d.client, &pki.server_dir(ServerCert::Good), None);
    for c in [&mut s.client, &mut d.client] {
        c.set_capabilities(&[("postcopy-ram", true)])
            .expect("postcopy-ram");
    }
    s.client
        .set_parameters(json!({"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB}))
        .expect("bandwidth");
    start_fd_migration(&mut s.client, &mut d.client);
    std::thread::sleep(Duration::from_millis(100));
    s.client.migrate_start_postcopy().expect("postcopy");
    d.client
        .wait_for_status(&["postcopy-active"], TIMEOUT)
        .expect("postcopy-active");
    let readers = Readers::start_paced(
        &guest,
        expected.clone(),
        1,
        test_seed(test),
        Duration::from_millis(2),
    );
    s.client
        .execute("migrate-pause", json!({}))
        .expect("migrate-pause");
    s.client
        .wait_for_status(&["postcopy-paused"], TIMEOUT)
        .expect("source paused");
    d.client
        .wait_for_status(&["postcopy-paused"], TIMEOUT)
        .expect("destination paused");

    // The recovery's handshake fails: the server's certificate does not name this host.
    s.client
        .set_parameters(json!({"tls-hostname": "wrong.example"}))
        .expect("tls-hostname");
    recover_over_socketpair(&mut s.client, &mut d.client, "rec1", false);
    let si = until(&mut s.client, "source paused again", |v| {
        v["status"] == "postcopy-paused"
            && v["error-desc"]
                .as_str()
                .is_some_and(|e| e.contains("does not match the hostname wrong.example"))
    });
    let di = until(&mut d.client, "destination paused again", |v| {
        v["status"] == "postcopy-paused" && v["postcopy-pauses"].as_u64() >= Some(2)
    });
    eprintln!("{test}: after the failed recovery:\nsource {si}\ndestination {di}");
    assert!(
        di["error-desc"].as_str().is_some_and(|e| e.contains("TLS")),
        "{test}: the destination says why it is paused: {di}"
    );

    // With the right name the next recovery completes.
    s.client
        .set_parameters(json!({"tls-hostname": HOSTNAME, "max-postcopy-bandwidth": 0}))
        .expect("tls-hostname");
    recover_over_socketpair(&mut s.client, &mut d.client, "rec2", false);
    let si = s
        .client
        .wait_for_status(&["completed"], TIMEOUT)
        .expect("source completed");
    let di = d
        .client
        .wait_for_status(&["completed"], TIMEOUT)
        .expect("destination completed");
    assert!(readers.finish() > 0, "{test}: the reader checked no page");
    let recov = |v: &Value| {
        v["tls-channels"].as_array().map_or(0, |a| {
            a.iter().filter(|c| c["channel"] == "recovery").count()
        })
    };
    assert!(recov(&si) >= 1 && recov(&di) >= 1, "{test}: {si}\n{di}");
    assert_same_memory(&expected, &guest.map, test);
}
