//! A small VMM on KVM that live-migrates its running guest through two
//! `qemu-migration-helper` processes: how a VMM uses the helper, in one sitting.
//!
//! ```text
//! kvm-vmm destination --listen unix:/tmp/mig.sock      # prints "kvm-vmm: listening on ..."
//! kvm-vmm source --connect unix:/tmp/mig.sock          # (or tcp:HOST:PORT on both)
//! ```
//!
//! The guest (guest.rs) rewrites every page of its RAM in passes and checks that no page
//! fell behind its neighbour; the source migrates it while it runs (source.rs), the
//! destination resumes it and checks that it carries on (destination.rs). Each side prints
//! one `result:` line; each exits non-zero if the guest's checks failed or it stalled.
//!
//! Options (both sides): `--ram-mib N` (64) and `--vcpus N` (2; both the same on both
//! sides), `--pace-ms N` (1: each vCPU sleeps after each pass, leaving CPU time to the
//! helpers), `--helper PATH` (else `QMH_HELPER_BIN`, else the helper beside
//! target/<profile>/examples), `--timeout-s N` (120), `--preempt` (postcopy-preempt; on
//! both sides, as in QEMU), `--param NAME=VALUE` (any other `migrate-set-parameters`,
//! e.g. `--param link-timeout=1000` or `--param cpu-throttle-initial=60`).
//! Source: `--max-bandwidth BYTES_PER_S` (0 = unlimited), `--auto-converge` (the vCPUs
//! are throttled as the helper's CPU_THROTTLE events ask), `--postcopy` (switch to
//! postcopy after `--postcopy-after-ms N`, 300, of precopy), `--max-postcopy-bandwidth
//! BYTES_PER_S` (0), `--slow-us N` (30: the guest reports page steps slower than this).
//! Destination: `--passes N` (20): passes each vCPU must finish after migration. The
//! destination always accepts postcopy: its RAM is registered with a userfaultfd.

mod cpu_state;
mod destination;
mod dirty;
mod error;
mod follow;
mod guest;
mod helper;
mod progress;
mod source;
mod uffd;
mod vcpu;
mod vm;

use std::path::PathBuf;
use std::time::Duration;

use error::VmmError;

pub(crate) struct Options {
    ram_size: u64,
    vcpus: u8,
    pace: Duration,
    helper: PathBuf,
    timeout: Duration,
    max_bandwidth: u64,
    auto_converge: bool,
    postcopy: bool,
    postcopy_after: Duration,
    max_postcopy_bandwidth: u64,
    preempt: bool,
    slow: Duration,
    passes: u64,
    /// `--param NAME=VALUE`: more `migrate-set-parameters` for this side's helper.
    params: serde_json::Map<String, serde_json::Value>,
}

enum Role {
    Source { connect: String },
    Destination { listen: String },
}

fn main() {
    if let Err(e) = parse(std::env::args().skip(1)).and_then(run) {
        eprintln!("kvm-vmm: {e}");
        std::process::exit(1);
    }
}

fn run((role, opts): (Role, Options)) -> Result<(), VmmError> {
    match role {
        Role::Source { connect } => source::run(&opts, &connect),
        Role::Destination { listen } => destination::run(&opts, &listen),
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<(Role, Options), VmmError> {
    let role = args.next().unwrap_or_default();
    let mut opts = Options {
        ram_size: 64 << 20,
        vcpus: 2,
        pace: Duration::from_millis(1),
        helper: helper::default_binary(),
        timeout: Duration::from_secs(120),
        max_bandwidth: 0,
        auto_converge: false,
        postcopy: false,
        postcopy_after: Duration::from_millis(300),
        max_postcopy_bandwidth: 0,
        preempt: false,
        slow: Duration::from_micros(30),
        passes: 20,
        params: serde_json::Map::new(),
    };
    let mut address = None;
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| VmmError::Usage(format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--connect" | "--listen" => address = Some(value()?),
            "--ram-mib" => opts.ram_size = number(&value()?)?.saturating_mul(1 << 20),
            "--vcpus" => {
                opts.vcpus = u8::try_from(number(&value()?)?)
                    .ok()
                    .filter(|n| (1..=8).contains(n))
                    .ok_or_else(|| VmmError::Usage("--vcpus must be 1 to 8".into()))?
            }
            "--pace-ms" => opts.pace = Duration::from_millis(number(&value()?)?),
            "--helper" => opts.helper = PathBuf::from(value()?),
            "--timeout-s" => opts.timeout = Duration::from_secs(number(&value()?)?),
            "--max-bandwidth" => opts.max_bandwidth = number(&value()?)?,
            "--passes" => opts.passes = number(&value()?)?,
            "--auto-converge" => opts.auto_converge = true,
            "--postcopy" => opts.postcopy = true,
            "--postcopy-after-ms" => {
                opts.postcopy_after = Duration::from_millis(number(&value()?)?)
            }
            "--max-postcopy-bandwidth" => opts.max_postcopy_bandwidth = number(&value()?)?,
            "--preempt" => opts.preempt = true,
            "--slow-us" => opts.slow = Duration::from_micros(number(&value()?)?),
            "--param" => {
                let v = value()?;
                let (name, value) = v
                    .split_once('=')
                    .ok_or_else(|| VmmError::Usage(format!("--param {v}: not NAME=VALUE")))?;
                // A number or other JSON value as such, anything else as a string.
                let value = serde_json::from_str(value).unwrap_or_else(|_| value.into());
                opts.params.insert(name.into(), value);
            }
            _ => return Err(VmmError::Usage(format!("unknown option {arg}"))),
        }
    }
    // The region starts at 1 MiB; the 32-bit guest addresses below the TSS KVM needs.
    if !(2 << 20..=3 << 30).contains(&opts.ram_size) {
        return Err(VmmError::Usage("--ram-mib must be 2 to 3072".into()));
    }
    let need = |what: &str| VmmError::Usage(format!("{role} needs {what} unix:PATH|tcp:HOST:PORT"));
    let role = match role.as_str() {
        "source" => Role::Source {
            connect: address.ok_or_else(|| need("--connect"))?,
        },
        "destination" => Role::Destination {
            listen: address.ok_or_else(|| need("--listen"))?,
        },
        _ => {
            return Err(VmmError::Usage(
                "kvm-vmm source --connect ADDR | destination --listen ADDR [options]".into(),
            ))
        }
    };
    Ok((role, opts))
}

fn number(s: &str) -> Result<u64, VmmError> {
    s.parse()
        .map_err(|_| VmmError::Usage(format!("{s:?} is not a number")))
}
