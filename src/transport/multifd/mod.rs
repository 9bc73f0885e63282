//! Opening the multifd channels as QEMU 10.0 does (`migration/multifd.c`,
//! `migration_ioc_process_incoming`). The source connects `multifd-channels` more
//! connections to the main channel's address after the main one and sends each its 64-byte
//! initial packet (uuid, channel id). The destination accepts until it has the main channel
//! and every multifd channel, in any order, telling them apart by the first 4 bytes: `QEVM`
//! (peeked, left for the loader) is the main channel, anything else must be an initial
//! packet. With `fd:NAME` the parent passes the multifd channels as `NAME-multifd-K`.
//!
//! Nothing here blocks on a peer: every wait is a poll with the cancel token and, once the
//! first connection came, the `precopy-timeout` deadline; reads never size anything from
//! what the peer sent (the initial packet is a fixed 64 bytes).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::MsgFlags;

mod ordered;

use super::cancel::{poll_timeout, CancelToken};
use super::{Channel, Incoming, TransportError, Uri};
use crate::compat::wire::multifd::INIT_PACKET_LEN;
use crate::compat::wire::FILE_MAGIC;
use crate::engine::migration::format_uuid;
use crate::wire::multifd::{decode_init, encode_init, InitPacket};
use crate::wire::stream::WireError;

/// How often a connection whose first bytes are only the start of `QEVM` is peeked again:
/// poll(2) keeps reporting the bytes already there, and nothing tells when the rest comes
/// (QEMU sleeps 1 ms between peeks; this only happens when a peer splits its first write).
const PEEK_RETRY: Duration = Duration::from_millis(5);

/// What each multifd channel is checked against: the channel count and the VM UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MultifdSetup {
    pub(crate) channels: u8,
    pub(crate) uuid: [u8; 16],
}

/// Why the multifd channels could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MultifdError {
    #[error("multifd needs {channels} channels: fd '{name}' not found")]
    MissingFd { channels: u8, name: String },
    #[error("multifd channel fd '{name}' must be a connected stream socket")]
    NotSocket { name: String },
    #[error(
        "multifd is not possible over {0} (use unix:, tcp: or fd: with the NAME-multifd-K fds)"
    )]
    Unsupported(String),
    #[error("multifd: received uuid '{got}' and expected uuid '{want}' for channel {id}")]
    WrongUuid { got: String, want: String, id: u8 },
    #[error("multifd: received channel id {id} is greater than number of channels {channels}")]
    IdOutOfRange { id: u8, channels: u8 },
    #[error("multifd: received id '{0}' already setup")]
    Duplicate(u8),
    #[error("multifd: bad initial packet from {peer}: {why}")]
    BadInit { peer: String, why: WireError },
    #[error("multifd: {peer} closed the connection before saying which channel it is")]
    Closed { peer: String },
    #[error("multifd: a second main channel (QEVM) came from {peer}")]
    SecondMain { peer: String },
    #[error(
        "multifd: {0} connections on {1} have not said which channel they are, more than a \
         source opens"
    )]
    TooManyPending(usize, String),
    #[error(
        "multifd: {missing} did not arrive on {on} within precopy-timeout ({ms} ms) of the \
         first connection"
    )]
    TimedOut {
        on: String,
        ms: u128,
        missing: String,
    },
    #[error(
        "multifd: another connection came on {on} after the main channel and the {channels} \
         multifd channels (does the source use more multifd-channels?)"
    )]
    Extra { on: String, channels: u8 },
    #[error("cancelled while waiting for the multifd channels on {0}")]
    Cancelled(String),
    #[error("multifd: {what} {peer}: {source}")]
    Io {
        what: &'static str,
        peer: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, peer: &str) -> impl FnOnce(Errno) -> MultifdError {
    let peer = peer.to_string();
    move |e| MultifdError::Io {
        what,
        peer,
        source: e.into(),
    }
}

/// The getfd name of multifd channel `id` of `fd:NAME`.
pub(crate) fn fd_name(name: &str, id: u8) -> String {
    format!("{name}-multifd-{id}")
}

/// Source: connects `channels` connections to `uri` (cancel-aware), in id order.
pub(crate) fn connect(
    uri: &Uri,
    channels: u8,
    cancel: &CancelToken,
) -> Result<Vec<Channel>, TransportError> {
    if !matches!(uri, Uri::Unix(_) | Uri::Tcp(_)) {
        return Err(MultifdError::Unsupported(uri.to_string()).into());
    }
    (0..channels)
        .map(|_| Channel::connect(uri, |_| None, cancel))
        .collect()
}

/// Source: sends channel `id` its initial packet. As QEMU's channel threads do, right
/// after the channel is up (its TLS handshake done), before the next one connects.
pub(crate) fn send_init(c: &Channel, id: usize, uuid: [u8; 16]) -> Result<(), TransportError> {
    let mut buf = Vec::with_capacity(INIT_PACKET_LEN);
    // At most 255 channels (multifd-channels is a u8).
    let id = u8::try_from(id).map_err(|_| MultifdError::IdOutOfRange {
        id: u8::MAX,
        channels: u8::MAX,
    })?;
    encode_init(&mut buf, &InitPacket { uuid, id });
    c.write_all(&buf).map_err(|source| MultifdError::Io {
        what: "sending the initial packet to",
        peer: c.peer.clone(),
        source,
    })?;
    Ok(())
}

/// Channels the destination accepted: the main one and the multifd ones in id order, and
/// the listener if the caller keeps listening (postcopy-preempt's channel comes next).
pub(crate) struct Accepted {
    pub(crate) main: Channel,
    pub(crate) multifd: Vec<Channel>,
    pub(crate) listener: Option<Incoming>,
}

/// A connection not yet told apart.
struct Pending {
    chan: Channel,
    /// The initial packet read so far (consumed: it is no main channel).
    buf: [u8; INIT_PACKET_LEN],
    len: usize,
    /// Whether it may still be the main channel (nothing consumed yet).
    peeking: bool,
    /// Peeked bytes were a strict prefix of `QEVM`: peeked again after [`PEEK_RETRY`].
    partial: bool,
}

/// What a readable pending connection turned out to be.
enum Step {
    More,
    Main,
    Multifd(u8),
}

impl Pending {
    fn new(chan: Channel, may_be_main: bool) -> Self {
        Pending {
            chan,
            buf: [0; INIT_PACKET_LEN],
            len: 0,
            peeking: may_be_main,
            partial: false,
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.chan.fd.as_fd()
    }

    /// Reads what has arrived, without waiting.
    fn step(&mut self, setup: &MultifdSetup) -> Result<Step, MultifdError> {
        let peer = self.chan.peer.as_str();
        let fd = self.chan.fd.as_raw_fd();
        if self.peeking {
            let mut head = [0u8; 4];
            let n = match recv(fd, &mut head, MsgFlags::MSG_PEEK) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(Step::More),
                Err(e) => return Err(io_err("peeking at", peer)(e)),
            };
            if n == 0 {
                return Err(MultifdError::Closed { peer: peer.into() });
            }
            let qevm = FILE_MAGIC.to_be_bytes();
            if n == head.len() && head == qevm {
                return Ok(Step::Main);
            }
            self.partial = n < head.len() && head[..n] == qevm[..n];
            if self.partial {
                return Ok(Step::More);
            }
            // Not the main channel: the bytes are the initial packet's, read them.
            self.peeking = false;
        }
        match recv(fd, &mut self.buf[self.len..], MsgFlags::empty()) {
            Ok(Some(0)) => return Err(MultifdError::Closed { peer: peer.into() }),
            Ok(Some(n)) => self.len += n,
            Ok(None) => return Ok(Step::More),
            Err(e) => return Err(io_err("reading the initial packet from", peer)(e)),
        }
        let bad = |why| MultifdError::BadInit {
            peer: peer.into(),
            why,
        };
        // A wrong magic or version is refused as soon as its bytes are in.
        let Some((init, _)) = decode_init(&self.buf[..self.len]).map_err(bad)? else {
            return Ok(Step::More);
        };
        check_init(&init, setup).map(Step::Multifd)
    }
}

/// An initial packet's uuid and channel id against the destination's setup (QEMU's
/// messages); the channel id.
fn check_init(init: &InitPacket, setup: &MultifdSetup) -> Result<u8, MultifdError> {
    if init.uuid != setup.uuid {
        return Err(MultifdError::WrongUuid {
            got: format_uuid(&init.uuid),
            want: format_uuid(&setup.uuid),
            id: init.id,
        });
    }
    if init.id >= setup.channels {
        return Err(MultifdError::IdOutOfRange {
            id: init.id,
            channels: setup.channels,
        });
    }
    Ok(init.id)
}

/// recv(2) without waiting: None when nothing has arrived.
fn recv(fd: std::os::fd::RawFd, buf: &mut [u8], flags: MsgFlags) -> Result<Option<usize>, Errno> {
    loop {
        match nix::sys::socket::recv(fd, buf, flags | MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// The destination's collection of channels.
struct Gather<'a> {
    setup: &'a MultifdSetup,
    main: Option<Channel>,
    slots: Vec<Option<Channel>>,
    pending: Vec<Pending>,
}

impl Gather<'_> {
    fn done(&self) -> bool {
        self.main.is_some() && self.slots.iter().all(Option::is_some)
    }

    /// "the main channel and multifd channels 0, 2", for the timeout's error.
    fn missing(&self) -> String {
        let ids: Vec<String> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_none())
            .map(|i| i.to_string())
            .collect();
        let multifd = match ids.len() {
            0 => None,
            1 => Some(format!("multifd channel {}", ids[0])),
            _ => Some(format!("multifd channels {}", ids.join(", "))),
        };
        match (self.main.is_none(), multifd) {
            (true, Some(m)) => format!("the main channel and {m}"),
            (true, None) => "the main channel".into(),
            (false, Some(m)) => m,
            (false, None) => "nothing".into(),
        }
    }

    fn place(&mut self, p: Pending, step: Step) -> Result<(), MultifdError> {
        match step {
            Step::More => self.pending.push(p),
            Step::Main if self.main.is_some() => {
                return Err(MultifdError::SecondMain {
                    peer: p.chan.peer.clone(),
                })
            }
            Step::Main => self.main = Some(p.chan),
            Step::Multifd(id) => {
                let slot = &mut self.slots[usize::from(id)];
                if slot.is_some() {
                    return Err(MultifdError::Duplicate(id));
                }
                *slot = Some(p.chan);
            }
        }
        Ok(())
    }
}

/// Runs one channel's TLS handshake (the migration's, which logs it) within a timeout:
/// `(channel, "main" or "multifd K", timeout)`.
pub(crate) type Secure<'a> =
    &'a dyn Fn(Channel, &str, Option<Duration>) -> Result<Channel, TransportError>;

/// Destination: takes the main channel and `setup.channels` multifd channels. From a
/// listener, connections are accepted until all are there; from a ready (connected `fd:`)
/// channel, `fds` are its multifd channels, in any order (their ids say which is which).
/// `timeout` (precopy-timeout) bounds the wait from the first connection on. With `keep`,
/// the listener is returned for a later channel (postcopy-preempt). With `tls`, every
/// channel runs its handshake first and, as in QEMU, order tells them apart.
pub(crate) fn accept(
    incoming: Incoming,
    fds: Vec<Channel>,
    setup: &MultifdSetup,
    timeout: Option<Duration>,
    cancel: &CancelToken,
    keep: bool,
    tls: Option<Secure<'_>>,
) -> Result<Accepted, TransportError> {
    if let Some(secure) = tls {
        return ordered::accept_tls(incoming, fds, setup, timeout, cancel, keep, secure);
    }
    let label = incoming.label().to_string();
    let mut g = Gather {
        setup,
        main: None,
        slots: (0..setup.channels).map(|_| None).collect(),
        pending: Vec::new(),
    };
    let mut first: Option<Instant> = None;
    let listener = match incoming {
        Incoming::Ready(c) => {
            if fds.len() != usize::from(setup.channels) {
                return Err(MultifdError::Unsupported(label).into());
            }
            g.main = Some(c);
            g.pending = fds.into_iter().map(|c| Pending::new(c, false)).collect();
            first = Some(Instant::now());
            None
        }
        l => Some(l),
    };
    let r = gather(
        &mut g,
        listener.as_ref(),
        &label,
        &mut first,
        timeout,
        cancel,
    )
    .and_then(|()| refuse_extra(listener.as_ref(), keep, g.pending.len(), setup));
    if let Some(l) = &listener {
        if r.is_err() || !keep {
            l.done_listening();
        }
    }
    r?;
    let (Some(main), slots) = (g.main, g.slots) else {
        return Err(MultifdError::Cancelled(label).into());
    };
    Ok(Accepted {
        main,
        multifd: slots.into_iter().flatten().collect(),
        listener: listener.filter(|_| keep),
    })
}

/// Fails if a connection beyond the expected ones is already waiting on the listener. A
/// source connects all its channels before it writes the main channel's header, so by the
/// time that header has been seen, a source with more channels than the destination has
/// them queued here: refusing them now fails both ends at once, where closing the listener
/// could let a source that fits its data into the socket buffers believe it completed.
/// `pending` counts those already accepted that have not said which channel they are.
/// With `keep` the next connection is the postcopy-preempt channel, and is left alone.
fn refuse_extra(
    listener: Option<&Incoming>,
    keep: bool,
    pending: usize,
    setup: &MultifdSetup,
) -> Result<(), TransportError> {
    let Some(l) = listener.filter(|_| !keep) else {
        return Ok(());
    };
    let extra = || {
        Err(MultifdError::Extra {
            on: l.label().into(),
            channels: setup.channels,
        }
        .into())
    };
    if pending > 0 {
        return extra();
    }
    let Some(fd) = l.listener_fd() else {
        return Ok(());
    };
    let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
    match nix::poll::poll(&mut pfd, PollTimeout::ZERO) {
        Ok(n) if n > 0 => extra(),
        _ => Ok(()),
    }
}

fn gather(
    g: &mut Gather<'_>,
    listener: Option<&Incoming>,
    label: &str,
    first: &mut Option<Instant>,
    timeout: Option<Duration>,
    cancel: &CancelToken,
) -> Result<(), TransportError> {
    while !g.done() {
        let deadline = first.and_then(|t| timeout.and_then(|d| t.checked_add(d)));
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(MultifdError::TimedOut {
                on: label.into(),
                ms: timeout.unwrap_or_default().as_millis(),
                missing: g.missing(),
            }
            .into());
        }
        let retry = g
            .pending
            .iter()
            .any(|p| p.partial)
            .then(|| Instant::now() + PEEK_RETRY);
        let wait = poll_timeout(match (deadline, retry) {
            (Some(d), Some(r)) => Some(d.min(r)),
            (d, r) => d.or(r),
        });
        // Index 0: the cancel token; 1: the listener (if any); then the pending channels.
        let mut pfds = vec![PollFd::new(cancel.as_fd(), PollFlags::POLLIN)];
        if let Some(l) = listener.and_then(Incoming::listener_fd) {
            pfds.push(PollFd::new(l, PollFlags::POLLIN));
        }
        let base = pfds.len();
        pfds.extend(
            g.pending
                .iter()
                .map(|p| PollFd::new(p.fd(), PollFlags::POLLIN)),
        );
        match nix::poll::poll(&mut pfds, wait) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(io_err("poll on", label)(e).into()),
        }
        let ready = |i: usize| pfds[i].revents().is_some_and(|r| !r.is_empty());
        let listener_ready = base > 1 && ready(1);
        let pending_ready: Vec<bool> = (base..pfds.len()).map(ready).collect();
        drop(pfds);
        if cancel.is_cancelled() {
            return Err(MultifdError::Cancelled(label.into()).into());
        }
        for (p, r) in std::mem::take(&mut g.pending)
            .into_iter()
            .zip(pending_ready)
        {
            let mut p = p;
            if r || p.partial {
                let step = p.step(g.setup)?;
                g.place(p, step)?;
            } else {
                g.pending.push(p);
            }
        }
        if listener_ready {
            // A peer that opens connections and says nothing cannot make the list grow
            // without bound: a source opens 1 + channels, and those identified leave it.
            let max = 2 * (usize::from(g.setup.channels) + 1);
            if g.pending.len() >= max {
                return Err(MultifdError::TooManyPending(g.pending.len(), label.into()).into());
            }
            if let Some(l) = listener {
                let c = l.accept_now()?;
                first.get_or_insert_with(Instant::now);
                g.pending.push(Pending::new(c, true));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};

    const UUID: [u8; 16] = [7; 16];
    const SETUP: MultifdSetup = MultifdSetup {
        channels: 2,
        uuid: UUID,
    };

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("qmh-mfd-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir(&d).unwrap();
            Dir(d)
        }
        fn sock(&self) -> PathBuf {
            self.0.join("s")
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn init(uuid: [u8; 16], id: u8) -> Vec<u8> {
        let mut b = Vec::new();
        encode_init(&mut b, &InitPacket { uuid, id });
        b
    }

    /// What a peer sends on one connection.
    #[derive(Clone)]
    enum Conn {
        Main,
        Multifd([u8; 16], u8),
        Raw(Vec<u8>),
    }

    /// Connects `conns` to `p` in order, each writing its first bytes and then a marker byte
    /// (the multifd id, or 0xee for main); keeps them open until `hold` ends.
    fn peer(p: &Path, conns: Vec<Conn>, hold: Duration) -> std::thread::JoinHandle<()> {
        let p = p.to_path_buf();
        std::thread::spawn(move || {
            let mut open = Vec::new();
            for c in conns {
                // The destination may have given up (and closed) before the last ones.
                let Ok(mut s) = UnixStream::connect(&p) else {
                    break;
                };
                let _ = match c {
                    Conn::Main => s.write_all(b"QEVM\0\0\0\x03\xee"),
                    Conn::Multifd(u, id) => s.write_all(&init(u, id)).and(s.write_all(&[id])),
                    Conn::Raw(b) => s.write_all(&b),
                };
                open.push(s);
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(hold);
        })
    }

    fn listen(d: &Dir) -> Incoming {
        Incoming::open(&Uri::Unix(d.sock()), |_| None).unwrap()
    }

    fn run(
        name: &str,
        conns: Vec<Conn>,
        timeout: Option<Duration>,
    ) -> Result<Accepted, TransportError> {
        let d = Dir::new(name);
        let inc = listen(&d);
        let t = peer(&d.sock(), conns, Duration::from_millis(500));
        let r = accept(
            inc,
            Vec::new(),
            &SETUP,
            timeout,
            &CancelToken::new().unwrap(),
            false,
            None,
        );
        t.join().unwrap();
        assert!(!d.sock().exists(), "the socket path is removed when done");
        r
    }

    fn read_byte(c: &Channel) -> u8 {
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).unwrap(), 1);
        b[0]
    }

    #[test]
    fn channels_in_any_order_are_sorted_by_id_and_main_keeps_its_header() {
        let conns = vec![Conn::Multifd(UUID, 1), Conn::Main, Conn::Multifd(UUID, 0)];
        let a = run("order", conns, Some(Duration::from_secs(5))).unwrap();
        let mut head = [0u8; 9];
        let mut got = 0;
        while got < head.len() {
            got += a.main.read(&mut head[got..]).unwrap();
        }
        assert_eq!(&head, b"QEVM\0\0\0\x03\xee", "peeked, not consumed");
        assert_eq!(a.multifd.len(), 2);
        for (k, c) in a.multifd.iter().enumerate() {
            assert_eq!(
                read_byte(c),
                k as u8,
                "channel {k} follows its initial packet"
            );
        }
        assert!(a.listener.is_none());
    }

    #[test]
    fn a_main_header_split_across_writes_is_still_the_main_channel() {
        let d = Dir::new("split");
        let inc = listen(&d);
        let p = d.sock();
        let t = std::thread::spawn(move || {
            let mut m = UnixStream::connect(&p).unwrap();
            m.write_all(b"QE").unwrap();
            let mut a = UnixStream::connect(&p).unwrap();
            a.write_all(&init(UUID, 0)).unwrap();
            let mut b = UnixStream::connect(&p).unwrap();
            b.write_all(&init(UUID, 1)[..10]).unwrap();
            std::thread::sleep(Duration::from_millis(60));
            b.write_all(&init(UUID, 1)[10..]).unwrap();
            m.write_all(b"VM").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            drop((m, a, b));
        });
        let never = CancelToken::new().unwrap();
        let a = accept(inc, Vec::new(), &SETUP, None, &never, false, None).unwrap();
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            got += a.main.read(&mut head[got..]).unwrap();
        }
        assert_eq!(&head, b"QEVM");
        assert_eq!(a.multifd.len(), 2);
        t.join().unwrap();
    }

    #[test]
    fn a_wrong_uuid_is_refused_as_qemu_words_it() {
        let other = [0u8; 16];
        let conns = vec![Conn::Main, Conn::Multifd(other, 1)];
        let e = run("uuid", conns, Some(Duration::from_secs(5)))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "multifd: received uuid '00000000-0000-0000-0000-000000000000' and expected uuid \
             '07070707-0707-0707-0707-070707070707' for channel 1"
        );
    }

    /// A source with more channels than the destination connects them all before it writes
    /// its header: the extra one, queued or already accepted, fails the migration rather
    /// than being dropped when the listener closes (which a source that fits its data into
    /// the socket buffers might never notice).
    #[test]
    fn a_connection_beyond_the_expected_ones_is_refused() {
        for extra_first in [true, false] {
            let d = Dir::new(&format!("extra-{extra_first}"));
            let inc = listen(&d);
            let p = d.sock();
            let t = std::thread::spawn(move || {
                let mut c: Vec<UnixStream> =
                    (0..4).map(|_| UnixStream::connect(&p).unwrap()).collect();
                // Connection 0 or 3 is the extra one and says nothing.
                let (main, m0, m1) = if extra_first { (1, 2, 3) } else { (0, 1, 2) };
                c[m0].write_all(&init(UUID, 0)).unwrap();
                c[m1].write_all(&init(UUID, 1)).unwrap();
                c[main].write_all(b"QEVM\0\0\0\x03").unwrap();
                std::thread::sleep(Duration::from_millis(500));
            });
            let never = CancelToken::new().unwrap();
            let t5 = Some(Duration::from_secs(5));
            let e = accept(inc, Vec::new(), &SETUP, t5, &never, false, None)
                .err()
                .unwrap();
            t.join().unwrap();
            assert!(
                e.to_string().contains("another connection came on unix:")
                    && e.to_string().contains("the 2 multifd channels"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_duplicate_id_is_refused() {
        let conns = vec![Conn::Multifd(UUID, 0), Conn::Multifd(UUID, 0)];
        let e = run("dup", conns, Some(Duration::from_secs(5)))
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "multifd: received id '0' already setup");
    }

    #[test]
    fn an_id_out_of_range_is_refused() {
        let conns = vec![Conn::Main, Conn::Multifd(UUID, 2)];
        let e = run("range", conns, Some(Duration::from_secs(5)))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "multifd: received channel id 2 is greater than number of channels 2"
        );
    }

    #[test]
    fn a_bad_magic_is_refused_at_once() {
        let conns = vec![Conn::Main, Conn::Raw(vec![0xaa; 8])];
        let start = Instant::now();
        let e = run("magic", conns, None).err().unwrap();
        let e = e.to_string();
        assert!(
            e.contains("bad initial packet") && e.contains("magic 0xaaaaaaaa"),
            "{e}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_second_main_channel_is_refused() {
        let conns = vec![Conn::Main, Conn::Main];
        let e = run("twomain", conns, None).err().unwrap();
        assert!(e.to_string().contains("a second main channel"), "{e}");
    }

    #[test]
    fn a_channel_that_never_arrives_times_out_naming_it() {
        let conns = vec![Conn::Multifd(UUID, 0), Conn::Main];
        let start = Instant::now();
        let e = run("missing", conns, Some(Duration::from_millis(300)))
            .err()
            .unwrap();
        assert!(
            matches!(e, TransportError::Multifd(ref m) if matches!(**m, MultifdError::TimedOut { .. })),
            "{e}"
        );
        assert!(
            e.to_string().contains("multifd channel 1 did not arrive")
                && e.to_string().contains("precopy-timeout (300 ms)"),
            "{e}"
        );
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5));
        // A connection that sends nothing at all counts as not arrived.
        let conns = vec![Conn::Raw(Vec::new())];
        let e = run("silent", conns, Some(Duration::from_millis(200)))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("the main channel and multifd channels 0, 1 did not arrive"),
            "{e}"
        );
    }

    #[test]
    fn connections_that_say_nothing_are_bounded() {
        let conns = vec![Conn::Raw(Vec::new()); 8];
        let e = run("silent-many", conns, None).err().unwrap();
        assert!(e.to_string().contains("6 connections"), "{e}");
    }

    #[test]
    fn cancel_ends_the_wait_at_once() {
        let d = Dir::new("cancel");
        let inc = listen(&d);
        // One connection that never says what it is, so the deadline alone would not end it.
        let _held = UnixStream::connect(d.sock()).unwrap();
        let cancel = CancelToken::new().unwrap();
        let c2 = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c2.cancel();
        });
        let start = Instant::now();
        let e = accept(inc, Vec::new(), &SETUP, None, &cancel, false, None)
            .err()
            .unwrap();
        assert!(
            matches!(&e, TransportError::Multifd(m) if matches!(**m, MultifdError::Cancelled(_))),
            "{e}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }

    #[test]
    fn passed_fds_are_ordered_by_their_ids() {
        let (main, mut main_peer) = UnixStream::pair().unwrap();
        let mut fds = Vec::new();
        let mut peers = Vec::new();
        for id in [1u8, 0] {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(&init(UUID, id)).unwrap();
            b.write_all(&[id]).unwrap();
            fds.push(Channel::from_unix(a, format!("fd:m-multifd-{id}")));
            peers.push(b);
        }
        main_peer.write_all(b"QEVM").unwrap();
        let inc = Incoming::Ready(Channel::from_unix(main, "fd:m".into()));
        let never = CancelToken::new().unwrap();
        let a = accept(
            inc,
            fds,
            &SETUP,
            Some(Duration::from_secs(5)),
            &never,
            false,
            None,
        )
        .unwrap();
        for (k, c) in a.multifd.iter().enumerate() {
            assert_eq!(read_byte(c), k as u8);
        }
        // A passed fd that carries a main channel is no multifd channel.
        let (main, _mp) = UnixStream::pair().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"QEVM\0\0\0\x03").unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        d.write_all(&init(UUID, 0)).unwrap();
        let fds = vec![
            Channel::from_unix(a, "fd:m-multifd-0".into()),
            Channel::from_unix(c, "fd:m-multifd-1".into()),
        ];
        let inc = Incoming::Ready(Channel::from_unix(main, "fd:m".into()));
        let e = accept(
            inc,
            fds,
            &SETUP,
            Some(Duration::from_secs(5)),
            &never,
            false,
            None,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("magic 0x5145564d"), "{e}");
        drop((b, d, peers, main_peer));
    }

    #[test]
    fn the_source_side_connects_and_introduces_each_channel() {
        let d = Dir::new("source");
        let inc = listen(&d);
        let uri = Uri::Unix(d.sock());
        let never = CancelToken::new().unwrap();
        let t = {
            let uri = uri.clone();
            let never = never.clone();
            std::thread::spawn(move || {
                let main = Channel::connect(&uri, |_| None, &never).unwrap();
                main.write_all(b"QEVM").unwrap();
                let chans = connect(&uri, 3, &never).unwrap();
                for (k, c) in chans.iter().enumerate() {
                    send_init(c, k, UUID).unwrap();
                }
                for (k, c) in chans.iter().enumerate() {
                    c.write_all(&[k as u8 + 10]).unwrap();
                }
                std::thread::sleep(Duration::from_millis(300));
                drop((main, chans));
            })
        };
        let setup = MultifdSetup {
            channels: 3,
            uuid: UUID,
        };
        let a = accept(inc, Vec::new(), &setup, None, &never, true, None).unwrap();
        for (k, c) in a.multifd.iter().enumerate() {
            assert_eq!(read_byte(c), k as u8 + 10);
        }
        assert!(a.listener.is_some(), "kept for a preempt channel");
        t.join().unwrap();
        let e = connect(
            &Uri::File(super::super::FileUri::new(d.0.join("f"))),
            1,
            &never,
        )
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("multifd is not possible over file:"),
            "{e}"
        );
    }
}
