//! postcopy-preempt on the source: a thread that takes page requests straight from the
//! return-path reader and sends the pages on the preempt channel, so that a request never
//! waits behind the push on the main channel (QEMU sends them from its return-path thread
//! too). A page whose bit the push took first is on its way there and is skipped.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::engine::migration::{MigrationCtx, Stats};
use crate::engine::source::error::{PeerError, PreemptError};
use crate::engine::source::pages::{BlockTodo, Names, Sink};
use crate::engine::source::rp_reader::{PageRequest, Route, MAX_QUEUED_REQUESTS};
use crate::engine::source::writer::Writer;
use crate::engine::source::SourceError;
use crate::memory::block::RamBlock;
use crate::transport::{Channel, TransportError};

/// What the preempt sender needs of a block: its memory, the shared to-do bits and the
/// holes (fixed from the start of postcopy on).
pub(crate) type UrgentBlock = (Arc<RamBlock>, Arc<Vec<AtomicU64>>, Vec<u64>);

/// What the preempt sender did, added to the migration's counters when it stops.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    pages: AtomicU64,
    bytes: AtomicU64,
}

/// The running preempt sender. It ends when its request queue closes (the route's sender
/// dropped) or its channel fails; [`Urgent::stop`] (or a drop) closes the queue and joins it.
pub(crate) struct Urgent {
    /// The channel's socket, to shut down so that the thread's I/O returns.
    shut: OwnedFd,
    route: Route,
    thread: Option<JoinHandle<Result<(), SourceError>>>,
    counts: Arc<Counts>,
}

impl Urgent {
    /// Starts the sender on `chan`, with the requests `pending` first; the return-path
    /// reader's later requests come through `route`. The thread runs `secure` (the TLS
    /// handshake, under TLS) first: a destination may accept the channel only once the
    /// main channel's LISTEN reached it, so the migration thread cannot wait for it.
    pub(crate) fn spawn(
        chan: Channel,
        secure: impl FnOnce(Channel) -> Result<Channel, TransportError> + Send + 'static,
        blocks: Vec<UrgentBlock>,
        route: Route,
        pending: impl Iterator<Item = PageRequest>,
        log: slog::Logger,
    ) -> std::io::Result<Urgent> {
        let (tx, rx) = mpsc::sync_channel::<PageRequest>(MAX_QUEUED_REQUESTS);
        let counts = Arc::new(Counts::default());
        let shut = chan.try_clone_fd()?;
        let n = counts.clone();
        let thread = std::thread::Builder::new()
            .name("qmh-urgent".into())
            .spawn(move || {
                crate::engine::priority::raise(&log, "postcopy-preempt sender");
                let c = secure(chan).map_err(|e| PeerError::Preempt(PreemptError::Connect(e)))?;
                serve(Arc::new(c), &blocks, rx, &n)
            })?;
        for r in pending {
            // A full queue drops the request: the push sends the page anyway.
            let _ = tx.try_send(r);
        }
        *route.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        Ok(Urgent {
            shut,
            route,
            thread: Some(thread),
            counts,
        })
    }

    /// Closes the request queue: the thread ends once it has sent what it has.
    fn close_queue(&self) {
        self.route.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Joins the sender, whose queue the caller has closed (broken first with `shut`, at a
    /// pause), and adds its figures to the migration's.
    pub(crate) fn stop(mut self, ctx: &MigrationCtx, shut: bool) {
        self.close_queue();
        if shut {
            crate::transport::shutdown_fd(&self.shut);
        }
        if let Some(h) = self.thread.take() {
            match h.join() {
                Ok(Ok(())) => {}
                // The main channel fails too and the migration pauses; the recovery's
                // bitmaps say what to send again.
                Ok(Err(e)) => {
                    slog::debug!(ctx.log, "postcopy-preempt write failed"; "error" => %e)
                }
                Err(_) => slog::warn!(ctx.log, "the postcopy-preempt sender died"),
            }
        }
        let st = &ctx.stats;
        let c = &self.counts;
        let pages = c.pages.load(Ordering::Relaxed);
        Stats::add(&st.postcopy_requests, c.requests.load(Ordering::Relaxed));
        Stats::add(&st.postcopy_preempt_pages, pages);
        Stats::add(&st.normal, pages);
        Stats::add(&st.transferred, c.bytes.load(Ordering::Relaxed));
    }
}

impl Drop for Urgent {
    /// Not stopped (an error on the way): the channel is shut down so that the thread ends,
    /// and it is joined.
    fn drop(&mut self) {
        if let Some(h) = self.thread.take() {
            self.close_queue();
            crate::transport::shutdown_fd(&self.shut);
            let _ = h.join();
        }
    }
}

/// The sender's loop: each request's pages, those still to send, each record naming its
/// block (nothing relies on the channel's past), flushed per request.
fn serve(
    chan: Arc<Channel>,
    blocks: &[UrgentBlock],
    rx: mpsc::Receiver<PageRequest>,
    n: &Counts,
) -> Result<(), SourceError> {
    let todo: Vec<BlockTodo<'_>> = blocks
        .iter()
        .map(|(block, todo, holes)| BlockTodo {
            block,
            todo: todo.clone(),
            holes: holes.clone(),
        })
        .collect();
    let mut out = Writer::new(chan, 0);
    for r in rx {
        n.requests.fetch_add(1, Ordering::Relaxed);
        let Some(bt) = todo.get(r.block) else {
            continue;
        };
        let before = out.produced();
        for (wi, mask) in r.words() {
            let word = bt.take(wi, mask);
            if word != 0 {
                let sent = bt.send_word(
                    &mut out,
                    Sink::Stream,
                    r.block,
                    wi,
                    word,
                    &mut Names::Always,
                )?;
                n.pages.fetch_add(sent.pages(), Ordering::Relaxed);
            }
        }
        n.bytes
            .fetch_add(out.produced() - before, Ordering::Relaxed);
        out.flush()?;
    }
    Ok(())
}
