//! The parent's guest memory: RAM blocks mapped from its fds, their dirty bitmaps, the
//! guard against a parent that shrinks them, and the threads that write received pages.

pub mod block;
pub mod dirty_bitmap;
pub mod guard;
pub mod page_writer;
