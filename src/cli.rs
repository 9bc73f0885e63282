//! The `qemu-migration-helper` command line (src/main.rs calls `main`): parsing, the
//! `demo` and `analyze` subcommands, and the helper's start-up order (control socket, then
//! sandbox, then threads).

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::control::{self, Helper};
use crate::logging::{self, LogFormat, LogLevel};
use crate::sandbox::{self, FsRules, Profile, SandboxMode};

/// Exit codes (also in the man page).
const EXIT_USAGE: u8 = 2;
const EXIT_FAILURE: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "qemu-migration-helper",
    version,
    about = "Migrate a VMM's guest memory in QEMU's migration stream format",
    long_about = "A helper process that a virtual machine monitor spawns to send or receive its guest's \
memory as a QEMU migration stream, so that the other end can be a real qemu-system-x86_64 or \
another helper. The parent drives it over a QMP-dialect control socket and passes guest-memory \
fds, dirty bitmaps and the migration socket with SCM_RIGHTS."
)]
struct Cli {
    /// Serve the control protocol on this inherited fd (one end of a socketpair).
    #[arg(long, value_name = "N", conflicts_with = "control_socket")]
    control_fd: Option<RawFd>,
    /// Listen on this Unix socket path (created 0600) and serve one control client at a
    /// time; only the helper's own uid may connect, unless allowed with --allow-uid.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Also let this uid connect to --control-socket (repeatable). The socket stays 0600:
    /// the operator must make it reachable (e.g. a bind mount or a shared group directory
    /// and a chmod).
    #[arg(long, value_name = "UID", requires = "control_socket")]
    allow_uid: Vec<u32>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: LogFormat,
    /// Least severe level that is logged.
    #[arg(long, value_enum, default_value = "info", global = true)]
    log_level: LogLevel,
    /// Seccomp and Landlock after set-up (see SANDBOX in the man page).
    #[arg(long, value_enum, default_value = "on", global = true)]
    sandbox: SandboxMode,
    /// Another directory where `file:` and `unix:` URIs may create, read and remove files
    /// and sockets under the sandbox (repeatable).
    #[arg(long, value_name = "DIR")]
    sandbox_allow_path: Vec<PathBuf>,
    /// A directory of TLS credentials that `object-add` (`tls-creds-x509`, `tls-creds-psk`
    /// `dir=`) may read under the sandbox (repeatable; read only).
    #[arg(long, value_name = "DIR")]
    tls_creds_dir: Vec<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Play the parent VMM: make a guest in a memfd, spawn a source and a destination helper,
    /// migrate, verify the destination byte for byte and print the rate.
    Demo(crate::demo::DemoArgs),
    /// Print what a QEMU migration stream file holds: header, configuration, every section
    /// with its size, RAM per block, device sections decoded with the VM description.
    Analyze {
        /// The stream file (from QEMU or from the helper).
        file: PathBuf,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
        /// Write each RAM block's content to a file in DIR (named after the block).
        #[arg(long, value_name = "DIR")]
        extract_ram: Option<PathBuf>,
        /// Where the stream starts in the file (a `file:PATH,offset=N` save, or a file
        /// with a header of its own first, as libvirt writes).
        #[arg(long, value_name = "N", default_value_t = 0)]
        offset: u64,
    },
}

/// Runs the command with the process's arguments.
/// Keeps freed heap memory in the process instead of returning it to the kernel at every
/// free of a large enough chunk (glibc's default trims the heap top above 128 KiB): a TLS
/// channel seals every 16 KiB record into a fresh allocation and frees a batch of them after
/// each send, and handing those pages back and faulting them in again cost more than the
/// cipher. The heap stays bounded by what is in use at the peak.
fn keep_freed_heap() {
    // SAFETY: mallopt only changes glibc's allocator thresholds; called before any thread
    // starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

pub fn main() -> ExitCode {
    keep_freed_heap();
    let cli = Cli::parse();
    let log = logging::logger(cli.log_format, cli.log_level);
    match cli.command {
        Some(Cmd::Demo(args)) => {
            return match crate::demo::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
        Some(Cmd::Analyze {
            file,
            json,
            extract_ram,
            offset,
        }) => {
            if let Err(code) = sandbox_analyze(cli.sandbox, &file, extract_ram.as_deref(), &log) {
                return code;
            }
            return match crate::analyze::analyze_at(&file, extract_ram.as_deref(), offset) {
                Ok(report) => {
                    let mut out = std::io::stdout().lock();
                    let r = if json {
                        writeln!(out, "{}", report.to_json())
                    } else {
                        report.print(&mut out)
                    };
                    match r {
                        // A reader that stopped early (`| head`) is not an error.
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                        Err(e) => {
                            eprintln!("qemu-migration-helper: writing the report: {e}");
                            ExitCode::from(EXIT_FAILURE)
                        }
                    }
                }
                Err(e) => {
                    eprintln!("qemu-migration-helper: {}: {e}", file.display());
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
        None => {}
    }
    // A dead control client must not kill the helper with SIGPIPE.
    // SAFETY: setting a signal disposition at startup, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    if let Some(fd) = cli.control_fd {
        if fd < 0 || nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            eprintln!("qemu-migration-helper: --control-fd {fd} is not an open file descriptor");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    // The control socket is set up before the sandbox closes: its private directory, mode
    // and rename need calls the allowlist does not keep.
    let listener = match cli
        .control_socket
        .as_deref()
        .map(control::listen::ControlListener::bind)
    {
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            eprintln!("qemu-migration-helper: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
        None => None,
    };
    // Before Helper::new: no thread exists yet, so every thread inherits the sandbox.
    let mut rules = FsRules::helper_defaults();
    rules
        .read_write
        .extend(cli.sandbox_allow_path.iter().cloned());
    rules.creds.extend(cli.tls_creds_dir.iter().cloned());
    if let Some(dir) = cli.control_socket.as_deref().and_then(socket_dir) {
        rules.read_write.push(dir);
    }
    if let Err(e) = sandbox::enter(cli.sandbox, Profile::Helper, &rules, &log) {
        eprintln!("qemu-migration-helper: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    if let Some(code) = sandbox::testing_only_selftest() {
        return ExitCode::from(code);
    }
    let helper = match Helper::new(log.clone()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("qemu-migration-helper: cannot set up the migration context: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = match (cli.control_fd, listener) {
        (Some(fd), None) => {
            // SAFETY: the parent handed this fd to us; nothing else in the process owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = nix::fcntl::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            control::serve_fd(&helper, fd);
            Ok(())
        }
        (None, Some(listener)) => {
            control::serve_socket(&helper, listener, &cli.allow_uid).map_err(std::io::Error::other)
        }
        _ => {
            eprintln!(
                "qemu-migration-helper: give --control-fd N or --control-socket PATH (see --help)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match result {
        Ok(()) => {
            slog::info!(log, "exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            slog::error!(log, "control channel failed"; "error" => %e);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The directory of the control socket (where it is bound and, at exit, removed).
fn socket_dir(path: &std::path::Path) -> Option<PathBuf> {
    let parent = path.parent()?;
    Some(if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent.to_path_buf()
    })
}

/// `analyze` reads one file and writes into one directory: its sandbox allows just that.
fn sandbox_analyze(
    mode: SandboxMode,
    file: &std::path::Path,
    extract: Option<&std::path::Path>,
    log: &slog::Logger,
) -> Result<(), ExitCode> {
    let mut rules = FsRules {
        read_only: vec![file.to_path_buf()],
        ..FsRules::default()
    };
    if let Some(dir) = extract {
        // Made now, while the parent directory may still be written; analyze reports
        // a failure itself.
        let _ = std::fs::create_dir_all(dir);
        rules.read_write.push(dir.to_path_buf());
    }
    sandbox::enter(mode, Profile::Analyze, &rules, log).map_err(|e| {
        eprintln!("qemu-migration-helper: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}
