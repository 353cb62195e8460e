//! Writing a GGUF (v3) file that may be many GB: the caller declares every key/value and every tensor (name,
//! dims, type) up front, the writer lays the tensors out at aligned offsets, then asks for each tensor's bytes in
//! declaration order and streams them straight to disk. Only the header is held in memory. The file appears
//! under its name only once complete (`common::atomic_write_with`); any error leaves nothing there.

use super::{align_up, check_value, tag, GgmlType, TensorInfo, Value, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC};
use super::{MAX_DIMS, VERSION};
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The longest tensor name llama.cpp accepts (ggml keeps names in a 64-byte buffer with a terminating NUL), so
/// the writer refuses longer names rather than produce a file llama.cpp cannot load.
pub const MAX_TENSOR_NAME_LEN: usize = 63;

/// A GGUF file being declared; `write` produces it. See the module comment for the protocol.
pub struct GgufWriter {
    path: PathBuf,
    alignment: u32,
    metadata: Vec<(String, Value)>,
    keys: HashSet<String>,
    tensors: Vec<TensorInfo>,
    names: HashSet<String>,
    /// The offset the next declared tensor gets: the aligned end of the data declared so far.
    data_len: u64,
}

impl GgufWriter {
    /// Start declaring the file that will be written to `path`, with tensor data aligned to `alignment` bytes
    /// (a non-zero power of two; `DEFAULT_ALIGNMENT` unless there is a reason). A non-default alignment is
    /// recorded in the file as `general.alignment`, as readers require.
    pub fn new(path: &Path, alignment: u32) -> Result<Self> {
        if !alignment.is_power_of_two() {
            return Err(Error::file(path, format!("alignment {alignment} is not a power of two")));
        }
        Ok(GgufWriter {
            path: path.to_path_buf(),
            alignment,
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            data_len: 0,
        })
    }

    /// Declare one metadata key/value (written in declaration order). Refuses an empty or duplicate key, an empty,
    /// mixed-type or too deeply nested array, and a `general.alignment` that disagrees with the writer's.
    pub fn add_kv(&mut self, key: &str, value: impl Into<Value>) -> Result<()> {
        let value = value.into();
        let err = |m: String| Error::file(&self.path, format!("key {key}: {m}"));
        if key.is_empty() {
            return Err(Error::file(&self.path, "a metadata key is empty"));
        }
        if self.keys.contains(key) {
            return Err(err("duplicate key".into()));
        }
        if key == ALIGNMENT_KEY && value != Value::U32(self.alignment) {
            return Err(err(format!(
                "must be the u32 {} given to GgufWriter::new, got {} {value:?}",
                self.alignment,
                value.type_name()
            )));
        }
        check_value(&value, 0).map_err(err)?;
        self.keys.insert(key.to_owned());
        self.metadata.push((key.to_owned(), value));
        Ok(())
    }

    /// Declare the next tensor: `dims[0]` is ne[0], the innermost (contiguous) dimension, so a PyTorch (out, in)
    /// weight is declared as [in, out]. Returns its info with the offset assigned. Refuses a bad name (empty,
    /// duplicate, over `MAX_TENSOR_NAME_LEN` bytes), 0 or more than 4 dims, a dim of 0, ne[0] not a multiple of the
    /// type's block size, and sizes that overflow.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], kind: GgmlType) -> Result<&TensorInfo> {
        let err = |m: String| Error::tensor(&self.path, name, m);
        if name.is_empty() {
            return Err(Error::file(&self.path, "a tensor name is empty"));
        }
        if name.len() > MAX_TENSOR_NAME_LEN {
            return Err(err(format!(
                "the name is {} bytes long; llama.cpp accepts at most {MAX_TENSOR_NAME_LEN}",
                name.len()
            )));
        }
        if self.names.contains(name) {
            return Err(err("duplicate tensor name".into()));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(err(format!("has {} dimensions, GGUF allows 1 to {MAX_DIMS}", dims.len())));
        }
        if let Some(d) = dims.iter().position(|&d| d == 0) {
            return Err(err(format!("dimension {d} is 0 (every dimension must be at least 1)")));
        }
        let (block, _) = kind.block();
        if !dims[0].is_multiple_of(block as u64) {
            return Err(err(format!(
                "dims {dims:?}: ne[0] = {} is not a multiple of {}'s block size {block}",
                dims[0],
                kind.name()
            )));
        }
        let info = TensorInfo { name: name.to_owned(), dims: dims.to_vec(), kind, offset: self.data_len };
        let next = info
            .checked_bytes()
            .and_then(|b| info.offset.checked_add(b))
            .and_then(|end| align_up(end, self.alignment))
            .ok_or_else(|| err(format!("dims {dims:?}: the data size overflows")))?;
        self.data_len = next;
        self.names.insert(info.name.clone());
        self.tensors.push(info);
        Ok(&self.tensors[self.tensors.len() - 1])
    }

    /// The tensors declared so far, with their offsets.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Write the file. `write_tensor(index, info, sink)` is called once per declared tensor, in declaration
    /// order, and must push exactly `info.bytes()` bytes into `sink` (in as many pieces as it likes). A wrong
    /// length or an error from the callback aborts the write and leaves nothing at the path.
    pub fn write<F>(mut self, mut write_tensor: F) -> Result<()>
    where
        F: FnMut(usize, &TensorInfo, &mut TensorSink<'_>) -> Result<()>,
    {
        if self.alignment != DEFAULT_ALIGNMENT && !self.keys.contains(ALIGNMENT_KEY) {
            self.metadata.insert(0, (ALIGNMENT_KEY.to_owned(), Value::U32(self.alignment)));
        }
        let mut failure: Option<Error> = None;
        let written = common::atomic_write_with(&self.path, |out| {
            self.emit(out, &mut write_tensor).map_err(|e| {
                let io_err = io::Error::other(e.to_string());
                failure = Some(e);
                io_err
            })
        });
        match (written, failure) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(Error::io(&self.path, e)),
        }
    }

    /// Stream the header, then every tensor with the padding that aligns the next one.
    fn emit<F>(&self, out: &mut dyn Write, write_tensor: &mut F) -> Result<()>
    where
        F: FnMut(usize, &TensorInfo, &mut TensorSink<'_>) -> Result<()>,
    {
        let io_err = |e| Error::io(&self.path, e);
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut head, key);
            head.extend_from_slice(&value.tag().to_le_bytes());
            put_value(&mut head, value);
        }
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.kind.id().to_le_bytes());
            head.extend_from_slice(&t.offset.to_le_bytes());
        }
        out.write_all(&head).map_err(io_err)?;
        let head_len = head.len() as u64;
        let data_start = align_up(head_len, self.alignment).unwrap_or(head_len);
        write_zeros(out, data_start - head_len).map_err(io_err)?;

        let mut pos = 0u64;
        for (i, t) in self.tensors.iter().enumerate() {
            let expected = t.bytes();
            let mut sink = TensorSink { out: &mut *out, path: &self.path, info: t, written: 0, expected };
            write_tensor(i, t, &mut sink)?;
            if sink.written != expected {
                return Err(Error::tensor(
                    &self.path,
                    &t.name,
                    format!("{} bytes were written, {:?} {} needs {expected}", sink.written, t.dims, t.kind.name()),
                ));
            }
            let end = t.offset + expected;
            let next = align_up(end, self.alignment).unwrap_or(end);
            write_zeros(out, next - end).map_err(io_err)?;
            pos = next;
        }
        debug_assert_eq!(pos, self.data_len);
        Ok(())
    }
}

/// Where one tensor's bytes go during `GgufWriter::write`: counts them and refuses any beyond the tensor's size.
pub struct TensorSink<'a> {
    out: &'a mut dyn Write,
    path: &'a Path,
    info: &'a TensorInfo,
    written: u64,
    expected: u64,
}

impl TensorSink<'_> {
    /// Append `bytes` to the tensor's data. Refuses (writing none of them) bytes past the tensor's size.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let n = bytes.len() as u64;
        if n > self.remaining() {
            return Err(Error::tensor(
                self.path,
                &self.info.name,
                format!(
                    "{} more bytes would exceed its size of {} ({:?} {})",
                    n,
                    self.expected,
                    self.info.dims,
                    self.info.kind.name()
                ),
            ));
        }
        self.out.write_all(bytes).map_err(|e| Error::io(self.path, e))?;
        self.written += n;
        Ok(())
    }

    /// How many bytes the tensor still needs.
    pub fn remaining(&self) -> u64 {
        self.expected - self.written
    }
}

/// Write `n` zero bytes without allocating `n` (alignments can be large).
fn write_zeros(out: &mut dyn Write, mut n: u64) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// A gguf string: u64 byte length, then the UTF-8 bytes.
fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// A value's payload, without its type tag (arrays: element type, count, elements).
fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::Str(s) => put_str(buf, s),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            // `add_kv` refused empty arrays; u8 is only a placeholder that is never reached.
            buf.extend_from_slice(&items.first().map_or(tag::U8, Value::tag).to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, item);
            }
        }
    }
}
