//! [`super::accept`] under TLS, where connections are told apart by their order.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

use super::{check_init, Accepted, MultifdError, MultifdSetup, Secure};
use crate::compat::wire::multifd::INIT_PACKET_LEN;
use crate::transport::{CancelToken, Channel, Incoming, TransportError};
use crate::wire::multifd::decode_init;

/// [`accept`] under TLS. Ciphertext cannot be peeked at, so, as QEMU does, the first
/// channel (whose handshake the source completes before it opens any other) is the main one
/// and the next `setup.channels` are multifd channels, told apart by their initial packets.
/// One channel at a time: each handshake and initial packet is bounded by what is left of
/// `timeout` from the first connection, and by the cancel token.
pub(super) fn accept_tls(
    incoming: Incoming,
    fds: Vec<Channel>,
    setup: &MultifdSetup,
    timeout: Option<Duration>,
    cancel: &CancelToken,
    keep: bool,
    secure: Secure<'_>,
) -> Result<Accepted, TransportError> {
    let label = incoming.label().to_string();
    let mut slots: Vec<Option<Channel>> = (0..setup.channels).map(|_| None).collect();
    let mut run = |listener: Option<&Incoming>,
                   main: Option<Channel>,
                   mut fds: std::vec::IntoIter<Channel>,
                   mut first: Option<Instant>|
     -> Result<Channel, TransportError> {
        let mut next =
            |first: &mut Option<Instant>, what: &str| -> Result<Channel, TransportError> {
                match listener {
                    Some(l) => {
                        let deadline = deadline_of(*first, timeout);
                        let fd = l
                            .listener_fd()
                            .ok_or_else(|| MultifdError::Unsupported(label.clone()))?;
                        wait_input(fd, cancel, deadline, timeout, &label, what)?;
                        let c = l.accept_now()?;
                        first.get_or_insert_with(Instant::now);
                        Ok(c)
                    }
                    None => fds
                        .next()
                        .ok_or_else(|| MultifdError::Unsupported(label.clone()).into()),
                }
            };
        let main = match main {
            Some(c) => c,
            None => next(&mut first, "the main channel")?,
        };
        let main = secure(main, "main", left(deadline_of(first, timeout)))?;
        // Every channel's handshake first: a source may send the initial packets only once
        // all its channels are up.
        let mut up = Vec::with_capacity(slots.len());
        for k in 0..slots.len() {
            let c = next(&mut first, &format!("multifd channel {k}"))?;
            let deadline = deadline_of(first, timeout);
            up.push(secure(c, &format!("multifd {k}"), left(deadline))?);
        }
        for (k, c) in up.into_iter().enumerate() {
            let what = format!("connection {} after the main channel", k + 1);
            let deadline = deadline_of(first, timeout);
            let id = read_init(&c, setup, deadline, timeout, cancel, &what)?;
            let slot = &mut slots[usize::from(id)];
            if slot.is_some() {
                return Err(MultifdError::Duplicate(id).into());
            }
            *slot = Some(c);
        }
        Ok(main)
    };
    let (main, listener) = match incoming {
        Incoming::Ready(c) => {
            if fds.len() != usize::from(setup.channels) {
                return Err(MultifdError::Unsupported(label).into());
            }
            let now = Some(Instant::now());
            (run(None, Some(c), fds.into_iter(), now)?, None)
        }
        l => {
            let r = run(Some(&l), None, Vec::new().into_iter(), None)
                .and_then(|m| super::refuse_extra(Some(&l), keep, 0, setup).map(|()| m));
            if r.is_err() || !keep {
                l.done_listening();
            }
            (r?, Some(l))
        }
    };
    Ok(Accepted {
        main,
        multifd: slots.into_iter().flatten().collect(),
        listener: listener.filter(|_| keep),
    })
}

fn deadline_of(first: Option<Instant>, timeout: Option<Duration>) -> Option<Instant> {
    first.and_then(|t| timeout.and_then(|d| t.checked_add(d)))
}

/// What is left until `deadline` (None: no limit; at least 1 ms, so it still means "soon").
fn left(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| {
        d.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    })
}

/// Reads a TLS multifd channel's initial packet (through its session) and checks it.
fn read_init(
    c: &Channel,
    setup: &MultifdSetup,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    cancel: &CancelToken,
    what: &str,
) -> Result<u8, TransportError> {
    let peer = c.peer.clone();
    let mut buf = [0u8; INIT_PACKET_LEN];
    let mut len = 0;
    let io = |what: &'static str| {
        let peer = peer.clone();
        move |source: io::Error| MultifdError::Io { what, peer, source }
    };
    while len < buf.len() {
        // Plaintext the handshake already brought in is not visible to poll(2).
        let n = c
            .read_ready(&mut buf[len..])
            .map_err(io("reading the initial packet from"))?;
        if n == 0 {
            let missing = format!("the initial packet of {what}");
            wait_input(c.fd.as_fd(), cancel, deadline, timeout, &peer, &missing)?;
            // Readable: a whole record, or EOF, or part of a record (read blocks for the rest,
            // bounded by the socket timeout set below).
            c.set_timeouts(left(deadline));
            let n = c
                .read(&mut buf[len..])
                .map_err(io("reading the initial packet from"))?;
            c.set_timeouts(None);
            if n == 0 {
                return Err(MultifdError::Closed { peer }.into());
            }
            len += n;
        } else {
            len += n;
        }
    }
    let bad = |why| MultifdError::BadInit {
        peer: peer.clone(),
        why,
    };
    let Some((init, _)) = decode_init(&buf).map_err(bad)? else {
        return Err(MultifdError::Closed { peer }.into());
    };
    Ok(check_init(&init, setup)?)
}

/// Waits for input on `fd`, a cancel, or `deadline` (`timeout` after the first
/// connection); `missing` names what did not come.
fn wait_input(
    fd: BorrowedFd<'_>,
    cancel: &CancelToken,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    on: &str,
    missing: &str,
) -> Result<(), TransportError> {
    match crate::transport::wait_fd(fd, PollFlags::POLLIN, cancel, deadline) {
        Ok(crate::transport::Woke::Ready) => Ok(()),
        Ok(crate::transport::Woke::Interrupted) => Err(MultifdError::Cancelled(on.into()).into()),
        Ok(crate::transport::Woke::TimedOut) => Err(MultifdError::TimedOut {
            on: on.into(),
            ms: timeout.unwrap_or_default().as_millis(),
            missing: missing.into(),
        }
        .into()),
        Err(e) => Err(MultifdError::Io {
            what: "poll on",
            peer: on.into(),
            source: e,
        }
        .into()),
    }
}
