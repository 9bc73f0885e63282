//! The example's one error type: every failure names what the VMM was doing.

use qemu_migration_helper::client::ClientError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum VmmError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("{0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("helper: {0}")]
    Helper(#[from] ClientError),
    #[error("vCPU state: {0}")]
    CpuState(String),
    #[error("guest: {0}")]
    Guest(String),
    #[error("migration: {0}")]
    Migration(String),
    #[error("{0} thread panicked")]
    Panicked(&'static str),
}

/// `map_err` shorthand for KVM ioctls.
pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(what, e)
}

/// Joins one of the VMM's threads, turning a panic into an error.
pub(crate) fn join<T>(
    what: &'static str,
    handle: std::thread::JoinHandle<Result<T, VmmError>>,
) -> Result<T, VmmError> {
    handle.join().map_err(|_| VmmError::Panicked(what))?
}
