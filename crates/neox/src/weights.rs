//! Hugging Face weights IO: reads `model.safetensors` or a sharded set through `model.safetensors.index.json`
//! (f32/f16/bf16, converted to f32), strictly: every expected tensor exactly once with the right shape, the known
//! buffers ignored, anything else an error naming the tensor and file. Shard names may not leave the model
//! directory. Never reads pickle (`pytorch_model.bin`). Writes the same layout atomically.

use crate::config::NeoxConfig;
use crate::error::{Error, Result};
use crate::layout::Layout;
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

/// The weight files of a model directory, validated to stay inside it.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::file(&index, format!("invalid JSON at line {} column {}: {e}", e.line(), e.column()))
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "missing object `weight_map`"))?;
        let canon_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let mut files: Vec<PathBuf> = Vec::new();
        let mut seen = HashSet::new();
        for (tensor, f) in map {
            let name = f
                .as_str()
                .ok_or_else(|| Error::file(&index, format!("weight_map[`{tensor}`] must be a file name string")))?;
            if !seen.insert(name.to_string()) {
                continue;
            }
            let rel = Path::new(name);
            let plain = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
            if !plain {
                return Err(Error::file(
                    &index,
                    format!("shard `{name}` (for `{tensor}`) must be a relative path inside the model directory"),
                ));
            }
            let p = dir.join(rel);
            let canon = p.canonicalize().map_err(|e| Error::io(&p, e))?;
            if !canon.starts_with(&canon_dir) {
                return Err(Error::file(&index, format!("shard `{name}` resolves outside the model directory")));
            }
            files.push(p);
        }
        if files.is_empty() {
            return Err(Error::file(&index, "weight_map is empty"));
        }
        return Ok(files);
    }
    for pickle in ["pytorch_model.bin", "pytorch_model.bin.index.json"] {
        if dir.join(pickle).exists() {
            return Err(Error::file(
                &dir.join(pickle),
                "PyTorch pickle checkpoints are not loaded (unpickling can execute code). Convert once with \
                 transformers: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`",
            ));
        }
    }
    Err(Error::file(dir, "no model.safetensors or model.safetensors.index.json in the model directory"))
}

fn convert(path: &Path, name: &str, dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let esize = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => {
            return Err(Error::tensor(path, name, format!("dtype {other:?} is not supported (need F32, F16 or BF16)")))
        }
    };
    if bytes.len() != out.len() * esize {
        return Err(Error::tensor(path, name, format!("{} bytes for {} elements", bytes.len(), out.len())));
    }
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
    Ok(())
}

/// Read all parameters of `config`'s model from `dir` into one flat f32 buffer in `Layout` order.
pub fn load_params(dir: &Path, config: &NeoxConfig, layout: &Layout) -> Result<Vec<f32>> {
    let files = weight_files(dir)?;
    let mut params = vec![0f32; layout.total];
    let mut loaded: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in &files {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and lives only within this loop iteration; a concurrent writer could only
        // change values, which the format checks below would report or the model would carry as data.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
        let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        for name in names {
            if is_known_buffer(&name) {
                continue;
            }
            let view = st.tensor(&name).map_err(|e| Error::tensor(path, &name, e.to_string()))?;
            let canonical = if name == "lm_head.weight" { "embed_out.weight" } else { name.as_str() };
            let info = layout.find(canonical).ok_or_else(|| {
                Error::tensor(path, &name, "unexpected tensor for a GPT-NeoX model with this config.json")
            })?;
            if view.shape() != info.shape.as_slice() {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("shape {:?}, expected {:?} from config.json", view.shape(), info.shape),
                ));
            }
            if let Some(prev) = loaded.insert(canonical.to_string(), path.clone()) {
                return Err(Error::tensor(path, &name, format!("appears twice (also in {})", prev.display())));
            }
            convert(path, &name, view.dtype(), view.data(), &mut params[info.range()])?;
        }
    }
    let _ = config;
    for p in &layout.params {
        if !loaded.contains_key(&p.name) {
            let shown = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(Error::tensor(&files[0], &p.name, format!("missing (looked in: {shown})")));
        }
    }
    Ok(params)
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
            let mut out = vec![0f32; shape.iter().product()];
            convert(path, name, view.dtype(), view.data(), &mut out)?;
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
