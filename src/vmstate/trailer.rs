//! Finding the VM description QEMU appends after QEMU_VM_EOF at the end of a
//! growing buffer.

use std::ops::Range;

use crate::compat::wire::section;

/// How far back [`find_trailing_vmdesc`] looks for the description.
const VMDESC_SCAN_LIMIT: usize = crate::wire::stream::MAX_VMDESC_LEN as usize;

/// If `buf` ends with `0x00 (EOF) 0x06 (VMDESCRIPTION) be32 LEN JSON`, with
/// JSON being exactly the last LEN bytes, starting with `{` and parsing,
/// return the offset of the EOF byte and the range of the JSON.
///
/// Meant to be called on a growing receive buffer: it returns at once
/// unless the buffer ends with `}`, and otherwise only looks back to the
/// last NUL byte (at most 16 MiB), since JSON text cannot contain a raw NUL
/// while the be32 length right after the EOF byte always holds one.
pub fn find_trailing_vmdesc(buf: &[u8]) -> Option<(usize, Range<usize>)> {
    if buf.last() != Some(&b'}') {
        return None;
    }
    let window_start = buf
        .len()
        .saturating_sub(VMDESC_SCAN_LIMIT.saturating_add(6));
    let window = buf.get(window_start..)?;
    let last_nul = window_start.checked_add(window.iter().rposition(|&b| b == 0)?)?;
    at_last_nul(buf, last_nul, window_start)
}

/// [`find_trailing_vmdesc`] for a buffer that only grows: each call looks for NUL bytes
/// only in what was appended since the last one, so that holding a large stream costs
/// time in proportion to its size (rescanning 16 MiB per read was quadratic-ish).
#[derive(Debug, Default)]
pub struct VmdescFinder {
    scanned: usize,
    last_nul: Option<usize>,
}

impl VmdescFinder {
    pub fn find(&mut self, buf: &[u8]) -> Option<(usize, Range<usize>)> {
        let new = buf.get(self.scanned..).unwrap_or_default();
        if let Some(i) = new.iter().rposition(|&b| b == 0) {
            self.last_nul = Some(self.scanned + i);
        }
        self.scanned = buf.len();
        if buf.last() != Some(&b'}') {
            return None;
        }
        let window_start = buf
            .len()
            .saturating_sub(VMDESC_SCAN_LIMIT.saturating_add(6));
        let last_nul = self
            .last_nul
            .filter(|&n| n >= window_start && n < buf.len())?;
        at_last_nul(buf, last_nul, window_start)
    }
}

/// The candidates for the EOF byte given the last NUL byte of `buf`.
fn at_last_nul(buf: &[u8], last_nul: usize, window_start: usize) -> Option<(usize, Range<usize>)> {
    // The last NUL is the EOF byte or one of the length bytes: at most six
    // places for the EOF byte. Try the nearest first.
    for eof in (last_nul.saturating_sub(5).max(window_start)..=last_nul).rev() {
        let Some(&[b_eof, b_desc, l0, l1, l2, l3]) = buf.get(eof..eof.saturating_add(6)) else {
            continue;
        };
        if b_eof != section::EOF || b_desc != section::VMDESCRIPTION {
            continue;
        }
        let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
        let json_start = eof + 6; // in bounds: the get() above succeeded
        if json_start.checked_add(len) != Some(buf.len()) {
            continue;
        }
        let json = buf.get(json_start..)?;
        if json.first() != Some(&b'{') {
            continue;
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok() {
            return Some((eof, json_start..buf.len()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_vmdesc(prefix: &[u8], json: &[u8]) -> Vec<u8> {
        let mut b = prefix.to_vec();
        b.push(0x00);
        b.push(0x06);
        b.extend_from_slice(&(json.len() as u32).to_be_bytes());
        b.extend_from_slice(json);
        b
    }

    #[test]
    fn trailing_vmdesc() {
        let json = br#"{"page_size": 4096, "devices": []}"#;
        let prefix = [0x7e, 0, 0, 0, 2, 0xff, 0xff];
        let b = with_vmdesc(&prefix, json);
        assert_eq!(
            find_trailing_vmdesc(&b),
            Some((prefix.len(), prefix.len() + 6..b.len()))
        );
        // Prefix without any NUL, and a length with no NUL byte but the top.
        let b = with_vmdesc(&[], json);
        assert_eq!(find_trailing_vmdesc(&b), Some((0, 6..b.len())));

        // Every prefix of a stream that is still arriving: no false hit.
        for k in 0..b.len() {
            assert_eq!(find_trailing_vmdesc(&b[..k]), None, "{k}");
        }
        // Trailing bytes after the JSON.
        let mut t = b.clone();
        t.push(b'}');
        assert_eq!(find_trailing_vmdesc(&t), None);
        // Length off by one either way.
        for delta in [-1i64, 1] {
            let mut t = b.clone();
            let l = (json.len() as i64 + delta) as u32;
            t[2..6].copy_from_slice(&l.to_be_bytes());
            assert_eq!(find_trailing_vmdesc(&t), None);
        }
        // `00 06 len` with a matching length but data that is not JSON.
        let fake = with_vmdesc(&[1, 2, 3], b"{\x01\x02}");
        assert_eq!(find_trailing_vmdesc(&fake), None);
        let fake = with_vmdesc(&[1, 2, 3], b"{\"a\": 1}}");
        assert_eq!(find_trailing_vmdesc(&fake), None);
        let fake = with_vmdesc(&[1, 2, 3], b"[{}]");
        assert_eq!(find_trailing_vmdesc(&fake), None);
        // A NUL inside the candidate JSON rules it out.
        let fake = with_vmdesc(&[], b"{\"a\":\x00}");
        assert_eq!(find_trailing_vmdesc(&fake), None);
        // A description after device data that itself contains `00 06`.
        let mut data = vec![0u8; 100];
        data.extend_from_slice(&[0x00, 0x06, 0, 0, 0, 40, b'{', b'}']);
        let b = with_vmdesc(&data, json);
        assert_eq!(
            find_trailing_vmdesc(&b),
            Some((data.len(), data.len() + 6..b.len()))
        );
        assert_eq!(find_trailing_vmdesc(b"}"), None);
        assert_eq!(find_trailing_vmdesc(b""), None);
        assert_eq!(find_trailing_vmdesc(b"\x00\x06\x00\x00\x00\x01}"), None);
    }

    #[test]
    fn finder_agrees_on_a_growing_buffer() {
        let json = br#"{"page_size": 4096, "devices": []}"#;
        let mut data = vec![0u8; 100];
        data.extend_from_slice(&[0x00, 0x06, 0, 0, 0, 40, b'{', b'}']);
        data.extend(std::iter::repeat_n(b'}', 3000));
        let b = with_vmdesc(&data, json);
        let mut f = VmdescFinder::default();
        for k in (0..=b.len()).step_by(7).chain([b.len()]) {
            assert_eq!(f.find(&b[..k]), find_trailing_vmdesc(&b[..k]), "{k}");
        }
        assert_eq!(f.find(&b), Some((data.len(), data.len() + 6..b.len())));
    }

    #[test]
    fn trailing_vmdesc_near_scan_limit() {
        // JSON of exactly 16 MiB is found; the scan does not go further.
        let mut json = Vec::with_capacity(VMDESC_SCAN_LIMIT);
        json.extend_from_slice(b"{\"a\": \"");
        json.resize(VMDESC_SCAN_LIMIT - 2, b'x');
        json.extend_from_slice(b"\"}");
        let b = with_vmdesc(&[0; 10], &json);
        assert_eq!(find_trailing_vmdesc(&b), Some((10, 16..b.len())));
        let mut json2 = json.clone();
        json2.insert(7, b'y');
        let b = with_vmdesc(&[0; 10], &json2);
        assert_eq!(find_trailing_vmdesc(&b), None);
    }
}
