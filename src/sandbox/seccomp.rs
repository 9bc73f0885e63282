//! The seccomp-bpf allowlist, built with `seccompiler`.
//!
//! One place lists every system call the helper makes after set-up, grouped by purpose.
//! The set was found by tracing the interop suite (`strace -f` on every helper it starts)
//! and then narrowed with argument conditions where the arguments say what the call does
//! (ioctl request, socket family, mmap/mprotect protection, fcntl command, madvise advice,
//! fallocate mode, prctl option, signal target). Calls made only before the filter is
//! installed (execve, the dynamic loader's opens and PROT_EXEC mmaps, arch_prctl,
//! set_tid_address) are not in it.
//!
//! To add a call: put it in the group that says why the helper needs it, with a comment,
//! and a condition if its arguments can be narrowed. `--sandbox log` shows what is missing.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// What the process does after set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Profile {
    /// The control-socket helper: migrations, sockets, files, userfaultfd.
    Helper,
    /// `analyze`: reads one file, writes RAM images into one directory, prints.
    Analyze,
}

// userfaultfd ioctl requests (linux/userfaultfd.h; the values userfaultfd-sys uses).
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
const UFFDIO_CONTINUE: u64 = 0xc020_aa07;

/// A syscall and the rules of which any one must match (none: always allowed).
type Entry = (i64, Vec<SeccompRule>);

#[derive(Debug, thiserror::Error)]
pub(crate) enum FilterError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("compiling the seccomp filter: {0}")]
    Compile(String),
}

fn cond(arg: u8, op: Op, value: u64) -> SeccompCondition {
    // Only fails for an argument index over 5: a bug here, caught by the unit test.
    SeccompCondition::new(arg, Len::Dword, op, value).expect("valid seccomp condition")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("non-empty seccomp rule")
}

/// `syscall` allowed unconditionally.
fn any(nr: libc::c_long) -> Entry {
    (nr, vec![])
}

/// `syscall` allowed when argument `arg` equals one of `values`.
fn one_of(nr: libc::c_long, arg: u8, values: &[u64]) -> Entry {
    let rules = values
        .iter()
        .map(|&v| rule(vec![cond(arg, Op::Eq, v)]))
        .collect();
    (nr, rules)
}

/// `syscall` allowed when none of `bits` is set in argument `arg`.
fn without_bits(nr: libc::c_long, arg: u8, bits: u64) -> Entry {
    (nr, vec![rule(vec![cond(arg, Op::MaskedEq(bits), 0)])])
}

/// Memory management: the allocator, thread stacks, guest memory mappings.
fn memory() -> Vec<Entry> {
    let exec = libc::PROT_EXEC as u64;
    vec![
        any(libc::SYS_brk),
        // No executable mappings: the loader is done before the filter exists.
        without_bits(libc::SYS_mmap, 2, exec),
        without_bits(libc::SYS_mprotect, 2, exec),
        any(libc::SYS_munmap),
        any(libc::SYS_mremap),
        one_of(
            libc::SYS_madvise,
            2,
            &[
                libc::MADV_NORMAL as u64,
                libc::MADV_RANDOM as u64,
                libc::MADV_SEQUENTIAL as u64, // analyze's input
                libc::MADV_WILLNEED as u64,
                libc::MADV_DONTNEED as u64, // allocator, thread stacks, discarded pages
                libc::MADV_FREE as u64,
                libc::MADV_REMOVE as u64, // dropping pages of shared memory
                libc::MADV_HUGEPAGE as u64,
                libc::MADV_NOHUGEPAGE as u64,
                libc::MADV_POPULATE_READ as u64,
                libc::MADV_POPULATE_WRITE as u64, // guest memory mapped ahead
            ],
        ),
    ]
}

/// Threads and their synchronisation (std, glibc's pthread_create and exit).
fn threads() -> Vec<Entry> {
    let thread = (libc::CLONE_THREAD | libc::CLONE_VM) as u64;
    vec![
        // Threads only, never a new process: glibc falls back to clone(2) because clone3,
        // whose flags sit in memory a filter cannot read, gets ENOSYS (see `soft_filter`).
        (
            libc::SYS_clone,
            vec![rule(vec![cond(0, Op::MaskedEq(thread), thread)])],
        ),
        any(libc::SYS_clone3),
        any(libc::SYS_futex),
        any(libc::SYS_set_robust_list),
        any(libc::SYS_rseq),
        any(libc::SYS_sched_yield),
        any(libc::SYS_sched_getaffinity), // available_parallelism
        any(libc::SYS_gettid),
        any(libc::SYS_exit),
        any(libc::SYS_sigaltstack), // std's guard handler stack, per thread
        any(libc::SYS_getrandom),   // HashMap seeds
        // std reads the stack limit; it may never set one.
        (libc::SYS_prlimit64, vec![rule(vec![cond(2, Op::Eq, 0)])]),
        any(libc::SYS_getrlimit),
        // Thread names; the parent-death signal (set again by a re-parented helper).
        one_of(
            libc::SYS_prctl,
            0,
            &[
                libc::PR_SET_NAME as u64,
                libc::PR_GET_NAME as u64,
                libc::PR_SET_PDEATHSIG as u64,
                libc::PR_GET_PDEATHSIG as u64,
            ],
        ),
        // The postcopy fault-path threads ask for nice -10 (their own thread id): fault,
        // preempt and (without preempt) loader on a destination, return-path reader and
        // preempt sender on a source.
        one_of(libc::SYS_setpriority, 0, &[libc::PRIO_PROCESS as u64]),
        one_of(libc::SYS_getpriority, 0, &[libc::PRIO_PROCESS as u64]),
    ]
}

/// Process identity, exit, signals and time.
fn process() -> Vec<Entry> {
    let pid = std::process::id() as u64;
    vec![
        any(libc::SYS_exit_group),
        any(libc::SYS_getpid),
        any(libc::SYS_getppid),
        any(libc::SYS_getuid), // peer credential checks
        any(libc::SYS_geteuid),
        any(libc::SYS_getgid),
        any(libc::SYS_getegid),
        any(libc::SYS_rt_sigprocmask),
        any(libc::SYS_rt_sigreturn),
        any(libc::SYS_restart_syscall),
        // Handlers may be set (SIGBUS, SIGPIPE), but never the one that reports violations.
        (
            libc::SYS_rt_sigaction,
            vec![rule(vec![cond(0, Op::Ne, libc::SIGSYS as u64)])],
        ),
        // Signals only to this process (abort, the violation report's own SIGSYS).
        one_of(libc::SYS_tgkill, 0, &[pid]),
        one_of(libc::SYS_kill, 0, &[pid]),
        any(libc::SYS_clock_gettime), // vDSO fallbacks
        any(libc::SYS_clock_getres),
        any(libc::SYS_gettimeofday),
        any(libc::SYS_clock_nanosleep),
        any(libc::SYS_nanosleep),
    ]
}

/// I/O on open fds, and the path calls Landlock limits.
fn files() -> Vec<Entry> {
    vec![
        any(libc::SYS_read),
        any(libc::SYS_write),
        any(libc::SYS_readv),
        any(libc::SYS_writev),
        any(libc::SYS_pread64),
        any(libc::SYS_pwrite64),
        any(libc::SYS_preadv),
        any(libc::SYS_pwritev),
        any(libc::SYS_lseek),
        any(libc::SYS_close),
        any(libc::SYS_poll),
        any(libc::SYS_ppoll),
        // glibc uses newfstatat or fstat, std uses statx (falling back on ENOSYS).
        any(libc::SYS_fstat),
        any(libc::SYS_newfstatat),
        any(libc::SYS_statx),
        any(libc::SYS_fstatfs), // is guest memory on tmpfs?
        // Paths: Landlock decides which (file: URIs, unix: listeners, /etc/localtime).
        any(libc::SYS_openat),
        any(libc::SYS_unlink),
        any(libc::SYS_unlinkat),
        any(libc::SYS_readlink), // /proc/self/fd/N: is it a userfaultfd?
        any(libc::SYS_readlinkat),
        any(libc::SYS_ftruncate),
        // realpath(3) (explaining a refused path) and existence checks.
        any(libc::SYS_access),
        any(libc::SYS_faccessat),
        any(libc::SYS_faccessat2),
        any(libc::SYS_getcwd),
        one_of(
            libc::SYS_fcntl,
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
                libc::F_ADD_SEALS as u64, // sealing guest memfds against shrinking
                libc::F_GET_SEALS as u64,
            ],
        ),
        // isatty on stderr (log colours), non-blocking and close-on-exec toggles.
        one_of(
            libc::SYS_ioctl,
            1,
            &[libc::TCGETS, libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX],
        ),
    ]
}

/// Migration and control sockets: `unix:`, `tcp:` (and DNS for host names), fds passed
/// with SCM_RIGHTS.
fn sockets() -> Vec<Entry> {
    let families = [
        libc::AF_UNIX as u64,
        libc::AF_INET as u64,
        libc::AF_INET6 as u64,
    ];
    let levels = [
        libc::SOL_SOCKET as u64,
        libc::IPPROTO_TCP as u64,
        libc::IPPROTO_IP as u64,
        libc::IPPROTO_IPV6 as u64,
    ];
    vec![
        one_of(libc::SYS_socket, 0, &families),
        one_of(libc::SYS_socketpair, 0, &[libc::AF_UNIX as u64]),
        any(libc::SYS_bind),
        any(libc::SYS_listen),
        any(libc::SYS_accept),
        any(libc::SYS_accept4),
        any(libc::SYS_connect),
        any(libc::SYS_shutdown),
        any(libc::SYS_getsockname),
        any(libc::SYS_getpeername),
        one_of(libc::SYS_setsockopt, 1, &levels),
        one_of(libc::SYS_getsockopt, 1, &levels),
        any(libc::SYS_sendto),
        any(libc::SYS_recvfrom),
        any(libc::SYS_sendmsg),
        any(libc::SYS_recvmsg),
        any(libc::SYS_sendmmsg), // glibc's resolver
        any(libc::SYS_recvmmsg),
        // A socket's unsent bytes (SIOCOUTQ): the postcopy push leaves room for requests.
        one_of(libc::SYS_ioctl, 1, &[libc::TIOCOUTQ]),
    ]
}

/// Guest memory: the VMM's userfaultfd, punching holes, memfds and eventfds.
fn guest_memory() -> Vec<Entry> {
    let ioctl = one_of(
        libc::SYS_ioctl,
        1,
        &[
            UFFDIO_API,
            UFFDIO_REGISTER,
            UFFDIO_UNREGISTER,
            UFFDIO_WAKE,
            UFFDIO_COPY,
            UFFDIO_ZEROPAGE,
            UFFDIO_WRITEPROTECT,
            UFFDIO_CONTINUE,
        ],
    );
    vec![
        ioctl,
        // Punching holes only (discarded pages), never growing a file.
        one_of(
            libc::SYS_fallocate,
            1,
            &[(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64],
        ),
        any(libc::SYS_memfd_create),
        any(libc::SYS_eventfd2),
    ]
}

/// Control socket set-up that may happen after the sandbox (a private directory, a umask
/// for the bind, fixing a mode through the fd). No chmod by path: Landlock does not check
/// it.
fn control_socket() -> Vec<Entry> {
    vec![
        any(libc::SYS_umask),
        any(libc::SYS_mkdir),
        any(libc::SYS_mkdirat),
        any(libc::SYS_rmdir),
        any(libc::SYS_fchmod),
    ]
}

/// `analyze --extract-ram`: makes its output directory; copies a mapped-ram file's pages
/// file to file.
fn analyze_output() -> Vec<Entry> {
    vec![
        any(libc::SYS_mkdir),
        any(libc::SYS_mkdirat),
        any(libc::SYS_copy_file_range),
    ]
}

/// The allowlist of `profile`.
pub(crate) fn allowlist(profile: Profile) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut groups = vec![memory(), threads(), process(), files(), narrowing()];
    match profile {
        Profile::Helper => {
            groups.push(sockets());
            groups.push(guest_memory());
            groups.push(control_socket());
        }
        Profile::Analyze => groups.push(analyze_output()),
    }
    merge(groups)
}

/// Threads may stack a narrower filter of their own (see `page_mover`): installing one takes
/// these two calls, which can only take rights away.
fn narrowing() -> Vec<Entry> {
    vec![
        one_of(libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64]),
        (
            libc::SYS_seccomp,
            vec![rule(vec![
                cond(0, Op::Eq, libc::SECCOMP_SET_MODE_FILTER as u64),
                cond(1, Op::Eq, 0), // no TSYNC, no listener: this thread only
            ])],
        ),
    ]
}

/// The threads that only copy pages into guest memory (precopy page writers), stacked on
/// the process filter: memory, their job queue, and ending (a panic's message, abort).
/// No files, sockets or ioctls.
pub(crate) fn page_mover() -> BTreeMap<i64, Vec<SeccompRule>> {
    let pid = std::process::id() as u64;
    let own = vec![
        any(libc::SYS_futex),
        any(libc::SYS_sched_yield),
        any(libc::SYS_rseq),
        any(libc::SYS_gettid),
        any(libc::SYS_getpid),
        any(libc::SYS_getrandom),
        any(libc::SYS_clock_gettime),
        any(libc::SYS_clock_nanosleep),
        any(libc::SYS_close), // the last reference to a block may drop here
        any(libc::SYS_exit),
        any(libc::SYS_exit_group),
        any(libc::SYS_sigaltstack),
        any(libc::SYS_rt_sigprocmask),
        any(libc::SYS_rt_sigreturn),
        any(libc::SYS_restart_syscall),
        one_of(libc::SYS_tgkill, 0, &[pid]),
        one_of(libc::SYS_write, 0, &[2]), // stderr only: a panic's message
    ];
    merge(vec![memory(), own])
}

/// Multifd channel threads (a source's senders, a destination's receivers), stacked on the
/// process filter: a page mover's calls plus I/O on sockets they were handed (readv/writev
/// of packets, recv with MSG_PEEK or MSG_DONTWAIT, sendmsg), waiting on them next to the
/// cancel token (poll, ppoll), shutting them down on error, and re-arming their
/// SO_RCVTIMEO/SO_SNDTIMEO; positional I/O on the files they were handed (mapped-ram's
/// multifd channels `pwrite`/`pread` pages at their fixed offsets). No socket(2),
/// connect(2) or accept(2): the migration thread opens every channel before it hands them
/// over. No opens or ioctls either.
pub(crate) fn channel_mover() -> BTreeMap<i64, Vec<SeccompRule>> {
    let own = vec![
        any(libc::SYS_read),
        any(libc::SYS_readv),
        any(libc::SYS_recvfrom),
        any(libc::SYS_recvmsg),
        any(libc::SYS_write),
        any(libc::SYS_writev),
        any(libc::SYS_pread64),
        any(libc::SYS_preadv),
        any(libc::SYS_pwrite64),
        any(libc::SYS_pwritev),
        any(libc::SYS_sendto),
        any(libc::SYS_sendmsg),
        any(libc::SYS_poll),
        any(libc::SYS_ppoll),
        any(libc::SYS_shutdown),
        one_of(libc::SYS_setsockopt, 1, &[libc::SOL_SOCKET as u64]),
        one_of(libc::SYS_getsockopt, 1, &[libc::SOL_SOCKET as u64]),
    ];
    let mut m = page_mover();
    for (nr, rules) in own {
        // This group's rule replaces the page movers' narrower one (write: stderr only).
        m.insert(nr, rules);
    }
    m
}

/// Merges groups by syscall (a call in two groups: either's rules).
fn merge(groups: Vec<Vec<Entry>>) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, rules) in groups.into_iter().flatten() {
        match map.get_mut(&nr) {
            None => {
                map.insert(nr, rules);
            }
            // An unconditional entry stays unconditional.
            Some(existing) if existing.is_empty() => {}
            Some(_) if rules.is_empty() => {
                map.insert(nr, rules);
            }
            Some(existing) => existing.extend(rules),
        }
    }
    map
}

/// The main filter: the allowlist, anything else gets `mismatch` (trap or log).
pub(crate) fn main_filter(
    profile: Profile,
    mismatch: SeccompAction,
) -> Result<BpfProgram, FilterError> {
    compile(allowlist(profile), mismatch, SeccompAction::Allow)
}

/// The page movers' own filter, stacked on the main one by each such thread.
pub(crate) fn page_mover_filter(mismatch: SeccompAction) -> Result<BpfProgram, FilterError> {
    compile(page_mover(), mismatch, SeccompAction::Allow)
}

/// The multifd channel threads' own filter, stacked on the main one by each such thread.
pub(crate) fn channel_mover_filter(mismatch: SeccompAction) -> Result<BpfProgram, FilterError> {
    compile(channel_mover(), mismatch, SeccompAction::Allow)
}

/// Stacked on the main one: clone3 fails with ENOSYS so that glibc uses clone(2), whose
/// flags the main filter checks. (The kernel applies the strictest action of all filters.)
pub(crate) fn soft_filter() -> Result<BpfProgram, FilterError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, FilterError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)?;
    BpfProgram::try_from(filter).map_err(|e| FilterError::Compile(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_profiles_compile() {
        for p in [Profile::Helper, Profile::Analyze] {
            let prog = main_filter(p, SeccompAction::Trap).unwrap();
            assert!(prog.len() > 50, "{p:?}: {} instructions", prog.len());
        }
        assert!(!soft_filter().unwrap().is_empty());
        assert!(!page_mover_filter(SeccompAction::Trap).unwrap().is_empty());
    }

    #[test]
    fn page_movers_are_narrower() {
        let m = page_mover();
        let h = allowlist(Profile::Helper);
        assert!(m.len() < h.len() / 2, "{} of {}", m.len(), h.len());
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_ioctl,
            libc::SYS_clone,
        ] {
            assert!(!m.contains_key(&nr), "{nr}");
        }
        for nr in m.keys() {
            assert!(h.contains_key(nr), "{nr} is not in the process allowlist");
        }
    }

    #[test]
    fn channel_movers_do_socket_io_but_open_nothing() {
        let c = channel_mover();
        let h = allowlist(Profile::Helper);
        assert!(c.len() < h.len() / 2, "{} of {}", c.len(), h.len());
        for nr in [
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_ppoll,
            libc::SYS_shutdown,
        ] {
            assert!(c.contains_key(&nr), "{nr} is missing");
        }
        assert!(c[&libc::SYS_write].is_empty(), "write to any fd");
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_ioctl,
            libc::SYS_clone,
        ] {
            assert!(!c.contains_key(&nr), "{nr}");
        }
        for nr in c.keys() {
            assert!(h.contains_key(nr), "{nr} is not in the process allowlist");
        }
        assert!(!channel_mover_filter(SeccompAction::Trap)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn analyze_is_narrower() {
        let h = allowlist(Profile::Helper);
        let a = allowlist(Profile::Analyze);
        assert!(h.contains_key(&libc::SYS_socket));
        assert!(!a.contains_key(&libc::SYS_socket));
        assert!(!h.contains_key(&libc::SYS_execve));
        assert!(!a.contains_key(&libc::SYS_execve));
        // ioctl: the terminal/fd requests plus the userfaultfd ones and SIOCOUTQ, merged.
        assert_eq!(h[&libc::SYS_ioctl].len(), 13);
        assert_eq!(a[&libc::SYS_ioctl].len(), 4);
    }
}
