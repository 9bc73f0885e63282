//! A postcopy destination's guest as its parent VMM holds it: a memfd, the parent's own
//! mapping of it with a userfaultfd registered for missing faults, and reader threads that
//! fault pages in through that mapping (what the guest's vCPUs would do).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qemu_migration_helper::client::RamBlockSpec;
use userfaultfd::{Uffd, UffdBuilder};

use crate::helper::{HelperVm, Memfd};
use crate::map::RamMap;
use crate::util::{xorshift, MIB};

/// A destination's guest as its parent VMM holds it: memfd, the parent's mapping, and a
/// userfaultfd registered for missing faults on that mapping.
pub struct UffdGuest {
    pub mem: Memfd,
    pub map: Arc<RamMap>,
    pub uffd: Option<Uffd>,
}

impl UffdGuest {
    pub fn new(size: u64) -> UffdGuest {
        let mem = Memfd::new("uffd-guest", size);
        let map = Arc::new(mem.map());
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .expect("userfaultfd (run as root, or set vm.unprivileged_userfaultfd=1)");
        uffd.register(map.as_ptr() as *mut _, size as usize)
            .expect("UFFDIO_REGISTER on the memfd mapping");
        UffdGuest {
            mem,
            map,
            uffd: Some(uffd),
        }
    }

    /// Allocates every page with `fill`, as a parent that preallocates guest memory does;
    /// through the fd, as the registered mapping would fault on a missing page.
    pub fn preallocate(&self, fill: u8) {
        let f = std::fs::File::from(self.mem.fd.try_clone().expect("dup"));
        let chunk = vec![fill; MIB as usize];
        for off in (0..self.mem.size).step_by(MIB as usize) {
            std::os::unix::fs::FileExt::write_all_at(&f, &chunk, off).expect("preallocate");
        }
    }

    pub fn host_addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    pub fn uffd_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the Uffd lives as long as self.
        unsafe { BorrowedFd::borrow_raw(self.uffd.as_ref().expect("uffd").as_raw_fd()) }
    }

    /// Registers this guest as block `id` of a helper destination, with its userfaultfd.
    pub fn attach(&self, h: &mut HelperVm, id: &str) {
        h.client
            .getfd("guest", self.mem.fd.as_fd())
            .expect("getfd guest");
        h.client.getfd("uffd", self.uffd_fd()).expect("getfd uffd");
        h.client.userfaultfd_set("uffd").expect("userfaultfd-set");
        h.client
            .ram_block_add(&RamBlockSpec {
                id: id.into(),
                fdname: "guest".into(),
                offset: 0,
                size: self.mem.size,
                host_addr: Some(self.host_addr()),
                ..Default::default()
            })
            .expect("ram-block-add");
    }

    /// Drops the userfaultfd, so threads blocked on faults wake up (used when a test fails).
    pub fn release(&mut self) {
        self.uffd = None;
    }
}

/// Reader threads that fault random pages in through the parent's mapping and compare each
/// page with the source's content.
pub struct Readers {
    stop: Arc<AtomicBool>,
    checked: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<Result<(), String>>>,
}

impl Readers {
    pub fn start(guest: &UffdGuest, expected: Arc<Vec<u8>>, threads: usize, seed: u64) -> Readers {
        Self::start_paced(guest, expected, threads, seed, Duration::ZERO)
    }

    /// Like `start`, with a pause between touches, so that the readers alone cannot fault
    /// in the whole guest before a test is done with postcopy (e.g. before its cuts).
    pub fn start_paced(
        guest: &UffdGuest,
        expected: Arc<Vec<u8>>,
        threads: usize,
        seed: u64,
        pace: Duration,
    ) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let checked = Arc::new(AtomicU64::new(0));
        let pages = (guest.mem.size / 4096) as usize;
        let handles = (0..threads)
            .map(|t| {
                let (map, expected, stop, checked) = (
                    guest.map.clone(),
                    expected.clone(),
                    stop.clone(),
                    checked.clone(),
                );
                std::thread::spawn(move || {
                    let mut x = seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    while !stop.load(Ordering::Relaxed) {
                        let p = (xorshift(&mut x) % pages as u64) as usize;
                        let got = &map[p * 4096..(p + 1) * 4096];
                        if got != &expected[p * 4096..(p + 1) * 4096] {
                            return Err(format!(
                                "page {p} differs from the source while in postcopy"
                            ));
                        }
                        checked.fetch_add(1, Ordering::Relaxed);
                        if !pace.is_zero() {
                            std::thread::sleep(pace);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        Readers {
            stop,
            checked,
            handles,
        }
    }

    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => panic!("reader thread panicked"),
            }
        }
        self.checked.load(Ordering::Relaxed)
    }
}
