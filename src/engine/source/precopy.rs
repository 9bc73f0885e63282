//! The precopy pass driver: the stream's setup, dirty passes under the bandwidth limit
//! until what is left fits in the downtime limit (or postcopy is asked for), the wait in
//! pre-switchover, and the precopy switchover (END, device state, EOF, VM description).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compat::wire;
use crate::compat::ZeroPageDetection;
use crate::engine::migration::Stats;
use crate::engine::migration::{Capabilities, MigrationCtx, Parameters};
use crate::engine::source::commands::{Commands, Switchover};
use crate::engine::source::error::MappedRamError;
use crate::engine::source::error::PeerError;
use crate::engine::source::mapped_ram::{FileIo, MappedRamOut};
use crate::engine::source::multifd::Multifd;
use crate::engine::source::pages::{Names, Pages, Sink};
use crate::engine::source::postcopy::{wait_shut, Link, PostcopyPush, RpShared};
use crate::engine::source::rp_reader::{ReturnPath, RpEvent, Wait};
use crate::engine::source::writer::{Throttle, Writer, PAGE, RAM_SECTION_ID};
use crate::engine::source::SourceError;
use crate::engine::state::MigrationStatus;
use crate::engine::throttle::AutoConverge;
use crate::memory::block::RamBlock;
use crate::transport::{Channel, Uri};
use crate::vmstate::VmDescriptionBuilder;
use crate::wire::device_state::DeviceSection;
use crate::wire::mapped_ram;
use crate::wire::postcopy;
use crate::wire::ram::{self, BlockEntry};
use crate::wire::stream::{self, SectionHeader, SectionKind};

/// Words sent between two looks at cancel, the return path and migrate-start-postcopy.
const CHECK_EVERY: u32 = 16;
/// A pass is sent as PART sections of about this long, as QEMU's `ram_save_iterate` cuts
/// them (its 50 ms MAX_WAIT), so that the stream looks the same to a destination.
const PART_TIME: Duration = Duration::from_millis(50);

/// Why a run over the to-do sets stopped.
#[derive(PartialEq, Eq)]
enum PassEnd {
    Done,
    /// `migrate-start-postcopy` came.
    Postcopy,
}

pub(crate) struct Precopy<'m> {
    ctx: &'m MigrationCtx,
    commands: Commands<'m>,
    caps: Capabilities,
    blocks: &'m [Arc<RamBlock>],
    pages: Pages<'m>,
    out: Writer<'m>,
    /// With the `multifd` capability: the pages go there.
    mfd: Option<Multifd>,
    /// With `mapped-ram`: every page goes to its place in the file.
    file: Option<MappedRamOut>,
    /// With the return-path capability (always with postcopy).
    rp: Option<ReturnPath>,
    rp_shared: RpShared,
    throttle: Throttle,
    /// With auto-converge: the vCPU throttle asked of the parent.
    converge: Option<AutoConverge>,
    pass: u64,
    last_progress: Instant,
}

impl<'m> Precopy<'m> {
    /// Starts the return path and the multifd senders (with `multifd` channels) and sends
    /// the stream's header, configuration, commands and the RAM block list; then `active`.
    pub(crate) fn start(
        ctx: &'m MigrationCtx,
        blocks: &'m [Arc<RamBlock>],
        chan: Channel,
        multifd: Vec<Channel>,
    ) -> Result<Self, SourceError> {
        let caps = ctx.caps();
        let params = ctx.params();
        let t0 = Instant::now();
        let chan = Arc::new(chan);
        chan.tune_buffers();
        if caps.postcopy_ram && !chan.is_socket {
            return Err(PeerError::NotASocket(chan.peer.clone()).into());
        }
        let use_rp = (caps.return_path || caps.postcopy_ram) && chan.is_socket;
        let rp_shared = RpShared::default();
        let file = if caps.mapped_ram {
            if chan.is_socket {
                return Err(MappedRamError::NotAFile(chan.peer.clone()).into());
            }
            let zpd = params.zero_page_detection() != ZeroPageDetection::None;
            Some(MappedRamOut::new(FileIo::of(&chan)?, zpd))
        } else {
            None
        };
        // Under mapped-ram the channels start once the blocks have their places (header).
        let (mfd, multifd) = if caps.mapped_ram {
            (None, multifd)
        } else {
            (Multifd::start(ctx, blocks, multifd, None)?, Vec::new())
        };
        let rp = if use_rp {
            // A clone shares the TLS session, if any: the return path is its read half.
            let rp_chan = chan
                .try_clone("return-path")
                .map_err(|source| SourceError::Io {
                    peer: chan.peer.clone(),
                    sent: 0,
                    source,
                })?;
            Some(rp_shared.spawn_reader(rp_chan, blocks, &ctx.log)?)
        } else {
            None
        };
        // Pages the parent dirtied before now are sent by the first pass anyway; with the
        // bits clear, `Pages::new` notes the holes: a page written after this has its bit
        // set again.
        for b in blocks {
            if let Some(d) = b.dirty() {
                for i in 0..d.len_words() {
                    d.take_word(i);
                }
            }
        }
        let mut pre = Precopy {
            ctx,
            commands: Commands::new(ctx),
            blocks,
            pages: Pages::new(blocks),
            out: Writer::new(chan, 0),
            mfd,
            file,
            rp,
            rp_shared,
            throttle: Throttle::new(),
            converge: caps
                .auto_converge
                .then(|| AutoConverge::new(Instant::now(), 0)),
            pass: 1,
            last_progress: Instant::now(),
            caps,
        };
        pre.header(&params, use_rp)?;
        if let Some(f) = &pre.file {
            pre.mfd = Multifd::start(ctx, blocks, multifd, Some(&f.map))?;
        }
        // The section's EOS after the multifd sync that QEMU's ram_save_setup puts before
        // it.
        pre.close_ram(true)?;
        pre.out.flush()?;
        ctx.stats
            .setup_time_us
            .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        ctx.state.transition(MigrationStatus::Active)?;
        Ok(pre)
    }

    fn header(&mut self, params: &Parameters, use_rp: bool) -> Result<(), SourceError> {
        let caps = &self.caps;
        let blocks = self.blocks;
        let entries: Vec<BlockEntry> = blocks
            .iter()
            .map(|b| BlockEntry {
                idstr: b.id.clone(),
                used_length: b.size,
                // Only huge-page blocks carry their page size, and only with postcopy.
                page_size: (caps.postcopy_ram && b.page_size != PAGE as u64).then_some(b.page_size),
            })
            .collect();
        let caps_listed: &[&str] = if caps.mapped_ram {
            &[wire::mapped_ram::CAPABILITY]
        } else {
            &[]
        };
        self.out.put(|o| {
            stream::encode_header(o);
            stream::encode_configuration_with(o, &params.machine_type, caps_listed)?;
            if use_rp {
                stream::encode_command(o, wire::command::OPEN_RETURN_PATH, &[])?;
                stream::encode_command(o, wire::command::PING, &1u32.to_be_bytes())?;
            }
            if caps.postcopy_ram {
                let advise = postcopy::Advise {
                    page_size_summary: blocks.iter().fold(0, |a, b| a | b.page_size),
                    target_page_size: PAGE as u64,
                };
                stream::encode_command(
                    o,
                    wire::command::POSTCOPY_ADVISE,
                    &postcopy::encode_advise(&advise),
                )?;
            }
            stream::encode_section_start(
                o,
                SectionKind::Start,
                &SectionHeader {
                    section_id: RAM_SECTION_ID,
                    idstr: wire::ram::IDSTR.into(),
                    instance_id: 0,
                    version_id: wire::ram::VERSION,
                },
            )?;
            if self.file.is_none() {
                ram::encode_block_entries(o, &entries)?;
            }
            Ok(())
        })?;
        if let Some(f) = &mut self.file {
            // After each block's entry its mapped-ram header; the stream goes on after the
            // block's pages region.
            let total = entries
                .iter()
                .try_fold(0u64, |a, e| a.checked_add(e.used_length));
            let total = total.ok_or_else(|| {
                stream::WireError::Invalid("RAM blocks add up to more than 2^64".into())
            })?;
            self.out.put(|o| {
                stream::put_be64(o, total | wire::ram::MEM_SIZE);
                Ok(())
            })?;
            for e in &entries {
                self.out.put(|o| {
                    stream::put_str8(o, &e.idstr)?;
                    stream::put_be64(o, e.used_length);
                    if let Some(ps) = e.page_size {
                        stream::put_be64(o, ps);
                    }
                    Ok(())
                })?;
                let at = self.out.position(&f.io)?;
                let (h, end) = f.add_block(at, e.used_length)?;
                self.out.put(|o| {
                    mapped_ram::encode_header(o, &h);
                    Ok(())
                })?;
                self.out.seek(&f.io, end)?;
            }
        }
        Ok(())
    }

    /// Ends the open RAM section. With multifd, first the sync QEMU makes before this
    /// EOS: in every section under flush-after-each-section (without a record), else only
    /// at the end of a dirty-scan `round` (then followed by a MULTIFD_FLUSH record). Either
    /// way every page sent so far is on its way before what follows on the main channel.
    fn close_ram(&mut self, round: bool) -> Result<(), SourceError> {
        self.close_ram_with(round, false)
    }

    /// [`Precopy::close_ram`]; at the `end` (the END section), under mapped-ram, the file
    /// bitmaps go to the file between the last sync and the EOS (QEMU's
    /// `ram_save_file_bmap`): no channel writes a page after them.
    fn close_ram_with(&mut self, round: bool, end: bool) -> Result<(), SourceError> {
        let mut synced = false;
        if let Some(m) = &mut self.mfd {
            if m.per_section() || round {
                m.sync()?;
                m.fold(self.ctx);
                synced = true;
                if m.flush_record() {
                    self.out.put(|o| {
                        ram::encode_multifd_flush(o);
                        Ok(())
                    })?;
                }
            }
        }
        if let (true, Some(f)) = (end, &self.file) {
            let n = f.write_bitmaps()?;
            Stats::add(&self.ctx.stats.transferred, n);
        }
        self.out.close_ram()?;
        if synced {
            // The destination's receivers wait at their SYNC until the main channel brings
            // this EOS (or FLUSH): it must not sit in the writer while the channels fill up
            // with the next section's pages (QEMU flushes its QEMUFile here too).
            self.out.flush()?;
        }
        Ok(())
    }

    /// Bytes written on every channel (pages at their places in the file included), or
    /// queued on the main one.
    fn produced(&self) -> u64 {
        self.out.produced() + self.side_bytes()
    }

    /// Bytes written on every channel.
    fn sent(&self) -> u64 {
        self.out.sent() + self.side_bytes()
    }

    /// Bytes written beside the main channel's stream: multifd, mapped-ram pages.
    fn side_bytes(&self) -> u64 {
        self.mfd.as_ref().map_or(0, |m| m.written()) + self.file.as_ref().map_or(0, |f| f.written())
    }

    /// Iterates passes until what is left fits in the downtime limit; true when postcopy
    /// was asked for instead. A pass is sent as PART sections of about [`PART_TIME`], the
    /// last one ended early by `migrate-start-postcopy`.
    pub(crate) fn passes(&mut self) -> Result<bool, SourceError> {
        let ctx = self.ctx;
        loop {
            let pass_start = Instant::now();
            let sent_before = self.produced();
            self.out.open_ram(SectionKind::Part)?;
            let end = self.send_pages(true, self.caps.postcopy_ram, true)?;
            // Asked for during a pass too short to look (fewer words than CHECK_EVERY).
            let postcopy = end == PassEnd::Postcopy
                || (self.caps.postcopy_ram && self.commands.postcopy_requested());
            // The end of a pass is the end of a dirty-scan round; one cut short by
            // postcopy is the last round of the multifd channels.
            self.close_ram(end == PassEnd::Done || postcopy)?;
            self.log_progress();
            if postcopy {
                return Ok(true);
            }
            self.out.flush()?;
            let secs = pass_start.elapsed().as_secs_f64().max(1e-6);
            let bytes = (self.sent() - sent_before) as f64;
            let bps = bytes / secs;
            ctx.stats
                .rate_bps
                .store((bps * 8.0) as u64, Ordering::Relaxed);
            ctx.state.emit_event(
                crate::control::protocol::event::MIGRATION_PASS,
                serde_json::json!({"pass": self.pass}),
            );
            let dirty = self.pages.harvest(ctx);
            let sent = self.sent();
            if let Some(c) = &mut self.converge {
                let p = ctx.params().throttle;
                if let Some(pct) = c.sync(&p, Instant::now(), dirty, PAGE as u64, sent) {
                    super::ask_throttle(ctx, pct);
                }
            }
            let dirty_bytes = dirty * PAGE as u64;
            let budget = bps * ctx.params().downtime_limit as f64 / 1000.0;
            slog::debug!(ctx.log, "pass done"; "pass" => self.pass, "bytes" => bytes as u64, "secs" => secs, "dirty_pages" => dirty);
            self.pass += 1;
            if (dirty_bytes as f64) <= budget || dirty == 0 {
                return Ok(false);
            }
        }
    }

    /// Sends what is left of the pass. `limit` applies the bandwidth limit; `postcopy`
    /// stops at `migrate-start-postcopy`; `parts` closes the open PART section and opens
    /// the next one every [`PART_TIME`] (a pass; the END section is one section).
    fn send_pages(
        &mut self,
        limit: bool,
        postcopy: bool,
        parts: bool,
    ) -> Result<PassEnd, SourceError> {
        let ctx = self.ctx;
        let mut names = Names::Track(None);
        let mut since_check = 0u32;
        let mut part_start = Instant::now();
        // Read at each check, not per word (a lock and a copy of every parameter): a
        // new limit applies within CHECK_EVERY words.
        let mut bw = if limit { ctx.params().max_bandwidth } else { 0 };
        while let Some((bi, wi, word)) = self.pages.next_pass_word() {
            let bt = &self.pages.blocks[bi];
            let sink = Sink::of(self.mfd.as_mut(), self.file.as_ref());
            let sent = bt.send_word(&mut self.out, sink, bi, wi, word, &mut names)?;
            sent.count(ctx);
            let mfd_bytes = self.mfd.as_mut().map_or(0, |m| m.throttle_bytes(ctx));
            if limit {
                if let Some(wait) = self.throttle.account(sent.bytes + mfd_bytes, bw) {
                    self.commands.throttle(wait)?;
                }
            }
            since_check += 1;
            if since_check >= CHECK_EVERY {
                since_check = 0;
                if limit {
                    bw = ctx.params().max_bandwidth;
                }
                self.commands.check_cancel()?;
                self.check_rp()?;
                self.log_progress();
                if postcopy && self.commands.postcopy_requested() {
                    return Ok(PassEnd::Postcopy);
                }
                if parts && part_start.elapsed() >= PART_TIME {
                    // A new section names its first page's block again.
                    self.close_ram(false)?;
                    self.out.open_ram(SectionKind::Part)?;
                    names = Names::Track(None);
                    part_start = Instant::now();
                }
            }
        }
        Ok(PassEnd::Done)
    }

    /// Stops the migration as soon as the destination reports a failure (SHUT with an
    /// error, or a broken return path), instead of sending the rest of RAM for nothing.
    fn check_rp(&mut self) -> Result<(), SourceError> {
        let Some(rp) = &mut self.rp else {
            return Ok(());
        };
        while let Some(ev) = rp.next(Wait::Now)? {
            match ev {
                // Noted: the end does not wait for it.
                RpEvent::Shut(_) => {}
                // Page requests are refused by the reader before postcopy.
                other => return Err(PeerError::Unexpected(other).into()),
            }
        }
        Ok(())
    }

    /// A progress line for operators, about once a second during long migrations.
    fn log_progress(&mut self) {
        if self.last_progress.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_progress = Instant::now();
        let st = &self.ctx.stats;
        slog::info!(self.ctx.log, "progress";
            "pass" => self.pass,
            "transferred" => st.transferred.load(Ordering::Relaxed),
            "remaining" => st.remaining.load(Ordering::Relaxed),
            "total" => st.total.load(Ordering::Relaxed),
            "pages" => st.normal.load(Ordering::Relaxed),
            "zero_pages" => st.duplicate.load(Ordering::Relaxed),
        );
    }

    /// With pause-before-switchover: `pre-switchover` until `migrate-continue`. Waiting
    /// for the parent sends nothing: an empty RAM part now and then keeps the
    /// destination's precopy-timeout from firing.
    pub(crate) fn pre_switchover(&mut self) -> Result<(), SourceError> {
        if !self.caps.pause_before_switchover {
            return Ok(());
        }
        let ctx = self.ctx;
        ctx.state.transition(MigrationStatus::PreSwitchover)?;
        let idle = ctx.precopy_keepalive().unwrap_or(Duration::from_secs(3600));
        loop {
            match self.commands.wait_continue(Instant::now() + idle)? {
                Switchover::Continue => return Ok(()),
                Switchover::Idle => {
                    self.out.open_ram(SectionKind::Part)?;
                    self.close_ram(false)?;
                    self.out.flush()?;
                }
            }
        }
    }

    /// Sends SWITCHOVER_START when the machine type and version call for it.
    pub(crate) fn switchover_start(&mut self) -> Result<(), SourceError> {
        let p = self.ctx.params();
        if p.compat_version.accepts_switchover_start()
            && crate::compat::machine_sends_switchover_start(&p.machine_type)
        {
            self.out
                .put(|o| stream::encode_command(o, wire::command::SWITCHOVER_START, &[]))?;
        }
        Ok(())
    }

    /// Precopy switchover: END with everything still dirty, the device sections, EOF and
    /// the VM description; then waits for the destination's SHUT. Returns the bytes sent.
    pub(crate) fn finish(
        mut self,
        devices: &[DeviceSection],
        downtime_start: Instant,
    ) -> Result<u64, SourceError> {
        let ctx = self.ctx;
        let p = ctx.params();
        ctx.state.transition(MigrationStatus::Device)?;
        // The guest is stopped now: everything still dirty goes in the END section.
        self.pages.harvest(ctx);
        self.out.open_ram(SectionKind::End)?;
        self.send_pages(false, false, false)?;
        // QEMU's ram_save_complete goes round the dirty scan once more: a round's end.
        self.close_ram_with(true, true)?;
        let mut desc = VmDescriptionBuilder::new(PAGE as u64);
        if p.compat_version.vmdesc_has_configuration() {
            desc.configuration(p.machine_type.len());
        }
        for d in devices {
            self.out.put(|o| {
                o.extend_from_slice(&d.raw);
                Ok(())
            })?;
            match &d.description {
                Some(j) => desc.push_device(serde_json::Value::clone(j)),
                None => desc.push_opaque(
                    &d.header.idstr,
                    d.header.instance_id,
                    d.header.version_id,
                    d.body.len(),
                ),
            };
        }
        let json = desc.to_json_bytes();
        self.out.put(|o| {
            stream::encode_eof(o);
            stream::encode_vmdesc(o, &json)
        })?;
        self.out.flush()?;
        ctx.stats.downtime_us.store(
            downtime_start.elapsed().as_micros() as u64,
            Ordering::Relaxed,
        );
        ctx.stats.remaining.store(0, Ordering::Relaxed);
        // Synced in the END section: nothing more goes on the multifd channels.
        let mfd_bytes = match self.mfd.take() {
            Some(m) => m.close(ctx)?,
            None => 0,
        };
        if let Some(rp) = &mut self.rp {
            wait_shut(ctx, &mut self.out, rp, None)?;
        }
        Ok(self.out.sent() + mfd_bytes + self.file.as_ref().map_or(0, |f| f.written()))
    }

    /// Hands over to the postcopy push: the precopy's connection becomes its first link.
    /// The multifd channels synced at the end of the last pass (its section's EOS) and
    /// close here: postcopy goes on over the main (and preempt) channels only, as QEMU
    /// 10.1 does.
    pub(crate) fn into_postcopy(
        mut self,
        uri: Uri,
    ) -> Result<(PostcopyPush<'m>, Link<'m>), SourceError> {
        if let Some(m) = self.mfd.take() {
            m.close(self.ctx)?;
        }
        let Some(rp) = self.rp else {
            // Postcopy needs a socket, and a socket always gets a return path.
            return Err(PeerError::NotASocket(self.out.chan().peer.clone()).into());
        };
        let push = PostcopyPush::new(
            self.ctx,
            self.blocks,
            self.pages,
            self.rp_shared,
            self.caps.postcopy_preempt.then_some(uri),
        );
        let link = Link {
            out: self.out,
            rp,
            urgent: None,
        };
        Ok((push, link))
    }
}
