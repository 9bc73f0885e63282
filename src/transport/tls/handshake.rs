//! The TLS handshake on a connected socket channel (owner: transport TLS).
//!
//! rustls's unbuffered connection runs the handshake over the socket, set non-blocking so
//! that every wait is a poll that a cancel or the deadline ends. Once rustls can send
//! application data, its secrets and key schedule go to a [`Session`], which does the
//! record layer itself.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{CommonState, SupportedCipherSuite};

use super::session::{Keys, Session, Start};
use super::wire::{check_socket, linger, Wire, FIRST_BUF, MAX_HANDSHAKE_INPUT};
use super::{dn, reason, Endpoint, TlsClient, TlsError, TlsInfo, TlsServer};
use crate::transport::{CancelToken, Channel, Uri};

/// SNI when nothing is checked (verify-peer off and no name known).
const PLACEHOLDER_NAME: &str = "qemu-migration-helper.invalid";

/// The source's handshake: SNI and the certificate check use `tls-hostname`, else the
/// `tcp:` host of `uri`; none with `verify-peer` on is QEMU's "No hostname" failure.
pub(super) fn client(
    setup: &TlsClient,
    chan: Channel,
    uri: Option<&Uri>,
    cancel: &CancelToken,
    timeout: Option<Duration>,
) -> Result<Channel, TlsError> {
    check_socket(&chan)?;
    let host = setup
        .hostname
        .clone()
        .filter(|h| !h.is_empty())
        .or_else(|| match uri {
            Some(Uri::Tcp(a)) => tcp_host(a),
            _ => None,
        });
    let name = match &host {
        Some(h) => ServerName::try_from(h.clone()).map_err(|_| TlsError::Handshake {
            chan: chan.peer.clone(),
            reason: format!("{h:?} is not a valid host name or IP address"),
        })?,
        None if setup.verify_peer => {
            return Err(TlsError::NoHostname {
                chan: chan.peer.clone(),
            })
        }
        None => ServerName::try_from(PLACEHOLDER_NAME).map_err(|_| TlsError::NoHostname {
            chan: chan.peer.clone(),
        })?,
    };
    let mut conn = UnbufferedClientConnection::new(setup.config.clone(), name).map_err(|e| {
        TlsError::Handshake {
            chan: chan.peer.clone(),
            reason: reason::describe(&e, host.as_deref()),
        }
    })?;
    let wire = Wire::new(&chan, cancel, timeout)?;
    let left = wire.finish(drive(&mut ClientHs(&mut conn), &wire, host.as_deref()))?;
    let info = info(&conn, Endpoint::Client);
    let suite = tls13(&conn, &chan)?;
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| no_secrets(&chan, e))?;
    start(chan, info, suite, Keys::Client(kernel), secrets, left)
}

/// Hands the handshake's outcome to the channel's new session.
fn start(
    chan: Channel,
    info: TlsInfo,
    suite: &'static rustls::Tls13CipherSuite,
    keys: Keys,
    secrets: rustls::ExtractedSecrets,
    left: Leftover,
) -> Result<Channel, TlsError> {
    let start = Start {
        info,
        chan: chan.peer.clone(),
        suite,
        keys,
        tx: secrets.tx,
        rx: secrets.rx,
        plaintext: left.plaintext,
        ciphertext: left.ciphertext,
    };
    attach(chan, start)
}

/// The destination's handshake: client certificate (verify-peer) and `tls-authz`.
pub(super) fn server(
    setup: &TlsServer,
    chan: Channel,
    cancel: &CancelToken,
    timeout: Option<Duration>,
) -> Result<Channel, TlsError> {
    check_socket(&chan)?;
    let mut conn =
        UnbufferedServerConnection::new(setup.config.clone()).map_err(|e| TlsError::Handshake {
            chan: chan.peer.clone(),
            reason: reason::describe(&e, None),
        })?;
    let wire = Wire::new(&chan, cancel, timeout)?;
    let left = wire.finish(drive(&mut ServerHs(&mut conn), &wire, None))?;
    let info = info(&conn, Endpoint::Server);
    if let (true, Some(want)) = (setup.verify_peer, setup.authz.as_deref()) {
        let dn = info
            .peer_dn
            .clone()
            .unwrap_or_else(|| "(no readable client certificate)".into());
        if dn != want {
            return Err(TlsError::AuthzDenied {
                chan: chan.peer.clone(),
                dn,
            });
        }
    }
    let suite = tls13(&conn, &chan)?;
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| no_secrets(&chan, e))?;
    start(chan, info, suite, Keys::Server(kernel), secrets, left)
}

/// The host of `HOST:PORT` (`[v6]:PORT` without its brackets).
pub(super) fn tcp_host(addr: &str) -> Option<String> {
    let (h, _) = addr.rsplit_once(':')?;
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    (!h.is_empty()).then(|| h.to_string())
}

fn info(c: &CommonState, endpoint: Endpoint) -> TlsInfo {
    // Unreadable, it is reported as none: only tls-authz needs it (and then refuses).
    let peer_dn = c
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| dn::distinguished_name(cert.as_ref()));
    let cipher = c
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    TlsInfo {
        endpoint,
        protocol: "TLSv1.3".into(),
        cipher,
        peer_dn,
    }
}

fn tls13(c: &CommonState, chan: &Channel) -> Result<&'static rustls::Tls13CipherSuite, TlsError> {
    let refused = || TlsError::Handshake {
        chan: chan.peer.clone(),
        reason: "the session is not TLS 1.3 (the only version the helper speaks)".into(),
    };
    match c.negotiated_cipher_suite().ok_or_else(refused)? {
        SupportedCipherSuite::Tls13(s) => Ok(s),
        #[allow(unreachable_patterns)]
        _ => Err(refused()),
    }
}

fn no_secrets(chan: &Channel, e: rustls::Error) -> TlsError {
    TlsError::Handshake {
        chan: chan.peer.clone(),
        reason: format!("cannot take over the session keys: {e}"),
    }
}

/// Restores blocking I/O and routes the channel's I/O through the session.
pub(super) fn attach(mut chan: Channel, start: Start) -> Result<Channel, TlsError> {
    let session = Session::new(start).map_err(|e| TlsError::Io {
        chan: chan.peer.clone(),
        source: e,
    })?;
    chan.tls = Some(Arc::new(session));
    Ok(chan)
}

/// What the handshake read past its end.
struct Leftover {
    plaintext: Vec<u8>,
    ciphertext: Vec<u8>,
}

/// The two connection types behind one interface (their `process_tls_records` are separate
/// inherent methods).
trait Hs {
    type Data;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

struct ClientHs<'a>(&'a mut UnbufferedClientConnection);
struct ServerHs<'a>(&'a mut UnbufferedServerConnection);

impl Hs for ClientHs<'_> {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.0.process_tls_records(buf)
    }
}

impl Hs for ServerHs<'_> {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.0.process_tls_records(buf)
    }
}

/// Runs rustls until the handshake is done (it may send application data).
fn drive<C: Hs>(conn: &mut C, w: &Wire<'_>, host: Option<&str>) -> Result<Leftover, TlsError> {
    let mut inbuf = vec![0u8; FIRST_BUF];
    let mut used = 0;
    let mut out: Vec<u8> = Vec::new();
    let mut plaintext = Vec::new();
    let mut first = true;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut inbuf[..used]);
        let mut done = false;
        match state {
            Err(e) => {
                let why = w.failed(reason::describe(&e, host));
                send_alert(conn, w, &mut inbuf[..used]);
                return Err(why);
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                let at = out.len();
                out.resize(at + FIRST_BUF, 0);
                let n = loop {
                    match enc.encode(&mut out[at..]) {
                        Ok(n) => break n,
                        Err(EncodeError::InsufficientSize(s)) => {
                            out.resize(at + s.required_size, 0)
                        }
                        Err(e) => return Err(w.failed(format!("cannot encode a message: {e}"))),
                    }
                };
                out.truncate(at + n);
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                w.send(&out)?;
                out.clear();
                t.done();
            }
            Ok(ConnectionState::BlockedHandshake) => {
                if used == inbuf.len() {
                    if inbuf.len() >= MAX_HANDSHAKE_INPUT {
                        return Err(w.failed(format!(
                            "the peer's handshake messages exceed {MAX_HANDSHAKE_INPUT} bytes"
                        )));
                    }
                    inbuf.resize(inbuf.len() * 2, 0);
                }
                let n = w.recv_handshake(&mut inbuf[used..], &mut first)?;
                if n == 0 {
                    return Err(w.failed(
                        "the peer closed the connection during the handshake (is TLS set on \
                         both ends? did it refuse this end's certificate?)"
                            .into(),
                    ));
                }
                used += n;
            }
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                // The peer's first data came with its last handshake flight.
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(|e| w.failed(reason::describe(&e, host)))?;
                    discard += rec.discard;
                    plaintext.extend_from_slice(rec.payload);
                }
            }
            Ok(ConnectionState::WriteTraffic(_)) => done = true,
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                return Err(w.failed("the peer closed the TLS session during the handshake".into()))
            }
            Ok(other) => return Err(w.failed(format!("unexpected handshake state {other:?}"))),
        }
        if discard > 0 {
            inbuf.copy_within(discard..used, 0);
            used -= discard;
        }
        if done {
            inbuf.truncate(used);
            return Ok(Leftover {
                plaintext,
                ciphertext: inbuf,
            });
        }
    }
}

/// After a failure rustls queues an alert (bad certificate, ...): send it, best effort, so
/// that the peer logs why, then linger.
fn send_alert<C: Hs>(conn: &mut C, w: &Wire<'_>, inbuf: &mut [u8]) {
    let mut out = vec![0u8; 512];
    if let Ok(ConnectionState::EncodeTlsData(mut enc)) = conn.process(inbuf).state {
        if let Ok(n) = enc.encode(&mut out) {
            let _ = nix::unistd::write(w.fd, &out[..n]);
        }
    }
    linger(w);
}
