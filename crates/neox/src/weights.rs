//! Hugging Face weights IO: reads `model.safetensors` or a sharded set through `model.safetensors.index.json`,
//! else `pytorch_model.bin` (or its shards through `pytorch_model.bin.index.json`) with the non-executing
//! unpickler of `torch_bin`/`pickle`; f32/f16/bf16, converted to f32. Strict: every expected tensor exactly once
//! with the right shape, the known buffers ignored, anything else an error naming the tensor and file, all
//! found from the headers before the parameter buffer is allocated. Shard names may not leave the model
//! directory (a hub cache snapshot's links into its own `blobs/` are fine). Writes safetensors atomically.

use crate::backend::cpu::{QMatrix, QuantBase, QuantType};
use crate::config::NeoxConfig;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::torch_bin::{self, TorchArchive};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Buffers that old checkpoints carry and that are not parameters: ignored, exactly these.
fn is_known_buffer(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("gpt_neox.layers.") else { return false };
    let Some((idx, tail)) = rest.split_once('.') else { return false };
    idx.bytes().all(|b| b.is_ascii_digit())
        && matches!(tail, "attention.bias" | "attention.masked_bias" | "attention.rotary_emb.inv_freq")
}

/// Weights dtype on disk when saving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
    F16,
}

impl SaveDtype {
    fn st_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "F32",
            SaveDtype::Bf16 => "BF16",
            SaveDtype::F16 => "F16",
        }
    }
    fn size(self) -> usize {
        match self {
            SaveDtype::F32 => 4,
            _ => 2,
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
        }
    }
}

/// Which kind of weight files a model directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// `pytorch_model.bin` (zip from `torch.save`), read by the non-executing unpickler.
    TorchBin,
}

/// The weight files of a model directory, validated to stay inside it.
#[derive(Clone, Debug)]
pub struct WeightFiles {
    pub format: WeightFormat,
    pub files: Vec<PathBuf>,
}

/// The weight files of `dir`: safetensors when present (single file, then index), else `pytorch_model.bin`
/// (single file, then `pytorch_model.bin.index.json`).
pub fn weight_files(dir: &Path) -> Result<WeightFiles> {
    let candidates = [
        (WeightFormat::Safetensors, "model.safetensors", "model.safetensors.index.json"),
        (WeightFormat::TorchBin, "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ];
    for (format, single, index) in candidates {
        let (single, index) = (dir.join(single), dir.join(index));
        if single.is_file() {
            return Ok(WeightFiles { format, files: vec![single] });
        }
        if index.is_file() {
            return Ok(WeightFiles { format, files: shard_files(dir, &index)? });
        }
    }
    Err(Error::file(
        dir,
        "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json in \
         the model directory",
    ))
}

/// The `blobs/` folder of the hub cache repository when `canon_dir` is one of its snapshots
/// (`.../models--ORG--NAME/snapshots/REV`), where shard files are symlinks to `../../blobs/SHA`.
fn hub_blobs_dir(canon_dir: &Path) -> Option<PathBuf> {
    let snapshots = canon_dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    snapshots.parent()?.join("blobs").canonicalize().ok()
}

/// The shard files an index names: plain relative names (no `..`, no absolute paths) that resolve inside the
/// directory, or, in a hub cache snapshot, into that cache repository's `blobs/`.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(index, format!("invalid JSON at line {} column {}: {e}", e.line(), e.column())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(index, "missing object `weight_map`"))?;
    let canon_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let blobs = hub_blobs_dir(&canon_dir);
    let mut files: Vec<PathBuf> = Vec::new();
    let mut seen = HashSet::new();
    for (tensor, f) in map {
        let name = f
            .as_str()
            .ok_or_else(|| Error::file(index, format!("weight_map[`{tensor}`] must be a file name string")))?;
        if !seen.insert(name.to_string()) {
            continue;
        }
        let rel = Path::new(name);
        let plain = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(Error::file(
                index,
                format!("shard `{name}` (for `{tensor}`) must be a relative path inside the model directory"),
            ));
        }
        let p = dir.join(rel);
        let canon = p.canonicalize().map_err(|e| Error::io(&p, e))?;
        let in_blobs = blobs.as_deref().is_some_and(|b| canon.parent() == Some(b));
        if !canon.starts_with(&canon_dir) && !in_blobs {
            return Err(Error::file(index, format!("shard `{name}` resolves outside the model directory")));
        }
        files.push(p);
    }
    if files.is_empty() {
        return Err(Error::file(index, "weight_map is empty"));
    }
    Ok(files)
}

/// Element types the loader converts to f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    F16,
    Bf16,
}

impl Elem {
    fn from_st(d: Dtype) -> std::result::Result<Elem, String> {
        match d {
            Dtype::F32 => Ok(Elem::F32),
            Dtype::F16 => Ok(Elem::F16),
            Dtype::BF16 => Ok(Elem::Bf16),
            other => Err(format!("dtype {other:?} is not supported (need F32, F16 or BF16)")),
        }
    }
}

/// The element type of a safetensors dtype, or why it cannot load.
pub(crate) fn elem_of(d: Dtype) -> std::result::Result<Elem, String> {
    Elem::from_st(d)
}

/// Little-endian `elem` values in `bytes` to f32 in `out` (exactly as many).
pub(crate) fn convert(path: &Path, name: &str, elem: Elem, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let esize = if elem == Elem::F32 { 4 } else { 2 };
    if bytes.len() != out.len() * esize {
        return Err(Error::tensor(path, name, format!("{} bytes for {} elements", bytes.len(), out.len())));
    }
    match elem {
        Elem::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Elem::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Elem::Bf16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
    Ok(())
}

/// Every tensor size of `config`'s model, multiplied out without overflow (an absurd config.json is an error,
/// not a wrapped count): the parameter count.
pub fn checked_param_count(config: &NeoxConfig) -> Option<u64> {
    let (v, h, f, l) = (
        config.vocab_size as u64,
        config.hidden_size as u64,
        config.intermediate_size as u64,
        config.num_hidden_layers as u64,
    );
    let m = |a: u64, b: u64| a.checked_mul(b);
    let per_layer = [m(4, h)?, m(m(3, h)?, h)?, m(3, h)?, m(h, h)?, h, m(f, h)?, f, m(h, f)?, h]
        .into_iter()
        .try_fold(0u64, |a, x| a.checked_add(x))?;
    m(2, m(v, h)?)?.checked_add(m(l, per_layer)?)?.checked_add(m(2, h)?).filter(|&n| usize::try_from(n).is_ok())
}

/// Tensors per layer in `Layout` (two LayerNorms, qkv, dense, the two MLP matrices: weight and bias each); the
/// model has 4 more (embed_in, the final LayerNorm, embed_out).
const TENSORS_PER_LAYER: usize = 12;

/// One opened weights file: its bytes (memory-mapped) and, for torch archives, the validated tensor records.
struct Opened {
    path: PathBuf,
    mmap: memmap2::Mmap,
    torch: Option<TorchArchive>,
}

/// (name, element type or why it cannot load, shape) of one tensor, from a file's header.
type Header = (String, std::result::Result<Elem, String>, Vec<usize>);

/// The headers of every tensor in a file (safetensors: sorted by name; torch: in pickle order).
fn headers(o: &Opened) -> Result<Vec<Header>> {
    if let Some(a) = &o.torch {
        return Ok(a.tensors.iter().map(|(n, t)| (n.clone(), torch_bin::elem_of(t), t.size.clone())).collect());
    }
    let st = safetensors_of(o)?;
    let mut out: Vec<_> =
        st.iter().map(|(name, view)| (name.to_string(), Elem::from_st(view.dtype()), view.shape().to_vec())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn safetensors_of(o: &Opened) -> Result<SafeTensors<'_>> {
    SafeTensors::deserialize(&o.mmap)
        .map_err(|e| Error::file(&o.path, format!("not a valid safetensors file (truncated or corrupt?): {e}")))
}

/// Read all parameters of `config`'s model from `dir` into one flat f32 buffer in `Layout` order. Every header
/// is read and checked against config.json (names, shapes, dtypes, nothing missing or doubled) and the total is
/// checked against this machine's memory before the buffer is allocated; the layout itself is built only once
/// the files hold at least as many tensors as config.json's layer count needs.
pub fn load_params(dir: &Path, config: &NeoxConfig) -> Result<Vec<f32>> {
    let mut dest = F32Dest(Vec::new());
    load_into(dir, config, &mut dest)?;
    Ok(dest.0)
}

/// `load_params` into bfloat16 bits (round to nearest even; a bf16 file's values come through unchanged):
/// 2 bytes per parameter and no f32 copy of the model (one tensor at a time is widened on the way).
pub fn load_params_bf16(dir: &Path, config: &NeoxConfig) -> Result<Vec<u16>> {
    let mut dest = Bf16Dest { w: Vec::new(), scratch: Vec::new() };
    load_into(dir, config, &mut dest)?;
    Ok(dest.w)
}

/// `load_params` into a quantized base: each matrix quantized as it is read (one tensor in f32 at a time), the
/// vectors kept in f32. A matrix whose rows are not a multiple of 32 values, or that holds a value that is not
/// finite or too large for an f16 scale, is refused by name.
pub(crate) fn load_params_quant(dir: &Path, config: &NeoxConfig, kind: QuantType) -> Result<QuantBase> {
    let layout = Layout::new(config);
    let mut dest = QuantDest { base: Some(QuantBase::new(kind)), layout: layout.clone(), scratch: Vec::new() };
    load_into(dir, config, &mut dest)?;
    let base = dest.base.take().expect("the base is taken once");
    base.finish(&layout).map_err(|m| Error::file(&dir.join("config.json"), m))
}

/// Where the loader puts the parameters: a buffer of `total` elements allocated once every header is checked,
/// then each tensor's f32 values written into `slot(range)` and handed over by `commit(range)`.
trait Dest {
    /// Bytes the model takes in this form.
    fn bytes(&self, layout: &Layout) -> u64;
    fn alloc(&mut self, total: usize);
    fn slot(&mut self, range: std::ops::Range<usize>) -> &mut [f32];
    /// Err: why the tensor's values cannot be held in this form.
    fn commit(&mut self, range: std::ops::Range<usize>) -> std::result::Result<(), String>;
}

struct F32Dest(Vec<f32>);

impl Dest for F32Dest {
    fn bytes(&self, layout: &Layout) -> u64 {
        (layout.total as u64).saturating_mul(4)
    }
    fn alloc(&mut self, total: usize) {
        self.0 = vec![0f32; total];
    }
    fn slot(&mut self, range: std::ops::Range<usize>) -> &mut [f32] {
        &mut self.0[range]
    }
    fn commit(&mut self, _: std::ops::Range<usize>) -> std::result::Result<(), String> {
        Ok(())
    }
}

struct Bf16Dest {
    w: Vec<u16>,
    scratch: Vec<f32>,
}

impl Dest for Bf16Dest {
    fn bytes(&self, layout: &Layout) -> u64 {
        (layout.total as u64).saturating_mul(2)
    }
    fn alloc(&mut self, total: usize) {
        self.w = vec![0u16; total];
    }
    fn slot(&mut self, range: std::ops::Range<usize>) -> &mut [f32] {
        self.scratch.resize(range.len(), 0.0);
        &mut self.scratch[..]
    }
    fn commit(&mut self, range: std::ops::Range<usize>) -> std::result::Result<(), String> {
        crate::kernels::w16::narrow(&mut self.w[range], &self.scratch);
        Ok(())
    }
}

struct QuantDest {
    base: Option<QuantBase>,
    layout: Layout,
    scratch: Vec<f32>,
}

impl Dest for QuantDest {
    fn bytes(&self, layout: &Layout) -> u64 {
        let kind = self.base.as_ref().map_or(QuantType::Q8_0, |b| b.kind);
        let (mut mats, mut vecs) = (0f64, 0u64);
        for p in &layout.params {
            match p.shape.len() {
                2 => mats += p.numel() as f64 * kind.for_matrix(&p.name, p.shape[1]).bytes_per_weight(),
                _ => vecs += p.numel() as u64,
            }
        }
        // plus one tensor in f32 on the way
        let widest = layout.params.iter().map(|p| p.numel() as u64).max().unwrap_or(0);
        mats as u64 + 4 * (vecs + widest)
    }
    fn alloc(&mut self, _: usize) {}
    fn slot(&mut self, range: std::ops::Range<usize>) -> &mut [f32] {
        self.scratch.resize(range.len(), 0.0);
        &mut self.scratch[..]
    }
    fn commit(&mut self, range: std::ops::Range<usize>) -> std::result::Result<(), String> {
        let p = self.layout.params.iter().find(|p| p.offset == range.start).expect("a tensor of the layout");
        let base = self.base.as_mut().expect("the base is held until the end");
        if p.shape.len() != 2 {
            base.push_vector(p.offset, &self.scratch);
            return Ok(());
        }
        let kind = base.kind.for_matrix(&p.name, p.shape[1]);
        let m = quantize_matrix(kind, &self.scratch, p.shape[0], p.shape[1])?;
        base.push_matrix(p.offset, m);
        Ok(())
    }
}

/// A matrix (rows, cols) quantized to `kind`, or why it cannot be.
pub(crate) fn quantize_matrix(
    kind: QuantType,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> std::result::Result<QMatrix, String> {
    check_quantizable(kind, w, cols)?;
    Ok(QMatrix::quantize(kind, w, rows, cols))
}

/// Why values in rows of `cols` cannot be quantized to `kind`, if they cannot.
pub(crate) fn check_quantizable(kind: QuantType, w: &[f32], cols: usize) -> std::result::Result<(), String> {
    let (block, limit) = match kind {
        // the block scale amax / 127 must be a finite f16 (at most 65504)
        QuantType::Q8_0 => (crate::kernels::q8::QK, 65504.0 * 127.0),
        // dmin = (largest -min of a sub-block) / 63 must be one too
        QuantType::Q4K => (crate::kernels::q4k::QK_K, 65504.0 * 63.0),
    };
    if cols == 0 || !cols.is_multiple_of(block) {
        return Err(format!("rows of {cols} values cannot be quantized to {} (blocks of {block})", kind.name()));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite() || v.abs() > limit) {
        return Err(format!("value {} at index {i} cannot be quantized (not finite, or beyond f16 scales)", w[i]));
    }
    Ok(())
}

fn load_into<D: Dest>(dir: &Path, config: &NeoxConfig, dest: &mut D) -> Result<()> {
    let wf = weight_files(dir)?;
    let mut opened = Vec::new();
    for path in &wf.files {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and lives only within this call; a concurrent writer could only change
        // values, which the format checks below would report or the model would carry as data.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let torch = match wf.format {
            WeightFormat::TorchBin => Some(TorchArchive::open(path, &mmap)?),
            WeightFormat::Safetensors => None,
        };
        opened.push(Opened { path: path.clone(), mmap, torch });
    }
    let all: Vec<Vec<Header>> = opened.iter().map(headers).collect::<Result<_>>()?;
    let held: usize = all.iter().map(Vec::len).sum();
    // Only a layer count far beyond the files is refused here (it would build a huge layout); a few missing
    // tensors get the precise "missing" error below.
    let needed = config.num_hidden_layers.saturating_mul(TENSORS_PER_LAYER).saturating_add(4);
    if needed > held.saturating_mul(2).saturating_add(64) {
        return Err(Error::file(
            &dir.join("config.json"),
            format!(
                "num_hidden_layers {} needs {needed} tensors, the weight files hold only {held}",
                config.num_hidden_layers
            ),
        ));
    }
    let layout = Layout::new(config);
    // Plan: (file, tensor name, parameter index, header index), all checked before allocating.
    let mut plan: Vec<(usize, String, usize, usize)> = Vec::new();
    let mut loaded: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (fi, (o, hs)) in opened.iter().zip(all).enumerate() {
        let path = &o.path;
        for (ti, (name, elem, shape)) in hs.into_iter().enumerate() {
            if is_known_buffer(&name) {
                continue;
            }
            let canonical = if name == "lm_head.weight" { "embed_out.weight" } else { name.as_str() };
            let pi = layout.params.iter().position(|p| p.name == canonical).ok_or_else(|| {
                Error::tensor(path, &name, "unexpected tensor for a GPT-NeoX model with this config.json")
            })?;
            let info = &layout.params[pi];
            if shape != info.shape {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("shape {shape:?}, expected {:?} from config.json", info.shape),
                ));
            }
            if let Some(prev) = loaded.insert(canonical.to_string(), path.clone()) {
                return Err(Error::tensor(path, &name, format!("appears twice (also in {})", prev.display())));
            }
            elem.map_err(|m| Error::tensor(path, &name, m))?;
            plan.push((fi, name, pi, ti));
        }
    }
    for p in &layout.params {
        if !loaded.contains_key(&p.name) {
            let shown = wf.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(Error::tensor(&wf.files[0], &p.name, format!("missing (looked in: {shown})")));
        }
    }
    let bytes = dest.bytes(&layout);
    common::check_fits(&format!("loading the model {}", dir.display()), bytes).map_err(Error::invalid)?;
    dest.alloc(layout.total);
    for (fi, o) in opened.iter().enumerate() {
        let mine = plan.iter().filter(|p| p.0 == fi);
        match &o.torch {
            Some(a) => {
                for (_, name, pi, ti) in mine {
                    let range = layout.params[*pi].range();
                    a.read_into(&o.path, &o.mmap, name, &a.tensors[*ti].1, dest.slot(range.clone()))?;
                    dest.commit(range).map_err(|m| Error::tensor(&o.path, name, m))?;
                }
            }
            None => {
                let st = safetensors_of(o)?;
                for (_, name, pi, _) in mine {
                    let view = st.tensor(name).map_err(|e| Error::tensor(&o.path, name, e.to_string()))?;
                    let elem = Elem::from_st(view.dtype()).map_err(|m| Error::tensor(&o.path, name, m))?;
                    let range = layout.params[*pi].range();
                    convert(&o.path, name, elem, view.data(), dest.slot(range.clone()))?;
                    dest.commit(range).map_err(|m| Error::tensor(&o.path, name, m))?;
                    // read once: the file's pages need not stay in this process's memory
                    common::sysmem::forget_mapped_pages(view.data());
                }
            }
        }
    }
    Ok(())
}

/// Write `params` as `model.safetensors` in HF layout (names from `layout`), atomically.
pub fn save_safetensors(path: &Path, layout: &Layout, params: &[f32], dtype: SaveDtype) -> Result<()> {
    let tensors: Vec<(&str, &[usize], &[f32])> =
        layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice(), &params[p.range()])).collect();
    save_tensors(path, &tensors, dtype)
}

/// Read named f32 tensors (any of F32/F16/BF16 on disk) from a safetensors file, checking each shape.
pub fn load_tensors(path: &Path, wanted: &[(&str, &[usize])]) -> Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
    wanted
        .iter()
        .map(|(name, shape)| {
            let view = st.tensor(name).map_err(|_| Error::tensor(path, name, "missing"))?;
            if view.shape() != *shape {
                return Err(Error::tensor(path, name, format!("shape {:?}, expected {shape:?}", view.shape())));
            }
            let elem = Elem::from_st(view.dtype()).map_err(|m| Error::tensor(path, name, m))?;
            let mut out = vec![0f32; shape.iter().product()];
            convert(path, name, elem, view.data(), &mut out)?;
            Ok(out)
        })
        .collect()
}

/// Write named tensors into one safetensors file, atomically, streaming (no second copy in memory).
pub fn save_tensors(path: &Path, tensors: &[(&str, &[usize], &[f32])], dtype: SaveDtype) -> Result<()> {
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::tensor(path, name, format!("shape {shape:?} does not hold {} values", data.len())));
        }
    }
    let specs: Vec<(&str, &[usize])> = tensors.iter().map(|(n, s, _)| (*n, *s)).collect();
    save_tensors_with(path, &specs, dtype, |k, buf| {
        buf.extend_from_slice(tensors[k].2);
        Ok(())
    })
}

/// Write tensors `specs` (name, shape) into one safetensors file, atomically, asking `fill(k, buf)` for tensor
/// k's values (f32, appended to the empty `buf`) one tensor at a time: the whole set is never in memory.
pub fn save_tensors_with(
    path: &Path,
    specs: &[(&str, &[usize])],
    dtype: SaveDtype,
    mut fill: impl FnMut(usize, &mut Vec<f32>) -> Result<()>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut off = 0usize;
    for (name, shape) in specs {
        let n = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.st_name(), "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| Error::invalid(e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut failure = None;
    let written = common::atomic_write_with(path, |w: &mut dyn Write| {
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        let mut vals = Vec::new();
        let mut buf = Vec::with_capacity(1 << 16);
        for (k, (name, shape)) in specs.iter().enumerate() {
            vals.clear();
            if let Err(e) = fill(k, &mut vals) {
                failure = Some(e);
                return Err(std::io::Error::other("tensor source failed"));
            }
            if vals.len() != shape.iter().product::<usize>() {
                failure =
                    Some(Error::tensor(path, name, format!("shape {shape:?} does not hold {} values", vals.len())));
                return Err(std::io::Error::other("tensor size mismatch"));
            }
            for chunk in vals.chunks(1 << 14) {
                buf.clear();
                match dtype {
                    SaveDtype::F32 => chunk.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                    SaveDtype::Bf16 => {
                        chunk.iter().for_each(|x| buf.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes()))
                    }
                    SaveDtype::F16 => {
                        chunk.iter().for_each(|x| buf.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes()))
                    }
                }
                w.write_all(&buf)?;
            }
        }
        Ok(())
    });
    match (written, failure) {
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(Error::io(path, e)),
        (Ok(()), None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::is_known_buffer;

    #[test]
    fn known_buffers_are_exactly_these() {
        assert!(is_known_buffer("gpt_neox.layers.3.attention.bias"));
        assert!(is_known_buffer("gpt_neox.layers.0.attention.masked_bias"));
        assert!(is_known_buffer("gpt_neox.layers.12.attention.rotary_emb.inv_freq"));
        assert!(!is_known_buffer("gpt_neox.layers.x.attention.bias"));
        assert!(!is_known_buffer("gpt_neox.layers.0.attention.dense.bias"));
        assert!(!is_known_buffer("gpt_neox.embed_in.bias"));
    }
}
