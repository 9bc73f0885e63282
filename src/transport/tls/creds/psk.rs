//! `tls-creds-psk` (owner: control/creds): `keys.psk` read when the object is added and
//! checked as QEMU's `qcrypto_tls_creds_psk_load` checks it; the keys are looked up in it as
//! GnuTLS does (`username:hexkey` lines, the first line of a username wins).

use std::path::PathBuf;

use super::{cred_path, read_bounded, reason, CredsError, PSK_FILE};
use crate::transport::tls::Endpoint;

/// The longest key OpenSSL takes (its `PSK_MAX_PSK_LEN`), in bytes.
pub(crate) const MAX_KEY_LEN: usize = 512;
/// The username a client uses when the object names none, as QEMU.
const DEFAULT_USERNAME: &str = "qemu";

/// `tls-creds-psk`, with `keys.psk` as read when it was added. Never printed: this type
/// has no Debug.
pub(crate) struct PskCreds {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    pub(crate) endpoint: Endpoint,
    pub(crate) username: Option<String>,
    /// `keys.psk`: the server looks each client's username up in it; the client's own line
    /// was checked when the object was added.
    file: Vec<u8>,
}

/// What `object-add` gives for a `tls-creds-psk`.
pub(crate) struct PskOptions {
    pub(crate) id: String,
    pub(crate) dir: Option<PathBuf>,
    pub(crate) endpoint: Endpoint,
    pub(crate) username: Option<String>,
}

/// A server's look-up of a client's username.
pub(crate) enum PskLookup {
    Key(Vec<u8>),
    /// No line for that username.
    NoUser,
    /// Its key is not an even, non-zero number of hex digits, or is too long.
    BadKey,
}

impl PskCreds {
    /// Loads as QEMU's `qcrypto_tls_creds_psk_load`: the server needs `keys.psk` and no
    /// username; the client needs its username's line (default "qemu") with a hex key.
    pub(crate) fn load(o: PskOptions) -> Result<PskCreds, CredsError> {
        if o.endpoint == Endpoint::Server && o.username.is_some() {
            return Err(CredsError::PskServerUsername);
        }
        let dir = o.dir.ok_or(CredsError::NoDir)?;
        crate::sandbox::note_creds(&dir);
        let path = cred_path(&dir, PSK_FILE);
        if let Err(e) = std::fs::metadata(&path) {
            let reason = reason(&path, e);
            return Err(CredsError::Access { path, reason });
        }
        let file = read_bounded(&path).map_err(|reason| CredsError::PskRead {
            path: path.clone(),
            reason,
        })?;
        let creds = PskCreds {
            id: o.id,
            dir,
            endpoint: o.endpoint,
            username: o.username,
            file,
        };
        if creds.endpoint == Endpoint::Client {
            creds.client_key()?;
        }
        Ok(creds)
    }

    /// `DIR/keys.psk`, for messages.
    pub(crate) fn path(&self) -> String {
        cred_path(&self.dir, PSK_FILE)
    }

    /// The username a client sends (its identity).
    pub(crate) fn identity(&self) -> &str {
        self.username.as_deref().unwrap_or(DEFAULT_USERNAME)
    }

    /// The client's key: its username's line, with QEMU's errors.
    pub(crate) fn client_key(&self) -> Result<Vec<u8>, CredsError> {
        let user = self.identity();
        match self.lookup(user.as_bytes()) {
            PskLookup::Key(k) => Ok(k),
            PskLookup::NoUser => Err(CredsError::PskUser {
                user: user.to_string(),
                path: self.path(),
            }),
            PskLookup::BadKey => Err(CredsError::PskKey {
                user: user.to_string(),
                path: self.path(),
            }),
        }
    }

    /// The key of the username `user` (a server's look-up of a client's identity).
    pub(crate) fn lookup(&self, user: &[u8]) -> PskLookup {
        match psk_lookup(&self.file, user) {
            None => PskLookup::NoUser,
            Some(hex) => hex_key(hex).map_or(PskLookup::BadKey, PskLookup::Key),
        }
    }
}

/// The key of `user` in a `keys.psk` (`username:hexkey` lines): the first line that starts
/// with the name and a colon, as QEMU's `lookup_key`.
fn psk_lookup<'a>(content: &'a [u8], user: &[u8]) -> Option<&'a [u8]> {
    content.split(|&b| b == b'\n').find_map(|line| {
        line.strip_prefix(user)
            .and_then(|rest| rest.strip_prefix(b":"))
    })
}

/// What GnuTLS takes as a hex key (an even, non-zero number of hex digits), decoded; None
/// otherwise, or when OpenSSL could not take it.
fn hex_key(hex: &[u8]) -> Option<Vec<u8>> {
    if hex.is_empty() || hex.len() / 2 > MAX_KEY_LEN {
        return None;
    }
    decode_hex(hex)
}

/// Hex digits (either case) to bytes; None for an odd count or anything else.
pub(crate) fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    hex.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}
