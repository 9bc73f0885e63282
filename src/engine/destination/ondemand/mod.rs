//! On-demand restore: a destination with the parent's userfaultfd starts the guest from a
//! mapped-ram file in postcopy style. Every page has a fixed place in the file, so no
//! source is needed: the loader reads the file's stream in `MappedMode::Lazy` (block list,
//! checked headers, bitmaps and device state; no page), the blocks are punched empty, the
//! device state is handed over, the migration becomes `postcopy-active` (the parent runs
//! its vCPUs), and then
//! - the fault thread ([`serve`]) places each faulting page (with the rest of its run)
//!   from the file, or a zero page for a hole;
//! - the fill thread ([`fill`]) places every other page in the background.
//!
//! Both place through `PostcopyDest` (UFFDIO_COPY, UFFDIO_ZEROPAGE; EEXIST when the other
//! got there first). A file that fails (EIO, truncated) pauses (`postcopy-paused`, the
//! reason in error-desc): faulting vCPUs wait; `migrate-recover file:PATH` (or `fd:NAME`)
//! gives a new file, accepted only with the same layout (headers and bitmaps).
//!
//! Triggered by `migrate-incoming file:...` with `mapped-ram`, `postcopy-ram` and a
//! userfaultfd set (QEMU refuses mapped-ram with postcopy, so the combination is free).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use crate::engine::destination::error::LoadError;
use crate::engine::destination::fault::{FaultError, PostcopyDest};
use crate::engine::destination::mapped_ram::{load_lazy, MappedBlock};
use crate::engine::destination::reader::ReadError;
use crate::engine::destination::return_path::RpWriter;
use crate::engine::migration::{MigrationCtx, Recovery};
use crate::engine::state::MigrationStatus;
use crate::memory::block::RamBlock;
use crate::transport::{CancelToken, Channel, Incoming};

mod fill;
mod serve;
mod source;
#[cfg(test)]
mod tests;

use fill::Filled;
use serve::{Run, ServeError, Shared};
use source::Source;

/// Whether an incoming migration is an on-demand restore: mapped-ram and postcopy-ram on,
/// a userfaultfd set, and the channel a file.
pub(crate) fn wanted(ctx: &MigrationCtx, chan: &Channel, uffd: bool) -> bool {
    let caps = ctx.caps();
    caps.mapped_ram && caps.postcopy_ram && uffd && !chan.is_socket
}

fn io(peer: &str, offset: u64, source: std::io::Error) -> LoadError {
    ReadError::Io {
        peer: peer.into(),
        offset,
        source,
    }
    .into()
}

/// Runs an on-demand restore; the caller set `active` and moves to `completed` on Ok.
/// `multifd` channels, if any, are not needed: pages are read with pread.
pub(crate) fn run(
    ctx: &MigrationCtx,
    blocks: &[Arc<RamBlock>],
    chan: Channel,
    multifd: Vec<Channel>,
    uffd: OwnedFd,
) -> Result<(), LoadError> {
    drop(multifd);
    let t0 = Instant::now();
    // The loader reads the file's stream (block list, headers, bitmaps, device state) and
    // no page: the pages are served from here.
    let lazy = load_lazy(ctx, blocks, &chan)?;
    let received = Arc::new(
        blocks
            .iter()
            .map(|b| crate::engine::destination::bitmap::AtomicBitmap::new(b.pages()))
            .collect::<Vec<_>>(),
    );
    let pc = PostcopyDest::new(
        blocks.to_vec(),
        uffd,
        Arc::new(RpWriter::detached()),
        ctx.latency.clone(),
        Arc::new(AtomicU64::new(0)),
        received,
        ctx.log.clone(),
    )
    .map_err(|source| LoadError::Postcopy { offset: 0, source })?;
    let total: u64 = blocks.iter().map(|b| b.size).sum();
    ctx.stats.total.store(total, Ordering::Relaxed);
    let data_pages: u64 = lazy
        .blocks
        .iter()
        .map(|m| {
            m.bitmap
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
        })
        .sum();
    ctx.stats
        .remaining
        .store(data_pages * serve::PAGE, Ordering::Relaxed);
    // Every page starts missing, so that each one faults until it is placed: a page the
    // parent preallocated would otherwise be read as it is.
    for b in blocks {
        b.punch_hole(0, b.size)
            .map_err(|source| LoadError::Discard {
                offset: 0,
                block: b.id.clone(),
                source,
            })?;
    }
    // The parent loads the devices before it runs the vCPUs: hand them over first.
    let ndev = lazy.devices.len();
    ctx.device_in
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(lazy.devices);
    ctx.state.transition(MigrationStatus::PostcopyActive)?;
    let runnable = t0.elapsed();
    slog::info!(ctx.log, "on-demand restore: guest runnable";
        "ms" => runnable.as_secs_f64() * 1000.0,
        "file" => &chan.peer,
        "bytes" => total,
        "data_pages" => data_pages,
        "device_sections" => ndev);
    let sh = Shared {
        pc,
        blocks,
        mapped: lazy.blocks,
        file: RwLock::new(Arc::new(Source::new(
            lazy.file,
            chan.peer.clone(),
            &ctx.log,
        ))),
        run: Mutex::new(Run::default()),
        changed: Condvar::new(),
        busy: AtomicU64::new(0),
        stop: CancelToken::new().map_err(|e| io(&chan.peer, 0, e))?,
        cancel: ctx.mailbox.cancel_token().clone(),
        latency: ctx.latency.clone(),
        requests: ctx.stats.postcopy_requests.clone(),
        data_pages: AtomicU64::new(0),
        zero_pages: AtomicU64::new(0),
        log: ctx.log.clone(),
    };
    let result = serve_all(ctx, &sh);
    sh.count_remaining(ctx);
    let left = ctx.stats.remaining.load(Ordering::Relaxed) / serve::PAGE;
    ctx.stats
        .normal
        .store(data_pages.saturating_sub(left), Ordering::Relaxed);
    // Every hole of the file is a zero page, placed on a fault or left a hole.
    let pages: u64 = blocks.iter().map(|b| b.pages()).sum();
    ctx.stats
        .duplicate
        .store(pages.saturating_sub(data_pages), Ordering::Relaxed);
    ctx.stats
        .total_time_us
        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    if result.is_ok() {
        // Every data page is placed: the holes left read as zero once unregistered.
        sh.pc.finish();
        let secs = t0.elapsed().as_secs_f64();
        slog::info!(ctx.log, "on-demand restore summary";
            "runnable_ms" => runnable.as_secs_f64() * 1000.0,
            "secs" => secs,
            "data_pages_placed" => sh.data_pages.load(Ordering::Relaxed),
            "zero_pages_placed" => sh.zero_pages.load(Ordering::Relaxed),
            "faults" => ctx.stats.postcopy_requests.load(Ordering::Relaxed),
            "pauses" => ctx.pauses.load(Ordering::Relaxed),
            "latency" => ctx.latency.to_json().to_string(),
        );
    }
    result
}

/// Runs the fault and fill threads until every page is placed, recovering from file
/// failures; joins both on every path.
fn serve_all(ctx: &MigrationCtx, sh: &Shared<'_>) -> Result<(), LoadError> {
    std::thread::scope(|s| {
        let faults = std::thread::Builder::new()
            .name("qmh-od-faults".into())
            .spawn_scoped(s, || {
                if let Err(e) = sh.fault_thread() {
                    sh.fail(e);
                }
            })
            .map_err(|e| io("the fault thread", 0, e))?;
        let fill = std::thread::Builder::new()
            .name("qmh-od-fill".into())
            .spawn_scoped(s, || match sh.fill_thread(ctx) {
                Ok(Filled::All) => sh.update(|r| r.done = true),
                Ok(Filled::Stopped) => {}
                Err(e) => sh.fail(e),
            });
        let result = match &fill {
            Ok(_) => supervise(ctx, sh),
            Err(e) => Err(io(
                "the fill thread",
                0,
                std::io::Error::new(e.kind(), e.to_string()),
            )),
        };
        sh.update(|r| r.stopping = true);
        sh.stop.cancel();
        let panicked = faults.join().is_err() | fill.map(|h| h.join().is_err()).unwrap_or(false);
        match result {
            Ok(()) if panicked => Err(failure(ServeError::Place(FaultError::Panicked))),
            r => r,
        }
    })
}

fn failure(e: ServeError) -> LoadError {
    match e {
        ServeError::Place(source) => LoadError::Postcopy { offset: 0, source },
        ServeError::Read {
            file, at, source, ..
        } => io(&file, at, source),
    }
}

/// The migration thread while the threads serve: waits for the end, a failure, a cancel
/// or a pause, and drives each pause's recoveries.
fn supervise(ctx: &MigrationCtx, sh: &Shared<'_>) -> Result<(), LoadError> {
    loop {
        let why = {
            let mut g = sh.lock();
            loop {
                if let Some(e) = g.failed.take() {
                    return Err(failure(e));
                }
                if g.cancelled || ctx.cancelled() {
                    return Err(LoadError::Cancelled);
                }
                if g.done {
                    return Ok(());
                }
                if let Some(why) = &g.paused {
                    break why.clone();
                }
                g = sh.changed.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        };
        ctx.pauses.fetch_add(1, Ordering::Relaxed);
        ctx.state.note_error(why);
        ctx.state.transition(MigrationStatus::PostcopyPaused)?;
        recover(ctx, sh)?;
    }
}

/// In postcopy-paused: takes recoveries until one gives a file with the same layout, then
/// goes on (`postcopy-active`).
fn recover(ctx: &MigrationCtx, sh: &Shared<'_>) -> Result<(), LoadError> {
    loop {
        let Some(rec) = ctx.wait_recovery() else {
            return Err(LoadError::Cancelled);
        };
        let Recovery::Destination(incoming) = rec else {
            continue;
        };
        let t0 = Instant::now();
        ctx.state.transition(MigrationStatus::PostcopyRecover)?;
        match take_file(ctx, sh, incoming) {
            Ok((file, name)) => {
                slog::info!(ctx.log, "on-demand restore: new file"; "file" => &name);
                *sh.file.write().unwrap_or_else(|e| e.into_inner()) =
                    Arc::new(Source::new(file, name, &ctx.log));
                sh.update(|r| r.paused = None);
                ctx.state.transition(MigrationStatus::PostcopyActive)?;
                ctx.record_recovery(t0.elapsed());
                sh.wake_deferred();
                return Ok(());
            }
            Err(why) => {
                slog::warn!(ctx.log, "on-demand restore: recovery refused; still paused"; "error" => &why);
                ctx.state.note_error(why);
                ctx.state.transition(MigrationStatus::PostcopyPaused)?;
                ctx.pauses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The file a recovery offers, loaded as the restore's was, if it places every page where
/// the restore's file does.
fn take_file(
    ctx: &MigrationCtx,
    sh: &Shared<'_>,
    incoming: Incoming,
) -> Result<(File, String), String> {
    let chan = match incoming {
        Incoming::Ready(c) if !c.is_socket => c,
        other => {
            other.done_listening();
            return Err(
                "an on-demand restore recovers from a file: migrate-recover needs a file: \
                 URI or the fd of a file"
                    .into(),
            );
        }
    };
    let new = load_lazy(ctx, sh.blocks, &chan).map_err(|e| format!("{}: {e}", chan.peer))?;
    same_layout(&sh.mapped, &new.blocks)
        .map_err(|e| format!("{} is not the restore's file: {e}", chan.peer))?;
    Ok((new.file, chan.peer.clone()))
}

/// Whether `new` (a file offered by a recovery) places every page where `old` (the
/// restore's) does: same headers, same bitmaps.
fn same_layout(old: &[MappedBlock], new: &[MappedBlock]) -> Result<(), String> {
    for (a, b) in old.iter().zip(new) {
        if a.header != b.header {
            return Err(format!(
                "block {}: header {:?} differs from the restore's {:?}",
                a.index, b.header, a.header
            ));
        }
        if a.bitmap != b.bitmap {
            return Err(format!(
                "block {}: its bitmap differs from the restore's",
                a.index
            ));
        }
    }
    Ok(())
}
