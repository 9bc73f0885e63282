use serde_json::{json, Value};

use super::super::testing::{helper, run};
use super::super::{CmdResult, Helper, Role};
use super::*;
use crate::transport::tls::creds::testpki::{server_and_client_dirs, TestCa};

fn desc(r: CmdResult) -> String {
    r.unwrap_err().desc
}

fn setup_err(h: &Helper, role: Role) -> String {
    match h.tls_setup(role) {
        Ok(_) => panic!("TLS set up"),
        Err(e) => e.desc,
    }
}

#[test]
fn ids_are_checked_as_qemu_does() {
    for ok in ["a", "tls0", "A-b.c_d9"] {
        assert!(id_wellformed(ok), "{ok}");
    }
    for bad in ["", "0tls", "-a", "a b", "a/b", "é"] {
        assert!(!id_wellformed(bad), "{bad}");
    }
}

#[test]
fn object_add_arguments_and_errors() {
    let h = helper();
    let add = |v: Value| run(&h, "object-add", v);
    assert_eq!(
        desc(add(json!({"id": "x"}))),
        "Parameter 'qom-type' is missing"
    );
    assert_eq!(
        desc(add(json!({"qom-type": "authz-simple"}))),
        "Parameter 'id' is missing"
    );
    assert_eq!(
        desc(add(json!({"qom-type": "memory-backend-ram", "id": "m"}))),
        "Parameter 'qom-type' does not accept value 'memory-backend-ram'"
    );
    assert!(desc(add(json!({"qom-type": "tls-creds-anon", "id": "a"})))
        .contains("not supported by the helper"));
    assert_eq!(
        desc(add(json!({"qom-type": "authz-simple", "id": "z"}))),
        "Parameter 'identity' is missing"
    );
    assert_eq!(
        desc(add(
            json!({"qom-type": "authz-simple", "id": "z", "identity": "CN=a", "dir": "/"})
        )),
        "Parameter 'dir' is unexpected"
    );
    assert_eq!(
        desc(add(
            json!({"qom-type": "authz-simple", "id": "9z", "identity": "CN=a"})
        )),
        "Parameter 'id' expects an identifier"
    );
    assert_eq!(
        desc(add(
            json!({"qom-type": "tls-creds-x509", "id": "t", "endpoint": "peer"})
        )),
        "Parameter 'endpoint' does not accept value 'peer'"
    );
    assert_eq!(
        desc(add(
            json!({"qom-type": "tls-creds-x509", "id": "t", "verify-peer": "yes"})
        )),
        "Invalid parameter type for 'verify-peer', expected: boolean"
    );
    assert_eq!(
        desc(add(json!({"qom-type": "tls-creds-x509", "id": "t"}))),
        "Missing 'dir' property value"
    );
    assert_eq!(
        desc(add(
            json!({"qom-type": "tls-creds-psk", "id": "t", "endpoint": "server", "username": "u"})
        )),
        "username should not be set when endpoint=server"
    );
    assert_eq!(
        desc(add(
            json!({"qom-type": "tls-creds-x509", "id": "t", "dir": "/nonexistent"})
        )),
        "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"
    );
    add(json!({"qom-type": "authz-simple", "id": "z", "identity": "CN=a"})).unwrap();
    assert_eq!(
        desc(add(
            json!({"qom-type": "authz-simple", "id": "z", "identity": "CN=b"})
        )),
        "attempt to add duplicate property 'z' to object (type 'container')"
    );
    assert_eq!(
        desc(run(&h, "object-del", json!({"id": "nope"}))),
        "object 'nope' not found"
    );
    run(&h, "object-del", json!({"id": "z"})).unwrap();
    assert_eq!(
        desc(run(&h, "object-del", json!({"id": "z"}))),
        "object 'z' not found"
    );
    // The limit on the number of objects.
    for i in 0..MAX_OBJECTS {
        add(json!({"qom-type": "authz-simple", "id": format!("z{i}"), "identity": "x"})).unwrap();
    }
    assert!(desc(add(
        json!({"qom-type": "authz-simple", "id": "last", "identity": "x"})
    ))
    .starts_with("too many objects"));
}

#[test]
fn tls_setup_resolves_credentials_for_each_role() {
    let h = helper();
    let ca = TestCa::new("ca");
    let (server, client) = server_and_client_dirs(&ca);
    let set = |v: Value| run(&h, "migrate-set-parameters", v).unwrap();
    // No tls-creds: no TLS.
    assert!(h.tls_setup(Role::Source).unwrap().is_none());
    set(json!({"tls-creds": "cli"}));
    assert_eq!(
        setup_err(&h, Role::Source),
        "No TLS credentials with id 'cli'"
    );
    run(
        &h,
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "cli", "endpoint": "client",
               "dir": client.display(), "priority": "NORMAL"}),
    )
    .unwrap();
    run(
        &h,
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "srv", "endpoint": "server",
               "dir": server.display(), "verify-peer": true, "sanity-check": true}),
    )
    .unwrap();
    run(
        &h,
        "object-add",
        json!({"qom-type": "authz-simple", "id": "auth0", "identity": "CN=client"}),
    )
    .unwrap();
    set(json!({"tls-hostname": "migration.example"}));
    match h.tls_setup(Role::Source).unwrap() {
        Some(TlsSetup::Client(c)) => {
            assert_eq!(c.hostname.as_deref(), Some("migration.example"));
            assert!(c.verify_peer);
            assert_eq!(c.creds_id, "cli");
        }
        _ => panic!("not a client setup"),
    }
    assert_eq!(
        setup_err(&h, Role::Destination),
        "Expected TLS credentials for a server endpoint"
    );
    set(json!({"tls-creds": "srv", "tls-authz": "auth0", "tls-hostname": null}));
    match h.tls_setup(Role::Destination).unwrap() {
        Some(TlsSetup::Server(s)) => {
            assert_eq!(s.authz.as_deref(), Some("CN=client"));
            assert_eq!(s.creds_id, "srv");
        }
        _ => panic!("not a server setup"),
    }
    assert_eq!(
        setup_err(&h, Role::Source),
        "Expected TLS credentials for a client endpoint"
    );
    set(json!({"tls-authz": "nope"}));
    assert_eq!(
        setup_err(&h, Role::Destination),
        "Cannot find QAuthZ object ID nope"
    );
    set(json!({"tls-authz": "cli"}));
    assert_eq!(
        setup_err(&h, Role::Destination),
        "Object 'cli' is not a QAuthZ subclass"
    );
    set(json!({"tls-creds": "auth0", "tls-authz": ""}));
    assert_eq!(
        setup_err(&h, Role::Destination),
        "Object with id 'auth0' is not TLS credentials"
    );
    // A migration that resolved its setup keeps it; a new one sees the deletion.
    set(json!({"tls-creds": "srv"}));
    let kept = h.tls_setup(Role::Destination).unwrap();
    run(&h, "object-del", json!({"id": "srv"})).unwrap();
    assert!(matches!(kept, Some(TlsSetup::Server(_))));
    assert_eq!(
        setup_err(&h, Role::Destination),
        "No TLS credentials with id 'srv'"
    );
    // PSK: a client setup from the client's line; the server side needs server creds.
    std::fs::write(client.path().join("keys.psk"), "qemu:00ff\n").unwrap();
    run(
        &h,
        "object-add",
        json!({"qom-type": "tls-creds-psk", "id": "psk0", "dir": client.display()}),
    )
    .unwrap();
    set(json!({"tls-creds": "psk0"}));
    assert!(matches!(
        h.tls_setup(Role::Source).unwrap(),
        Some(TlsSetup::PskClient(_))
    ));
    assert_eq!(
        setup_err(&h, Role::Destination),
        "Expected TLS credentials for a server endpoint"
    );
    run(
        &h,
        "object-add",
        json!({"qom-type": "tls-creds-psk", "id": "psk1", "dir": client.display(),
               "endpoint": "server"}),
    )
    .unwrap();
    set(json!({"tls-creds": "psk1", "tls-authz": "nowhere"}));
    assert_eq!(
        setup_err(&h, Role::Destination),
        "Cannot find QAuthZ object ID nowhere"
    );
    set(json!({"tls-authz": ""}));
    assert!(matches!(
        h.tls_setup(Role::Destination).unwrap(),
        Some(TlsSetup::PskServer(_))
    ));
    // "" turns TLS off again.
    set(json!({"tls-creds": ""}));
    assert!(h.tls_setup(Role::Source).unwrap().is_none());
}

#[test]
fn tls_parameters_are_strings_or_null_and_always_shown() {
    let h = helper();
    let q = run(&h, "query-migrate-parameters", json!({})).unwrap();
    for name in ["tls-creds", "tls-hostname", "tls-authz"] {
        assert_eq!(q[name], "", "{name}");
    }
    run(
        &h,
        "migrate-set-parameters",
        json!({"tls-creds": "t", "tls-hostname": "h", "tls-authz": "a"}),
    )
    .unwrap();
    let q = run(&h, "query-migrate-parameters", json!({})).unwrap();
    assert_eq!(
        (&q["tls-creds"], &q["tls-hostname"], &q["tls-authz"]),
        (&json!("t"), &json!("h"), &json!("a"))
    );
    run(&h, "migrate-set-parameters", json!({"tls-creds": null})).unwrap();
    let q = run(&h, "query-migrate-parameters", json!({})).unwrap();
    assert_eq!(q["tls-creds"], "");
    assert_eq!(q["tls-hostname"], "h");
    assert_eq!(
        desc(run(&h, "migrate-set-parameters", json!({"tls-creds": 1}))),
        "Invalid parameter type for 'tls-creds', expected: string or null"
    );
    assert!(desc(run(
        &h,
        "migrate-set-parameters",
        json!({"tls-hostname": "h".repeat(256)})
    ))
    .contains("at most 255 bytes"));
    // The reply lists exactly the parameters the command takes.
    let keys: Vec<&str> = q.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, crate::control::protocol::PARAMETERS);
}
