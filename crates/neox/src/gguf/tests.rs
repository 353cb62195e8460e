//! Tests of the GGUF reader and writer: a full round trip, the writer's refusals, and a table of hostile files.
//! The format facts used here (layout, value type ids, ggml type ids and block sizes, alignment rules) come from
//! ggml's docs/gguf.md and gguf-py (constants.py GGML_QUANT_SIZES, gguf_reader.py, gguf_writer.py), read
//! 2026-12-03, cross-checked against ggml/src/gguf.cpp.

use super::*;
use std::path::Path;

const P: &str = "t.gguf";

fn parse(bytes: Vec<u8>) -> crate::Result<Gguf> {
    Gguf::from_bytes(Path::new(P), bytes)
}

/// The message of the error `bytes` must produce; checks it names the file.
fn err_of(bytes: Vec<u8>) -> String {
    let msg = match parse(bytes) {
        Ok(_) => panic!("a broken file was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(msg.starts_with("t.gguf: "), "{msg:?} does not name the file");
    msg
}

fn gguf_str(s: &[u8]) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s);
    b
}

/// A GGUF encoded field by field, so that a test can break exactly one field.
#[derive(Clone)]
struct Raw {
    magic: [u8; 4],
    version: u32,
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
    /// (encoded key with its length, value type, encoded value)
    kvs: Vec<(Vec<u8>, u32, Vec<u8>)>,
    tensors: Vec<RawTensor>,
    data: Vec<u8>,
}

#[derive(Clone)]
struct RawTensor {
    name: Vec<u8>,
    n_dims: Option<u32>,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

impl Raw {
    /// Two KVs and two f32 tensors: a [4] at offset 0 and b [2, 2] at offset 32 (default alignment 32).
    fn valid() -> Raw {
        let t = |name: &str, dims: Vec<u64>, offset| RawTensor {
            name: gguf_str(name.as_bytes()),
            n_dims: None,
            dims,
            ty: 0,
            offset,
        };
        Raw {
            magic: *b"GGUF",
            version: 3,
            n_tensors: None,
            n_kv: None,
            kvs: vec![
                (gguf_str(b"general.architecture"), tag::STR, gguf_str(b"test")),
                (gguf_str(b"x.count"), tag::U32, 7u32.to_le_bytes().to_vec()),
            ],
            tensors: vec![t("a", vec![4], 0), t("b", vec![2, 2], 32)],
            data: (0..48u8).collect(),
        }
    }

    fn kv(&mut self, key: &str, ty: u32, value: Vec<u8>) {
        self.kvs.push((gguf_str(key.as_bytes()), ty, value));
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = self.magic.to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.n_tensors.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (key, ty, value) in &self.kvs {
            b.extend_from_slice(key);
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(value);
        }
        for t in &self.tensors {
            b.extend_from_slice(&t.name);
            b.extend_from_slice(&t.n_dims.unwrap_or(t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
            b.extend_from_slice(&t.ty.to_le_bytes());
            b.extend_from_slice(&t.offset.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend_from_slice(&self.data);
        b
    }
}

/// An array value's encoding: element type, count, elements.
fn arr(elem: u32, n: u64, items: &[u8]) -> Vec<u8> {
    let mut b = elem.to_le_bytes().to_vec();
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(items);
    b
}

#[test]
fn hand_encoded_valid_file_parses() {
    let g = parse(Raw::valid().encode()).unwrap();
    assert_eq!(g.get("x.count"), Some(&Value::U32(7)));
    assert_eq!(g.tensor_data("b").unwrap(), &(32..48u8).collect::<Vec<_>>()[..]);
    // Gaps and out-of-order offsets are valid as long as they are aligned and do not overlap.
    let mut r = Raw::valid();
    r.tensors[0].offset = 32;
    r.tensors[1].offset = 0;
    let g = parse(r.encode()).unwrap();
    assert_eq!(g.tensor_data("a").unwrap(), &(32..48u8).collect::<Vec<_>>()[..]);
}

/// Checks that `mutate`d `Raw::valid()` is refused with a message mentioning every one of `wants`.
fn refuses(mutate: impl FnOnce(&mut Raw), wants: &[&str]) {
    let mut r = Raw::valid();
    mutate(&mut r);
    let msg = err_of(r.encode());
    for w in wants {
        assert!(msg.contains(w), "{msg:?} should mention {w:?}");
    }
}

/// A string length prefix `n` followed by `tail` (which need not be `n` bytes long).
fn len_then(n: u64, tail: &[u8]) -> Vec<u8> {
    [&n.to_le_bytes()[..], tail].concat()
}

#[test]
fn hostile_headers_and_metadata_are_refused() {
    refuses(|r| r.magic = *b"GGML", &["not a GGUF file"]);
    refuses(|r| r.version = 1, &["version 1 is not supported"]);
    refuses(|r| r.version = 4, &["version 4 is not supported"]);
    refuses(|r| r.version = 0x0300_0000, &["0x03000000", "big-endian"]);
    refuses(|r| r.n_tensors = Some(u64::MAX), &["tensor count 18446744073709551615 cannot fit"]);
    refuses(|r| r.n_kv = Some(1 << 40), &["metadata key/value count 1099511627776 cannot fit"]);
    refuses(|r| r.kvs[0].0 = len_then(u64::MAX, b"ab"), &["entry 0", "length 18446744073709551615", "past the end"]);
    refuses(|r| r.kvs[1].0 = gguf_str(b"x.\xff"), &["metadata entry 1", "UTF-8"]);
    refuses(|r| r.kvs[1].0 = gguf_str(b""), &["metadata entry 1", "empty"]);
    refuses(|r| r.kvs[0].2 = len_then(1000, b"abc"), &["key general.architecture", "length 1000", "past the end"]);
    refuses(|r| r.kvs[1].1 = 13, &["key x.count", "unknown value type 13"]);
    refuses(|r| r.kv("x.flag", tag::BOOL, vec![2]), &["key x.flag", "bool", "is 2, must be 0 or 1"]);
    refuses(|r| r.kv("x.count", tag::U32, vec![0; 4]), &["key x.count", "duplicate key"]);
    let huge = arr(tag::U32, u64::MAX / 2, &[]);
    refuses(
        |r| r.kv("x.arr", tag::ARRAY, huge),
        &["key x.arr", "array of 9223372036854775807 u32 elements cannot fit"],
    );
    refuses(|r| r.kv("x.arr", tag::ARRAY, arr(77, 1, &[0])), &["key x.arr", "unknown element type 77"]);
    let deep = arr(tag::ARRAY, 1, &arr(tag::ARRAY, 1, &arr(tag::U8, 1, &[5])));
    refuses(|r| r.kv("x.arr", tag::ARRAY, deep), &["key x.arr", "nested more than 2 levels"]);
    let bools = arr(tag::BOOL, 3, &[0, 1, 9]);
    refuses(|r| r.kv("x.arr", tag::ARRAY, bools), &["key x.arr", "array element 2", "is 9"]);
    let align = |r: &mut Raw, ty, v: &[u8]| r.kv(ALIGNMENT_KEY, ty, v.to_vec());
    refuses(|r| align(r, tag::U32, &48u32.to_le_bytes()), &["key general.alignment: 48 is not a power of two"]);
    refuses(|r| align(r, tag::U32, &[0; 4]), &["key general.alignment: 0 is not a power of two"]);
    refuses(|r| align(r, tag::U64, &[32, 0, 0, 0, 0, 0, 0, 0]), &["key general.alignment: must be a u32, found u64"]);
}

#[test]
fn hostile_tensor_infos_are_refused() {
    refuses(|r| r.tensors[0].name = len_then(u64::MAX, b"a"), &["tensor info 0", "past the end"]);
    refuses(|r| r.tensors[1].name = gguf_str(b""), &["tensor info 1", "name is empty"]);
    refuses(|r| r.tensors[1].name = gguf_str(b"a"), &["tensor `a`", "duplicate tensor name"]);
    refuses(|r| r.tensors[0].dims = vec![4, 1, 1, 1, 1], &["tensor `a`", "5 dimensions"]);
    refuses(|r| r.tensors[0].dims = vec![], &["tensor `a`", "0 dimensions"]);
    refuses(|r| r.tensors[0].n_dims = Some(u32::MAX), &["tensor `a`", "4294967295 dimensions"]);
    refuses(|r| r.tensors[1].dims = vec![2, 0], &["tensor `b`", "dimension 1 is 0"]);
    refuses(|r| r.tensors[1].ty = 99, &["tensor `b`", "ggml type id 99"]);
    refuses(|r| r.tensors[1].ty = 16, &["tensor `b`", "ggml type id 16"]);
    refuses(|r| r.tensors[0].ty = 8, &["tensor `a`", "ne[0] = 4 is not a multiple of q8_0's block size 32"]);
    refuses(|r| r.tensors[1].dims = vec![u64::MAX, 2], &["tensor `b`", "number of values overflows"]);
    refuses(|r| r.tensors[1].dims = vec![1 << 62, 1], &["tensor `b`", "byte size overflows"]);
    refuses(|r| r.tensors[1].offset = 16, &["tensor `b`", "offset 16 is not a multiple of the alignment 32"]);
    refuses(
        |r| r.tensors[1].offset = 64,
        &["tensor `b`", "data ends at byte 272, past the end of the file (240 bytes)"],
    );
    refuses(|r| r.tensors[1].offset = u64::MAX - 31, &["tensor `b`", "overflows"]);
    let overlap = |r: &mut Raw| {
        r.tensors[0].dims = vec![16];
        r.data = vec![0; 64];
    };
    refuses(overlap, &["tensor `b`", "data [32, 48) overlaps tensor a's data [0, 64)"]);
    refuses(|r| r.n_tensors = Some(3), &["tensor info 2"]);
}

fn pattern(n: u64, seed: u64) -> Vec<u8> {
    (0..n).map(|k| (k.wrapping_mul(31).wrapping_add(seed * 7) % 251) as u8).collect()
}

fn all_values() -> Vec<(&'static str, Value)> {
    vec![
        ("v.u8", Value::U8(200)),
        ("v.i8", Value::I8(-5)),
        ("v.u16", Value::U16(60000)),
        ("v.i16", Value::I16(-30000)),
        ("v.u32", Value::U32(4_000_000_000)),
        ("v.i32", Value::I32(-2_000_000_000)),
        ("v.f32", Value::F32(1.5)),
        ("v.true", Value::Bool(true)),
        ("v.false", Value::Bool(false)),
        ("v.str", Value::Str("héllo\n".into())),
        ("v.empty_str", Value::Str(String::new())),
        ("v.u64", Value::U64(u64::MAX)),
        ("v.i64", Value::I64(i64::MIN)),
        ("v.f64", Value::F64(-0.25)),
        ("v.strings", Value::Array(["a", "", "ünï"].map(Value::from).to_vec())),
        ("v.f32s", Value::Array(vec![Value::F32(0.5), Value::F32(-3.0)])),
        ("v.bools", Value::Array(vec![Value::Bool(false), Value::Bool(true)])),
        ("v.i64s", Value::Array(vec![Value::I64(-1)])),
        ("v.nested", Value::Array(vec![Value::Array(vec![Value::U8(1)]), Value::Array(vec!["x".into(), "y".into()])])),
    ]
}

/// (name, dims, type) of the round-trip tensors.
fn decls() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("w.f32", vec![3, 2], GgmlType::F32),
        ("w.f16", vec![5], GgmlType::F16),
        ("w.q8_0", vec![64, 2], GgmlType::Q8_0),
        ("w.bf16", vec![2, 3, 1, 2], GgmlType::BF16),
    ]
}

/// Writes the round-trip file at `path` with `alignment`; returns the declared infos.
fn write_sample(path: &Path, alignment: u32) -> Vec<TensorInfo> {
    let mut w = GgufWriter::new(path, alignment).unwrap();
    for (k, v) in all_values() {
        w.add_kv(k, v).unwrap();
    }
    for (name, dims, kind) in decls() {
        w.add_tensor(name, &dims, kind).unwrap();
    }
    let infos = w.tensors().to_vec();
    w.write(|i, t, sink| {
        for chunk in pattern(t.bytes(), i as u64).chunks(5) {
            sink.write(chunk)?;
        }
        Ok(())
    })
    .unwrap();
    infos
}

#[test]
fn round_trip_every_value_type_and_tensor_types() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.gguf");
    let infos = write_sample(&path, 64);
    let g = Gguf::open(&path).unwrap();
    assert_eq!((g.version(), g.alignment(), g.path()), (3, 64, path.as_path()));
    let mut want: Vec<(String, Value)> = vec![(ALIGNMENT_KEY.into(), Value::U32(64))];
    want.extend(all_values().into_iter().map(|(k, v)| (k.to_string(), v)));
    assert_eq!(g.metadata(), &want[..]);
    assert_eq!(g.get("v.str").and_then(Value::as_str), Some("héllo\n"));
    assert_eq!(g.tensors(), &infos[..]);
    assert_eq!(g.data_start() % 64, 0);
    let sizes: Vec<u64> = g.tensors().iter().map(TensorInfo::bytes).collect();
    assert_eq!(sizes, [24, 10, 136, 24]);
    for (i, t) in g.tensors().iter().enumerate() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
        assert_eq!(g.data(t), &pattern(t.bytes(), i as u64)[..], "{}", t.name);
    }
    assert_eq!(g.tensor("w.q8_0").map(|t| (t.kind, t.values())), Some((GgmlType::Q8_0, 128)));
    assert!(g.tensor("missing").is_none() && g.get("missing").is_none());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");
}

#[test]
fn default_alignment_writes_no_alignment_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.gguf");
    write_sample(&path, DEFAULT_ALIGNMENT);
    let g = Gguf::open(&path).unwrap();
    assert!(g.get(ALIGNMENT_KEY).is_none());
    assert_eq!((g.alignment(), g.data_start() % 32), (32, 0));
}

#[test]
fn every_truncation_and_byte_flip_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    write_sample(&path, 64);
    let bytes = std::fs::read(&path).unwrap();
    let g = parse(bytes.clone()).unwrap();
    let needed = g.tensors().iter().map(|t| g.data_start() + t.offset + t.bytes()).max().unwrap() as usize;
    for cut in 0..bytes.len() {
        let r = parse(bytes[..cut].to_vec());
        assert_eq!(r.is_ok(), cut >= needed, "cut at {cut} of {}", bytes.len());
    }
    for at in 0..g.data_start() as usize {
        for v in [0x00, 0xff, 0x80, bytes[at] ^ 1, bytes[at].wrapping_add(1)] {
            let mut b = bytes.clone();
            b[at] = v;
            let _ = parse(b);
        }
    }
    assert!(err_of(Vec::new()).contains("not a GGUF file"));
}

#[test]
fn io_failures_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.gguf");
    std::fs::write(&path, b"").unwrap();
    assert!(Gguf::open(&path).unwrap_err().to_string().contains("empty.gguf: the file is empty"));
    assert!(Gguf::open(&dir.path().join("none.gguf")).unwrap_err().to_string().contains("none.gguf"));
    // An I/O failure while writing names the file too.
    let bad = dir.path().join("no-such-dir").join("x.gguf");
    let msg = GgufWriter::new(&bad, 32).unwrap().write(|_, _, _| Ok(())).unwrap_err().to_string();
    assert!(msg.contains("no-such-dir"), "{msg}");
}

/// Runs a one-tensor (f32 [4], 16 bytes) write whose callback is `f`; returns the error text.
fn write_err(f: impl FnMut(usize, &TensorInfo, &mut TensorSink<'_>) -> crate::Result<()>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.gguf");
    let mut w = GgufWriter::new(&path, 32).unwrap();
    w.add_tensor("a", &[4], GgmlType::F32).unwrap();
    let msg = w.write(f).unwrap_err().to_string();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a failed write left a file: {msg}");
    msg
}

#[test]
fn writer_refuses_wrong_data_lengths_and_leaves_no_file() {
    let short = write_err(|_, _, s| s.write(&[0; 3]));
    assert!(
        short.contains("tensor `a`") && short.contains("3 bytes were written") && short.contains("needs 16"),
        "{short}"
    );
    let long = write_err(|_, _, s| {
        s.write(&[0; 10])?;
        assert_eq!(s.remaining(), 6);
        s.write(&[0; 7])
    });
    assert!(long.contains("tensor `a`") && long.contains("exceed its size of 16"), "{long}");
    let none = write_err(|_, _, _| Ok(()));
    assert!(none.contains("0 bytes were written"), "{none}");
    assert_eq!(write_err(|_, _, _| Err(crate::Error::invalid("source tensor vanished"))), "source tensor vanished");
}

#[test]
fn writer_refuses_bad_declarations() {
    let p = Path::new("w.gguf");
    for a in [0, 48] {
        assert!(GgufWriter::new(p, a).err().unwrap().to_string().contains("not a power of two"));
    }
    let mut w = GgufWriter::new(p, 32).unwrap();
    w.add_kv("k", 1u32).unwrap();
    let kv_cases: Vec<(&str, Value, &str)> = vec![
        ("k", Value::U32(2), "key k: duplicate key"),
        ("", Value::U32(2), "key is empty"),
        ("e", Value::Array(vec![]), "key e: an empty array"),
        ("m", Value::Array(vec![Value::U32(1), Value::I32(1)]), "element 1 is i32 but element 0 is u32"),
        ("n", Value::Array(vec![Value::Array(vec![Value::Array(vec![Value::U8(1)])])]), "nested more than 2"),
        ("n2", Value::Array(vec![Value::Array(vec![])]), "array element 0: an empty array"),
        (ALIGNMENT_KEY, Value::U32(64), "must be the u32 32"),
        (ALIGNMENT_KEY, Value::U64(32), "must be the u32 32"),
    ];
    for (k, v, want) in kv_cases {
        let msg = w.add_kv(k, v).unwrap_err().to_string();
        assert!(msg.starts_with("w.gguf: ") && msg.contains(want), "{msg:?} should mention {want:?}");
    }
    w.add_kv(ALIGNMENT_KEY, 32u32).unwrap();
    w.add_tensor("t", &[32], GgmlType::Q8_0).unwrap();
    let long = "x".repeat(64);
    let t_cases: Vec<(&str, Vec<u64>, GgmlType, &str)> = vec![
        ("t", vec![32], GgmlType::F32, "duplicate tensor name"),
        ("", vec![1], GgmlType::F32, "tensor name is empty"),
        (&long, vec![1], GgmlType::F32, "at most 63"),
        ("d5", vec![1; 5], GgmlType::F32, "5 dimensions"),
        ("d0", vec![], GgmlType::F32, "0 dimensions"),
        ("z", vec![4, 0], GgmlType::F32, "dimension 1 is 0"),
        ("q", vec![16, 2], GgmlType::Q8_0, "ne[0] = 16 is not a multiple of q8_0's block size 32"),
        ("o", vec![u64::MAX, 2], GgmlType::F32, "overflows"),
        ("o2", vec![1 << 62], GgmlType::F32, "overflows"),
    ];
    for (name, dims, kind, want) in t_cases {
        let msg = w.add_tensor(name, &dims, kind).unwrap_err().to_string();
        assert!(msg.starts_with("w.gguf: ") && msg.contains(want), "{msg:?} should mention {want:?}");
    }
    assert_eq!(w.tensors().len(), 1, "refused tensors are not declared");
}

#[test]
fn value_accessors_and_ggml_type_table() {
    assert_eq!(Value::I32(5).as_u64(), Some(5));
    assert_eq!(Value::I32(-1).as_u64(), None);
    assert_eq!(Value::U64(u64::MAX).as_i64(), None);
    assert_eq!(Value::I8(-3).as_i64(), Some(-3));
    assert_eq!(Value::U32(3).as_f64(), Some(3.0));
    assert_eq!(Value::F32(0.5).as_f64(), Some(0.5));
    assert_eq!(Value::Str("a".into()).as_u64(), None);
    assert_eq!(Value::Bool(true).as_bool(), Some(true));
    assert_eq!(Value::from(vec![Value::U8(1)]).as_array(), Some(&[Value::U8(1)][..]));
    assert_eq!((Value::from("s").type_name(), Value::Array(vec![]).type_name()), ("string", "array"));
    for t in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(t.id()), Some(t));
        let (n, b) = t.block();
        assert_eq!(t.bytes_for(n as u64 * 3), Some(b as u64 * 3), "{}", t.name());
    }
    let ids: Vec<u32> = GgmlType::ALL.iter().map(|t| t.id()).collect();
    assert_eq!(ids, [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30]);
    assert_eq!(GgmlType::from_id(4), None);
    assert_eq!((GgmlType::Q4_K.name(), GgmlType::Q4_K.block()), ("q4_K", (256, 144)));
    assert_eq!(GgmlType::Q8_0.bytes_for(33), None);
    assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
}
