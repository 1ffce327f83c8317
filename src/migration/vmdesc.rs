//! The VMDESCRIPTION trailer: QEMU's JSON formatting, and VMState descriptions rebuilt from a
//! stream's own vmdesc so that its device sections can be decoded and re-encoded.

use std::io::{self, Write};
use std::sync::Arc;

use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};
use serde_json::Value as Json;

use super::vmstate::{Count, Field, FieldType, VMStateDescription};

/// Largest vmdesc JSON we accept (QEMU's are a few hundred KiB).
pub const MAX_VMDESC_BYTES: u32 = 64 << 20;

/// Errors while interpreting a vmdesc.
#[derive(Debug, thiserror::Error)]
pub enum VmDescError {
    /// The trailer is not valid JSON.
    #[error("vmdesc is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A required key is missing or has the wrong type.
    #[error("vmdesc: {what} is missing or malformed")]
    Malformed {
        /// Which key, with its path.
        what: String,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, VmDescError>;

/// One device entry of a vmdesc.
#[derive(Debug, Clone)]
pub struct DeviceDesc {
    /// Section idstr.
    pub name: String,
    /// Section instance id.
    pub instance_id: u32,
    /// The layout described (for old-style devices: one "data" buffer, vmsd name empty).
    pub vmsd: Arc<VMStateDescription>,
}

/// A parsed vmdesc: page size and devices, plus the JSON it came from.
#[derive(Debug, Clone)]
pub struct VmDesc {
    /// Target page size.
    pub page_size: u64,
    /// Devices in stream order.
    pub devices: Vec<DeviceDesc>,
    /// The JSON document.
    pub json: Json,
}

impl VmDesc {
    /// Parses vmdesc JSON bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let json: Json = serde_json::from_slice(bytes)?;
        Self::from_json(json)
    }

    /// Interprets an already parsed vmdesc.
    pub fn from_json(json: Json) -> Result<Self> {
        let page_size = json
            .get("page_size")
            .and_then(Json::as_u64)
            .ok_or_else(|| malformed("page_size"))?;
        let mut devices = Vec::new();
        let devs = json
            .get("devices")
            .and_then(Json::as_array)
            .ok_or_else(|| malformed("devices"))?;
        for (i, d) in devs.iter().enumerate() {
            let name = d
                .get("name")
                .and_then(Json::as_str)
                .ok_or_else(|| malformed(&format!("devices[{i}].name")))?;
            let instance_id = d
                .get("instance_id")
                .and_then(Json::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| malformed(&format!("devices[{i}].instance_id")))?;
            let vmsd = description_from_json(d, name)?;
            devices.push(DeviceDesc {
                name: name.to_string(),
                instance_id,
                vmsd: Arc::new(vmsd),
            });
        }
        Ok(VmDesc {
            page_size,
            devices,
            json,
        })
    }

    /// The entry for a section, by idstr and instance id.
    pub fn device(&self, idstr: &str, instance_id: u32) -> Option<&DeviceDesc> {
        self.devices
            .iter()
            .find(|d| d.name == idstr && d.instance_id == instance_id)
    }
}

fn malformed(what: &str) -> VmDescError {
    VmDescError::Malformed {
        what: what.to_string(),
    }
}

/// Builds a description from a vmdesc object with `vmsd_name`, `version`, `fields`,
/// `subsections`. Sizes come from the vmdesc, so every field decodes exactly as recorded.
pub fn description_from_json(obj: &Json, path: &str) -> Result<VMStateDescription> {
    let name = obj
        .get("vmsd_name")
        .and_then(Json::as_str)
        .unwrap_or_default();
    let version = obj
        .get("version")
        .and_then(Json::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(u32::MAX);
    let mut vmsd = VMStateDescription::new(name, version, 0);
    let fields = obj
        .get("fields")
        .and_then(Json::as_array)
        .ok_or_else(|| malformed(&format!("{path}.fields")))?;
    for f in fields {
        vmsd.fields.push(field_from_json(f, path)?);
    }
    if let Some(subs) = obj.get("subsections").and_then(Json::as_array) {
        for s in subs {
            let sub = description_from_json(s, path)?;
            vmsd = vmsd.subsection(sub, None);
        }
    }
    Ok(vmsd)
}

fn field_from_json(f: &Json, path: &str) -> Result<Field> {
    let name = f
        .get("name")
        .and_then(Json::as_str)
        .ok_or_else(|| malformed(&format!("{path}: field name")))?;
    // The field's path, for errors and nested structs only (not built for every field).
    let here = || format!("{path}.{name}");
    let ty = f
        .get("type")
        .and_then(Json::as_str)
        .ok_or_else(|| malformed(&format!("{}.type", here())))?;
    let size = f
        .get("size")
        .and_then(Json::as_u64)
        .ok_or_else(|| malformed(&format!("{}.size", here())))?;
    let int_size = u8::try_from(size).ok().filter(|s| (1..=8).contains(s));
    let opaque = || FieldType::Opaque {
        type_name: ty.to_string(),
        size,
    };
    let field_type = match (ty, int_size) {
        ("bool", Some(1)) => FieldType::Bool,
        ("int8" | "int16" | "int32" | "int64", Some(size)) => FieldType::Int { size, signed: true },
        ("uint8" | "uint16" | "uint32" | "uint64", Some(size)) => FieldType::Int {
            size,
            signed: false,
        },
        ("int32 equal", Some(size)) => FieldType::Equal {
            size,
            signed: true,
            expected: None,
        },
        ("uint32 equal" | "uint8 equal" | "uint16 equal" | "int64 equal", Some(size)) => {
            FieldType::Equal {
                size,
                signed: false,
                expected: None,
            }
        }
        ("int32 le", Some(4)) => FieldType::Int32Le { max: None },
        ("float64", Some(8)) => FieldType::Float64,
        ("timer", Some(8)) => FieldType::Timer,
        ("struct", _) => match f.get("struct") {
            Some(s) if s.get("fields").is_some() => {
                FieldType::Struct(Arc::new(description_from_json(s, &here())?))
            }
            _ => opaque(),
        },
        _ => opaque(),
    };
    let count = if let Some(n) = f.get("array_len").and_then(Json::as_u64) {
        Count::Fixed(u32::try_from(n).map_err(|_| malformed(&format!("{}.array_len", here())))?)
    } else if let Some(i) = f.get("index").and_then(Json::as_u64) {
        Count::Element(u32::try_from(i).map_err(|_| malformed(&format!("{}.index", here())))?)
    } else {
        Count::One
    };
    Ok(Field::new(name, field_type).count(count))
}

/// QEMU's compact JSON style: `{"a": 1, "b": [1, 2]}`.
#[derive(Debug, Default)]
struct QemuFormatter;

impl Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// Serializes JSON the way QEMU's json-writer writes the vmdesc.
pub fn to_qemu_json(v: &Json) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    // Serializing a serde_json::Value into a Vec cannot fail.
    let _ = v.serialize(&mut ser);
    out
}

/// Python's `json.dumps(indent=4)` style with ASCII-only output, as analyze-migration.py
/// prints.
#[derive(Debug)]
struct PythonFormatter<'a>(PrettyFormatter<'a>);

impl Formatter for PythonFormatter<'_> {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }
    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, s: &str) -> io::Result<()> {
        // Runs of ASCII in one write; everything else as \uXXXX (UTF-16 units).
        let mut rest = s;
        while !rest.is_empty() {
            let ascii = rest
                .bytes()
                .position(|b| !b.is_ascii())
                .unwrap_or(rest.len());
            w.write_all(&rest.as_bytes()[..ascii])?;
            rest = &rest[ascii..];
            let Some(c) = rest.chars().next() else { break };
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(w, "\\u{u:04x}")?;
            }
            rest = &rest[c.len_utf8()..];
        }
        Ok(())
    }
}

/// Serializes JSON as analyze-migration.py prints it (`indent=4`, ASCII escapes).
pub fn to_python_json(v: &Json) -> String {
    let mut out = Vec::new();
    let fmt = PythonFormatter(PrettyFormatter::with_indent(b"    "));
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    let _ = v.serialize(&mut ser);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_and_python_formatting() {
        let v: Json =
            serde_json::from_str(r#"{"a": 1, "b": [1, {"c": "é"}], "d": {}, "e": []}"#).unwrap();
        assert_eq!(
            String::from_utf8(to_qemu_json(&v)).unwrap(),
            r#"{"a": 1, "b": [1, {"c": "é"}], "d": {}, "e": []}"#
        );
        assert_eq!(
            to_python_json(&v),
            "{\n    \"a\": 1,\n    \"b\": [\n        1,\n        {\n            \"c\": \"\\u00e9\"\n        }\n    ],\n    \"d\": {},\n    \"e\": []\n}"
        );
    }

    #[test]
    fn python_escapes_every_non_ascii_character_between_ascii_runs() {
        let v = Json::from("ab\u{e9}\u{20ac}cd\u{1f600}\n\"e");
        assert_eq!(to_python_json(&v), r#""ab\u00e9\u20accd\ud83d\ude00\n\"e""#);
        assert_eq!(to_python_json(&Json::from("\u{e9}")), r#""\u00e9""#);
    }

    #[test]
    fn descriptions_from_vmdesc() {
        let j = br#"{"page_size": 4096, "devices": [{"name": "d", "instance_id": 1, "vmsd_name": "d", "version": 3, "fields": [{"name": "a", "array_len": 4, "type": "uint16", "size": 2}, {"name": "p", "index": 0, "type": "uint64", "size": 1}, {"name": "s", "type": "struct", "struct": {"vmsd_name": "s", "version": 1, "fields": [{"name": "x", "type": "mystery", "size": 3}]}, "size": 3}], "subsections": [{"vmsd_name": "d/sub", "version": 2, "fields": []}]}]}"#;
        let d = VmDesc::parse(j).unwrap();
        assert_eq!(d.page_size, 4096);
        let dev = d.device("d", 1).unwrap();
        assert_eq!(dev.vmsd.version_id, 3);
        assert_eq!(dev.vmsd.fields[0].count, Count::Fixed(4));
        assert_eq!(dev.vmsd.fields[1].count, Count::Element(0));
        assert!(matches!(
            dev.vmsd.fields[1].ty,
            FieldType::Int {
                size: 1,
                signed: false
            }
        ));
        assert_eq!(dev.vmsd.subsections[0].vmsd.version_id, 2);
        assert!(VmDesc::parse(b"{}").is_err());
        assert!(VmDesc::parse(b"{").is_err());
    }
}
