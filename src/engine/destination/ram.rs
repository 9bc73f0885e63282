//! The RAM section on the main channel: the block list of its START, then records up to
//! each EOS. Precopy pages go into a page batch that borrows the reader's buffer and is
//! written before the reader moves; postcopy pages are placed (or staged) as they are read,
//! requested ones first.

use std::sync::Arc;

use crate::compat::wire;
use crate::engine::destination::error::{LoadError, Violation};
use crate::engine::destination::loader::{Loader, Phase, RamSection};
use crate::engine::destination::place::{BlockCursor, Page, PageData};
use crate::engine::destination::reader::ReadError;
use crate::engine::destination::reader::{with_next, ReadReady, Reader};
use crate::engine::migration::Stats;
use crate::memory::block::RamBlock;
use crate::memory::page_writer::{PageBatch, PageWriteError};
use crate::wire::ram::{self, Record};
use crate::wire::stream::SectionHeader;

impl Loader<'_> {
    /// Postcopy: places the staged run; before the reader's buffer changes.
    fn flush_staged(&mut self) -> Result<(), LoadError> {
        match self.postcopy() {
            Some(s) => s
                .flush_staged()
                .map_err(|source| LoadError::Postcopy { offset: 0, source }),
            None => Ok(()),
        }
    }

    /// Postcopy: places requested pages among those read ahead (see
    /// `PostcopySink::place_requested_ahead`).
    fn look_ahead<R>(&mut self, r: &Reader<R>) {
        let (cursor, ram) = (self.cursor, self.ram.id());
        if let Phase::Postcopy(s) = &mut self.phase {
            s.place_requested_ahead(self.blocks, r.data(), r.offset, cursor, ram);
        }
    }

    /// The records of a RAM section, up to its EOS. The phase does not change inside one.
    pub(super) fn ram_body<R: ReadReady>(&mut self, r: &mut Reader<R>) -> Result<(), LoadError> {
        if self.in_postcopy() {
            return self.postcopy_body(r);
        }
        if self.mapped_ram {
            return self.mapped_ram_body(r);
        }
        let mut flush_seen = false;
        loop {
            let (used, stop) = self.precopy_records(r.data(), r.offset);
            r.consume(used);
            match stop? {
                Stop::Eos => {
                    self.learn_multifd_style(flush_seen);
                    if self.multifd_sync_at_eos() {
                        self.multifd_sync()?;
                    }
                    return Ok(());
                }
                // The records before it are written: the channels may go on.
                Stop::Flush => {
                    flush_seen = true;
                    self.multifd_sync()?
                }
                Stop::NeedMore => r.need_more("in a RAM section")?,
            }
        }
    }

    /// Precopy: the whole records in `data` (at stream offset `at`) up to EOS or
    /// MULTIFD_FLUSH, their pages queued in one batch that borrows `data` and is written
    /// before this returns (the page writer splits a large batch over its threads).
    /// Returns the bytes used and where it stopped.
    fn precopy_records(&mut self, data: &[u8], at: u64) -> (usize, Result<Stop, LoadError>) {
        let Phase::Precopy(p) = &mut self.phase else {
            return (0, Ok(Stop::NeedMore));
        };
        let mut batch = PageBatch::new();
        let mut pos = 0;
        let result = loop {
            let offset = at + pos as u64;
            let (rec, n) = match ram::decode_record(&data[pos..]) {
                Ok(Some(x)) => x,
                Ok(None) => break Ok(Stop::NeedMore),
                Err(source) => break Err(LoadError::Wire { offset, source }),
            };
            pos += n;
            match resolve(&mut self.cursor, self.blocks, &self.ctx.stats, offset, rec) {
                Ok(Step::Eos) => break Ok(Stop::Eos),
                Ok(Step::Flush) => break Ok(Stop::Flush),
                Ok(Step::Skip) => {}
                Ok(Step::Page(page)) => {
                    if let Err(e) = p.sink.place(self.blocks, &page, &mut batch) {
                        break Err(page_write_error(offset, e));
                    }
                    self.received[page.bi].set(page.index());
                }
                Err(e) => break Err(e),
            }
        };
        let written = p
            .sink
            .write(batch)
            .map_err(|e| page_write_error(at + pos as u64, e));
        (pos, result.and_then(|eos| written.map(|()| eos)))
    }

    /// Postcopy, while a vCPU waits, after each record: after every placed run, reads what
    /// has arrived (the socket drains at copy speed, so a requested page behind background
    /// pages reaches the buffer without waiting for them to be placed), and looks for
    /// requested pages among the records read when new ones came or a page was requested
    /// since the last look (then from the in-order position: it may be buffered already).
    fn keep_drained<R: ReadReady>(&mut self, r: &mut Reader<R>) {
        let Some(s) = self.postcopy() else {
            return;
        };
        if !s.anyone_waiting() {
            return;
        }
        let read = s.take_placed() && r.read_arrived();
        if read || s.asked_since_scan() {
            self.look_ahead(r);
        }
    }

    /// Postcopy: each page is placed (or staged) as it is read, and requested pages
    /// further on in the buffer are placed first.
    fn postcopy_body<R: ReadReady>(&mut self, r: &mut Reader<R>) -> Result<(), LoadError> {
        self.look_ahead(r);
        let result = loop {
            match ram::decode_record(r.data()) {
                Ok(Some((rec, n))) => {
                    let eos = self.place_postcopy(r.offset, rec);
                    r.consume(n);
                    match eos {
                        Ok(true) => break Ok(()),
                        Ok(false) => {
                            self.keep_drained(r);
                            continue;
                        }
                        Err(e) => break Err(e),
                    }
                }
                Ok(None) => {}
                Err(e) => break Err(r.wire(e)),
            }
            // The staged run is a copy, but placing it before waiting for more keeps
            // pages from sitting here while the stream stalls.
            if let Err(e) = self.flush_staged() {
                break Err(e);
            }
            if let Err(e) = r.need_more("in a RAM section") {
                break Err(e.into());
            }
            self.look_ahead(r);
        };
        let flushed = self.flush_staged();
        result.and(flushed)
    }

    /// Postcopy: one record at stream offset `offset`; true at EOS.
    fn place_postcopy(&mut self, offset: u64, rec: Record<'_>) -> Result<bool, LoadError> {
        let page = match resolve(&mut self.cursor, self.blocks, &self.ctx.stats, offset, rec)? {
            Step::Eos => return Ok(true),
            // The multifd receivers stopped at POSTCOPY_LISTEN.
            Step::Skip | Step::Flush => return Ok(false),
            Step::Page(page) => page,
        };
        if let Phase::Postcopy(s) = &mut self.phase {
            // Placed atomically in the parent's mapping, waking faulting threads.
            s.place(&page)
                .map_err(|source| LoadError::Postcopy { offset, source })?;
        }
        Ok(false)
    }

    pub(super) fn ram_start<R: ReadReady>(
        &mut self,
        r: &mut Reader<R>,
        h: &SectionHeader,
    ) -> Result<(), LoadError> {
        if h.version_id != wire::ram::VERSION || h.instance_id != 0 {
            return Err(Self::invalid(
                r.offset,
                Violation::RamVersion {
                    version: h.version_id,
                    instance: h.instance_id,
                },
            ));
        }
        if !matches!(self.ram, RamSection::NotStarted) {
            return Err(Self::invalid(r.offset, Violation::SecondRamStart));
        }
        self.ram = RamSection::Started(h.section_id);
        let total = with_next!(
            r,
            "in the RAM block list",
            ram::decode_record,
            |rec| match rec {
                Record::MemSize { total } => total,
                other => return Err(Self::invalid(r.offset, Violation::no_block_list(&other))),
            }
        );
        let mut seen = 0u64;
        let mut names = Vec::new();
        let (blocks, advised) = (self.blocks, self.advised());
        let mapped_ram = self.mapped_ram;
        while seen < total {
            let e = with_next!(
                r,
                "in the RAM block list",
                |b| ram::decode_block_entry(b, &|name: &str| {
                    advised
                        && blocks
                            .iter()
                            .any(|x| x.id == name && x.page_size != wire::TARGET_PAGE_SIZE as u64)
                }),
                |e| e
            );
            let Some((bi, b)) = blocks.iter().enumerate().find(|(_, b)| b.id == e.idstr) else {
                return Err(Self::invalid(
                    r.offset,
                    Violation::UnknownBlock {
                        name: e.idstr,
                        known: blocks.iter().map(|b| b.id.clone()).collect(),
                    },
                ));
            };
            if b.size != e.used_length {
                return Err(Self::invalid(
                    r.offset,
                    Violation::BlockSize {
                        name: e.idstr,
                        source_len: e.used_length,
                        local: b.size,
                    },
                ));
            }
            seen = seen
                .checked_add(e.used_length)
                .filter(|&s| s <= total)
                .ok_or_else(|| Self::invalid(r.offset, Violation::BlockTotal))?;
            names.push(e.idstr);
            if mapped_ram {
                self.mapped_block(r, bi)?;
            }
        }
        slog::info!(self.ctx.log, "RAM block list"; "blocks" => format!("{names:?}"), "total" => total);
        self.ram_body(r)
    }
}

/// Where a run of precopy records stopped.
enum Stop {
    /// At the end of the data read so far.
    NeedMore,
    Eos,
    /// MULTIFD_FLUSH: the multifd sync point.
    Flush,
}

/// A RAM record of the main channel, checked.
enum Step<'a> {
    Eos,
    Flush,
    /// Nothing to place.
    Skip,
    Page(Page<'a>),
}

/// Checks a RAM record of the main channel at stream offset `offset` (block context in
/// `cursor`) and counts its page.
fn resolve<'a>(
    cursor: &mut BlockCursor,
    blocks: &[Arc<RamBlock>],
    stats: &Stats,
    offset: u64,
    rec: Record<'a>,
) -> Result<Step<'a>, LoadError> {
    match rec {
        Record::Eos => return Ok(Step::Eos),
        Record::MultifdFlush => return Ok(Step::Flush),
        Record::MemSize { .. } => {
            return Err(Loader::invalid(offset, Violation::BlockListOutsideStart))
        }
        Record::Zero { .. } | Record::Page { .. } => {}
    }
    let Some(page) = cursor
        .page(blocks, &rec)
        .map_err(|source| LoadError::Page { offset, source })?
    else {
        return Ok(Step::Skip);
    };
    match page.data {
        PageData::Fill(_) => Stats::add(&stats.duplicate, 1),
        PageData::Bytes(_) => Stats::add(&stats.normal, 1),
    }
    Ok(Step::Page(page))
}

/// A page writer error at stream offset `offset`.
fn page_write_error(offset: u64, e: PageWriteError) -> LoadError {
    match e {
        // Offsets were checked when the pages were queued.
        PageWriteError::Outside { .. } => LoadError::PageWrite { offset, source: e },
        PageWriteError::Io { block, source } => LoadError::Read(ReadError::Io {
            peer: format!("RAM block {block:?}"),
            offset,
            source,
        }),
    }
}
