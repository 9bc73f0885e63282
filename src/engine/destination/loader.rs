//! The loader: the token loop over a stream reader, with the phase it is in. Before
//! POSTCOPY_LISTEN pages go to the precopy sink, from it on to the postcopy sink; the
//! commands that change phase are in `commands`, the recovery driver in `recovery`.

use crate::engine::destination::mapped_ram::{MappedBlock, MappedFile, MappedMode};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::compat::wire::{self, command};
use crate::engine::destination::bitmap::AtomicBitmap;
use crate::engine::destination::error::{LoadError, Violation};
use crate::engine::destination::multifd::Multifd;
use crate::engine::destination::place::BlockCursor;
use crate::engine::destination::postcopy::PostcopySink;
use crate::engine::destination::precopy::PrecopySink;
use crate::engine::destination::preempt::PreemptConn;
use crate::engine::destination::reader::ReadError;
use crate::engine::destination::reader::{with_next, ReadReady, Reader};
use crate::engine::destination::return_path::RpWriter;
use crate::engine::migration::MigrationCtx;
use crate::memory::block::RamBlock;
use crate::transport::{Channel, IoTimer};
use crate::vmstate::{self, VmDescription};
use crate::wire::device_intake::DeviceIntake;
use crate::wire::device_state::DeviceSection;
use crate::wire::stream::{self, SectionHeader, Token};

/// The main channel's read buffer.
pub(super) const READ_CHUNK: usize = 4 << 20;

/// What ended a pass of the section loop.
pub(super) enum LoopEnd {
    /// EOF and, where one came, the VM description.
    Done,
    /// A device section needs the VM description (not yet known) to be delimited.
    NeedDescription,
}

/// Where the pages go.
pub(super) enum Phase {
    /// Before POSTCOPY_LISTEN.
    Precopy(Precopy),
    /// From POSTCOPY_LISTEN, or an adoption, on.
    Postcopy(PostcopySink),
}

pub(super) struct Precopy {
    pub(super) sink: PrecopySink,
    /// POSTCOPY_ADVISE came: huge-page blocks carry their page size in the block list.
    pub(super) advised: bool,
    /// The parent's userfaultfd, for LISTEN.
    pub(super) uffd: Option<OwnedFd>,
    /// postcopy-preempt: where the preempt channel comes from, for LISTEN.
    pub(super) preempt: Option<PreemptConn>,
}

/// The RAM section's id.
#[derive(Clone, Copy)]
pub(super) enum RamSection {
    NotStarted,
    /// An adopted migration learns it from the first PART after the recovery.
    FromNextPart,
    Started(u32),
}

impl RamSection {
    pub(super) fn id(self) -> Option<u32> {
        match self {
            RamSection::Started(id) => Some(id),
            _ => None,
        }
    }
}

/// The main channel, for the fault and preempt threads to shut down when they fail, and
/// for the link timeout.
#[derive(Default)]
pub(super) struct Link {
    pub(super) fd: Option<OwnedFd>,
    /// The channel's timeout record: re-armed with `link-timeout` in postcopy.
    pub(super) timer: Option<Arc<IoTimer>>,
}

impl Link {
    pub(super) fn of(chan: &Channel) -> Self {
        Link {
            fd: chan.try_clone_fd().ok(),
            timer: Some(chan.timer()),
        }
    }

    pub(super) fn dup_fd(&self) -> Option<OwnedFd> {
        self.fd.as_ref().and_then(|f| f.try_clone().ok())
    }
}

pub(super) struct Loader<'a> {
    pub(super) ctx: &'a MigrationCtx,
    pub(super) blocks: &'a [Arc<RamBlock>],
    pub(super) ram: RamSection,
    /// The main channel's block context.
    pub(super) cursor: BlockCursor,
    pub(super) rp: Option<Arc<RpWriter>>,
    pub(super) devices: Vec<DeviceSection>,
    pub(super) intake: DeviceIntake,
    /// Per block: pages this destination has (received, or zero and left a hole).
    pub(super) received: Arc<Vec<AtomicBitmap>>,
    pub(super) phase: Phase,
    pub(super) link: Link,
    /// The multifd receivers, until the end of the stream or POSTCOPY_LISTEN.
    pub(super) multifd: Option<Multifd<'a>>,
    /// Whether the source's multifd sync style is known: set at the EOS of the RAM START
    /// section, by whether a MULTIFD_FLUSH came in it (QEMU 8.1 and later send one there;
    /// 8.0 and older sync at every EOS and never send it).
    pub(super) multifd_style_known: bool,
    /// mapped-ram: whether blocks are read now or on demand, and the blocks read so far.
    pub(super) mapped_mode: MappedMode,
    pub(super) mapped: Vec<MappedBlock>,
    /// mapped-ram: the capability is on here (a header follows each block entry, the RAM
    /// sections carry no pages).
    pub(super) mapped_ram: bool,
    /// mapped-ram: the file the stream comes from, set when the load starts.
    pub(super) mapped_file: Option<MappedFile>,
    last_progress: Instant,
}

impl<'a> Loader<'a> {
    pub(super) fn new(
        ctx: &'a MigrationCtx,
        blocks: &'a [Arc<RamBlock>],
        uffd: Option<OwnedFd>,
        link: Link,
        preempt: Option<PreemptConn>,
    ) -> Self {
        Loader {
            ctx,
            blocks,
            ram: RamSection::NotStarted,
            cursor: BlockCursor::default(),
            rp: None,
            devices: Vec::new(),
            intake: DeviceIntake::default(),
            received: Arc::new(
                blocks
                    .iter()
                    .map(|b| AtomicBitmap::new(b.pages()))
                    .collect(),
            ),
            phase: Phase::Precopy(Precopy {
                sink: PrecopySink::new(blocks, ctx.params().load_threads),
                advised: false,
                uffd,
                preempt,
            }),
            link,
            multifd: None,
            multifd_style_known: false,
            mapped_mode: MappedMode::Full,
            mapped: Vec::new(),
            mapped_ram: ctx.caps().mapped_ram,
            mapped_file: None,
            last_progress: Instant::now(),
        }
    }

    /// Starts a receiver per multifd channel (none without multifd), in `scope`. Under
    /// mapped-ram the stream is a file (`main`) and the multifd channels are its fds for
    /// reading pages at their places: no receivers.
    pub(super) fn start_multifd<'env>(
        &mut self,
        scope: &'a std::thread::Scope<'a, 'env>,
        main: Option<&Channel>,
        chans: Vec<Channel>,
    ) -> Result<(), LoadError> {
        if self.mapped_ram {
            if let Some(main) = main {
                let file = MappedFile::open(main, &chans)
                    .map_err(|source| LoadError::Mapped { offset: 0, source })?;
                self.mapped_file = Some(file);
            }
            return Ok(());
        }
        let Phase::Precopy(p) = &self.phase else {
            return Ok(());
        };
        if chans.is_empty() {
            return Ok(());
        }
        let n = chans.len();
        self.multifd = Some(Multifd::start(
            scope,
            self.ctx,
            self.blocks,
            chans,
            p.sink.known_zero(),
            self.received.clone(),
            self.link.dup_fd(),
        )?);
        slog::info!(self.ctx.log, "multifd receivers started"; "channels" => n);
        Ok(())
    }

    /// The multifd sync point (MULTIFD_FLUSH, or EOS under flush-after-each-section): every
    /// channel's pages sent before it are in memory when this returns. Nothing to wait for
    /// without multifd channels (QEMU ignores a FLUSH then too).
    pub(super) fn multifd_sync(&self) -> Result<(), LoadError> {
        match &self.multifd {
            Some(m) => m.sync(),
            None => Ok(()),
        }
    }

    /// Under flush-after-each-section (compat 7.2) every RAM EOS is a sync point.
    pub(super) fn multifd_sync_at_eos(&self) -> bool {
        self.multifd.as_ref().is_some_and(|m| m.flush_each_section)
    }

    /// At the first RAM EOS: follows the source's sync style whatever `compat-version`
    /// says, so that a mismatch cannot hang the load (QEMU's does: a 7.2 source into a 10.0
    /// destination stays `active`). `flush_seen`: a MULTIFD_FLUSH came in the section.
    pub(super) fn learn_multifd_style(&mut self, flush_seen: bool) {
        if std::mem::replace(&mut self.multifd_style_known, true) {
            return;
        }
        let log = self.ctx.log.clone();
        if let Some(m) = &mut self.multifd {
            let per_section = !flush_seen;
            if m.flush_each_section != per_section {
                slog::warn!(log, "multifd: the source syncs differently from compat-version; following the source";
                    "sync_each_section" => per_section);
                m.flush_each_section = per_section;
            }
        }
    }

    /// Stops the multifd receivers; a receiver's failure is the cause of whatever `result`
    /// says (a main channel it shut down, say).
    pub(super) fn end_multifd(&mut self, result: Result<(), LoadError>) -> Result<(), LoadError> {
        let Some(m) = self.multifd.take() else {
            return result;
        };
        match (result, m.finish()) {
            (Err(e @ LoadError::Multifd { .. }), _) => Err(e),
            (_, Err(e)) => Err(e),
            (r, Ok(())) => r,
        }
    }

    pub(super) fn postcopy(&mut self) -> Option<&mut PostcopySink> {
        match &mut self.phase {
            Phase::Postcopy(s) => Some(s),
            Phase::Precopy(_) => None,
        }
    }

    pub(super) fn in_postcopy(&self) -> bool {
        matches!(self.phase, Phase::Postcopy(_))
    }

    pub(super) fn advised(&self) -> bool {
        match &self.phase {
            Phase::Precopy(p) => p.advised,
            Phase::Postcopy(_) => true,
        }
    }

    pub(super) fn invalid(offset: u64, source: Violation) -> LoadError {
        LoadError::Invalid { offset, source }
    }

    pub(super) fn block_index(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.id == name)
    }

    /// A progress line for operators, about once a second during long loads.
    fn log_progress(&mut self, offset: u64) {
        if self.last_progress.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        self.last_progress = Instant::now();
        let st = &self.ctx.stats;
        slog::info!(self.ctx.log, "progress";
            "received" => offset,
            "pages" => st.normal.load(Ordering::Relaxed),
            "zero_pages" => st.duplicate.load(Ordering::Relaxed),
            "postcopy_requests" => st.postcopy_requests.load(Ordering::Relaxed),
        );
    }

    /// The fault thread's failure, as the loader's error at `offset`.
    pub(super) fn check_faults(&mut self, offset: u64) -> Result<(), LoadError> {
        match self.postcopy().and_then(|s| s.fault_failure()) {
            Some(source) => Err(LoadError::Faults { offset, source }),
            None => Ok(()),
        }
    }

    /// Loads sections until EOF (and the VM description after it).
    pub(super) fn sections<R: ReadReady>(
        &mut self,
        r: &mut Reader<R>,
        chan: Option<&Channel>,
        desc: Option<&VmDescription>,
    ) -> Result<LoopEnd, LoadError> {
        loop {
            if self.ctx.cancelled() {
                return Err(LoadError::Cancelled);
            }
            self.check_faults(r.offset)?;
            if let Some(m) = &self.multifd {
                m.check()?;
            }
            self.log_progress(r.offset);
            // Peek the token without consuming, so a device section can be handed over whole.
            let token = loop {
                match stream::decode_token(r.data()) {
                    Ok(Some((t, n))) => break Some((owned_token(t), n)),
                    Ok(None) => {}
                    Err(e) => return Err(r.wire(e)),
                }
                if !r.fill()? {
                    break None;
                }
            };
            let Some((token, n)) = token else {
                return Err(LoadError::Read(ReadError::Truncated {
                    offset: r.offset + r.data().len() as u64,
                    context: "between sections",
                }));
            };
            match token {
                OwnedToken::Start(h) if h.idstr == wire::ram::IDSTR => {
                    r.consume(n);
                    self.ram_start(r, &h)?;
                    self.footer(r, h.section_id)?;
                }
                OwnedToken::Part(id) | OwnedToken::End(id) => {
                    if let RamSection::FromNextPart = self.ram {
                        self.ram = RamSection::Started(id);
                    }
                    if Some(id) != self.ram.id() {
                        return Err(Self::invalid(r.offset, Violation::SectionNotStarted(id)));
                    }
                    r.consume(n);
                    self.ram_body(r)?;
                    self.footer(r, id)?;
                }
                OwnedToken::Start(h) | OwnedToken::Full(h) => {
                    let Some(desc) = desc else {
                        return Ok(LoopEnd::NeedDescription);
                    };
                    r.consume(n);
                    self.device_section(r, h, n, desc)?;
                }
                OwnedToken::Command(command::PACKAGED, payload) => {
                    r.consume(n);
                    let len = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    self.package(r, len)?;
                }
                OwnedToken::Command(cmd, payload) => {
                    r.consume(n);
                    self.command(r, chan, cmd, &payload)?;
                }
                OwnedToken::VmDescription => {
                    return Err(Self::invalid(r.offset, Violation::DescriptionBeforeEof));
                }
                OwnedToken::Eof => {
                    r.consume(n);
                    // A precopy source sends its VM description after EOF and then waits;
                    // a postcopy source sends none.
                    if desc.is_none() && !self.in_postcopy() {
                        description_after_eof(r)?;
                    }
                    return Ok(LoopEnd::Done);
                }
            }
        }
    }

    fn footer<R: ReadReady>(&mut self, r: &mut Reader<R>, id: u32) -> Result<(), LoadError> {
        with_next!(
            r,
            "at a section footer",
            |b| stream::decode_footer(b, id),
            |_x| ()
        );
        Ok(())
    }

    /// A device section whose header (`hlen` bytes) was just consumed.
    fn device_section<R: ReadReady>(
        &mut self,
        r: &mut Reader<R>,
        h: SectionHeader,
        hlen: usize,
        desc: &VmDescription,
    ) -> Result<(), LoadError> {
        let offset = r.offset - hlen as u64;
        let dev_err = |source| LoadError::Device {
            offset,
            section: h.idstr.clone(),
            source,
        };
        let d = desc.device(&h.idstr, h.instance_id).ok_or_else(|| {
            Self::invalid(
                offset,
                Violation::NotDescribed {
                    idstr: h.idstr.clone(),
                    instance: h.instance_id,
                },
            )
        })?;
        self.intake.admit(&h).map_err(|source| LoadError::Intake {
            offset: r.offset,
            source,
        })?;
        let blen = loop {
            match vmstate::body_len(d, r.data()) {
                Ok(n) if r.data().len() >= n + 5 => break n,
                Ok(_) => {}
                Err(e) if e.is_truncated() => {}
                Err(e) => return Err(dev_err(e)),
            }
            r.need_more("in a device section")?;
        };
        let body = &r.data()[..blen];
        let mut sec = DeviceSection::from_body(h.clone(), body).map_err(|e| r.wire(e))?;
        self.intake.describe(&mut sec, d);
        r.consume(blen);
        self.footer(r, h.section_id)?;
        // Keep the original framing bytes: `from_body` re-encodes the same header, so the
        // raw bytes equal what was read.
        self.devices.push(sec);
        Ok(())
    }
}

/// After EOF of a precopy stream: the VM description, or the end of the stream.
fn description_after_eof<R: ReadReady>(r: &mut Reader<R>) -> Result<(), LoadError> {
    loop {
        match stream::decode_token(r.data()) {
            Ok(Some((Token::VmDescription(_), m))) => {
                r.consume(m);
                return Ok(());
            }
            Ok(Some(_)) => return Err(Loader::invalid(r.offset, Violation::DataAfterEof)),
            Ok(None) => {}
            Err(e) => return Err(r.wire(e)),
        }
        if !r.fill()? {
            if r.data().is_empty() {
                return Ok(());
            }
            return Err(LoadError::Read(ReadError::Truncated {
                offset: r.offset,
                context: "in the VM description",
            }));
        }
    }
}

/// A token detached from the read buffer.
enum OwnedToken {
    Eof,
    Start(SectionHeader),
    Full(SectionHeader),
    Part(u32),
    End(u32),
    Command(u16, Vec<u8>),
    VmDescription,
}

fn owned_token(t: Token<'_>) -> OwnedToken {
    match t {
        Token::Eof => OwnedToken::Eof,
        Token::Start(h) => OwnedToken::Start(h),
        Token::Full(h) => OwnedToken::Full(h),
        Token::Part(i) => OwnedToken::Part(i),
        Token::End(i) => OwnedToken::End(i),
        Token::Command(c) => OwnedToken::Command(c.cmd, c.payload.to_vec()),
        Token::VmDescription(_) => OwnedToken::VmDescription,
    }
}
