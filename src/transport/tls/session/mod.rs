//! An established TLS session split into its sending and receiving halves (owner:
//! transport TLS). [`crate::transport::Channel`] routes its I/O through it.
//!
//! rustls (x509) or OpenSSL (PSK) ran the handshake; the key schedule is rustls's (a
//! [`KernelConnection`]) or, after OpenSSL, the helper's ([`Schedule`]). The halves seal and
//! open TLS 1.3 records themselves with rustls's record ciphers for the suite. Each half has
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

mod rx;
mod tx;

use self::rx::{Rx, RxState};
use self::tx::Tx;
use super::schedule::Schedule;
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

/// The key schedule of one side of the session: rustls's when it ran the handshake (x509),
/// else the helper's own (TLS-PSK, whose handshake OpenSSL ran).
pub(super) enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
    /// `client`: this end is the client (a server's session tickets are then ignored).
    Psk {
        schedule: Schedule,
        client: bool,
    },
}

impl Keys {
    fn update(&mut self, tx: bool) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        let r = match (self, tx) {
            (Keys::Client(k), true) => k.update_tx_secret(),
            (Keys::Client(k), false) => k.update_rx_secret(),
            (Keys::Server(k), true) => k.update_tx_secret(),
            (Keys::Server(k), false) => k.update_rx_secret(),
            (Keys::Psk { schedule, .. }, tx) => return schedule.update(tx),
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
