//! What a running migration shares with the control channel. Two directions: what the
//! control thread reads or sets between migrations (state, counters, capabilities,
//! parameters, latency, device state), here; and the commands it sends the migration
//! thread (continue, start postcopy, recover, pause, cancel), in [`Mailbox`]. The engines
//! (`source`, `destination`) run on their own threads and never hold a lock across I/O.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::compat::{QemuVersion, ZeroPageDetection};
use crate::engine::state::StateMachine;
use crate::transport::tls::{TlsInfo, TlsSetup};
use crate::transport::{CancelToken, Channel, TransportError, Uri};
use crate::wire::device_state::DeviceSection;

pub(crate) use crate::engine::latency::Latency;
pub(crate) use crate::engine::mailbox::{Command, Mailbox, Recovery, Refused};

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    pub postcopy_ram: bool,
    pub return_path: bool,
    pub pause_before_switchover: bool,
    pub events: bool,
    /// Destination only: requested pages come on a second connection (QEMU's
    /// postcopy-preempt), not behind the background pages.
    pub postcopy_preempt: bool,
    /// RAM pages go over `multifd-channels` extra connections, in packets.
    pub multifd: bool,
    /// `file:` only: every page has a fixed place in the file (QEMU's mapped-ram layout);
    /// with `multifd` the channels `pwrite`/`pread` pages in parallel. On a destination with
    /// a userfaultfd and `postcopy-ram` too: an on-demand restore.
    pub mapped_ram: bool,
    /// Source only: ask the parent to throttle the vCPUs when the guest dirties faster
    /// than the pages go (QEMU's auto-converge; see `engine::throttle`).
    pub auto_converge: bool,
}

impl Capabilities {
    pub(crate) const NAMES: [&'static str; 8] = [
        "postcopy-ram",
        "return-path",
        "pause-before-switchover",
        "events",
        "postcopy-preempt",
        "multifd",
        "mapped-ram",
        "auto-converge",
    ];

    pub(crate) fn get(&self, name: &str) -> Option<bool> {
        Some(match name {
            "postcopy-ram" => self.postcopy_ram,
            "return-path" => self.return_path,
            "pause-before-switchover" => self.pause_before_switchover,
            "events" => self.events,
            "postcopy-preempt" => self.postcopy_preempt,
            "multifd" => self.multifd,
            "mapped-ram" => self.mapped_ram,
            "auto-converge" => self.auto_converge,
            _ => return None,
        })
    }

    pub(crate) fn set(&mut self, name: &str, on: bool) -> bool {
        let slot = match name {
            "postcopy-ram" => &mut self.postcopy_ram,
            "return-path" => &mut self.return_path,
            "pause-before-switchover" => &mut self.pause_before_switchover,
            "events" => &mut self.events,
            "postcopy-preempt" => &mut self.postcopy_preempt,
            "multifd" => &mut self.multifd,
            "mapped-ram" => &mut self.mapped_ram,
            "auto-converge" => &mut self.auto_converge,
            _ => return false,
        };
        *slot = on;
        true
    }
}

/// `migrate-set-parameters`. Defaults are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parameters {
    /// Bytes per second; 0 means unlimited.
    pub max_bandwidth: u64,
    /// Milliseconds.
    pub downtime_limit: u64,
    /// Bytes per second for the background push in postcopy; 0 means unlimited.
    pub max_postcopy_bandwidth: u64,
    pub machine_type: String,
    pub compat_version: QemuVersion,
    /// Postcopy: a link with no traffic for this long (ms) counts as dead, so a silently
    /// dead link pauses instead of hanging. 0 disables. The source pings at a quarter of it.
    pub link_timeout: u64,
    /// Precopy: once connected, I/O that makes no progress for this long (ms) fails the
    /// migration, so that a silent peer cannot keep it `active` forever. 0 disables.
    /// Longer than `link-timeout` by default, because a QEMU source in `pre-switchover`
    /// (its parent finishing block jobs, say) sends nothing at all.
    pub precopy_timeout: u64,
    /// `--control-fd` helpers: how long (ms) a postcopy migration stays paused waiting for
    /// a new helper to adopt it after the parent went away, before the helper exits.
    pub orphan_timeout: u64,
    /// Destination: threads that write received precopy pages into guest memory (the
    /// loading thread included), 1 to `page_writer::MAX_THREADS`.
    pub load_threads: usize,
    /// Multifd: the number of channels besides the main one (QEMU: 1 to 255, default 2).
    pub multifd_channels: u8,
    /// `zero-page-detection`; None: the default of the effective version (see
    /// [`Parameters::zero_page_detection`]).
    pub zero_page_detection: Option<ZeroPageDetection>,
    /// `vm-uuid`: the VM UUID each multifd channel's initial packet carries, which the
    /// destination compares with its own (QEMU's `-uuid`; all-zero without it).
    pub vm_uuid: [u8; 16],
    /// `tls-creds`: the id of a `tls-creds-x509`/`tls-creds-psk` object; empty: no TLS.
    pub tls_creds: String,
    /// `tls-hostname`: the name the source checks the server's certificate against; empty:
    /// the `tcp:` URI's host.
    pub tls_hostname: String,
    /// `tls-authz`: the id of an `authz-simple` object the destination checks the client's
    /// distinguished name against; empty: any client the CA signed.
    pub tls_authz: String,
    /// `direct-io`: with mapped-ram and multifd, the multifd channels' file descriptors
    /// are opened with O_DIRECT (the main channel's, which is not page-aligned, is not).
    pub direct_io: bool,
    /// auto-converge's parameters (`throttle-trigger-threshold`, `cpu-throttle-*`,
    /// `max-cpu-throttle`).
    pub throttle: crate::engine::throttle::ThrottleParams,
}

impl Parameters {
    /// The version whose compat properties apply (`compat-version` and the machine type).
    pub(crate) fn effective_version(&self) -> QemuVersion {
        crate::compat::effective_version(self.compat_version, &self.machine_type)
    }

    /// `zero-page-detection` as set, else the default of the effective version.
    pub(crate) fn zero_page_detection(&self) -> ZeroPageDetection {
        self.zero_page_detection
            .unwrap_or_else(|| self.effective_version().default_zero_page_detection())
    }

    /// Multifd: sync the channels at the end of every RAM section instead of once per
    /// dirty-scan round with a `MULTIFD_FLUSH` record (QEMU 8.0 and older).
    pub(crate) fn multifd_flush_after_each_section(&self) -> bool {
        self.effective_version().multifd_flush_after_each_section()
    }

    /// `vm-uuid` as `query-migrate-parameters` shows it.
    pub(crate) fn vm_uuid_string(&self) -> String {
        format_uuid(&self.vm_uuid)
    }
}

/// Formats a UUID as QEMU prints one (`qemu_uuid_unparse`: lower-case 8-4-4-4-12 hex).
pub(crate) fn format_uuid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses the canonical 8-4-4-4-12 hex form (either case); None for anything else.
pub(crate) fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut hex = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(i, 8 | 13 | 18 | 23))
        .map(|(_, c)| (*c as char).to_digit(16));
    if [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    for o in out.iter_mut() {
        let hi = hex.next()??;
        let lo = hex.next()??;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            max_bandwidth: 128 << 20,
            downtime_limit: 300,
            max_postcopy_bandwidth: 0,
            machine_type: "none".into(),
            compat_version: QemuVersion::V10_0,
            link_timeout: 10_000,
            precopy_timeout: 60_000,
            orphan_timeout: 60_000,
            load_threads: 2,
            multifd_channels: 2,
            zero_page_detection: None,
            vm_uuid: [0; 16],
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_authz: String::new(),
            direct_io: false,
            throttle: Default::default(),
        }
    }
}

/// Counters reported by `query-migrate` (`ram` object).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub transferred: AtomicU64,
    pub remaining: AtomicU64,
    pub total: AtomicU64,
    pub duplicate: AtomicU64,
    pub normal: AtomicU64,
    pub dirty_sync_count: AtomicU64,
    /// Shared with the destination's fault thread, which counts as it requests.
    pub postcopy_requests: Arc<AtomicU64>,
    /// Pages that went (source) or came (destination) on the postcopy-preempt channel;
    /// shared with the destination's preempt thread.
    pub postcopy_preempt_pages: Arc<AtomicU64>,
    pub dirty_pages_rate: AtomicU64,
    /// Microseconds from `migrate` to completion (or so far).
    pub total_time_us: AtomicU64,
    pub downtime_us: AtomicU64,
    pub setup_time_us: AtomicU64,
    /// Bits per second over the last pass, times 1000 (QEMU reports mbps as a float).
    pub rate_bps: AtomicU64,
    /// Bytes sent or received on the multifd channels (packet headers and page data).
    pub multifd_bytes: AtomicU64,
    /// auto-converge: the vCPU throttle asked of the parent, percent (0: none).
    pub cpu_throttle: AtomicU64,
}

impl Stats {
    pub(crate) fn reset(&self) {
        for c in [
            &self.transferred,
            &self.remaining,
            &self.total,
            &self.duplicate,
            &self.normal,
            &self.dirty_sync_count,
            &*self.postcopy_requests,
            &*self.postcopy_preempt_pages,
            &self.dirty_pages_rate,
            &self.total_time_us,
            &self.downtime_us,
            &self.setup_time_us,
            &self.rate_bps,
            &self.multifd_bytes,
            &self.cpu_throttle,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let normal = g(&self.normal);
        serde_json::json!({
            "transferred": g(&self.transferred),
            "remaining": g(&self.remaining),
            "total": g(&self.total),
            "duplicate": g(&self.duplicate),
            "normal": normal,
            "normal-bytes": normal * crate::compat::wire::TARGET_PAGE_SIZE as u64,
            "mbps": g(&self.rate_bps) as f64 / 1e6,
            "dirty-sync-count": g(&self.dirty_sync_count),
            "postcopy-requests": g(&self.postcopy_requests),
            "postcopy-preempt-pages": g(&self.postcopy_preempt_pages),
            "dirty-pages-rate": g(&self.dirty_pages_rate),
            "page-size": crate::compat::wire::TARGET_PAGE_SIZE,
            "multifd-bytes": g(&self.multifd_bytes),
        })
    }
}

/// Everything a migration thread needs, shared with the control channel.
pub(crate) struct MigrationCtx {
    pub(crate) log: slog::Logger,
    pub(crate) state: StateMachine,
    pub(crate) stats: Stats,
    pub(crate) caps: Mutex<Capabilities>,
    pub(crate) params: Mutex<Parameters>,
    /// Source: sections to send at switchover. Destination: sections received.
    pub(crate) device_out: Mutex<Vec<DeviceSection>>,
    pub(crate) device_in: Mutex<Vec<DeviceSection>>,
    pub(crate) started: Mutex<Option<Instant>>,
    pub(crate) latency: Arc<Latency>,
    /// How often postcopy paused, and how long each recovery took (new channel ->
    /// postcopy-active), in milliseconds.
    pub(crate) pauses: AtomicU64,
    pub(crate) recoveries: Mutex<Vec<f64>>,
    /// Commands from the control channel.
    pub(crate) mailbox: Mailbox,
    /// TLS for this migration's channels (from `tls-creds` when it, or its recovery,
    /// started); None: clear text.
    pub(crate) tls: Mutex<Option<crate::transport::tls::TlsSetup>>,
    /// The channels that ran a TLS handshake in this migration, and what it agreed
    /// (`query-migrate` reports them).
    pub(crate) tls_channels: TlsChannels,
}

/// The channels that ran a TLS handshake, and what each agreed.
pub(crate) type TlsChannels = Arc<Mutex<Vec<(String, TlsInfo)>>>;

/// Runs a new channel's TLS handshake as the migration is configured (or passes the
/// channel through when it does not use TLS), logs what was agreed, and notes it for
/// `query-migrate`.
#[derive(Clone)]
pub(crate) struct Securer {
    tls: Option<TlsSetup>,
    log: slog::Logger,
    seen: TlsChannels,
}

impl Securer {
    pub(crate) fn secure(
        &self,
        chan: Channel,
        what: &str,
        uri: Option<&Uri>,
        cancel: &CancelToken,
        timeout: Option<Duration>,
    ) -> Result<Channel, TransportError> {
        let Some(tls) = &self.tls else {
            return Ok(chan);
        };
        let peer = chan.peer.clone();
        let chan = match tls.secure(chan, uri, cancel, timeout) {
            Ok(c) => c,
            Err(e) => {
                slog::warn!(self.log, "TLS handshake failed"; "channel" => what,
                    "peer" => &peer, "creds" => tls.creds_id(), "error" => %e);
                return Err(e.into());
            }
        };
        if let Some(i) = chan.tls_info() {
            slog::info!(self.log, "TLS session established"; "channel" => what,
                "peer" => &peer, "creds" => tls.creds_id(), "endpoint" => i.endpoint.as_str(),
                "protocol" => &i.protocol, "cipher" => &i.cipher,
                "peer-dn" => i.peer_dn.as_deref().unwrap_or("-"));
            self.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((what.to_string(), i.clone()));
        }
        Ok(chan)
    }
}

impl MigrationCtx {
    pub(crate) fn new(
        log: slog::Logger,
        events: crate::control::events::EventSink,
    ) -> std::io::Result<Arc<Self>> {
        let mailbox = Mailbox::new()?;
        Ok(Arc::new(MigrationCtx {
            state: StateMachine::new(events, log.clone()),
            log,
            stats: Stats::default(),
            caps: Mutex::new(Capabilities::default()),
            params: Mutex::new(Parameters::default()),
            device_out: Mutex::new(Vec::new()),
            device_in: Mutex::new(Vec::new()),
            started: Mutex::new(None),
            latency: Arc::new(Latency::default()),
            pauses: AtomicU64::new(0),
            recoveries: Mutex::new(Vec::new()),
            mailbox,
            tls: Mutex::new(None),
            tls_channels: TlsChannels::default(),
        }))
    }

    pub(crate) fn caps(&self) -> Capabilities {
        self.caps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn params(&self) -> Parameters {
        self.params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `link-timeout` as a socket timeout (None when 0, off).
    pub(crate) fn link_timeout(&self) -> Option<Duration> {
        let t = self.params().link_timeout;
        (t > 0).then(|| Duration::from_millis(t))
    }

    /// Runs the TLS handshake on a new channel `what` ("main", "multifd 1", "preempt",
    /// "recovery") when this migration uses TLS, within `timeout`; returns it as it is
    /// otherwise. `uri`: where a source connected (its `tcp:` host names the server).
    pub(crate) fn secure(
        &self,
        chan: Channel,
        what: &str,
        uri: Option<&Uri>,
        timeout: Option<Duration>,
    ) -> Result<Channel, TransportError> {
        self.securer()
            .secure(chan, what, uri, self.mailbox.cancel_token(), timeout)
    }

    /// [`MigrationCtx::secure`] for a thread of its own (the preempt channel's).
    pub(crate) fn securer(&self) -> Securer {
        Securer {
            tls: self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            log: self.log.clone(),
            seen: self.tls_channels.clone(),
        }
    }

    /// `precopy-timeout` as a socket timeout (None when 0, off).
    pub(crate) fn precopy_timeout(&self) -> Option<Duration> {
        let t = self.params().precopy_timeout;
        (t > 0).then(|| Duration::from_millis(t))
    }

    /// How often a source waiting in `pre-switchover` sends an empty RAM part: a quarter of
    /// the shorter of the two timeouts, so that a helper destination configured with either
    /// does not take the wait for a dead link.
    pub(crate) fn precopy_keepalive(&self) -> Option<Duration> {
        let p = self.params();
        [p.precopy_timeout, p.link_timeout]
            .into_iter()
            .filter(|&t| t > 0)
            .min()
            .map(|t| Duration::from_millis(t / 4))
    }

    /// Clears what the previous migration left: commands, counters, recoveries.
    pub(crate) fn reset_for_new_migration(&self) {
        self.mailbox.reset();
        self.stats.reset();
        self.latency.reset();
        self.pauses.store(0, Ordering::Relaxed);
        self.recoveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.tls_channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Posts a command to the migration thread (see [`Mailbox::post`]).
    pub(crate) fn post(&self, cmd: Command) -> Result<(), Refused> {
        self.mailbox.post(cmd)
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.mailbox.cancelled()
    }

    /// Registers the live channel so cancel can shut it down.
    pub(crate) fn set_channel(&self, fd: Option<OwnedFd>) {
        self.mailbox.set_channel(fd);
    }

    /// Registers another channel (multifd) so cancel shuts it down too.
    pub(crate) fn add_channel(&self, fd: OwnedFd) {
        self.mailbox.add_channel(fd);
    }

    /// Hands a recovery to the paused migration thread.
    pub(crate) fn offer_recovery(&self, r: Recovery) {
        let _ = self.mailbox.post(Command::Recover(r));
    }

    /// Waits for a recovery; None when the helper is quitting (cancel set).
    pub(crate) fn wait_recovery(&self) -> Option<Recovery> {
        self.mailbox.wait_recovery()
    }

    /// Shuts the live channel down without cancelling: in postcopy this pauses.
    pub(crate) fn shutdown_channel(&self) {
        let _ = self.mailbox.post(Command::Pause);
    }

    pub(crate) fn record_recovery(&self, took: Duration) {
        self.recoveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(took.as_secs_f64() * 1000.0);
    }

    /// Sets the cancel signal and shuts the channel down so blocked I/O returns at once.
    pub(crate) fn request_cancel(&self) {
        let _ = self.mailbox.post(Command::Cancel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_round_trip_in_the_canonical_form_only() {
        let s = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
        let u = parse_uuid(s).unwrap();
        assert_eq!(u[0], 0x6b);
        assert_eq!(u[15], 0xc8);
        assert_eq!(format_uuid(&u), s);
        assert_eq!(
            parse_uuid("6BA7B810-9DAD-11D1-80B4-00C04FD430C8"),
            Some(u),
            "upper case"
        );
        assert_eq!(
            Parameters::default().vm_uuid_string(),
            "00000000-0000-0000-0000-000000000000"
        );
        for bad in [
            "",
            "6ba7b8109dad11d180b400c04fd430c8",
            "6ba7b810-9dad-11d1-80b4-00c04fd430c",
            "6ba7b810-9dad-11d1-80b4-00c04fd430c8a",
            "6ba7b810+9dad-11d1-80b4-00c04fd430c8",
            "6ba7b810-9dad-11d1-80b4-00c04fd430cg",
            "6ba7b81-09dad-11d1-80b4-00c04fd430c8",
            "+ba7b810-9dad-11d1-80b4-00c04fd430c8",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }
}
