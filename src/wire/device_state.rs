//! Device state: the non-RAM sections of a migration, kept byte-exact.
//!
//! A destination keeps every device section it receives as the exact bytes it read (type
//! byte through footer), so that handing them to a source with `device-state-set` reproduces
//! them on the wire. A section is either given as its body (`idstr`, `instance-id`,
//! `version-id`, `data`), which the helper frames as a FULL section, or `raw`.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use crate::wire::stream::{self, SectionHeader, SectionKind, Token};

/// Section ids the helper gives to sections it frames itself (QEMU's own ids are small
/// registration counters; a FULL section's id is only checked against its own footer).
const FIRST_OWN_SECTION_ID: u32 = 0x100;

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSection {
    pub header: SectionHeader,
    /// Type byte through footer, exactly as sent or received.
    pub raw: Vec<u8>,
    /// Where the body lies in `raw`.
    pub body: std::ops::Range<usize>,
    /// The device's entry of the VM description, when one was available; shared with the
    /// description (and other sections), never copied per section.
    pub description: Option<Arc<Value>>,
    /// Decoded field values, when a description was available.
    pub fields: Option<Value>,
    /// Why `fields` is absent although a description was available (for example "too
    /// large to decode").
    pub fields_error: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceStateError {
    #[error("section {index}: {msg}")]
    Bad { index: usize, msg: String },
}

fn bad(index: usize, msg: impl Into<String>) -> DeviceStateError {
    DeviceStateError::Bad {
        index,
        msg: msg.into(),
    }
}

impl DeviceSection {
    /// Frames a body as a FULL section with its footer.
    pub fn from_body(header: SectionHeader, body: &[u8]) -> Result<Self, stream::WireError> {
        let mut raw = Vec::with_capacity(body.len() + header.idstr.len() + 20);
        stream::encode_section_start(&mut raw, SectionKind::Full, &header)?;
        let start = raw.len();
        raw.extend_from_slice(body);
        let end = raw.len();
        stream::encode_footer(&mut raw, header.section_id);
        Ok(DeviceSection {
            header,
            raw,
            body: start..end,
            description: None,
            fields: None,
            fields_error: None,
        })
    }

    /// Takes one framed FULL section: header, body, footer (the last five bytes).
    pub fn from_raw(index: usize, raw: Vec<u8>) -> Result<Self, DeviceStateError> {
        let (header, hlen) = match stream::decode_token(&raw) {
            Ok(Some((Token::Full(h), n))) => (h, n),
            Ok(Some(_)) => {
                return Err(bad(
                    index,
                    "raw bytes must start with a FULL section (0x04)",
                ))
            }
            Ok(None) => return Err(bad(index, "raw section is truncated")),
            Err(e) => return Err(bad(index, e.to_string())),
        };
        let foot_at = raw
            .len()
            .checked_sub(5)
            .filter(|&f| f >= hlen)
            .ok_or_else(|| bad(index, "raw section has no footer"))?;
        match stream::decode_footer(&raw[foot_at..], header.section_id) {
            Ok(Some(_)) => {}
            _ => {
                return Err(bad(
                    index,
                    format!(
                        "raw section {:?} does not end with its footer (one section per element)",
                        header.idstr
                    ),
                ))
            }
        }
        Ok(DeviceSection {
            header,
            raw,
            body: hlen..foot_at,
            description: None,
            fields: None,
            fields_error: None,
        })
    }

    pub fn body(&self) -> &[u8] {
        &self.raw[self.body.clone()]
    }

    /// The element `query-device-state` returns.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "idstr": self.header.idstr,
            "instance-id": self.header.instance_id,
            "version-id": self.header.version_id,
            "section-id": self.header.section_id,
            "data": B64.encode(self.body()),
            "raw": B64.encode(&self.raw),
        });
        if let Some(d) = &self.description {
            v["description"] = Value::clone(d);
        }
        if let Some(f) = &self.fields {
            v["fields"] = f.clone();
        }
        if let Some(e) = &self.fields_error {
            v["fields-error"] = Value::from(e.as_str());
        }
        v
    }

    /// The sections of `device-state-set`, validated.
    pub fn list_from_json(v: &Value) -> Result<Vec<Self>, DeviceStateError> {
        let arr = v
            .as_array()
            .ok_or_else(|| bad(0, "'sections' must be an array"))?;
        let mut out = Vec::with_capacity(arr.len());
        for (i, e) in arr.iter().enumerate() {
            let obj = e
                .as_object()
                .ok_or_else(|| bad(i, "each section must be an object"))?;
            let b64 = |k: &str| -> Result<Option<Vec<u8>>, DeviceStateError> {
                match obj.get(k) {
                    None => Ok(None),
                    Some(Value::String(s)) => B64
                        .decode(s)
                        .map(Some)
                        .map_err(|e| bad(i, format!("'{k}' is not base64: {e}"))),
                    Some(_) => Err(bad(i, format!("'{k}' must be a base64 string"))),
                }
            };
            let mut s = if let Some(raw) = b64("raw")? {
                DeviceSection::from_raw(i, raw)?
            } else {
                let idstr = obj
                    .get("idstr")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(i, "needs 'raw', or 'idstr' with 'data'"))?;
                let num = |k: &str| -> Result<u32, DeviceStateError> {
                    obj.get(k)
                        .and_then(Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad(i, format!("'{k}' must be an integer 0..2^32")))
                };
                let data = b64("data")?.ok_or_else(|| bad(i, "'data' is missing"))?;
                let header = SectionHeader {
                    section_id: FIRST_OWN_SECTION_ID + i as u32,
                    idstr: idstr.to_string(),
                    instance_id: num("instance-id")?,
                    version_id: num("version-id")?,
                };
                DeviceSection::from_body(header, &data).map_err(|e| bad(i, e.to_string()))?
            };
            if let Some(d) = obj.get("description") {
                if !d.is_object() {
                    return Err(bad(i, "'description' must be an object"));
                }
                s.description = Some(Arc::new(d.clone()));
            }
            out.push(s);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_and_raw_roundtrip() {
        let s = DeviceSection::list_from_json(&json!([
            {"idstr": "timer", "instance-id": 0, "version-id": 2, "data": B64.encode([1u8, 2, 3])}
        ]))
        .unwrap();
        assert_eq!(s[0].body(), &[1, 2, 3]);
        let again =
            DeviceSection::list_from_json(&json!([{"raw": s[0].to_json()["raw"]}])).unwrap();
        assert_eq!(again[0].raw, s[0].raw);
        assert_eq!(again[0].header, s[0].header);
    }

    #[test]
    fn rejects_bad_elements() {
        for bad in [
            json!({}),
            json!([1]),
            json!([{"raw": "!!"}]),
            json!([{"raw": B64.encode([4u8, 0, 0])}]),
            json!([{"raw": B64.encode([2u8, 0, 0, 0, 1])}]),
            json!([{"idstr": "x", "instance-id": -1, "version-id": 1, "data": ""}]),
            json!([{"idstr": "x", "instance-id": 0, "version-id": 1}]),
        ] {
            assert!(DeviceSection::list_from_json(&bad).is_err(), "{bad}");
        }
        // A raw element whose footer names another section.
        let mut s = DeviceSection::from_body(
            SectionHeader {
                section_id: 3,
                idstr: "a".into(),
                instance_id: 0,
                version_id: 1,
            },
            &[9],
        )
        .unwrap();
        let n = s.raw.len();
        s.raw[n - 1] = 4;
        assert!(DeviceSection::from_raw(0, s.raw).is_err());
    }
}
