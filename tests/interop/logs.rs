//! Operators' logs: with `--log-format json` every stderr line is one JSON object; state
//! changes are logged, and each migration ends with a summary line carrying its figures.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use support::helper::HelperVm;
use support::migrate::start_fd_migration;
use support::util::{fill_mixed, TempDir, MIB};

#[test]
fn json_logs_with_state_changes_and_a_summary() {
    let dir = TempDir::new("qmh-logs");
    let mut helpers: Vec<HelperVm> = (0..2)
        .map(|i| {
            let log = std::fs::File::create(dir.join(&format!("log{i}"))).expect("log file");
            let args = ["--log-format", "json", "--log-level", "info"];
            let mut h = HelperVm::spawn_on_socket(&args, Stdio::from(log));
            h.add_block("ram", 8 * MIB, false);
            h
        })
        .collect();
    fill_mixed(&mut helpers[0].blocks[0].mem.map(), 5, 0.5);
    let [src, dst] = &mut helpers[..] else {
        unreachable!("two helpers")
    };
    src.client
        .set_parameters(json!({"max-bandwidth": 0}))
        .expect("params");
    start_fd_migration(&mut src.client, &mut dst.client);
    for h in helpers.iter_mut() {
        h.client
            .wait_for_status(&["completed"], Duration::from_secs(60))
            .expect("completed");
        h.quit_and_wait(Duration::from_secs(60));
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
