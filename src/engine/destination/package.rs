//! The destination's side of the PACKAGED command, kept out of the loader: when a package
//! may be read at all, and turning its device bytes into bounded, checked sections.

use crate::wire::device_intake::DeviceIntake;
use crate::wire::device_state::DeviceSection;
use crate::wire::postcopy;
use crate::wire::stream;

/// Refuses a package before any of it is buffered: too long, without POSTCOPY_ADVISE
/// (QEMU: "CMD_POSTCOPY_LISTEN in wrong postcopy state"), or after a LISTEN.
pub fn check_before_buffering(len: u32, advised: bool, listening: bool) -> Result<(), String> {
    if len > stream::MAX_PACKAGED_LEN {
        return Err(format!(
            "postcopy package of {len} bytes, more than the limit of {}",
            stream::MAX_PACKAGED_LEN
        ));
    }
    if !advised {
        return Err(format!(
            "postcopy package ({len} bytes) without POSTCOPY_ADVISE: postcopy was not advised"
        ));
    }
    if listening {
        return Err("a second postcopy package (POSTCOPY_LISTEN already came)".into());
    }
    Ok(())
}

/// The device sections of a package, each admitted by `intake` (count, duplicates).
pub fn sections(devices: &[u8], intake: &mut DeviceIntake) -> Result<Vec<DeviceSection>, String> {
    let parts = postcopy::split_full_sections(devices).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(parts.len());
    for (i, (h, range)) in parts.into_iter().enumerate() {
        intake.admit(&h).map_err(|e| e.to_string())?;
        let raw = devices.get(range).unwrap_or_default().to_vec();
        out.push(DeviceSection::from_raw(i, raw).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_before_buffering() {
        assert!(check_before_buffering(100, true, false).is_ok());
        let e = check_before_buffering(1 << 30, false, false).unwrap_err();
        assert!(e.contains("not advised"), "{e}");
        assert!(check_before_buffering(100, true, true).is_err());
        assert!(check_before_buffering(u32::MAX, true, false).is_err());
    }
}
