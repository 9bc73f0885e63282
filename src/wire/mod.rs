//! The migration stream on the wire: pure encoders and decoders over byte buffers, with no
//! sockets or threads, as QEMU's `migration/savevm.c` and `ram.c` write them.

pub mod device_intake;
pub mod device_state;
pub mod mapped_ram;
pub mod multifd;
pub mod postcopy;
pub mod ram;
pub mod return_path;
pub mod stream;
pub mod tls;
