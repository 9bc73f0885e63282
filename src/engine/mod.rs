//! The migration engines: the source and destination threads, the state they share with
//! the control channel, and the state machine.

pub(crate) mod destination;
pub(crate) mod latency;
pub(crate) mod mailbox;
pub(crate) mod migration;
pub(crate) mod priority;
pub(crate) mod source;
pub(crate) mod state;
pub(crate) mod throttle;
