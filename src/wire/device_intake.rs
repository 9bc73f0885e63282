//! What a destination (or `analyze`) keeps of the device sections it receives, bounded:
//! at most [`MAX_DEVICE_SECTIONS`] sections, each (idstr, instance) once, descriptions
//! shared with the VM description, and decoded fields within one [`DecodeBudget`] for the
//! whole stream.

use std::collections::HashSet;
use std::sync::Arc;

use crate::vmstate::{self, DecodeBudget, DeviceDesc};
use crate::wire::device_state::DeviceSection;
use crate::wire::stream::SectionHeader;

/// Most device sections one stream may carry (QEMU sends one per device instance: a few
/// hundred for a large machine). Each costs a few hundred bytes of bookkeeping besides
/// its bytes, so a stream of tiny sections must not be able to make millions.
pub const MAX_DEVICE_SECTIONS: usize = 1 << 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntakeError {
    #[error("more than {MAX_DEVICE_SECTIONS} device sections")]
    TooMany,
    #[error("device section {idstr:?} instance {instance_id} sent twice")]
    Duplicate { idstr: String, instance_id: u32 },
}

/// The device sections of one stream so far.
#[derive(Debug, Default)]
pub struct DeviceIntake {
    seen: HashSet<(String, u32)>,
    budget: DecodeBudget,
}

impl DeviceIntake {
    /// Checks a section header before its body is kept: the count, and that QEMU's rule of
    /// one section per (idstr, instance) holds (a repeated section would otherwise repeat
    /// its description in every `query-device-state` element).
    pub fn admit(&mut self, h: &SectionHeader) -> Result<(), IntakeError> {
        if self.seen.len() >= MAX_DEVICE_SECTIONS {
            return Err(IntakeError::TooMany);
        }
        if !self.seen.insert((h.idstr.clone(), h.instance_id)) {
            return Err(IntakeError::Duplicate {
                idstr: h.idstr.clone(),
                instance_id: h.instance_id,
            });
        }
        Ok(())
    }

    /// Attaches the (shared) description and, within the stream's budget, the decoded
    /// fields; a decode that fails says why in `fields_error`.
    pub fn describe(&mut self, sec: &mut DeviceSection, d: &DeviceDesc) {
        sec.description = Some(Arc::clone(&d.json));
        match vmstate::decode_fields_within(d, sec.body(), &mut self.budget) {
            Ok(f) => sec.fields = Some(f),
            Err(e) => sec.fields_error = Some(e.to_string()),
        }
    }

    /// Decodes for `analyze`: the fields, or why not.
    pub fn decode(&mut self, d: &DeviceDesc, body: &[u8]) -> Result<serde_json::Value, String> {
        vmstate::decode_fields_within(d, body, &mut self.budget).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header(idstr: &str, instance_id: u32) -> SectionHeader {
        SectionHeader {
            section_id: 1,
            idstr: idstr.into(),
            instance_id,
            version_id: 1,
        }
    }

    #[test]
    fn counts_and_duplicates() {
        let mut i = DeviceIntake::default();
        i.admit(&header("a", 0)).unwrap();
        i.admit(&header("a", 1)).unwrap();
        assert!(matches!(
            i.admit(&header("a", 0)),
            Err(IntakeError::Duplicate { .. })
        ));
        let mut i = DeviceIntake::default();
        for n in 0..MAX_DEVICE_SECTIONS as u32 {
            i.admit(&header("d", n)).unwrap();
        }
        assert_eq!(i.admit(&header("e", 0)), Err(IntakeError::TooMany));
    }

    #[test]
    fn descriptions_are_shared_and_decodes_budgeted() {
        let d = DeviceDesc::from_json(json!({"name": "big", "instance_id": 0,
            "fields": [{"name": "a", "type": "buffer", "size": 12 << 20}]}))
        .unwrap();
        let mut i = DeviceIntake::default();
        let mut ok = 0;
        for n in 0..3 {
            let mut s = DeviceSection::from_body(header("big", n), &vec![1u8; 12 << 20]).unwrap();
            i.describe(&mut s, &d);
            assert!(Arc::ptr_eq(s.description.as_ref().unwrap(), &d.json));
            match (&s.fields, &s.fields_error) {
                (Some(_), None) => ok += 1,
                (None, Some(e)) => assert!(e.contains("too large to decode"), "{e}"),
                other => panic!("{other:?}"),
            }
        }
        // 24 MiB of hex each: the 32 MiB stream budget takes one.
        assert_eq!(ok, 1);
    }
}
