//! The receiving half: ciphertext read in large chunks, records opened in place,
//! post-handshake messages and alerts handled.

use super::*;

#[derive(Debug)]
pub(super) enum RxState {
    Open,
    /// close_notify came (or the peer closed, where that is a plain end).
    Closed,
    /// A broken record or an alert: every later read fails with this.
    Failed(io::ErrorKind, String),
}

/// The receiving half: ciphertext read in large chunks into `buf`, records opened in place.
pub(super) struct Rx {
    pub(super) dec: Box<dyn MessageDecrypter>,
    pub(super) seq: u64,
    pub(super) buf: Vec<u8>,
    /// The first byte of ciphertext not opened yet.
    pub(super) start: usize,
    /// The end of what was read.
    pub(super) end: usize,
    /// Plaintext not handed out yet (inside `buf`, before `start`).
    pub(super) pt: Range<usize>,
    /// A post-handshake message split over records.
    pub(super) hs: Vec<u8>,
    pub(super) state: RxState,
}

impl Rx {
    pub(super) fn take(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.pt.len());
        out[..n].copy_from_slice(&self.buf[self.pt.start..self.pt.start + n]);
        self.pt.start += n;
        n
    }

    pub(super) fn fail(&mut self, s: &Session, kind: io::ErrorKind, what: String) -> io::Error {
        let m = format!("TLS on {}: {what}", s.chan);
        self.state = RxState::Failed(kind, m.clone());
        io::Error::new(kind, m)
    }

    /// Makes plaintext available; false at the end of the stream, or (not blocking) when no
    /// complete record has arrived.
    pub(super) fn fill(&mut self, s: &Session, io: &Io<'_>, block: bool) -> io::Result<bool> {
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
    pub(super) fn fill_buffered(&mut self, s: &Session) -> io::Result<bool> {
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

    pub(super) fn eof(&mut self, s: &Session) -> io::Result<bool> {
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
    pub(super) fn complete_record(&mut self, s: &Session) -> io::Result<Option<usize>> {
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
    pub(super) fn open(&mut self, s: &Session, len: usize) -> io::Result<()> {
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

    pub(super) fn alert(&mut self, s: &Session, at: Range<usize>) -> io::Result<()> {
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

    pub(super) fn handshake(&mut self, s: &Session, at: Range<usize>) -> io::Result<()> {
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
                    // For a later resumption only; a ticket rustls refuses costs nothing, and
                    // a PSK session never resumes.
                    match &mut *lock(&s.keys) {
                        Keys::Client(k) => {
                            let _ = k.handle_new_session_ticket(&msg[4..]);
                        }
                        Keys::Psk { client: true, .. } => {}
                        Keys::Server(_) | Keys::Psk { client: false, .. } => {
                            return Err(self.fail(
                                s,
                                io::ErrorKind::InvalidData,
                                "the client sent a session ticket".into(),
                            ));
                        }
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
pub(super) fn recv(io: &Io<'_>, buf: &mut [u8], block: bool) -> io::Result<Option<usize>> {
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
