//! The decoded members of one struct or section.

use std::collections::HashSet;

use serde_json::{Map, Value};

/// Decoded members, remembering which names collect several fields into an array (QEMU's
/// `index`ed, non-compressible arrays). The names are a set: a linear scan per field made
/// a description with 80k indexed fields take seconds.
#[derive(Default)]
pub(super) struct Out {
    pub(super) map: Map<String, Value>,
    grouped: HashSet<String>,
}

impl Out {
    pub(super) fn insert(&mut self, name: &str, index: Option<u64>, value: Value) {
        let is_grouped = self.grouped.contains(name);
        match self.map.get_mut(name) {
            // QEMU 10.0 writes "index" on all but the last element of such
            // an array (see fdc "drives"), so a plain field with a grouped
            // name continues the array too.
            Some(Value::Array(a)) if is_grouped => a.push(value),
            // A repeated plain name: keep both rather than lose one.
            Some(old) => {
                let prev = old.take();
                *old = Value::Array(vec![prev, value]);
                self.grouped.insert(name.to_owned());
            }
            None if index.is_some() => {
                self.map.insert(name.to_owned(), Value::Array(vec![value]));
                self.grouped.insert(name.to_owned());
            }
            None => {
                self.map.insert(name.to_owned(), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn grouping_is_linear() {
        // 200k distinct indexed names: quadratic grouping took minutes, this takes
        // milliseconds (the bound is generous for a loaded machine).
        let t0 = std::time::Instant::now();
        let mut o = Out::default();
        for i in 0..200_000u64 {
            o.insert(&format!("f{i}"), Some(0), Value::from(i));
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(o.map.len(), 200_000);
        assert_eq!(o.map["f7"], json!([7]));
        // A repeated plain name then continues as an array.
        let mut o = Out::default();
        o.insert("a", None, json!(1));
        o.insert("a", None, json!(2));
        o.insert("a", None, json!(3));
        assert_eq!(o.map["a"], json!([1, 2, 3]));
    }
}
