//! VMState descriptions: one declarative description of a device's fields drives encoding,
//! decoding and the device's entry in the vmdesc JSON, as `migration/vmstate.c` does in QEMU.

mod decode;
mod encode;
mod error;

use std::sync::Arc;

use super::value::Value;

pub use error::{Result, VmStateError, MAX_FIELD_BYTES};

/// How a field's type is laid out on the wire.
#[derive(Debug, Clone)]
pub enum FieldType {
    /// `bool`: one byte, 0 or 1.
    Bool,
    /// A big-endian integer of `size` bytes (`int8` … `uint64`).
    Int {
        /// Width in bytes (1, 2, 4 or 8; other widths come only from vmdesc).
        size: u8,
        /// Signedness.
        signed: bool,
    },
    /// An integer that must equal `expected` on load (`int32 equal`, `uint8 equal`, …).
    Equal {
        /// Width in bytes.
        size: u8,
        /// Signedness of the underlying type (QEMU's `uint64 equal` is named "int64 equal").
        signed: bool,
        /// The required value; `None` accepts anything (e.g. decoding by vmdesc).
        expected: Option<u64>,
    },
    /// `int32 le`: a be32 that must lie in `0..=max` on load.
    Int32Le {
        /// Upper bound, `None` to accept anything.
        max: Option<i32>,
    },
    /// `float64`: IEEE double, big-endian.
    Float64,
    /// `timer`: be64 expiry in ns (-1 = not pending).
    Timer,
    /// `buffer` of a fixed size.
    Buffer(u32),
    /// `buffer` whose length is the value of an earlier integer field (VMSTATE_VBUFFER).
    VBuffer {
        /// Name of the length field in the same struct.
        len_field: String,
    },
    /// `unused_buffer`: `n` bytes written as zero, ignored on load.
    Unused(u32),
    /// `bitmap` of `bits` bits, as be64 words.
    Bitmap {
        /// Number of bits.
        bits: u32,
    },
    /// A nested struct with its own description.
    Struct(Arc<VMStateDescription>),
    /// `capability`: a string with a one-byte length (the configuration's capability list).
    Capability,
    /// A field of a type we do not interpret, `size` raw bytes (from vmdesc).
    Opaque {
        /// QEMU's type name.
        type_name: String,
        /// Bytes on the wire.
        size: u64,
    },
}

impl FieldType {
    /// QEMU's `VMStateInfo` name, as written into vmdesc "type".
    pub fn type_name(&self) -> String {
        match self {
            FieldType::Bool => "bool".into(),
            FieldType::Int { size, signed } => int_name(*size, *signed),
            FieldType::Equal { size, signed, .. } => match (size, signed) {
                (8, false) => "int64 equal".into(),
                _ => format!("{} equal", int_name(*size, *signed)),
            },
            FieldType::Int32Le { .. } => "int32 le".into(),
            FieldType::Float64 => "float64".into(),
            FieldType::Timer => "timer".into(),
            FieldType::Buffer(_) | FieldType::VBuffer { .. } => "buffer".into(),
            FieldType::Unused(_) => "unused_buffer".into(),
            FieldType::Bitmap { .. } => "bitmap".into(),
            FieldType::Struct(_) => "struct".into(),
            FieldType::Capability => "capability".into(),
            FieldType::Opaque { type_name, .. } => type_name.clone(),
        }
    }

    /// Whether analyze-migration.py shows this integer type signed.
    fn display_signed(&self) -> bool {
        match self {
            FieldType::Int { signed, .. } => *signed,
            // analyze-migration.py reads every "equal" type but uint32's as signed.
            FieldType::Equal { size, signed, .. } => *signed || *size != 4,
            _ => true,
        }
    }
}

fn int_name(size: u8, signed: bool) -> String {
    format!(
        "{}int{}",
        if signed { "" } else { "u" },
        u32::from(size) * 8
    )
}

/// How many elements a field has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Count {
    /// A single value.
    One,
    /// A fixed-length array.
    Fixed(u32),
    /// A variable-length array; its length is an earlier integer field of the same struct.
    FromField(String),
    /// One element of an array described element by element (vmdesc "index").
    Element(u32),
}

/// Decides from the struct's value (complete on save, decoded so far on load) and the stream
/// version whether a field exists (QEMU's `field_exists`).
pub type ExistsFn = fn(&Value, u32) -> bool;

/// Decides from the parent struct's value whether a subsection is sent (QEMU's `needed`).
pub type NeededFn = fn(&Value) -> bool;

/// One field of a description.
#[derive(Debug, Clone)]
pub struct Field {
    /// Field name (key in the struct value and in vmdesc).
    pub name: String,
    /// Wire type of each element.
    pub ty: FieldType,
    /// Element count.
    pub count: Count,
    /// The field exists only in streams of this version or newer (QEMU `VMSTATE_*_V`).
    pub since_version: u32,
    /// Dynamic existence test; such arrays are described element by element in vmdesc.
    pub exists: Option<ExistsFn>,
    /// An array of pointers: `Value::Null` elements are sent as the NULL marker. On load,
    /// the elements listed here are NULL in the destination and must carry the marker.
    pub null_elements: Option<Vec<u32>>,
}

impl Field {
    /// A single field of type `ty`.
    pub fn new(name: impl Into<String>, ty: FieldType) -> Self {
        Field {
            name: name.into(),
            ty,
            count: Count::One,
            since_version: 0,
            exists: None,
            null_elements: None,
        }
    }
    /// `bool` field.
    pub fn bool(name: &str) -> Self {
        Self::new(name, FieldType::Bool)
    }
    /// Unsigned integer field of `size` bytes.
    pub fn uint(name: &str, size: u8) -> Self {
        Self::new(
            name,
            FieldType::Int {
                size,
                signed: false,
            },
        )
    }
    /// Signed integer field of `size` bytes.
    pub fn int(name: &str, size: u8) -> Self {
        Self::new(name, FieldType::Int { size, signed: true })
    }
    /// A nested struct.
    pub fn structure(name: &str, vmsd: Arc<VMStateDescription>) -> Self {
        Self::new(name, FieldType::Struct(vmsd))
    }
    /// Makes this field an array.
    pub fn count(mut self, count: Count) -> Self {
        self.count = count;
        self
    }
    /// Makes this field exist only from `version` on.
    pub fn since(mut self, version: u32) -> Self {
        self.since_version = version;
        self
    }
    /// Adds a dynamic existence test.
    pub fn exists_if(mut self, f: ExistsFn) -> Self {
        self.exists = Some(f);
        self
    }
    /// Marks the field an array of pointers; `nulls` are NULL on the loading side.
    pub fn pointers(mut self, nulls: Vec<u32>) -> Self {
        self.null_elements = Some(nulls);
        self
    }

    fn compressible(&self) -> bool {
        if self.exists.is_some() || self.null_elements.is_some() {
            return false;
        }
        match &self.ty {
            FieldType::Struct(d) => d.fields.iter().all(Field::compressible),
            _ => true,
        }
    }
}

/// A subsection: a description sent after the fields when `needed` says so.
#[derive(Debug, Clone)]
pub struct Subsection {
    /// The subsection's description; its name is sent (`parent/child` by convention).
    pub vmsd: Arc<VMStateDescription>,
    /// Predicate on the parent value; `None` means "sent when the value has an entry named
    /// like the subsection".
    pub needed: Option<NeededFn>,
}

/// A device's (or struct's) layout, as QEMU's `VMStateDescription`.
#[derive(Debug, Clone)]
pub struct VMStateDescription {
    /// vmsd name.
    pub name: String,
    /// Version written to streams.
    pub version_id: u32,
    /// Oldest stream version accepted.
    pub minimum_version_id: u32,
    /// Fields in wire order.
    pub fields: Vec<Field>,
    /// Optional subsections in wire order.
    pub subsections: Vec<Subsection>,
}

impl VMStateDescription {
    /// An empty description.
    pub fn new(name: impl Into<String>, version_id: u32, minimum_version_id: u32) -> Self {
        VMStateDescription {
            name: name.into(),
            version_id,
            minimum_version_id,
            fields: Vec::new(),
            subsections: Vec::new(),
        }
    }
    /// Adds a field.
    pub fn field(mut self, f: Field) -> Self {
        self.fields.push(f);
        self
    }
    /// Adds a subsection.
    pub fn subsection(mut self, vmsd: VMStateDescription, needed: Option<NeededFn>) -> Self {
        self.subsections.push(Subsection {
            vmsd: Arc::new(vmsd),
            needed,
        });
        self
    }
}

pub(crate) fn field_exists(field: &Field, st: &Value, version: u32) -> bool {
    if field.since_version > version {
        return false;
    }
    match field.exists {
        Some(pred) => pred(st, version),
        None => true,
    }
}

pub(crate) fn lookup_int(st: &[(String, Value)], name: &str) -> Option<u64> {
    st.iter().rev().find(|(n, _)| n == name)?.1.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::qemu_file::{QemuFileReader, QemuFileWriter};
    use serde_json::Map;

    fn nested() -> Arc<VMStateDescription> {
        Arc::new(
            VMStateDescription::new("elem", 1, 1)
                .field(Field::uint("a", 2))
                .field(Field::bool("b")),
        )
    }

    fn dev() -> VMStateDescription {
        VMStateDescription::new("dev", 3, 2)
            .field(Field::uint("n", 4))
            .field(Field::int("s", 8))
            .field(Field::new("ok", FieldType::Int32Le { max: Some(10) }))
            .field(Field::uint("arr", 1).count(Count::Fixed(3)))
            .field(Field::structure("elems", nested()).count(Count::FromField("n".into())))
            .field(Field::new(
                "buf",
                FieldType::VBuffer {
                    len_field: "n".into(),
                },
            ))
            .field(Field::new("late", FieldType::Float64).since(3))
            .field(Field::new("t", FieldType::Timer))
            .field(Field::new("pad", FieldType::Unused(4)))
            .field(Field::new("bm", FieldType::Bitmap { bits: 70 }))
            .field(
                Field::structure("ptrs", nested())
                    .count(Count::Fixed(2))
                    .pointers(vec![1]),
            )
            .subsection(
                VMStateDescription::new("dev/extra", 1, 1).field(Field::uint("x", 8)),
                Some(|v: &Value| v.get("n").and_then(Value::as_u64) == Some(2)),
            )
    }

    fn value() -> Value {
        let e = |a: u16, b: bool| Value::structure([("a", Value::u16(a)), ("b", Value::Bool(b))]);
        Value::structure([
            ("n", Value::u32(2)),
            ("s", Value::i64(-3)),
            ("ok", Value::i32(4)),
            (
                "arr",
                Value::Array(vec![Value::u8(1), Value::u8(2), Value::u8(3)]),
            ),
            ("elems", Value::Array(vec![e(7, true), e(8, false)])),
            ("buf", Value::Bytes(vec![0xaa, 0xbb])),
            ("late", Value::F64(1.5)),
            ("t", Value::Timer(-1)),
            ("pad", Value::Bytes(vec![0; 4])),
            ("bm", Value::Bytes(vec![0xff; 16])),
            ("ptrs", Value::Array(vec![e(9, true), Value::Null])),
            (
                "dev/extra",
                Value::structure([("x", Value::u64(0x1122_3344_5566_7788))]),
            ),
        ])
    }

    #[test]
    fn encode_decode_round_trip_with_vmdesc() {
        let d = dev();
        let mut w = QemuFileWriter::new(Vec::new());
        let mut desc = Map::new();
        d.encode(&mut w, &value(), Some(&mut desc)).unwrap();
        let bytes = w.into_inner().unwrap();
        let mut r = QemuFileReader::new(&bytes[..]);
        let back = d.decode(&mut r, 3).unwrap();
        assert_eq!(back, value());
        assert_eq!(r.position(), bytes.len() as u64);
        let fields = desc["fields"].as_array().unwrap();
        assert_eq!(fields[3]["array_len"], 3);
        assert_eq!(fields[4]["array_len"], 2);
        assert_eq!(fields[4]["struct"]["vmsd_name"], "elem");
        assert_eq!(fields[4]["size"], 3);
        // Pointer arrays are described element by element; the NULL one is one byte.
        let ptr: Vec<_> = fields.iter().filter(|f| f["name"] == "ptrs").collect();
        assert_eq!(ptr.len(), 2);
        assert_eq!(ptr[1]["index"], 1);
        assert_eq!(ptr[1]["size"], 1);
        assert_eq!(desc["subsections"][0]["vmsd_name"], "dev/extra");
    }

    #[test]
    fn version_and_equal_checks() {
        let d = dev();
        let bytes = [0u8; 4];
        let mut r = QemuFileReader::new(&bytes[..]);
        assert!(matches!(
            d.decode(&mut r, 4),
            Err(VmStateError::VersionTooNew { version: 4, .. })
        ));
        assert!(matches!(
            d.decode(&mut r, 1),
            Err(VmStateError::VersionTooOld { min: 2, .. })
        ));
        let eq = VMStateDescription::new("e", 1, 1).field(Field::new(
            "v",
            FieldType::Equal {
                size: 4,
                signed: true,
                expected: Some(5),
            },
        ));
        let bytes = 6u32.to_be_bytes();
        let err = eq
            .decode(&mut QemuFileReader::new(&bytes[..]), 1)
            .unwrap_err();
        assert!(err.to_string().contains("must equal 0x5"), "{err}");
    }

    #[test]
    fn old_version_skips_new_fields_and_unknown_subsection_fails() {
        let d = VMStateDescription::new("d", 2, 1)
            .field(Field::uint("a", 1))
            .field(Field::uint("b", 1).since(2));
        let v = d.decode(&mut QemuFileReader::new(&[7u8][..]), 1).unwrap();
        assert_eq!(v, Value::structure([("a", Value::u8(7))]));
        let mut bytes = vec![1u8, 2, 5, 5];
        bytes.extend_from_slice(b"d/zzz");
        let err = d
            .decode(&mut QemuFileReader::new(&bytes[..]), 2)
            .unwrap_err();
        assert!(matches!(
            err,
            VmStateError::UnknownSubsection { offset: 2, .. }
        ));
    }
}
