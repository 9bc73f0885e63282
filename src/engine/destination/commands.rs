//! The commands of the main stream, and the ones that change the loader's phase:
//! POSTCOPY_ADVISE, POSTCOPY_LISTEN (precopy -> postcopy) and PACKAGED.

use std::sync::Arc;

use crate::compat::wire::{self, command};
use crate::engine::destination::error::{LinkError, LoadError, Violation};
use crate::engine::destination::fault::FaultError;
use crate::engine::destination::loader::{Loader, Phase, READ_CHUNK};
use crate::engine::destination::package;
use crate::engine::destination::postcopy::PostcopySink;
use crate::engine::destination::reader::ReadError;
use crate::engine::destination::reader::{ReadReady, Reader};
use crate::engine::destination::return_path::RpWriter;
use crate::engine::state::MigrationStatus;
use crate::transport::Channel;
use crate::wire::postcopy;
use crate::wire::return_path::RpMessage;

/// The main channel's socket receive buffer in postcopy. Precopy keeps 4 MiB there so the
/// source runs ahead; in postcopy without preempt a requested page queues behind what the
/// kernel holds, which drains only at placing speed while the reader's buffer is full.
/// Over TCP this bounds that queue (to about this much: the kernel doubles the value and
/// keeps about half for data); 256 KiB is still above the bandwidth-delay product of a
/// 10 Gbit/s link with a 200 us round trip, so the background push keeps its rate.
const POSTCOPY_RCVBUF: usize = 256 << 10;

impl Loader<'_> {
    /// A return path that cannot be written is a broken link (postcopy pauses on it).
    pub(super) fn send_rp(&self, m: RpMessage<'_>) -> Result<(), LoadError> {
        if let Some(rp) = &self.rp {
            rp.send(&m)
                .map_err(|e| LoadError::Link(LinkError::ReturnPath(e)))?;
        }
        Ok(())
    }

    pub(super) fn command<R>(
        &mut self,
        r: &Reader<R>,
        chan: Option<&Channel>,
        cmd: u16,
        payload: &[u8],
    ) -> Result<(), LoadError> {
        match cmd {
            command::OPEN_RETURN_PATH => {
                let Some(c) = chan.filter(|c| c.is_socket) else {
                    return Err(Self::invalid(r.offset, Violation::ReturnPathNotSocket));
                };
                // A clone shares the TLS session, if any: the return path is its send half.
                let rp = c.try_clone("return-path").map_err(|source| {
                    LoadError::Read(ReadError::Io {
                        peer: c.peer.clone(),
                        offset: r.offset,
                        source,
                    })
                })?;
                self.rp = Some(Arc::new(RpWriter::new(rp)));
            }
            command::PING => {
                let v = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                self.send_rp(RpMessage::Pong(v))?;
            }
            command::SWITCHOVER_START => {}
            command::POSTCOPY_ADVISE => self.advise(r, payload)?,
            command::POSTCOPY_RAM_DISCARD => self.discard(r, payload)?,
            other => return Err(Self::invalid(r.offset, Violation::UnexpectedCommand(other))),
        }
        Ok(())
    }

    fn advise<R>(&mut self, r: &Reader<R>, payload: &[u8]) -> Result<(), LoadError> {
        let Some(a) = postcopy::decode_advise(payload).map_err(|e| r.wire(e))? else {
            // Only dirty bitmaps are advised: nothing to prepare for RAM.
            return Ok(());
        };
        if a.target_page_size != wire::TARGET_PAGE_SIZE as u64 {
            return Err(Self::invalid(
                r.offset,
                Violation::TargetPageSize(a.target_page_size),
            ));
        }
        let local = self.blocks.iter().fold(0, |acc, b| acc | b.page_size);
        if a.page_size_summary != local {
            return Err(Self::invalid(
                r.offset,
                Violation::PageSizes {
                    source_sizes: a.page_size_summary,
                    local,
                },
            ));
        }
        let postcopy_err = |source| LoadError::Postcopy {
            offset: r.offset,
            source,
        };
        let Phase::Precopy(p) = &mut self.phase else {
            // The userfaultfd went to the LISTEN before.
            return Err(postcopy_err(FaultError::NoUserfaultfd));
        };
        if p.uffd.is_none() {
            return Err(postcopy_err(FaultError::NoUserfaultfd));
        }
        if let Some(b) = self.blocks.iter().find(|b| b.host_addr.is_none()) {
            return Err(postcopy_err(FaultError::NoHostAddr(b.id.clone())));
        }
        if self.rp.is_none() {
            return Err(Self::invalid(r.offset, Violation::AdviseWithoutReturnPath));
        }
        p.advised = true;
        Ok(())
    }

    /// Punches the discarded ranges out of the memfds: the parent's next access faults and
    /// the page is requested from the source.
    fn discard<R>(&mut self, r: &Reader<R>, payload: &[u8]) -> Result<(), LoadError> {
        if !self.advised() {
            return Err(Self::invalid(r.offset, Violation::DiscardWithoutAdvise));
        }
        let d = postcopy::decode_discard(payload).map_err(|e| r.wire(e))?;
        let bi = self.block_index(d.block).ok_or_else(|| {
            Self::invalid(
                r.offset,
                Violation::DiscardUnknownBlock(d.block.to_string()),
            )
        })?;
        let b = self.blocks[bi].clone();
        for (off, len) in d.ranges {
            let page = wire::TARGET_PAGE_SIZE as u64;
            let end = off.checked_add(len);
            if off % page != 0 || len % page != 0 || end.is_none_or(|e| e > b.size) {
                return Err(Self::invalid(
                    r.offset,
                    Violation::DiscardOutside {
                        off,
                        len,
                        block: b.id.clone(),
                        size: b.size,
                    },
                ));
            }
            b.punch_hole(off, len)
                .map_err(|source| LoadError::Discard {
                    offset: r.offset,
                    block: b.id.clone(),
                    source,
                })?;
            // A word at a time: ranges come from the stream, up to the whole block each.
            for (w, mask) in crate::memory::bits::word_masks(off / page, (off + len) / page) {
                self.received[bi].clear_mask(w, mask);
                if let Phase::Precopy(p) = &mut self.phase {
                    p.sink.discarded(bi, w, mask);
                }
            }
        }
        Ok(())
    }

    /// POSTCOPY_LISTEN: from here pages go through the userfaultfd and faults are served.
    fn listen(&mut self, offset: u64) -> Result<(), LoadError> {
        let Phase::Precopy(p) = &mut self.phase else {
            return Err(Self::invalid(offset, Violation::SecondListen));
        };
        if !p.advised {
            return Err(Self::invalid(offset, Violation::ListenWithoutAdvise));
        }
        // The last FLUSH synced the multifd channels; from here every page comes on the
        // main or the preempt channel (QEMU 10.1 stops multifd when postcopy starts).
        if let Some(m) = self.multifd.take() {
            m.finish()?;
            slog::info!(self.ctx.log, "multifd receivers stopped for postcopy");
        }
        let Phase::Precopy(p) = &mut self.phase else {
            return Err(Self::invalid(offset, Violation::SecondListen));
        };
        let postcopy_err = |source| LoadError::Postcopy { offset, source };
        let (Some(uffd), Some(rp)) = (p.uffd.take(), self.rp.clone()) else {
            return Err(postcopy_err(FaultError::NoUserfaultfd));
        };
        let preempt = p.preempt.take();
        let mut sink = PostcopySink::start(
            self.ctx,
            self.blocks,
            uffd,
            rp,
            self.received.clone(),
            self.link.dup_fd(),
        )
        .map_err(postcopy_err)?;
        if let Some(incoming) = preempt {
            sink.start_preempt(self.ctx, self.blocks, incoming, self.link.dup_fd())
                .map_err(|source| LoadError::Preempt { offset, source })?;
        }
        self.phase = Phase::Postcopy(sink);
        self.arm_link_timeout();
        self.postcopy_loading();
        slog::info!(self.ctx.log, "postcopy listening");
        Ok(())
    }

    /// The PACKAGED command: LISTEN, the device sections, PINGs and RUN, in one blob.
    pub(super) fn package<R: ReadReady>(
        &mut self,
        r: &mut Reader<R>,
        len: u32,
    ) -> Result<(), LoadError> {
        // Whether a package may come at all is known before reading it: QEMU only takes
        // its LISTEN after ADVISE and before any other LISTEN. Checked first, so that a
        // stream that never advised postcopy cannot make the helper buffer a package.
        package::check_before_buffering(len, self.advised(), self.in_postcopy()).map_err(
            |source| LoadError::Package {
                offset: r.offset,
                source,
            },
        )?;
        let len = len as usize;
        r.reserve_exact(len);
        while r.data().len() < len {
            r.need_more("in the postcopy package")?;
        }
        let blob = &r.data()[..len];
        let pkg = postcopy::decode_package(blob).map_err(|e| r.wire(e))?;
        let sections = package::sections(pkg.devices, &mut self.intake).map_err(|source| {
            LoadError::Package {
                offset: r.offset,
                source,
            }
        })?;
        let pings = pkg.pings;
        r.consume(len);
        r.shrink_to(READ_CHUNK);
        self.listen(r.offset)?;
        r.top_up = false;
        self.devices.extend(sections);
        // The parent needs the device state before it starts its vCPUs. Moved, not copied:
        // the sections are the largest thing a destination holds.
        self.ctx
            .device_in
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(&mut self.devices);
        for v in pings {
            self.send_rp(RpMessage::Pong(v))?;
        }
        // POSTCOPY_RUN: the parent may start its vCPUs.
        self.ctx.state.transition(MigrationStatus::PostcopyActive)?;
        Ok(())
    }

    /// The loader in postcopy (from LISTEN, and on every recovery's channel): a short
    /// kernel queue on the main channel (see `POSTCOPY_RCVBUF`); without preempt, requested
    /// pages come on the main channel, so this thread, like the fault thread, asks to be
    /// scheduled ahead of the parent's other work (with preempt it only places background
    /// pages, and stays behind the preempt thread).
    pub(super) fn postcopy_loading(&self) {
        if let Some(fd) = &self.link.fd {
            crate::transport::set_recv_buffer(fd, POSTCOPY_RCVBUF);
        }
        if !self.ctx.caps().postcopy_preempt {
            crate::engine::priority::raise(&self.ctx.log, "loader");
        }
    }

    /// In postcopy a link with no traffic for `link-timeout` is dead (the source pings; a
    /// QEMU source pushes pages without pause): reads and writes time out instead of hanging.
    pub(super) fn arm_link_timeout(&self) {
        let t = self.ctx.params().link_timeout;
        let t = (t > 0).then(|| std::time::Duration::from_millis(t));
        if let Some(fd) = &self.link.fd {
            crate::transport::set_socket_timeouts(fd, t);
        }
        if let Some(timer) = &self.link.timer {
            timer.set(t, crate::transport::TimeoutParam::Link);
        }
    }
}
