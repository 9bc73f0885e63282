//! The traffic keys of a TLS 1.3 session whose handshake rustls did not run (TLS-PSK, run
//! by OpenSSL; owner: transport TLS): the record key and IV of each direction from its
//! application traffic secret, and the secret of the next key after a KeyUpdate
//! (RFC 8446 7.2, 7.3), with the suite's HKDF from rustls.
//!
//! rustls keeps this schedule itself for the sessions it negotiated (its
//! `KernelConnection`); both kinds of session then seal and open records the same way.

use rustls::crypto::tls13::OkmBlock;
use rustls::{ConnectionTrafficSecrets, Tls13CipherSuite};

/// The current application traffic secret of each direction.
pub(super) struct Schedule {
    suite: &'static Tls13CipherSuite,
    tx: OkmBlock,
    rx: OkmBlock,
}

impl Schedule {
    /// From the `*_TRAFFIC_SECRET_0` of each direction (as long as the suite's hash).
    pub(super) fn new(
        suite: &'static Tls13CipherSuite,
        tx: &[u8],
        rx: &[u8],
    ) -> Result<Schedule, rustls::Error> {
        let len = suite.common.hash_provider.output_len();
        if tx.len() != len || rx.len() != len {
            return Err(rustls::Error::General(format!(
                "a traffic secret is not {len} bytes long"
            )));
        }
        Ok(Schedule {
            suite,
            tx: OkmBlock::new(tx),
            rx: OkmBlock::new(rx),
        })
    }

    /// The record key and IV of one direction now.
    pub(super) fn current(&self, tx: bool) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        traffic_keys(self.suite, if tx { &self.tx } else { &self.rx })
    }

    /// Moves one direction to its next secret (a KeyUpdate) and returns its key and IV.
    pub(super) fn update(&mut self, tx: bool) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        let secret = if tx { &mut self.tx } else { &mut self.rx };
        *secret = next_secret(self.suite, secret);
        self.current(tx)
    }
}

/// key = HKDF-Expand-Label(secret, "key", "", key_length), iv = ...("iv", "", 12): rustls's
/// own derivation (the one its handshakes use), as the suite's record cipher wants them.
pub(super) fn traffic_keys(
    suite: &'static Tls13CipherSuite,
    secret: &OkmBlock,
) -> Result<ConnectionTrafficSecrets, rustls::Error> {
    let expander = suite.hkdf_provider.expander_for_okm(secret);
    // rustls exports these two only under `internal` (not semver-stable; Cargo.lock pins
    // the version, and the RFC 8448 vectors in the tests check them): its AeadKey can be
    // made shorter than 32 bytes (AES-128) nowhere else.
    let key = rustls::internal::derive_traffic_key(expander.as_ref(), suite.aead_alg);
    let iv = rustls::internal::derive_traffic_iv(expander.as_ref());
    suite
        .aead_alg
        .extract_keys(key, iv)
        .map_err(|_| rustls::Error::General("the suite has no record cipher to use".into()))
}

/// application_traffic_secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd", "",
/// Hash.length) (RFC 8446 7.2).
pub(super) fn next_secret(suite: &'static Tls13CipherSuite, secret: &OkmBlock) -> OkmBlock {
    const LABEL: &[u8] = b"tls13 traffic upd";
    let expander = suite.hkdf_provider.expander_for_okm(secret);
    // The HkdfLabel struct: uint16 length, label<7..255>, context<0..255> (empty).
    let len = (expander.hash_len() as u16).to_be_bytes();
    expander.expand_block(&[&len, &[LABEL.len() as u8], LABEL, &[0]])
}
