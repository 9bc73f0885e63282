//! Guest memory the parent could shrink under the helper. A memfd made with
//! MFD_ALLOW_SEALING gets F_SEAL_SHRINK at `ram-block-add` (as QEMU's memory-backend-memfd
//! seals its own memfds): the parent's ftruncate() to a smaller size then fails with EPERM.
//! Other fds (memfds without MFD_ALLOW_SEALING, files in /dev/shm or on hugetlbfs) cannot
//! be sealed, and an access through the mapping past their new end raises SIGBUS. The
//! handler here turns that into a failed migration instead of the helper's death: it maps
//! anonymous memory over the whole block (the access completes; the block is marked lost
//! and refused from then on), and shuts the migration channel down, so that nothing read
//! after the loss can reach the peer and the engine fails at its next I/O. Everything the
//! handler touches is an atomic or an async-signal-safe syscall.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Mappings watched at once (a block and its dirty bitmap take one each).
pub(crate) const MAX_MAPPINGS: usize = 1024;

struct Slot {
    used: AtomicBool,
    start: AtomicUsize,
    len: AtomicUsize,
    lost: AtomicBool,
    reported: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    used: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    lost: AtomicBool::new(false),
    reported: AtomicBool::new(false),
};
static TABLE: [Slot; MAX_MAPPINGS] = [FREE; MAX_MAPPINGS];
/// The names of the watched mappings, for messages (never touched by the handler).
static NAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The live migration channel (a duplicate owned by `MigrationCtx`), or -1.
static CHANNEL_FD: AtomicI32 = AtomicI32::new(-1);
/// The SIGBUS disposition before ours, for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A watched mapping; dropping it stops watching (drop it before unmapping).
pub(crate) struct Guard {
    slot: usize,
}

impl Guard {
    /// The mapping was replaced after its file shrank: its content is gone.
    pub(crate) fn lost(&self) -> bool {
        TABLE[self.slot].lost.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.start.store(0, Ordering::Release);
        s.len.store(0, Ordering::Release);
        s.lost.store(false, Ordering::Release);
        s.reported.store(false, Ordering::Release);
        s.used.store(false, Ordering::Release);
    }
}

/// Watches `[start, start+len)`, a shared mapping of `name`'s fd. None when
/// [`MAX_MAPPINGS`] are watched already.
///
/// # Safety
/// `[start, start+len)` is a page-aligned mapping of the caller's that stays mapped until
/// the returned [`Guard`] is dropped: on a SIGBUS inside it, the handler maps anonymous
/// memory over the whole range (MAP_FIXED), which would clobber whatever else lived there.
pub(crate) unsafe fn watch(name: &str, start: *mut u8, len: usize) -> Option<Guard> {
    install();
    let slot = TABLE.iter().position(|s| {
        s.used
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })?;
    {
        let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
        if names.len() <= slot {
            names.resize(slot + 1, String::new());
        }
        names[slot] = name.to_string();
    }
    let s = &TABLE[slot];
    s.len.store(len, Ordering::Release);
    s.start.store(start as usize, Ordering::Release);
    Some(Guard { slot })
}

/// The channel the handler shuts down on a loss (`None`: no migration runs).
pub(crate) fn set_channel(fd: Option<&OwnedFd>) {
    CHANNEL_FD.store(fd.map_or(-1, |f| f.as_raw_fd()), Ordering::Release);
}

/// The mappings lost since the last call, by name.
pub(crate) fn take_losses() -> Vec<String> {
    let names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    TABLE
        .iter()
        .enumerate()
        .filter(|(_, s)| s.lost.load(Ordering::Acquire) && !s.reported.swap(true, Ordering::AcqRel))
        .map(|(i, _)| names.get(i).cloned().unwrap_or_default())
        .collect()
}

/// Adds F_SEAL_SHRINK to `fd` where its seals allow; true when the fd cannot shrink now.
pub(crate) fn seal_shrink(fd: &OwnedFd) -> bool {
    // SAFETY: fcntl on an fd we hold; F_GET_SEALS/F_ADD_SEALS take an int or nothing.
    unsafe {
        let seals = libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS);
        if seals < 0 {
            return false;
        }
        if seals & libc::F_SEAL_SHRINK != 0 {
            return true;
        }
        seals & libc::F_SEAL_SEAL == 0
            && libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) == 0
    }
}

fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only uses async-signal-safe calls.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_sigbus;
            new.sa_sigaction = handler as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) == 0 {
                let _ = PREVIOUS.set(old);
            }
        }
    });
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in TABLE.iter() {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: replaces exactly the watched mapping (page aligned, `len` long) with
        // anonymous memory; the owner unmaps that range when it drops it, as before.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            break;
        }
        s.lost.store(true, Ordering::Release);
        let fd = CHANNEL_FD.load(Ordering::Acquire);
        if fd >= 0 {
            // SAFETY: shutdown(2) is async-signal-safe; a stale fd only fails.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        return;
    }
    // Not ours: put the previous disposition back; the access faults again under it.
    // SAFETY: sigaction(2) and signal(2) are async-signal-safe.
    unsafe {
        match PREVIOUS.get() {
            Some(old) => {
                libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut());
            }
            None => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

    #[test]
    fn seals_only_what_allows_sealing() {
        let sealable = memfd_create(
            c"qmh-seal",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        nix::unistd::ftruncate(&sealable, 8192).unwrap();
        assert!(seal_shrink(&sealable));
        assert_eq!(
            nix::unistd::ftruncate(&sealable, 4096),
            Err(nix::errno::Errno::EPERM)
        );
        nix::unistd::ftruncate(&sealable, 16384).expect("growing is still allowed");
        let plain = memfd_create(c"qmh-plain", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        assert!(!seal_shrink(&plain));
    }
}
