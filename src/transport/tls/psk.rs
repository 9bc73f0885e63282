//! TLS-PSK (`tls-creds-psk`), as QEMU 10.0's GnuTLS does it (owner: transport TLS): TLS 1.3
//! with an external pre-shared key (binder hash SHA-256, psk_dhe_ke key exchange); the
//! client sends its username as the identity, the server looks it up in its `keys.psk`.
//!
//! rustls has no external PSKs, so OpenSSL runs this handshake, and only it: over the
//! handshake's non-blocking [`Wire`] through an in-memory pipe (OpenSSL never touches the
//! socket, and with read-ahead off it consumes nothing past its last handshake record,
//! which stays for the session). Its application traffic secrets (taken from the key log
//! callback, never logged) then go to the same record layer as a rustls handshake's
//! ([`Session`]), with the helper's [`Schedule`] for key updates. The server sends no
//! session tickets, so both directions start at sequence number 0.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslRef,
    SslSessionCacheMode, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::X509VerifyResult;
use rustls::crypto::tls13::OkmBlock;

use super::creds::{decode_hex, CredsError, PskCreds, PskLookup};
use super::handshake::attach;
use super::reason::{self, PskFacts};
use super::schedule::Schedule;
use super::session::{Keys, Start};
use super::wire::{check_socket, linger, Wire, FIRST_BUF, MAX_HANDSHAKE_INPUT};
use super::{Endpoint, TlsError, TlsInfo};
use crate::transport::{CancelToken, Channel};

/// The TLS 1.3 suites whose hash is the PSK's (SHA-256), AES-GCM first (AES-NI); the
/// server picks by its own order. QEMU's GnuTLS takes either.
const SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";
/// The longest username sent: OpenSSL's callback gets a buffer of `PSK_MAX_IDENTITY_LEN`
/// (256) bytes, the NUL included.
const MAX_IDENTITY_LEN: usize = 255;

/// The source's side: the username and key of `tls-creds-psk` (endpoint client).
pub(crate) struct PskClient {
    ctx: SslContext,
    identity: String,
    file: String,
    pub(crate) creds_id: String,
}

/// The destination's side: every username of `keys.psk` (endpoint server).
pub(crate) struct PskServer {
    ctx: SslContext,
    /// `tls-authz`: the username the client must use.
    authz: Option<String>,
    file: String,
    pub(crate) creds_id: String,
}

fn context_error(creds: &PskCreds, e: openssl::error::ErrorStack) -> CredsError {
    CredsError::Config {
        id: creds.id.clone(),
        reason: format!("OpenSSL: {e}"),
    }
}

impl PskClient {
    pub(crate) fn new(creds: &PskCreds) -> Result<PskClient, CredsError> {
        let key = creds.client_key()?;
        let identity = creds.identity().to_string();
        if identity.len() > MAX_IDENTITY_LEN || identity.contains('\0') {
            return Err(CredsError::Config {
                id: creds.id.clone(),
                reason: format!(
                    "the username must be at most {MAX_IDENTITY_LEN} bytes, without NUL"
                ),
            });
        }
        let mut b = context().map_err(|e| context_error(creds, e))?;
        let id = identity.clone();
        b.set_psk_client_callback(move |_, _hint, id_out, key_out| {
            // Room was checked above (OpenSSL gives 256 and creds::psk::MAX_KEY_LEN bytes).
            if id.len() >= id_out.len() || key.len() > key_out.len() {
                return Ok(0);
            }
            id_out[..id.len()].copy_from_slice(id.as_bytes());
            id_out[id.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        // A server that answers with a certificate does not use TLS-PSK: no trust anchor is
        // loaded, so verifying it fails the handshake (and says why, see `reason`).
        b.set_verify(SslVerifyMode::PEER);
        Ok(PskClient {
            ctx: b.build(),
            identity,
            file: creds.path(),
            creds_id: creds.id.clone(),
        })
    }
}

impl PskServer {
    pub(crate) fn new(creds: &Arc<PskCreds>, authz: Option<String>) -> Result<Self, CredsError> {
        let mut b = context().map_err(|e| context_error(creds, e))?;
        let table = creds.clone();
        b.set_psk_server_callback(move |ssl, identity, key_out| {
            let identity = identity.unwrap_or_default();
            let found = table.lookup(identity);
            with_capture(ssl, |c| {
                c.identity = Some(printable(identity));
                c.lookup = match &found {
                    PskLookup::Key(_) => None,
                    PskLookup::NoUser => Some(reason::Lookup::NoUser),
                    PskLookup::BadKey => Some(reason::Lookup::BadKey),
                };
            });
            // 0: no key for that identity (OpenSSL then fails, having no certificate).
            match found {
                PskLookup::Key(k) if k.len() <= key_out.len() => {
                    key_out[..k.len()].copy_from_slice(&k);
                    Ok(k.len())
                }
                _ => Ok(0),
            }
        });
        b.set_num_tickets(0).map_err(|e| context_error(creds, e))?;
        Ok(PskServer {
            ctx: b.build(),
            authz,
            file: creds.path(),
            creds_id: creds.id.clone(),
        })
    }
}

/// A client's username as it goes into messages, logs and the `tls-authz` comparison:
/// control characters escaped, so that a hostile one cannot forge log lines.
pub(super) fn printable(name: &[u8]) -> String {
    let mut out = String::new();
    for c in String::from_utf8_lossy(name).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// What both ends configure: TLS 1.3 only, the SHA-256 suites, no resumption, no
/// read-ahead, and the key log that hands the traffic secrets over.
fn context() -> Result<SslContextBuilder, openssl::error::ErrorStack> {
    let mut b = SslContextBuilder::new(SslMethod::tls())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_ciphersuites(SUITES)?;
    b.set_options(SslOptions::CIPHER_SERVER_PREFERENCE | SslOptions::NO_TICKET);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_read_ahead(false);
    b.set_keylog_callback(keylog);
    Ok(b)
}

/// What the callbacks of one handshake saw.
#[derive(Default)]
struct Capture {
    client_secret: Option<OkmBlock>,
    server_secret: Option<OkmBlock>,
    /// Server: the username the client sent.
    identity: Option<String>,
    /// Server: why that username has no usable key.
    lookup: Option<reason::Lookup>,
}

/// The slot of a handshake's [`Capture`] in its `SSL`.
fn capture_index() -> Result<Index<Ssl, Mutex<Capture>>, openssl::error::ErrorStack> {
    static INDEX: OnceLock<Index<Ssl, Mutex<Capture>>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    // Two threads may both make one: the loser's slot stays unused.
    let i = Ssl::new_ex_index()?;
    Ok(*INDEX.get_or_init(|| i))
}

fn with_capture<T>(ssl: &SslRef, f: impl FnOnce(&mut Capture) -> T) -> Option<T> {
    let idx = capture_index().ok()?;
    let m = ssl.ex_data(idx)?;
    Some(f(&mut m.lock().unwrap_or_else(PoisonError::into_inner)))
}

/// OpenSSL's key log line `LABEL CLIENT_RANDOM SECRET` (hex): the two application traffic
/// secrets are kept, nothing is printed.
fn keylog(ssl: &SslRef, line: &str) {
    let mut parts = line.split_ascii_whitespace();
    let (Some(label), Some(_random), Some(secret)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let client = match label {
        "CLIENT_TRAFFIC_SECRET_0" => true,
        "SERVER_TRAFFIC_SECRET_0" => false,
        _ => return,
    };
    let Some(bytes) = decode_hex(secret.as_bytes()).filter(|b| b.len() <= OkmBlock::MAX_LEN) else {
        return;
    };
    let okm = OkmBlock::new(&bytes);
    with_capture(ssl, |c| {
        *(if client {
            &mut c.client_secret
        } else {
            &mut c.server_secret
        }) = Some(okm)
    });
}

/// OpenSSL's transport: what was read from the socket and not consumed yet, and what it
/// wants sent. A read with nothing there is WANT_READ.
#[derive(Default)]
struct Pipe {
    input: Vec<u8>,
    at: usize,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.input[self.at..];
        if rest.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The source's handshake.
pub(super) fn client(
    setup: &PskClient,
    chan: Channel,
    cancel: &CancelToken,
    timeout: Option<Duration>,
) -> Result<Channel, TlsError> {
    let facts = PskFacts {
        endpoint: Endpoint::Client,
        identity: Some(setup.identity.clone()),
        lookup: None,
        file: &setup.file,
        peer_cert: false,
    };
    let mut done = run(&setup.ctx, &chan, cancel, timeout, facts)?;
    done.info.peer_dn = Some(setup.identity.clone());
    start(chan, done)
}

/// The destination's handshake, and `tls-authz` on the client's username.
pub(super) fn server(
    setup: &PskServer,
    chan: Channel,
    cancel: &CancelToken,
    timeout: Option<Duration>,
) -> Result<Channel, TlsError> {
    let facts = PskFacts {
        endpoint: Endpoint::Server,
        identity: None,
        lookup: None,
        file: &setup.file,
        peer_cert: false,
    };
    let done = run(&setup.ctx, &chan, cancel, timeout, facts)?;
    if let Some(want) = &setup.authz {
        let user = done.info.peer_dn.clone().unwrap_or_default();
        if &user != want {
            return Err(TlsError::PskAuthzDenied {
                chan: chan.peer.clone(),
                user,
            });
        }
    }
    start(chan, done)
}

/// What a handshake agreed.
struct Done {
    info: TlsInfo,
    suite: &'static rustls::Tls13CipherSuite,
    schedule: Schedule,
    /// The bytes read past the handshake's end: the start of the peer's records.
    ciphertext: Vec<u8>,
}

/// Hands the session to the record layer.
fn start(chan: Channel, d: Done) -> Result<Channel, TlsError> {
    let keys = |tx| {
        d.schedule.current(tx).map_err(|e| TlsError::Handshake {
            chan: chan.peer.clone(),
            reason: format!("cannot derive the record keys: {e}"),
        })
    };
    // Nothing was sealed under the application keys yet (no tickets, no data): both
    // directions start at 0.
    let (tx, rx) = (keys(true)?, keys(false)?);
    let start = Start {
        chan: chan.peer.clone(),
        keys: Keys::Psk {
            schedule: d.schedule,
            client: d.info.endpoint == Endpoint::Client,
        },
        info: d.info,
        suite: d.suite,
        tx: (0, tx),
        rx: (0, rx),
        plaintext: Vec::new(),
        ciphertext: d.ciphertext,
    };
    attach(chan, start)
}

/// Runs the handshake on `chan`.
fn run(
    ctx: &SslContext,
    chan: &Channel,
    cancel: &CancelToken,
    timeout: Option<Duration>,
    mut facts: PskFacts<'_>,
) -> Result<Done, TlsError> {
    check_socket(chan)?;
    let setup_err = |e: openssl::error::ErrorStack| TlsError::Handshake {
        chan: chan.peer.clone(),
        reason: format!("cannot set up OpenSSL: {e}"),
    };
    let mut ssl = Ssl::new(ctx).map_err(setup_err)?;
    ssl.set_ex_data(capture_index().map_err(setup_err)?, Mutex::default());
    let client = facts.endpoint == Endpoint::Client;
    if client {
        ssl.set_connect_state();
    } else {
        ssl.set_accept_state();
    }
    let mut s = SslStream::new(ssl, Pipe::default()).map_err(setup_err)?;
    let wire = Wire::new(chan, cancel, timeout)?;
    wire.finish(drive(&mut s, &wire, &mut facts))?;
    let ssl = s.ssl();
    let (info, suite, schedule) = with_capture(ssl, |c| agreed(ssl, c, facts.endpoint))
        .flatten()
        .ok_or_else(|| wire.failed("OpenSSL gave no traffic secrets".into()))?;
    let rest = s.get_ref();
    Ok(Done {
        info,
        suite,
        schedule,
        ciphertext: rest.input[rest.at..].to_vec(),
    })
}

/// Loops OpenSSL's handshake over the wire until it is done.
fn drive(s: &mut SslStream<Pipe>, w: &Wire<'_>, facts: &mut PskFacts<'_>) -> Result<(), TlsError> {
    let mut buf = vec![0u8; FIRST_BUF];
    let mut first = true;
    loop {
        let r = s.do_handshake();
        let out = std::mem::take(&mut s.get_mut().output);
        match r {
            Ok(()) => return w.send(&out),
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                w.send(&out)?;
                let n = w.recv_handshake(&mut buf, &mut first)?;
                if n == 0 {
                    return Err(w.failed(reason::psk_eof(facts)));
                }
                let p = s.get_mut();
                if p.at == p.input.len() {
                    p.input.clear();
                    p.at = 0;
                }
                if p.input.len() - p.at + n > MAX_HANDSHAKE_INPUT {
                    return Err(w.failed(format!(
                        "the peer's handshake messages exceed {MAX_HANDSHAKE_INPUT} bytes"
                    )));
                }
                p.input.extend_from_slice(&buf[..n]);
            }
            Err(e) => {
                let ssl = s.ssl();
                if facts.endpoint == Endpoint::Server {
                    with_capture(ssl, |c| {
                        facts.identity = c.identity.clone();
                        facts.lookup = c.lookup;
                    });
                }
                facts.peer_cert = ssl.verify_result() != X509VerifyResult::OK;
                let why = w.failed(reason::psk(&e, facts));
                // The alert OpenSSL queued, best effort, so that the peer logs why.
                let _ = w.send(&out);
                linger(w);
                return Err(why);
            }
        }
    }
}

/// What a finished handshake agreed, from its secrets (None when one is missing).
fn agreed(
    ssl: &SslRef,
    c: &mut Capture,
    endpoint: Endpoint,
) -> Option<(TlsInfo, &'static rustls::Tls13CipherSuite, Schedule)> {
    let id = u16::from_be_bytes(ssl.current_cipher()?.protocol_id());
    let suite = [
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ]
    .into_iter()
    .find(|s| u16::from(s.suite()) == id)?
    .tls13()?;
    let (cs, ss) = (c.client_secret.take()?, c.server_secret.take()?);
    let (tx, rx) = match endpoint {
        Endpoint::Client => (cs, ss),
        Endpoint::Server => (ss, cs),
    };
    let schedule = Schedule::new(suite, tx.as_ref(), rx.as_ref()).ok()?;
    let info = TlsInfo {
        endpoint,
        protocol: "TLSv1.3".into(),
        cipher: format!("{:?}", suite.common.suite),
        peer_dn: c.identity.clone(),
    };
    Some((info, suite, schedule))
}
