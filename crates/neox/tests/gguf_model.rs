//! GPT-NeoX models as GGUF files: our writer and reader against each other at every type, the layout
//! llama.cpp's converter defines (its tensor names, query_key_value rows as [all q; all k; all v], the
//! vocabulary padded with `[PADn]` UNUSED tokens, `<|endoftext|>` as a control token), and files that are not
//! a GPT-NeoX model refused by key or tensor. The llama.cpp side (its reader, its greedy tokens on our files,
//! its quantizer's bytes) is checked by tools/check_gguf.py, not here (no Python in CI).

use neox::gguf::{GgmlType, Gguf, GgufWriter, Value};
use neox::{GgufType, Model, NeoxConfig, QuantType};
use std::path::PathBuf;

fn tokenizer_json() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/20B_tokenizer.json");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{} (CI lays ../shared beside the checkout): {e}", p.display()))
}

fn model() -> Model {
    let mut c = NeoxConfig::new_pythia(50304, 64, 2, 4, 128);
    c.intermediate_size = 256;
    c.rotary_pct = 0.25;
    Model::new_random(c, 7)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn f32_round_trip_is_exact_and_lays_out_tensors_as_llama_cpp() {
    let (m, tok) = (model(), tokenizer_json());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    m.save_gguf(&path, GgufType::F32, "tiny", &tok).unwrap();
    let (back, t) = Model::load_gguf(&path).unwrap();
    assert_eq!(t.as_deref(), Some(tok.as_str()));
    assert_eq!(back.config.hidden_size, 64);
    assert_eq!(back.config.rotary_pct, 0.25);
    assert_eq!(bits(back.params()), bits(m.params()));

    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.get("general.architecture").and_then(Value::as_str), Some("gptneox"));
    assert_eq!(g.get("gptneox.rope.dimension_count").and_then(Value::as_u64), Some(4));
    // query_key_value: GGUF row k·C + h·D + j is HF row h·3D + k·D + j (llama.cpp's conversion/gptneox.py)
    let qkv = g.tensor("blk.1.attn_qkv.weight").unwrap();
    assert_eq!(qkv.dims, vec![64, 192]);
    let data = g.data(qkv);
    let hf = &m.params()[m.layout.find("gpt_neox.layers.1.attention.query_key_value.weight").unwrap().range()];
    let (c, d) = (64, 16);
    for (k, h, j) in [(0, 0, 0), (1, 2, 5), (2, 3, 15)] {
        let g_row = k * c + h * d + j;
        let hf_row = h * 3 * d + k * d + j;
        let got = f32::from_le_bytes(data[g_row * c * 4..g_row * c * 4 + 4].try_into().unwrap());
        assert_eq!(got, hf[hf_row * c], "q/k/v {k} head {h} dim {j}");
    }
    // the vocabulary as llama.cpp's converter writes it
    let tokens = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap();
    let types = g.get("tokenizer.ggml.token_type").and_then(Value::as_array).unwrap();
    assert_eq!(tokens.len(), 50304);
    assert_eq!((tokens[0].as_str(), types[0].as_i64()), (Some("<|endoftext|>"), Some(3)));
    assert_eq!((tokens[50300].as_str(), types[50300].as_i64()), (Some("[PAD50300]"), Some(5)));
    assert_eq!(types[300].as_i64(), Some(1));
    assert_eq!(g.get("tokenizer.ggml.pre").and_then(Value::as_str), Some("olmo"));
    assert!(g.get("tokenizer.ggml.merges").and_then(Value::as_array).is_some_and(|m| m.len() > 50_000));
    assert!(g.tensors().iter().all(|t| t.kind == GgmlType::F32));
}

#[test]
fn q8_0_files_hold_ggml_blocks_and_load_as_a_quantized_model() {
    let (m, tok) = (model(), tokenizer_json());
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    m.save_gguf(&a, GgufType::Q8_0, "tiny", &tok).unwrap();
    let (qa, _) = Model::load_gguf(&a).unwrap();
    assert_eq!(qa.quantized(), Some(QuantType::Q8_0));
    let q = m.into_quantized(QuantType::Q8_0).unwrap();
    assert_eq!(bits(&qa.dequantized_params()), bits(&q.dequantized_params()));
    // a quantized model writes its blocks as they are: the same file as quantizing while writing
    q.save_gguf(&b, GgufType::Q8_0, "tiny", &tok).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let g = Gguf::open(&a).unwrap();
    for t in g.tensors() {
        let want = if t.dims.len() == 2 { GgmlType::Q8_0 } else { GgmlType::F32 };
        assert_eq!(t.kind, want, "{}", t.name);
    }
    assert_eq!(g.get("general.file_type").and_then(Value::as_u64), Some(7));
}

/// q4_K: the layers' matrices are ggml's super-blocks (our quantizer is bit-identical to
/// `quantize_row_q4_K_ref`: the `kernels::q4k` fixture test), the embedding and head q8_0 blocks; the file loads
/// as a q4_K model holding exactly those values, and that model (or one quantized in memory) writes the same
/// file back. Rows that are not whole super-blocks are written in q8_0.
#[test]
fn q4_k_files_hold_ggml_super_blocks_and_load_as_a_q4_k_model() {
    use neox::ggml_quants::{dequantize_q4_k, quantize_q4_k, quantize_q8_0};
    let mut c = NeoxConfig::new_pythia(50304, 256, 2, 4, 512);
    c.intermediate_size = 1024;
    let (m, tok) = (Model::new_random(c, 5), tokenizer_json());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q4.gguf");
    m.save_gguf(&path, GgufType::Q4K, "tiny", &tok).unwrap();
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.get("general.file_type").and_then(Value::as_u64), Some(14));
    let name = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight";
    let info = m.layout.find(name).unwrap();
    let w = &m.params()[info.range()];
    let mut want = Vec::new();
    quantize_q4_k(w, &mut want);
    assert_eq!(g.data(g.tensor("blk.0.ffn_down.weight").unwrap()), &want[..]);
    let head = &m.params()[m.layout.find("embed_out.weight").unwrap().range()];
    let mut want_head = Vec::new();
    quantize_q8_0(head, &mut want_head);
    assert_eq!(g.data(g.tensor("output.weight").unwrap()), &want_head[..]);
    for t in g.tensors() {
        let kind = match (t.dims.len(), t.name.as_str()) {
            (1, _) => GgmlType::F32,
            (_, "token_embd.weight" | "output.weight") => GgmlType::Q8_0,
            _ => GgmlType::Q4_K,
        };
        assert_eq!(t.kind, kind, "{}", t.name);
    }
    let (back, _) = Model::load_gguf(&path).unwrap();
    assert_eq!(back.quantized(), Some(QuantType::Q4K));
    let mut q4 = vec![0f32; w.len()];
    dequantize_q4_k(&want, &mut q4);
    assert_eq!(bits(&back.dequantized_params()[info.range()]), bits(&q4));
    let ln = m.layout.find("gpt_neox.layers.1.input_layernorm.weight").unwrap();
    assert_eq!(bits(&back.dequantized_params()[ln.range()]), bits(&m.params()[ln.range()]));
    // the loaded model's blocks are written as they are; quantizing in memory gives the same file
    let again = dir.path().join("again.gguf");
    back.save_gguf(&again, GgufType::Q4K, "tiny", &tok).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
    let q = m.into_quantized(QuantType::Q4K).unwrap();
    assert_eq!(bits(&q.dequantized_params()), bits(&back.dequantized_params()));
    // 64-wide rows cannot be q4_K super-blocks: those matrices are q8_0
    let small = dir.path().join("small.gguf");
    model().save_gguf(&small, GgufType::Q4K, "tiny", &tok).unwrap();
    let g = Gguf::open(&small).unwrap();
    for t in g.tensors() {
        let kind = match (t.dims.len(), t.dims[0]) {
            (1, _) => GgmlType::F32,
            // dense_4h_to_h has rows of 256
            (_, 256) => GgmlType::Q4_K,
            _ => GgmlType::Q8_0,
        };
        assert_eq!(t.kind, kind, "{} {:?}", t.name, t.dims);
    }
    assert_eq!(Model::load_gguf(&small).unwrap().0.quantized(), Some(QuantType::Q4K));
}

#[test]
fn f16_and_bf16_files_hold_the_rounded_weights() {
    let (m, tok) = (model(), tokenizer_json());
    let dir = tempfile::tempdir().unwrap();
    for (kind, round) in [
        (GgufType::F16, (|x: f32| half::f16::from_f32(x).to_f32()) as fn(f32) -> f32),
        (GgufType::Bf16, |x: f32| half::bf16::from_f32(x).to_f32()),
    ] {
        let path = dir.path().join("m.gguf");
        m.save_gguf(&path, kind, "tiny", &tok).unwrap();
        let (back, _) = Model::load_gguf(&path).unwrap();
        for p in &m.layout.params {
            let (want, got) = (&m.params()[p.range()], &back.params()[p.range()]);
            let want: Vec<f32> =
                if p.shape.len() == 2 { want.iter().map(|&x| round(x)).collect() } else { want.to_vec() };
            assert_eq!(bits(got), bits(&want), "{kind:?} {}", p.name);
        }
    }
}

#[test]
fn files_that_are_not_this_model_are_refused_by_key_or_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    let write = |arch: &str, embd_dims: &[u64]| {
        let mut w = GgufWriter::new(&path, 32).unwrap();
        w.add_kv("general.architecture", arch).unwrap();
        for (k, v) in [
            ("gptneox.context_length", 64u64),
            ("gptneox.embedding_length", 64),
            ("gptneox.block_count", 1),
            ("gptneox.feed_forward_length", 256),
            ("gptneox.attention.head_count", 4),
            ("gptneox.rope.dimension_count", 4),
        ] {
            w.add_kv(k, v).unwrap();
        }
        w.add_tensor("token_embd.weight", embd_dims, GgmlType::F32).unwrap();
        w.write(|_, info, sink| sink.write(&vec![0u8; info.bytes() as usize])).unwrap();
    };
    write("llama", &[64, 100]);
    let e = Model::load_gguf(&path).err().unwrap().to_string();
    assert!(e.contains("general.architecture") && e.contains("llama"), "{e}");
    write("gptneox", &[64, 100]);
    let e = Model::load_gguf(&path).err().unwrap().to_string();
    assert!(e.contains("missing"), "{e}");
    write("gptneox", &[32, 100]);
    let e = Model::load_gguf(&path).err().unwrap().to_string();
    assert!(e.contains("token_embd.weight") && e.contains("dims"), "{e}");
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Files llama.cpp's own converter wrote from the tiny-parallel fixture (tools/make_gguf_fixture.py): the f32
/// file loads to exactly the HF weights (so our reading of its layout — names, QKV order, dims — is llama.cpp's),
/// the q8_0 file to exactly our own quantization of them (the converter's gguf-py quantizer is ggml's
/// reference, as ours is). Neither embeds tokenizer.json.
#[test]
fn files_written_by_llama_cpp_load_to_the_hf_weights() {
    let hf = Model::load(&fixture("tiny-parallel")).unwrap();
    let (f, tok) = Model::load_gguf(&fixture("gguf-llama/tiny-parallel-f32.gguf")).unwrap();
    assert!(tok.is_none());
    assert_eq!(f.config.rotary_pct, hf.config.rotary_pct);
    assert_eq!(f.config.use_parallel_residual, hf.config.use_parallel_residual);
    assert_eq!(bits(f.params()), bits(hf.params()));
    let (q, _) = Model::load_gguf(&fixture("gguf-llama/tiny-parallel-q8_0.gguf")).unwrap();
    assert_eq!(q.quantized(), Some(QuantType::Q8_0));
    let ours = hf.into_quantized(QuantType::Q8_0).unwrap();
    assert_eq!(bits(&q.dequantized_params()), bits(&ours.dequantized_params()));
}
