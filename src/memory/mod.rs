//! The parent's guest memory: RAM blocks mapped from its fds, their dirty bitmaps, the
//! guard against a parent that shrinks them, and the threads that write received pages.

pub mod block;
pub mod dirty_bitmap;
pub mod guard;
// The guest-memory API the engines move to (issue 11); until both have, parts of it are
// unused. The lead removes this `allow` at the merge (and what is still unused then).
#[allow(dead_code)]
pub mod page;
pub mod page_writer;
