//! Running the example VMM on KVM (examples/kvm_vmm): building it, starting a source and a
//! destination with their output followed line by line, a relay between them that can cut
//! or silence the link, and their `result:` lines.
//!
//! The example is built with `cargo build --example kvm-vmm` in the caller's profile and
//! target directory: `cargo test`/`cargo bench` do not build examples, and
//! `CARGO_BIN_EXE_*` names only binaries. Building (a no-op when it is up to date) rather
//! than taking whatever lies in target/<profile>/examples means a test never runs a stale
//! VMM. `QMH_KVM_VMM_BIN` names a prebuilt one instead.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::helper::helper_bin;

/// Why KVM cannot be used here, if it cannot.
pub fn kvm_missing() -> Option<String> {
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

/// Builds the example in the caller's profile (its directory is the helper's) and returns
/// its path.
pub fn vmm_bin() -> PathBuf {
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
    // This crate is tests/support; the example belongs to the package two levels up.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Cargo gives the test the package's variables; a build script that tracks one (ring's
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

/// A running VMM (`source` or `destination`), its stdout followed line by line; killed if
/// dropped before [`Vmm::finish`].
pub struct Vmm {
    child: Child,
    role: &'static str,
    lines: Arc<Mutex<Vec<String>>>,
    rx: Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

impl Vmm {
    /// Starts `kvm-vmm role args...` with the test's helper.
    pub fn spawn(vmm: &Path, role: &'static str, args: &[String]) -> Vmm {
        let mut child = Command::new(vmm)
            .arg(role)
            .args(args)
            .env("QMH_HELPER_BIN", helper_bin())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning the {role} VMM: {e}"));
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let all = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                all.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Vmm {
            child,
            role,
            lines,
            rx,
            reader: Some(reader),
        }
    }

    /// Waits for the next line containing `text` (lines before it are skipped); panics
    /// with everything printed so far if it does not come within `timeout`.
    pub fn wait_line(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no {text:?} within {timeout:?}; printed {:?}",
                    self.role,
                    self.lines()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{} exited before printing {text:?}; printed {:?}",
                    self.role,
                    self.lines()
                ),
            }
        }
    }

    /// Everything printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The pid of the helper the VMM started last ("kvm-vmm: helper pid N").
    pub fn helper_pid(&self) -> u32 {
        self.lines()
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("kvm-vmm: helper pid ")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: no helper pid printed", self.role))
    }

    /// Kills the VMM (when the other side failed and this one would wait for nothing).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits for the VMM to exit (killing it after `timeout`); whether it succeeded, and
    /// everything it printed.
    pub fn finish(mut self, timeout: Duration) -> (bool, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait().expect("waiting for a VMM") {
                Some(status) => break Some(status),
                None if Instant::now() >= deadline => break None,
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        if status.is_none() {
            eprintln!("{} did not exit within {timeout:?}: killed", self.role);
            self.kill();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        (status.is_some_and(|s| s.success()), self.lines())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `&str`s as the owned arguments [`Vmm::spawn`] takes.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A destination listening on a unix socket in `dir` (waited for up to `wait`), with
/// `extra` arguments; returns it and its address.
pub fn destination(vmm: &Path, dir: &Path, extra: &[String], wait: Duration) -> (Vmm, String) {
    let uri = format!("unix:{}", dir.join("dst.sock").display());
    let mut a = args(&["--listen", &uri]);
    a.extend_from_slice(extra);
    let dst = Vmm::spawn(vmm, "destination", &a);
    dst.wait_line("listening on", wait);
    (dst, uri)
}

/// Both sides of a migration, once both exited: whether each succeeded, what each printed.
pub struct Outcome {
    pub src_ok: bool,
    pub src: Vec<String>,
    pub dst_ok: bool,
    pub dst: Vec<String>,
}

impl Outcome {
    /// Both sides' result lines; panics with their output if either failed.
    pub fn results(&self) -> [VmmResult; 2] {
        assert!(self.src_ok, "source failed: {:?}", self.src);
        assert!(self.dst_ok, "destination failed: {:?}", self.dst);
        [
            VmmResult::from_lines(&self.src),
            VmmResult::from_lines(&self.dst),
        ]
    }
}

/// Waits for both sides (each up to `timeout`); a destination whose source failed is
/// killed, since it would wait for a migration that is not coming.
pub fn finish(src: Vmm, mut dst: Vmm, timeout: Duration) -> Outcome {
    let (src_ok, src) = src.finish(timeout);
    if !src_ok {
        dst.kill();
    }
    let (dst_ok, dst) = dst.finish(timeout);
    Outcome {
        src_ok,
        src,
        dst_ok,
        dst,
    }
}

/// A whole migration without interference over a unix socket in `dir`: a destination
/// with `common` and `dst_args`, then a source connecting to it with `common` and
/// `src_args`.
pub fn migrate(
    vmm: &Path,
    dir: &Path,
    common: &[String],
    src_args: &[String],
    dst_args: &[String],
    timeout: Duration,
) -> Outcome {
    let (dst, uri) = destination(vmm, dir, &[common, dst_args].concat(), timeout);
    let src_all = [&args(&["--connect", &uri])[..], common, src_args].concat();
    let src = Vmm::spawn(vmm, "source", &src_all);
    finish(src, dst, timeout)
}

/// The `key=value` pairs of a `result:` line.
pub struct VmmResult(HashMap<String, String>);

impl VmmResult {
    /// The first `result:` line in `lines`.
    pub fn from_lines(lines: &[String]) -> VmmResult {
        let line = lines
            .iter()
            .find_map(|l| l.strip_prefix("result: "))
            .unwrap_or_else(|| panic!("no result line in {lines:?}"));
        VmmResult(
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn u(&self, key: &str) -> u64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not an integer in {:?}", self.0))
    }

    pub fn f(&self, key: &str) -> f64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number in {:?}", self.0))
    }

    fn get(&self, key: &str) -> &str {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.0))
    }
}

impl std::fmt::Debug for VmmResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<_> = self.0.iter().collect();
        keys.sort();
        f.debug_map().entries(keys).finish()
    }
}

/// A relay between the source VMM and the destination VMM's listening socket: what "sits
/// between them". It forwards every connection (main, preempt, each recovery's), and can
/// cut the current ones (shut down: both ends see the error) or silence them (open but
/// nothing forwarded: only a link timeout notices). `rate` limits the source-to-
/// destination direction (bytes per second, 0 = unlimited), so that postcopy lasts.
pub struct Relay {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<RelayConn>>>,
    acceptor: Option<JoinHandle<()>>,
}

struct RelayConn {
    ends: [UnixStream; 2],
    silenced: Arc<AtomicBool>,
    pumps: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `listen` and forwards each connection to `target`.
    pub fn new(listen: &Path, target: &Path, rate: u64) -> Relay {
        let listener = UnixListener::bind(listen).expect("relay bind");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<RelayConn>>> = Arc::default();
        let (stop2, conns2, target) = (Arc::clone(&stop), Arc::clone(&conns), target.to_owned());
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                // The destination may not be listening again yet: the source retries.
                let Ok(server) = UnixStream::connect(&target) else {
                    continue;
                };
                let silenced = Arc::new(AtomicBool::new(false));
                let pumps = vec![
                    pump(&client, &server, rate, &silenced),
                    pump(&server, &client, 0, &silenced),
                ];
                conns2.lock().unwrap().push(RelayConn {
                    ends: [client, server],
                    silenced,
                    pumps,
                });
            }
        });
        Relay {
            path: listen.to_owned(),
            stop,
            conns,
            acceptor: Some(acceptor),
        }
    }

    /// Cuts every current connection: both sides get an error at once.
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().iter() {
            for e in &c.ends {
                let _ = e.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Silences every current connection: it stays open, nothing more gets through.
    pub fn silence(&self) {
        for c in self.conns.lock().unwrap().iter() {
            c.silenced.store(true, Ordering::Relaxed);
        }
    }
}

/// Copies `from` to `to` until either fails; drops the data once silenced.
fn pump(
    from: &UnixStream,
    to: &UnixStream,
    rate: u64,
    silenced: &Arc<AtomicBool>,
) -> JoinHandle<()> {
    let (mut from, mut to) = (
        from.try_clone().expect("dup relay socket"),
        to.try_clone().expect("dup relay socket"),
    );
    let silenced = Arc::clone(silenced);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if silenced.load(Ordering::Relaxed) {
                continue;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if rate > 0 {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
            }
        }
        // One direction ended (a side closed or died): the connection is gone both ways,
        // as a dead peer's would be.
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    })
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the acceptor, which then sees `stop`.
        let _ = UnixStream::connect(&self.path);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        self.cut();
        for c in self.conns.lock().unwrap().drain(..) {
            for p in c.pumps {
                let _ = p.join();
            }
        }
    }
}
