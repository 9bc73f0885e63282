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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::engine::destination::fault::{FaultError, PostcopyDest};
use crate::engine::destination::place::{BlockCursor, PlaceError};
use crate::engine::destination::reader::{ReadError, Reader};
use crate::engine::migration::Securer;
use crate::memory::block::RamBlock;
use crate::transport::{CancelToken, Channel, Incoming, TransportError};
use crate::wire::ram::{self, Record};
use crate::wire::stream::WireError;

/// Read buffer: a few pages; the channel carries single requested pages.
const BUF: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PreemptError {
    #[error("{0}")]
    Accept(#[source] TransportError),
    #[error(
        "at preempt stream offset {offset}: only pages belong on the postcopy-preempt channel"
    )]
    NotAPage { offset: u64 },
    #[error("at preempt stream offset {offset}: {source}")]
    Decode {
        offset: u64,
        #[source]
        source: WireError,
    },
    #[error("at preempt stream offset {offset}: {source}")]
    Page {
        offset: u64,
        #[source]
        source: PlaceError,
    },
    #[error("at preempt stream offset {offset}: {source}")]
    Place {
        offset: u64,
        #[source]
        source: FaultError,
    },
    #[error("{0}")]
    Read(#[source] ReadError),
    #[error("postcopy-preempt is not supported with huge-page RAM block {0:?}")]
    HugePages(String),
    #[error("cannot start the postcopy-preempt thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the postcopy-preempt thread panicked")]
    Panicked,
}

/// The thread that accepts the preempt channel and places what comes on it.
pub(crate) struct PreemptChannel {
    /// Ends the wait for the connection at once.
    stop: CancelToken,
    /// The accepted socket, to shut down so that a blocked read returns.
    chan: Arc<Mutex<Option<OwnedFd>>>,
    handle: Option<JoinHandle<Result<(), PreemptError>>>,
}

/// Where the preempt channel comes from.
pub(crate) enum PreemptConn {
    /// The preempt thread accepts it on the main channel's listener (clear text, and every
    /// recovery: the source connects it after the main channel, which is already read).
    Listen(Incoming),
    /// Accepted and its TLS handshake run from the start of the migration: a QEMU source
    /// waits for the channel, handshake done, before it sends LISTEN, so the loader cannot
    /// wait for LISTEN to accept it.
    Early(EarlyPreempt),
}

/// A thread that accepts the preempt channel and runs its TLS handshake ahead of LISTEN.
pub(crate) struct EarlyPreempt {
    /// Ends the accept or the handshake; the preempt thread adopts it as its own stop.
    stop: CancelToken,
    rx: mpsc::Receiver<Result<Channel, PreemptError>>,
    handle: Option<JoinHandle<()>>,
}

impl EarlyPreempt {
    pub(crate) fn start(
        incoming: Incoming,
        securer: Securer,
        timeout: Option<Duration>,
    ) -> Result<EarlyPreempt, PreemptError> {
        let stop = CancelToken::new().map_err(PreemptError::Spawn)?;
        let (tx, rx) = mpsc::sync_channel(1);
        let st = stop.clone();
        let handle = std::thread::Builder::new()
            .name("qmh-preempt-tls".into())
            .spawn(move || {
                let r = incoming.accept_another(&st);
                incoming.done_listening();
                drop(incoming);
                let r = r.and_then(|c| securer.secure(c, "preempt", None, &st, timeout));
                let _ = tx.send(r.map_err(PreemptError::Accept));
            })
            .map_err(PreemptError::Spawn)?;
        Ok(EarlyPreempt {
            stop,
            rx,
            handle: Some(handle),
        })
    }

    /// The channel once the thread has it (or why not); the thread is joined.
    fn channel(mut self) -> Result<Channel, PreemptError> {
        let r = self.rx.recv();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        r.unwrap_or_else(|_| Err(PreemptError::Panicked))
    }
}

impl Drop for EarlyPreempt {
    /// Not taken (the migration ended or failed before LISTEN): stopped and joined.
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.stop.cancel();
            let _ = h.join();
        }
    }
}

/// Accepts on `incoming` (registering the socket in `slot` so that a stop can shut it
/// down) and runs the handshake; None when stopped.
fn accept_and_secure(
    incoming: Incoming,
    slot: &Mutex<Option<OwnedFd>>,
    st: &CancelToken,
    (securer, timeout): &(Securer, Option<Duration>),
) -> Result<Option<Channel>, PreemptError> {
    let c = match incoming.accept_another(st) {
        Ok(c) => c,
        Err(_) if st.is_cancelled() => return Ok(None),
        Err(e) => return Err(PreemptError::Accept(e)),
    };
    incoming.done_listening();
    drop(incoming);
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = c.try_clone_fd().ok();
    if st.is_cancelled() {
        return Ok(None);
    }
    match securer.secure(c, "preempt", None, st, *timeout) {
        Ok(c) => Ok(Some(c)),
        Err(_) if st.is_cancelled() => Ok(None),
        Err(e) => Err(PreemptError::Accept(e)),
    }
}

impl PreemptChannel {
    /// Starts accepting on `incoming` (the main channel's listener); counts the pages that
    /// come in `pages` (shared by the channels of successive recoveries). A broken or
    /// malformed preempt channel shuts `main` down, so that the loader pauses as for any
    /// failed link (QEMU does the same): in postcopy, no side may give up the guest.
    pub(crate) fn spawn(
        conn: PreemptConn,
        pc: Arc<PostcopyDest>,
        blocks: Vec<Arc<RamBlock>>,
        pages: Arc<AtomicU64>,
        main: Option<OwnedFd>,
        log: slog::Logger,
        secure: (Securer, Option<Duration>),
    ) -> Result<PreemptChannel, PreemptError> {
        // An early channel's stop ends its accept and handshake too.
        let stop = match &conn {
            PreemptConn::Early(e) => e.stop.clone(),
            PreemptConn::Listen(_) => CancelToken::new().map_err(PreemptError::Spawn)?,
        };
        let chan: Arc<Mutex<Option<OwnedFd>>> = Arc::default();
        let (st, slot) = (stop.clone(), chan.clone());
        let handle = std::thread::Builder::new()
            .name("qmh-preempt".into())
            .spawn(move || {
                let c = match conn {
                    PreemptConn::Listen(incoming) => {
                        accept_and_secure(incoming, &slot, &st, &secure)
                    }
                    PreemptConn::Early(e) => e.channel().map(|c| {
                        *slot.lock().unwrap_or_else(|e| e.into_inner()) = c.try_clone_fd().ok();
                        (!st.is_cancelled()).then_some(c)
                    }),
                };
                let c = match c {
                    Ok(Some(c)) => c,
                    Ok(None) => return Ok(()),
                    Err(_) if st.is_cancelled() => return Ok(()),
                    Err(e) => {
                        if let Some(m) = &main {
                            crate::transport::shutdown_fd(m);
                        }
                        return Err(e);
                    }
                };
                slog::info!(log, "postcopy-preempt channel connected"; "peer" => &c.peer);
                // A vCPU waits on every page this thread reads.
                crate::engine::priority::raise(&log, "postcopy-preempt");
                let r = read_pages(&c, &pc, &blocks, &pages);
                match &r {
                    Err(_) if st.is_cancelled() => return Ok(()),
                    Err(e) => {
                        slog::warn!(log, "postcopy-preempt channel failed"; "error" => %e);
                        if let Some(m) = &main {
                            crate::transport::shutdown_fd(m);
                        }
                    }
                    Ok(()) => slog::debug!(log, "postcopy-preempt channel ended"),
                }
                r
            })
            .map_err(PreemptError::Spawn)?;
        Ok(PreemptChannel {
            stop,
            chan,
            handle: Some(handle),
        })
    }

    /// Stops reading (the source sends nothing more once every requested page has arrived)
    /// and returns how the channel ended.
    pub(crate) fn stop(mut self) -> Result<(), PreemptError> {
        self.shut();
        self.handle
            .take()
            .map_or(Ok(()), |h| h.join().unwrap_or(Err(PreemptError::Panicked)))
    }

    fn shut(&self) {
        self.stop.cancel();
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
) -> Result<(), PreemptError> {
    let mut r = Reader::new(c, c.peer.clone(), BUF);
    // Requested pages: place each as soon as it is read.
    r.top_up = false;
    let mut cursor = BlockCursor::default();
    loop {
        loop {
            let offset = r.offset;
            let (rec, n) = match ram::decode_record(r.data()) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(source) => return Err(PreemptError::Decode { offset, source }),
            };
            if matches!(rec, Record::Eos) {
                return Ok(());
            }
            let page = cursor
                .page(blocks, &rec)
                .map_err(|source| PreemptError::Page { offset, source })?
                .ok_or(PreemptError::NotAPage { offset })?;
            pc.place(&page)
                .map_err(|source| PreemptError::Place { offset, source })?;
            pages.fetch_add(1, Ordering::Relaxed);
            r.consume(n);
        }
        if !r.fill().map_err(PreemptError::Read)? {
            return Ok(());
        }
    }
}
