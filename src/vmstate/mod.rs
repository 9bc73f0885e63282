//! VM descriptions and section codecs.
//!
//! QEMU appends a JSON description of every device section after
//! QEMU_VM_EOF. With it, a reader that knows no devices can delimit each
//! FULL section ([`body_len`]) and show its contents ([`decode_fields`]);
//! a helper acting as a source writes one with [`VmDescriptionBuilder`].

mod budget;
mod desc;
mod error;
mod group;
mod trailer;
mod walk;

#[cfg(test)]
mod fixture_tests;

use serde_json::{json, Map, Value};

pub use budget::{DecodeBudget, DECODE_BUDGET};
pub use desc::{DeviceDesc, VmDescription};
pub use error::VmStateError;
pub use trailer::{find_trailing_vmdesc, VmdescFinder};
pub use walk::{body_len, decode_fields, decode_fields_within};

/// Builds the description a source writes after EOF (`0x06`, be32 length,
/// then [`Self::to_json_bytes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct VmDescriptionBuilder {
    page_size: u64,
    configuration: Option<Value>,
    devices: Vec<Value>,
}

impl VmDescriptionBuilder {
    pub fn new(page_size: u64) -> Self {
        VmDescriptionBuilder {
            page_size,
            configuration: None,
            devices: Vec::new(),
        }
    }

    /// Describe the configuration section (be32 length + machine name), as
    /// QEMU 10.0 does; 7.2 omits it.
    pub fn configuration(&mut self, machine_name_len: usize) -> &mut Self {
        self.configuration = Some(json!({
            "vmsd_name": "configuration",
            "version": 1,
            "fields": [
                {"name": "len", "type": "uint32", "size": 4},
                {"name": "name", "type": "buffer", "size": machine_name_len},
            ],
        }));
        self
    }

    /// Re-emit a device description received earlier (`DeviceDesc::json`),
    /// unchanged.
    pub fn push_device(&mut self, desc_json: Value) -> &mut Self {
        self.devices.push(desc_json);
        self
    }

    /// Describe a device whose body is opaque bytes: one `data` buffer.
    pub fn push_opaque(
        &mut self,
        idstr: &str,
        instance_id: u32,
        version_id: u32,
        body_len: usize,
    ) -> &mut Self {
        self.devices.push(json!({
            "name": idstr,
            "instance_id": instance_id,
            "vmsd_name": idstr,
            "version": version_id,
            "fields": [{"name": "data", "type": "buffer", "size": body_len}],
        }));
        self
    }

    /// Compact JSON, keys in QEMU's order: `configuration` (if set),
    /// `page_size`, `devices`.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // serde_json is built with preserve_order, so insertion order is
        // output order.
        let mut top = Map::new();
        if let Some(c) = &self.configuration {
            top.insert("configuration".into(), c.clone());
        }
        top.insert("page_size".into(), Value::from(self.page_size));
        top.insert("devices".into(), Value::Array(self.devices.clone()));
        // Display of a Value cannot fail (string keys only).
        Value::Object(top).to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_output_and_round_trip() {
        let mut b = VmDescriptionBuilder::new(4096);
        b.configuration(4)
            .push_device(
                json!({"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
                "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8}]}),
            )
            .push_opaque("helper-dev", 3, 7, 12);
        let bytes = b.to_json_bytes();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            concat!(
                r#"{"configuration":{"vmsd_name":"configuration","version":1,"fields":["#,
                r#"{"name":"len","type":"uint32","size":4},{"name":"name","type":"buffer","size":4}]},"#,
                r#""page_size":4096,"devices":["#,
                r#"{"name":"timer","instance_id":0,"vmsd_name":"timer","version":2,"fields":[{"name":"cpu_ticks_offset","type":"int64","size":8}]},"#,
                r#"{"name":"helper-dev","instance_id":3,"vmsd_name":"helper-dev","version":7,"fields":[{"name":"data","type":"buffer","size":12}]}]}"#
            )
        );
        let d = VmDescription::parse(&bytes).unwrap();
        assert_eq!(d.page_size(), 4096);
        let o = d.device("helper-dev", 3).unwrap();
        assert_eq!(o.version, Some(7));
        assert_eq!(o.vmsd_name.as_deref(), Some("helper-dev"));
        let mut body = vec![0xaa; 12];
        body.extend_from_slice(&[0x7e, 0, 0, 0, 5]);
        assert_eq!(body_len(o, &body).unwrap(), 12);
        assert!(body_len(o, &body[..11]).unwrap_err().is_truncated());
        // The configuration description walks the 0x07 section's body.
        let c = d.configuration().unwrap();
        assert_eq!(body_len(c, b"\x00\x00\x00\x04none\x01").unwrap(), 8);
        assert_eq!(
            decode_fields(c, b"\x00\x00\x00\x04none").unwrap(),
            json!({"len": 4, "name": "6e6f6e65"})
        );

        // Wrapped as QEMU does after EOF, it is found again.
        let mut stream = vec![0x7e, 0, 0, 0, 1, 0x00, 0x06];
        stream.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        stream.extend_from_slice(&bytes);
        assert_eq!(find_trailing_vmdesc(&stream), Some((5, 11..stream.len())));
    }

    #[test]
    fn builder_without_configuration() {
        let b = VmDescriptionBuilder::new(65536);
        assert_eq!(b.to_json_bytes(), br#"{"page_size":65536,"devices":[]}"#);
        let d = VmDescription::parse(&b.to_json_bytes()).unwrap();
        assert!(d.configuration().is_none());
        assert_eq!(d.page_size(), 65536);
    }
}
