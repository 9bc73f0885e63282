//! The migration engines: the source and destination threads, the state they share with
//! the control channel, and the state machine.

pub mod destination;
pub mod mailbox;
pub mod migration;
pub mod source;
pub mod state;
