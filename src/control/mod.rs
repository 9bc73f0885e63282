//! The control channel: a QMP dialect on a Unix socket (see the man page, CONTROL
//! PROTOCOL). [`protocol`] holds its vocabulary and message shapes, shared with
//! [`crate::client`]; the rest is the helper's server (feature `helper`): `server` (the
//! connection loop), `qmp` and `framing` (reading commands and their fds), `commands` (the
//! handlers), `events` (the writer thread), `listen` (`--control-socket`) and `orphan`
//! (what a parent's death does).

pub mod protocol;

#[cfg(feature = "helper")]
mod commands;
#[cfg(feature = "helper")]
pub(crate) mod events;
#[cfg(feature = "helper")]
pub(crate) mod framing;
/// `pub` (hidden) for the interop tests' `own_uid`.
#[cfg(feature = "helper")]
#[doc(hidden)]
pub mod listen;
#[cfg(feature = "helper")]
mod orphan;
#[cfg(feature = "helper")]
pub(crate) mod qmp;
#[cfg(feature = "helper")]
mod server;

#[cfg(feature = "helper")]
pub(crate) use commands::Helper;
#[cfg(feature = "helper")]
pub(crate) use server::{serve_fd, serve_socket};
