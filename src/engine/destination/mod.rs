//! The destination engine: loads a QEMU migration stream into the parent's RAM blocks and
//! keeps the device sections byte-exact for `query-device-state`.
//!
//! The pieces, as the stream flows: a [`reader::Reader`] (buffer, stream offset) under the
//! token loop of the [`loader::Loader`]; every RAM record is resolved to a page by
//! [`place`] and goes to the sink of the loader's phase: the [`precopy`] sink (page writer)
//! or, from POSTCOPY_LISTEN or an adoption on, the [`postcopy`] sink (userfaultfd, the
//! fault thread in [`fault`], the postcopy-preempt channel in [`preempt`], staging and the
//! look-ahead for requested pages). A broken link in postcopy goes to the [`recovery`]
//! driver. Replies go through the one [`return_path`] sender.
//!
//! Device sections of unknown devices can only be delimited with the VM description that a
//! precopy source appends after EOF. When the loader meets the first such section it holds
//! the rest of the stream in memory until the description has arrived (RAM pages normally
//! all come before it), then walks the held bytes with the description.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compat::wire;
use crate::engine::destination::loader::{Link, Loader, LoopEnd, Phase, RamSection, READ_CHUNK};
use crate::engine::destination::postcopy::PostcopySink;
use crate::engine::destination::preempt::{EarlyPreempt, PreemptConn};
use crate::engine::destination::reader::{with_next, ReadReady, Reader};
use crate::engine::destination::return_path::RpWriter;
use crate::engine::migration::MigrationCtx;
use crate::engine::state::MigrationStatus;
use crate::memory::block::RamBlock;
use crate::transport::{Channel, Incoming};
use crate::vmstate::VmDescription;
use crate::wire::device_state::DeviceSection;
use crate::wire::return_path::RpMessage;
use crate::wire::stream::{self, WireError};

mod bitmap;
mod commands;
mod error;
pub(crate) mod fault;
mod held;
mod loader;
mod lookahead;
mod mapped_ram;
mod multifd;
mod ondemand;
mod package;
mod place;
mod postcopy;
mod precopy;
mod preempt;
mod ram;
mod reader;
mod recovery;
mod return_path;
#[cfg(test)]
mod tests;

pub(crate) use error::LoadError;
use error::Violation;

/// Reads a stream from `src` into `blocks`. `chan` is the socket (for the return path), if
/// any; `multifd` the multifd channels in id order (empty without multifd).
#[allow(clippy::too_many_arguments)]
fn load<R: ReadReady>(
    ctx: &MigrationCtx,
    blocks: &[Arc<RamBlock>],
    src: R,
    peer: String,
    chan: Option<&Channel>,
    multifd: Vec<Channel>,
    uffd: Option<OwnedFd>,
    preempt: Option<PreemptConn>,
) -> Result<Vec<DeviceSection>, LoadError> {
    // The multifd receivers live in this scope; the loader stops them on every path.
    std::thread::scope(|scope| {
        let t0 = Instant::now();
        let mut r = Reader::new(src, peer, READ_CHUNK);
        let link = chan.map(Link::of).unwrap_or_default();
        let mut loader = Loader::new(ctx, blocks, uffd, link, preempt);
        let result = loader
            .start_multifd(scope, chan, multifd)
            .and_then(|()| load_inner(&mut loader, &mut r, chan));
        let result = loader.end_multifd(result);
        finish(&mut loader, result, t0, r.offset)
    })
}

/// Ends a load: recovers from link failures in postcopy, finishes postcopy, and tells the
/// source how it went (SHUT).
fn finish(
    loader: &mut Loader<'_>,
    mut result: Result<(), LoadError>,
    t0: Instant,
    offset: u64,
) -> Result<Vec<DeviceSection>, LoadError> {
    let ctx = loader.ctx;
    if result.is_ok() {
        let limit = Duration::from_millis(ctx.params().link_timeout.max(1000));
        let main = loader.link.fd.as_ref();
        if let Phase::Postcopy(s) = &mut loader.phase {
            result = s.finish_preempt(limit, main).map_err(LoadError::Link);
        }
    }
    // In postcopy a broken link pauses: neither side has the whole guest. That includes
    // the SHUT at the very end: the source must hear it to complete, so a link that dies
    // just then is recovered too (the source then has nothing left but EOF). The variant
    // decides: a failed fault thread, a cancel or a bad stream fail instead.
    loop {
        match &result {
            Ok(()) => match loader.send_rp(RpMessage::Shut(0)) {
                Ok(()) => break,
                Err(e) => result = Err(e),
            },
            Err(e) => {
                let fault_failed = loader
                    .postcopy()
                    .is_some_and(|s| s.fault_failure().is_some());
                if !loader.in_postcopy() || !e.is_link() || ctx.cancelled() || fault_failed {
                    break;
                }
                let why = std::mem::replace(&mut result, Ok(()));
                result = match why {
                    Err(why) => loader.pause_and_recover(&why),
                    Ok(()) => Ok(()),
                };
            }
        }
    }
    // A fault-handling failure is the cause of whatever the loader saw after it.
    if result.is_err() {
        if let Some(source) = loader.postcopy().and_then(|s| s.fault_failure()) {
            result = Err(LoadError::Faults { offset, source });
        }
    }
    if let Some(s) = loader.postcopy() {
        // Every page has arrived: the fault thread's work is over. On failure a missing
        // page must keep faulting, never read as zero.
        if result.is_ok() {
            s.finish();
        }
        s.stop();
    }
    match &result {
        Ok(()) => {
            let secs = t0.elapsed().as_secs_f64();
            slog::info!(ctx.log, "migration summary";
                "role" => "destination",
                "bytes" => offset,
                "pages" => ctx.stats.normal.load(Ordering::Relaxed),
                "zero_pages" => ctx.stats.duplicate.load(Ordering::Relaxed),
                "secs" => secs,
                "rate_mbps" => offset as f64 * 8.0 / secs.max(1e-9) / 1e6,
                "device_sections" => loader.devices.len(),
                "postcopy" => loader.in_postcopy(),
                "postcopy_requests" => ctx.stats.postcopy_requests.load(Ordering::Relaxed),
                "postcopy_pauses" => ctx.pauses.load(Ordering::Relaxed),
            );
        }
        Err(_) => {
            // Tell a waiting source that loading failed, as QEMU does.
            let _ = loader.send_rp(RpMessage::Shut(1));
        }
    }
    result.map(|()| std::mem::take(&mut loader.devices))
}

/// A new helper takes over a postcopy migration whose destination helper died: the parent
/// passed the same memfds (and its userfaultfd). What has been received is what the memfds
/// hold: after the discards, a page is data in the memfd only if it arrived (a zero page
/// left as a hole is asked for again, harmlessly). The postcopy sink starts without a
/// stream; it waits in postcopy-paused for `migrate-recover`, whose channel brings the
/// return path and the rest of the stream.
pub(crate) fn adopt(
    ctx: &MigrationCtx,
    blocks: Vec<Arc<RamBlock>>,
    uffd: OwnedFd,
) -> Result<(), LoadError> {
    let t0 = Instant::now();
    let mut loader = Loader::new(ctx, &blocks, None, Link::default(), None);
    for (bi, b) in blocks.iter().enumerate() {
        let holes = b.hole_bitmap();
        for p in 0..b.pages() {
            if holes
                .get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) == 0)
            {
                loader.received[bi].set(p);
            }
        }
    }
    let rp = Arc::new(RpWriter::detached());
    loader.rp = Some(rp.clone());
    let sink = PostcopySink::start(ctx, &blocks, uffd, rp, loader.received.clone(), None)
        .map_err(|source| LoadError::Postcopy { offset: 0, source })?;
    loader.phase = Phase::Postcopy(sink);
    loader.ram = RamSection::FromNextPart;
    slog::info!(ctx.log, "postcopy listening");
    ctx.state.transition(MigrationStatus::PostcopyPaused)?;
    slog::info!(ctx.log, "adopted a paused postcopy migration";
        "received_pages" => loader.received.iter().map(|b| b.count()).sum::<u64>());
    let result = loader.wait_and_recover();
    let devices = finish(&mut loader, result, t0, 0)?;
    drop(devices);
    ctx.state.transition(MigrationStatus::Completed)?;
    Ok(())
}

fn load_inner<R: ReadReady>(
    loader: &mut Loader<'_>,
    r: &mut Reader<R>,
    chan: Option<&Channel>,
) -> Result<(), LoadError> {
    with_next!(r, "in the stream header", stream::decode_header, |_h| ());
    if r.data().is_empty() {
        r.need_more("after the stream header")?;
    }
    if r.data().first() == Some(&wire::section::CONFIGURATION) {
        let conf = with_next!(
            r,
            "in the configuration section",
            stream::decode_configuration,
            |c| c
        );
        check_capabilities(loader.mapped_ram, &conf.capabilities).map_err(|e| match e {
            CapCheck::Unsupported(cap) => r.wire(WireError::UnsupportedCapability(cap)),
            CapCheck::Mismatch(v) => Loader::invalid(r.offset, v),
        })?;
        if let Some(bits) = conf.target_page_bits {
            if bits != 12 {
                return Err(Loader::invalid(r.offset, Violation::TargetPageBits(bits)));
            }
        }
        slog::info!(loader.ctx.log, "incoming stream"; "machine" => &conf.machine);
    } else if loader.mapped_ram {
        // Without the configuration nothing says the file is laid out for mapped-ram.
        return Err(Loader::invalid(
            r.offset,
            Violation::Capability {
                name: wire::mapped_ram::CAPABILITY.into(),
                local: true,
                received: false,
            },
        ));
    }
    loader.ctx.stats.total.store(
        loader.blocks.iter().map(|b| b.size).sum(),
        Ordering::Relaxed,
    );
    match loader.sections(r, chan, None)? {
        LoopEnd::Done => Ok(()),
        LoopEnd::NeedDescription => {
            // Hold everything that is left until the description has arrived.
            let (start, base) = (r.data().to_vec(), r.offset);
            let held::Held {
                bytes: mut held,
                eof_at,
                json,
            } = held::hold(&mut r.src, start, base, &r.peer)?;
            let desc =
                VmDescription::parse(&held[json.clone()]).map_err(|source| LoadError::Device {
                    offset: base + json.start as u64,
                    section: "VM description".into(),
                    source,
                })?;
            // Walk the held bytes, up to and including EOF, with the description. They
            // become the reader's buffer: no second copy of the device state.
            held.truncate(eof_at + 1);
            let mut h = Reader::over(held, r.peer.clone(), base);
            match loader.sections(&mut h, chan, Some(&desc))? {
                LoopEnd::Done if h.data().is_empty() && h.eof_or_fill()? => Ok(()),
                _ => Err(Loader::invalid(h.offset, Violation::DevicesPastEof)),
            }
        }
    }
}

/// Why the configuration section's capability list is refused.
enum CapCheck {
    /// A validated capability the helper does not implement.
    Unsupported(String),
    Mismatch(Violation),
}

/// The source's validated capabilities (the configuration section's list) against this
/// side's, as QEMU's `configuration_validate_capabilities`: mapped-ram must be on at both
/// ends or at neither (the file's layout depends on it).
fn check_capabilities(mapped_ram: bool, source: &[String]) -> Result<(), CapCheck> {
    let name = wire::mapped_ram::CAPABILITY;
    if let Some(cap) = source.iter().find(|c| c.as_str() != name) {
        return Err(CapCheck::Unsupported(cap.clone()));
    }
    let theirs = source.iter().any(|c| c == name);
    if theirs != mapped_ram {
        return Err(CapCheck::Mismatch(Violation::Capability {
            name: name.into(),
            local: mapped_ram,
            received: theirs,
        }));
    }
    Ok(())
}

/// Runs an incoming migration on an established channel. With the `multifd` capability,
/// `multifd` holds the accepted multifd channels in id order, their initial packets read
/// and checked (empty without it). The caller set `setup`.
pub(crate) fn run(
    ctx: &MigrationCtx,
    blocks: Vec<Arc<RamBlock>>,
    chan: Channel,
    multifd: Vec<Channel>,
    uffd: Option<OwnedFd>,
    preempt: Option<Incoming>,
) -> Result<(), LoadError> {
    ctx.state.transition(MigrationStatus::Active)?;
    // mapped-ram file + postcopy-ram + a userfaultfd: an on-demand restore.
    if ondemand::wanted(ctx, &chan, uffd.is_some()) {
        if let Some(uffd) = uffd {
            ondemand::run(ctx, &blocks, chan, multifd, uffd)?;
            ctx.state.transition(MigrationStatus::Completed)?;
            return Ok(());
        }
    }
    // Under TLS the preempt channel is accepted, and its handshake run, from now on: a QEMU
    // source waits for it before it sends LISTEN.
    let tls = ctx.tls.lock().unwrap_or_else(|e| e.into_inner()).is_some();
    let preempt = match preempt {
        Some(inc) if tls => Some(PreemptConn::Early(
            EarlyPreempt::start(inc, ctx.securer(), ctx.link_timeout())
                .map_err(|source| LoadError::Preempt { offset: 0, source })?,
        )),
        p => p.map(PreemptConn::Listen),
    };
    chan.tune_buffers();
    for c in &multifd {
        c.tune_buffers();
    }
    let t0 = Instant::now();
    let devices = load(
        ctx,
        &blocks,
        &chan,
        chan.peer.clone(),
        Some(&chan),
        multifd,
        uffd,
        preempt,
    )?;
    ctx.stats
        .total_time_us
        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    // After those a postcopy package already handed over (the list was emptied when the
    // migration started).
    ctx.device_in
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(devices);
    ctx.state.transition(MigrationStatus::Completed)?;
    Ok(())
}
