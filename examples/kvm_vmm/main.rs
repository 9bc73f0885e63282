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
//! Options (both sides): `--ram-mib N` (64; the same on both), `--pace-ms N` (1: the vCPU
//! sleeps after each pass, leaving CPU time to the helpers), `--helper PATH` (else
//! `QMH_HELPER_BIN`, else the helper beside target/<profile>/examples), `--timeout-s N`
//! (120). Source: `--max-bandwidth BYTES_PER_S` (0 = unlimited), `--auto-converge` (the
//! vCPU is throttled as the helper's CPU_THROTTLE events ask), `--param NAME=VALUE` (any
//! other `migrate-set-parameters`, e.g. `--param cpu-throttle-initial=60`).
//! Destination: `--passes N` (20): passes the guest must finish after migration.

mod cpu_state;
mod destination;
mod dirty;
mod error;
mod guest;
mod helper;
mod source;
mod vcpu;
mod vm;

use std::path::PathBuf;
use std::time::Duration;

use error::VmmError;

pub(crate) struct Options {
    ram_size: u64,
    pace: Duration,
    helper: PathBuf,
    timeout: Duration,
    max_bandwidth: u64,
    auto_converge: bool,
    passes: u64,
    /// `--param NAME=VALUE`: more `migrate-set-parameters` for the source's helper.
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
        pace: Duration::from_millis(1),
        helper: helper::default_binary(),
        timeout: Duration::from_secs(120),
        max_bandwidth: 0,
        auto_converge: false,
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
            "--pace-ms" => opts.pace = Duration::from_millis(number(&value()?)?),
            "--helper" => opts.helper = PathBuf::from(value()?),
            "--timeout-s" => opts.timeout = Duration::from_secs(number(&value()?)?),
            "--max-bandwidth" => opts.max_bandwidth = number(&value()?)?,
            "--passes" => opts.passes = number(&value()?)?,
            "--auto-converge" => opts.auto_converge = true,
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
