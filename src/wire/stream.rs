//! Stream framing: header, configuration, section headers, footers, commands, EOF and the VM
//! description, as QEMU's `migration/savevm.c` writes them.
//!
//! Pure codecs over byte buffers. Decoders are incremental: they return `Ok(None)` when the
//! buffer does not yet hold a whole item (the caller reads more and calls again), or the item
//! and the number of bytes it took. Nothing here trusts a length it has not checked.

use crate::compat::wire::{self, section};
use byteorder::{BigEndian, ByteOrder};

/// A malformed or unsupported stream. The I/O layer adds the absolute stream offset.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a QEMU migration stream (magic {0:#010x}, expected 0x5145564d \"QEVM\")")]
    BadMagic(u32),
    #[error("unsupported stream version {0} (only 3 is supported)")]
    BadVersion(u32),
    #[error("unknown section type {0:#04x}")]
    UnknownSectionType(u8),
    #[error("unexpected section type {found:#04x} {context}")]
    UnexpectedSection { found: u8, context: &'static str },
    #[error("{what} is {len} bytes, more than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("unknown configuration subsection {0:?}")]
    UnknownSubsection(String),
    #[error("configuration capability {0:?} is not supported by the helper")]
    UnsupportedCapability(String),
    #[error("section footer for section {found}, expected {expected}")]
    FooterMismatch { expected: u32, found: u32 },
    #[error("expected a section footer (0x7e) for section {section_id}, found {found:#04x}")]
    MissingFooter { section_id: u32, found: u8 },
    #[error("command {cmd} has length {len}, expected {expected}")]
    BadCommandLength { cmd: u16, len: u16, expected: u16 },
    #[error("unknown RAM flags {flags:#x} at offset {offset:#x}")]
    UnknownRamFlags { flags: u64, offset: u64 },
    #[error("RAM record {what} is not supported by the helper")]
    UnsupportedRam { what: &'static str },
    #[error("{0}")]
    Invalid(String),
}

/// Result of an incremental decode: `None` means "need more bytes".
pub type Decoded<T> = Result<Option<(T, usize)>, WireError>;

/// Largest VM description the helper accepts (QEMU's for big machines are a few MB; the
/// destination scans back this far for one, see `vmstate::find_trailing_vmdesc`).
pub const MAX_VMDESC_LEN: u32 = 16 << 20;
/// Largest PACKAGED blob (QEMU caps it at 1 GiB; device state is far smaller in practice).
pub const MAX_PACKAGED_LEN: u32 = 1 << 30;

/// A cursor over a byte slice whose reads return `None` past the end.
#[derive(Debug, Clone, Copy)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn peek_u8(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    pub fn be16(&mut self) -> Option<u16> {
        self.bytes(2).map(BigEndian::read_u16)
    }
    pub fn be32(&mut self) -> Option<u32> {
        self.bytes(4).map(BigEndian::read_u32)
    }
    pub fn be64(&mut self) -> Option<u64> {
        self.bytes(8).map(BigEndian::read_u64)
    }
    /// u8 length + string, as QEMU writes idstrs and block names.
    pub fn str8(&mut self, what: &'static str) -> Result<Option<&'a str>, WireError> {
        let Some(len) = self.u8() else {
            return Ok(None);
        };
        let Some(b) = self.bytes(len as usize) else {
            return Ok(None);
        };
        std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| WireError::BadUtf8 { what })
    }
}

/// Appends u8 length + string; names longer than 255 bytes cannot be encoded.
pub fn put_str8(out: &mut Vec<u8>, s: &str) -> Result<(), WireError> {
    let len = u8::try_from(s.len()).map_err(|_| WireError::TooLong {
        what: "name",
        len: s.len() as u64,
        max: 255,
    })?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

pub fn put_be16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub fn put_be32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub fn put_be64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Length of the stream header (magic + version).
pub const HEADER_LEN: usize = 8;

pub fn encode_header(out: &mut Vec<u8>) {
    put_be32(out, wire::FILE_MAGIC);
    put_be32(out, wire::FILE_VERSION);
}

pub fn decode_header(buf: &[u8]) -> Decoded<()> {
    let mut c = Cursor::new(buf);
    let (Some(magic), Some(version)) = (c.be32(), c.be32()) else {
        return Ok(None);
    };
    if magic != wire::FILE_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if version != wire::FILE_VERSION {
        return Err(WireError::BadVersion(version));
    }
    Ok(Some(((), HEADER_LEN)))
}

/// The configuration section (`vmstate_configuration`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Configuration {
    pub machine: String,
    /// From `configuration/target-page-bits` when sent (never on x86).
    pub target_page_bits: Option<u32>,
    /// From `configuration/capabilities`.
    pub capabilities: Vec<String>,
    /// From `configuration/uuid`.
    pub uuid: Option<[u8; 16]>,
}

/// Encodes the configuration section as QEMU does for x86 with no validated capability.
pub fn encode_configuration(out: &mut Vec<u8>, machine: &str) -> Result<(), WireError> {
    encode_configuration_with(out, machine, &[])
}

/// Encodes the configuration section with the validated capabilities that are on (QEMU
/// lists `x-ignore-shared` and `mapped-ram`, in that order, in a `configuration/
/// capabilities` subsection; none: no subsection), as `configuration_pre_save` does.
pub fn encode_configuration_with(
    out: &mut Vec<u8>,
    machine: &str,
    capabilities: &[&str],
) -> Result<(), WireError> {
    let len = u32::try_from(machine.len()).map_err(|_| WireError::TooLong {
        what: "machine name",
        len: machine.len() as u64,
        max: 255,
    })?;
    out.push(section::CONFIGURATION);
    put_be32(out, len);
    out.extend_from_slice(machine.as_bytes());
    if !capabilities.is_empty() {
        out.push(section::SUBSECTION);
        put_str8(out, "configuration/capabilities")?;
        put_be32(out, 1);
        put_be32(out, capabilities.len() as u32);
        for c in capabilities {
            put_str8(out, c)?;
        }
    }
    Ok(())
}

/// Decodes the configuration section, starting at its 0x07 byte.
pub fn decode_configuration(buf: &[u8]) -> Decoded<Configuration> {
    let mut c = Cursor::new(buf);
    match c.u8() {
        None => return Ok(None),
        Some(section::CONFIGURATION) => {}
        Some(b) => {
            return Err(WireError::UnexpectedSection {
                found: b,
                context: "where the configuration section belongs",
            })
        }
    }
    let Some(len) = c.be32() else { return Ok(None) };
    if len > 255 {
        return Err(WireError::TooLong {
            what: "machine name",
            len: len as u64,
            max: 255,
        });
    }
    let Some(name) = c.bytes(len as usize) else {
        return Ok(None);
    };
    let machine = std::str::from_utf8(name)
        .map_err(|_| WireError::BadUtf8 {
            what: "machine name",
        })?
        .to_string();
    let mut conf = Configuration {
        machine,
        ..Default::default()
    };
    // Subsections follow as long as the next byte is 0x05, which is never a top-level type.
    loop {
        match c.peek_u8() {
            None => return Ok(None),
            Some(section::SUBSECTION) => {}
            Some(_) => return Ok(Some((conf, c.pos()))),
        }
        c.u8();
        let Some(name) = c.str8("subsection name")? else {
            return Ok(None);
        };
        let Some(_version) = c.be32() else {
            return Ok(None);
        };
        match name {
            "configuration/target-page-bits" => {
                let Some(bits) = c.be32() else {
                    return Ok(None);
                };
                conf.target_page_bits = Some(bits);
            }
            "configuration/capabilities" => {
                let Some(count) = c.be32() else {
                    return Ok(None);
                };
                if count > 64 {
                    return Err(WireError::TooLong {
                        what: "capability list",
                        len: count as u64,
                        max: 64,
                    });
                }
                for _ in 0..count {
                    let Some(cap) = c.str8("capability name")? else {
                        return Ok(None);
                    };
                    conf.capabilities.push(cap.to_string());
                }
            }
            "configuration/uuid" => {
                let Some(uuid) = c.bytes(16) else {
                    return Ok(None);
                };
                let mut u = [0u8; 16];
                u.copy_from_slice(uuid);
                conf.uuid = Some(u);
            }
            other => return Err(WireError::UnknownSubsection(other.to_string())),
        }
    }
}

/// START/PART/END/FULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    Start,
    Part,
    End,
    Full,
}

impl SectionKind {
    pub fn byte(self) -> u8 {
        match self {
            SectionKind::Start => section::START,
            SectionKind::Part => section::PART,
            SectionKind::End => section::END,
            SectionKind::Full => section::FULL,
        }
    }
}

/// The header of a START or FULL section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionHeader {
    pub section_id: u32,
    pub idstr: String,
    pub instance_id: u32,
    pub version_id: u32,
}

pub fn encode_section_start(
    out: &mut Vec<u8>,
    kind: SectionKind,
    h: &SectionHeader,
) -> Result<(), WireError> {
    debug_assert!(matches!(kind, SectionKind::Start | SectionKind::Full));
    out.push(kind.byte());
    put_be32(out, h.section_id);
    put_str8(out, &h.idstr)?;
    put_be32(out, h.instance_id);
    put_be32(out, h.version_id);
    Ok(())
}

pub fn encode_section_part(out: &mut Vec<u8>, kind: SectionKind, section_id: u32) {
    debug_assert!(matches!(kind, SectionKind::Part | SectionKind::End));
    out.push(kind.byte());
    put_be32(out, section_id);
}

pub fn encode_footer(out: &mut Vec<u8>, section_id: u32) {
    out.push(section::FOOTER);
    put_be32(out, section_id);
}

/// Checks a footer for `section_id` at the start of `buf`.
pub fn decode_footer(buf: &[u8], section_id: u32) -> Decoded<()> {
    let mut c = Cursor::new(buf);
    match c.u8() {
        None => Ok(None),
        Some(section::FOOTER) => match c.be32() {
            None => Ok(None),
            Some(id) if id == section_id => Ok(Some(((), 5))),
            Some(found) => Err(WireError::FooterMismatch {
                expected: section_id,
                found,
            }),
        },
        Some(found) => Err(WireError::MissingFooter { section_id, found }),
    }
}

/// A `QEMU_VM_COMMAND`. For PACKAGED, `payload` is the be32 length only; the nested
/// stream follows it and is not part of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command<'a> {
    pub cmd: u16,
    pub payload: &'a [u8],
}

pub fn encode_command(out: &mut Vec<u8>, cmd: u16, payload: &[u8]) -> Result<(), WireError> {
    let len = u16::try_from(payload.len()).map_err(|_| WireError::TooLong {
        what: "command payload",
        len: payload.len() as u64,
        max: u16::MAX as u64,
    })?;
    out.push(section::COMMAND);
    put_be16(out, cmd);
    put_be16(out, len);
    out.extend_from_slice(payload);
    Ok(())
}

/// The expected payload length of each command whose length is fixed.
fn command_len(cmd: u16) -> Option<u16> {
    use wire::command::*;
    match cmd {
        OPEN_RETURN_PATH | POSTCOPY_LISTEN | POSTCOPY_RUN | ENABLE_COLO | POSTCOPY_RESUME
        | SWITCHOVER_START => Some(0),
        PING | PACKAGED => Some(4),
        _ => None,
    }
}

/// One top-level item of the stream. Section bodies are not part of it: after `Start`,
/// `Part`, `End` or `Full` the caller decodes the body and then the footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token<'a> {
    Eof,
    Start(SectionHeader),
    Full(SectionHeader),
    Part(u32),
    End(u32),
    Command(Command<'a>),
    /// The JSON after `QEMU_VM_VMDESCRIPTION`.
    VmDescription(&'a [u8]),
}

/// Decodes the next top-level token.
pub fn decode_token(buf: &[u8]) -> Decoded<Token<'_>> {
    let mut c = Cursor::new(buf);
    let Some(ty) = c.u8() else { return Ok(None) };
    let token = match ty {
        section::EOF => Token::Eof,
        section::START | section::FULL => {
            let Some(section_id) = c.be32() else {
                return Ok(None);
            };
            let Some(idstr) = c.str8("section idstr")? else {
                return Ok(None);
            };
            let (Some(instance_id), Some(version_id)) = (c.be32(), c.be32()) else {
                return Ok(None);
            };
            let h = SectionHeader {
                section_id,
                idstr: idstr.to_string(),
                instance_id,
                version_id,
            };
            if ty == section::START {
                Token::Start(h)
            } else {
                Token::Full(h)
            }
        }
        section::PART | section::END => {
            let Some(id) = c.be32() else { return Ok(None) };
            if ty == section::PART {
                Token::Part(id)
            } else {
                Token::End(id)
            }
        }
        section::COMMAND => {
            let (Some(cmd), Some(len)) = (c.be16(), c.be16()) else {
                return Ok(None);
            };
            if let Some(expected) = command_len(cmd) {
                if len != expected {
                    return Err(WireError::BadCommandLength { cmd, len, expected });
                }
            }
            let Some(payload) = c.bytes(len as usize) else {
                return Ok(None);
            };
            Token::Command(Command { cmd, payload })
        }
        section::VMDESCRIPTION => {
            let Some(len) = c.be32() else { return Ok(None) };
            if len > MAX_VMDESC_LEN {
                return Err(WireError::TooLong {
                    what: "VM description",
                    len: len as u64,
                    max: MAX_VMDESC_LEN as u64,
                });
            }
            let Some(json) = c.bytes(len as usize) else {
                return Ok(None);
            };
            Token::VmDescription(json)
        }
        section::CONFIGURATION => {
            return Err(WireError::UnexpectedSection {
                found: ty,
                context: "after the start of the stream",
            })
        }
        section::SUBSECTION | section::FOOTER => {
            return Err(WireError::UnexpectedSection {
                found: ty,
                context: "at the top level",
            })
        }
        other => return Err(WireError::UnknownSectionType(other)),
    };
    Ok(Some((token, c.pos())))
}

pub fn encode_eof(out: &mut Vec<u8>) {
    out.push(section::EOF);
}

pub fn encode_vmdesc(out: &mut Vec<u8>, json: &[u8]) -> Result<(), WireError> {
    let len = u32::try_from(json.len())
        .ok()
        .filter(|&l| l <= MAX_VMDESC_LEN)
        .ok_or(WireError::TooLong {
            what: "VM description",
            len: json.len() as u64,
            max: MAX_VMDESC_LEN as u64,
        })?;
    out.push(section::VMDESCRIPTION);
    put_be32(out, len);
    out.extend_from_slice(json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::wire::command;

    #[test]
    fn header_roundtrip_and_errors() {
        let mut b = Vec::new();
        encode_header(&mut b);
        assert_eq!(decode_header(&b), Ok(Some(((), 8))));
        assert_eq!(decode_header(&b[..5]), Ok(None));
        assert_eq!(
            decode_header(&[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 2]),
            Err(WireError::BadVersion(2))
        );
        assert!(matches!(
            decode_header(b"ELF\x7f\0\0\0\x03"),
            Err(WireError::BadMagic(_))
        ));
    }

    #[test]
    fn configuration_as_qemu_writes_it() {
        // From none-16M-pattern-qemu10.0.bin: 07 00000004 "none", then START.
        let buf = b"\x07\x00\x00\x00\x04none\x01";
        let (conf, n) = decode_configuration(buf).unwrap().unwrap();
        assert_eq!(conf.machine, "none");
        assert_eq!(n, 9);
        let mut out = Vec::new();
        encode_configuration(&mut out, "none").unwrap();
        assert_eq!(&out[..], &buf[..9]);
        // Without the next byte the decoder cannot know whether subsections follow.
        assert_eq!(decode_configuration(&buf[..9]), Ok(None));
    }

    /// What QEMU 10.0.2 wrote with mapped-ram on (`-M none`), byte for byte.
    #[test]
    fn configuration_with_mapped_ram_as_qemu_writes_it() {
        let mut out = Vec::new();
        encode_configuration_with(&mut out, "none", &["mapped-ram"]).unwrap();
        let qemu = b"\x07\0\0\0\x04none\x05\x1aconfiguration/capabilities\0\0\0\x01\0\0\0\x01\
                     \x0amapped-ram";
        assert_eq!(out, qemu);
        // The decoder knows the subsections have ended when the next section starts.
        out.push(section::START);
        let (c, n) = decode_configuration(&out).unwrap().unwrap();
        assert_eq!(n, out.len() - 1);
        assert_eq!(c.capabilities, vec!["mapped-ram".to_string()]);
    }

    #[test]
    fn configuration_subsections() {
        let mut b = Vec::new();
        encode_configuration(&mut b, "pc-q35-10.0").unwrap();
        b.push(section::SUBSECTION);
        put_str8(&mut b, "configuration/capabilities").unwrap();
        put_be32(&mut b, 1);
        put_be32(&mut b, 1);
        put_str8(&mut b, "x-ignore-shared").unwrap();
        b.push(section::SUBSECTION);
        put_str8(&mut b, "configuration/uuid").unwrap();
        put_be32(&mut b, 1);
        b.extend_from_slice(&[7u8; 16]);
        b.push(section::START);
        let (conf, n) = decode_configuration(&b).unwrap().unwrap();
        assert_eq!(n, b.len() - 1);
        assert_eq!(conf.capabilities, vec!["x-ignore-shared".to_string()]);
        assert_eq!(conf.uuid, Some([7u8; 16]));
        for cut in 0..b.len() - 1 {
            assert_eq!(decode_configuration(&b[..cut]), Ok(None), "cut at {cut}");
        }
        let mut bad = Vec::new();
        encode_configuration(&mut bad, "none").unwrap();
        bad.push(section::SUBSECTION);
        put_str8(&mut bad, "configuration/what").unwrap();
        put_be32(&mut bad, 1);
        assert!(matches!(
            decode_configuration(&bad),
            Err(WireError::UnknownSubsection(_))
        ));
    }

    #[test]
    fn sections_and_footers() {
        let h = SectionHeader {
            section_id: 1,
            idstr: "ram".into(),
            instance_id: 0,
            version_id: 4,
        };
        let mut b = Vec::new();
        encode_section_start(&mut b, SectionKind::Start, &h).unwrap();
        assert_eq!(
            b,
            b"\x01\x00\x00\x00\x01\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
        );
        let (t, n) = decode_token(&b).unwrap().unwrap();
        assert_eq!(t, Token::Start(h));
        assert_eq!(n, b.len());
        for cut in 0..b.len() {
            assert_eq!(decode_token(&b[..cut]), Ok(None));
        }
        let mut f = Vec::new();
        encode_footer(&mut f, 1);
        assert_eq!(decode_footer(&f, 1), Ok(Some(((), 5))));
        assert_eq!(
            decode_footer(&f, 2),
            Err(WireError::FooterMismatch {
                expected: 2,
                found: 1
            })
        );
        assert!(matches!(
            decode_footer(&[0x02], 1),
            Err(WireError::MissingFooter { .. })
        ));
        assert_eq!(
            decode_token(&[0x42]),
            Err(WireError::UnknownSectionType(0x42))
        );
    }

    #[test]
    fn commands() {
        let mut b = Vec::new();
        encode_command(&mut b, command::PING, &5u32.to_be_bytes()).unwrap();
        let (t, n) = decode_token(&b).unwrap().unwrap();
        assert_eq!(n, 9);
        assert_eq!(
            t,
            Token::Command(Command {
                cmd: command::PING,
                payload: &[0, 0, 0, 5]
            })
        );
        // A PING of the wrong length is refused, as QEMU does.
        let bad = [section::COMMAND, 0, 2, 0, 3, 0, 0, 0];
        assert!(matches!(
            decode_token(&bad),
            Err(WireError::BadCommandLength { .. })
        ));
    }

    #[test]
    fn vmdesc_limits() {
        let mut b = vec![section::VMDESCRIPTION];
        put_be32(&mut b, MAX_VMDESC_LEN + 1);
        assert!(matches!(decode_token(&b), Err(WireError::TooLong { .. })));
        let mut ok = Vec::new();
        encode_vmdesc(&mut ok, b"{}").unwrap();
        assert_eq!(
            decode_token(&ok).unwrap().unwrap().0,
            Token::VmDescription(b"{}")
        );
    }
}
