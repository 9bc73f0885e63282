//! A helper process driven through the library's client API, with guest RAM in memfds
//! that the test (as the parent VMM) maps and fills.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use qemu_migration_helper::client::{HelperClient, RamBlockSpec};

use crate::map::RamMap;
use crate::util::TempDir;

/// The helper under test: `QMH_HELPER_BIN` (e.g. the installed one), else the one cargo
/// built for this test or bench. Cargo builds the package's binary beside the `deps/`
/// directory that holds the test and bench executables (what `CARGO_BIN_EXE_...` names,
/// which only the package's own targets see at compile time).
pub fn helper_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("QMH_HELPER_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("the test's own path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .map(|profile_dir| profile_dir.join("qemu-migration-helper"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "no qemu-migration-helper beside {} (run through cargo test/bench, \
                     or set QMH_HELPER_BIN)",
                    exe.display()
                )
            });
        bin
    })
}

/// A memfd the test owns, mapped shared.
pub struct Memfd {
    pub fd: OwnedFd,
    pub size: u64,
}

impl Memfd {
    pub fn new(name: &str, size: u64) -> Memfd {
        let c = std::ffi::CString::new(name).expect("name");
        let fd = memfd_create(&c, MemFdCreateFlag::MFD_CLOEXEC).expect("memfd_create");
        nix::unistd::ftruncate(&fd, size as i64).expect("ftruncate");
        Memfd { fd, size }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    pub fn map(&self) -> RamMap {
        RamMap::open(&self.path(), self.size as usize).expect("map memfd")
    }
}

/// A guest RAM block registered with a helper.
pub struct Block {
    pub id: String,
    pub mem: Memfd,
    pub bitmap: Option<Memfd>,
}

impl Block {
    pub fn pages(&self) -> u64 {
        self.mem.size / 4096
    }
}

pub struct HelperVm {
    pub client: HelperClient,
    child: Child,
    pub blocks: Vec<Block>,
    /// With `spawn_on_socket`: the control socket, in a directory removed on drop.
    socket: Option<(PathBuf, TempDir)>,
}

impl HelperVm {
    pub fn spawn() -> HelperVm {
        HelperVm::spawn_with_args(&["--log-level", "debug"])
    }

    /// A helper that logs only warnings (for benchmarks).
    pub fn spawn_quiet() -> HelperVm {
        // QMH_HELPER_LOG=info shows the helpers' own summaries.
        let level = std::env::var("QMH_HELPER_LOG").unwrap_or_else(|_| "warn".into());
        HelperVm::spawn_with_args(&["--log-level", &level])
    }

    /// A helper started with `args` after `--control-fd N` (e.g. another log level).
    pub fn spawn_with_args(args: &[&str]) -> HelperVm {
        let (client, child) = HelperClient::spawn(helper_bin(), args).expect("spawn helper");
        HelperVm {
            client,
            child,
            blocks: Vec::new(),
            socket: None,
        }
    }

    /// A helper listening on `--control-socket PATH` (in a fresh directory) with `args`,
    /// its stderr to `stderr` (e.g. a log file), and connected to there.
    pub fn spawn_on_socket(args: &[&str], stderr: Stdio) -> HelperVm {
        let dir = TempDir::new("qmh-ctl");
        let path = dir.join("control.sock");
        let mut child = Command::new(helper_bin())
            .arg("--control-socket")
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn helper");
        let client = match HelperClient::connect_timeout(&path, Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("connecting to {}: {e}", path.display());
            }
        };
        HelperVm {
            client,
            child,
            blocks: Vec::new(),
            socket: Some((path, dir)),
        }
    }

    /// The control socket of a helper from `spawn_on_socket`.
    pub fn control_socket(&self) -> Option<&Path> {
        self.socket.as_ref().map(|(p, _)| p.as_path())
    }

    /// `quit`, then waits up to `timeout` for the process to exit (killing it after that);
    /// its exit status.
    pub fn quit_and_wait(&mut self, timeout: Duration) -> ExitStatus {
        self.client.quit().expect("quit");
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().expect("wait for the helper")
    }

    /// Adds a block backed by a new memfd (and a dirty bitmap memfd when asked).
    pub fn add_block(&mut self, id: &str, size: u64, with_bitmap: bool) -> usize {
        self.add_memfd_block(id, Memfd::new(id, size), with_bitmap)
    }

    /// A block whose memory the parent allocated before adding it, filled with `fill` (a
    /// preallocated guest); waits until the helper has mapped it ahead.
    pub fn add_preallocated_block(&mut self, id: &str, size: u64, fill: u8) -> usize {
        self.add_written_block(id, size, |m| m.fill(fill))
    }

    /// A block whose memory `write` fills before the helper gets it (a guest that has run),
    /// returned once the helper has mapped it ahead (`mapped-ahead`), as a QEMU has its
    /// own RAM mapped.
    pub fn add_written_block(
        &mut self,
        id: &str,
        size: u64,
        write: impl FnOnce(&mut [u8]),
    ) -> usize {
        let mem = Memfd::new(id, size);
        write(&mut mem.map());
        let i = self.add_memfd_block(id, mem, false);
        let t0 = std::time::Instant::now();
        loop {
            let v = self.client.query_ram_blocks().expect("query-ram-blocks");
            let done = v
                .as_array()
                .and_then(|a| a.iter().find(|b| b["id"] == id))
                .is_some_and(|b| b["mapped-ahead"] == true);
            if done {
                return i;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "block {id} not mapped ahead: {v}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn add_memfd_block(&mut self, id: &str, mem: Memfd, with_bitmap: bool) -> usize {
        let size = mem.size;
        let fdname = format!("mem-{}", self.blocks.len());
        self.client
            .getfd(&fdname, mem.fd.as_fd())
            .expect("getfd mem");
        let bitmap = with_bitmap.then(|| {
            let pages = size / 4096;
            let b = Memfd::new("bitmap", pages.div_ceil(64) * 8);
            let name = format!("bitmap-{}", self.blocks.len());
            self.client
                .getfd(&name, b.fd.as_fd())
                .expect("getfd bitmap");
            (b, name)
        });
        self.client
            .ram_block_add(&RamBlockSpec {
                id: id.into(),
                fdname,
                offset: 0,
                size,
                dirty_bitmap: bitmap.as_ref().map(|(_, n)| n.clone()),
                ..Default::default()
            })
            .expect("ram-block-add");
        self.blocks.push(Block {
            id: id.into(),
            mem,
            bitmap: bitmap.map(|(b, _)| b),
        });
        self.blocks.len() - 1
    }

    pub fn wait(&mut self, wanted: &[&str], timeout: Duration) -> serde_json::Value {
        match self.client.wait_for_status(wanted, timeout) {
            Ok(v) => v,
            Err(e) => panic!(
                "helper (pid {}) did not reach {wanted:?}: {e}",
                self.child.id()
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the helper process is still alive.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Whether the helper process has exited (reaping it).
    pub fn exited(&mut self) -> bool {
        !self.alive()
    }

    /// Closes the control connection as a parent that goes away would (no `quit`).
    pub fn close_control(&mut self) {
        self.client.disconnect();
    }
}

impl Drop for HelperVm {
    fn drop(&mut self) {
        let _ = self.client.set_timeout(Duration::from_secs(2));
        let _ = self.client.quit();
        for _ in 0..50 {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
