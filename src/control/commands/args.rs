//! Argument accessors with QEMU's messages for a missing, mistyped or unexpected argument.

use serde_json::{Map, Value};

use crate::control::qmp::QmpError;

/// A command's arguments.
pub(super) struct Args<'a>(pub(super) &'a Map<String, Value>);

impl<'a> Args<'a> {
    pub(super) fn str(&self, k: &str) -> Result<&'a str, QmpError> {
        match self.0.get(k) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: string"
            ))),
            None => Err(QmpError::generic(format!("Parameter '{k}' is missing"))),
        }
    }
    pub(super) fn opt_str(&self, k: &str) -> Result<Option<&'a str>, QmpError> {
        match self.0.get(k) {
            None => Ok(None),
            Some(_) => self.str(k).map(Some),
        }
    }
    pub(super) fn opt_u64(&self, k: &str) -> Result<Option<u64>, QmpError> {
        match self.0.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                QmpError::generic(format!(
                    "Invalid parameter type for '{k}', expected: integer >= 0"
                ))
            }),
        }
    }
    pub(super) fn u64(&self, k: &str) -> Result<u64, QmpError> {
        self.opt_u64(k)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{k}' is missing")))
    }
    pub(super) fn opt_bool(&self, k: &str) -> Result<Option<bool>, QmpError> {
        match self.0.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: boolean"
            ))),
        }
    }
    /// Refuses arguments the command does not know, as QMP does.
    pub(super) fn only(&self, known: &[&str]) -> Result<(), QmpError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}
