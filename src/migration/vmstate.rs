//! VMState descriptions: one declarative description of a device's fields drives encoding,
//! decoding and the device's entry in the vmdesc JSON, as `migration/vmstate.c` does in QEMU.

use std::io::{Read, Write};
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use super::protocol::{SectionType, NULLPTR_MARKER};
use super::qemu_file::{QemuFileError, QemuFileReader, QemuFileWriter};
use super::value::{mask, Value};

/// Largest single field (buffer, array) a stream may make us allocate.
pub const MAX_FIELD_BYTES: u64 = 256 << 20;

/// Errors while encoding or decoding device state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// The stream source or sink failed or ended.
    #[error(transparent)]
    File(#[from] QemuFileError),
    /// The stream's version is newer than the description's.
    #[error("{vmsd}: stream version {version} is newer than the supported {max}")]
    VersionTooNew {
        /// Description name.
        vmsd: String,
        /// Version in the stream.
        version: u32,
        /// Our version_id.
        max: u32,
    },
    /// The stream's version is older than the description's minimum.
    #[error("{vmsd}: stream version {version} is older than the minimum {min}")]
    VersionTooOld {
        /// Description name.
        vmsd: String,
        /// Version in the stream.
        version: u32,
        /// Our minimum_version_id.
        min: u32,
    },
    /// An "equal" field differs from the value it must have.
    #[error("{vmsd}.{field}: value {got:#x} in stream at {offset:#x} must equal {expected:#x}")]
    NotEqual {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// Stream offset of the value.
        offset: u64,
        /// Value required.
        expected: u64,
        /// Value found.
        got: u64,
    },
    /// An "int32 le" field is negative or above its limit.
    #[error("{vmsd}.{field}: value {got} at {offset:#x} is not within 0..={max}")]
    OutOfRange {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// Stream offset of the value.
        offset: u64,
        /// Upper limit.
        max: i32,
        /// Value found.
        got: i32,
    },
    /// A subsection in the stream that the description does not know.
    #[error("{vmsd}: unknown subsection '{name}' at {offset:#x}")]
    UnknownSubsection {
        /// Description name.
        vmsd: String,
        /// Subsection name found.
        name: String,
        /// Stream offset of the subsection marker.
        offset: u64,
    },
    /// A NULL-pointer marker was expected but something else was found.
    #[error(
        "{vmsd}.{field}[{index}]: expected NULL marker 0x30 at {offset:#x}, found {found:#04x}"
    )]
    BadNullMarker {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// Element index.
        index: u32,
        /// Stream offset.
        offset: u64,
        /// Byte found.
        found: u8,
    },
    /// A length taken from the stream is too large to allocate.
    #[error("{vmsd}.{field}: length {len:#x} at {offset:#x} exceeds the limit {max:#x}")]
    TooLarge {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// Stream offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// Encoding: the value has no field of this name.
    #[error("{vmsd}: value has no field '{field}'")]
    MissingField {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
    },
    /// Encoding: the value does not fit the field's type.
    #[error("{vmsd}.{field}: value {value} does not fit type {ty}")]
    WrongType {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// QEMU type name.
        ty: String,
        /// Short rendering of the offending value.
        value: String,
    },
    /// A length field refers to a field that is missing or not an integer.
    #[error("{vmsd}.{field}: length field '{len_field}' missing or not an integer")]
    BadLengthField {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// The length field named by the description.
        len_field: String,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, VmStateError>;

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

    /// Encodes `value` at this description's `version_id`; fills `vmdesc` (a JSON object
    /// under construction) with `vmsd_name`, `version`, `fields` and `subsections`.
    pub fn encode<W: Write>(
        &self,
        f: &mut QemuFileWriter<W>,
        value: &Value,
        vmdesc: Option<&mut Map<String, Json>>,
    ) -> Result<()> {
        Encoder { vmsd: self }.encode(f, value, vmdesc)
    }

    /// Decodes a struct of this description sent at `version_id`.
    pub fn decode<R: Read>(&self, f: &mut QemuFileReader<R>, version_id: u32) -> Result<Value> {
        if version_id > self.version_id {
            return Err(VmStateError::VersionTooNew {
                vmsd: self.name.clone(),
                version: version_id,
                max: self.version_id,
            });
        }
        if version_id < self.minimum_version_id {
            return Err(VmStateError::VersionTooOld {
                vmsd: self.name.clone(),
                version: version_id,
                min: self.minimum_version_id,
            });
        }
        let mut out: Vec<(String, Value)> = Vec::new();
        for field in &self.fields {
            let cur = Value::Struct(std::mem::take(&mut out));
            let exists = field_exists(field, &cur, version_id);
            if let Value::Struct(o) = cur {
                out = o;
            }
            if !exists {
                continue;
            }
            self.decode_field(f, field, &mut out)?;
        }
        self.decode_subsections(f, &mut out)?;
        Ok(Value::Struct(out))
    }

    fn decode_field<R: Read>(
        &self,
        f: &mut QemuFileReader<R>,
        field: &Field,
        out: &mut Vec<(String, Value)>,
    ) -> Result<()> {
        match &field.count {
            Count::One => {
                let v = self.decode_elem(f, field, 0, out)?;
                out.push((field.name.clone(), v));
            }
            Count::Element(i) => {
                let v = self.decode_elem(f, field, *i, out)?;
                let slot = if *i == 0 {
                    None
                } else {
                    out.iter_mut()
                        .rev()
                        .find(|(n, v)| n == &field.name && matches!(v, Value::Array(_)))
                };
                match slot {
                    Some((_, Value::Array(a))) => a.push(v),
                    _ => out.push((field.name.clone(), Value::Array(vec![v]))),
                }
            }
            Count::Fixed(_) | Count::FromField(_) => {
                let n = self.elem_count(field, out, Some(f.position()))?;
                let mut elems = Vec::with_capacity(n.min(4096) as usize);
                for i in 0..n {
                    elems.push(self.decode_elem(f, field, i, out)?);
                }
                out.push((field.name.clone(), Value::Array(elems)));
            }
        }
        Ok(())
    }

    fn elem_count(&self, field: &Field, st: &[(String, Value)], at: Option<u64>) -> Result<u32> {
        match &field.count {
            Count::One | Count::Element(_) => Ok(1),
            Count::Fixed(n) => Ok(*n),
            Count::FromField(len) => {
                let n = lookup_int(st, len).ok_or_else(|| VmStateError::BadLengthField {
                    vmsd: self.name.clone(),
                    field: field.name.clone(),
                    len_field: len.clone(),
                })?;
                let limit = MAX_FIELD_BYTES;
                if n > limit {
                    return Err(VmStateError::TooLarge {
                        vmsd: self.name.clone(),
                        field: field.name.clone(),
                        offset: at.unwrap_or(0),
                        len: n,
                        max: limit,
                    });
                }
                Ok(u32::try_from(n).unwrap_or(u32::MAX))
            }
        }
    }

    fn decode_elem<R: Read>(
        &self,
        f: &mut QemuFileReader<R>,
        field: &Field,
        index: u32,
        st: &[(String, Value)],
    ) -> Result<Value> {
        let offset = f.position();
        if let Some(nulls) = &field.null_elements {
            if nulls.contains(&index) {
                let found = f.get_u8()?;
                if found != NULLPTR_MARKER {
                    return Err(VmStateError::BadNullMarker {
                        vmsd: self.name.clone(),
                        field: field.name.clone(),
                        index,
                        offset,
                        found,
                    });
                }
                return Ok(Value::Null);
            }
        }
        Ok(match &field.ty {
            FieldType::Bool => Value::Bool(f.get_u8()? != 0),
            FieldType::Int { size, .. } => Value::Int {
                size: *size,
                signed: field.ty.display_signed(),
                raw: get_uint(f, *size)?,
            },
            FieldType::Equal { size, expected, .. } => {
                let raw = get_uint(f, *size)?;
                if let Some(e) = expected {
                    if *e & mask(*size) != raw {
                        return Err(VmStateError::NotEqual {
                            vmsd: self.name.clone(),
                            field: field.name.clone(),
                            offset,
                            expected: *e,
                            got: raw,
                        });
                    }
                }
                Value::Int {
                    size: *size,
                    signed: field.ty.display_signed(),
                    raw,
                }
            }
            FieldType::Int32Le { max } => {
                let raw = f.get_be32()?;
                #[allow(clippy::cast_possible_wrap)]
                let got = raw as i32;
                if let Some(max) = max {
                    if got < 0 || got > *max {
                        return Err(VmStateError::OutOfRange {
                            vmsd: self.name.clone(),
                            field: field.name.clone(),
                            offset,
                            max: *max,
                            got,
                        });
                    }
                }
                Value::i32(got)
            }
            FieldType::Float64 => Value::F64(f64::from_bits(f.get_be64()?)),
            #[allow(clippy::cast_possible_wrap)]
            FieldType::Timer => Value::Timer(f.get_be64()? as i64),
            FieldType::Buffer(n) | FieldType::Unused(n) => Value::Bytes(f.get_vec(*n as usize)?),
            FieldType::VBuffer { len_field } => {
                let n = lookup_int(st, len_field).ok_or_else(|| VmStateError::BadLengthField {
                    vmsd: self.name.clone(),
                    field: field.name.clone(),
                    len_field: len_field.clone(),
                })?;
                Value::Bytes(self.bounded_vec(f, field, n)?)
            }
            FieldType::Bitmap { bits } => {
                Value::Bytes(f.get_vec((u64::from(*bits).div_ceil(64) * 8) as usize)?)
            }
            FieldType::Opaque { size, .. } => Value::Bytes(self.bounded_vec(f, field, *size)?),
            FieldType::Capability => {
                let n = f.get_u8()?;
                Value::Bytes(f.get_vec(usize::from(n))?)
            }
            FieldType::Struct(d) => d.decode(f, d.version_id)?,
        })
    }

    fn bounded_vec<R: Read>(
        &self,
        f: &mut QemuFileReader<R>,
        field: &Field,
        n: u64,
    ) -> Result<Vec<u8>> {
        if n > MAX_FIELD_BYTES {
            return Err(VmStateError::TooLarge {
                vmsd: self.name.clone(),
                field: field.name.clone(),
                offset: f.position(),
                len: n,
                max: MAX_FIELD_BYTES,
            });
        }
        // Read in steps so a lying length cannot allocate more than the stream holds.
        let mut v = Vec::new();
        let mut left = n as usize;
        while left > 0 {
            let step = left.min(1 << 20);
            let at = v.len();
            v.resize(at + step, 0);
            f.read_exact(&mut v[at..])?;
            left -= step;
        }
        Ok(v)
    }

    fn decode_subsections<R: Read>(
        &self,
        f: &mut QemuFileReader<R>,
        out: &mut Vec<(String, Value)>,
    ) -> Result<()> {
        loop {
            let offset = f.position();
            let head = f.peek(2)?;
            if head.first() != Some(&(SectionType::Subsection as u8)) || head.len() < 2 {
                return Ok(());
            }
            let len = usize::from(head[1]);
            if len < self.name.len() + 1 {
                return Ok(());
            }
            let head = f.peek(2 + len)?;
            if head.len() < 2 + len {
                return Ok(());
            }
            let name = String::from_utf8_lossy(&head[2..]).into_owned();
            if !name.starts_with(&self.name) {
                return Ok(());
            }
            let Some(sub) = self.subsections.iter().find(|s| s.vmsd.name == name) else {
                return Err(VmStateError::UnknownSubsection {
                    vmsd: self.name.clone(),
                    name,
                    offset,
                });
            };
            f.skip(2 + len as u64)?;
            let version = f.get_be32()?;
            let v = sub.vmsd.decode(f, version)?;
            out.push((name, v));
        }
    }
}

fn field_exists(field: &Field, st: &Value, version: u32) -> bool {
    if field.since_version > version {
        return false;
    }
    match field.exists {
        Some(pred) => pred(st, version),
        None => true,
    }
}

fn lookup_int(st: &[(String, Value)], name: &str) -> Option<u64> {
    st.iter().rev().find(|(n, _)| n == name)?.1.as_u64()
}

fn get_uint<R: Read>(f: &mut QemuFileReader<R>, size: u8) -> Result<u64> {
    let mut b = [0u8; 8];
    let n = usize::from(size.min(8));
    f.read_exact(&mut b[8 - n..])?;
    Ok(u64::from_be_bytes(b))
}

fn put_uint<W: Write>(f: &mut QemuFileWriter<W>, size: u8, v: u64) -> Result<()> {
    let n = usize::from(size.min(8));
    f.put_buffer(&v.to_be_bytes()[8 - n..])?;
    Ok(())
}

/// Walks a description and a value together, writing the stream and the vmdesc.
struct Encoder<'a> {
    vmsd: &'a VMStateDescription,
}

impl Encoder<'_> {
    fn encode<W: Write>(
        &self,
        f: &mut QemuFileWriter<W>,
        value: &Value,
        mut vmdesc: Option<&mut Map<String, Json>>,
    ) -> Result<()> {
        let vmsd = self.vmsd;
        let Value::Struct(entries) = value else {
            return Err(self.wrong("<struct>", "struct", value));
        };
        let mut fields_json: Vec<Json> = Vec::new();
        let mut cursor = 0usize;
        for field in &vmsd.fields {
            if !field_exists(field, value, vmsd.version_id) {
                continue;
            }
            let (idx, fv) = find_entry(entries, &field.name, &mut cursor, &field.count)
                .ok_or_else(|| VmStateError::MissingField {
                    vmsd: vmsd.name.clone(),
                    field: field.name.clone(),
                })?;
            let _ = idx;
            let elems: Vec<&Value> = match (&field.count, fv) {
                (Count::One, v) => vec![v],
                (Count::Element(i), Value::Array(a)) => {
                    vec![a
                        .get(*i as usize)
                        .ok_or_else(|| VmStateError::MissingField {
                            vmsd: vmsd.name.clone(),
                            field: format!("{}[{i}]", field.name),
                        })?]
                }
                (Count::Element(_), v) => vec![v],
                (Count::Fixed(_) | Count::FromField(_), Value::Array(a)) => {
                    let want = self.vmsd.elem_count(field, entries, None)? as usize;
                    if a.len() != want {
                        return Err(self.wrong(&field.name, &format!("array of {want}"), fv));
                    }
                    a.iter().collect()
                }
                (_, v) => return Err(self.wrong(&field.name, "array", v)),
            };
            let n = elems.len();
            let mut described = vmdesc.is_some();
            for (i, el) in elems.into_iter().enumerate() {
                let start = f.position();
                let mut obj = Map::new();
                let mut sub = Map::new();
                obj.insert("name".into(), Json::from(field.name.clone()));
                match field.count {
                    Count::Element(ix) => {
                        obj.insert("index".into(), Json::from(ix));
                    }
                    _ if n > 1 => {
                        if field.compressible() {
                            obj.insert("array_len".into(), Json::from(n));
                        } else {
                            obj.insert("index".into(), Json::from(i));
                        }
                    }
                    _ => {}
                }
                obj.insert("type".into(), Json::from(field.ty.type_name()));
                self.encode_elem(f, field, el, entries, described.then_some(&mut sub))?;
                if described {
                    if let FieldType::Struct(_) = field.ty {
                        obj.insert("struct".into(), Json::Object(sub));
                    }
                    obj.insert("size".into(), Json::from(f.position() - start));
                    fields_json.push(Json::Object(obj));
                    if field.compressible() && n > 1 {
                        described = false;
                    }
                }
            }
        }
        if let Some(d) = vmdesc.as_deref_mut() {
            d.insert("vmsd_name".into(), Json::from(vmsd.name.clone()));
            d.insert("version".into(), Json::from(vmsd.version_id));
            d.insert("fields".into(), Json::Array(fields_json));
        }
        let mut subs_json = Vec::new();
        for sub in &vmsd.subsections {
            let entry = entries.iter().find(|(n, _)| n == &sub.vmsd.name);
            let needed = match sub.needed {
                Some(p) => p(value),
                None => entry.is_some(),
            };
            if !needed {
                continue;
            }
            let Some((_, sv)) = entry else {
                return Err(VmStateError::MissingField {
                    vmsd: vmsd.name.clone(),
                    field: sub.vmsd.name.clone(),
                });
            };
            f.put_u8(SectionType::Subsection as u8)?;
            f.put_counted_string(&sub.vmsd.name)?;
            f.put_be32(sub.vmsd.version_id)?;
            let mut m = Map::new();
            Encoder { vmsd: &sub.vmsd }.encode(f, sv, vmdesc.is_some().then_some(&mut m))?;
            subs_json.push(Json::Object(m));
        }
        if let Some(d) = vmdesc {
            if !subs_json.is_empty() {
                d.insert("subsections".into(), Json::Array(subs_json));
            }
        }
        Ok(())
    }

    fn wrong(&self, field: &str, ty: &str, v: &Value) -> VmStateError {
        let s: String = format!("{v:?}").chars().take(60).collect();
        VmStateError::WrongType {
            vmsd: self.vmsd.name.clone(),
            field: field.to_string(),
            ty: ty.to_string(),
            value: s,
        }
    }

    fn encode_elem<W: Write>(
        &self,
        f: &mut QemuFileWriter<W>,
        field: &Field,
        v: &Value,
        st: &[(String, Value)],
        vmdesc: Option<&mut Map<String, Json>>,
    ) -> Result<()> {
        let tyname = field.ty.type_name();
        let wrong = || self.wrong(&field.name, &tyname, v);
        if matches!(v, Value::Null) {
            if field.null_elements.is_none() {
                return Err(wrong());
            }
            f.put_u8(NULLPTR_MARKER)?;
            return Ok(());
        }
        match (&field.ty, v) {
            (FieldType::Bool, Value::Bool(b)) => f.put_u8(u8::from(*b))?,
            (
                FieldType::Int { size, .. } | FieldType::Equal { size, .. },
                Value::Int { raw, .. },
            ) => put_uint(f, *size, *raw)?,
            (FieldType::Int32Le { .. }, Value::Int { raw, .. }) => put_uint(f, 4, *raw)?,
            (FieldType::Float64, Value::F64(x)) => f.put_be64(x.to_bits())?,
            #[allow(clippy::cast_sign_loss)]
            (FieldType::Timer, Value::Timer(t)) => f.put_be64(*t as u64)?,
            (FieldType::Buffer(n), Value::Bytes(b)) if b.len() == *n as usize => f.put_buffer(b)?,
            (FieldType::Unused(n), _) => {
                // QEMU writes zeroes whatever the value; keep given bytes for round trips.
                match v {
                    Value::Bytes(b) if b.len() == *n as usize => f.put_buffer(b)?,
                    _ => f.put_buffer(&vec![0u8; *n as usize])?,
                }
            }
            (FieldType::VBuffer { len_field }, Value::Bytes(b)) => {
                if lookup_int(st, len_field) != Some(b.len() as u64) {
                    return Err(VmStateError::BadLengthField {
                        vmsd: self.vmsd.name.clone(),
                        field: field.name.clone(),
                        len_field: len_field.clone(),
                    });
                }
                f.put_buffer(b)?
            }
            (FieldType::Bitmap { bits }, Value::Bytes(b))
                if b.len() as u64 == u64::from(*bits).div_ceil(64) * 8 =>
            {
                f.put_buffer(b)?
            }
            (FieldType::Opaque { size, .. }, Value::Bytes(b)) if b.len() as u64 == *size => {
                f.put_buffer(b)?
            }
            (FieldType::Capability, Value::Bytes(b)) if b.len() < 256 => {
                f.put_u8(b.len() as u8)?;
                f.put_buffer(b)?
            }
            (FieldType::Struct(d), Value::Struct(_)) => Encoder { vmsd: d }.encode(f, v, vmdesc)?,
            _ => return Err(wrong()),
        }
        Ok(())
    }
}

/// Finds the value for the next description entry called `name`, searching forward from
/// `cursor` (names may repeat) and then from the start.
fn find_entry<'v>(
    entries: &'v [(String, Value)],
    name: &str,
    cursor: &mut usize,
    count: &Count,
) -> Option<(usize, &'v Value)> {
    if let Count::Element(i) = count {
        if *i > 0 {
            // Later elements live in the array opened by element 0, before the cursor.
            let idx = entries[..*cursor]
                .iter()
                .rposition(|(n, v)| n == name && matches!(v, Value::Array(_)))?;
            return Some((idx, &entries[idx].1));
        }
    }
    let from = (*cursor).min(entries.len());
    let idx = entries[from..]
        .iter()
        .position(|(n, _)| n == name)
        .map(|i| i + from)
        .or_else(|| entries.iter().position(|(n, _)| n == name))?;
    *cursor = idx + 1;
    Some((idx, &entries[idx].1))
}

#[cfg(test)]
mod tests {
    use super::*;

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
