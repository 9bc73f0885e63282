//! An established TLS session split into its sending and receiving halves (owner:
//! transport TLS). [`crate::transport::Channel`] routes its I/O through it.
//!
//! rustls ran the handshake and keeps the key schedule (a [`KernelConnection`]); the halves
//! seal and open TLS 1.3 records themselves with the suite's record ciphers. Each half has
//! its own lock and no path holds both, so a return-path reader never waits on a page
//! writer. The key schedule has a third lock, taken briefly by either half on a key update.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

use rustls::client::ClientConnectionData;
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{AlertDescription, ConnectionTrafficSecrets, ContentType, ProtocolVersion};

use super::TlsInfo;
use crate::memory::page::IoVecs;
use crate::transport::IoTimer;

/// Plaintext per record: TLS's maximum fragment.
const MAX_FRAGMENT: usize = 1 << 14;
/// The largest ciphertext a record may carry (RFC 8446 5.2: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
const HEADER: usize = 5;
/// Ciphertext read per syscall at most: large reads keep the syscall count low.
const RX_BUF: usize = 256 << 10;
/// Sealed records are sent with one writev once this much is queued.
const TX_BATCH: usize = 256 << 10;
/// A post-handshake message (a session ticket, a key update) larger than this is refused.
const MAX_HS_MESSAGE: usize = 1 << 16;
/// Records sealed under one key before the sender updates it: well under AES-GCM's
/// confidentiality limit (2^24.5 records), so a long migration never reaches it.
pub(super) const KEY_UPDATE_AFTER: u64 = 1 << 23;
/// TLS 1.3 handshake message types seen after the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// rustls's key schedule for one side of the session.
pub(super) enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn update(&mut self, tx: bool) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        let r = match (self, tx) {
            (Keys::Client(k), true) => k.update_tx_secret(),
            (Keys::Client(k), false) => k.update_rx_secret(),
            (Keys::Server(k), true) => k.update_tx_secret(),
            (Keys::Server(k), false) => k.update_rx_secret(),
        };
        r.map(|(_, s)| s)
    }
}

/// The fd and the timeout record a channel's I/O goes through.
pub(crate) struct Io<'a> {
    pub(crate) fd: BorrowedFd<'a>,
    pub(crate) timer: &'a IoTimer,
}

/// The two record halves of one TLS session, shared by every handle of a channel (the
/// return path's clone too).
pub(crate) struct Session {
    pub(crate) info: TlsInfo,
    chan: String,
    suite: &'static rustls::Tls13CipherSuite,
    keys: Mutex<Keys>,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    /// The peer asked for a key update in return: the sending half sends its own before
    /// its next record (RFC 8446 4.6.3 allows no later).
    update_tx: AtomicBool,
    /// EOF without close_notify is an error (else a plain end of stream).
    strict_eof: AtomicBool,
}

/// What the handshake leaves for the session.
pub(super) struct Start {
    pub(super) info: TlsInfo,
    pub(super) chan: String,
    pub(super) suite: &'static rustls::Tls13CipherSuite,
    pub(super) keys: Keys,
    pub(super) tx: (u64, ConnectionTrafficSecrets),
    pub(super) rx: (u64, ConnectionTrafficSecrets),
    /// Application data rustls already decrypted during the handshake.
    pub(super) plaintext: Vec<u8>,
    /// Bytes read past the handshake: the start of the next record(s).
    pub(super) ciphertext: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a half cannot leave it half-updated in a way later I/O trusts:
    // its `broken` / `failed` state is set before anything that can fail.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn key_iv(
    s: ConnectionTrafficSecrets,
) -> Option<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv)> {
    match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Some((key, iv)),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

fn no_cipher() -> io::Error {
    io::Error::other("the negotiated cipher suite has no record cipher for user-space TLS")
}

impl Session {
    pub(super) fn new(s: Start) -> io::Result<Session> {
        let (k, iv) = key_iv(s.tx.1).ok_or_else(no_cipher)?;
        let enc = s.suite.aead_alg.encrypter(k, iv);
        let (k, iv) = key_iv(s.rx.1).ok_or_else(no_cipher)?;
        let dec = s.suite.aead_alg.decrypter(k, iv);
        let p = s.plaintext.len();
        let c = s.ciphertext.len();
        let mut buf = vec![0u8; RX_BUF.max(p + c + HEADER + MAX_CIPHERTEXT)];
        buf[..p].copy_from_slice(&s.plaintext);
        buf[p..p + c].copy_from_slice(&s.ciphertext);
        Ok(Session {
            info: s.info,
            chan: s.chan,
            suite: s.suite,
            keys: Mutex::new(s.keys),
            tx: Mutex::new(Tx {
                enc,
                seq: s.tx.0,
                out: Vec::new(),
                out_bytes: 0,
                stage: vec![0u8; MAX_FRAGMENT],
                broken: None,
                closed: false,
            }),
            rx: Mutex::new(Rx {
                dec,
                seq: s.rx.0,
                buf,
                start: p,
                end: p + c,
                pt: 0..p,
                hs: Vec::new(),
                state: RxState::Open,
            }),
            update_tx: AtomicBool::new(false),
            strict_eof: AtomicBool::new(false),
        })
    }

    /// Whether an EOF without close_notify is an error (multifd toward QEMU >= 10.0).
    pub(crate) fn set_strict_eof(&self, strict: bool) {
        self.strict_eof.store(strict, Ordering::Relaxed);
    }

    /// Reads plaintext into `buf`; 0 at the end of the stream.
    pub(crate) fn read(&self, io: &Io<'_>, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        if !rx.fill(self, io, true)? {
            return Ok(0);
        }
        let mut n = rx.take(buf);
        // A peer that sends many small records (QEMU's GnuTLS seals each iovec of a write
        // on its own: a page header, then the page) would otherwise cost a call per record:
        // open the ones already read, as long as they fit.
        while n < buf.len() && rx.fill_buffered(self)? {
            n += rx.take(&mut buf[n..]);
        }
        Ok(n)
    }

    /// Reads only plaintext of records that have already arrived (0: none yet).
    pub(crate) fn read_ready(&self, io: &Io<'_>, buf: &mut [u8]) -> io::Result<usize> {
        // Another handle blocked in a read holds the half: nothing has arrived for us.
        let mut rx = match self.rx.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(0),
        };
        if buf.is_empty() || !rx.fill(self, io, false)? {
            return Ok(0);
        }
        Ok(rx.take(buf))
    }

    /// Fills all of `bufs` (guest pages) with plaintext; UnexpectedEof when the stream ends
    /// first.
    pub(crate) fn read_exact_iovecs(&self, io: &Io<'_>, bufs: &mut IoVecs<'_>) -> io::Result<()> {
        let mut rx = lock(&self.rx);
        while !bufs.is_empty() {
            if !rx.fill(self, io, true)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let Rx { buf, pt, .. } = &mut *rx;
            let n = bufs.fill_from(&buf[pt.clone()])?;
            pt.start += n;
        }
        Ok(())
    }

    /// Seals and sends all of `bufs`.
    pub(crate) fn write_vectored(&self, io: &Io<'_>, bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        let refs: Vec<&[u8]> = bufs
            .iter()
            .map(|b| &b[..])
            .filter(|b| !b.is_empty())
            .collect();
        if refs.is_empty() {
            return Ok(());
        }
        let mut tx = self.tx_ready(io)?;
        let mut rest = OutboundChunks::new(&refs);
        while !rest.is_empty() {
            let (now, later) = rest.split_at(MAX_FRAGMENT);
            tx.seal(self, ContentType::ApplicationData, now)?;
            rest = later;
            if tx.out_bytes >= TX_BATCH {
                tx.flush(self, io)?;
            }
        }
        tx.flush(self, io)
    }

    /// Seals and sends all of `bufs` (own bytes and guest pages), copying them into the
    /// record buffer a record at a time.
    pub(crate) fn write_iovecs(&self, io: &Io<'_>, bufs: &mut IoVecs<'_>) -> io::Result<()> {
        let mut tx = self.tx_ready(io)?;
        while !bufs.is_empty() {
            let mut stage = std::mem::take(&mut tx.stage);
            let n = bufs.copy_out(&mut stage);
            let r = tx.seal(
                self,
                ContentType::ApplicationData,
                OutboundChunks::Single(&stage[..n]),
            );
            tx.stage = stage;
            r?;
            if tx.out_bytes >= TX_BATCH {
                tx.flush(self, io)?;
            }
        }
        tx.flush(self, io)
    }

    /// Sends close_notify: the peer reads the end of the stream (once).
    pub(crate) fn close_notify(&self, io: &Io<'_>) -> io::Result<()> {
        let mut tx = self.tx_ready(io)?;
        if tx.closed {
            return Ok(());
        }
        tx.seal(self, ContentType::Alert, OutboundChunks::Single(&[1, 0]))?;
        tx.closed = true;
        tx.flush(self, io)
    }

    /// Updates the sending key and asks the peer to update its own (TLS 1.3 KeyUpdate with
    /// update_requested).
    #[cfg(test)]
    pub(crate) fn request_key_update(&self, io: &Io<'_>) -> io::Result<()> {
        let mut tx = self.tx_ready(io)?;
        tx.key_update(self, true)?;
        tx.flush(self, io)
    }

    /// Moves the sending sequence number close to the point where the key is updated.
    #[cfg(test)]
    pub(crate) fn skip_tx_records(&self, n: u64) {
        lock(&self.tx).seq += n;
    }

    /// Moves the receiving sequence number on (in step with a peer's [`Session::skip_tx_records`]).
    #[cfg(test)]
    pub(crate) fn skip_rx_records(&self, n: u64) {
        lock(&self.rx).seq += n;
    }

    /// The receiving sequence number (records opened under the current key).
    #[cfg(test)]
    pub(crate) fn rx_seq(&self) -> u64 {
        lock(&self.rx).seq
    }

    /// The sending half, after the key update the peer asked for, if any.
    fn tx_ready(&self, io: &Io<'_>) -> io::Result<MutexGuard<'_, Tx>> {
        let mut tx = lock(&self.tx);
        if let Some(m) = &tx.broken {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, m.clone()));
        }
        if tx.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("TLS on {}: write after close_notify", self.chan),
            ));
        }
        if self.update_tx.swap(false, Ordering::AcqRel) {
            tx.key_update(self, false)?;
            tx.flush(self, io)?;
        }
        Ok(tx)
    }

    fn new_secret(
        &self,
        tx: bool,
    ) -> io::Result<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv)> {
        let s = lock(&self.keys).update(tx).map_err(|e| {
            io::Error::other(format!("TLS on {}: key update failed: {e}", self.chan))
        })?;
        key_iv(s).ok_or_else(no_cipher)
    }
}

/// The sending half.
struct Tx {
    enc: Box<dyn MessageEncrypter>,
    seq: u64,
    /// Sealed records not sent yet, in order.
    out: Vec<Vec<u8>>,
    out_bytes: usize,
    /// One record's plaintext copied out of guest memory.
    stage: Vec<u8>,
    /// A failed send leaves the stream cut mid-record: every later write fails with this.
    broken: Option<String>,
    closed: bool,
}

impl Tx {
    fn seal(&mut self, s: &Session, typ: ContentType, data: OutboundChunks<'_>) -> io::Result<()> {
        if self.seq >= KEY_UPDATE_AFTER {
            self.key_update(s, false)?;
        }
        self.seal_one(s, typ, data)
    }

    fn seal_one(
        &mut self,
        s: &Session,
        typ: ContentType,
        data: OutboundChunks<'_>,
    ) -> io::Result<()> {
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: data,
        };
        let rec = self.enc.encrypt(msg, self.seq).map_err(|e| {
            let m = format!("TLS on {}: cannot seal a record: {e}", s.chan);
            self.broken = Some(m.clone());
            io::Error::other(m)
        })?;
        self.seq += 1;
        let v = rec.encode();
        self.out_bytes += v.len();
        self.out.push(v);
        Ok(())
    }

    /// Sends a KeyUpdate under the current key, then switches to the next one.
    fn key_update(&mut self, s: &Session, request: bool) -> io::Result<()> {
        let msg = [KEY_UPDATE, 0, 0, 1, u8::from(request)];
        self.seal_one(s, ContentType::Handshake, OutboundChunks::Single(&msg))?;
        let (k, iv) = s
            .new_secret(true)
            .inspect_err(|e| self.broken = Some(e.to_string()))?;
        self.enc = s.suite.aead_alg.encrypter(k, iv);
        self.seq = 0;
        Ok(())
    }

    /// Sends the queued records with as few writev calls as it can.
    fn flush(&mut self, s: &Session, io: &Io<'_>) -> io::Result<()> {
        let mut slices: Vec<io::IoSlice<'_>> =
            self.out.iter().map(|v| io::IoSlice::new(v)).collect();
        let mut bufs = &mut slices[..];
        let r = loop {
            if bufs.is_empty() {
                break Ok(());
            }
            let n = bufs.len().min(IoVecs::MAX_PER_CALL);
            match nix::sys::uio::writev(io.fd, &bufs[..n]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => break Err(io.timer.error("could not send")),
                Err(e) => break Err(io::Error::from(e)),
            }
        };
        drop(slices);
        self.out.clear();
        self.out_bytes = 0;
        if let Err(e) = &r {
            self.broken = Some(format!("TLS on {}: the stream broke: {e}", s.chan));
        }
        r
    }
}

#[derive(Debug)]
enum RxState {
    Open,
    /// close_notify came (or the peer closed, where that is a plain end).
    Closed,
    /// A broken record or an alert: every later read fails with this.
    Failed(io::ErrorKind, String),
}

/// The receiving half: ciphertext read in large chunks into `buf`, records opened in place.
struct Rx {
    dec: Box<dyn MessageDecrypter>,
    seq: u64,
    buf: Vec<u8>,
    /// The first byte of ciphertext not opened yet.
    start: usize,
    /// The end of what was read.
    end: usize,
    /// Plaintext not handed out yet (inside `buf`, before `start`).
    pt: Range<usize>,
    /// A post-handshake message split over records.
    hs: Vec<u8>,
    state: RxState,
}

impl Rx {
    fn take(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.pt.len());
        out[..n].copy_from_slice(&self.buf[self.pt.start..self.pt.start + n]);
        self.pt.start += n;
        n
    }

    fn fail(&mut self, s: &Session, kind: io::ErrorKind, what: String) -> io::Error {
        let m = format!("TLS on {}: {what}", s.chan);
        self.state = RxState::Failed(kind, m.clone());
        io::Error::new(kind, m)
    }

    /// Makes plaintext available; false at the end of the stream, or (not blocking) when no
    /// complete record has arrived.
    fn fill(&mut self, s: &Session, io: &Io<'_>, block: bool) -> io::Result<bool> {
        loop {
            if !self.pt.is_empty() {
                return Ok(true);
            }
            match &self.state {
                RxState::Open => {}
                RxState::Closed => return Ok(false),
                RxState::Failed(k, m) => return Err(io::Error::new(*k, m.clone())),
            }
            if let Some(len) = self.complete_record(s)? {
                self.open(s, len)?;
                continue;
            }
            // What is left is less than one record: moving it to the front is cheap and
            // lets the read fill the whole buffer.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match recv(io, &mut self.buf[self.end..], block)? {
                None => return Ok(false),
                Some(0) => return self.eof(s),
                Some(n) => self.end += n,
            }
        }
    }

    /// Makes plaintext available from records already read, without any I/O; false when
    /// no complete data record is buffered (or the stream ended or failed: the next
    /// [`Rx::fill`] says so).
    fn fill_buffered(&mut self, s: &Session) -> io::Result<bool> {
        while self.pt.is_empty() {
            if !matches!(self.state, RxState::Open) {
                return Ok(false);
            }
            // A failure is kept in `state` and reported by the next read, after the
            // plaintext already handed out.
            match self.complete_record(s) {
                Ok(Some(len)) if self.open(s, len).is_ok() => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    fn eof(&mut self, s: &Session) -> io::Result<bool> {
        if self.start != self.end {
            let e = io::ErrorKind::UnexpectedEof;
            return Err(self.fail(
                s,
                e,
                "the peer closed the connection in the middle of a TLS record".into(),
            ));
        }
        if s.strict_eof.load(Ordering::Relaxed) {
            let e = io::ErrorKind::UnexpectedEof;
            return Err(self.fail(
                s,
                e,
                "the peer closed the TLS session without close_notify (premature termination)"
                    .into(),
            ));
        }
        self.state = RxState::Closed;
        Ok(false)
    }

    /// The length of the record at `start` once all of it has arrived. Its header is checked
    /// first: a hostile length never sizes anything.
    fn complete_record(&mut self, s: &Session) -> io::Result<Option<usize>> {
        let have = self.end - self.start;
        let bad = io::ErrorKind::InvalidData;
        // The one record-header decoder (shared with analyze), then what TLS 1.3 allows
        // after the handshake.
        let h = match crate::wire::tls::decode_record_header(&self.buf[self.start..self.end]) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.fail(s, bad, format!("{e} (a corrupted stream?)"))),
        };
        let (typ, version, len) = (h.content_type, h.version, h.len);
        if typ != u8::from(ContentType::ApplicationData) {
            return Err(self.fail(s, bad, format!("the peer sent a record of content type {typ} where TLS 1.3 sends only encrypted records (a corrupted stream?)")));
        }
        if version != 0x0303 {
            return Err(self.fail(s, bad, format!("the peer sent a record with version {version:#06x}, not TLS 1.3's 0x0303 (a corrupted stream?)")));
        }
        if len == 0 || len > MAX_CIPHERTEXT {
            return Err(self.fail(
                s,
                bad,
                format!("the peer sent a record of {len} bytes (TLS allows 1 to {MAX_CIPHERTEXT})"),
            ));
        }
        Ok((have >= HEADER + len).then_some(len))
    }

    /// Opens the record of `len` ciphertext bytes at `start`, in place.
    fn open(&mut self, s: &Session, len: usize) -> io::Result<()> {
        let body = self.start + HEADER;
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut self.buf[body..body + len],
        );
        let opened = self
            .dec
            .decrypt(msg, self.seq)
            .map(|p| (p.typ, p.payload.len()));
        let (typ, n) = match opened {
            Ok(x) => x,
            Err(rustls::Error::DecryptError) => {
                return Err(self.fail(
                    s,
                    io::ErrorKind::InvalidData,
                    "bad record MAC: a record does not decrypt (corrupted or forged data)".into(),
                ));
            }
            Err(e) => {
                return Err(self.fail(s, io::ErrorKind::InvalidData, format!("bad record: {e}")))
            }
        };
        self.seq += 1;
        self.start = body + len;
        let plain = body..body + n;
        match typ {
            ContentType::ApplicationData => self.pt = plain,
            ContentType::Alert => self.alert(s, plain)?,
            ContentType::Handshake => self.handshake(s, plain)?,
            t => {
                return Err(self.fail(
                    s,
                    io::ErrorKind::InvalidData,
                    format!("the peer sent an unexpected record of type {t:?}"),
                ));
            }
        }
        Ok(())
    }

    fn alert(&mut self, s: &Session, at: Range<usize>) -> io::Result<()> {
        let a = &self.buf[at];
        if a.len() != 2 {
            return Err(self.fail(
                s,
                io::ErrorKind::InvalidData,
                "the peer sent a malformed TLS alert".into(),
            ));
        }
        let desc = AlertDescription::from(a[1]);
        match desc {
            AlertDescription::CloseNotify => {
                self.state = RxState::Closed;
                Ok(())
            }
            // A warning that precedes close_notify (RFC 8446 6.1).
            AlertDescription::UserCanceled => Ok(()),
            d => Err(self.fail(
                s,
                io::ErrorKind::ConnectionAborted,
                format!("the peer sent the TLS alert {d:?}"),
            )),
        }
    }

    fn handshake(&mut self, s: &Session, at: Range<usize>) -> io::Result<()> {
        if self.hs.len() + at.len() > MAX_HS_MESSAGE + 4 {
            return Err(self.fail(
                s,
                io::ErrorKind::InvalidData,
                "the peer sent an oversized post-handshake message".into(),
            ));
        }
        let Rx { hs, buf, .. } = self;
        hs.extend_from_slice(&buf[at]);
        while self.hs.len() >= 4 {
            let h = &self.hs;
            let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
            if len > MAX_HS_MESSAGE {
                return Err(self.fail(
                    s,
                    io::ErrorKind::InvalidData,
                    format!("the peer sent a post-handshake message of {len} bytes"),
                ));
            }
            if self.hs.len() < 4 + len {
                break;
            }
            let msg: Vec<u8> = self.hs.drain(..4 + len).collect();
            match msg[0] {
                NEW_SESSION_TICKET => {
                    // For a later resumption only; a ticket rustls refuses costs nothing.
                    if let Keys::Client(k) = &mut *lock(&s.keys) {
                        let _ = k.handle_new_session_ticket(&msg[4..]);
                    } else {
                        return Err(self.fail(
                            s,
                            io::ErrorKind::InvalidData,
                            "the client sent a session ticket".into(),
                        ));
                    }
                }
                KEY_UPDATE => {
                    // The new key starts with the next record: nothing may follow in this one.
                    if len != 1 || msg[4] > 1 || !self.hs.is_empty() {
                        return Err(self.fail(
                            s,
                            io::ErrorKind::InvalidData,
                            "the peer sent a malformed KeyUpdate".into(),
                        ));
                    }
                    let (k, iv) = s
                        .new_secret(false)
                        .map_err(|e| self.fail(s, io::ErrorKind::Other, e.to_string()))?;
                    self.dec = s.suite.aead_alg.decrypter(k, iv);
                    self.seq = 0;
                    if msg[4] == 1 {
                        s.update_tx.store(true, Ordering::Release);
                    }
                }
                t => {
                    return Err(self.fail(
                        s,
                        io::ErrorKind::InvalidData,
                        format!("the peer sent an unexpected post-handshake message (type {t})"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One read of ciphertext: Some(0) at EOF, None when not blocking and nothing is there.
fn recv(io: &Io<'_>, buf: &mut [u8], block: bool) -> io::Result<Option<usize>> {
    let fd = io.fd.as_raw_fd();
    loop {
        let r = if block {
            nix::unistd::read(fd, buf)
        } else {
            nix::sys::socket::recv(fd, buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
        };
        match r {
            Ok(n) => return Ok(Some(n)),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) if !block => return Ok(None),
            Err(nix::errno::Errno::EAGAIN) => return Err(io.timer.error("no data")),
            Err(e) => return Err(e.into()),
        }
    }
}
