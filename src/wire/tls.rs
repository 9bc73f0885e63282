//! TLS records as they cross a migration channel under TLS (RFC 8446 section 5): the record
//! header every channel's session reads, and the clear-text hellos at the start of a
//! session, which `analyze` reads from a capture to say which protocol and cipher a channel
//! used. Pure decoders over byte buffers; everything after the hellos is ciphertext.

use std::borrow::Cow;

/// `type(1) legacy_version(2) length(2)`.
pub const RECORD_HEADER_LEN: usize = 5;
/// The largest record body TLS 1.3 allows: 2^14 bytes of plaintext + 256 of expansion.
pub const MAX_RECORD_BODY: usize = (1 << 14) + 256;

pub mod content_type {
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
}

const CLIENT_HELLO: u8 = 1;
const SERVER_HELLO: u8 = 2;
const EXT_SERVER_NAME: u16 = 0;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsWireError {
    #[error("not a TLS record: content type {0} (a clear-text peer?)")]
    ContentType(u8),
    #[error("not a TLS record: legacy version {0:#06x}")]
    Version(u16),
    #[error("TLS record of {0} bytes, more than the {MAX_RECORD_BODY} TLS allows")]
    TooLong(usize),
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// A record's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub content_type: u8,
    pub version: u16,
    /// The body's length, checked against [`MAX_RECORD_BODY`].
    pub len: usize,
}

/// Decodes a record header; None until all 5 bytes are there. Refuses what no TLS peer
/// sends (unknown type, a version other than 0x0301-0x0303, an over-long body) before the
/// length sizes anything.
pub fn decode_record_header(b: &[u8]) -> Result<Option<RecordHeader>, TlsWireError> {
    let Some(h) = b.get(..RECORD_HEADER_LEN) else {
        // Refuse a clear-text peer as soon as its first byte says so.
        if let Some(&t) = b.first() {
            check_type(t)?;
        }
        return Ok(None);
    };
    check_type(h[0])?;
    let version = u16::from_be_bytes([h[1], h[2]]);
    if !(0x0301..=0x0303).contains(&version) {
        return Err(TlsWireError::Version(version));
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len > MAX_RECORD_BODY {
        return Err(TlsWireError::TooLong(len));
    }
    Ok(Some(RecordHeader {
        content_type: h[0],
        version,
        len,
    }))
}

fn check_type(t: u8) -> Result<(), TlsWireError> {
    if (content_type::CHANGE_CIPHER_SPEC..=content_type::APPLICATION_DATA).contains(&t) {
        Ok(())
    } else {
        Err(TlsWireError::ContentType(t))
    }
}

/// What a ClientHello offers or a ServerHello chose.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    pub server: bool,
    /// Cipher suites offered (client) or the one chosen (server).
    pub cipher_suites: Vec<u16>,
    /// `supported_versions`: offered (client) or chosen (server); empty: the legacy
    /// version only (TLS 1.2 or older).
    pub versions: Vec<u16>,
    pub legacy_version: u16,
    /// SNI (client).
    pub server_name: Option<String>,
}

impl Hello {
    /// The protocol the hello names: the chosen (or best offered) version.
    pub fn protocol(&self) -> u16 {
        self.versions
            .iter()
            .copied()
            .max()
            .unwrap_or(self.legacy_version)
    }
}

/// A byte reader that never reads past its slice.
struct Rd<'a>(&'a [u8], &'static str);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TlsWireError> {
        if self.0.len() < n {
            return Err(TlsWireError::Malformed(self.1));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, TlsWireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, TlsWireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], TlsWireError> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], TlsWireError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

fn pairs(b: &[u8]) -> impl Iterator<Item = u16> + '_ {
    b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
}

/// Decodes a ClientHello or ServerHello handshake message (its 4-byte handshake header
/// included); None for any other handshake message.
pub fn decode_hello(msg: &[u8]) -> Result<Option<Hello>, TlsWireError> {
    let mut r = Rd(msg, "handshake message");
    let kind = r.u8()?;
    if kind != CLIENT_HELLO && kind != SERVER_HELLO {
        return Ok(None);
    }
    let server = kind == SERVER_HELLO;
    r.1 = if server { "ServerHello" } else { "ClientHello" };
    let len = r.take(3)?;
    let len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
    let mut r = Rd(r.take(len)?, r.1);
    let mut h = Hello {
        server,
        legacy_version: r.u16()?,
        ..Hello::default()
    };
    r.take(32)?; // random
    r.vec8()?; // legacy_session_id
    if server {
        h.cipher_suites.push(r.u16()?);
        r.u8()?; // legacy_compression_method
    } else {
        h.cipher_suites = pairs(r.vec16()?).collect();
        r.vec8()?; // legacy_compression_methods
    }
    if r.0.is_empty() {
        return Ok(Some(h));
    }
    let mut exts = Rd(r.vec16()?, r.1);
    while !exts.0.is_empty() {
        let typ = exts.u16()?;
        let body = exts.vec16()?;
        let mut b = Rd(body, "extension");
        match typ {
            EXT_SUPPORTED_VERSIONS if server => h.versions = vec![b.u16()?],
            EXT_SUPPORTED_VERSIONS => h.versions = pairs(b.vec8()?).collect(),
            EXT_SERVER_NAME if !server && !body.is_empty() => {
                let mut list = Rd(b.vec16()?, "server_name");
                if list.u8()? == 0 {
                    h.server_name = Some(String::from_utf8_lossy(list.vec16()?).into_owned());
                }
            }
            _ => {}
        }
    }
    Ok(Some(h))
}

/// The name of a cipher suite (the TLS 1.3 ones; others by number).
pub fn suite_name(s: u16) -> Cow<'static, str> {
    Cow::Borrowed(match s {
        0x1301 => "TLS13_AES_128_GCM_SHA256",
        0x1302 => "TLS13_AES_256_GCM_SHA384",
        0x1303 => "TLS13_CHACHA20_POLY1305_SHA256",
        0x1304 => "TLS13_AES_128_CCM_SHA256",
        0x1305 => "TLS13_AES_128_CCM_8_SHA256",
        _ => return Cow::Owned(format!("{s:#06x}")),
    })
}

/// The name of a protocol version.
pub fn version_name(v: u16) -> Cow<'static, str> {
    Cow::Borrowed(match v {
        0x0304 => "TLSv1.3",
        0x0303 => "TLSv1.2",
        0x0302 => "TLSv1.1",
        0x0301 => "TLSv1.0",
        _ => return Cow::Owned(format!("{v:#06x}")),
    })
}

/// What one direction of a captured TLS channel shows without its keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capture {
    pub records: u64,
    pub hellos: Vec<Hello>,
    /// Encrypted records (application data, and everything after the hellos in TLS 1.3).
    pub encrypted_records: u64,
    pub encrypted_bytes: u64,
    /// Bytes after the last whole record (a capture cut short).
    pub trailing: u64,
    /// Where and why the records stopped making sense.
    pub error: Option<(u64, TlsWireError)>,
}

/// Walks the records of a capture of one direction of a TLS channel. Only the clear-text
/// handshake records are parsed (the hellos); a hello split over records is not followed.
pub fn scan(buf: &[u8]) -> Capture {
    let mut c = Capture::default();
    let mut pos = 0usize;
    while pos < buf.len() {
        let h = match decode_record_header(&buf[pos..]) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => {
                c.error = Some((pos as u64, e));
                return c;
            }
        };
        let body_at = pos + RECORD_HEADER_LEN;
        let Some(body) = buf.get(body_at..body_at + h.len) else {
            break;
        };
        c.records += 1;
        match h.content_type {
            content_type::HANDSHAKE if c.encrypted_records == 0 => match decode_hello(body) {
                Ok(Some(hello)) => c.hellos.push(hello),
                Ok(None) => {}
                Err(e) => {
                    c.error = Some((pos as u64, e));
                    return c;
                }
            },
            content_type::APPLICATION_DATA => {
                c.encrypted_records += 1;
                c.encrypted_bytes += h.len as u64;
            }
            _ => {}
        }
        pos = body_at + h.len;
    }
    c.trailing = (buf.len() - pos) as u64;
    c
}

/// Whether `buf` starts like a TLS session (a handshake record): what `analyze` checks
/// before reading a file as a QEMU stream.
pub fn looks_like_tls(buf: &[u8]) -> bool {
    buf.len() >= RECORD_HEADER_LEN
        && buf[0] == content_type::HANDSHAKE
        && matches!(decode_record_header(buf), Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(t: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![t, 3, 3];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        v.extend_from_slice(body);
        v
    }

    fn client_hello() -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[0xaa; 32]);
        b.push(0); // session id
        b.extend_from_slice(&[0, 4, 0x13, 0x02, 0x13, 0x01]);
        b.extend_from_slice(&[1, 0]);
        let mut exts = Vec::new();
        // supported_versions: 1.3, 1.2
        exts.extend_from_slice(&[0, 43, 0, 5, 4, 3, 4, 3, 3]);
        // server_name "dst.example"
        let name = b"dst.example";
        let mut sni = vec![0];
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut list = (sni.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&sni);
        exts.extend_from_slice(&[0, 0]);
        exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
        exts.extend_from_slice(&list);
        b.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        b.extend_from_slice(&exts);
        handshake(CLIENT_HELLO, &b)
    }

    fn server_hello() -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[0xbb; 32]);
        b.push(0);
        b.extend_from_slice(&[0x13, 0x02, 0]);
        b.extend_from_slice(&[0, 6, 0, 43, 0, 2, 3, 4]);
        handshake(SERVER_HELLO, &b)
    }

    #[test]
    fn headers_are_checked_before_their_length_is_used() {
        assert_eq!(decode_record_header(&[22, 3]), Ok(None));
        assert_eq!(
            decode_record_header(b"QEVM"),
            Err(TlsWireError::ContentType(b'Q'))
        );
        assert_eq!(
            decode_record_header(&[23, 3, 3, 0xff, 0xff]),
            Err(TlsWireError::TooLong(0xffff))
        );
        assert_eq!(
            decode_record_header(&[23, 9, 9, 0, 1]),
            Err(TlsWireError::Version(0x0909))
        );
        let h = decode_record_header(&[23, 3, 3, 0x41, 0x00])
            .unwrap()
            .unwrap();
        assert_eq!(h.len, MAX_RECORD_BODY);
    }

    #[test]
    fn a_capture_names_protocol_cipher_and_server() {
        let mut cap = record(content_type::HANDSHAKE, &client_hello());
        cap.extend(record(content_type::HANDSHAKE, &server_hello()));
        cap.extend(record(content_type::CHANGE_CIPHER_SPEC, &[1]));
        cap.extend(record(content_type::APPLICATION_DATA, &[0; 100]));
        cap.extend(record(content_type::APPLICATION_DATA, &[0; 50]));
        cap.extend_from_slice(&[23, 3, 3, 0, 9, 1]); // cut short
        assert!(looks_like_tls(&cap));
        let c = scan(&cap);
        assert_eq!(c.records, 5);
        assert_eq!((c.encrypted_records, c.encrypted_bytes), (2, 150));
        assert_eq!(c.trailing, 6);
        assert_eq!(c.error, None);
        let (ch, sh) = (&c.hellos[0], &c.hellos[1]);
        assert!(!ch.server && sh.server);
        assert_eq!(ch.cipher_suites, vec![0x1302, 0x1301]);
        assert_eq!(ch.server_name.as_deref(), Some("dst.example"));
        assert_eq!(version_name(sh.protocol()), "TLSv1.3");
        assert_eq!(suite_name(sh.cipher_suites[0]), "TLS13_AES_256_GCM_SHA384");
    }

    #[test]
    fn truncated_hellos_are_errors_not_panics() {
        let ch = client_hello();
        for cut in 0..ch.len() {
            // Every prefix, claimed as a whole message: an error or None, never a panic.
            let mut m = ch[..cut].to_vec();
            if m.len() >= 4 {
                let n = (m.len() - 4) as u32;
                m[1..4].copy_from_slice(&n.to_be_bytes()[1..]);
            }
            let _ = decode_hello(&m);
        }
        assert!(!looks_like_tls(b"QEVM\0\0\0\x03"));
        let c = scan(b"QEVM\0\0\0\x03");
        assert_eq!(c.error, Some((0, TlsWireError::ContentType(b'Q'))));
    }
}
