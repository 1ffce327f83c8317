//! Decoding a struct by its description (QEMU's `vmstate_load_state`).

use std::io::Read;

use super::{
    field_exists, lookup_int, Count, Field, FieldType, Result, VMStateDescription, VmStateError,
    MAX_FIELD_BYTES,
};
use crate::migration::protocol::{SectionType, NULLPTR_MARKER};
use crate::migration::qemu_file::QemuFileReader;
use crate::migration::value::{mask, Value};

impl VMStateDescription {
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

    pub(super) fn elem_count(
        &self,
        field: &Field,
        st: &[(String, Value)],
        at: Option<u64>,
    ) -> Result<u32> {
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

fn get_uint<R: Read>(f: &mut QemuFileReader<R>, size: u8) -> Result<u64> {
    let mut b = [0u8; 8];
    let n = usize::from(size.min(8));
    f.read_exact(&mut b[8 - n..])?;
    Ok(u64::from_be_bytes(b))
}
