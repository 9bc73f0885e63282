//! Errors of VM description parsing and device-body walking.

/// What went wrong while reading a VM description or walking a device body.
///
/// Offsets are relative to the start of the body passed in (the first byte
/// after the FULL/START section header). `field` is a path such as
/// `env.segs[2].base` or `fw_cfg/dma.dma_addr`; empty when the error is not
/// about one field.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// The description is not JSON at all.
    #[error("VM description is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),

    /// The JSON does not have the shape QEMU writes (missing key, wrong type,
    /// nesting too deep).
    #[error("bad VM description (device {device:?}, field {field:?}): {reason}")]
    BadDescription {
        device: String,
        field: String,
        reason: String,
    },

    /// The body ends before the description is satisfied. More bytes may fix
    /// it: at least `need` bytes of body are required to get further.
    #[error("device {device:?}: body truncated at offset {offset} in {field:?} (need at least {need} bytes)")]
    Truncated {
        device: String,
        field: String,
        offset: usize,
        need: usize,
    },

    /// A subsection listed in the description does not start with 0x05.
    #[error("device {device:?}: expected subsection {subsection:?} (marker 0x05) at offset {offset}, found byte {found:#04x}")]
    SubsectionMarker {
        device: String,
        subsection: String,
        offset: usize,
        found: u8,
    },

    /// The subsection name on the wire is not the one described.
    #[error(
        "device {device:?}: expected subsection {expected:?} at offset {offset}, found {found:?}"
    )]
    SubsectionName {
        device: String,
        expected: String,
        found: String,
        offset: usize,
    },

    /// The subsection version on the wire is not the one described.
    #[error("device {device:?}: subsection {subsection:?} at offset {offset} has version {found}, described as {expected}")]
    SubsectionVersion {
        device: String,
        subsection: String,
        offset: usize,
        expected: u64,
        found: u32,
    },

    /// A nested struct's fields did not add up to the field's declared `size`.
    #[error("device {device:?}: field {field:?} at offset {offset} declares {declared} bytes but its contents take {actual}")]
    SizeMismatch {
        device: String,
        field: String,
        offset: usize,
        declared: u64,
        actual: u64,
    },

    /// Sizes or counts that overflow.
    #[error("device {device:?}: field {field:?} at offset {offset} is too large")]
    TooLarge {
        device: String,
        field: String,
        offset: usize,
    },

    /// Decoding would take more memory than the decode budget allows: the
    /// section is fine, but too large to decode (its raw bytes are kept).
    #[error("device {device:?}: too large to decode (field {field:?} at offset {offset} goes over the {limit}-byte decode budget)")]
    DecodeLimit {
        device: String,
        field: String,
        offset: usize,
        limit: usize,
    },
}

impl VmStateError {
    /// True when more body bytes might let the walk succeed.
    pub fn is_truncated(&self) -> bool {
        matches!(self, VmStateError::Truncated { .. })
    }
}
