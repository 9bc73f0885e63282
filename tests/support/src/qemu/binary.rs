//! Finding and version-checking the QEMU binaries, and the accelerator to run them with.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const DEFAULT_QEMU72_DIR: &str = "/var/cache/qemu-migration-helper/qemu-7.2";

/// The QEMU versions the project interoperates with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qemu {
    V10,
    V72,
}

/// A located, version-checked QEMU binary and the environment it needs.
#[derive(Debug, Clone)]
pub struct QemuBinary {
    pub qemu: Qemu,
    pub path: PathBuf,
    pub env: Vec<(OsString, OsString)>,
    /// First line of `--version`.
    pub version_line: String,
}

impl QemuBinary {
    /// A `Command` for this binary with its environment set.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.path);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

impl Qemu {
    pub fn name(self) -> &'static str {
        match self {
            Qemu::V10 => "QEMU 10.0",
            Qemu::V72 => "QEMU 7.2",
        }
    }

    /// Locates and version-checks the binary (cached per process). `None` when it is
    /// missing or reports another version; `binary_problem` says why.
    pub fn binary(self) -> Option<QemuBinary> {
        self.lookup().as_ref().ok().cloned()
    }

    /// Why `binary()` is `None`, or `None` when the binary is there.
    pub fn binary_problem(self) -> Option<String> {
        self.lookup().as_ref().err().cloned()
    }

    fn lookup(self) -> &'static Result<QemuBinary, String> {
        static V10: OnceLock<Result<QemuBinary, String>> = OnceLock::new();
        static V72: OnceLock<Result<QemuBinary, String>> = OnceLock::new();
        match self {
            Qemu::V10 => V10.get_or_init(|| {
                let path = std::env::var_os("QMH_QEMU10")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
                probe(self, path, Vec::new(), "version 10.")
            }),
            Qemu::V72 => V72.get_or_init(|| {
                let dir = std::env::var_os("QMH_QEMU72_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU72_DIR));
                let path = dir.join("usr/bin/qemu-system-x86_64");
                if !path.exists() {
                    return Err(format!("{} does not exist", path.display()));
                }
                let env = vec![(
                    OsString::from("QEMU_MODULE_DIR"),
                    dir.join("usr/lib/x86_64-linux-gnu/qemu").into_os_string(),
                )];
                probe(self, path, env, "version 7.2")
            }),
        }
    }
}

fn probe(
    qemu: Qemu,
    path: PathBuf,
    env: Vec<(OsString, OsString)>,
    want: &str,
) -> Result<QemuBinary, String> {
    let mut bin = QemuBinary {
        qemu,
        path,
        env,
        version_line: String::new(),
    };
    let out = bin
        .command()
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").to_string();
    if !out.status.success() || !line.contains(want) {
        return Err(format!(
            "{} --version said {line:?} ({}), want {want:?}",
            bin.path.display(),
            out.status
        ));
    }
    bin.version_line = line;
    Ok(bin)
}

/// The binary for `qemu`, or `None` after printing a SKIP line for `test` to stderr.
/// With `QMH_REQUIRE_QEMU=1` a missing binary panics instead.
pub fn require_qemu(qemu: Qemu, test: &str) -> Option<QemuBinary> {
    match qemu.lookup() {
        Ok(b) => Some(b.clone()),
        Err(why) => {
            if std::env::var("QMH_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!(
                    "{test}: {} not found ({why}) and QMH_REQUIRE_QEMU=1 \
                     (run tests/install-deps.sh)",
                    qemu.name()
                );
            }
            // Straight to the stderr handle, past libtest's output capture, so that a
            // skip shows even when the test "passes".
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {test}: {} not found (run tests/install-deps.sh): {why}",
                qemu.name()
            );
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// `QMH_ACCEL` if set, else KVM when /dev/kvm opens read-write, else TCG.
    pub fn detect() -> Accel {
        match std::env::var("QMH_ACCEL").as_deref() {
            Ok("kvm") => return Accel::Kvm,
            Ok("tcg") => return Accel::Tcg,
            Ok(other) => panic!("QMH_ACCEL={other:?}: want kvm or tcg"),
            Err(_) => {}
        }
        if Accel::detect_kvm() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// Whether /dev/kvm opens read-write.
    pub fn detect_kvm() -> bool {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
    }

    pub fn arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}
