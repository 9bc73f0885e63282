//! Walking a device section body with the help of the VM description.
//!
//! The rules follow QEMU's scripts/analyze-migration.py: a field takes
//! `size` bytes per element (`array_len` elements, 1 when absent; `size` of a
//! struct already counts its nested subsections); a field without `size` but
//! with a nested `struct` (or inline `fields`, as "tmp" fields have) is walked
//! recursively; after the fields, each listed subsection is `0x05`, u8 length
//! + name, be32 version, then its own body.
//!
//! Everything here works on untrusted bytes and an untrusted description:
//! no indexing that can fail, checked arithmetic, bounded recursion, and
//! output bounded by a [`DecodeBudget`].

use serde_json::{Map, Value};

use super::budget::{DecodeBudget, OBJECT_VALUES, VALUE_COST};
use super::group::Out;
use super::{DeviceDesc, VmStateError};
use crate::compat::wire::section;

/// Nesting limit for structs/subsections. serde_json already refuses JSON
/// nested deeper than 128, but `DeviceDesc::json` may be built by hand.
const MAX_DEPTH: usize = 64;

/// How many bytes the body of `desc`'s device occupies at the start of
/// `body` (the bytes right after the FULL/START section header). The footer
/// is not included.
///
/// `Err(Truncated)` means `body` is too short so far; other errors mean the
/// bytes do not match the description.
pub fn body_len(desc: &DeviceDesc, body: &[u8]) -> Result<usize, VmStateError> {
    let mut none = DecodeBudget::new(0);
    let mut w = Walker::new(&desc.name, body, false, &mut none);
    let (end, _) = w.vmsd(&desc.json, 0, &Path::ROOT, 0)?;
    Ok(end)
}

/// Decode the device body at the start of `body` into a JSON object:
/// integers as numbers, everything else as lowercase hex strings, arrays as
/// arrays, structs and subsections (keyed by their name) as objects.
/// Bytes after the body (the footer, further sections) are ignored.
///
/// The decode may take at most [`super::DECODE_BUDGET`] estimated bytes;
/// beyond that it fails with [`VmStateError::DecodeLimit`].
pub fn decode_fields(desc: &DeviceDesc, body: &[u8]) -> Result<Value, VmStateError> {
    decode_fields_within(desc, body, &mut DecodeBudget::per_stream())
}

/// [`decode_fields`], charging what the decode produces to `budget` (shared
/// by the sections of one stream). A failed decode gives back what it took.
pub fn decode_fields_within(
    desc: &DeviceDesc,
    body: &[u8],
    budget: &mut DecodeBudget,
) -> Result<Value, VmStateError> {
    let saved = *budget;
    let mut w = Walker::new(&desc.name, body, true, budget);
    match w.vmsd(&desc.json, 0, &Path::ROOT, 0) {
        Ok((_, out)) => Ok(Value::Object(out.map(|o| o.map).unwrap_or_default())),
        Err(e) => {
            *budget = saved;
            Err(e)
        }
    }
}

/// Where in the description a walk is, rendered only for error messages.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Root,
    Field(&'a str),
    Elem(u64),
    Sub(&'a str),
}

#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    seg: Seg<'a>,
}

impl<'a> Path<'a> {
    const ROOT: Path<'static> = Path {
        parent: None,
        seg: Seg::Root,
    };

    fn child(&'a self, seg: Seg<'a>) -> Path<'a> {
        Path {
            parent: Some(self),
            seg,
        }
    }

    fn render(&self) -> String {
        let mut segs = Vec::new();
        let mut p = Some(self);
        while let Some(cur) = p {
            segs.push(cur.seg);
            p = cur.parent;
        }
        let mut out = String::new();
        for seg in segs.iter().rev() {
            match seg {
                Seg::Root => {}
                Seg::Field(n) | Seg::Sub(n) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(n);
                }
                Seg::Elem(i) => {
                    out.push('[');
                    out.push_str(&i.to_string());
                    out.push(']');
                }
            }
        }
        out
    }
}

struct Walker<'a, 'b> {
    device: &'a str,
    body: &'a [u8],
    decode: bool,
    /// What the decode may still produce.
    budget: &'b mut DecodeBudget,
}

impl<'a, 'b> Walker<'a, 'b> {
    fn new(device: &'a str, body: &'a [u8], decode: bool, budget: &'b mut DecodeBudget) -> Self {
        Walker {
            device,
            body,
            decode,
            budget,
        }
    }

    /// Walk a vmstate description (a device, struct, subsection or tmp
    /// field: anything with `fields` and optional `subsections`) at `pos`.
    /// Returns the end offset and, when decoding, the decoded members.
    fn vmsd(
        &mut self,
        sdesc: &'a Value,
        mut pos: usize,
        path: &Path<'_>,
        depth: usize,
    ) -> Result<(usize, Option<Out>), VmStateError> {
        if depth > MAX_DEPTH {
            return Err(self.bad(path, "nesting too deep"));
        }
        let Some(obj) = sdesc.as_object() else {
            return Err(self.bad(path, "description is not an object"));
        };
        let fields = self.list(obj, "fields", path)?;
        let subs = self.list(obj, "subsections", path)?;
        let mut out = self.decode.then(Out::default);
        for f in fields {
            pos = self.field(f, pos, path, depth, out.as_mut())?;
        }
        for s in subs {
            pos = self.subsection(s, pos, path, depth, out.as_mut())?;
        }
        Ok((pos, out))
    }

    fn field(
        &mut self,
        f: &'a Value,
        pos: usize,
        path: &Path<'_>,
        depth: usize,
        out: Option<&mut Out>,
    ) -> Result<usize, VmStateError> {
        let Some(fo) = f.as_object() else {
            return Err(self.bad(path, "field is not an object"));
        };
        let Some(name) = fo.get("name").and_then(Value::as_str) else {
            return Err(self.bad(path, "field without a string \"name\""));
        };
        let fpath = path.child(Seg::Field(name));
        let ty = fo.get("type").and_then(Value::as_str).unwrap_or("");
        let size = self.opt_u64(fo, "size", &fpath)?;
        let array_len = self.opt_u64(fo, "array_len", &fpath)?;
        let index = self.opt_u64(fo, "index", &fpath)?;
        // "tmp" fields carry vmsd_name/fields/subsections inline.
        let nested = match fo.get("struct") {
            Some(s) if s.is_object() => Some(s),
            Some(_) => return Err(self.bad(&fpath, "\"struct\" is not an object")),
            None if fo.contains_key("fields") => Some(f),
            None => None,
        };
        let count = array_len.unwrap_or(1);

        // With a size, the extent is known up front: report truncation
        // consistently whether or not the contents are walked.
        let end_by_size = match size {
            Some(size) => {
                let total = size
                    .checked_mul(count)
                    .and_then(|t| usize::try_from(t).ok())
                    .and_then(|t| pos.checked_add(t))
                    .ok_or_else(|| self.too_large(&fpath, pos))?;
                if total > self.body.len() {
                    return Err(self.truncated(&fpath, pos, total));
                }
                Some(total)
            }
            None => None,
        };

        let (end, value) = match (end_by_size, nested) {
            (Some(end), None) => {
                let value = if self.decode {
                    // Both bounds were checked above.
                    let bytes = self.body.get(pos..end).unwrap_or_default();
                    Some(self.leaves(ty, bytes, size.unwrap_or(0), array_len, &fpath, pos)?)
                } else {
                    None
                };
                (end, value)
            }
            // Only the length is wanted and the size is known: trust it, as
            // analyze-migration.py does; the sizes are what QEMU wrote.
            (Some(end), Some(_)) if !self.decode => (end, None),
            (_, Some(nested)) => self.elements(nested, pos, size, array_len, &fpath, depth)?,
            (None, None) => {
                return Err(self.bad(&fpath, "field has neither \"size\" nor nested fields"))
            }
        };
        self.finish(out, name, index, value, end)
    }

    /// Walk the `array_len` (or one) elements of a struct/tmp field. When
    /// `size` is given, each element must take exactly that many bytes.
    fn elements(
        &mut self,
        nested: &'a Value,
        mut pos: usize,
        size: Option<u64>,
        array_len: Option<u64>,
        fpath: &Path<'_>,
        depth: usize,
    ) -> Result<(usize, Option<Value>), VmStateError> {
        let mut elems = Vec::new();
        let mut i = 0u64;
        while i < array_len.unwrap_or(1) {
            let epath = match array_len {
                Some(_) => fpath.child(Seg::Elem(i)),
                None => *fpath,
            };
            let start = pos;
            let (end, m) = self.vmsd(nested, pos, &epath, depth.saturating_add(1))?;
            // Walks only advance, so end >= start.
            let actual = end.saturating_sub(start) as u64;
            if let Some(size) = size {
                if actual != size {
                    return Err(VmStateError::SizeMismatch {
                        device: self.device.to_owned(),
                        field: epath.render(),
                        offset: start,
                        declared: size,
                        actual,
                    });
                }
            }
            pos = end;
            if self.decode {
                self.spend(OBJECT_VALUES, 0, &epath, start)?;
                elems.push(Value::Object(m.map(|o| o.map).unwrap_or_default()));
            } else if actual == 0 {
                // An element that took no bytes has no subsections and only
                // zero-sized fields: the remaining ones are the same.
                break;
            }
            i += 1;
        }
        let value = match (self.decode, array_len) {
            (false, _) => None,
            (true, Some(_)) => Some(Value::Array(elems)),
            (true, None) => elems.pop(),
        };
        Ok((pos, value))
    }

    fn finish(
        &self,
        out: Option<&mut Out>,
        name: &str,
        index: Option<u64>,
        value: Option<Value>,
        end: usize,
    ) -> Result<usize, VmStateError> {
        if let (Some(out), Some(value)) = (out, value) {
            out.insert(name, index, value);
        }
        Ok(end)
    }

    /// Decode `bytes` (already bounds-checked: `size` x elements) of a leaf
    /// field.
    fn leaves(
        &mut self,
        ty: &str,
        bytes: &[u8],
        size: u64,
        array_len: Option<u64>,
        path: &Path<'_>,
        pos: usize,
    ) -> Result<Value, VmStateError> {
        // Hex strings take two bytes per body byte (integers take less):
        // charged with the values before anything is allocated.
        let text = bytes.len().saturating_mul(2);
        let Some(count) = array_len else {
            self.spend(1, text, path, pos)?;
            return Ok(leaf(ty, bytes));
        };
        let n = usize::try_from(count).map_err(|_| self.too_large(path, pos))?;
        self.spend(n, text, path, pos)?;
        let vals = match usize::try_from(size) {
            Ok(0) => vec![leaf(ty, &[]); n],
            Ok(sz) => bytes.chunks(sz).map(|c| leaf(ty, c)).collect(),
            Err(_) => return Err(self.too_large(path, pos)),
        };
        Ok(Value::Array(vals))
    }

    fn subsection(
        &mut self,
        s: &'a Value,
        pos: usize,
        path: &Path<'_>,
        depth: usize,
        out: Option<&mut Out>,
    ) -> Result<usize, VmStateError> {
        let Some(so) = s.as_object() else {
            return Err(self.bad(path, "subsection is not an object"));
        };
        let Some(name) = so.get("vmsd_name").and_then(Value::as_str) else {
            return Err(self.bad(path, "subsection without a string \"vmsd_name\""));
        };
        let spath = path.child(Seg::Sub(name));
        let version = self.opt_u64(so, "version", &spath)?;

        let marker = self.byte(pos, &spath)?;
        if marker != section::SUBSECTION {
            return Err(VmStateError::SubsectionMarker {
                device: self.device.to_owned(),
                subsection: name.to_owned(),
                offset: pos,
                found: marker,
            });
        }
        let len_pos = pos
            .checked_add(1)
            .ok_or_else(|| self.too_large(&spath, pos))?;
        let len = usize::from(self.byte(len_pos, &spath)?);
        let name_start = len_pos + 1; // len_pos < body.len(), so no overflow
        let name_end = name_start + len;
        // Compare what has arrived so far, so a wrong name is reported as a
        // mismatch even while the body is still incomplete.
        let avail = self
            .body
            .get(name_start..name_end.min(self.body.len()))
            .unwrap_or_default();
        if len != name.len() || !name.as_bytes().starts_with(avail) {
            return Err(VmStateError::SubsectionName {
                device: self.device.to_owned(),
                expected: name.to_owned(),
                found: String::from_utf8_lossy(avail).into_owned(),
                offset: pos,
            });
        }
        let ver_end = name_end + 4;
        let Some(&[v0, v1, v2, v3]) = self.body.get(name_end..ver_end) else {
            return Err(self.truncated(&spath, pos, ver_end));
        };
        let found = u32::from_be_bytes([v0, v1, v2, v3]);
        if let Some(expected) = version {
            if expected != u64::from(found) {
                return Err(VmStateError::SubsectionVersion {
                    device: self.device.to_owned(),
                    subsection: name.to_owned(),
                    offset: pos,
                    expected,
                    found,
                });
            }
        }
        let (end, m) = self.vmsd(s, ver_end, &spath, depth.saturating_add(1))?;
        if self.decode {
            self.spend(OBJECT_VALUES, 0, &spath, pos)?;
        }
        let value = m.map(|o| Value::Object(o.map));
        self.finish(out, name, None, value, end)
    }

    fn byte(&self, pos: usize, path: &Path<'_>) -> Result<u8, VmStateError> {
        self.body
            .get(pos)
            .copied()
            .ok_or_else(|| self.truncated(path, pos, pos.saturating_add(1)))
    }

    fn list(
        &self,
        obj: &'a Map<String, Value>,
        key: &str,
        path: &Path<'_>,
    ) -> Result<&'a [Value], VmStateError> {
        match obj.get(key) {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(self.bad(path, &format!("\"{key}\" is not an array"))),
        }
    }

    fn opt_u64(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        path: &Path<'_>,
    ) -> Result<Option<u64>, VmStateError> {
        match obj.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad(path, &format!("\"{key}\" is not an unsigned integer"))),
        }
    }

    /// Charges `values` JSON values and `text` bytes of strings to the budget.
    fn spend(
        &mut self,
        values: usize,
        text: usize,
        path: &Path<'_>,
        pos: usize,
    ) -> Result<(), VmStateError> {
        let cost = values.saturating_mul(VALUE_COST).saturating_add(text);
        if self.budget.take(cost) {
            return Ok(());
        }
        Err(VmStateError::DecodeLimit {
            device: self.device.to_owned(),
            field: path.render(),
            offset: pos,
            limit: self.budget.limit(),
        })
    }

    fn bad(&self, path: &Path<'_>, reason: &str) -> VmStateError {
        VmStateError::BadDescription {
            device: self.device.to_owned(),
            field: path.render(),
            reason: reason.to_owned(),
        }
    }

    fn truncated(&self, path: &Path<'_>, offset: usize, need: usize) -> VmStateError {
        VmStateError::Truncated {
            device: self.device.to_owned(),
            field: path.render(),
            offset,
            need,
        }
    }

    fn too_large(&self, path: &Path<'_>, offset: usize) -> VmStateError {
        VmStateError::TooLarge {
            device: self.device.to_owned(),
            field: path.render(),
            offset,
        }
    }
}

/// One element of a leaf field: a number for the integer types whose width
/// matches `size`, lowercase hex for everything else.
///
/// All of them are big-endian. "int32 le" is not little-endian: in QEMU's
/// vmstate-types.c it is an int32 written with put_int32 whose loader checks
/// "loaded <= current" (less or equal), like "int32 equal" checks equality.
fn leaf(ty: &str, bytes: &[u8]) -> Value {
    let base = ty
        .strip_suffix(" equal")
        .or_else(|| ty.strip_suffix(" le"))
        .unwrap_or(ty);
    let (width, signed) = match base {
        "int8" => (1, true),
        "uint8" | "bool" => (1, false),
        "int16" => (2, true),
        "uint16" => (2, false),
        "int32" => (4, true),
        "uint32" => (4, false),
        "int64" => (8, true),
        "uint64" => (8, false),
        _ => return Value::String(hex(bytes)),
    };
    if bytes.len() != width {
        return Value::String(hex(bytes));
    }
    let raw = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    if signed {
        // Sign-extend from `width` bytes.
        let shift = 64 - 8 * width as u32;
        Value::from(((raw << shift) as i64) >> shift)
    } else {
        Value::from(raw)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dev(json: Value) -> DeviceDesc {
        DeviceDesc::from_json(json).unwrap()
    }

    fn sub_hdr(name: &str, version: u32) -> Vec<u8> {
        let mut v = vec![0x05, name.len() as u8];
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&version.to_be_bytes());
        v
    }

    #[test]
    fn scalar_types_decode() {
        let d = dev(
            json!({"name": "t", "instance_id": 0, "vmsd_name": "t", "version": 1, "fields": [
                {"name": "a", "type": "int8", "size": 1},
                {"name": "b", "type": "uint8", "size": 1},
                {"name": "c", "type": "int16", "size": 2},
                {"name": "d", "type": "uint16", "size": 2},
                {"name": "e", "type": "int32", "size": 4},
                {"name": "f", "type": "uint32", "size": 4},
                {"name": "g", "type": "int64", "size": 8},
                {"name": "h", "type": "uint64", "size": 8},
                {"name": "i", "type": "int32 le", "size": 4},
                {"name": "j", "type": "bool", "size": 1},
                {"name": "k", "type": "int32 equal", "size": 4},
                {"name": "l", "type": "uint8 equal", "size": 1},
                {"name": "m", "type": "buffer", "size": 3},
                {"name": "n", "type": "unused_buffer", "size": 2},
                {"name": "o", "type": "timer", "size": 8},
                {"name": "p", "type": "uint32", "size": 3},
                {"name": "q", "size": 1}
            ]}),
        );
        let mut body = vec![0xff, 0xfe, 0xff, 0xfd, 0x12, 0x34];
        body.extend_from_slice(&(-2i32).to_be_bytes());
        body.extend_from_slice(&0xdead_beefu32.to_be_bytes());
        body.extend_from_slice(&i64::MIN.to_be_bytes());
        body.extend_from_slice(&u64::MAX.to_be_bytes());
        body.extend_from_slice(&(-5i32).to_be_bytes()); // "int32 le" is big-endian too
        body.push(1);
        body.extend_from_slice(&7i32.to_be_bytes());
        body.push(2);
        body.extend_from_slice(&[0xab, 0xcd, 0xef]);
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 0]);
        body.extend_from_slice(&[1, 2, 3]);
        body.push(0x7f);
        let n = body.len();
        body.extend_from_slice(&[0x7e, 0, 0, 0, 9]); // footer: not part of it
        assert_eq!(body_len(&d, &body).unwrap(), n);
        let v = decode_fields(&d, &body).unwrap();
        assert_eq!(
            v,
            json!({"a": -1, "b": 254, "c": -3, "d": 0x1234, "e": -2, "f": 0xdead_beefu32,
                   "g": i64::MIN, "h": u64::MAX, "i": -5, "j": 1, "k": 7, "l": 2, "m": "abcdef",
                   "n": "0000", "o": "0000000000000100", "p": "010203", "q": "7f"})
        );
        // Key order follows the description.
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.first().map(String::as_str), Some("a"));
        assert_eq!(keys.last().map(String::as_str), Some("q"));
    }

    #[test]
    fn arrays_and_structs() {
        let seg = json!({"vmsd_name": "segment", "version": 1, "fields": [
            {"name": "sel", "type": "uint16", "size": 2},
            {"name": "base", "type": "uint32", "size": 4}]});
        let d = dev(
            json!({"name": "cpu", "instance_id": 0, "vmsd_name": "cpu", "version": 1, "fields": [
                {"name": "regs", "array_len": 3, "type": "uint16", "size": 2},
                {"name": "segs", "array_len": 2, "type": "struct", "struct": seg, "size": 6},
                {"name": "ldt", "type": "struct", "struct": seg},
                {"name": "fp", "array_len": 2, "type": "struct", "struct": {"vmsd_name": "fpreg", "version": 0, "fields": [
                    {"name": "tmp", "type": "tmp", "vmsd_name": "fpreg_tmp", "version": 0, "fields": [
                        {"name": "mant", "type": "uint64", "size": 8},
                        {"name": "exp", "type": "uint16", "size": 2}], "size": 10}]}, "size": 10},
                {"name": "blob", "array_len": 2, "type": "buffer", "size": 2}
            ]}),
        );
        let mut body = vec![0, 1, 0, 2, 0, 3];
        body.extend_from_slice(&[0, 0x10, 0, 0, 0, 0x20, 0, 0x11, 0, 0, 0, 0x21]);
        body.extend_from_slice(&[0, 0x12, 0, 0, 0, 0x22]);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0x40, 0x01]);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, 0x40, 0x02]);
        body.extend_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(body_len(&d, &body).unwrap(), body.len());
        assert_eq!(
            decode_fields(&d, &body).unwrap(),
            json!({"regs": [1, 2, 3],
                   "segs": [{"sel": 0x10, "base": 0x20}, {"sel": 0x11, "base": 0x21}],
                   "ldt": {"sel": 0x12, "base": 0x22},
                   "fp": [{"tmp": {"mant": 1, "exp": 0x4001}}, {"tmp": {"mant": 2, "exp": 0x4002}}],
                   "blob": ["aabb", "ccdd"]})
        );
        // Every proper prefix is reported as truncated, never as a mismatch.
        for k in 0..body.len() {
            let e = body_len(&d, &body[..k]).unwrap_err();
            assert!(e.is_truncated(), "{k}: {e}");
            let e = decode_fields(&d, &body[..k]).unwrap_err();
            assert!(e.is_truncated(), "{k}: {e}");
        }
    }

    fn with_subsections() -> DeviceDesc {
        dev(
            json!({"name": "fw_cfg", "instance_id": 0, "vmsd_name": "fw_cfg", "version": 2,
            "fields": [
                {"name": "cur_entry", "type": "uint16", "size": 2},
                {"name": "drives", "index": 0, "type": "struct", "struct": {
                    "vmsd_name": "fdrive", "version": 1,
                    "fields": [{"name": "head", "type": "uint8", "size": 1}],
                    "subsections": [{"vmsd_name": "fdrive/media_rate", "version": 1,
                        "fields": [{"name": "media_rate", "type": "uint8", "size": 1}]}]}, "size": 25},
                {"name": "drives", "type": "struct", "struct": {
                    "vmsd_name": "fdrive", "version": 1,
                    "fields": [{"name": "head", "type": "uint8", "size": 1}],
                    "subsections": [{"vmsd_name": "fdrive/media_rate", "version": 1,
                        "fields": [{"name": "media_rate", "type": "uint8", "size": 1}]}]}, "size": 25}
            ],
            "subsections": [
                {"vmsd_name": "fw_cfg/dma", "version": 0,
                 "fields": [{"name": "dma_addr", "type": "uint64", "size": 8}],
                 "subsections": [{"vmsd_name": "fw_cfg/dma/inner", "version": 3,
                    "fields": [{"name": "x", "type": "uint8", "size": 1}]}]},
                {"vmsd_name": "fw_cfg/acpi_mr", "version": 1,
                 "fields": [{"name": "table_mr_size", "type": "uint64", "size": 8}]}
            ]}),
        )
    }

    fn with_subsections_body() -> Vec<u8> {
        let mut b = vec![0, 5];
        for head in [1u8, 2] {
            b.push(head);
            b.extend(sub_hdr("fdrive/media_rate", 1));
            b.push(head + 0x10);
        }
        b.extend(sub_hdr("fw_cfg/dma", 0));
        b.extend_from_slice(&0x1000u64.to_be_bytes());
        b.extend(sub_hdr("fw_cfg/dma/inner", 3));
        b.push(9);
        b.extend(sub_hdr("fw_cfg/acpi_mr", 1));
        b.extend_from_slice(&0x2000u64.to_be_bytes());
        b
    }

    #[test]
    fn subsections_and_indexed_fields() {
        let d = with_subsections();
        let mut body = with_subsections_body();
        let n = body.len();
        body.extend_from_slice(&[0x7e, 0, 0, 0, 3]);
        assert_eq!(body_len(&d, &body).unwrap(), n);
        assert_eq!(
            decode_fields(&d, &body).unwrap(),
            json!({"cur_entry": 5,
                   "drives": [{"head": 1, "fdrive/media_rate": {"media_rate": 0x11}},
                              {"head": 2, "fdrive/media_rate": {"media_rate": 0x12}}],
                   "fw_cfg/dma": {"dma_addr": 0x1000, "fw_cfg/dma/inner": {"x": 9}},
                   "fw_cfg/acpi_mr": {"table_mr_size": 0x2000}})
        );
        for k in 0..n {
            let e = body_len(&d, &body[..k]).unwrap_err();
            assert!(e.is_truncated(), "{k}: {e}");
            let e = decode_fields(&d, &body[..k]).unwrap_err();
            assert!(e.is_truncated(), "{k}: {e}");
        }
    }

    #[test]
    fn subsection_mismatches() {
        let d = with_subsections();
        let good = with_subsections_body();
        let dma = 2 + 2 * 25; // offset of the fw_cfg/dma marker

        let mut b = good.clone();
        b[dma] = 0x7e; // footer where the subsection should be
        let e = body_len(&d, &b).unwrap_err();
        assert!(
            matches!(&e, VmStateError::SubsectionMarker { subsection, offset, found: 0x7e, .. }
                if subsection == "fw_cfg/dma" && *offset == dma),
            "{e}"
        );

        let mut b = good.clone();
        b[dma + 2 + 7] = b'X'; // fw_cfg/Xma
        let e = body_len(&d, &b).unwrap_err();
        assert!(
            matches!(&e, VmStateError::SubsectionName { expected, found, .. }
                if expected == "fw_cfg/dma" && found == "fw_cfg/Xma"),
            "{e}"
        );
        // Seen as a mismatch even when the rest has not arrived yet.
        let e = body_len(&d, &b[..dma + 2 + 8]).unwrap_err();
        assert!(matches!(e, VmStateError::SubsectionName { .. }), "{e}");
        assert!(matches!(
            decode_fields(&d, &b).unwrap_err(),
            VmStateError::SubsectionName { .. }
        ));

        let mut b = good.clone();
        b[dma + 1] = 9; // name length differs
        let e = body_len(&d, &b[..dma + 2]).unwrap_err();
        assert!(matches!(e, VmStateError::SubsectionName { .. }), "{e}");

        let mut b = good.clone();
        b[dma + 2 + 10 + 3] = 1; // version 1, described as 0
        let e = body_len(&d, &b).unwrap_err();
        assert!(
            matches!(
                e,
                VmStateError::SubsectionVersion {
                    expected: 0,
                    found: 1,
                    ..
                }
            ),
            "{e}"
        );

        // A nested struct's subsection is not checked by body_len (size is
        // trusted) but is by decode_fields.
        let mut b = good.clone();
        b[3] = 0x06;
        assert_eq!(body_len(&d, &b).unwrap(), good.len());
        let e = decode_fields(&d, &b).unwrap_err();
        assert!(
            matches!(
                &e,
                VmStateError::SubsectionMarker {
                    offset: 3,
                    found: 6,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("fdrive/media_rate"), "{e}");
    }

    #[test]
    fn declared_size_must_match_contents_when_decoding() {
        let d = dev(json!({"name": "x", "instance_id": 0, "fields": [
            {"name": "s", "type": "struct", "size": 3, "struct": {"vmsd_name": "s", "version": 1,
                "fields": [{"name": "a", "type": "uint16", "size": 2}]}}]}));
        let body = [0, 1, 2, 3];
        assert_eq!(body_len(&d, &body).unwrap(), 3);
        assert!(matches!(
            decode_fields(&d, &body).unwrap_err(),
            VmStateError::SizeMismatch {
                declared: 3,
                actual: 2,
                ..
            }
        ));
    }

    #[test]
    fn old_style_and_empty_devices() {
        let d = dev(json!({"name": "slirp", "instance_id": 0, "size": 3,
            "fields": [{"name": "data", "size": 3, "type": "buffer"}]}));
        assert_eq!(body_len(&d, &[1, 2, 3, 0x7e]).unwrap(), 3);
        assert_eq!(
            decode_fields(&d, &[1, 2, 3]).unwrap(),
            json!({"data": "010203"})
        );
        let d = dev(json!({"name": "e", "instance_id": 0}));
        assert_eq!(body_len(&d, &[]).unwrap(), 0);
        assert_eq!(decode_fields(&d, &[]).unwrap(), json!({}));
    }

    #[test]
    fn bad_descriptions() {
        let cases = [
            json!({"name": "x", "instance_id": 0, "fields": [1]}),
            json!({"name": "x", "instance_id": 0, "fields": [{"type": "uint8", "size": 1}]}),
            json!({"name": "x", "instance_id": 0, "fields": [{"name": "a", "type": "uint8"}]}),
            json!({"name": "x", "instance_id": 0, "fields": [{"name": "a", "size": "1"}]}),
            json!({"name": "x", "instance_id": 0, "fields": [{"name": "a", "size": -1}]}),
            json!({"name": "x", "instance_id": 0, "fields": [{"name": "a", "size": 1.5}]}),
            json!({"name": "x", "instance_id": 0, "fields": [{"name": "a", "size": 1, "array_len": "2"}]}),
            json!({"name": "x", "instance_id": 0, "fields": [{"name": "a", "struct": 5}]}),
            json!({"name": "x", "instance_id": 0, "fields": [{"name": "a", "struct": {"fields": 1}}]}),
            json!({"name": "x", "instance_id": 0, "subsections": [{"version": 1}]}),
            json!({"name": "x", "instance_id": 0, "subsections": [7]}),
        ];
        let body = [0u8; 64];
        for c in cases {
            let d = DeviceDesc {
                name: "x".into(),
                instance_id: 0,
                vmsd_name: None,
                version: None,
                json: std::sync::Arc::new(c.clone()),
            };
            let e = body_len(&d, &body).unwrap_err();
            assert!(matches!(e, VmStateError::BadDescription { .. }), "{c}: {e}");
            let e = decode_fields(&d, &body).unwrap_err();
            assert!(matches!(e, VmStateError::BadDescription { .. }), "{c}: {e}");
        }
        // A hand-built description nested deeper than serde_json would parse.
        let mut s = json!({"fields": [{"name": "leaf", "type": "uint8", "size": 1}]});
        for _ in 0..200 {
            s = json!({"fields": [{"name": "n", "type": "struct", "struct": s}]});
        }
        let d = DeviceDesc {
            name: "deep".into(),
            instance_id: 0,
            vmsd_name: None,
            version: None,
            json: std::sync::Arc::new(s),
        };
        assert!(matches!(
            body_len(&d, &body).unwrap_err(),
            VmStateError::BadDescription { .. }
        ));
    }

    #[test]
    fn huge_sizes_and_counts() {
        let body = [0u8; 16];
        let d = dev(json!({"name": "x", "instance_id": 0, "fields": [
            {"name": "a", "type": "uint8", "size": u64::MAX, "array_len": 2}]}));
        assert!(matches!(
            body_len(&d, &body).unwrap_err(),
            VmStateError::TooLarge { .. }
        ));
        let d = dev(json!({"name": "x", "instance_id": 0, "fields": [
            {"name": "a", "type": "uint8", "size": 1u64 << 40}]}));
        assert!(matches!(
            body_len(&d, &body).unwrap_err(),
            VmStateError::Truncated { need, .. } if need == 1 << 40
        ));
        // Zero-sized elements: the length is fine, the decode is refused
        // instead of building a huge array.
        let d = dev(json!({"name": "x", "instance_id": 0, "fields": [
            {"name": "a", "type": "uint8", "size": 0, "array_len": u64::MAX}]}));
        assert_eq!(body_len(&d, &body).unwrap(), 0);
        assert!(matches!(
            decode_fields(&d, &body).unwrap_err(),
            VmStateError::DecodeLimit { .. }
        ));
        let d = dev(json!({"name": "x", "instance_id": 0, "fields": [
            {"name": "a", "type": "struct", "array_len": u64::MAX, "struct": {"fields": []}}]}));
        assert_eq!(body_len(&d, &body).unwrap(), 0);
        assert!(matches!(
            decode_fields(&d, &body).unwrap_err(),
            VmStateError::DecodeLimit { .. }
        ));
        // Struct elements without size that each take a byte: bounded by the
        // body, then truncated.
        let d = dev(json!({"name": "x", "instance_id": 0, "fields": [
            {"name": "a", "type": "struct", "array_len": u64::MAX, "struct": {"fields": [
                {"name": "b", "type": "uint8", "size": 1}]}}]}));
        assert!(body_len(&d, &body).unwrap_err().is_truncated());
        assert!(decode_fields(&d, &body).unwrap_err().is_truncated());
        // A few zero-sized values are fine.
        let d = dev(json!({"name": "x", "instance_id": 0, "fields": [
            {"name": "a", "type": "buffer", "size": 0, "array_len": 3}]}));
        assert_eq!(decode_fields(&d, &[]).unwrap(), json!({"a": ["", "", ""]}));
    }

    #[test]
    fn large_bodies_hit_the_decode_budget() {
        // One value per body byte used to be allowed: 4 Mi uint8 values
        // (~300 MiB). Now the decode stops before allocating them.
        let n = 4usize << 20;
        let body = vec![7u8; n];
        let d = dev(json!({"name": "big", "instance_id": 0, "fields": [
            {"name": "a", "type": "uint8", "size": 1, "array_len": n}]}));
        assert_eq!(body_len(&d, &body).unwrap(), n);
        let e = decode_fields(&d, &body).unwrap_err();
        assert!(
            matches!(&e, VmStateError::DecodeLimit { field, .. } if field == "a"),
            "{e}"
        );
        assert!(e.to_string().contains("too large to decode"), "{e}");
        // A buffer is one value but a string twice its size.
        let d = dev(json!({"name": "big", "instance_id": 0, "fields": [
            {"name": "a", "type": "buffer", "size": n}]}));
        let mut b = DecodeBudget::new(2 * n - 1);
        assert!(matches!(
            decode_fields_within(&d, &body, &mut b).unwrap_err(),
            VmStateError::DecodeLimit { .. }
        ));
        // A failed decode gives its share back; a good one keeps it spent,
        // so the sections of one stream share the budget.
        assert_eq!(b.left(), 2 * n - 1);
        let mut b = DecodeBudget::new(3 * n);
        assert!(decode_fields_within(&d, &body, &mut b).is_ok());
        assert!(b.left() < n);
        assert!(decode_fields_within(&d, &body, &mut b).is_err());
    }

    #[test]
    fn error_paths_name_the_field() {
        let d = with_subsections();
        let body = with_subsections_body();
        let e = body_len(&d, &body[..body.len() - 3]).unwrap_err();
        match e {
            VmStateError::Truncated {
                device,
                field,
                offset,
                need,
            } => {
                assert_eq!(device, "fw_cfg");
                assert_eq!(field, "fw_cfg/acpi_mr.table_mr_size");
                assert_eq!(offset, body.len() - 8);
                assert_eq!(need, body.len());
            }
            e => panic!("{e}"),
        }
        let d = dev(json!({"name": "x", "instance_id": 0, "fields": [
            {"name": "s", "array_len": 2, "type": "struct", "struct": {"fields": [
                {"name": "a", "type": "uint8", "size": 1}, {"name": "b", "type": "uint8"}]}}]}));
        let e = body_len(&d, &[0; 8]).unwrap_err();
        assert!(
            matches!(&e, VmStateError::BadDescription { field, .. } if field == "s[0].b"),
            "{e}"
        );
    }
}
