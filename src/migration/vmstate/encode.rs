//! Encoding a value by its description and describing it in vmdesc JSON (QEMU's
//! `vmstate_save_state`).

use std::io::Write;

use serde_json::{Map, Value as Json};

use super::{
    field_exists, lookup_int, Count, Field, FieldType, Result, VMStateDescription, VmStateError,
};
use crate::migration::protocol::{SectionType, NULLPTR_MARKER};
use crate::migration::qemu_file::QemuFileWriter;
use crate::migration::value::Value;

impl VMStateDescription {
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
