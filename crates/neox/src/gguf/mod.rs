//! The GGUF container format (versions 2 and 3): metadata key/values, tensor infos and an aligned data section,
//! as read and written by ggml / llama.cpp. `read` maps a file and validates every header field, offset and size
//! before handing out tensor bytes; `write` streams a new file atomically without holding the tensor data.
//! Nothing here knows about any model: key names, tensor names and layouts are the caller's business.

mod read;
mod write;

#[cfg(test)]
mod tests;

pub use read::Gguf;
pub use write::{GgufWriter, TensorSink, MAX_TENSOR_NAME_LEN};

/// The four magic bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The version the writer produces (the reader also accepts version 2, whose layout is identical).
pub const VERSION: u32 = 3;
/// The data alignment used when a file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u32 = 32;
/// The metadata key that overrides the data alignment (a u32, a non-zero power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// The most dimensions a tensor may have (ggml's GGML_MAX_DIMS).
pub const MAX_DIMS: usize = 4;
/// How deep arrays may nest: 1 is a plain array, 2 an array of arrays. Deeper values are refused.
pub const MAX_ARRAY_DEPTH: usize = 2;

/// The on-disk ids of metadata value types (gguf_type in ggml's gguf.h).
pub(crate) mod tag {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STR: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The fewest bytes one value of on-disk type `id` can take (strings and arrays: their length prefixes), or None
/// for an unknown type. Lets the reader refuse a count that the remaining bytes could never hold.
pub(crate) fn min_encoded_size(id: u32) -> Option<usize> {
    Some(match id {
        tag::U8 | tag::I8 | tag::BOOL => 1,
        tag::U16 | tag::I16 => 2,
        tag::U32 | tag::I32 | tag::F32 => 4,
        tag::U64 | tag::I64 | tag::F64 | tag::STR => 8,
        tag::ARRAY => 4 + 8,
        _ => return None,
    })
}

/// The name of on-disk value type `id`, for error messages.
pub(crate) fn tag_name(id: u32) -> &'static str {
    match id {
        tag::U8 => "u8",
        tag::I8 => "i8",
        tag::U16 => "u16",
        tag::I16 => "i16",
        tag::U32 => "u32",
        tag::I32 => "i32",
        tag::F32 => "f32",
        tag::BOOL => "bool",
        tag::STR => "string",
        tag::ARRAY => "array",
        tag::U64 => "u64",
        tag::I64 => "i64",
        tag::F64 => "f64",
        _ => "unknown",
    }
}

/// One metadata value. Arrays hold elements of a single type (checked by the writer, guaranteed by the reader);
/// an array of arrays is allowed, deeper nesting is not (`MAX_ARRAY_DEPTH`). Note that llama.cpp's C loader
/// (ggml's gguf.cpp) refuses arrays of arrays, so a file meant for llama.cpp should not contain them.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Vec<Value>),
}

impl Value {
    /// The value as a u64 if it is an integer of any width that is not negative; so callers need not care
    /// whether a converter stored a count as u32, i32 or u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an i64 if it is an integer of any width that fits (a u64 above i64::MAX does not).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as an f64 if it is a float or an integer (integers above 2^53 round), so that a float
    /// hyperparameter stored as an integer is still usable.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The string, if the value is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The flag, if the value is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The type's name ("u32", "string", "array", ...), for error messages about unexpected types.
    pub fn type_name(&self) -> &'static str {
        tag_name(self.tag())
    }

    /// The on-disk type id of this value.
    pub(crate) fn tag(&self) -> u32 {
        match self {
            Value::U8(_) => tag::U8,
            Value::I8(_) => tag::I8,
            Value::U16(_) => tag::U16,
            Value::I16(_) => tag::I16,
            Value::U32(_) => tag::U32,
            Value::I32(_) => tag::I32,
            Value::F32(_) => tag::F32,
            Value::Bool(_) => tag::BOOL,
            Value::Str(_) => tag::STR,
            Value::U64(_) => tag::U64,
            Value::I64(_) => tag::I64,
            Value::F64(_) => tag::F64,
            Value::Array(_) => tag::ARRAY,
        }
    }
}

/// `Value::from(x)` / `x.into()` for the Rust types that map one-to-one onto a GGUF value type, so writer calls
/// read `w.add_kv("n", 5u32)`.
macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {
        $(impl From<$t> for Value {
            fn from(x: $t) -> Self {
                Value::$v(x.into())
            }
        })*
    };
}
value_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32, bool => Bool,
    String => Str, &str => Str, u64 => U64, i64 => I64, f64 => F64, Vec<Value> => Array);

/// A tensor data type: how values are packed into blocks (ggml_type). Only the types listed here are accepted;
/// the ids are fixed by the format (gguf-py's GGMLQuantizationType).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    BF16,
}

/// Every supported type with its (id, name, values per block, bytes per block), from gguf-py's GGML_QUANT_SIZES.
const TYPES: [(GgmlType, u32, &str, usize, usize); 15] = [
    (GgmlType::F32, 0, "f32", 1, 4),
    (GgmlType::F16, 1, "f16", 1, 2),
    (GgmlType::Q4_0, 2, "q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "q8_K", 256, 292),
    (GgmlType::BF16, 30, "bf16", 1, 2),
];

impl GgmlType {
    /// Every supported type, in id order.
    pub const ALL: [GgmlType; 15] = {
        let mut all = [GgmlType::F32; 15];
        let mut i = 0;
        while i < TYPES.len() {
            all[i] = TYPES[i].0;
            i += 1;
        }
        all
    };

    fn entry(self) -> (GgmlType, u32, &'static str, usize, usize) {
        TYPES[self as usize]
    }

    /// The type with on-disk id `id`, or None for an id this module does not support (or that does not exist).
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES.iter().find(|e| e.1 == id).map(|e| e.0)
    }

    /// The on-disk id (ggml_type).
    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// ggml's name for the type ("f32", "q8_0", "q4_K", ...), for messages and listings.
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// (values per block, bytes per block): a row's length must be a multiple of the first.
    pub fn block(self) -> (usize, usize) {
        let e = self.entry();
        (e.3, e.4)
    }

    /// The bytes that `values` values of this type take, or None if `values` is not a whole number of blocks or
    /// the size does not fit in a u64.
    pub fn bytes_for(self, values: u64) -> Option<u64> {
        let (n, b) = self.block();
        let (n, b) = (n as u64, b as u64);
        if !values.is_multiple_of(n) {
            return None;
        }
        (values / n).checked_mul(b)
    }
}

/// One tensor's entry in the header: name, shape (`dims[0]` is ne[0], the innermost, contiguous dimension, so a
/// PyTorch (out, in) weight has dims [in, out]), type, and the data offset relative to the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    pub offset: u64,
}

impl TensorInfo {
    /// The number of values (product of dims), or None if it overflows a u64.
    pub(crate) fn checked_values(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// The byte size, or None if the shape is not whole blocks or the size overflows.
    pub(crate) fn checked_bytes(&self) -> Option<u64> {
        self.kind.bytes_for(self.checked_values()?)
    }

    /// The number of values (product of dims). Exact for infos from `Gguf` or `GgufWriter`, which validate it;
    /// saturates at u64::MAX for a hand-built info whose product overflows.
    pub fn values(&self) -> u64 {
        self.checked_values().unwrap_or(u64::MAX)
    }

    /// The size of the tensor's data in bytes. Exact for infos from `Gguf` or `GgufWriter`; u64::MAX for a
    /// hand-built info that is not whole blocks or overflows.
    pub fn bytes(&self) -> u64 {
        self.checked_bytes().unwrap_or(u64::MAX)
    }
}

/// `x` rounded up to a multiple of `align` (a power of two), or None on overflow.
pub(crate) fn align_up(x: u64, align: u32) -> Option<u64> {
    let a = u64::from(align);
    x.checked_add(a - 1).map(|v| v & !(a - 1))
}

/// Checks one value before it is written: arrays non-empty (an empty array has no element type to write),
/// homogeneous, and nested at most `MAX_ARRAY_DEPTH` deep. `depth` is the nesting level of `v` (0 at top).
pub(crate) fn check_value(v: &Value, depth: usize) -> std::result::Result<(), String> {
    let Value::Array(items) = v else { return Ok(()) };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(format!("arrays nested more than {MAX_ARRAY_DEPTH} levels deep are not supported"));
    }
    let Some(first) = items.first() else {
        return Err("an empty array has no element type; leave the key out instead".into());
    };
    for (i, item) in items.iter().enumerate() {
        if item.tag() != first.tag() {
            return Err(format!(
                "array element {i} is {} but element 0 is {}; GGUF arrays hold one type",
                item.type_name(),
                first.type_name()
            ));
        }
        check_value(item, depth + 1).map_err(|m| format!("array element {i}: {m}"))?;
    }
    Ok(())
}
