//! The parent's guest memory: RAM blocks mapped from its fds, their dirty bitmaps, the
//! guard against a parent that shrinks them, and the threads that write received pages.

pub(crate) mod bits;
pub(crate) mod block;
pub(crate) mod dirty_bitmap;
pub(crate) mod error;
pub(crate) mod guard;
pub(crate) mod page;
pub(crate) mod page_writer;
