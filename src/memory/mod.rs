//! The parent's guest memory: RAM blocks mapped from its fds, their dirty bitmaps, the
//! guard against a parent that shrinks them, and the threads that write received pages.

// `pub` only while the engines' entry points (`source::run`, `destination::load`, ...) are,
// since they take `Arc<RamBlock>`: the lead makes it `pub(crate)` with them.
pub mod block;
pub(crate) mod dirty_bitmap;
pub(crate) mod guard;
// The guest-memory API the engines move to (issue 11); until both have, parts of it are
// unused. The lead removes this `allow` at the merge (and what is still unused then).
#[allow(dead_code)]
pub(crate) mod page;
pub(crate) mod page_writer;
