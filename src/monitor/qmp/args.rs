//! A QMP command's `arguments`, checked the way QEMU's QAPI visitor checks them: a missing
//! member, a member of the wrong type, then a member the command does not take, each with
//! QEMU's message.

use std::cell::RefCell;

use serde_json::{Map, Value};

use super::QmpError;

/// The arguments of one command.
#[derive(Debug)]
pub struct Args<'a> {
    map: &'a Map<String, Value>,
    seen: RefCell<Vec<&'static str>>,
}

fn type_err(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl<'a> Args<'a> {
    /// Wraps a command's arguments object.
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Args {
            map,
            seen: RefCell::new(Vec::new()),
        }
    }

    fn get(&self, name: &'static str) -> Option<&'a Value> {
        self.seen.borrow_mut().push(name);
        self.map.get(name)
    }

    /// An optional string.
    pub fn opt_str(&self, name: &'static str) -> Result<Option<&'a str>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_err(name, "string")),
        }
    }

    /// A required string.
    pub fn str(&self, name: &'static str) -> Result<&'a str, QmpError> {
        self.opt_str(name)?.ok_or_else(|| missing(name))
    }

    /// An optional non-negative integer.
    pub fn opt_u64(&self, name: &'static str) -> Result<Option<u64>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| type_err(name, "integer")),
        }
    }

    /// A required non-negative integer.
    pub fn u64(&self, name: &'static str) -> Result<u64, QmpError> {
        self.opt_u64(name)?.ok_or_else(|| missing(name))
    }

    /// An optional boolean.
    pub fn opt_bool(&self, name: &'static str) -> Result<Option<bool>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(type_err(name, "boolean")),
        }
    }

    /// An optional member of any type (checked by the caller).
    pub fn opt_any(&self, name: &'static str) -> Option<&'a Value> {
        self.get(name)
    }

    /// A required list of strings.
    pub fn str_list(&self, name: &'static str) -> Result<Vec<String>, QmpError> {
        match self.get(name) {
            None => Err(missing(name)),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(type_err(&format!("{name}[]"), "string")),
                })
                .collect(),
            Some(_) => Err(type_err(name, "array")),
        }
    }

    /// A required array (its items checked by the caller).
    pub fn list(&self, name: &'static str) -> Result<&'a [Value], QmpError> {
        match self.get(name) {
            None => Err(missing(name)),
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(type_err(name, "array")),
        }
    }

    /// Every member (for commands whose members are checked one by one).
    pub fn all(&self) -> &'a Map<String, Value> {
        self.map
    }

    /// Fails on the first member no getter asked for.
    pub fn finish(&self) -> Result<(), QmpError> {
        let seen = self.seen.borrow();
        match self.map.keys().find(|k| !seen.contains(&k.as_str())) {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

/// QEMU's message for a missing member.
pub fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}
