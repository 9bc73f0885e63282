//! The sandbox the helper enters after set-up (`--sandbox on|log|off`, see the man page's
//! SANDBOX section): Landlock limits the filesystem, then a seccomp-bpf allowlist limits
//! the system calls, both before any thread exists so that every thread inherits them.
//!
//! A forbidden call in `on` mode traps: a SIGSYS handler writes the call's number to
//! stderr and the process dies of SIGSYS, as a KILL_PROCESS filter would, but with a line
//! in the parent's log that names the call. In `log` mode the kernel logs the call (audit
//! or `dmesg`) and lets it run; Landlock is not enforced and `file:`/`unix:` URIs outside
//! the allowed directories are reported in the helper's log.

mod landlock;
mod seccomp;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub(crate) use self::landlock::FsRules;
pub(crate) use self::seccomp::Profile;

/// `--sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SandboxMode {
    /// Enforce: Landlock rules, and a forbidden system call kills the helper (SIGSYS).
    On,
    /// Report only: the kernel logs forbidden calls; Landlock is not enforced.
    Log,
    /// No sandbox.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SandboxError {
    #[error(transparent)]
    Filter(#[from] seccomp::FilterError),
    #[error(
        "installing the seccomp filter: {0} (run with --sandbox off on a kernel without seccomp)"
    )]
    Install(String),
    #[error(transparent)]
    Landlock(#[from] self::landlock::LandlockError),
    #[error("installing the SIGSYS handler: {0}")]
    Signal(io::Error),
}

/// What is in force, for messages about refused paths.
struct State {
    mode: SandboxMode,
    /// The page movers' filter, compiled at start (threads only install it).
    page_mover: Option<seccompiler::BpfProgram>,
    /// The multifd channel threads' filter, likewise.
    channel_mover: Option<seccompiler::BpfProgram>,
    landlock_enforced: bool,
    allowed: Vec<PathBuf>,
    /// `--tls-creds-dir` directories (canonical), readable only.
    creds: Vec<PathBuf>,
    log: slog::Logger,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Enters the sandbox. Call it once, before any thread is spawned.
pub(crate) fn enter(
    mode: SandboxMode,
    profile: Profile,
    rules: &FsRules,
    log: &slog::Logger,
) -> Result<(), SandboxError> {
    if mode == SandboxMode::Off {
        slog::info!(log, "sandbox off");
        let _ = STATE.set(State {
            mode,
            page_mover: None,
            channel_mover: None,
            landlock_enforced: false,
            allowed: Vec::new(),
            creds: Vec::new(),
            log: log.clone(),
        });
        return Ok(());
    }
    if profile == Profile::Helper {
        warm_up_resolver();
        // OpenSSL (TLS-PSK handshakes) reads its configuration file on first use.
        crate::transport::tls::warm_up();
    }
    // Landlock first: its own system calls are not in the allowlist.
    let fs = match self::landlock::restrict(rules, mode == SandboxMode::On) {
        Ok(fs) => fs,
        // Best effort: a kernel without Landlock or a ruleset it refuses is logged.
        Err(e) => {
            slog::warn!(log, "sandbox: filesystem not restricted"; "error" => %e);
            self::landlock::FsOutcome {
                status: format!("not enforced ({e})"),
                enforced: false,
                allowed: Vec::new(),
                missing: Vec::new(),
                creds: Vec::new(),
            }
        }
    };
    let mismatch = if mode == SandboxMode::On {
        install_sigsys_handler()?;
        seccompiler::SeccompAction::Trap
    } else {
        seccompiler::SeccompAction::Log
    };
    let main = seccomp::main_filter(profile, mismatch.clone())?;
    // The page movers' filter refuses with EACCES rather than trapping: it is stacked on
    // the process filter, which still kills for anything outside the process allowlist
    // (the kernel takes the strictest verdict), and glibc does lazy work on whatever
    // thread gets there first (malloc reads /proc/sys/vm/overcommit_memory the first
    // time it shrinks a thread's heap), which must fail softly, not kill the helper.
    let page_mover = seccomp::page_mover_filter(page_mover_mismatch(mode, &mismatch))?;
    let channel_mover = seccomp::channel_mover_filter(page_mover_mismatch(mode, &mismatch))?;
    let soft = seccomp::soft_filter()?;
    // The soft one first: installing a filter takes prctl and seccomp, which the main one
    // forbids.
    for prog in [&soft, &main] {
        seccompiler::apply_filter_all_threads(prog)
            .map_err(|e| SandboxError::Install(e.to_string()))?;
    }
    let dirs: Vec<String> = fs.allowed.iter().map(|p| p.display().to_string()).collect();
    let syscalls = seccomp::allowlist(profile).len();
    let landlock = &fs.status;
    let read_write = dirs.join(":");
    let creds = join(&fs.creds);
    match profile {
        Profile::Helper => slog::info!(log, "sandbox entered"; "mode" => ?mode,
            "syscalls" => syscalls, "landlock" => landlock, "read_write" => &read_write,
            "tls_creds" => &creds),
        // A command's output stays clean.
        Profile::Analyze => slog::debug!(log, "sandbox entered"; "mode" => ?mode,
            "syscalls" => syscalls, "landlock" => landlock, "read_write" => &read_write),
    }
    for p in &fs.missing {
        slog::debug!(log, "sandbox: path not found, no rule"; "path" => %p.display());
    }
    let _ = STATE.set(State {
        mode,
        page_mover: Some(page_mover),
        channel_mover: Some(channel_mover),
        landlock_enforced: fs.enforced,
        allowed: fs.allowed,
        creds: fs.creds,
        log: log.clone(),
    });
    Ok(())
}

/// Kinds of threads with a narrower filter than the process's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ThreadKind {
    /// Only copies pages into guest memory (precopy page writers).
    PageMover,
    /// Moves pages between guest memory and sockets it was handed: the multifd sender and
    /// receiver threads (no opening of anything).
    ChannelMover,
}

/// Narrows the calling thread's filter to what `kind` needs. Does nothing when the process
/// has no sandbox (`off`, or a library user that never entered one). Returns whether a
/// filter was installed.
pub(crate) fn enter_thread(kind: ThreadKind) -> bool {
    let Some(st) = STATE.get() else { return false };
    let prog = match kind {
        ThreadKind::PageMover => st.page_mover.as_ref(),
        ThreadKind::ChannelMover => st.channel_mover.as_ref(),
    };
    // A failure leaves the thread under the process filter, which still holds.
    prog.is_some_and(|p| seccompiler::apply_filter(p).is_ok())
}

/// What the page movers' filter does with a call it does not list (see `enter`).
fn page_mover_mismatch(
    mode: SandboxMode,
    process: &seccompiler::SeccompAction,
) -> seccompiler::SeccompAction {
    if mode == SandboxMode::On {
        seccompiler::SeccompAction::Errno(libc::EACCES as u32)
    } else {
        process.clone()
    }
}

/// glibc reads its resolver configuration on first use: do it now, so that a later
/// `tcp:HOST:PORT` finds it loaded (the files stay readable, see `landlock::READ_ONLY`).
fn warm_up_resolver() {
    let _ = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 0));
}

/// Adds the sandbox's reason to a permission error on `target` (a `file:` or `unix:` URI,
/// or a path), so that the parent reads why and what to do.
pub(crate) fn explain(target: &str, e: io::Error) -> io::Error {
    let Some(st) = STATE.get() else { return e };
    if st.mode != SandboxMode::On
        || !st.landlock_enforced
        || e.kind() != io::ErrorKind::PermissionDenied
    {
        return e;
    }
    let path = uri_path(target);
    if self::landlock::is_under(path, &st.allowed) {
        return e;
    }
    io::Error::new(
        e.kind(),
        format!(
            "{e}: refused by the sandbox (Landlock), which allows paths under {} only; \
             start the helper with --sandbox-allow-path DIR, or pass an fd (getfd, fd:NAME)",
            join(&st.allowed)
        ),
    )
}

/// Whether Landlock lets `object-add` read credentials at `path`.
fn creds_allowed(st: &State, path: &Path) -> bool {
    self::landlock::is_under(path, &st.allowed) || self::landlock::is_under(path, &st.creds)
}

/// In `log` mode, reports a credentials directory that `on` would refuse.
pub(crate) fn note_creds(dir: &Path) {
    let Some(st) = STATE.get() else { return };
    if st.mode == SandboxMode::Log && !creds_allowed(st, dir) {
        slog::warn!(st.log, "sandbox (log mode): --sandbox on would refuse these credentials (--tls-creds-dir)";
            "dir" => %dir.display(), "allowed" => join(&st.creds));
    }
}

/// Adds the sandbox's reason to a failure to read TLS credentials at `path`: a refused
/// path names the option that allows it.
pub(crate) fn explain_creds(path: &Path, e: io::Error) -> io::Error {
    let Some(st) = STATE.get() else { return e };
    if st.mode != SandboxMode::On
        || !st.landlock_enforced
        || e.kind() != io::ErrorKind::PermissionDenied
        || creds_allowed(st, path)
    {
        return e;
    }
    let dirs = if st.creds.is_empty() {
        "none".to_string()
    } else {
        join(&st.creds)
    };
    io::Error::new(
        e.kind(),
        format!(
            "{e}: refused by the sandbox (Landlock); credentials directories allowed: {dirs}; \
             start the helper with --tls-creds-dir DIR"
        ),
    )
}

/// In `log` mode, reports a `file:`/`unix:` path that `on` would refuse.
pub(crate) fn note_path(path: &Path) {
    let Some(st) = STATE.get() else { return };
    if st.mode == SandboxMode::Log && !self::landlock::is_under(path, &st.allowed) {
        slog::warn!(st.log, "sandbox (log mode): --sandbox on would refuse this path";
            "path" => %path.display(), "allowed" => join(&st.allowed));
    }
}

fn uri_path(target: &str) -> &Path {
    let p = target
        .strip_prefix("file:")
        .or_else(|| target.strip_prefix("unix:"))
        .unwrap_or(target);
    Path::new(p)
}

fn join(dirs: &[PathBuf]) -> String {
    let v: Vec<String> = dirs.iter().map(|p| p.display().to_string()).collect();
    v.join(", ")
}

/// Reports a trapped system call on stderr, then lets the pending SIGSYS (now with its
/// default action, SA_RESETHAND) end the process. Only async-signal-safe calls.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo's _sigsys: { void *call_addr; int syscall; unsigned arch; } at offset 16.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) };
    let mut buf = [0u8; 160];
    let mut n = 0;
    for part in [
        b"qemu-migration-helper: sandbox: forbidden system call " as &[u8],
        itoa(nr, &mut [0u8; 12]),
        b" (x86_64; `ausyscall NUMBER` names it; --sandbox log to debug): killed\n",
    ] {
        let take = part.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&part[..take]);
        n += take;
    }
    // SAFETY: write(2) and raise(3) are async-signal-safe; buf outlives the calls.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::raise(libc::SIGSYS);
    }
}

fn itoa(v: i32, out: &mut [u8; 12]) -> &[u8] {
    let mut x = v.unsigned_abs();
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (x % 10) as u8;
        x /= 10;
        if x == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        out[i] = b'-';
    }
    &out[i..]
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Signal(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// FOR TESTS ONLY: with `QMH_SANDBOX_SELFTEST=execve` in its environment, the helper tries
/// execve(2) right after entering the sandbox, prints what happened and exits 0 (a sandbox
/// in `on` mode kills it with SIGSYS first). Returns the exit code when the self-test ran.
pub(crate) fn testing_only_selftest() -> Option<u8> {
    if std::env::var_os("QMH_SANDBOX_SELFTEST")? != "execve" {
        return None;
    }
    let path = c"/nonexistent/qmh-sandbox-selftest";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: valid NUL-terminated strings and NULL-terminated arrays; the path does not
    // exist, so an allowed execve returns ENOENT instead of replacing the process.
    let rc = unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    let err = io::Error::last_os_error();
    eprintln!("sandbox self-test: execve was not refused (returned {rc}: {err})");
    Some(0)
}

#[cfg(test)]
mod tests {

    /// glibc's malloc opens /proc/sys/vm/overcommit_memory the first time it shrinks a
    /// thread's heap, on whatever thread frees: under the page movers' filter that open
    /// fails with EACCES instead of killing the helper (seen as SIGSYS in a writer thread).
    #[test]
    fn page_mover_refuses_an_open_softly() {
        let action = page_mover_mismatch(SandboxMode::On, &seccompiler::SeccompAction::Trap);
        let prog = seccomp::page_mover_filter(action).expect("filter");
        let r = std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).expect("apply");
            std::fs::File::open("/proc/sys/vm/overcommit_memory")
                .map(|_| ())
                .map_err(|e| e.raw_os_error())
        })
        .join()
        .expect("thread");
        assert_eq!(r, Err(Some(libc::EACCES)));
    }

    /// A multifd channel thread under its filter: socket I/O works, opening a file fails
    /// softly (EACCES, as for page movers).
    #[test]
    fn channel_mover_moves_bytes_and_opens_nothing() {
        use std::io::{IoSlice, Read, Write};
        let action = page_mover_mismatch(SandboxMode::On, &seccompiler::SeccompAction::Trap);
        let prog = seccomp::channel_mover_filter(action).expect("filter");
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let r = std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).expect("apply");
            let mut b = b;
            let n = b
                .write_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cd")])
                .expect("writev");
            assert_eq!(n, 4, "a socketpair takes 4 bytes at once");
            let mut got = [0u8; 2];
            b.read_exact(&mut got).expect("read");
            let _ = b.shutdown(std::net::Shutdown::Both);
            let open = std::fs::File::open("/proc/sys/vm/overcommit_memory")
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            (got, open)
        });
        let mut buf = [0u8; 4];
        a.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"abcd");
        a.write_all(b"ok").expect("write");
        let (got, open) = r.join().expect("thread");
        assert_eq!(&got, b"ok");
        assert_eq!(open, Err(Some(libc::EACCES)));
    }

    use super::*;

    #[test]
    fn itoa_formats() {
        assert_eq!(itoa(59, &mut [0; 12]), b"59");
        assert_eq!(itoa(0, &mut [0; 12]), b"0");
        assert_eq!(itoa(-1, &mut [0; 12]), b"-1");
        assert_eq!(itoa(i32::MIN, &mut [0; 12]), b"-2147483648");
    }

    #[test]
    fn uri_paths() {
        assert_eq!(uri_path("file:/a/b"), Path::new("/a/b"));
        assert_eq!(uri_path("unix:/s"), Path::new("/s"));
        assert_eq!(uri_path("/x"), Path::new("/x"));
    }
}
