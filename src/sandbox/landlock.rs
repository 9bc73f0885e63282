//! The Landlock ruleset: which parts of the filesystem the helper may still open.
//!
//! Everything is decided at start: URIs arrive later over the control socket, but a
//! Landlock domain can only shrink, so the rules name directories, not the files a later
//! `file:` or `unix:` URI will use. What a later URI can reach: the scratch directories
//! (the temporary directory, /dev/shm, $XDG_RUNTIME_DIR), the control socket's directory
//! and every `--sandbox-allow-path`. Anything else is reached through an fd (`getfd` and
//! `fd:NAME`), which Landlock never checks.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};

/// The newest ABI this build knows; older kernels get what they support (best effort).
const ABI_WANTED: ABI = ABI::V10;

/// Read-only files that the libraries read after set-up: local time for log timestamps,
/// and the resolver's configuration for `tcp:` host names.
const READ_ONLY: &[&str] = &[
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/proc/self",
];

/// What Landlock may allow, by path.
#[derive(Debug, Default, Clone)]
pub(crate) struct FsRules {
    /// Directories where files and sockets may be created, read, written and removed.
    pub read_write: Vec<PathBuf>,
    /// Files or directories that may only be read.
    pub read_only: Vec<PathBuf>,
    /// Directories of TLS credentials (`--tls-creds-dir`), read by `object-add`: read only.
    pub creds: Vec<PathBuf>,
}

impl FsRules {
    /// The defaults of a control-socket helper: the scratch directories, the library
    /// files above, and `/dev/null`.
    pub(crate) fn helper_defaults() -> FsRules {
        let mut read_write = vec![std::env::temp_dir(), PathBuf::from("/dev/shm")];
        if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
            read_write.push(PathBuf::from(d));
        }
        let mut read_only: Vec<PathBuf> = READ_ONLY.iter().map(PathBuf::from).collect();
        read_only.push(PathBuf::from("/dev/null"));
        FsRules {
            read_write,
            read_only,
            creds: Vec::new(),
        }
    }
}

/// The rights in a read-write directory: files, sockets, FIFOs and directories, never
/// executing, devices, symlinks or renames across directories.
fn read_write_access(abi: ABI) -> BitFlags<AccessFs> {
    let wanted = AccessFs::ReadFile
        | AccessFs::ReadDir
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::MakeSock
        | AccessFs::MakeFifo
        | AccessFs::MakeDir
        | AccessFs::RemoveFile
        | AccessFs::RemoveDir
        | AccessFs::ResolveUnix;
    wanted & AccessFs::from_all(abi)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LandlockError {
    #[error("Landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

/// What `restrict` did.
#[derive(Debug)]
pub(crate) struct FsOutcome {
    /// "fully enforced", "partially enforced" or "not enforced (...)".
    pub(crate) status: String,
    pub(crate) enforced: bool,
    /// The read-write directories that exist, canonical (for messages and path checks).
    pub(crate) allowed: Vec<PathBuf>,
    /// Paths given that do not exist (skipped).
    pub(crate) missing: Vec<PathBuf>,
    /// The credentials directories that exist, canonical (for messages).
    pub(crate) creds: Vec<PathBuf>,
}

/// Builds the ruleset and, with `enforce`, restricts the calling thread (and the threads
/// it creates later: call it before any exists).
pub(crate) fn restrict(rules: &FsRules, enforce: bool) -> Result<FsOutcome, LandlockError> {
    let abi = ABI_WANTED;
    let mut created = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?;
    let mut allowed = Vec::new();
    let mut missing = Vec::new();
    let mut creds = Vec::new();
    let all: Vec<(&PathBuf, bool)> = rules
        .read_write
        .iter()
        .map(|p| (p, true))
        .chain(rules.read_only.iter().map(|p| (p, false)))
        .chain(rules.creds.iter().map(|p| (p, false)))
        .collect();
    for (path, rw) in all {
        let Ok(fd) = PathFd::new(path) else {
            missing.push(path.clone());
            continue;
        };
        // A rule on a file may only carry file rights.
        let is_dir = std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false);
        let mut access = if rw {
            read_write_access(abi)
        } else {
            AccessFs::ReadFile | AccessFs::ReadDir
        };
        if !is_dir {
            access &= AccessFs::from_file(abi);
        }
        created = created.add_rule(PathBeneath::new(fd, access))?;
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        if rw {
            allowed.push(canonical);
        } else if rules.creds.contains(path) {
            creds.push(canonical);
        }
    }
    if !enforce {
        return Ok(FsOutcome {
            status: "not enforced (--sandbox log)".into(),
            enforced: false,
            allowed,
            missing,
            creds,
        });
    }
    let st = created.restrict_self()?;
    let (status, enforced) = match st.ruleset {
        RulesetStatus::FullyEnforced => ("fully enforced".to_string(), true),
        RulesetStatus::PartiallyEnforced => (
            format!(
                "partially enforced (kernel Landlock ABI {}, this build knows {})",
                kernel_abi(),
                ABI_WANTED as i32
            ),
            true,
        ),
        RulesetStatus::NotEnforced => ("not enforced (no Landlock in this kernel)".into(), false),
    };
    Ok(FsOutcome {
        status,
        enforced,
        allowed,
        missing,
        creds,
    })
}

/// The kernel's Landlock ABI version (0: none), for the log.
fn kernel_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) reads and
    // writes no memory; it returns the version or -1.
    let v = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, 0usize, 0usize, 1u32) };
    v.max(0)
}

/// Whether `path` (which may not exist yet) lies under one of `allowed` (canonical).
pub(crate) fn is_under(path: &Path, allowed: &[PathBuf]) -> bool {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(d) => d.join(path),
            Err(_) => return false,
        }
    };
    // The file itself may not exist (an output, a socket to create): resolve its parent.
    let resolved = std::fs::canonicalize(&abs).ok().or_else(|| {
        let parent = std::fs::canonicalize(abs.parent()?).ok()?;
        Some(parent.join(abs.file_name()?))
    });
    match resolved {
        Some(p) => allowed.iter().any(|a| p.starts_with(a)),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_allowed_dirs() {
        let tmp = std::fs::canonicalize(std::env::temp_dir()).unwrap();
        let allowed = vec![tmp.clone()];
        assert!(is_under(&tmp.join("new-file"), &allowed));
        assert!(is_under(&tmp, &allowed));
        assert!(!is_under(Path::new("/etc/passwd"), &allowed));
        assert!(!is_under(Path::new("/nonexistent/x"), &allowed));
        // `..` cannot climb out.
        assert!(!is_under(&tmp.join("../etc/passwd"), &allowed));
    }

    #[test]
    fn credentials_directories_are_read_only_rules() {
        let tmp = std::fs::canonicalize(std::env::temp_dir()).unwrap();
        let rules = FsRules {
            creds: vec![tmp.clone(), PathBuf::from("/nonexistent-creds")],
            ..FsRules::default()
        };
        // Not enforced: the test process stays unrestricted.
        let out = restrict(&rules, false).unwrap();
        assert_eq!(out.creds, vec![tmp]);
        assert!(out.allowed.is_empty(), "credentials are not read-write");
        assert_eq!(out.missing, vec![PathBuf::from("/nonexistent-creds")]);
    }
}
