//! The source engine: sends guest RAM (and the device state it was given) as a QEMU
//! migration stream. Runs on its own thread; the control channel sees it only through
//! `MigrationCtx`.
//!
//! The phases are types: [`precopy::Precopy`] drives the dirty passes and the precopy
//! switchover; with postcopy it hands its connection over as the first [`postcopy::Link`]
//! (main channel writer, return path, preempt sender) of a [`postcopy::PostcopyPush`],
//! which pauses when its link fails and gets a new one from the recovery driver
//! (`recovery.rs`). Every page goes through one encoder and every RAM section through one
//! framer (`writer.rs`); every return-path event through one triage (`rp_reader.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::migration::MigrationCtx;
use crate::engine::state::MigrationStatus;
use crate::memory::block::RamBlock;
use crate::transport::Channel;
use crate::wire::device_state::DeviceSection;

mod commands;
mod error;
mod mapped_ram;
mod multifd;
mod pages;
mod postcopy;
mod precopy;
mod recovery;
mod rp_event;
pub(crate) mod rp_reader;
mod urgent;
mod writer;

pub(crate) use error::SourceError;

/// auto-converge: asks the parent to throttle the vCPUs to `pct` percent (the
/// `CPU_THROTTLE` event; `query-migrate` shows it as `cpu-throttle-percentage`).
fn ask_throttle(ctx: &MigrationCtx, pct: u8) {
    ctx.stats.cpu_throttle.store(pct as u64, Ordering::Relaxed);
    slog::info!(ctx.log, "auto-converge: vCPU throttle asked of the parent"; "percentage" => pct);
    ctx.state.emit_event(
        crate::control::protocol::event::CPU_THROTTLE,
        serde_json::json!({"percentage": pct}),
    );
}

/// Lifts a throttle asked for during the migration, however it ends (QEMU's
/// `cpu_throttle_stop` at cleanup): a failed or cancelled migration leaves the guest
/// running on the source at full speed.
struct ThrottleLift<'a>(&'a MigrationCtx);

impl Drop for ThrottleLift<'_> {
    fn drop(&mut self) {
        if self.0.stats.cpu_throttle.load(Ordering::Relaxed) != 0 {
            ask_throttle(self.0, 0);
        }
    }
}

/// Runs a migration to `chan` (precopy, switching to postcopy when asked). With the
/// `multifd` capability, `multifd` holds the connected multifd channels in id order, their
/// initial packets already sent (empty without it). The caller has moved the state to
/// `setup`.
pub(crate) fn run(
    ctx: &MigrationCtx,
    blocks: Vec<Arc<RamBlock>>,
    chan: Channel,
    multifd: Vec<Channel>,
    uri: crate::transport::Uri,
) -> Result<(), SourceError> {
    let t0 = Instant::now();
    let _lift = ThrottleLift(ctx);
    // Reading faults pages in cheaply (16 at a time); mapping them ahead now would only
    // compete with sending them.
    blocks.iter().for_each(|b| b.stop_mapping_ahead());
    let total: u64 = blocks.iter().map(|b| b.size).sum();
    ctx.stats.total.store(total, Ordering::Relaxed);
    ctx.stats.remaining.store(total, Ordering::Relaxed);

    let mut pre = precopy::Precopy::start(ctx, &blocks, chan, multifd)?;
    let go_postcopy = pre.passes()?;
    pre.pre_switchover()?;
    let downtime_start = Instant::now();
    pre.switchover_start()?;
    let devices: Vec<DeviceSection> = ctx
        .device_out
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let sent = if go_postcopy {
        let (mut push, mut link) = pre.into_postcopy(uri)?;
        push.switchover(&mut link, &devices, downtime_start)?;
        let sent = push.run(postcopy::Phase::Active(link))?;
        ctx.stats.remaining.store(0, Ordering::Relaxed);
        sent
    } else {
        pre.finish(&devices, downtime_start)?
    };
    ctx.stats
        .total_time_us
        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    slog::info!(ctx.log, "migration summary";
        "role" => "source",
        "postcopy" => go_postcopy,
        "bytes" => sent,
        "pages" => ctx.stats.normal.load(Ordering::Relaxed),
        "zero_pages" => ctx.stats.duplicate.load(Ordering::Relaxed),
        "secs" => secs,
        "rate_mbps" => sent as f64 * 8.0 / secs / 1e6,
        "downtime_ms" => ctx.stats.downtime_us.load(Ordering::Relaxed) / 1000,
        "postcopy_requests" => ctx.stats.postcopy_requests.load(Ordering::Relaxed),
        "device_sections" => devices.len(),
    );
    ctx.state.transition(MigrationStatus::Completed)?;
    Ok(())
}

/// A new helper takes over a postcopy migration whose source helper died: the parent
/// passed the same memfds (its guest is stopped). What is left to send comes entirely from
/// the destination's received bitmaps in the recovery; until then it is postcopy-paused,
/// waiting for `migrate resume=true`.
pub(crate) fn adopt(ctx: &MigrationCtx, blocks: Vec<Arc<RamBlock>>) -> Result<(), SourceError> {
    let t0 = Instant::now();
    let rp_shared = postcopy::RpShared::default();
    // An adopted migration is in postcopy from the start.
    rp_shared.gate.postcopy.store(true, Ordering::Release);
    let push =
        postcopy::PostcopyPush::new(ctx, &blocks, pages::Pages::new(&blocks), rp_shared, None);
    ctx.stats
        .total
        .store(blocks.iter().map(|b| b.size).sum(), Ordering::Relaxed);
    ctx.state.transition(MigrationStatus::PostcopyPaused)?;
    slog::info!(ctx.log, "adopted a paused postcopy migration"; "blocks" => blocks.len());
    let sent = push.run(postcopy::Phase::Paused { sent: 0 })?;
    ctx.stats.remaining.store(0, Ordering::Relaxed);
    ctx.stats
        .total_time_us
        .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    slog::info!(ctx.log, "migration summary";
        "role" => "source (adopted)",
        "bytes" => sent,
        "pages" => ctx.stats.normal.load(Ordering::Relaxed),
        "postcopy_requests" => ctx.stats.postcopy_requests.load(Ordering::Relaxed),
    );
    ctx.state.transition(MigrationStatus::Completed)?;
    Ok(())
}
