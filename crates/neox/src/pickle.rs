//! A non-executing reader for the pickle that `torch.save(state_dict)` writes as `data.pkl`: it interprets the
//! opcodes a state dict needs (protocol 2, plus the framing and short forms of 3-5) into plain data, and accepts
//! exactly these globals: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter` and the storage types `torch.{Float,Half,BFloat16,Bool}Storage`. Nothing is
//! imported or called: a "call" of an allowed global builds a dict or a tensor record, and any other global
//! (`posix.system`, `builtins.eval`, `torch.storage._load_from_bytes`, ...) or opcode is an error naming it.
//!
//! Objects live in one arena and refer to each other by index, so shared references (the memo) behave as in
//! Python without copies, nothing is dropped recursively, and memory stays proportional to the pickle's size.

use std::rc::Rc;

/// Element type of a storage, from its pickled storage class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    Bf16,
    Bool,
}

impl StorageDtype {
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::Bf16 => 2,
            StorageDtype::Bool => 1,
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            StorageDtype::F32 => "torch.FloatStorage",
            StorageDtype::F16 => "torch.HalfStorage",
            StorageDtype::Bf16 => "torch.BFloat16Storage",
            StorageDtype::Bool => "torch.BoolStorage",
        }
    }
}

/// One storage the pickle refers to: `('storage', StorageType, key, location, numel)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageDtype,
    pub numel: u64,
}

/// One tensor: a view (offset, size, stride, all in elements) into a storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

/// What the pickle holds: name -> tensor, in file order.
#[derive(Debug, Default)]
pub struct StateDict {
    pub tensors: Vec<(String, TensorRef)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageDtype),
}

fn allowed_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "FloatStorage") => Global::Storage(StorageDtype::F32),
        ("torch", "HalfStorage") => Global::Storage(StorageDtype::F16),
        ("torch", "BFloat16Storage") => Global::Storage(StorageDtype::Bf16),
        ("torch", "BoolStorage") => Global::Storage(StorageDtype::Bool),
        _ => return None,
    })
}

const ALLOWED: &str = "collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, \
                       torch.FloatStorage, torch.HalfStorage, torch.BFloat16Storage, torch.BoolStorage";

/// A value on the stack or in the memo; containers are `Obj` indices into the arena.
#[derive(Clone, Debug)]
enum V {
    None,
    /// A boolean (`requires_grad`); its value is not needed.
    Bool,
    Int(i64),
    /// A float (metadata only); its value is not needed.
    Float,
    Str(Rc<str>),
    Obj(usize),
}

#[derive(Debug)]
enum Obj {
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// The pickle opcodes by byte, for error messages (the ones we do not interpret are named too).
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u32, V>,
    arena: Vec<Obj>,
}

type R<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(format!("truncated: needs {n} more bytes at byte {} of {}", self.pos, self.data.len()));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> R<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("truncated: GLOBAL name without a newline")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL name is not UTF-8".to_string())?;
        self.pos += n + 1;
        Ok(s)
    }
    fn text(&mut self, n: usize) -> R<V> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| format!("string before byte {} is not UTF-8", self.pos))?;
        Ok(V::Str(s.into()))
    }
    fn pop(&mut self) -> R<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("stack underflow at byte {}", self.pos));
        }
        self.stack.pop().ok_or_else(|| format!("stack underflow at byte {}", self.pos))
    }
    fn pop_mark(&mut self) -> R<Vec<V>> {
        let m = self.marks.pop().ok_or_else(|| format!("no MARK before byte {}", self.pos))?;
        Ok(self.stack.split_off(m))
    }
    fn alloc(&mut self, o: Obj) -> V {
        self.arena.push(o);
        V::Obj(self.arena.len() - 1)
    }
    fn obj(&self, v: &V) -> Option<&Obj> {
        match v {
            V::Obj(i) => self.arena.get(*i),
            _ => None,
        }
    }
    fn put(&mut self, key: u32) -> R<()> {
        let top = self.stack.last().cloned().ok_or_else(|| format!("PUT on an empty stack at byte {}", self.pos))?;
        self.memo.insert(key, top);
        Ok(())
    }
    fn get(&mut self, key: u32) -> R<()> {
        let v = self.memo.get(&key).cloned().ok_or_else(|| format!("memo key {key} read before it was set"))?;
        self.stack.push(v);
        Ok(())
    }
    fn global(&mut self, module: &str, name: &str) -> R<()> {
        let g = allowed_global(module, name).ok_or_else(|| {
            format!(
                "global `{module}.{name}` is not allowed (the file may try to run code; accepted are only {ALLOWED})"
            )
        })?;
        let v = self.alloc(Obj::Global(g));
        self.stack.push(v);
        Ok(())
    }
    /// Items into the list/dict at stack top (APPEND(S), SETITEM(S)).
    fn extend(&mut self, items: Vec<V>, dict: bool) -> R<()> {
        let at = self.pos;
        let Some(V::Obj(i)) = self.stack.last() else {
            return Err(format!("append/setitem target at byte {at} is not a list or dict"));
        };
        match (&mut self.arena[*i], dict) {
            (Obj::List(l), false) => l.extend(items),
            (Obj::Dict(d), true) => {
                if !items.len().is_multiple_of(2) {
                    return Err(format!("SETITEMS with an odd number of items at byte {at}"));
                }
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            _ => return Err(format!("append/setitem target at byte {at} is not a list or dict")),
        }
        Ok(())
    }

    fn int(&self, v: &V, what: &str) -> R<u64> {
        match v {
            V::Int(x) if *x >= 0 => Ok(*x as u64),
            _ => Err(format!("{what} must be a non-negative integer")),
        }
    }
    fn ints(&self, v: &V, what: &str) -> R<Vec<usize>> {
        match self.obj(v) {
            Some(Obj::Tuple(t)) => t
                .iter()
                .map(|x| self.int(x, what).and_then(|n| usize::try_from(n).map_err(|_| format!("{what} too large"))))
                .collect(),
            _ => Err(format!("{what} must be a tuple of integers")),
        }
    }

    /// BINPERSID: `('storage', StorageType, key, location, numel)` becomes a storage record.
    fn persistent(&mut self) -> R<()> {
        let pid = self.pop()?;
        let bad = || "persistent id must be ('storage', StorageType, key, location, numel)".to_string();
        let Some(Obj::Tuple(t)) = self.obj(&pid) else { return Err(bad()) };
        let [V::Str(tag), ty, V::Str(key), V::Str(_location), numel] = t.as_slice() else { return Err(bad()) };
        if &**tag != "storage" {
            return Err(bad());
        }
        let Some(Obj::Global(Global::Storage(dtype))) = self.obj(ty) else {
            return Err(format!("storage `{key}`: its type must be one of the accepted storage classes"));
        };
        let s = StorageRef { key: key.to_string(), dtype: *dtype, numel: self.int(numel, "storage numel")? };
        let v = self.alloc(Obj::Storage(s));
        self.stack.push(v);
        Ok(())
    }

    /// REDUCE: only the allowed constructors, evaluated as data.
    fn reduce(&mut self) -> R<()> {
        let args = self.pop()?;
        let func = self.pop()?;
        let Some(Obj::Tuple(args)) = self.obj(&args) else { return Err("REDUCE arguments must be a tuple".into()) };
        let out = match self.obj(&func) {
            Some(Obj::Global(Global::OrderedDict)) if args.is_empty() => Obj::Dict(Vec::new()),
            Some(Obj::Global(Global::OrderedDict)) => return Err("OrderedDict(...) with arguments".into()),
            Some(Obj::Global(Global::RebuildTensorV2)) => {
                // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                if !(6..=7).contains(&args.len()) {
                    return Err(format!("_rebuild_tensor_v2 with {} arguments (expected 6 or 7)", args.len()));
                }
                let Some(Obj::Storage(s)) = self.obj(&args[0]) else {
                    return Err("_rebuild_tensor_v2: first argument is not a storage".into());
                };
                let size = self.ints(&args[2], "tensor size")?;
                let stride = self.ints(&args[3], "tensor stride")?;
                if size.len() != stride.len() {
                    return Err(format!("tensor size {size:?} and stride {stride:?} differ in length"));
                }
                let offset = self.int(&args[1], "storage offset")?;
                Obj::Tensor(TensorRef { storage: s.clone(), offset, size, stride })
            }
            Some(Obj::Global(Global::RebuildParameter)) => {
                // (data, requires_grad, backward_hooks): the parameter is its data tensor.
                match args.first().and_then(|a| self.obj(a)) {
                    Some(Obj::Tensor(t)) if args.len() == 3 => Obj::Tensor(t.clone()),
                    _ => return Err("_rebuild_parameter: expected (tensor, requires_grad, hooks)".into()),
                }
            }
            Some(Obj::Global(Global::Storage(d))) => {
                return Err(format!("{} called directly (storages come only through persistent ids)", d.torch_name()))
            }
            _ => return Err("REDUCE of something that is not an accepted global".into()),
        };
        let v = self.alloc(out);
        self.stack.push(v);
        Ok(())
    }

    fn run(&mut self) -> R<V> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return Err(format!("pickle protocol {p} (expected 2 to 5)"));
                    }
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.stack.push(V::None),
                0x88 | 0x89 => self.stack.push(V::Bool),
                b'K' => {
                    let x = self.u8()?;
                    self.stack.push(V::Int(x as i64))
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack.push(V::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
                }
                b'J' => {
                    let x = self.u32()? as i32;
                    self.stack.push(V::Int(x as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(format!("LONG1 of {n} bytes at byte {at} (at most 8 accepted)"));
                    }
                    let b = self.take(n)?;
                    let mut buf = [if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 }; 8];
                    buf[..n].copy_from_slice(b);
                    self.stack.push(V::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(V::Float)
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                b')' => {
                    let v = self.alloc(Obj::Tuple(Vec::new()));
                    self.stack.push(v)
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Tuple(items));
                    self.stack.push(v)
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = (0..n).map(|_| self.pop()).collect::<R<Vec<_>>>()?;
                    items.reverse();
                    let v = self.alloc(Obj::Tuple(items));
                    self.stack.push(v)
                }
                b']' => {
                    let v = self.alloc(Obj::List(Vec::new()));
                    self.stack.push(v)
                }
                b'}' => {
                    let v = self.alloc(Obj::Dict(Vec::new()));
                    self.stack.push(v)
                }
                b'a' => {
                    let x = self.pop()?;
                    self.extend(vec![x], false)?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend(items, false)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend(vec![k, v], true)?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend(items, true)?
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.get(k)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (V::Str(m), V::Str(n)) = (module, name) else {
                        return Err(format!("STACK_GLOBAL at byte {at} without two strings"));
                    };
                    self.global(&m, &n)?
                }
                b'Q' => self.persistent()?,
                b'R' => self.reduce()?,
                b'b' => {
                    // BUILD sets attributes: on a dict that is OrderedDict's `_metadata`, which we do not need.
                    let _state = self.pop()?;
                    match self.stack.last().and_then(|v| self.obj(v)) {
                        Some(Obj::Dict(_)) => {}
                        _ => return Err(format!("BUILD at byte {at} on something that is not a dict")),
                    }
                }
                _ => {
                    return Err(format!(
                        "opcode {} (0x{op:02x}) at byte {at} is not accepted in a tensor state dict",
                        opcode_name(op)
                    ))
                }
            }
        }
    }
}

/// Interpret `data.pkl` of a torch.save'd state dict. Errors are plain messages (the caller names the file).
pub fn read_state_dict(data: &[u8]) -> std::result::Result<StateDict, String> {
    let mut m =
        Machine { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: Default::default(), arena: Vec::new() };
    let top = m.run()?;
    if m.pos != data.len() {
        return Err(format!("{} bytes after STOP", data.len() - m.pos));
    }
    let Some(Obj::Dict(items)) = m.obj(&top) else {
        return Err("the top-level object is not a dict of tensors (a state dict)".into());
    };
    let mut out = StateDict::default();
    for (k, v) in items {
        let V::Str(name) = k else { return Err("a state dict key is not a string".into()) };
        match m.obj(v) {
            Some(Obj::Tensor(t)) => out.tensors.push((name.to_string(), t.clone())),
            _ => return Err(format!("entry `{name}` is not a tensor")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-assembled protocol-2 state dict with one f32 tensor of shape [2, 3] at offset 1.
    fn one_tensor() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x07tQ");
        p.extend(b"K\x01K\x02K\x03\x86K\x03K\x01\x86\x89h\x00)Rtq\x02Rq\x03u.");
        p
    }

    #[test]
    fn reads_a_minimal_state_dict() {
        let sd = read_state_dict(&one_tensor()).unwrap();
        assert_eq!(sd.tensors.len(), 1);
        let (name, t) = &sd.tensors[0];
        assert_eq!(name, "w");
        assert_eq!(t.storage, StorageRef { key: "0".into(), dtype: StorageDtype::F32, numel: 7 });
        assert_eq!((t.offset, t.size.as_slice(), t.stride.as_slice()), (1, &[2, 3][..], &[3, 1][..]));
    }

    #[test]
    fn refuses_other_globals_opcodes_and_truncation() {
        let e = read_state_dict(b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00echo\x85R.").unwrap_err();
        assert!(e.contains("`posix.system` is not allowed"), "{e}");
        let e = read_state_dict(b"\x80\x02\x8c\x08builtins\x8c\x04eval\x93.").unwrap_err();
        assert!(e.contains("`builtins.eval`"), "{e}");
        let e = read_state_dict(b"\x80\x02ctorch\nFloatStorage\n)R.").unwrap_err();
        assert!(e.contains("called directly"), "{e}");
        let e = read_state_dict(b"\x80\x02}\x81.").unwrap_err();
        assert!(e.contains("NEWOBJ (0x81) at byte 3"), "{e}");
        let e = read_state_dict(b"\x80\x02}\xff.").unwrap_err();
        assert!(e.contains("unknown (0xff)"), "{e}");
        let full = one_tensor();
        for cut in 0..full.len() {
            assert!(read_state_dict(&full[..cut]).is_err(), "cut at {cut}");
        }
        let e = read_state_dict(b"\x80\x02].").unwrap_err();
        assert!(e.contains("not a dict"), "{e}");
        let e = read_state_dict(b"\x80\x02}X\x01\x00\x00\x00aK\x01s.").unwrap_err();
        assert!(e.contains("`a` is not a tensor"), "{e}");
        // A mark-protected stack cannot be popped into; unbalanced marks are errors, not panics.
        assert!(read_state_dict(b"\x80\x02(R.").is_err());
        assert!(read_state_dict(b"\x80\x02t.").is_err());
        assert!(read_state_dict(b"\x80\x02h\x05.").is_err());
    }
}
