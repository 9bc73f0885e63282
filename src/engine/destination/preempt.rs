//! postcopy-preempt on the destination: the second connection on which a QEMU source sends
//! the pages the destination asked for, so that they do not queue behind the background
//! push on the main channel (QEMU's `postcopy-preempt` capability).
//!
//! The source connects it to the same address as the main channel; nothing tells the two
//! apart but their order. It carries bare RAM records (ZERO and PAGE, CONTINUE meaning the
//! block last named on this channel): no header, no sections. A QEMU 10.0 source never ends
//! it (it closes it after the destination's SHUT); with 7.2 machine compat it ends with an
//! EOS record. Each page is placed with UFFDIO_COPY like every postcopy page, so a page
//! that also comes on the main channel is merely EEXIST.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::engine::destination::fault::PostcopyDest;
use crate::memory::block::RamBlock;
use crate::transport::{Channel, Incoming};
use crate::wire::ram::{self, Record};

/// Read buffer: a few pages; the channel carries single requested pages.
const BUF: usize = 256 << 10;
/// The nice value the threads a vCPU waits on ask for (see [`raise_priority`]).
const NICE: libc::c_int = -10;

/// Asks for this thread to be scheduled ahead of the threads that push and place background
/// pages: on a small host those keep every CPU busy, and a vCPU waits while a fault-path
/// thread waits for a CPU. Needs CAP_SYS_NICE (or RLIMIT_NICE); without it the thread stays
/// at the default priority and the tail latency is higher.
pub fn raise_priority(log: &slog::Logger, thread: &str) {
    // SAFETY: a plain syscall on this thread's own id.
    let raised =
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) } == 0;
    slog::debug!(log, "thread priority"; "thread" => thread, "nice" => NICE, "raised" => raised);
}

/// The thread that accepts the preempt channel and places what comes on it.
pub struct PreemptChannel {
    stop: Arc<AtomicBool>,
    /// The accepted socket, to shut down so that a blocked read returns.
    chan: Arc<Mutex<Option<OwnedFd>>>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl PreemptChannel {
    /// Starts accepting on `incoming` (the main channel's listener); counts the pages that
    /// come in `pages` (shared by the channels of successive recoveries). A broken or
    /// malformed preempt channel shuts `main` down, so that the loader pauses as for any
    /// failed link (QEMU does the same): in postcopy, no side may give up the guest.
    pub fn spawn(
        incoming: Incoming,
        pc: Arc<PostcopyDest>,
        blocks: Vec<Arc<RamBlock>>,
        pages: Arc<AtomicU64>,
        main: Option<OwnedFd>,
        log: slog::Logger,
    ) -> std::io::Result<PreemptChannel> {
        let stop = Arc::new(AtomicBool::new(false));
        let chan: Arc<Mutex<Option<OwnedFd>>> = Arc::default();
        let (st, slot, n) = (stop.clone(), chan.clone(), pages);
        let handle = std::thread::Builder::new()
            .name("qmh-preempt".into())
            .spawn(move || {
                let c = match incoming.accept_another(&st) {
                    Ok(c) => c,
                    Err(_) if st.load(Ordering::Acquire) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                };
                incoming.done_listening();
                drop(incoming);
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = c.try_clone_fd().ok();
                if st.load(Ordering::Acquire) {
                    return Ok(());
                }
                slog::info!(log, "postcopy-preempt channel connected"; "peer" => &c.peer);
                // A vCPU waits on every page this thread reads.
                raise_priority(&log, "postcopy-preempt");
                let r = read_pages(&c, &pc, &blocks, &n);
                match &r {
                    Err(_) if st.load(Ordering::Acquire) => return Ok(()),
                    Err(e) => {
                        slog::warn!(log, "postcopy-preempt channel failed"; "error" => e);
                        if let Some(m) = &main {
                            crate::transport::shutdown_fd(m);
                        }
                    }
                    Ok(()) => slog::debug!(log, "postcopy-preempt channel ended"),
                }
                r
            })?;
        Ok(PreemptChannel {
            stop,
            chan,
            handle: Some(handle),
        })
    }

    /// Stops reading (the source sends nothing more once every requested page has arrived)
    /// and returns how the channel ended.
    pub fn stop(mut self) -> Result<(), String> {
        self.shut();
        self.handle.take().map_or(Ok(()), |h| {
            h.join().unwrap_or(Err("preempt thread panicked".into()))
        })
    }

    fn shut(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(fd) = self.chan.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            crate::transport::shutdown_fd(fd);
        }
    }
}

impl Drop for PreemptChannel {
    fn drop(&mut self) {
        self.shut();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Reads records until EOF or EOS, placing each page.
fn read_pages(
    c: &Channel,
    pc: &PostcopyDest,
    blocks: &[Arc<RamBlock>],
    pages: &AtomicU64,
) -> Result<(), String> {
    let mut buf = vec![0u8; BUF];
    let (mut start, mut end) = (0usize, 0usize);
    let mut last: Option<usize> = None;
    let mut offset = 0u64;
    loop {
        loop {
            let at = offset;
            let rec = match ram::decode_record(&buf[start..end]) {
                Ok(Some((rec, n))) => {
                    start += n;
                    offset += n as u64;
                    rec
                }
                Ok(None) => break,
                Err(e) => return Err(format!("at preempt stream offset {at}: {e}")),
            };
            let (off, name) = match rec {
                Record::Page { offset, block, .. } | Record::Zero { offset, block, .. } => {
                    (offset, block)
                }
                Record::Eos => return Ok(()),
                Record::MemSize { .. } | Record::MultifdFlush => {
                    return Err(format!(
                        "at preempt stream offset {at}: only pages belong on the postcopy-preempt channel"
                    ))
                }
            };
            let bi = match name {
                Some(n) => blocks.iter().position(|b| b.id == n).ok_or_else(|| {
                    format!("at preempt stream offset {at}: page for unknown RAM block {n:?}")
                })?,
                None => last.ok_or_else(|| {
                    format!("at preempt stream offset {at}: CONTINUE page with no previous block")
                })?,
            };
            last = Some(bi);
            let b = &blocks[bi];
            if off % TARGET_PAGE_SIZE as u64 != 0 || off >= b.size {
                return Err(format!(
                    "at preempt stream offset {at}: page offset {off:#x} is outside RAM block {:?} of size {:#x}",
                    b.id, b.size
                ));
            }
            let placed = match rec {
                Record::Page { data, .. } => pc.place_page(bi, off, data),
                Record::Zero { fill: 0, .. } => pc.place_zero(bi, off),
                Record::Zero { fill, .. } => pc.place_page(bi, off, &[fill; TARGET_PAGE_SIZE]),
                _ => Ok(()),
            };
            placed.map_err(|e| e.to_string())?;
            pages.fetch_add(1, Ordering::Relaxed);
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        match c.read(&mut buf[end..]) {
            Ok(0) => return Ok(()),
            Ok(n) => end += n,
            Err(e) => return Err(format!("reading {}: {e}", c.peer)),
        }
    }
}
