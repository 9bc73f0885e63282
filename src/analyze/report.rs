//! What `analyze` found, and its two renderings: one JSON object (`--json`) and the text
//! report.

use std::io::Write;

use serde_json::{json, Value};

/// Per-block RAM figures.
#[derive(Debug, Default, Clone)]
pub struct BlockStats {
    pub name: String,
    pub length: u64,
    pub pages: u64,
    pub zero_pages: u64,
    /// A mapped-ram file's header for the block (then `pages` is every page of the
    /// block and `zero_pages` those whose bit is clear, holes in the file).
    pub mapped: Option<MappedStats>,
}

/// A block's mapped-ram header, checked, and its bitmap's count.
#[derive(Debug, Default, Clone)]
pub struct MappedStats {
    pub version: u32,
    pub page_size: u64,
    pub bitmap_offset: u64,
    pub pages_offset: u64,
    /// Pages whose bit is set: their data is in the file.
    pub data_pages: u64,
}

/// One top-level item of the stream.
#[derive(Debug, Clone)]
pub struct Item {
    pub offset: u64,
    pub kind: String,
    pub section_id: Option<u32>,
    pub idstr: Option<String>,
    pub instance_id: Option<u32>,
    pub version_id: Option<u32>,
    pub size: u64,
    pub fields: Option<Value>,
    /// Why a described device section has no `fields` (e.g. too large to decode).
    pub fields_error: Option<String>,
}

/// Most items a report lists: a file of tiny sections must not make the report grow
/// with the file (a few hundred bytes each). The rest are counted in `items_omitted`.
pub const MAX_ITEMS: usize = 1 << 17;

#[derive(Debug, Default)]
pub struct Report {
    pub file_size: u64,
    /// Where the stream starts in the file (`--offset`; `file:PATH,offset=N`).
    pub stream_offset: u64,
    pub machine: Option<String>,
    pub capabilities: Vec<String>,
    pub items: Vec<Item>,
    pub blocks: Vec<BlockStats>,
    pub vmdesc_size: Option<u64>,
    pub complete: bool,
    /// Items after the first [`MAX_ITEMS`], not listed.
    pub items_omitted: u64,
    /// The file is a capture of a TLS channel, not a clear stream: what its clear-text
    /// records say (the migration stream inside needs the session's keys).
    pub tls: Option<crate::wire::tls::Capture>,
}

impl Report {
    pub fn to_json(&self) -> Value {
        if let Some(c) = &self.tls {
            return json!({"file-size": self.file_size, "tls": tls_json(c)});
        }
        json!({
            "file-size": self.file_size,
            "stream-offset": self.stream_offset,
            "machine": self.machine,
            "capabilities": self.capabilities,
            "ram": self.blocks.iter().map(|b| {
                let mut v = json!({
                    "block": b.name, "length": b.length, "pages": b.pages,
                    "zero-pages": b.zero_pages, "normal-pages": b.pages - b.zero_pages,
                });
                if let Some(m) = &b.mapped {
                    v["mapped-ram"] = json!({
                        "version": m.version, "page-size": m.page_size,
                        "bitmap-offset": m.bitmap_offset, "pages-offset": m.pages_offset,
                        "pages-with-data": m.data_pages, "zero-pages": b.zero_pages,
                    });
                }
                v
            }).collect::<Vec<_>>(),
            "sections": self.items.iter().map(|i| {
                let mut v = json!({"offset": i.offset, "type": i.kind, "size": i.size});
                if let Some(x) = i.section_id { v["section-id"] = json!(x); }
                if let Some(x) = &i.idstr { v["idstr"] = json!(x); }
                if let Some(x) = i.instance_id { v["instance-id"] = json!(x); }
                if let Some(x) = i.version_id { v["version-id"] = json!(x); }
                if let Some(x) = &i.fields { v["fields"] = x.clone(); }
                if let Some(x) = &i.fields_error { v["fields-error"] = json!(x); }
                v
            }).collect::<Vec<_>>(),
            "sections-omitted": self.items_omitted,
            "vm-description-size": self.vmdesc_size,
        })
    }

    pub fn print(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "file size: {} bytes", self.file_size)?;
        if let Some(c) = &self.tls {
            return print_tls(c, out);
        }
        if self.stream_offset > 0 {
            writeln!(out, "stream starts at offset {:#x}", self.stream_offset)?;
        }
        writeln!(out, "header: QEVM version 3")?;
        match &self.machine {
            Some(m) => writeln!(
                out,
                "configuration: machine {m:?}{}",
                if self.capabilities.is_empty() {
                    String::new()
                } else {
                    format!(", capabilities {:?}", self.capabilities)
                }
            )?,
            None => writeln!(out, "configuration: none")?,
        }
        writeln!(out, "RAM blocks:")?;
        for b in &self.blocks {
            if let Some(m) = &b.mapped {
                writeln!(
                    out,
                    "  {:<32} {:>12} bytes  {:>9} pages in the file ({} with data, {} zero: holes)",
                    b.name, b.length, b.pages, m.data_pages, b.zero_pages
                )?;
                writeln!(
                    out,
                    "      mapped-ram header: version {}, page size {}, bitmap at {:#x}, pages at {:#x}",
                    m.version, m.page_size, m.bitmap_offset, m.pages_offset
                )?;
                continue;
            }
            writeln!(
                out,
                "  {:<32} {:>12} bytes  {:>9} pages sent ({} zero, {} normal)",
                b.name,
                b.length,
                b.pages,
                b.zero_pages,
                b.pages - b.zero_pages
            )?;
        }
        // RAM PARTs are many: summarise them; list everything else.
        let parts = self.items.iter().filter(|i| i.kind == "PART").count();
        let part_bytes: u64 = self
            .items
            .iter()
            .filter(|i| i.kind == "PART")
            .map(|i| i.size)
            .sum();
        writeln!(out, "sections:")?;
        for i in self.items.iter().filter(|i| i.kind != "PART") {
            write!(
                out,
                "  {:#012x} {:<24} {:>10} bytes",
                i.offset, i.kind, i.size
            )?;
            if let (Some(id), Some(n)) = (i.section_id, &i.idstr) {
                write!(out, "  id {id} {n:?}")?;
                if let (Some(inst), Some(v)) = (i.instance_id, i.version_id) {
                    write!(out, " instance {inst} version {v}")?;
                }
            }
            writeln!(out)?;
            if let Some(f) = &i.fields {
                let s = f.to_string();
                if s.len() > 200 {
                    writeln!(
                        out,
                        "      fields: {}...",
                        &s[..s
                            .char_indices()
                            .take_while(|(i, _)| *i < 200)
                            .last()
                            .map_or(0, |(i, _)| i)]
                    )?;
                } else {
                    writeln!(out, "      fields: {s}")?;
                }
            }
            if let Some(e) = &i.fields_error {
                writeln!(out, "      fields not decoded: {e}")?;
            }
        }
        writeln!(out, "  ({parts} RAM PART sections, {part_bytes} bytes)")?;
        if self.items_omitted > 0 {
            writeln!(
                out,
                "  ({} more sections not listed: the report lists at most {MAX_ITEMS})",
                self.items_omitted
            )?;
        }
        match self.vmdesc_size {
            Some(n) => writeln!(out, "VM description: {n} bytes")?,
            None => writeln!(out, "VM description: none")?,
        }
        Ok(())
    }
}

fn tls_json(c: &crate::wire::tls::Capture) -> Value {
    use crate::wire::tls::{suite_name, version_name};
    json!({
        "records": c.records,
        "hellos": c.hellos.iter().map(|h| json!({
            "kind": if h.server { "ServerHello" } else { "ClientHello" },
            "protocol": version_name(h.protocol()),
            "versions": h.versions.iter().map(|&v| version_name(v)).collect::<Vec<_>>(),
            "cipher-suites": h.cipher_suites.iter().map(|&s| suite_name(s)).collect::<Vec<_>>(),
            "server-name": h.server_name,
        })).collect::<Vec<_>>(),
        "encrypted-records": c.encrypted_records,
        "encrypted-bytes": c.encrypted_bytes,
        "trailing-bytes": c.trailing,
        "error": c.error.as_ref().map(|(at, e)| format!("at offset {at:#x}: {e}")),
    })
}

fn print_tls(c: &crate::wire::tls::Capture, out: &mut dyn Write) -> std::io::Result<()> {
    use crate::wire::tls::{suite_name, version_name};
    writeln!(
        out,
        "TLS: a capture of one direction of a TLS channel ({} records); the migration \
         stream inside is encrypted",
        c.records
    )?;
    for h in &c.hellos {
        let suites: Vec<_> = h.cipher_suites.iter().map(|&s| suite_name(s)).collect();
        if h.server {
            writeln!(
                out,
                "  ServerHello: protocol {}, cipher {}",
                version_name(h.protocol()),
                suites.join(", ")
            )?;
        } else {
            let versions: Vec<_> = h.versions.iter().map(|&v| version_name(v)).collect();
            writeln!(
                out,
                "  ClientHello: versions offered {}, ciphers offered {}{}",
                versions.join(", "),
                suites.join(", "),
                h.server_name
                    .as_deref()
                    .map(|n| format!(", server name {n:?}"))
                    .unwrap_or_default()
            )?;
        }
    }
    if !c.hellos.iter().any(|h| h.server) {
        writeln!(
            out,
            "  (no ServerHello: the cipher is chosen in the other direction's first record)"
        )?;
    }
    writeln!(
        out,
        "  encrypted: {} records, {} bytes",
        c.encrypted_records, c.encrypted_bytes
    )?;
    if c.trailing > 0 {
        writeln!(out, "  {} bytes after the last whole record", c.trailing)?;
    }
    if let Some((at, e)) = &c.error {
        writeln!(out, "  records stop making sense at offset {at:#x}: {e}")?;
    }
    Ok(())
}
