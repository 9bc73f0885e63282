//! `qemu-migration-helper analyze` on the real QEMU fixtures: the facts their README states.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use support::helper::helper_bin;
use support::util::TempDir;

fn fixture(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/qemu-streams/"
    ))
    .join(name);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("QMH_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("fixture {} is missing", p.display());
    }
    eprintln!("SKIP analyze {name}: fixture {} not found", p.display());
    None
}

/// `analyze PATH --json extra...`, which must succeed: its report (kvm_vmm.rs uses it too).
pub(crate) fn analyze_json(path: &Path, extra: &[&str]) -> Value {
    let out = Command::new(helper_bin())
        .arg("analyze")
        .arg(path)
        .arg("--json")
        .args(extra)
        .output()
        .expect("run analyze");
    assert!(
        out.status.success(),
        "analyze failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("analyze --json prints JSON")
}

/// `analyze PATH`, which must fail: what it says on stderr.
fn analyze_fails(path: &Path) -> String {
    let out = Command::new(helper_bin())
        .arg("analyze")
        .arg(path)
        .output()
        .expect("run analyze");
    assert!(
        !out.status.success(),
        "analyze {} succeeded",
        path.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The FULL (device) sections of an analysis.
fn full_sections(v: &Value) -> Vec<&Value> {
    v["sections"]
        .as_array()
        .expect("analyze lists the sections")
        .iter()
        .filter(|s| s["type"] == "FULL")
        .collect()
}

#[test]
fn analyze_none_16m_pattern_fixtures() {
    for name in [
        "none-16M-pattern-qemu10.0.bin",
        "none-16M-pattern-qemu7.2.bin",
    ] {
        let Some(path) = fixture(name) else { continue };
        let dir = TempDir::new("qmh-analyze");
        let v = analyze_json(&path, &["--extract-ram", dir.path().to_str().unwrap()]);
        assert_eq!(v["machine"], "none", "{name}");
        assert_eq!(v["ram"][0]["block"], "ram");
        assert_eq!(v["ram"][0]["length"], 16 << 20);
        assert_eq!(
            v["ram"][0]["zero-pages"], 1024,
            "every fourth page of 4096 is zero"
        );
        let idstrs: Vec<&str> = full_sections(&v)
            .iter()
            .map(|s| s["idstr"].as_str().unwrap())
            .collect();
        assert_eq!(idstrs, vec!["timer", "globalstate"], "{name}");
        assert!(v["vm-description-size"].as_u64().unwrap() > 0);
        // The documented pattern, through --extract-ram.
        let ram = std::fs::read(dir.join("ram")).expect("extracted block");
        assert_eq!(ram.len(), 16 << 20);
        for (i, page) in ram.chunks(4096).enumerate() {
            let mut want = [0u8; 4096];
            if i % 4 != 0 {
                want[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            }
            assert!(
                page == want,
                "{name}: page {i} differs from the documented pattern"
            );
        }
    }
}

#[test]
fn analyze_pc_q35_fixtures() {
    for (name, machine) in [
        ("pc-128M-qemu10.0.bin", "pc-i440fx-10.0"),
        ("pc-128M-qemu7.2.bin", "pc-i440fx-7.2"),
        ("q35-128M-qemu10.0.bin", "pc-q35-10.0"),
    ] {
        let Some(path) = fixture(name) else { continue };
        let v = analyze_json(&path, &[]);
        assert_eq!(v["machine"], machine);
        let pc_ram = v["ram"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["block"] == "pc.ram")
            .expect("pc.ram");
        assert_eq!(pc_ram["length"], 128 << 20, "{name}");
        let full = full_sections(&v);
        assert!(full.len() >= 25, "{name}: {} device sections", full.len());
        let decoded = full.iter().filter(|s| s["fields"].is_object()).count();
        assert_eq!(
            decoded,
            full.len(),
            "{name}: every device section decodes with the VM description"
        );
        if name.starts_with("q35") {
            assert!(
                full.iter()
                    .any(|s| s["idstr"].as_str().unwrap_or("").contains("virtio-net")),
                "{name}"
            );
        }
    }
}

/// A damaged file gets a clear error that says where.
#[test]
fn analyze_damaged_file_says_where() {
    let Some(path) = fixture("pc-128M-qemu10.0.bin") else {
        return;
    };
    let mut data = std::fs::read(&path).unwrap();
    let dir = TempDir::new("qmh-analyze-bad");
    let cut = dir.join("cut.bin");
    std::fs::write(&cut, &data[..data.len() / 2]).unwrap();
    let e = analyze_fails(&cut);
    assert!(e.contains("offset"), "{e}");
    // A RAM record with unknown flags, right after the RAM START.
    data[0x45..0x4d].copy_from_slice(&0x800u64.to_be_bytes());
    let bad = dir.join("bad.bin");
    std::fs::write(&bad, &data).unwrap();
    let e = analyze_fails(&bad);
    assert!(e.contains("offset") && e.contains("section"), "{e}");
}

/// A real QEMU 10.0 save with mapped-ram (to `file:PATH`, `file:PATH,offset=N`, and with
/// multifd's two file channels), analysed and extracted: the extracted block equals the
/// guest's RAM, zero pages are holes, the stream goes on after the pages.
#[test]
fn analyze_qemu_mapped_ram_saves() {
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;
    use support::qemu::{require_qemu, MappedRamSave, Qemu, QemuVm, VmOpts};
    use support::util::{assert_same_memory, fill_mixed, test_seed, MIB};

    let test = "analyze_qemu_mapped_ram_saves";
    if require_qemu(Qemu::V10, test).is_none() {
        return;
    }
    const RAM: u64 = 64 * MIB;
    let dir = TempDir::new("qmh-analyze-mr");
    for (name, offset, multifd) in [
        ("plain", 0u64, false),
        ("offset", 0x5000, false),
        ("multifd", 0, true),
    ] {
        let mut vm = QemuVm::start(Qemu::V10, RAM, &VmOpts::default());
        let zeros = fill_mixed(&mut vm.ram_mmap(), test_seed(test), 0.5) as u64;
        let file = dir.join(&format!("{name}.bin"));
        let how = MappedRamSave {
            offset,
            channels: if multifd { 2 } else { 0 },
            direct_io: false,
        };
        vm.save_mapped_ram(&file, how, Duration::from_secs(120))
            .expect("QEMU saves");
        let out = dir.join(&format!("{name}.ram"));
        let mut args = vec!["--extract-ram".to_string(), out.display().to_string()];
        if offset > 0 {
            args.extend(["--offset".into(), offset.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = analyze_json(&file, &args);
        assert_eq!(
            v["capabilities"],
            serde_json::json!(["mapped-ram"]),
            "{name}"
        );
        assert_eq!(v["stream-offset"], offset, "{name}");
        let b = &v["ram"][0];
        assert_eq!(b["block"], "ram");
        assert_eq!(b["pages"], RAM / 4096);
        assert_eq!(
            b["zero-pages"], zeros,
            "{name}: the bitmap's clear bits are the zero pages"
        );
        let m = &b["mapped-ram"];
        assert_eq!(m["version"], 1);
        assert_eq!(m["page-size"], 4096);
        assert_eq!(m["pages-with-data"], RAM / 4096 - zeros);
        assert_eq!(m["pages-offset"].as_u64().unwrap() % (1 << 20), 0);
        let types: Vec<&str> = v["sections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["type"].as_str().unwrap())
            .collect();
        assert!(
            types.contains(&"FULL") && types.last() == Some(&"EOF"),
            "{name}: {types:?}"
        );
        assert!(v["vm-description-size"].as_u64().unwrap() > 0);
        let ram = std::fs::read(out.join("ram")).expect("extracted block");
        assert_same_memory(&vm.ram_mmap(), &ram, test);
        let allocated = std::fs::metadata(out.join("ram")).unwrap().blocks() * 512;
        assert!(
            allocated <= RAM - zeros * 4096 + (1 << 20),
            "{name}: zero pages are holes ({allocated} bytes allocated)"
        );
        // Without --offset, a save at an offset says where the stream is.
        if offset > 0 {
            let e = analyze_fails(&file);
            assert!(e.contains(&format!("--offset {offset}")), "{e}");
        }
    }
}
