//! How much memory decoding device fields may take.
//!
//! A decoded field is a `serde_json::Value`: tens of bytes per element however small the
//! element is on the wire, and hex strings of twice the bytes. Without a bound, one 64 MiB
//! `uint8` array became 64 Mi values (4+ GiB). Every value and string a decode produces is
//! charged here first, at a deliberately high estimate, and the decode stops with
//! [`super::VmStateError::DecodeLimit`] when the budget is spent: the section keeps its
//! raw bytes and is reported as too large to decode.

/// Charged per JSON value (a `Value` in an array, or a key and value in an object, with
/// the allocator's and the map's overhead).
pub(crate) const VALUE_COST: usize = 128;

/// An object (a struct element or subsection) is charged as this many values: its map
/// allocates a table and an entry array besides the value (measured: a one-member object
/// in an array takes ~480 bytes, a number ~80).
pub(crate) const OBJECT_VALUES: usize = 3;

/// What one stream (every section of a destination's load, or of one `analyze` file) may
/// spend on decoded fields, in estimated bytes.
pub const DECODE_BUDGET: usize = 32 << 20;

/// The estimated bytes left for decoded fields; shared by the sections of one stream so
/// that the total, not just each section, is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeBudget {
    left: usize,
    limit: usize,
}

impl DecodeBudget {
    pub fn new(limit: usize) -> Self {
        DecodeBudget { left: limit, limit }
    }

    /// The budget the helper uses for one stream ([`DECODE_BUDGET`]).
    pub fn per_stream() -> Self {
        Self::new(DECODE_BUDGET)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn left(&self) -> usize {
        self.left
    }

    /// Takes `bytes` from the budget; false (and nothing taken) when it has not as many.
    pub(crate) fn take(&mut self, bytes: usize) -> bool {
        match self.left.checked_sub(bytes) {
            Some(l) => {
                self.left = l;
                true
            }
            None => false,
        }
    }
}

impl Default for DecodeBudget {
    fn default() -> Self {
        Self::per_stream()
    }
}
