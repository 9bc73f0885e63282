//! A precopy destination that meets a device section before it knows the VM description
//! (which QEMU sends after EOF) holds the rest of the stream until the description has
//! come: at most [`MAX_HELD`] bytes, read in 1 MiB steps.

use std::io::Read;
use std::ops::Range;

use crate::engine::destination::error::{LoadError, Violation};
use crate::engine::destination::reader::ReadError;
use crate::vmstate::VmdescFinder;

/// The most a destination holds while waiting for the VM description: the device-state
/// cap (precopy device sections and the description together).
pub(crate) const MAX_HELD: usize = 1 << 30;

/// The held stream: `bytes[..=eof_at]` are the sections up to and including EOF, `json`
/// the description after them.
pub(crate) struct Held {
    pub(crate) bytes: Vec<u8>,
    pub(crate) eof_at: usize,
    pub(crate) json: Range<usize>,
}

/// Reads from `src` after `bytes` (already read, at stream offset `base`) until the
/// stream ends with EOF and a VM description.
pub(crate) fn hold<R: Read>(
    src: &mut R,
    mut bytes: Vec<u8>,
    base: u64,
    peer: &str,
) -> Result<Held, LoadError> {
    let mut finder = VmdescFinder::default();
    loop {
        if let Some((eof_at, json)) = finder.find(&bytes) {
            return Ok(Held {
                bytes,
                eof_at,
                json,
            });
        }
        let len = bytes.len();
        if len > MAX_HELD {
            return Err(LoadError::Invalid {
                offset: base + len as u64,
                source: Violation::HeldTooLarge {
                    mib: MAX_HELD >> 20,
                },
            });
        }
        bytes.resize(len + (1 << 20), 0);
        let n = loop {
            match src.read(&mut bytes[len..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match n {
            Ok(0) => {
                return Err(LoadError::Read(ReadError::Truncated {
                    offset: base + len as u64,
                    context: "device sections without a VM description after EOF",
                }))
            }
            Ok(n) => bytes.truncate(len + n),
            Err(source) => {
                return Err(LoadError::Read(ReadError::Io {
                    peer: peer.to_string(),
                    offset: base + len as u64,
                    source,
                }))
            }
        }
    }
}
