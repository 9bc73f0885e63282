//! The example VMM on KVM (examples/kvm_vmm, issue 15): a running guest with two vCPUs
//! migrated between two VMM processes, each with its own helper, in precopy (with and
//! without auto-converge) and in postcopy (through link cuts, and through helpers killed
//! and respawned). The guest checks its own memory (no page may fall behind its
//! neighbour); both sides must report no failed check, and on the destination each vCPU
//! must carry on from exactly the pass the source stopped it in.

use std::time::Duration;

use support::kvm_vmm::{
    args, destination, finish, kvm_missing, vmm_bin, Outcome, Relay, Vmm, VmmResult,
};
use support::util::TempDir;

const MIB: u64 = 1 << 20;
/// How long a test waits for a line it expects.
const LINE_WAIT: Duration = Duration::from_secs(60);
/// How long a VMM may take to finish after the test's last action.
const FINISH_WAIT: Duration = Duration::from_secs(120);

/// A whole migration without interference: destination, then source connecting to it.
fn migrate(common: &[&str], src_args: &[&str], dst_args: &[&str]) -> Outcome {
    let dir = TempDir::new("kvm-vmm");
    support::kvm_vmm::migrate(
        &vmm_bin(),
        dir.path(),
        &args(common),
        &args(src_args),
        &args(dst_args),
        FINISH_WAIT,
    )
}

/// Both sides succeeded, neither saw a failed guest check, and every vCPU carried on from
/// where the source stopped it. Returns the two result lines.
fn assert_guest_carried_on(o: &Outcome, vcpus: usize, passes_after: u64) -> [VmmResult; 2] {
    let [s, d] = o.results();
    eprintln!("source {s:?}\ndestination {d:?}");
    assert_eq!(
        s.u("violations"),
        0,
        "the guest's checks failed on the source"
    );
    assert_eq!(
        d.u("violations"),
        0,
        "the guest's checks failed after migration"
    );
    assert!(
        d.u("passes") >= passes_after,
        "the guest kept running: {d:?}"
    );
    for i in 0..vcpus {
        assert!(
            s.u(&format!("last-pass.{i}")) >= 3,
            "vCPU {i} ran before the migration"
        );
        // Registers arrived: the destination resumed with the pass counter the source
        // stopped with, and the first pass it finished is the one after the source's last.
        assert_eq!(
            d.u(&format!("resumed-rdi.{i}")),
            s.u(&format!("stopped-rdi.{i}")),
            "vCPU {i}"
        );
        assert_eq!(
            d.u(&format!("first-pass.{i}")),
            s.u(&format!("last-pass.{i}")) + 1,
            "vCPU {i}"
        );
    }
    [s, d]
}

macro_rules! require_kvm {
    ($name:literal) => {
        if let Some(why) = kvm_missing() {
            eprintln!("SKIP {}: {why}", $name);
            return;
        }
    };
}

#[test]
fn kvm_vmm_precopy_guest_keeps_running() {
    require_kvm!("kvm_vmm_precopy_guest_keeps_running");
    let o = migrate(
        &["--ram-mib", "64", "--timeout-s", "60"],
        &[],
        &["--passes", "30"],
    );
    let [s, d] = assert_guest_carried_on(&o, 2, 30);
    assert_eq!(d.u("postcopy"), 0);
    assert_eq!(s.u("pauses"), 0);
}

/// A guest that rewrites 15 MiB about every 100 ms (here), over a link of 8 MiB/s: it
/// converges only because the VMM throttles its vCPUs as the helper's CPU_THROTTLE events
/// ask (started high so that it takes ~10 s, not a minute), and without auto-converge it
/// does not within a little more than that.
#[test]
fn kvm_vmm_auto_converge_throttles_the_vcpu() {
    require_kvm!("kvm_vmm_auto_converge_throttles_the_vcpu");
    let fast_guest = ["--pace-ms", "0", "--max-bandwidth", "8388608"];
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
    let o = migrate(&["--ram-mib", "16"], &with, &["--passes", "10"]);
    let [s, _] = assert_guest_carried_on(&o, 2, 10);
    assert!(s.u("max-throttle") >= 60, "the vCPUs were throttled: {s:?}");

    let mut without: Vec<&str> = fast_guest.to_vec();
    without.extend(["--timeout-s", "15"]);
    let o = migrate(&["--ram-mib", "16"], &without, &[]);
    assert!(
        !o.src_ok,
        "without auto-converge the migration should not converge in 15 s: {:?}",
        o.src
    );
    // A failed migration loses no guest: the source's keeps running, its checks passing.
    let kept = o
        .src
        .iter()
        .find(|l| l.contains("kept running after the failed migration"))
        .unwrap_or_else(|| panic!("the source's guest kept running: {:?}", o.src));
    assert!(kept.contains("2 more passes, 0 failed checks"), "{kept}");
}

/// A postcopy migration through a relay (16 MiB/s towards the destination, so that
/// postcopy lasts several seconds), with the destination's helper and the source's
/// helper set up as `extra` says; `interfere` acts on the link or the helpers while the
/// destination's vCPUs run in postcopy. Returns both result lines.
fn postcopy_through_relay(
    extra: &[&str],
    interfere: impl FnOnce(&Relay, &Vmm, &Vmm),
) -> [VmmResult; 2] {
    let vmm = vmm_bin();
    let dir = TempDir::new("kvm-vmm-pc");
    let mut common = vec!["--ram-mib", "128", "--timeout-s", "90"];
    common.extend(extra);
    let mut d = common.clone();
    d.extend(["--passes", "5"]);
    let (dst, dst_uri) = destination(&vmm, dir.path(), &args(&d), LINE_WAIT);
    let relay_path = dir.join("relay.sock");
    let relay = Relay::new(
        &relay_path,
        std::path::Path::new(dst_uri.trim_start_matches("unix:")),
        16 * MIB,
    );
    let mut s = args(&["--connect", &format!("unix:{}", relay_path.display())]);
    s.extend(args(&common));
    s.extend(args(&["--postcopy", "--postcopy-after-ms", "200"]));
    let src = Vmm::spawn(&vmm, "source", &s);
    dst.wait_line("status postcopy-active", LINE_WAIT);
    interfere(&relay, &src, &dst);
    let o = finish(src, dst, FINISH_WAIT);
    drop(relay);
    let [s, d] = assert_guest_carried_on(&o, 2, 5);
    assert_eq!(s.u("postcopy"), 1, "{s:?}");
    assert_eq!(d.u("postcopy"), 1, "{d:?}");
    assert!(
        d.u("postcopy-requests") > 0,
        "the vCPUs faulted pages in: {d:?}"
    );
    [s, d]
}

/// Postcopy with two link failures while the destination's vCPUs fault pages through the
/// helper: a cut (both ends get an error) and a silent link (only `link-timeout` notices).
/// Each time both ends pause with the vCPUs waiting on their faults, the destination VMM
/// listens again, the source VMM connects again, and the migration resumes.
#[test]
fn kvm_vmm_postcopy_survives_two_link_failures() {
    require_kvm!("kvm_vmm_postcopy_survives_two_link_failures");
    let [s, d] = postcopy_through_relay(&["--param", "link-timeout=1000"], |relay, src, dst| {
        relay.cut();
        dst.wait_line("status postcopy-paused", LINE_WAIT);
        src.wait_line("status postcopy-paused", LINE_WAIT);
        dst.wait_line("status postcopy-active", LINE_WAIT);
        std::thread::sleep(Duration::from_millis(300));
        relay.silence();
        dst.wait_line("status postcopy-paused", LINE_WAIT);
        src.wait_line("status postcopy-paused", LINE_WAIT);
        dst.wait_line("status postcopy-active", LINE_WAIT);
    });
    assert_eq!(d.u("pauses"), 2, "{d:?}");
    assert_eq!(s.u("pauses"), 2, "{s:?}");
}

/// Postcopy with each side's helper killed (SIGKILL) in turn: the VMM starts a new helper
/// with the same guest RAM (and, on the destination, the same userfaultfd), and the new
/// helper adopts the paused migration.
#[test]
fn kvm_vmm_postcopy_survives_killed_helpers() {
    require_kvm!("kvm_vmm_postcopy_survives_killed_helpers");
    let kill = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the helper");
    };
    let [s, d] = postcopy_through_relay(&[], |_, src, dst| {
        // Killed once it has told its VMM that postcopy began (before, it is fatal).
        src.wait_line("status postcopy-active", LINE_WAIT);
        kill(src.helper_pid());
        src.wait_line("helper respawned", LINE_WAIT);
        dst.wait_line("status postcopy-paused", LINE_WAIT);
        dst.wait_line("status postcopy-active", LINE_WAIT);
        std::thread::sleep(Duration::from_millis(300));
        kill(dst.helper_pid());
        dst.wait_line("helper respawned", LINE_WAIT);
        dst.wait_line("status postcopy-active", LINE_WAIT);
    });
    assert_eq!(s.u("helper-respawns"), 1, "{s:?}");
    assert_eq!(d.u("helper-respawns"), 1, "{d:?}");
}

/// The vCPU state as a device section with a VM description: a migration saved to a file
/// (`file:` URI, no destination) shows each vCPU's section with its fields decoded in
/// `analyze`, with the registers the source stopped the vCPUs with.
#[test]
fn kvm_vmm_vcpu_state_shows_in_analyze() {
    require_kvm!("kvm_vmm_vcpu_state_shows_in_analyze");
    let vmm = vmm_bin();
    let dir = TempDir::new("kvm-vmm-file");
    let file = dir.join("vm.mig");
    let src = Vmm::spawn(
        &vmm,
        "source",
        &args(&[
            "--connect",
            &format!("file:{}", file.display()),
            "--ram-mib",
            "16",
        ]),
    );
    let (ok, lines) = src.finish(FINISH_WAIT);
    assert!(ok, "source failed: {lines:?}");
    let s = VmmResult::from_lines(&lines);
    let v = crate::analyze::analyze_json(&file, &[]);
    let cpus: Vec<&serde_json::Value> = v["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .filter(|x| x["type"] == "FULL" && x["idstr"] == "kvm-vmm/cpu")
        .collect();
    assert_eq!(cpus.len(), 2, "one section per vCPU: {cpus:?}");
    for (i, cpu) in cpus.iter().enumerate() {
        let fields = cpu["fields"].as_object().expect("fields decoded");
        assert_eq!(fields.len(), 170, "vCPU {i}");
        assert_eq!(cpu["instance-id"], i as u64);
        assert_eq!(fields["rdi"], s.u(&format!("stopped-rdi.{i}")), "vCPU {i}");
        let rip = fields["rip"].as_u64().expect("rip");
        assert!(
            (0x1000..0x1041).contains(&rip),
            "vCPU {i} stopped in the program: {rip:#x}"
        );
    }
}
