//! The sending half: records sealed a batch at a time and sent with one writev.

use super::*;

/// The sending half.
pub(super) struct Tx {
    pub(super) enc: Box<dyn MessageEncrypter>,
    pub(super) seq: u64,
    /// Sealed records not sent yet, in order.
    pub(super) out: Vec<Vec<u8>>,
    pub(super) out_bytes: usize,
    /// One record's plaintext copied out of guest memory.
    pub(super) stage: Vec<u8>,
    /// A failed send leaves the stream cut mid-record: every later write fails with this.
    pub(super) broken: Option<String>,
    pub(super) closed: bool,
}

impl Tx {
    pub(super) fn seal(
        &mut self,
        s: &Session,
        typ: ContentType,
        data: OutboundChunks<'_>,
    ) -> io::Result<()> {
        if self.seq >= KEY_UPDATE_AFTER {
            self.key_update(s, false)?;
        }
        self.seal_one(s, typ, data)
    }

    pub(super) fn seal_one(
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
    pub(super) fn key_update(&mut self, s: &Session, request: bool) -> io::Result<()> {
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
    pub(super) fn flush(&mut self, s: &Session, io: &Io<'_>) -> io::Result<()> {
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
