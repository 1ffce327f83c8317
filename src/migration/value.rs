//! The generic value model that device state is encoded from and decoded into.
//!
//! Devices convert their Rust state to and from [`Value`]; the inspector prints it. A struct
//! keeps its fields in stream order (names may repeat, as QEMU's `unused` fields do).

use serde_json::{Map, Value as Json};

/// One decoded field, struct or array.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A `bool` field (one byte on the wire).
    Bool(bool),
    /// An integer of `size` bytes (1..=8). `raw` holds the bits, zero-extended.
    Int {
        /// Width in bytes.
        size: u8,
        /// Whether QEMU's type is signed (affects display only).
        signed: bool,
        /// The bits as read (big-endian on the wire).
        raw: u64,
    },
    /// A `float64` field.
    F64(f64),
    /// A `timer` field: expiry time in ns, -1 when not pending.
    Timer(i64),
    /// Raw bytes: buffers, unused buffers, bitmaps, and fields of types we do not interpret.
    Bytes(Vec<u8>),
    /// A NULL element of an array of pointers (QEMU writes the marker byte 0x30).
    Null,
    /// A struct: named fields (and subsections, under their vmsd names) in stream order.
    Struct(Vec<(String, Value)>),
    /// An array of elements.
    Array(Vec<Value>),
}

macro_rules! int_ctor {
    ($name:ident, $t:ty, $size:expr, $signed:expr) => {
        #[doc = concat!("An integer field of QEMU type `", stringify!($t), "`.")]
        pub fn $name(v: $t) -> Value {
            #[allow(clippy::cast_sign_loss, clippy::cast_lossless)]
            let raw = (v as u64) & mask($size);
            Value::Int {
                size: $size,
                signed: $signed,
                raw,
            }
        }
    };
}

/// All-ones mask of `size` bytes.
pub(crate) fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (u32::from(size) * 8)) - 1
    }
}

impl Value {
    int_ctor!(u8, u8, 1, false);
    int_ctor!(u16, u16, 2, false);
    int_ctor!(u32, u32, 4, false);
    int_ctor!(u64, u64, 8, false);
    int_ctor!(i8, i8, 1, true);
    int_ctor!(i16, i16, 2, true);
    int_ctor!(i32, i32, 4, true);
    int_ctor!(i64, i64, 8, true);

    /// A struct from `(name, value)` pairs.
    pub fn structure<S: Into<String>>(fields: impl IntoIterator<Item = (S, Value)>) -> Value {
        Value::Struct(fields.into_iter().map(|(n, v)| (n.into(), v)).collect())
    }

    /// The unsigned bits of an integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int { raw, .. } => Some(*raw),
            Value::Bool(b) => Some(u64::from(*b)),
            _ => None,
        }
    }

    /// An integer, sign-extended from its width.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int { size, raw, .. } => Some(sign_extend(*raw, *size)),
            _ => None,
        }
    }

    /// The first field called `name` of a struct.
    pub fn get(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Struct(f) => f.iter().find(|(n, _)| n == name).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Mutable access to the first field called `name` of a struct.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        match self {
            Value::Struct(f) => f.iter_mut().find(|(n, _)| n == name).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Adds a field (or subsection) to a struct; no effect on other values.
    pub fn push(&mut self, name: impl Into<String>, v: Value) {
        if let Value::Struct(f) = self {
            f.push((name.into(), v));
        }
    }

    /// Elements of an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A `bool` field.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// A `float64` field.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(f) => Some(*f),
            _ => None,
        }
    }

    /// Bytes of a `Bytes` value.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// This value as `analyze-migration.py --dump state` prints it.
    pub fn to_analyze_json(&self) -> Json {
        match self {
            Value::Bool(b) => Json::Bool(*b),
            Value::Int { size, signed, raw } => Json::String(format_int(*size, *signed, *raw)),
            Value::F64(f) => Json::String(hex_bytes(&f.to_be_bytes())),
            Value::Timer(t) => Json::String(hex_bytes(&t.to_be_bytes())),
            Value::Bytes(b) => Json::String(hex_bytes(b)),
            Value::Null => Json::String(hex_bytes(&[crate::migration::protocol::NULLPTR_MARKER])),
            Value::Array(a) => Json::Array(a.iter().map(Value::to_analyze_json).collect()),
            Value::Struct(fields) => {
                let mut m = Map::new();
                for (name, v) in fields {
                    // Like a Python dict: a repeated name keeps its first position, last value.
                    m.insert(name.clone(), v.to_analyze_json());
                }
                Json::Object(m)
            }
        }
    }
}

/// Sign-extends the low `size` bytes of `raw`.
pub(crate) fn sign_extend(raw: u64, size: u8) -> i64 {
    let bits = u32::from(size.clamp(1, 8)) * 8;
    let shift = 64 - bits;
    #[allow(clippy::cast_possible_wrap)]
    let v = ((raw << shift) as i64) >> shift;
    v
}

/// `0x%0Nx`, plus ` (-N)` for negative signed values, as analyze-migration.py formats ints.
pub fn format_int(size: u8, signed: bool, raw: u64) -> String {
    let width = usize::from(size) * 2;
    let s = sign_extend(raw, size);
    if signed && s < 0 {
        format!("0x{raw:0width$x} ({s})")
    } else {
        format!("0x{raw:0width$x}")
    }
}

/// Lower-case hex bytes separated by spaces.
pub fn hex_bytes(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 3);
    for (i, x) in b.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push(char::from(HEX[usize::from(x >> 4)]));
        s.push(char::from(HEX[usize::from(x & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_format_like_analyze_migration() {
        assert_eq!(Value::u32(5).to_analyze_json(), "0x00000005");
        assert_eq!(Value::i8(-1).to_analyze_json(), "0xff (-1)");
        assert_eq!(Value::i64(-2).to_analyze_json(), "0xfffffffffffffffe (-2)");
        assert_eq!(Value::i16(7).to_analyze_json(), "0x0007");
        assert_eq!(Value::Bytes(vec![0, 0xab]).to_analyze_json(), "00 ab");
        assert_eq!(Value::Bytes(vec![]).to_analyze_json(), "");
        assert_eq!(Value::i32(-5).as_i64(), Some(-5));
        assert_eq!(Value::u16(0xffff).as_u64(), Some(0xffff));
    }

    #[test]
    fn accessors() {
        let mut v = Value::structure([("a", Value::Array(vec![Value::Bool(true)]))]);
        v.push("f", Value::F64(0.5));
        assert_eq!(
            v.get("a").and_then(Value::as_array).map(<[Value]>::len),
            Some(1)
        );
        assert_eq!(v.get("f").and_then(Value::as_f64), Some(0.5));
        *v.get_mut("f").unwrap() = Value::Bool(false);
        assert_eq!(v.get("f").and_then(Value::as_bool), Some(false));
        assert_eq!(Value::u8(1).get("x"), None);
    }

    #[test]
    fn repeated_names_keep_first_position_last_value() {
        let v = Value::structure([
            ("unused", Value::Bytes(vec![1])),
            ("a", Value::Bool(true)),
            ("unused", Value::Bytes(vec![2])),
        ]);
        let j = v.to_analyze_json();
        let keys: Vec<_> = j.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["unused", "a"]);
        assert_eq!(j["unused"], "02");
    }
}
