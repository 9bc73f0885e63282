//! The example VMM on KVM (examples/kvm_vmm, issue 15): a running guest migrated between
//! two VMM processes, each with its own helper. The guest checks its own memory (no page
//! may fall behind its neighbour); both sides must report no failed check, and the
//! destination must carry on from exactly the pass the source stopped in.
//!
//! The example is built here with `cargo build --example kvm-vmm` in this test's profile
//! and target directory: `cargo test --test interop` does not build examples, and
//! `CARGO_BIN_EXE_*` names only binaries. Building (a no-op when it is up to date) rather
//! than taking whatever lies in target/<profile>/examples means the test never runs a
//! stale VMM. `QMH_KVM_VMM_BIN` names a prebuilt one instead.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use support::helper::helper_bin;
use support::util::TempDir;

/// Why KVM cannot be used here, if it cannot.
fn kvm_missing() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm: {e}")),
    }
}

/// What cargo sets for a test run beside `CARGO_PKG_*` (not what a user set for the build,
/// such as CARGO_TARGET_DIR or CARGO_BUILD_JOBS).
const CARGO_TEST_VARS: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_CRATE_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
];

/// Builds the example in this test's profile (its directory is the helper's) and returns
/// its path.
fn vmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QMH_KVM_VMM_BIN") {
        return PathBuf::from(p);
    }
    let profile_dir = helper_bin().parent().expect("the helper's directory");
    let target_dir = profile_dir.parent().expect("the target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => panic!("no profile in {}", profile_dir.display()),
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cargo = Command::new(env!("CARGO"));
    // Cargo gives this test the package's variables; a build script that tracks one (ring's
    // tracks CARGO_MANIFEST_DIR) would see it changed from the outer build and rebuild the
    // whole tree, here and again in the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("CARGO_PKG_") || CARGO_TEST_VARS.contains(&name.as_str()) {
            cargo.env_remove(name);
        }
    }
    let status = cargo
        .args([
            "build",
            "--quiet",
            "--example",
            "kvm-vmm",
            "--profile",
            profile,
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .expect("running cargo build --example kvm-vmm");
    assert!(status.success(), "cargo build --example kvm-vmm: {status}");
    profile_dir.join("examples").join("kvm-vmm")
}

/// A VMM process, killed if the test ends early.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `key=value` pairs of the first `result:` line in `lines`.
fn result_line(lines: &[String]) -> HashMap<String, u64> {
    let line = lines
        .iter()
        .find_map(|l| l.strip_prefix("result: "))
        .unwrap_or_else(|| panic!("no result line in {lines:?}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// Reads the destination's stdout up to its "listening" line.
fn wait_listening(out: &mut BufReader<ChildStdout>) {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("reading the destination");
        assert!(n > 0, "the destination exited before listening");
        if line.contains("listening on") {
            return;
        }
    }
}

/// What both sides of one migration printed, and whether they succeeded.
struct Outcome {
    src_ok: bool,
    src: Vec<String>,
    dst_ok: bool,
    dst: Vec<String>,
}

/// Runs a destination and a source VMM over a unix socket, with `common` arguments for
/// both and `src_args`/`dst_args` for each.
fn migrate(vmm: &Path, common: &[&str], src_args: &[&str], dst_args: &[&str]) -> Outcome {
    let dir = TempDir::new("kvm-vmm");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vmm(Command::new(vmm)
        .args(["destination", "--listen", &uri])
        .args(common)
        .args(dst_args)
        .env("QMH_HELPER_BIN", helper_bin())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the destination VMM"));
    let mut dst_out = BufReader::new(dst.0.stdout.take().expect("piped stdout"));
    wait_listening(&mut dst_out);

    let src = Command::new(vmm)
        .args(["source", "--connect", &uri])
        .args(common)
        .args(src_args)
        .env("QMH_HELPER_BIN", helper_bin())
        .stderr(Stdio::inherit())
        .output()
        .expect("running the source VMM");
    let src_lines = String::from_utf8_lossy(&src.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if !src.status.success() {
        // The destination would wait for a migration that is not coming.
        let _ = dst.0.kill();
    }
    let dst_lines = dst_out.lines().map_while(Result::ok).collect();
    let dst_status = dst.0.wait().expect("waiting for the destination");
    Outcome {
        src_ok: src.status.success(),
        src: src_lines,
        dst_ok: dst_status.success(),
        dst: dst_lines,
    }
}

/// Both sides succeeded, neither saw a failed guest check, and the guest carried on from
/// where the source stopped it. Returns the two result lines.
fn assert_guest_carried_on(o: &Outcome, passes_after: u64) -> [HashMap<String, u64>; 2] {
    assert!(o.src_ok, "source failed: {:?}", o.src);
    assert!(o.dst_ok, "destination failed: {:?}", o.dst);
    let s = result_line(&o.src);
    let d = result_line(&o.dst);
    eprintln!("source {s:?}\ndestination {d:?}");
    assert_eq!(
        s["violations"], 0,
        "the guest's checks failed on the source"
    );
    assert_eq!(
        d["violations"], 0,
        "the guest's checks failed after migration"
    );
    assert!(
        s["last-pass"] >= 3,
        "the guest ran before the migration: {s:?}"
    );
    assert!(d["passes"] >= passes_after, "the guest kept running: {d:?}");
    // Registers arrived: the destination resumed with the pass counter the source stopped
    // with, and its first finished pass is the one after the source's last.
    assert_eq!(d["resumed-rdi"], s["stopped-rdi"]);
    assert_eq!(d["first-pass"], s["last-pass"] + 1, "{s:?} {d:?}");
    [s, d]
}

#[test]
fn kvm_vmm_precopy_guest_keeps_running() {
    if let Some(why) = kvm_missing() {
        eprintln!("SKIP kvm_vmm_precopy_guest_keeps_running: {why}");
        return;
    }
    let o = migrate(
        &vmm_bin(),
        &["--ram-mib", "64", "--timeout-s", "60"],
        &[],
        &["--passes", "30"],
    );
    assert_guest_carried_on(&o, 30);
}

/// A guest that rewrites 15 MiB about every 50 ms (here), over a link of 8 MiB/s: it
/// converges only because the VMM throttles its vCPU as the helper's CPU_THROTTLE events
/// ask (started high so that it takes ~10 s, not a minute), and without auto-converge it
/// does not within a little more than that.
#[test]
fn kvm_vmm_auto_converge_throttles_the_vcpu() {
    if let Some(why) = kvm_missing() {
        eprintln!("SKIP kvm_vmm_auto_converge_throttles_the_vcpu: {why}");
        return;
    }
    let vmm = vmm_bin();
    let fast_guest = [
        "--ram-mib",
        "16",
        "--pace-ms",
        "0",
        "--max-bandwidth",
        "8388608",
    ];
    let mut with: Vec<&str> = fast_guest.to_vec();
    with.extend([
        "--auto-converge",
        "--param",
        "cpu-throttle-initial=60",
        "--param",
        "cpu-throttle-increment=20",
        "--timeout-s",
        "90",
    ]);
    let o = migrate(&vmm, &["--ram-mib", "16"], &with, &["--passes", "10"]);
    let [s, _] = assert_guest_carried_on(&o, 10);
    assert!(s["max-throttle"] >= 60, "the vCPU was throttled: {s:?}");

    let mut without: Vec<&str> = fast_guest.to_vec();
    without.extend(["--timeout-s", "15"]);
    let o = migrate(&vmm, &["--ram-mib", "16"], &without, &[]);
    assert!(
        !o.src_ok,
        "without auto-converge the migration should not converge in 15 s: {:?}",
        o.src
    );
}
