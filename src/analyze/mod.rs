//! `qemu-migration-helper analyze FILE`: what a migration stream file holds.
//!
//! The file is mapped read-only and walked with the same pure decoders the destination uses;
//! page data is never copied unless `--extract-ram` writes it out (zero pages stay holes in
//! the output files).

use std::fs::File;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::compat::wire::{self, command};
use crate::vmstate::{self, VmDescription};
use crate::wire::device_intake::DeviceIntake;
use crate::wire::mapped_ram::Regions;
use crate::wire::postcopy;
use crate::wire::ram::{self, Record};
use crate::wire::stream::{self, Token, WireError};

mod extract;
mod mapped;
mod report;
// The files they build come from the fuzzing module (helper build only).
#[cfg(all(test, feature = "helper"))]
mod tests;
use extract::Extract;
pub use report::{BlockStats, Item, MappedStats, Report, MAX_ITEMS};

#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("at offset {offset:#x}{section}: {msg}")]
    Bad {
        offset: u64,
        section: String,
        msg: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Pages of each fill byte, for 7.2's filled "zero" pages.
static FILLS: [[u8; wire::TARGET_PAGE_SIZE]; 256] = {
    let mut f = [[0u8; wire::TARGET_PAGE_SIZE]; 256];
    let mut i = 0;
    while i < 256 {
        f[i] = [i as u8; wire::TARGET_PAGE_SIZE];
        i += 1;
    }
    f
};

struct Walker<'a> {
    buf: &'a [u8],
    pos: usize,
    report: Report,
    desc: Option<VmDescription>,
    ram_section: Option<u32>,
    last_block: Option<usize>,
    extract: Option<Extract<'a>>,
    /// The configuration lists `mapped-ram`: pages are in place in the file, not records.
    mapped: bool,
    /// The regions of the mapped-ram blocks read so far (no two may overlap).
    mapped_regions: Vec<Regions>,
    /// Current section, for error messages.
    section: String,
    progress: Progress,
    /// The decode budget shared by the file's device sections.
    intake: DeviceIntake,
}

/// Progress on stderr for big files: a bar on a terminal, a plain line a second otherwise.
struct Progress {
    enabled: bool,
    tty: bool,
    last: std::time::Instant,
}

impl Progress {
    fn new(size: u64) -> Self {
        use std::io::IsTerminal;
        Progress {
            enabled: size >= 256 << 20,
            tty: std::io::stderr().is_terminal(),
            last: std::time::Instant::now(),
        }
    }

    fn show(&mut self, pos: u64, total: u64) {
        if !self.enabled
            || self.last.elapsed()
                < std::time::Duration::from_millis(if self.tty { 100 } else { 1000 })
        {
            return;
        }
        self.last = std::time::Instant::now();
        let pct = pos as f64 * 100.0 / total.max(1) as f64;
        if self.tty {
            let fill = (pct / 2.5) as usize;
            eprint!(
                "\r  [{}{}] {pct:5.1}%",
                "#".repeat(fill),
                " ".repeat(40 - fill.min(40))
            );
        } else {
            eprintln!("analyze: {pct:.1}% ({} of {} MiB)", pos >> 20, total >> 20);
        }
    }

    fn done(&self) {
        if self.enabled && self.tty {
            eprintln!();
        }
    }
}

impl<'a> Walker<'a> {
    fn bad(&self, msg: impl Into<String>) -> AnalyzeError {
        AnalyzeError::Bad {
            offset: self.pos as u64,
            section: if self.section.is_empty() {
                String::new()
            } else {
                format!(" in section {}", self.section)
            },
            msg: msg.into(),
        }
    }

    fn wire(&self, e: WireError) -> AnalyzeError {
        self.bad(e.to_string())
    }

    /// Decodes with `dec` at the current position; a short file is an error here.
    fn next<T>(
        &mut self,
        what: &str,
        dec: impl Fn(&'a [u8]) -> stream::Decoded<T>,
    ) -> Result<T, AnalyzeError> {
        match dec(&self.buf[self.pos..]) {
            Ok(Some((t, n))) => {
                self.pos += n;
                Ok(t)
            }
            Ok(None) => Err(self.bad(format!("file ends in the middle of {what}"))),
            Err(e) => Err(self.wire(e)),
        }
    }

    fn ram_body(&mut self) -> Result<(), AnalyzeError> {
        loop {
            let rec = self.next("a RAM record", ram::decode_record)?;
            if self.mapped && !matches!(rec, Record::Eos | Record::MemSize { .. }) {
                // QEMU's ram_load_precopy refuses these flags under mapped-ram.
                return Err(self.bad(
                    "a page or MULTIFD_FLUSH record in a mapped-ram stream \
                     (QEMU: Unexpected RAM flags)",
                ));
            }
            let (offset, block, data, zero) = match rec {
                Record::Eos => {
                    if let Some(x) = &mut self.extract {
                        x.flush()?;
                    }
                    return Ok(());
                }
                Record::MultifdFlush => continue,
                Record::MemSize { .. } => return Err(self.bad("block list outside RAM START")),
                Record::Zero {
                    offset,
                    block,
                    fill: 0,
                } => (offset, block, None, true),
                // QEMU 7.2 may fill a "zero" page with another byte.
                Record::Zero {
                    offset,
                    block,
                    fill,
                } => (offset, block, Some(&FILLS[fill as usize][..]), true),
                Record::Page {
                    offset,
                    block,
                    data,
                } => (offset, block, Some(data), false),
            };
            let bi = match block {
                Some(name) => {
                    let i = self
                        .report
                        .blocks
                        .iter()
                        .position(|b| b.name == name)
                        .ok_or_else(|| {
                            self.bad(format!(
                                "page for RAM block {name:?}, not in the block list"
                            ))
                        })?;
                    self.last_block = Some(i);
                    i
                }
                None => self
                    .last_block
                    .ok_or_else(|| self.bad("CONTINUE page with no previous block"))?,
            };
            let b = &mut self.report.blocks[bi];
            if offset >= b.length {
                let (n, l) = (b.name.clone(), b.length);
                return Err(self.bad(format!(
                    "page offset {offset:#x} is outside RAM block {n:?} of {l:#x} bytes"
                )));
            }
            b.pages += 1;
            if zero {
                b.zero_pages += 1;
            }
            if let Some(x) = &mut self.extract {
                match data {
                    None => x.zero_page(bi, offset)?,
                    Some(d) => x.page(bi, offset, d)?,
                }
            }
        }
    }

    fn ram_start(&mut self) -> Result<(), AnalyzeError> {
        let total = match self.next("the RAM block list", ram::decode_record)? {
            Record::MemSize { total } => total,
            _ => return Err(self.bad("RAM START does not begin with the block list")),
        };
        let mut seen = 0u64;
        while seen < total {
            let e = self.next("the RAM block list", |b| {
                ram::decode_block_entry(b, &|_| false)
            })?;
            seen = seen
                .checked_add(e.used_length)
                .filter(|&s| s <= total)
                .ok_or_else(|| self.bad("RAM block lengths exceed the announced total"))?;
            if let Some(x) = &mut self.extract {
                x.add_block(&e.idstr, e.used_length)?;
            }
            self.report.blocks.push(BlockStats {
                name: e.idstr,
                length: e.used_length,
                ..Default::default()
            });
            if self.mapped {
                self.mapped_block(self.report.blocks.len() - 1)?;
            }
        }
        self.ram_body()
    }

    fn device(
        &mut self,
        start: usize,
        h: &stream::SectionHeader,
        kind: &str,
    ) -> Result<(), AnalyzeError> {
        let Some(desc) = &self.desc else {
            return Err(self.bad(format!(
                "device section {:?} cannot be delimited: the file has no VM description",
                h.idstr
            )));
        };
        let d = desc.device(&h.idstr, h.instance_id).ok_or_else(|| {
            self.bad(format!(
                "device {:?} instance {} is not in the VM description",
                h.idstr, h.instance_id
            ))
        })?;
        let n = vmstate::body_len(d, &self.buf[self.pos..]).map_err(|e| self.bad(e.to_string()))?;
        let body = &self.buf[self.pos..self.pos + n];
        let (fields, fields_error) = match self.intake.decode(d, body) {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(e)),
        };
        self.pos += n;
        let id = h.section_id;
        self.next("a section footer", |b| stream::decode_footer(b, id))?;
        self.push_item(Item {
            offset: start as u64,
            kind: kind.into(),
            section_id: Some(h.section_id),
            idstr: Some(h.idstr.clone()),
            instance_id: Some(h.instance_id),
            version_id: Some(h.version_id),
            size: (self.pos - start) as u64,
            fields,
            fields_error,
        });
        Ok(())
    }

    fn push_item(&mut self, it: Item) {
        if self.report.items.len() < MAX_ITEMS {
            self.report.items.push(it);
        } else {
            self.report.items_omitted += 1;
        }
    }

    fn walk(&mut self) -> Result<(), AnalyzeError> {
        if let Err(e) = self.next("the header", stream::decode_header) {
            return Err(match (self.pos, find_magic(self.buf)) {
                (0, Some(at)) if at > 0 => self.bad(format!(
                    "not a stream header here, but one starts at offset {at:#x} \
                     (a file:PATH,offset=N save, or a header of its own first): \
                     use --offset {at}"
                )),
                _ => e,
            });
        }
        if self.buf.get(self.pos) == Some(&wire::section::CONFIGURATION) {
            let c = self.next("the configuration section", stream::decode_configuration)?;
            self.report.machine = Some(c.machine);
            self.mapped = c
                .capabilities
                .iter()
                .any(|c| c == crate::compat::wire::mapped_ram::CAPABILITY);
            self.report.capabilities = c.capabilities;
        }
        loop {
            let start = self.pos;
            self.section.clear();
            self.progress.show(self.pos as u64, self.buf.len() as u64);
            let token = self.next("a section", stream::decode_token)?;
            let item = |kind: &str, id: Option<u32>, idstr: Option<String>| Item {
                offset: start as u64,
                kind: kind.into(),
                section_id: id,
                idstr,
                instance_id: None,
                version_id: None,
                size: 0,
                fields: None,
                fields_error: None,
            };
            match token {
                Token::Eof => {
                    self.push_item(item("EOF", None, None));
                    break;
                }
                Token::Start(h) if h.idstr == wire::ram::IDSTR => {
                    self.section = format!("{} (ram, START)", h.section_id);
                    self.ram_section = Some(h.section_id);
                    self.ram_start()?;
                    let id = h.section_id;
                    self.next("a section footer", |b| stream::decode_footer(b, id))?;
                    let mut it = item("START", Some(id), Some(h.idstr.clone()));
                    it.instance_id = Some(h.instance_id);
                    it.version_id = Some(h.version_id);
                    it.size = (self.pos - start) as u64;
                    self.push_item(it);
                }
                Token::Part(id) | Token::End(id) if Some(id) == self.ram_section => {
                    let kind = if self.buf[start] == wire::section::PART {
                        "PART"
                    } else {
                        "END"
                    };
                    self.section = format!("{id} (ram, {kind})");
                    self.ram_body()?;
                    self.next("a section footer", |b| stream::decode_footer(b, id))?;
                    let mut it = item(kind, Some(id), Some("ram".into()));
                    it.size = (self.pos - start) as u64;
                    self.push_item(it);
                }
                Token::Part(id) | Token::End(id) => {
                    return Err(self.bad(format!(
                        "PART/END for section {id}, which was never started"
                    )))
                }
                Token::Start(h) | Token::Full(h) => {
                    self.section = format!("{} ({})", h.section_id, h.idstr);
                    let kind = if self.buf[start] == wire::section::FULL {
                        "FULL"
                    } else {
                        "START"
                    };
                    self.device(start, &h, kind)?;
                }
                Token::Command(c) => {
                    let name = command_name(c.cmd);
                    let mut it = item(&format!("COMMAND {name}"), None, None);
                    if c.cmd == command::PACKAGED {
                        let len = u32::from_be_bytes([
                            c.payload[0],
                            c.payload[1],
                            c.payload[2],
                            c.payload[3],
                        ]) as usize;
                        let blob = self
                            .buf
                            .get(self.pos..self.pos + len)
                            .ok_or_else(|| self.bad("file ends inside the postcopy package"))?;
                        let pkg = postcopy::decode_package(blob).map_err(|e| self.wire(e))?;
                        let parts =
                            postcopy::split_full_sections(pkg.devices).map_err(|e| self.wire(e))?;
                        self.pos += len;
                        it.fields = Some(json!({
                            "device-sections": parts.iter().map(|(h, r)| json!({"idstr": h.idstr, "size": r.len()})).collect::<Vec<_>>(),
                        }));
                    }
                    it.size = (self.pos - start) as u64;
                    self.push_item(it);
                }
                Token::VmDescription(_) => return Err(self.bad("VM description before EOF")),
            }
        }
        // After EOF: the VM description, if any, and nothing else.
        if self.pos < self.buf.len() {
            match self.next("the VM description", stream::decode_token)? {
                Token::VmDescription(j) => self.report.vmdesc_size = Some(j.len() as u64),
                _ => return Err(self.bad("data after EOF that is not a VM description")),
            }
        }
        if self.pos != self.buf.len() {
            return Err(self.bad(format!(
                "{} bytes after the end of the stream",
                self.buf.len() - self.pos
            )));
        }
        self.report.complete = true;
        Ok(())
    }
}

fn command_name(c: u16) -> &'static str {
    match c {
        command::OPEN_RETURN_PATH => "OPEN_RETURN_PATH",
        command::PING => "PING",
        command::POSTCOPY_ADVISE => "POSTCOPY_ADVISE",
        command::POSTCOPY_LISTEN => "POSTCOPY_LISTEN",
        command::POSTCOPY_RUN => "POSTCOPY_RUN",
        command::POSTCOPY_RAM_DISCARD => "POSTCOPY_RAM_DISCARD",
        command::PACKAGED => "PACKAGED",
        command::ENABLE_COLO => "ENABLE_COLO",
        command::POSTCOPY_RESUME => "POSTCOPY_RESUME",
        command::RECV_BITMAP => "RECV_BITMAP",
        command::SWITCHOVER_START => "SWITCHOVER_START",
        _ => "unknown",
    }
}

/// Where the first stream header is, in the first MiB: only to suggest `--offset`.
fn find_magic(buf: &[u8]) -> Option<usize> {
    let mut magic = wire::FILE_MAGIC.to_be_bytes().to_vec();
    magic.extend_from_slice(&wire::FILE_VERSION.to_be_bytes());
    buf.get(..buf.len().min(1 << 20))?
        .windows(magic.len())
        .position(|w| w == magic)
}

/// Analyses the stream in `path`; with `extract`, writes each RAM block to a file there.
pub fn analyze(path: &Path, extract: Option<&Path>) -> Result<Report, AnalyzeError> {
    analyze_at(path, extract, 0)
}

/// [`analyze`] of a stream that starts at byte `offset` of the file (`file:PATH,offset=N`,
/// or a file with a header of its own first, as libvirt writes). Offsets in the report and
/// in mapped-ram headers are the file's.
pub fn analyze_at(
    path: &Path,
    extract: Option<&Path>,
    offset: u64,
) -> Result<Report, AnalyzeError> {
    let open_err = |source| AnalyzeError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let len = file.metadata().map_err(open_err)?.len() as usize;
    // The mapping's file stays open as long as the mapping; this one feeds copy_file_range.
    let src = file.try_clone().map_err(open_err)?;
    // An empty file cannot be mapped; it is simply not a stream.
    let map = if len == 0 {
        None
    } else {
        Some(
            vm_memory::mmap::MmapRegion::<()>::build(
                Some(vm_memory::FileOffset::new(file, 0)),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
            )
            .map_err(|e| open_err(std::io::Error::other(e.to_string())))?,
        )
    };
    let buf: &[u8] = match &map {
        // SAFETY: a private read-only mapping of `len` bytes that lives until the end of
        // this function. Like any mapped file read as a slice, it assumes nobody rewrites
        // the stream file while it is analysed (truncating it gives SIGBUS); a stream file
        // is written once, before it is analysed.
        Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr(), len) },
        None => &[],
    };
    if let Some(m) = &map {
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(m.as_ptr() as *mut _, len, libc::MADV_SEQUENTIAL) };
    }
    let extract = match extract {
        Some(dir) => Some(Extract::new(dir, Some(src))?),
        None => None,
    };
    analyze_buf(buf, extract, offset)
}

/// Analyses a stream held in memory (the fuzz targets' entry; `analyze` maps the file).
#[cfg(all(feature = "helper", any(test, feature = "fuzzing")))]
pub(crate) fn analyze_bytes(buf: &[u8]) -> Result<Report, AnalyzeError> {
    analyze_buf(buf, None, 0)
}

fn analyze_buf<'a>(
    buf: &'a [u8],
    extract: Option<Extract<'a>>,
    offset: u64,
) -> Result<Report, AnalyzeError> {
    let Some(start) = usize::try_from(offset).ok().filter(|&o| o <= buf.len()) else {
        return Err(AnalyzeError::Bad {
            offset,
            section: String::new(),
            msg: format!("--offset is past the end of the file ({} bytes)", buf.len()),
        });
    };
    let stream = &buf[start..];
    // A capture of a TLS channel: say what its clear-text records show.
    if crate::wire::tls::looks_like_tls(stream) {
        return Ok(Report {
            file_size: buf.len() as u64,
            stream_offset: offset,
            tls: Some(crate::wire::tls::scan(stream)),
            ..Default::default()
        });
    }
    let desc = vmstate::find_trailing_vmdesc(stream)
        .and_then(|(_, r)| VmDescription::parse(stream.get(r)?).ok());
    let mut w = Walker {
        buf,
        pos: start,
        report: Report {
            file_size: buf.len() as u64,
            stream_offset: offset,
            ..Default::default()
        },
        desc,
        ram_section: None,
        last_block: None,
        intake: DeviceIntake::default(),
        extract,
        mapped: false,
        mapped_regions: Vec::new(),
        section: String::new(),
        progress: Progress::new(buf.len() as u64),
    };
    let r = w.walk();
    w.progress.done();
    r?;
    Ok(w.report)
}
