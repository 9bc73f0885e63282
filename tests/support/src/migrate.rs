//! Connecting two ends (helpers or QEMUs, each by its QMP client) and starting or
//! recovering a migration between them, as their parent VMM would.

use std::os::fd::{AsFd, OwnedFd};

use qemu_migration_helper::client::HelperClient;

use crate::util::TempDir;

/// A connected socketpair for a migration channel.
pub fn socketpair() -> (OwnedFd, OwnedFd) {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

/// Passes the two ends of a connection to a source and a destination, helpers or QEMUs
/// (each by its QMP client), as `name` (for `fd:NAME`); the test keeps neither end.
pub fn pass_ends(
    src: &mut HelperClient,
    dst: &mut HelperClient,
    name: &str,
    (src_end, dst_end): (OwnedFd, OwnedFd),
) {
    src.getfd(name, src_end.as_fd())
        .expect("getfd on the source");
    dst.getfd(name, dst_end.as_fd())
        .expect("getfd on the destination");
}

/// `pass_ends` with a fresh socketpair.
pub fn pass_socketpair(src: &mut HelperClient, dst: &mut HelperClient, name: &str) {
    pass_ends(src, dst, name, socketpair());
}

/// Starts a precopy migration from `src` to `dst` (helpers or QEMUs, each by its QMP
/// client) over a socketpair passed to both as "mig": `migrate-incoming fd:mig` on `dst`,
/// then `migrate fd:mig` on `src`.
pub fn start_fd_migration(src: &mut HelperClient, dst: &mut HelperClient) {
    start_fd_migration_over(src, dst, socketpair());
}

/// Starts a migration from `src` to `dst`: with `listener`, over a `unix:` listener of the
/// destination's in `dir` (postcopy-preempt needs a second connection); otherwise over a
/// socketpair, as `start_fd_migration`. Returns the URI both ends were given.
pub fn start_migration(
    src: &mut HelperClient,
    dst: &mut HelperClient,
    dir: &TempDir,
    listener: bool,
) -> String {
    let uri = if listener {
        format!("unix:{}", dir.join("mig.sock").display())
    } else {
        pass_socketpair(src, dst, "mig");
        "fd:mig".to_string()
    };
    dst.migrate_incoming(&uri).expect("migrate-incoming");
    src.migrate(&uri).expect("migrate");
    uri
}

/// `start_fd_migration` over the given connection (e.g. a link the test can cut).
pub fn start_fd_migration_over(
    src: &mut HelperClient,
    dst: &mut HelperClient,
    ends: (OwnedFd, OwnedFd),
) {
    pass_ends(src, dst, "mig", ends);
    dst.migrate_incoming("fd:mig").expect("migrate-incoming");
    src.migrate("fd:mig").expect("migrate");
}

/// Recovers a paused postcopy over a fresh socketpair passed to both ends as `name`:
/// `migrate-recover fd:NAME` on `dst` (out of band with `oob`, as a helper's parent sends
/// it), then `migrate fd:NAME` with `resume` on `src`.
pub fn recover_over_socketpair(
    src: &mut HelperClient,
    dst: &mut HelperClient,
    name: &str,
    oob: bool,
) {
    recover_over(src, dst, name, oob, socketpair());
}

/// `recover_over_socketpair` over the given connection (e.g. a link the test can cut).
pub fn recover_over(
    src: &mut HelperClient,
    dst: &mut HelperClient,
    name: &str,
    oob: bool,
    ends: (OwnedFd, OwnedFd),
) {
    pass_ends(src, dst, name, ends);
    let uri = format!("fd:{name}");
    let args = serde_json::json!({ "uri": uri });
    if oob {
        dst.execute_oob("migrate-recover", args)
    } else {
        dst.execute("migrate-recover", args)
    }
    .expect("migrate-recover");
    src.migrate_resume(&uri).expect("migrate resume");
}
