//! Operators' logs: with `--log-format json` every stderr line is one JSON object; state
//! changes are logged, and each migration ends with a summary line carrying its figures.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use qemu_migration_helper::client::{HelperClient, RamBlockSpec};
use serde_json::{json, Value};

use support::helper::{helper_bin, start_fd_migration, Memfd};
use support::util::{fill_mixed, TempDir, MIB};

#[test]
fn json_logs_with_state_changes_and_a_summary() {
    let dir = TempDir::new("qmh-logs");
    let mut children = Vec::new();
    let mut clients = Vec::new();
    let mems: Vec<Memfd> = (0..2).map(|_| Memfd::new("logs", 8 * MIB)).collect();
    fill_mixed(&mut mems[0].map(), 5, 0.5);
    for (i, mem) in mems.iter().enumerate() {
        let sock = dir.join(&format!("ctl{i}"));
        let log = std::fs::File::create(dir.join(&format!("log{i}"))).expect("log file");
        let child = Command::new(helper_bin())
            .args([
                "--control-socket",
                sock.to_str().unwrap(),
                "--log-format",
                "json",
                "--log-level",
                "info",
            ])
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn");
        children.push(child);
        let mut c = HelperClient::connect(&sock).expect("connect");
        c.getfd("m", mem.fd.as_fd()).expect("getfd");
        c.ram_block_add(&RamBlockSpec {
            id: "ram".into(),
            fdname: "m".into(),
            offset: 0,
            size: 8 * MIB,
            ..Default::default()
        })
        .expect("block");
        clients.push(c);
    }
    clients[0]
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    let [src, dst] = &mut clients[..] else {
        unreachable!("two helpers")
    };
    start_fd_migration(src, dst);
    for c in clients.iter_mut() {
        c.wait_for_status(&["completed"], Duration::from_secs(60))
            .expect("completed");
        c.quit().expect("quit");
    }
    for mut ch in children {
        let _ = ch.wait();
    }
    for (i, role) in [(0, "source"), (1, "destination")] {
        let text = std::fs::read_to_string(dir.join(&format!("log{i}"))).expect("log");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert!(
            lines
                .iter()
                .all(|l| l["msg"].is_string() && l["level"].is_string()),
            "{text}"
        );
        let states: Vec<&str> = lines
            .iter()
            .filter(|l| l["msg"] == "migration status")
            .map(|l| l["to"].as_str().unwrap_or(""))
            .collect();
        assert!(
            states.contains(&"active") && states.contains(&"completed"),
            "{role}: {states:?}"
        );
        let summary = lines
            .iter()
            .find(|l| l["msg"] == "migration summary")
            .unwrap_or_else(|| panic!("{role}: no summary line in {text}"));
        assert_eq!(summary["role"], role);
        for k in [
            "bytes",
            "pages",
            "zero_pages",
            "secs",
            "rate_mbps",
            "postcopy_requests",
        ] {
            assert!(
                summary.get(k).is_some(),
                "{role}: summary lacks {k}: {summary}"
            );
        }
        if role == "source" {
            assert!(summary.get("downtime_ms").is_some(), "{summary}");
        }
    }
}
