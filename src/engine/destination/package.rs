//! The destination's side of the PACKAGED command, kept out of the loader: when a package
//! may be read at all, and turning its device bytes into bounded, checked sections.

use crate::wire::device_intake::{DeviceIntake, IntakeError};
use crate::wire::device_state::{DeviceSection, DeviceStateError};
use crate::wire::postcopy;
use crate::wire::stream::{self, WireError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum PackageError {
    #[error(
        "postcopy package of {len} bytes, more than the limit of {}",
        stream::MAX_PACKAGED_LEN
    )]
    TooLong { len: u32 },
    #[error("postcopy package ({len} bytes) without POSTCOPY_ADVISE: postcopy was not advised")]
    NotAdvised { len: u32 },
    #[error("a second postcopy package (POSTCOPY_LISTEN already came)")]
    AfterListen,
    #[error("{0}")]
    Split(#[source] WireError),
    #[error("{0}")]
    Intake(#[source] IntakeError),
    #[error("{0}")]
    Section(#[source] DeviceStateError),
}

/// Refuses a package before any of it is buffered: too long, without POSTCOPY_ADVISE
/// (QEMU: "CMD_POSTCOPY_LISTEN in wrong postcopy state"), or after a LISTEN.
pub(crate) fn check_before_buffering(
    len: u32,
    advised: bool,
    listening: bool,
) -> Result<(), PackageError> {
    if len > stream::MAX_PACKAGED_LEN {
        return Err(PackageError::TooLong { len });
    }
    if !advised {
        return Err(PackageError::NotAdvised { len });
    }
    if listening {
        return Err(PackageError::AfterListen);
    }
    Ok(())
}

/// The device sections of a package, each admitted by `intake` (count, duplicates).
pub(crate) fn sections(
    devices: &[u8],
    intake: &mut DeviceIntake,
) -> Result<Vec<DeviceSection>, PackageError> {
    let parts = postcopy::split_full_sections(devices).map_err(PackageError::Split)?;
    let mut out = Vec::with_capacity(parts.len());
    for (i, (h, range)) in parts.into_iter().enumerate() {
        intake.admit(&h).map_err(PackageError::Intake)?;
        let raw = devices.get(range).unwrap_or_default().to_vec();
        out.push(DeviceSection::from_raw(i, raw).map_err(PackageError::Section)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_before_buffering() {
        assert!(check_before_buffering(100, true, false).is_ok());
        let e = check_before_buffering(1 << 30, false, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not advised"), "{e}");
        assert!(check_before_buffering(100, true, true).is_err());
        assert!(check_before_buffering(u32::MAX, true, false).is_err());
    }
}
