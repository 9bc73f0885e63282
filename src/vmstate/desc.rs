//! The VM description QEMU appends after QEMU_VM_EOF (QEMU_VM_VMDESCRIPTION).
//!
//! Only the device-level keys are checked here; field descriptions stay as
//! JSON and are interpreted by [`super::walk`], because the original objects
//! must be re-emitted unchanged and users may build a [`DeviceDesc`] by hand.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use super::VmStateError;

/// Most JSON values a VM description may hold (QEMU's for a pc machine: ~7k). Parsed, a
/// value takes ~100 bytes however short its text, so the byte limit on the description
/// alone would allow over a GiB; this caps the parsed description near 100 MiB.
pub(super) const MAX_VMDESC_VALUES: usize = 1 << 20;

/// One entry of the description's `devices` list.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDesc {
    /// The section idstr, e.g. `0000:00:01.3/piix4_pm`.
    pub name: String,
    pub instance_id: u32,
    /// Absent for old-style (non-vmstate) handlers such as `slirp`.
    pub vmsd_name: Option<String>,
    /// Absent for old-style handlers.
    pub version: Option<u32>,
    /// The original object, key order preserved. Shared: every section of the
    /// device refers to this one copy.
    pub json: Arc<Value>,
}

impl DeviceDesc {
    /// Check the device-level keys of one `devices` entry.
    pub fn from_json(json: Value) -> Result<Self, VmStateError> {
        let obj = json
            .as_object()
            .ok_or_else(|| bad("", "device entry is not an object"))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("", "device without a string \"name\""))?
            .to_owned();
        let instance_id = obj
            .get("instance_id")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad(&name, "\"instance_id\" missing or not a u32"))?;
        let vmsd_name = match obj.get("vmsd_name") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| bad(&name, "\"vmsd_name\" is not a string"))?
                    .to_owned(),
            ),
        };
        let version = match obj.get("version") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| bad(&name, "\"version\" is not a u32"))?,
            ),
        };
        if let Some(f) = obj.get("fields") {
            if !f.is_array() {
                return Err(bad(&name, "\"fields\" is not an array"));
            }
        }
        if let Some(s) = obj.get("subsections") {
            if !s.is_array() {
                return Err(bad(&name, "\"subsections\" is not an array"));
            }
        }
        Ok(DeviceDesc {
            name,
            instance_id,
            vmsd_name,
            version,
            json: Arc::new(json),
        })
    }
}

/// A parsed VM description.
#[derive(Debug, Clone, PartialEq)]
pub struct VmDescription {
    page_size: u64,
    configuration: Option<DeviceDesc>,
    devices: Vec<DeviceDesc>,
    /// (idstr, instance id) -> first index in `devices`: a lookup per section must
    /// not scan the list (thousands of sections times thousands of entries).
    index: HashMap<(String, u32), usize>,
}

impl VmDescription {
    /// Parse the JSON bytes that follow `0x06 be32 LEN`.
    pub fn parse(json: &[u8]) -> Result<Self, VmStateError> {
        let values = count_values(json);
        if values > MAX_VMDESC_VALUES {
            return Err(bad(
                "",
                &format!("VM description has about {values} JSON values, more than the limit of {MAX_VMDESC_VALUES}"),
            ));
        }
        let v: Value = serde_json::from_slice(json).map_err(VmStateError::Json)?;
        Self::from_value(v)
    }

    /// Same as [`Self::parse`] for an already parsed value.
    pub fn from_value(v: Value) -> Result<Self, VmStateError> {
        let Value::Object(mut top) = v else {
            return Err(bad("", "VM description is not a JSON object"));
        };
        let page_size = top
            .get("page_size")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("", "\"page_size\" missing or not an unsigned integer"))?;
        // 7.2 has no configuration entry; 10.0 describes the 0x07 section
        // (be32 length + machine name) like a device without name/instance.
        let configuration = match top.remove("configuration") {
            None => None,
            Some(Value::Object(c)) => {
                // Keep the original object for re-emission, without the
                // keys added for validation.
                let original = Value::Object(c.clone());
                let mut c = c;
                c.entry("name")
                    .or_insert_with(|| Value::from("configuration"));
                c.entry("instance_id").or_insert_with(|| Value::from(0u32));
                let mut dev = DeviceDesc::from_json(Value::Object(c))?;
                dev.json = Arc::new(original);
                Some(dev)
            }
            Some(_) => return Err(bad("configuration", "\"configuration\" is not an object")),
        };
        let Some(Value::Array(devs)) = top.remove("devices") else {
            return Err(bad("", "\"devices\" missing or not an array"));
        };
        let devices = devs
            .into_iter()
            .map(DeviceDesc::from_json)
            .collect::<Result<Vec<_>, _>>()?;
        let mut index = HashMap::with_capacity(devices.len());
        for (i, d) in devices.iter().enumerate() {
            index.entry((d.name.clone(), d.instance_id)).or_insert(i);
        }
        Ok(VmDescription {
            page_size,
            configuration,
            devices,
            index,
        })
    }

    /// The entry for section (idstr, instance id), the first one if QEMU
    /// ever listed it twice.
    pub fn device(&self, idstr: &str, instance_id: u32) -> Option<&DeviceDesc> {
        // A borrowed (&str, u32) key cannot look up a (String, u32) map.
        let i = *self.index.get(&(idstr.to_owned(), instance_id))?;
        self.devices.get(i)
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    pub fn devices(&self) -> &[DeviceDesc] {
        &self.devices
    }

    /// The description of the configuration section (10.0 only). Its
    /// `name` is "configuration" and `json` is the original object, so
    /// [`super::body_len`] on the bytes after the 0x07 byte gives the length
    /// of the configuration section (be32 length, name, subsections).
    pub fn configuration(&self) -> Option<&DeviceDesc> {
        self.configuration.as_ref()
    }
}

/// An upper bound on the values `json` parses into: every value but the first opens a
/// container or follows a comma or colon outside a string. One pass, no allocation.
fn count_values(json: &[u8]) -> usize {
    let (mut n, mut in_str, mut esc) = (1usize, false, false);
    for &b in json {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_str = true,
                b'{' | b'[' | b',' | b':' => n = n.saturating_add(1),
                _ => {}
            }
        }
    }
    n
}

fn bad(device: &str, reason: &str) -> VmStateError {
    VmStateError::BadDescription {
        device: device.to_owned(),
        field: String::new(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SAMPLE: &str = r#"{"configuration": {"vmsd_name": "configuration", "version": 1, "fields": [{"name": "len", "type": "uint32", "size": 4}, {"name": "name", "type": "buffer", "size": 4}]}, "page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8}]}, {"name": "slirp", "instance_id": 0, "size": 131, "fields": [{"name": "data", "size": 131, "type": "buffer"}]}, {"name": "dma", "instance_id": 1, "vmsd_name": "dma", "version": 1, "fields": []}]}"#;

    #[test]
    fn parses_devices_and_configuration() {
        let d = VmDescription::parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(d.page_size(), 4096);
        assert_eq!(d.devices().len(), 3);
        let t = d.device("timer", 0).unwrap();
        assert_eq!(t.vmsd_name.as_deref(), Some("timer"));
        assert_eq!(t.version, Some(2));
        assert!(d.device("timer", 1).is_none());
        assert!(d.device("dma", 1).is_some());
        let s = d.device("slirp", 0).unwrap();
        assert_eq!(s.vmsd_name, None);
        assert_eq!(s.version, None);
        // Original objects are kept verbatim, key order included.
        assert_eq!(
            serde_json::to_string(&*s.json).unwrap(),
            r#"{"name":"slirp","instance_id":0,"size":131,"fields":[{"name":"data","size":131,"type":"buffer"}]}"#
        );
        let c = d.configuration().unwrap();
        assert_eq!(c.name, "configuration");
        assert_eq!(
            *c.json,
            json!({"vmsd_name": "configuration", "version": 1, "fields": [{"name": "len", "type": "uint32", "size": 4}, {"name": "name", "type": "buffer", "size": 4}]})
        );
    }

    #[test]
    fn value_count_is_capped() {
        assert_eq!(count_values(br#"{"a": [1, 2, {"b": "x,:{["}]}"#), 8);
        assert_eq!(count_values(br#""\\" , ""#), 2);
        // Small text, many values: refused before parsing.
        let mut j = br#"{"page_size": 4096, "devices": [], "x": ["#.to_vec();
        for _ in 0..MAX_VMDESC_VALUES {
            j.extend_from_slice(b"{},");
        }
        j.extend_from_slice(b"0]}");
        let e = VmDescription::parse(&j).unwrap_err();
        assert!(e.to_string().contains("JSON values"), "{e}");
    }

    #[test]
    fn lookups_use_the_first_entry() {
        let d = VmDescription::parse(
            br#"{"page_size": 4096, "devices": [{"name": "a", "instance_id": 1, "version": 1}, {"name": "a", "instance_id": 1, "version": 2}]}"#,
        )
        .unwrap();
        assert_eq!(d.device("a", 1).unwrap().version, Some(1));
        assert!(d.device("a", 0).is_none());
    }

    #[test]
    fn no_configuration_is_fine() {
        let d = VmDescription::parse(br#"{"page_size": 4096, "devices": []}"#).unwrap();
        assert!(d.configuration().is_none());
        assert!(d.devices().is_empty());
    }

    #[test]
    fn garbage_is_rejected() {
        let cases: &[&[u8]] = &[
            b"",
            b"{",
            b"\x00\x06",
            b"[1,2]",
            b"null",
            br#"{"devices": []}"#,
            br#"{"page_size": -1, "devices": []}"#,
            br#"{"page_size": 4096}"#,
            br#"{"page_size": 4096, "devices": {}}"#,
            br#"{"page_size": 4096, "devices": [1]}"#,
            br#"{"page_size": 4096, "devices": [{"instance_id": 0}]}"#,
            br#"{"page_size": 4096, "devices": [{"name": "x"}]}"#,
            br#"{"page_size": 4096, "devices": [{"name": "x", "instance_id": 4294967296}]}"#,
            br#"{"page_size": 4096, "devices": [{"name": "x", "instance_id": 0, "version": "1"}]}"#,
            br#"{"page_size": 4096, "devices": [{"name": "x", "instance_id": 0, "vmsd_name": 3}]}"#,
            br#"{"page_size": 4096, "devices": [{"name": "x", "instance_id": 0, "fields": {}}]}"#,
            br#"{"page_size": 4096, "devices": [{"name": "x", "instance_id": 0, "subsections": 1}]}"#,
            br#"{"page_size": 4096, "configuration": [], "devices": []}"#,
        ];
        for c in cases {
            assert!(
                VmDescription::parse(c).is_err(),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
        assert!(matches!(
            VmDescription::parse(b"{nope"),
            Err(VmStateError::Json(_))
        ));
    }
}
