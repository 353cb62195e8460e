//! A GPT-NeoX model as llama.cpp's GGUF (`gguf`): what llama.cpp's converter (`conversion/gptneox.py`,
//! `convert_hf_to_gguf.py`) writes — arch `gptneox`, its keys, its tensor names, the query_key_value rows
//! reordered from per-head [q k v] to [all q; all k; all v], the GPT-2 BPE vocabulary padded to the
//! embedding rows with `[PADn]` — plus the whole `tokenizer.json` under `tokenizer.huggingface.json`, so
//! the file alone answers prompts exactly as the HF tokenizer splits them. Reading accepts such files from
//! either writer; anything unknown or inconsistent is an error naming the key or tensor.

use crate::backend::cpu::{Cpu, QMatrix, QuantBase, QuantType};
use crate::config::NeoxConfig;
use crate::error::{Error, Result};
use crate::gguf::{GgmlType, Gguf, GgufWriter, Value};
use crate::kernels::q4k::{quantize_q4_k, Q4KMatrix, QK_K};
use crate::kernels::q8::{quantize_q8_0, Q8Matrix};
use crate::kernels::w16::{bf16_to_f32, f32_to_bf16};
use crate::layout::Layout;
use crate::model::Model;
use half::f16;
use serde_json::Value as Json;
use std::path::Path;

/// The weight type of the matrices in an exported file (vectors are always f32, as llama.cpp writes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
    /// ggml's 4-bit k-quant for the layers' matrices; the embedding, the head, and rows that are not whole
    /// super-blocks of 256 in q8_0 (`QuantType::for_matrix`).
    Q4K,
}

impl GgufType {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(GgufType::F32),
            "f16" => Some(GgufType::F16),
            "bf16" => Some(GgufType::Bf16),
            "q8_0" => Some(GgufType::Q8_0),
            "q4_k" => Some(GgufType::Q4K),
            _ => None,
        }
    }

    /// The type of matrix `name` (rows of `cols` values) in a file of this type.
    fn ggml(self, name: &str, cols: usize) -> GgmlType {
        match self {
            GgufType::F32 => GgmlType::F32,
            GgufType::F16 => GgmlType::F16,
            GgufType::Bf16 => GgmlType::BF16,
            GgufType::Q8_0 => GgmlType::Q8_0,
            GgufType::Q4K => match QuantType::Q4K.for_matrix(name, cols) {
                QuantType::Q4K => GgmlType::Q4_K,
                QuantType::Q8_0 => GgmlType::Q8_0,
            },
        }
    }

    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q4_K_S,
    /// MOSTLY_BF16).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Q4K => 14,
            GgufType::Bf16 => 32,
        }
    }
}

/// The GGUF name of an HF GPT-NeoX tensor (llama.cpp's gguf-py tensor_mapping for MODEL_ARCH.GPTNEOX).
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = [
        ("gpt_neox.embed_in.weight", "token_embd.weight"),
        ("gpt_neox.final_layer_norm.weight", "output_norm.weight"),
        ("gpt_neox.final_layer_norm.bias", "output_norm.bias"),
        ("embed_out.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("gpt_neox.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "attention.query_key_value" => "attn_qkv",
        "attention.dense" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.dense_h_to_4h" => "ffn_up",
        "mlp.dense_4h_to_h" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{n}.{g}.{param}"))
}

/// HF row of each GGUF row of query_key_value (H heads of D): HF keeps [q k v] per head, GGUF all q, all k,
/// all v.
fn qkv_rows(h: usize, d: usize) -> Vec<usize> {
    (0..3).flat_map(|k| (0..h).flat_map(move |hh| (0..d).map(move |j| hh * 3 * d + k * d + j))).collect()
}

const PRE_TOKENIZER: &str = "olmo";
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// The vocabulary keys of a `tokenizer.json` as llama.cpp's converter derives them (`get_vocab_base`,
/// `SpecialVocab`): tokens padded to `rows` with `[PADn]`, their types, the merges, and the special ids.
fn vocab_keys(tok: &Json, rows: usize) -> std::result::Result<Vec<(String, Value)>, String> {
    let vocab = tok["model"]["vocab"].as_object().ok_or("tokenizer.json has no model.vocab")?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; rows];
    for (s, id) in vocab {
        let id = id.as_u64().ok_or_else(|| format!("vocab entry {s:?} has no integer id"))? as usize;
        if id >= rows {
            return Err(format!("token {s:?} has id {id}, the model has {rows} embedding rows"));
        }
        tokens[id] = Some((s.clone(), TOKEN_NORMAL));
    }
    let mut endoftext = None;
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err("an added token without id or content".into());
        };
        let id = id as usize;
        if id >= rows {
            return Err(format!("added token {content:?} has id {id}, the model has {rows} embedding rows"));
        }
        let special = a["special"].as_bool().unwrap_or(false) || (content.starts_with("<|") && content.ends_with("|>"));
        tokens[id] = Some((content.to_string(), if special { TOKEN_CONTROL } else { TOKEN_USER_DEFINED }));
        if content == "<|endoftext|>" {
            endoftext = Some(id as u32);
        }
    }
    let (mut texts, mut types) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    for (i, t) in tokens.into_iter().enumerate() {
        let (s, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_UNUSED));
        texts.push(Value::Str(s));
        types.push(Value::I32(ty));
    }
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .ok_or("tokenizer.json has no model.merges")?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::Str(s.clone())),
            Json::Array(p) if p.len() == 2 => {
                Ok(Value::Str(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or(""))))
            }
            _ => Err("a merge that is neither \"a b\" nor [a, b]".to_string()),
        })
        .collect::<std::result::Result<_, _>>()?;
    let eot = endoftext.ok_or("tokenizer.json has no <|endoftext|> token")?;
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::Str(PRE_TOKENIZER.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(eot)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eot)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(eot)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(eot)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ])
}

impl Model<Cpu> {
    /// Write this model as a llama.cpp GGUF file at `path` (atomically): matrices in `kind` (a q8_0 model's
    /// blocks are copied as they are, f32 values quantized with ggml's reference quantizer), vectors f32,
    /// `tokenizer_json` (the text of tokenizer.json) as the vocabulary keys and embedded whole.
    pub fn save_gguf(&self, path: &Path, kind: GgufType, name: &str, tokenizer_json: &str) -> Result<()> {
        let c = &self.config;
        let tok: Json =
            serde_json::from_str(tokenizer_json).map_err(|e| Error::invalid(format!("tokenizer.json: {e}")))?;
        let mut w = GgufWriter::new(path, crate::gguf::DEFAULT_ALIGNMENT)?;
        let head_dim = c.hidden_size / c.num_attention_heads;
        let mut kv: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::Str("gptneox".into())),
            ("general.name".into(), Value::Str(name.into())),
            ("general.file_type".into(), Value::U32(kind.file_type())),
            ("gptneox.context_length".into(), Value::U32(c.max_position_embeddings as u32)),
            ("gptneox.embedding_length".into(), Value::U32(c.hidden_size as u32)),
            ("gptneox.block_count".into(), Value::U32(c.num_hidden_layers as u32)),
            ("gptneox.feed_forward_length".into(), Value::U32(c.intermediate_size as u32)),
            ("gptneox.rope.dimension_count".into(), Value::U32((c.rotary_pct * head_dim as f64) as u32)),
            ("gptneox.rope.freq_base".into(), Value::F32(c.rotary_emb_base as f32)),
            ("gptneox.attention.head_count".into(), Value::U32(c.num_attention_heads as u32)),
            ("gptneox.use_parallel_residual".into(), Value::Bool(c.use_parallel_residual)),
            ("gptneox.attention.layer_norm_epsilon".into(), Value::F32(c.layer_norm_eps as f32)),
        ];
        if matches!(kind, GgufType::Q8_0 | GgufType::Q4K) {
            kv.push(("general.quantization_version".into(), Value::U32(2)));
        }
        kv.extend(vocab_keys(&tok, c.vocab_size).map_err(|m| Error::invalid(format!("tokenizer.json: {m}")))?);
        kv.push(("tokenizer.huggingface.json".into(), Value::Str(tokenizer_json.into())));
        for (k, v) in kv {
            w.add_kv(&k, v)?;
        }
        let layout = &self.layout;
        for p in &layout.params {
            let name = gguf_name(&p.name).ok_or_else(|| Error::invalid(format!("{}: no GGUF name", p.name)))?;
            let dims: Vec<u64> = p.shape.iter().rev().map(|&d| d as u64).collect();
            let ty = if p.shape.len() == 2 { kind.ggml(&p.name, p.shape[1]) } else { GgmlType::F32 };
            w.add_tensor(&name, &dims, ty)?;
        }
        let h = c.num_attention_heads;
        w.write(|i, info, sink| {
            let p = &layout.params[i];
            let rows: Vec<usize> =
                if p.name.contains("query_key_value") { qkv_rows(h, head_dim) } else { (0..p.shape[0]).collect() };
            let cols = if p.shape.len() == 2 { p.shape[1] } else { 1 };
            let mut buf = Vec::new();
            // a quantized model's blocks of the file's type are copied as they are
            let held = self.be.quant_matrix(p.offset).filter(|m| match m.kind() {
                QuantType::Q8_0 => info.kind == GgmlType::Q8_0,
                QuantType::Q4K => info.kind == GgmlType::Q4_K,
            });
            if let Some(m) = held {
                for &r in &rows {
                    m.write_blocks(r, r + 1, &mut buf);
                }
                return sink.write(&buf);
            }
            let vals = self.be.tensor_f32(p.offset, p.numel());
            for &r in &rows {
                let row = &vals[r * cols..(r + 1) * cols];
                match info.kind {
                    GgmlType::F32 => row.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
                    GgmlType::F16 => row.iter().for_each(|&v| buf.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
                    GgmlType::BF16 => row.iter().for_each(|&v| buf.extend_from_slice(&f32_to_bf16(v).to_le_bytes())),
                    kind => {
                        // finite and within f16 scales (rows that are not whole blocks were refused by
                        // `add_tensor`)
                        let q = if kind == GgmlType::Q4_K { QuantType::Q4K } else { QuantType::Q8_0 };
                        crate::weights::check_quantizable(q, row, cols)
                            .map_err(|m| Error::tensor(path, &info.name, m))?;
                        match q {
                            QuantType::Q4K => quantize_q4_k(row, &mut buf),
                            QuantType::Q8_0 => quantize_q8_0(row, &mut buf),
                        }
                    }
                }
                if buf.len() > 1 << 26 {
                    sink.write(&buf)?;
                    buf.clear();
                }
            }
            sink.write(&buf)
        })
    }

    /// Load a GPT-NeoX GGUF file (ours or llama.cpp's): q8_0 matrices become a quantized base as they are
    /// (other float matrices in such a file are quantized to q8_0), q4_K matrices are dequantized and
    /// requantized to q8_0 (no q4_K kernels yet: such a file decodes at q8_0's speed and memory), a file of
    /// f32/f16/bf16 matrices an f32 model. Returns the model and the file's tokenizer.json text when it embeds one.
    pub fn load_gguf(path: &Path) -> Result<(Self, Option<String>)> {
        let g = Gguf::open(path)?;
        let config = gguf_config(&g)?;
        let layout = Layout::new(&config);
        // every tensor of the layout, by its GGUF name, with its dims; nothing else
        let mut found = Vec::with_capacity(layout.params.len());
        for p in &layout.params {
            let name = gguf_name(&p.name).expect("every layout tensor has a GGUF name");
            let t = g.tensor(&name).ok_or_else(|| Error::tensor(path, &name, "missing"))?;
            let want: Vec<u64> = p.shape.iter().rev().map(|&d| d as u64).collect();
            if t.dims != want {
                return Err(Error::tensor(path, &name, format!("dims {:?}, the model's keys give {want:?}", t.dims)));
            }
            found.push((p, t));
        }
        if g.tensors().len() != layout.params.len() {
            let extra = g.tensors().iter().find(|t| !found.iter().any(|(_, f)| f.name == t.name));
            let name = extra.map_or("?", |t| t.name.as_str());
            return Err(Error::tensor(path, name, "not a tensor of a GPT-NeoX model"));
        }
        // a file with q8_0 or q4_K matrices gives a quantized model (its float matrices quantized to q8_0)
        let quant = found.iter().any(|(_, t)| matches!(t.kind, GgmlType::Q8_0 | GgmlType::Q4_K));
        // what the model will hold, checked against this machine before allocating it
        let bytes: u64 = found
            .iter()
            .map(|(p, t)| match (quant, p.shape.len(), t.kind) {
                (true, 2, GgmlType::Q4_K) => (p.numel() as f64 * QuantType::Q4K.bytes_per_weight()).ceil() as u64,
                (true, 2, _) => (p.numel() as f64 * QuantType::Q8_0.bytes_per_weight()).ceil() as u64,
                _ => 4 * p.numel() as u64,
            })
            .sum();
        common::check_fits(&format!("loading the model {}", path.display()), bytes).map_err(Error::invalid)?;
        // bf16 matrices decode from bf16 panels (exact for them), as `--bf16` would
        let bf16 = !quant && found.iter().all(|(p, t)| p.shape.len() == 1 || t.kind == GgmlType::BF16);
        let (h, d) = (config.num_attention_heads, config.hidden_size / config.num_attention_heads);
        let mut base = QuantBase::new(QuantType::Q8_0);
        let mut params = if quant { Vec::new() } else { vec![0f32; layout.total] };
        for (p, t) in found {
            let bytes = g.data(t);
            // a vector's rows are its elements (the query_key_value bias is reordered as the weight's rows)
            let (rows, cols) = if p.shape.len() == 2 { (p.shape[0], p.shape[1]) } else { (p.numel(), 1) };
            let row_bytes = bytes.len() / rows;
            // back to HF row order: GGUF row i is HF row perm[i] (only query_key_value moves)
            let moved;
            let hf: &[u8] = if p.name.contains("query_key_value") {
                let mut v = vec![0u8; bytes.len()];
                for (i, &r) in qkv_rows(h, d).iter().enumerate() {
                    v[r * row_bytes..(r + 1) * row_bytes].copy_from_slice(&bytes[i * row_bytes..(i + 1) * row_bytes]);
                }
                moved = v;
                &moved
            } else {
                bytes
            };
            let named = |m: String| Error::tensor(path, &t.name, m);
            if p.shape.len() == 1 && !matches!(t.kind, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                return Err(named(format!("a vector of type {} (vectors are f32, f16 or bf16)", t.kind.name())));
            }
            if quant && p.shape.len() == 2 && t.kind == GgmlType::Q8_0 {
                base.push_matrix(p.offset, QMatrix::Q8(Q8Matrix::from_blocks(hf, rows, cols).map_err(named)?));
                // copied: the file's pages need not stay in this process's memory (a 12b file is 12.6 GB)
                common::sysmem::forget_mapped_pages(bytes);
                continue;
            }
            if quant && p.shape.len() == 2 && t.kind == GgmlType::Q4_K {
                base.push_matrix(p.offset, QMatrix::Q4K(Q4KMatrix::from_blocks(hf, rows, cols).map_err(named)?));
                // copied: the file's pages need not stay in this process's memory (a 12b file is 12.6 GB)
                common::sysmem::forget_mapped_pages(bytes);
                continue;
            }
            let vals = floats(hf, t.kind).ok_or_else(|| {
                named(format!("type {} is not supported here (f32, f16, bf16, q8_0, q4_K are)", t.kind.name()))
            })?;
            if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
                return Err(named(format!("value {} at index {i} is not finite", vals[i])));
            }
            common::sysmem::forget_mapped_pages(bytes);
            match (quant, p.shape.len()) {
                (false, _) => params[p.range()].copy_from_slice(&vals),
                (true, 2) => {
                    let m = crate::weights::quantize_matrix(QuantType::Q8_0, &vals, rows, cols).map_err(named)?;
                    base.push_matrix(p.offset, m)
                }
                (true, _) => base.push_vector(p.offset, &vals),
            }
        }
        let tokenizer = g.get("tokenizer.huggingface.json").and_then(Value::as_str).map(str::to_string);
        let model = if quant {
            let base = base.finish(&layout).map_err(|m| Error::file(path, m))?;
            Model::on(config, layout.clone(), Cpu::new_quant(base, &layout))
        } else {
            let mut m = Model::from_parts(config, params)?;
            m.set_decode_bf16(bf16);
            m
        };
        Ok((model, tokenizer))
    }
}

/// f32 values of a float tensor's little-endian bytes.
fn floats(b: &[u8], kind: GgmlType) -> Option<Vec<f32>> {
    Some(match kind {
        GgmlType::F32 => b.chunks_exact(4).map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect(),
        GgmlType::F16 => b.chunks_exact(2).map(|x| f16::from_le_bytes([x[0], x[1]]).to_f32()).collect(),
        GgmlType::BF16 => b.chunks_exact(2).map(|x| bf16_to_f32(u16::from_le_bytes([x[0], x[1]]))).collect(),
        GgmlType::Q8_0 => {
            let mut v = vec![0f32; b.len() / crate::kernels::q8::BLOCK_BYTES * crate::kernels::q8::QK];
            crate::kernels::q8::dequantize_q8_0(b, &mut v);
            v
        }
        GgmlType::Q4_K => {
            let mut v = vec![0f32; b.len() / crate::kernels::q4k::BLOCK_BYTES * QK_K];
            crate::kernels::q4k::dequantize_q4_k(b, &mut v);
            v
        }
        _ => return None,
    })
}

/// The model's config from a GGUF's `gptneox.*` keys, every size checked.
fn gguf_config(g: &Gguf) -> Result<NeoxConfig> {
    let path = g.path();
    let err = |k: &str, m: &str| Error::file(path, format!("key {k}: {m}"));
    let arch =
        g.get("general.architecture").and_then(Value::as_str).ok_or_else(|| err("general.architecture", "missing"))?;
    if arch != "gptneox" {
        return Err(err(
            "general.architecture",
            &format!("`{arch}`, this engine runs gptneox (GPT-NeoX, Pythia, Dolly)"),
        ));
    }
    let int = |k: &str| -> Result<usize> {
        let v = g.get(k).ok_or_else(|| err(k, "missing"))?;
        let n = v.as_u64().ok_or_else(|| err(k, &format!("a {} where an integer belongs", v.type_name())))?;
        usize::try_from(n).ok().filter(|&n| n > 0 && n < 1 << 24).ok_or_else(|| err(k, &format!("{n} is out of range")))
    };
    let (ctx, c, layers, ff, heads) = (
        int("gptneox.context_length")?,
        int("gptneox.embedding_length")?,
        int("gptneox.block_count")?,
        int("gptneox.feed_forward_length")?,
        int("gptneox.attention.head_count")?,
    );
    let rope = int("gptneox.rope.dimension_count")?;
    if !c.is_multiple_of(heads) || rope > c / heads || rope % 2 != 0 {
        return Err(err("gptneox.rope.dimension_count", &format!("{rope} for heads of {}", c / heads.max(1))));
    }
    let emb = g.tensor("token_embd.weight").ok_or_else(|| Error::tensor(path, "token_embd.weight", "missing"))?;
    let vocab = emb.dims.get(1).copied().unwrap_or(0);
    let vocab = usize::try_from(vocab).ok().filter(|&v| v > 0 && v < 1 << 24).ok_or_else(|| {
        Error::tensor(path, "token_embd.weight", format!("dims {:?} give no vocabulary size", emb.dims))
    })?;
    let mut cfg = NeoxConfig::new_pythia(vocab, c, layers, heads, ctx);
    cfg.intermediate_size = ff;
    cfg.rotary_pct = rope as f64 / (c / heads) as f64;
    if let Some(v) = g.get("gptneox.use_parallel_residual") {
        cfg.use_parallel_residual = v.as_bool().ok_or_else(|| err("gptneox.use_parallel_residual", "not a bool"))?;
    }
    if let Some(v) = g.get("gptneox.attention.layer_norm_epsilon") {
        cfg.layer_norm_eps = v
            .as_f64()
            .filter(|e| *e > 0.0 && e.is_finite())
            .ok_or_else(|| err("gptneox.attention.layer_norm_epsilon", "not a positive number"))?;
    }
    if let Some(v) = g.get("gptneox.rope.freq_base") {
        cfg.rotary_emb_base = v
            .as_f64()
            .filter(|e| *e > 0.0 && e.is_finite())
            .ok_or_else(|| err("gptneox.rope.freq_base", "not a positive number"))?;
    }
    if crate::weights::checked_param_count(&cfg).is_none() {
        return Err(Error::file(path, "the sizes in its keys give a parameter count beyond memory addresses"));
    }
    Ok(cfg)
}
