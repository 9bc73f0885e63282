//! Starting a migration: `migrate` (also `resume`), `migrate-incoming`, `migrate-recover`,
//! and the migration thread they start.

use std::sync::atomic::Ordering;

use serde_json::json;

use super::{files, lock, Args, CmdResult, Helper, Role};
use crate::control::qmp::QmpError;
use crate::engine::destination::LoadError;
use crate::engine::migration::MigrationCtx;
use crate::engine::source::SourceError;
use crate::engine::state::MigrationStatus;
use crate::transport::multifd::{self, MultifdError, MultifdSetup};
use crate::transport::{Channel, Incoming, TransportError, Uri};

/// Why a migration thread ended in failure; its text becomes `error-desc`.
#[derive(Debug, thiserror::Error)]
pub(super) enum WorkerError {
    /// Connecting or accepting the migration channel.
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Destination(#[from] LoadError),
}

impl Helper {
    pub(super) fn check_can_start(&self) -> Result<(), QmpError> {
        if self.busy() {
            return Err(QmpError::generic(format!(
                "There's a migration process in progress (status {})",
                self.ctx.state.status().as_str()
            )));
        }
        Ok(())
    }

    pub(super) fn migrate(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["uri", "resume", "detach", "blk", "inc"])?;
        let uri: Uri = a
            .str("uri")?
            .parse()
            .map_err(|e: TransportError| QmpError::generic(e.to_string()))?;
        if a.opt_bool("resume")?.unwrap_or(false) {
            let st = self.ctx.state.status();
            // A fresh helper (the previous one died) adopts the paused migration.
            let adopt = st.is_finished() && self.ctx.caps().postcopy_ram;
            if !adopt
                && (*lock(&self.role) != Some(Role::Source)
                    || st != MigrationStatus::PostcopyPaused)
            {
                return Err(QmpError::generic(format!(
                    "Cannot resume if there is no paused migration (status {})",
                    st.as_str()
                )));
            }
            // A passed fd is taken now and checked to be a connected socket.
            let fd = match &uri {
                Uri::Fd(n) => {
                    let fd = self.take_fd(n).ok_or_else(|| {
                        QmpError::generic(format!("File descriptor named '{n}' not found"))
                    })?;
                    let chan =
                        Channel::from_fd(n, fd).map_err(|e| QmpError::generic(e.to_string()))?;
                    if !chan.is_socket {
                        return Err(QmpError::generic(format!("fd '{n}' is not a socket")));
                    }
                    Some(
                        chan.try_clone_fd()
                            .map_err(|e| QmpError::generic(e.to_string()))?,
                    )
                }
                _ => None,
            };
            // As QEMU, the credentials are looked up again for the new connection.
            let tls = self.tls_setup(Role::Source)?;
            *lock(&self.ctx.tls) = tls;
            slog::info!(self.log, "migrate resume"; "uri" => %uri, "adopt" => adopt);
            if adopt {
                let blocks = self.migration_blocks()?;
                self.ctx
                    .offer_recovery(crate::engine::migration::Recovery::Source(uri, fd));
                return self.start_adopt(Role::Source, move |ctx| {
                    Ok(crate::engine::source::adopt(ctx, blocks)?)
                });
            }
            self.ctx
                .offer_recovery(crate::engine::migration::Recovery::Source(uri, fd));
            return Ok(json!({}));
        }
        self.check_can_start()?;
        let caps = self.ctx.caps();
        let params = self.ctx.params();
        super::settings::check_start(&caps, &params)?;
        if caps.postcopy_preempt {
            if !caps.postcopy_ram {
                return Err(QmpError::generic("Postcopy preempt requires postcopy-ram"));
            }
            if !matches!(uri, Uri::Unix(_) | Uri::Tcp(_)) {
                return Err(QmpError::generic(
                    "Migration requires multi-channel URIs (e.g. tcp): postcopy-preempt needs unix: or tcp:",
                ));
            }
            if self.ctx.params().compat_version == crate::compat::QemuVersion::V7_2 {
                return Err(QmpError::generic(
                    "postcopy-preempt towards QEMU 7.2 is not supported (7.2 takes the second channel at the start)",
                ));
            }
        }
        let blocks = self.migration_blocks()?;
        let tls = self.tls_setup(Role::Source)?;
        files::check(Role::Source, &caps, &params, &uri, tls.is_some(), false)?;
        if tls.is_some() && matches!(uri, Uri::File(_)) {
            return Err(QmpError::generic(
                "TLS needs a socket: file: cannot carry a TLS migration",
            ));
        }
        let setup = MultifdSetup {
            channels: params.multifd_channels,
            uuid: params.vm_uuid,
        };
        // mapped-ram, or an fd set: the files are opened now (errors answer the command).
        let opened = self.open_file_channels(Role::Source, &uri, &caps, &params)?;
        let file_channels = opened.is_some();
        // Take passed fds now, so a second migrate cannot race for them; the multifd ones
        // are only checked first, so that a missing one leaves the main one in place.
        let multifd_names = match &uri {
            Uri::Fd(n) if caps.multifd && !file_channels => {
                self.check_multifd_fds(n, setup.channels)?
            }
            _ => Vec::new(),
        };
        let fd = match &uri {
            Uri::Fd(n) if !file_channels => Some(self.take_fd(n).ok_or_else(|| {
                QmpError::generic(format!("File descriptor named '{n}' not found"))
            })?),
            _ => None,
        };
        let mut multifd_fds = self.take_multifd_fds(multifd_names)?;
        let chan = match (fd, opened) {
            (_, Some(o)) => {
                multifd_fds = o.multifd;
                Some(o.main)
            }
            (Some(fd), None) => {
                let Uri::Fd(n) = &uri else { unreachable!() };
                Some(Channel::from_fd(n, fd).map_err(|e| QmpError::generic(e.to_string()))?)
            }
            (None, None) => None,
        };
        slog::info!(self.log, "migrate"; "uri" => %uri, "blocks" => blocks.len());
        self.start_worker(Role::Source, move |ctx| {
            *lock(&ctx.tls) = tls;
            let chan = match chan {
                Some(c) => c,
                None => Channel::connect(&uri, |_| None, ctx.mailbox.cancel_token())?,
            }
            .with_cancel(ctx.mailbox.cancel_token().clone());
            // Under TLS, the main channel's handshake completes before any multifd channel
            // connects: a QEMU destination takes the first TLS channel as the main one.
            let chan = ctx.secure(chan, "main", Some(&uri), ctx.precopy_timeout())?;
            // Precopy: a destination that stops reading fails the migration after
            // precopy-timeout; only the sending side is timed (the return path may idle).
            chan.set_precopy_timeouts(ctx.precopy_timeout(), false);
            if let Ok(fd) = chan.try_clone_fd() {
                ctx.set_channel(Some(fd));
            }
            let multifd = if !caps.multifd {
                Vec::new()
            } else if file_channels {
                // mapped-ram's file channels: no handshake, no initial packet (QEMU's
                // file channels have none).
                let multifd = register(ctx, multifd_fds, false);
                return Ok(crate::engine::source::run(ctx, blocks, chan, multifd, uri)?);
            } else if let Uri::Fd(_) = uri {
                multifd_fds
            } else {
                multifd::connect(&uri, setup.channels, ctx.mailbox.cancel_token())?
            };
            let multifd = multifd
                .into_iter()
                .enumerate()
                .map(|(k, c)| {
                    let t = ctx.precopy_timeout();
                    let c = ctx.secure(c, &format!("multifd {k}"), Some(&uri), t)?;
                    multifd::send_init(&c, k, setup.uuid)?;
                    Ok(c)
                })
                .collect::<Result<Vec<_>, TransportError>>()?;
            let multifd = register(ctx, multifd, false);
            Ok(crate::engine::source::run(ctx, blocks, chan, multifd, uri)?)
        })
    }

    pub(super) fn migrate_incoming(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["uri", "exit-on-error"])?;
        let uri: Uri = a
            .str("uri")?
            .parse()
            .map_err(|e: TransportError| QmpError::generic(e.to_string()))?;
        self.check_can_start()?;
        let caps = self.ctx.caps();
        let params = self.ctx.params();
        if caps.postcopy_preempt && !caps.postcopy_ram {
            return Err(QmpError::generic("Postcopy preempt requires postcopy-ram"));
        }
        super::settings::check_start(&caps, &params)?;
        let blocks = self.migration_blocks()?;
        let tls = self.tls_setup(Role::Destination)?;
        let uffd_set = files::has_uffd(self);
        files::check(
            Role::Destination,
            &caps,
            &params,
            &uri,
            tls.is_some(),
            uffd_set,
        )?;
        if tls.is_some() && matches!(uri, Uri::File(_)) {
            return Err(QmpError::generic(
                "TLS needs a socket: file: cannot carry a TLS migration",
            ));
        }
        let setup = MultifdSetup {
            channels: params.multifd_channels,
            uuid: params.vm_uuid,
        };
        // mapped-ram, or an fd set: the files are opened now (errors answer the command).
        let opened = self.open_file_channels(Role::Destination, &uri, &caps, &params)?;
        // A connected fd:NAME brings its multifd channels as NAME-multifd-K; a listening one
        // accepts them. Checked before anything is taken.
        let multifd_names = match &uri {
            Uri::Fd(n) if caps.multifd && opened.is_none() && !self.fd_is_listener(n) => {
                self.check_multifd_fds(n, setup.channels)?
            }
            _ => Vec::new(),
        };
        let (incoming, file_multifd) = match opened {
            Some(o) => (Incoming::Ready(o.main), Some(o.multifd)),
            // Listen now so that a peer may connect as soon as this returns.
            None => (
                Incoming::open(&uri, |n| self.take_fd(n))
                    .map_err(|e| QmpError::generic(e.to_string()))?,
                None,
            ),
        };
        if caps.multifd && file_multifd.is_none() {
            if let Incoming::Ready(c) = &incoming {
                if !c.is_socket {
                    return Err(QmpError::generic(format!(
                        "multifd needs a socket: {} is not one",
                        c.peer
                    )));
                }
            }
        }
        let multifd_fds = self.take_multifd_fds(multifd_names)?;
        if caps.postcopy_preempt && !incoming.is_listener() {
            return Err(QmpError::generic(
                "Migration requires multi-channel URIs (e.g. tcp): postcopy-preempt needs a listening unix:, tcp: or fd: socket",
            ));
        }
        lock(&self.ctx.device_in).clear();
        slog::info!(self.log, "migrate-incoming"; "uri" => %uri);
        let uffd = match lock(&self.uffd).as_ref() {
            Some(fd) => Some(fd.try_clone().map_err(|e| {
                QmpError::generic(format!("cannot duplicate the userfaultfd: {e}"))
            })?),
            None => None,
        };
        self.start_worker(Role::Destination, move |ctx| {
            *lock(&ctx.tls) = tls;
            let cancel = ctx.mailbox.cancel_token();
            // With postcopy-preempt the first connection is the main channel and the next
            // one, later, the preempt channel (QEMU tells them apart by order alone); with
            // multifd too (compat-version 10.1), the one after the main and multifd ones.
            let timeout = ctx.precopy_timeout();
            let (chan, multifd, preempt) = if let Some(m) = file_multifd {
                // mapped-ram's file channels (none without multifd).
                (incoming.accept(cancel)?, m, None)
            } else if caps.multifd {
                let keep = caps.postcopy_preempt;
                let tls_on = lock(&ctx.tls).is_some();
                let secure = |c, what: &str, t| ctx.secure(c, what, None, t);
                let tls = tls_on.then_some(&secure as multifd::Secure<'_>);
                let a = multifd::accept(incoming, multifd_fds, &setup, timeout, cancel, keep, tls)?;
                (a.main, a.multifd, a.listener)
            } else if caps.postcopy_preempt {
                let c = incoming.accept_another(cancel)?;
                let c = ctx.secure(c, "main", None, timeout)?;
                (c, Vec::new(), Some(incoming))
            } else {
                let c = incoming.accept(cancel)?;
                (ctx.secure(c, "main", None, timeout)?, Vec::new(), None)
            };
            let chan = chan.with_cancel(cancel.clone());
            // Precopy: a source silent for precopy-timeout (once connected) fails the load.
            chan.set_precopy_timeouts(ctx.precopy_timeout(), true);
            if let Ok(fd) = chan.try_clone_fd() {
                ctx.set_channel(Some(fd));
            }
            // No read timeout on the multifd channels: one may idle for a whole pass (zero
            // pages go on the main channel under legacy detection); the receivers' sync
            // wait enforces precopy-timeout instead.
            let multifd = register(ctx, multifd, false);
            // Under TLS, a multifd channel that ends without close_notify was cut, unless
            // the source predates multifd-clean-tls-termination (QEMU 9.2 and older).
            let strict = ctx
                .params()
                .effective_version()
                .multifd_clean_tls_termination();
            for c in &multifd {
                c.set_tls_strict_eof(strict);
            }
            Ok(crate::engine::destination::run(
                ctx, blocks, chan, multifd, uffd, preempt,
            )?)
        })
    }

    /// `migrate-recover`.
    pub(super) fn migrate_recover(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["uri"])?;
        let uri: Uri = a
            .str("uri")?
            .parse()
            .map_err(|e: TransportError| QmpError::generic(e.to_string()))?;
        let role = *lock(&self.role);
        let fresh = self.ctx.state.status().is_finished();
        if role != Some(Role::Destination) && !fresh {
            return Err(QmpError::generic(
                "migrate-recover is for the destination; the source resumes with migrate {\"resume\": true}",
            ));
        }
        let st = self.ctx.state.status();
        // A fresh helper (the previous one died) adopts the paused migration.
        let adopt = st.is_finished() && self.ctx.caps().postcopy_ram;
        if st != MigrationStatus::PostcopyPaused && !adopt {
            return Err(QmpError::generic(format!(
                "Migrate recover can only be run when postcopy is paused (status {})",
                st.as_str()
            )));
        }
        let tls = self.tls_setup(Role::Destination)?;
        *lock(&self.ctx.tls) = tls;
        if adopt {
            let blocks = self.migration_blocks()?;
            let uffd = lock(&self.uffd)
                .as_ref()
                .map(|fd| fd.try_clone())
                .transpose()
                .map_err(|e| QmpError::generic(e.to_string()))?
                .ok_or_else(|| {
                    QmpError::generic("adopting a postcopy migration needs userfaultfd-set")
                })?;
            let incoming = Incoming::open(&uri, |n| self.take_fd(n))
                .map_err(|e| QmpError::generic(e.to_string()))?;
            slog::info!(self.log, "migrate-recover: adopting a paused postcopy migration"; "uri" => %uri);
            self.ctx
                .offer_recovery(crate::engine::migration::Recovery::Destination(incoming));
            return self.start_adopt(Role::Destination, move |ctx| {
                Ok(crate::engine::destination::adopt(ctx, blocks, uffd)?)
            });
        }
        // An on-demand restore resumes from a file (an fd set too).
        let incoming = match &uri {
            Uri::File(f) if f.fdset().is_some() => {
                let caps = self.ctx.caps();
                let o = self
                    .open_file_channels(Role::Destination, &uri, &caps, &self.ctx.params())?
                    .ok_or_else(|| QmpError::generic(format!("cannot open {uri}")))?;
                Incoming::Ready(o.main)
            }
            _ => Incoming::open(&uri, |n| self.take_fd(n))
                .map_err(|e| QmpError::generic(e.to_string()))?,
        };
        slog::info!(self.log, "migrate-recover"; "uri" => %uri);
        self.ctx
            .offer_recovery(crate::engine::migration::Recovery::Destination(incoming));
        Ok(json!({}))
    }

    /// The names of `fd:NAME`'s multifd channels, once all are known to be there.
    fn check_multifd_fds(&self, name: &str, channels: u8) -> Result<Vec<String>, QmpError> {
        let fds = lock(&self.fds);
        if !fds.contains_key(name) {
            return Err(QmpError::generic(format!(
                "File descriptor named '{name}' not found"
            )));
        }
        let names: Vec<String> = (0..channels).map(|k| multifd::fd_name(name, k)).collect();
        if let Some(missing) = names.iter().find(|n| !fds.contains_key(n.as_str())) {
            return Err(QmpError::generic(
                MultifdError::MissingFd {
                    channels,
                    name: missing.clone(),
                }
                .to_string(),
            ));
        }
        Ok(names)
    }

    /// Takes the multifd channels' fds (checked by [`Helper::check_multifd_fds`]); each must
    /// be a connected stream socket.
    fn take_multifd_fds(&self, names: Vec<String>) -> Result<Vec<Channel>, QmpError> {
        let fds: Vec<_> = names
            .into_iter()
            .map(|n| {
                let fd = self.take_fd(&n);
                (n, fd)
            })
            .collect();
        let mut chans = Vec::with_capacity(fds.len());
        for (name, fd) in fds {
            let fd = fd.ok_or_else(|| {
                QmpError::generic(format!("File descriptor named '{name}' not found"))
            })?;
            let c = Channel::from_fd(&name, fd).map_err(|e| QmpError::generic(e.to_string()))?;
            if !c.is_socket {
                return Err(QmpError::generic(
                    MultifdError::NotSocket { name }.to_string(),
                ));
            }
            chans.push(c);
        }
        Ok(chans)
    }

    /// Whether the fd named `name` is a listening socket (false when there is none).
    fn fd_is_listener(&self, name: &str) -> bool {
        lock(&self.fds).get(name).is_some_and(|fd| {
            nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::AcceptConn).unwrap_or(false)
        })
    }

    /// Starts a migration thread after the state moved to `setup`.
    pub(super) fn start_worker(
        &self,
        role: Role,
        f: impl FnOnce(&MigrationCtx) -> Result<(), WorkerError> + Send + 'static,
    ) -> CmdResult {
        self.spawn_worker(role, true, f)
    }

    /// Resets the shared state and runs `f` on a migration thread; `setup` moves the status
    /// to `setup` first (a new migration, not an adopted one).
    pub(super) fn spawn_worker(
        &self,
        role: Role,
        setup: bool,
        f: impl FnOnce(&MigrationCtx) -> Result<(), WorkerError> + Send + 'static,
    ) -> CmdResult {
        // Reap the previous worker (finished, since the status is final).
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
        self.ctx.reset_for_new_migration();
        if setup {
            self.ctx
                .state
                .transition(MigrationStatus::Setup)
                .map_err(|e| QmpError::generic(e.to_string()))?;
        }
        *lock(&self.role) = Some(role);
        *lock(&self.ctx.started) = Some(std::time::Instant::now());
        let ctx = self.ctx.clone();
        // To name a block that shrank under the migration in its error.
        let blocks = lock(&self.blocks).clone();
        let h = std::thread::Builder::new()
            .name(format!("qmh-{role:?}").to_lowercase())
            .spawn(move || {
                let r = f(&ctx);
                ctx.set_channel(None);
                // Failed and cancelled runs report how long they ran too.
                if ctx.stats.total_time_us.load(Ordering::Relaxed) == 0 {
                    if let Some(t) = *lock(&ctx.started) {
                        ctx.stats
                            .total_time_us
                            .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                }
                match r {
                    Ok(()) => {}
                    Err(_)
                        if ctx.cancelled() && ctx.state.status() == MigrationStatus::Cancelling =>
                    {
                        let _ = ctx.state.transition(MigrationStatus::Cancelled);
                    }
                    Err(e) => ctx
                        .state
                        .fail(crate::memory::block::explain_loss(&blocks, e.to_string())),
                }
            })
            .map_err(|e| QmpError::generic(format!("cannot start the migration thread: {e}")))?;
        *lock(&self.worker) = Some(h);
        Ok(json!({}))
    }

    /// Starts the thread of an adopted postcopy migration: it moves to postcopy-paused
    /// itself (the recovery is already offered); the reply waits until it has.
    pub(super) fn start_adopt(
        &self,
        role: Role,
        f: impl FnOnce(&MigrationCtx) -> Result<(), WorkerError> + Send + 'static,
    ) -> CmdResult {
        self.spawn_worker(role, false, f)?;
        self.ctx
            .state
            .wait_for(std::time::Duration::from_secs(2), |s| !s.is_finished());
        Ok(json!({}))
    }
}

/// Readies the multifd channels as the main one: the cancel token, `precopy-timeout` (on
/// reads too for a destination), and registered so that a cancel shuts them down.
fn register(ctx: &MigrationCtx, chans: Vec<Channel>, reads_too: bool) -> Vec<Channel> {
    chans
        .into_iter()
        .map(|c| {
            let c = c.with_cancel(ctx.mailbox.cancel_token().clone());
            c.set_precopy_timeouts(ctx.precopy_timeout(), reads_too);
            if let Ok(fd) = c.try_clone_fd() {
                ctx.add_channel(fd);
            }
            c
        })
        .collect()
}
