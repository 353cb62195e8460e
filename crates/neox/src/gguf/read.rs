//! Reading a GGUF file: map it, parse the header, and validate everything a later tensor access relies on
//! (counts, strings, types, shapes, alignment, bounds, overlaps) so that `Gguf::data` is a plain slice.
//! Every count is checked against the bytes left before anything is allocated, so a hostile header costs
//! at most a small multiple of the file's size in memory and never panics.

use super::{
    align_up, min_encoded_size, tag, tag_name, GgmlType, TensorInfo, Value, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC,
    MAX_ARRAY_DEPTH, MAX_DIMS,
};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fewest bytes one KV can take: key length (8), a key of at least one byte, value type (4), a 1-byte value.
const MIN_KV_BYTES: usize = 8 + 1 + 4 + 1;
/// The fewest bytes one tensor info can take: name length (8), n_dims (4), one dim (8), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 8 + 4 + 8;

/// The file's bytes: a read-only map for real files, or an owned buffer for bytes built in memory.
enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An opened, fully validated GGUF file. Tensor data stays in the map until asked for.
pub struct Gguf {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    data_start: u64,
    alignment: u32,
}

impl Gguf {
    /// Map the file at `path` and validate its header and tensor layout; every error names the file and the
    /// key or tensor at fault.
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::file(path, "the file is empty, not a GGUF file"));
        }
        // SAFETY: the map is read-only; a concurrent writer could only change bytes after validation, which
        // `data` still bounds-checks, so the worst outcome is wrong tensor values, never unsafety.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Gguf::build(path, Bytes::Map(map))
    }

    /// The same as `open` for bytes already in memory (built by a test, or received over the wire); `path` is
    /// only used to name the source in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Gguf> {
        Gguf::build(path, Bytes::Owned(bytes))
    }

    fn build(path: &Path, bytes: Bytes) -> Result<Gguf> {
        let h = parse(path, bytes.as_slice())?;
        Ok(Gguf {
            path: path.to_path_buf(),
            bytes,
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            data_start: h.data_start,
            alignment: h.alignment,
        })
    }

    /// The file's format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata key/values, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of metadata key `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of tensor `t` (in its ggml type's layout). The bounds of this file's tensors were checked at
    /// open; an info from elsewhere that does not fit this file gets an empty slice rather than a panic.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let range = || {
            let start = self.data_start.checked_add(t.offset)?;
            let end = start.checked_add(t.checked_bytes()?)?;
            Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
        };
        range().and_then(|r| self.bytes.as_slice().get(r)).unwrap_or(&[])
    }

    /// The raw bytes of the tensor named `name`, if present.
    pub fn tensor_data(&self, name: &str) -> Option<&[u8]> {
        self.tensor(name).map(|t| self.data(t))
    }

    /// The file the data came from (as given to `open` / `from_bytes`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data alignment in bytes (`general.alignment`, or 32).
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// The absolute file offset of the data section, to which every tensor offset is relative.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
}

/// Names the file and its counts; the bytes themselves are left out.
impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_start", &self.data_start)
            .field("alignment", &self.alignment)
            .finish()
    }
}

/// The parsed, validated header.
struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    data_start: u64,
    alignment: u32,
}

/// A bounds-checked little-endian reader over the header. Its errors are the "what is wrong" part of a message;
/// callers prefix the key or tensor.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

type Msg<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Msg<&'a [u8]> {
        if n > self.left() {
            return Err(format!(
                "the file ends at byte {} while reading {what} at byte {} ({n} bytes needed, {} left)",
                self.b.len(),
                self.pos,
                self.left()
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Msg<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Msg<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Msg<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A gguf string: u64 byte length, then that many UTF-8 bytes (no terminator).
    fn string(&mut self, what: &str) -> Msg<String> {
        let at = self.pos;
        let n = self.u64(&format!("the length of {what}"))?;
        if n > self.left() as u64 {
            return Err(format!(
                "{what} at byte {at} has length {n}, which runs past the end of the file ({} bytes left)",
                self.left()
            ));
        }
        let bytes = self.take(n as usize, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| format!("{what} at byte {at} is not valid UTF-8 ({e})"))
    }

    /// One value of on-disk type `ty`; `depth` is how many arrays enclose it.
    fn value(&mut self, ty: u32, depth: usize) -> Msg<Value> {
        Ok(match ty {
            tag::U8 => Value::U8(u8::from_le_bytes(self.array("a u8")?)),
            tag::I8 => Value::I8(i8::from_le_bytes(self.array("an i8")?)),
            tag::U16 => Value::U16(u16::from_le_bytes(self.array("a u16")?)),
            tag::I16 => Value::I16(i16::from_le_bytes(self.array("an i16")?)),
            tag::U32 => Value::U32(self.u32("a u32")?),
            tag::I32 => Value::I32(i32::from_le_bytes(self.array("an i32")?)),
            tag::F32 => Value::F32(f32::from_le_bytes(self.array("an f32")?)),
            tag::U64 => Value::U64(self.u64("a u64")?),
            tag::I64 => Value::I64(i64::from_le_bytes(self.array("an i64")?)),
            tag::F64 => Value::F64(f64::from_le_bytes(self.array("an f64")?)),
            tag::BOOL => {
                let at = self.pos;
                match self.array::<1>("a bool")?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(format!("bool at byte {at} is {b}, must be 0 or 1")),
                }
            }
            tag::STR => Value::Str(self.string("the string value")?),
            tag::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested more than {MAX_ARRAY_DEPTH} levels deep are not supported"));
                }
                let elem = self.u32("the array element type")?;
                let Some(min) = min_encoded_size(elem) else {
                    return Err(format!("array has unknown element type {elem}"));
                };
                let n = self.u64("the array length")?;
                if n > (self.left() / min) as u64 {
                    return Err(format!(
                        "array of {n} {} elements cannot fit in the {} bytes left (each needs at least {min})",
                        tag_name(elem),
                        self.left()
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for i in 0..n {
                    items.push(self.value(elem, depth + 1).map_err(|m| format!("array element {i}: {m}"))?);
                }
                Value::Array(items)
            }
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

/// Refuse a count of records that the remaining bytes could not hold even at their smallest.
fn check_count(c: &Cursor, n: u64, min: usize, what: &str) -> Msg<usize> {
    if n > (c.left() / min) as u64 {
        return Err(format!(
            "header: {what} count {n} cannot fit in the {} bytes left (each needs at least {min})",
            c.left()
        ));
    }
    Ok(n as usize)
}

/// Parse and validate a whole header from `b` (the entire file).
fn parse(path: &Path, b: &[u8]) -> Result<Header> {
    let file_err = |m: String| Error::file(path, m);
    let mut c = Cursor { b, pos: 0 };
    let magic = c.array::<4>("the magic bytes").map_err(|m| file_err(format!("not a GGUF file: {m}")))?;
    if &magic != MAGIC {
        return Err(file_err(format!("not a GGUF file: starts with {magic:02x?}, expected \"GGUF\"")));
    }
    let version = c.u32("the version").map_err(file_err)?;
    match version {
        2 | 3 => {}
        1 => return Err(file_err("GGUF version 1 is not supported (only versions 2 and 3)".into())),
        v if v != 0 && v & 0xffff == 0 => {
            return Err(file_err(format!(
                "the version field is {v:#010x}, which looks byte-swapped (version {}): the file is big-endian, \
                 which is not supported",
                v.swap_bytes()
            )))
        }
        v => return Err(file_err(format!("GGUF version {v} is not supported (only versions 2 and 3)"))),
    }
    let n_tensors = c.u64("the tensor count").map_err(file_err)?;
    let n_kv = c.u64("the metadata count").map_err(file_err)?;
    let n_kv = check_count(&c, n_kv, MIN_KV_BYTES, "metadata key/value").map_err(file_err)?;
    let n_tensors = check_count(&c, n_tensors, MIN_TENSOR_INFO_BYTES, "tensor").map_err(file_err)?;

    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv);
    let mut seen_keys: HashMap<String, usize> = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string("the key").map_err(|m| file_err(format!("metadata entry {i}: {m}")))?;
        let key_err = |m: String| Error::file(path, format!("key {key}: {m}"));
        if key.is_empty() {
            return Err(file_err(format!("metadata entry {i}: the key is empty")));
        }
        if let Some(j) = seen_keys.insert(key.clone(), i) {
            return Err(key_err(format!("duplicate key (metadata entries {j} and {i})")));
        }
        let ty = c.u32("the value type").map_err(key_err)?;
        let value = c.value(ty, 0).map_err(key_err)?;
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => *a,
        Some((_, Value::U32(a))) => {
            return Err(Error::file(path, format!("key {ALIGNMENT_KEY}: {a} is not a power of two")));
        }
        Some((_, v)) => {
            return Err(Error::file(path, format!("key {ALIGNMENT_KEY}: must be a u32, found {}", v.type_name())));
        }
    };

    // Re-check against what is left now that the KVs are consumed.
    let n_tensors = check_count(&c, n_tensors as u64, MIN_TENSOR_INFO_BYTES, "tensor").map_err(file_err)?;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
    let mut seen_names: HashMap<String, usize> = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string("the tensor name").map_err(|m| file_err(format!("tensor info {i}: {m}")))?;
        let t_err = |m: String| Error::tensor(path, &name, m);
        if name.is_empty() {
            return Err(file_err(format!("tensor info {i}: the tensor name is empty")));
        }
        if let Some(j) = seen_names.insert(name.clone(), i) {
            return Err(t_err(format!("duplicate tensor name (tensor infos {j} and {i})")));
        }
        let n_dims = c.u32("the number of dimensions").map_err(t_err)?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(t_err(format!("has {n_dims} dimensions, GGUF allows 1 to {MAX_DIMS}")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let v = c.u64(&format!("dimension {d}")).map_err(t_err)?;
            if v == 0 {
                return Err(t_err(format!("dimension {d} is 0 (every dimension must be at least 1)")));
            }
            dims.push(v);
        }
        let id = c.u32("the ggml type").map_err(t_err)?;
        let kind = GgmlType::from_id(id).ok_or_else(|| t_err(format!("unknown or unsupported ggml type id {id}")))?;
        let offset = c.u64("the data offset").map_err(t_err)?;
        tensors.push(TensorInfo { name, dims, kind, offset });
    }

    let len = b.len() as u64;
    let data_start =
        align_up(c.pos as u64, alignment).ok_or_else(|| file_err("the data section start overflows".into()))?;
    let mut spans = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let t_err = |m: String| Error::tensor(path, &t.name, m);
        let shape = format!("dims {:?}", t.dims);
        let values = t.checked_values().ok_or_else(|| t_err(format!("{shape}: the number of values overflows")))?;
        let (block, _) = t.kind.block();
        if !t.dims[0].is_multiple_of(block as u64) {
            return Err(t_err(format!(
                "{shape}: ne[0] = {} is not a multiple of {}'s block size {block}",
                t.dims[0],
                t.kind.name()
            )));
        }
        let bytes = t.kind.bytes_for(values).ok_or_else(|| t_err(format!("{shape}: the byte size overflows")))?;
        if !t.offset.is_multiple_of(u64::from(alignment)) {
            return Err(t_err(format!("data offset {} is not a multiple of the alignment {alignment}", t.offset)));
        }
        let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(bytes));
        match end {
            Some(end) if end <= len => spans.push((t.offset, t.offset + bytes, i)),
            Some(end) => return Err(t_err(format!("data ends at byte {end}, past the end of the file ({len} bytes)"))),
            None => return Err(t_err(format!("data offset {} + size {bytes} overflows", t.offset))),
        }
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        let ((s0, e0, i0), (s1, e1, i1)) = (w[0], w[1]);
        if s1 < e0 {
            return Err(Error::tensor(
                path,
                &tensors[i1].name,
                format!("data [{s1}, {e1}) overlaps tensor {}'s data [{s0}, {e0})", tensors[i0].name),
            ));
        }
    }
    Ok(Header { version, metadata, tensors, data_start, alignment })
}
