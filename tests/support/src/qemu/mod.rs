//! Running real QEMU processes for the interop tests and benchmarks: finding the binaries,
//! starting a VM whose RAM the test can map, and talking QMP to it with the library's own
//! client (`HelperClient` speaks QMP; QEMU's monitor is QMP too).
//!
//! Environment:
//! - `QMH_QEMU10`: QEMU 10 binary (default `qemu-system-x86_64` on PATH).
//! - `QMH_QEMU72_DIR`: where QEMU 7.2 is unpacked (default
//!   `/var/cache/qemu-migration-helper/qemu-7.2`).
//! - `QMH_REQUIRE_QEMU=1`: a missing QEMU fails the test instead of skipping it.
//! - `QMH_ACCEL=kvm|tcg`: force the accelerator (default: KVM when /dev/kvm opens
//!   read-write, else TCG).

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use qemu_migration_helper::client::HelperClient;
use serde_json::{json, Value};

use crate::map::RamMap;
use crate::util::{unique_name, TempDir};

mod binary;

pub use binary::{require_qemu, Accel, Qemu, QemuBinary};

/// How long QEMU may take from spawn to QMP greeting. (A command's reply may take the
/// client's default timeout, `qemu_migration_helper::client::DEFAULT_TIMEOUT`, 30 s.)
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `QemuVm::wait_migration` asks `query-migrate`.
const STATUS_POLL: Duration = Duration::from_millis(20);

/// Options for `QemuVm::start`.
#[derive(Debug, Clone, Default)]
pub struct VmOpts {
    /// Add `-incoming defer` (a destination; start it with `migrate-incoming`).
    pub incoming_defer: bool,
    /// Accelerator; `None` = `Accel::detect()`.
    pub accel: Option<Accel>,
    /// Extra command-line arguments appended last.
    pub extra_args: Vec<String>,
    /// Allocate and touch all guest RAM at start (`prealloc=on`).
    pub prealloc: bool,
}

impl VmOpts {
    /// Options for a destination started with `-incoming defer`.
    pub fn incoming() -> VmOpts {
        VmOpts {
            incoming_defer: true,
            ..VmOpts::default()
        }
    }
}

/// How `QemuVm::save_mapped_ram` saves.
#[derive(Debug, Clone, Copy, Default)]
pub struct MappedRamSave {
    /// Where the stream starts in the file (`file:PATH,offset=N`); the bytes before it are
    /// a caller's header, written here as 0x5a (QEMU keeps them).
    pub offset: u64,
    /// multifd channels (one more fd each on the file); 0: multifd off.
    pub channels: u8,
    /// `direct-io`: the multifd channels write with O_DIRECT.
    pub direct_io: bool,
}

/// A running QEMU with `-M none`, one RAM block `ram` backed by a shared file in /dev/shm,
/// and a QMP socket. Dropping it kills QEMU and removes the RAM file and its temp dir.
///
/// QEMU gets `PR_SET_PDEATHSIG(SIGKILL)` so it does not outlive a killed test binary; as
/// that signal follows the *thread* that spawned it, start a VM on a thread that lives at
/// least as long as the VM.
pub struct QemuVm {
    binary: QemuBinary,
    child: Child,
    /// `None` only until the handshake in `try_start` is done.
    qmp: Option<HelperClient>,
    ram_path: PathBuf,
    ram_size: u64,
    stderr_path: PathBuf,
    accel: Accel,
    // Dropped last (fields drop in order, after `Drop::drop`).
    dir: TempDir,
}

impl QemuVm {
    /// Starts a VM, panicking with QEMU's stderr on failure.
    pub fn start(qemu: Qemu, ram_size: u64, opts: &VmOpts) -> QemuVm {
        QemuVm::try_start(qemu, ram_size, opts)
            .unwrap_or_else(|e| panic!("starting {}: {e}", qemu.name()))
    }

    pub fn try_start(qemu: Qemu, ram_size: u64, opts: &VmOpts) -> Result<QemuVm, String> {
        let binary = qemu
            .binary()
            .ok_or_else(|| qemu.binary_problem().unwrap_or_default())?;
        static SWEPT: OnceLock<()> = OnceLock::new();
        SWEPT.get_or_init(|| {
            sweep_stale(Path::new("/dev/shm"), RAM_PREFIX);
            sweep_stale(&std::env::temp_dir(), DIR_PREFIX);
        });
        let dir = TempDir::new(DIR_PREFIX);
        let ram_path = PathBuf::from("/dev/shm").join(unique_name(RAM_PREFIX));
        let qmp_path = dir.join("qmp.sock");
        if qmp_path.as_os_str().len() >= 108 {
            return Err(format!(
                "QMP socket path {} is too long for a unix socket; set TMPDIR shorter",
                qmp_path.display()
            ));
        }
        let stderr_path = dir.join("qemu.stderr");
        let accel = opts.accel.unwrap_or_else(Accel::detect);
        static ANNOUNCED: OnceLock<()> = OnceLock::new();
        ANNOUNCED.get_or_init(|| {
            // Once per process, past libtest's capture.
            let _ = writeln!(
                std::io::stderr(),
                "interop: QEMU accelerator {} (/dev/kvm {}; QMH_ACCEL overrides)",
                accel.arg(),
                if Accel::detect_kvm() {
                    "usable"
                } else {
                    "not usable"
                }
            );
        });

        let mut cmd = binary.command();
        cmd.args(["-M", "none", "-m"])
            .arg(ram_size.to_string() + "B")
            .args(["-nodefaults", "-display", "none", "-S", "-name"])
            .arg(dir.path().file_name().unwrap())
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=ram,size={ram_size}B,mem-path={},share=on{}",
                ram_path.display(),
                if opts.prealloc { ",prealloc=on" } else { "" }
            ))
            .args(["-machine", "memory-backend=ram", "-accel", accel.arg()])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if opts.incoming_defer {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.args(&opts.extra_args);
        let stderr = File::create(&stderr_path).map_err(|e| format!("stderr file: {e}"))?;
        let stdout = stderr.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", binary.path.display()))?;
        eprintln!(
            "started {} pid {} ({}, accel {}, {} MiB RAM{})",
            qemu.name(),
            child.id(),
            binary.version_line,
            accel.arg(),
            ram_size >> 20,
            if opts.incoming_defer {
                ", -incoming defer"
            } else {
                ""
            }
        );
        // From here on, Drop cleans up; only the QMP field is provisional.
        let mut vm = QemuVm {
            binary,
            child,
            qmp: None,
            ram_path,
            ram_size,
            stderr_path,
            accel,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let stream = loop {
            if let Ok(Some(status)) = vm.child.try_wait() {
                return Err(format!(
                    "QEMU exited during startup ({status}); stderr:\n{}",
                    vm.stderr_tail(40)
                ));
            }
            match UnixStream::connect(&qmp_path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "no QMP socket at {} after {START_TIMEOUT:?} ({e}); stderr:\n{}",
                        qmp_path.display(),
                        vm.stderr_tail(40)
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        // The handshake's own timeout is the client's default, as START_TIMEOUT.
        let qmp = HelperClient::from_stream(stream)
            .map_err(|e| format!("QMP handshake: {e}; stderr:\n{}", vm.stderr_tail(40)))?;
        vm.qmp = Some(qmp);
        // The greeting comes from the main loop, so the memory backend exists by now.
        let len = std::fs::metadata(&vm.ram_path)
            .map_err(|e| format!("RAM file {}: {e}", vm.ram_path.display()))?
            .len();
        if len < ram_size {
            return Err(format!(
                "RAM file {} is {len} bytes, want {ram_size}",
                vm.ram_path.display()
            ));
        }
        Ok(vm)
    }

    pub fn qemu(&self) -> Qemu {
        self.binary.qemu
    }

    pub fn binary(&self) -> &QemuBinary {
        &self.binary
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The QMP connection to QEMU's monitor: the library's client, as for a helper.
    pub fn qmp(&mut self) -> &mut HelperClient {
        self.qmp
            .as_mut()
            .expect("QMP is connected once try_start returns")
    }

    /// The /dev/shm file backing the VM's RAM block `ram`.
    pub fn ram_path(&self) -> &Path {
        &self.ram_path
    }

    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// A fresh MAP_SHARED read-write mapping of the whole RAM file. It stays valid after
    /// the VM is dropped (the mapping keeps the file's pages).
    pub fn ram_mmap(&self) -> RamMap {
        RamMap::open(&self.ram_path, self.ram_size as usize)
            .unwrap_or_else(|e| panic!("mapping {}: {e}", self.ram_path.display()))
    }

    /// The test's private temp dir for this VM (holds `qmp.sock`, `qemu.stderr`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// The last `lines` lines QEMU wrote to stdout/stderr.
    pub fn stderr_tail(&self, lines: usize) -> String {
        file_tail(&self.stderr_path, lines)
    }

    /// `Some(status)` once QEMU has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "QEMU pid {} still running after {timeout:?}",
                    self.pid()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs QEMU now (Drop does this too).
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Polls `query-migrate` every 20 ms until its status is one of `statuses`, returning
    /// the whole reply. Fails on status `failed` (unless listed), when QEMU goes away, or
    /// after `timeout`, quoting QEMU's error-desc and output tail; when QEMU has exited (as
    /// a destination does by default when an incoming migration fails), says so.
    ///
    /// Not `HelperClient::wait_for_status`: QEMU answers `{}` (no status) before a
    /// migration starts, which that treats as a protocol error.
    pub fn wait_migration(
        &mut self,
        statuses: &[&str],
        timeout: Duration,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self
                .qmp()
                .query_migrate()
                .map_err(|e| format!("{e}{}", self.stderr_note()))
                .map_err(|e| self.exited_note(e))?;
            let status = v.get("status").and_then(Value::as_str).unwrap_or("");
            if statuses.contains(&status) {
                return Ok(v);
            }
            if status == "failed" {
                return Err(format!(
                    "migration failed: {}{}",
                    v.get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("(no error-desc)"),
                    self.stderr_note()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "migration not in {statuses:?} after {timeout:?}; last query-migrate: \
                     {v}{}",
                    self.stderr_note()
                ));
            }
            std::thread::sleep(STATUS_POLL);
        }
    }

    /// Saves the guest to `file` with `mapped-ram` (every page at its fixed place), as
    /// `virsh save` does: the capabilities and parameters `how` says, no bandwidth limit,
    /// `migrate file:...`; returns the `query-migrate` that says `completed`.
    pub fn save_mapped_ram(
        &mut self,
        file: &Path,
        how: MappedRamSave,
        timeout: Duration,
    ) -> Result<Value, String> {
        let mut caps = vec![("mapped-ram", true)];
        let mut params = json!({"max-bandwidth": 100u64 << 30});
        if how.channels > 0 {
            caps.push(("multifd", true));
            params["multifd-channels"] = json!(how.channels);
        }
        if how.direct_io {
            params["direct-io"] = json!(true);
        }
        self.qmp()
            .set_capabilities(&caps)
            .map_err(|e| format!("mapped-ram capabilities: {e}"))?;
        self.execute("migrate-set-parameters", params)?;
        std::fs::write(file, vec![0x5a; how.offset as usize])
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let uri = crate::util::file_uri(file, how.offset);
        self.execute("migrate", json!({ "uri": uri }))?;
        self.wait_migration(&["completed"], timeout)
    }

    /// `HelperClient::execute` on this VM, noting in an error when QEMU has exited.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let r = self.qmp().execute(cmd, args);
        r.map_err(|e| self.exited_note(e.to_string()))
    }

    /// `human-monitor-command`; returns HMP's output text.
    pub fn hmp(&mut self, cmd: &str) -> Result<String, String> {
        let v = self.execute("human-monitor-command", json!({ "command-line": cmd }))?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    fn stderr_note(&self) -> String {
        format!("\nQEMU output (tail):\n{}", self.stderr_tail(20))
    }

    fn exited_note(&mut self, e: String) -> String {
        // Give a dying QEMU a moment so the note is reliable.
        std::thread::sleep(Duration::from_millis(50));
        match self.try_wait() {
            Some(status) => format!(
                "{} pid {} has exited ({status}): {e}",
                self.binary.qemu.name(),
                self.pid()
            ),
            None => e,
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} pid {} output (tail) ---\n{}--- end ---",
                self.binary.qemu.name(),
                self.pid(),
                self.stderr_tail(30)
            );
        }
        self.kill();
        let _ = std::fs::remove_file(&self.ram_path);
    }
}

const RAM_PREFIX: &str = "qmh-test";
const DIR_PREFIX: &str = "qmh-qemu";

/// Removes `<prefix>-<pid>-...` entries of `dir` whose pid is gone: what a test binary
/// killed with SIGKILL leaves behind (its QEMUs die with it through PDEATHSIG).
fn sweep_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_prefix('-'))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = e.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

fn file_tail(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read(path) else {
        return format!("(cannot read {})\n", path.display());
    };
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &all[all.len().saturating_sub(lines)..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}
