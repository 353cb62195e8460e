//! Model directories in and out: save/load round trips (f32 exact, bf16/f16 rounded, sharded with an index,
//! `lm_head.weight` naming, ignored buffers), Dolly's vocabulary resize, and hostile directories, each of which
//! must give its specific error naming the file and tensor, never a panic.

mod common;
use common::*;
use neox::{Model, SaveDtype};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

fn tiny() -> Model {
    perturbed_model(tiny_config(true, 40), 1)
}

/// (name, dtype, shape, bytes) of one tensor to write.
type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Write the model's tensors (renamed/filtered by `edit`) into safetensors files per `shard_of`.
fn write_custom(dir: &Path, m: &Model, files: &[&str], mut edit: impl FnMut(&str) -> Option<Raw>) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::to_string(&m.config.to_json()).unwrap();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let mut per_file: Vec<Vec<Raw>> = vec![Vec::new(); files.len()];
    let mut index = HashMap::new();
    for (k, p) in m.layout.params.iter().enumerate() {
        if let Some(t) = edit(&p.name) {
            let f = k % files.len();
            index.insert(t.0.clone(), files[f].to_string());
            per_file[f].push(t);
        }
    }
    for (f, tensors) in files.iter().zip(per_file) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, dt, shape, data)| (n.clone(), TensorView::new(*dt, shape.clone(), data).unwrap()))
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join(f), bytes).unwrap();
    }
    if files.len() > 1 {
        let idx = serde_json::json!({"metadata": {}, "weight_map": index});
        std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    }
}

fn plain(m: &Model) -> impl FnMut(&str) -> Option<Raw> + '_ {
    move |name: &str| {
        let p = m.layout.find(name).unwrap();
        Some((name.to_string(), Dtype::F32, p.shape.clone(), f32_bytes(&m.params()[p.range()])))
    }
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn save_load_roundtrips() {
    let m = tiny();
    let tmp = tempfile::tempdir().unwrap();
    m.save(tmp.path(), SaveDtype::F32).unwrap();
    let back = Model::load(tmp.path()).unwrap();
    assert_eq!(back.params(), m.params());
    assert_eq!(back.config, Model::load(tmp.path()).unwrap().config);
    for (dt, tol) in [(SaveDtype::Bf16, 1.0 / 128.0), (SaveDtype::F16, 1.0 / 1024.0)] {
        m.save(tmp.path(), dt).unwrap();
        let back = Model::load(tmp.path()).unwrap();
        for (a, b) in back.params().iter().zip(m.params()) {
            assert!((a - b).abs() <= tol * b.abs() + 1e-6, "{dt:?}: {a} vs {b}");
        }
    }
    // Only the two files, no temp leftovers.
    let mut names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
}

#[test]
fn sharded_lm_head_and_buffers_load() {
    let m = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let mut inner = plain(&m);
    write_custom(tmp.path(), &m, &["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], |n| {
        let (name, dt, s, d) = inner(n)?;
        Some((if name == "embed_out.weight" { "lm_head.weight".into() } else { name }, dt, s, d))
    });
    let back = Model::load(tmp.path()).unwrap();
    assert_eq!(back.params(), m.params());
    // bf16 plus the known buffers (ignored) in a single file.
    let tmp2 = tempfile::tempdir().unwrap();
    write_custom(tmp2.path(), &m, &["model.safetensors"], |_| None);
    let mut data: Vec<Raw> = m
        .layout
        .params
        .iter()
        .map(|p| {
            let d = m.params()[p.range()].iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
            (p.name.clone(), Dtype::BF16, p.shape.clone(), d)
        })
        .collect();
    data.push(("gpt_neox.layers.0.attention.bias".into(), Dtype::BOOL, vec![1, 1, 4, 4], vec![1; 16]));
    data.push(("gpt_neox.layers.1.attention.masked_bias".into(), Dtype::F32, vec![], f32_bytes(&[-1e9])));
    data.push(("gpt_neox.layers.1.attention.rotary_emb.inv_freq".into(), Dtype::F32, vec![2], f32_bytes(&[1.0, 0.01])));
    let views: Vec<(String, TensorView<'_>)> =
        data.iter().map(|(n, dt, s, d)| (n.clone(), TensorView::new(*dt, s.clone(), d).unwrap())).collect();
    std::fs::write(tmp2.path().join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let back = Model::load(tmp2.path()).unwrap();
    for (a, b) in back.params().iter().zip(m.params()) {
        assert!((a - b).abs() <= b.abs() / 128.0 + 1e-6);
    }
}

#[test]
fn hostile_directories_give_specific_errors() {
    let m = tiny();
    let root = tempfile::tempdir().unwrap();
    let case = |name: &str| root.path().join(name);

    let d = case("no-config");
    std::fs::create_dir_all(&d).unwrap();
    assert!(load_err(&d).contains("config.json"));

    let d = case("bad-config-json");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), "{\"vocab_size\": 3,\n oops}").unwrap();
    let e = load_err(&d);
    assert!(e.contains("config.json") && e.contains("line 2"), "{e}");

    let d = case("no-weights");
    write_custom(&d, &m, &["other.safetensors"], plain(&m));
    assert!(load_err(&d).contains("no model.safetensors"));

    let d = case("pickle");
    write_custom(&d, &m, &["other.safetensors"], plain(&m));
    std::fs::write(d.join("pytorch_model.bin"), b"\x80\x02pickle").unwrap();
    let e = load_err(&d);
    assert!(e.contains("pytorch_model.bin") && e.contains("pickle"), "{e}");

    let d = case("truncated");
    write_custom(&d, &m, &["model.safetensors"], plain(&m));
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&d);
    assert!(e.contains("model.safetensors") && e.contains("truncated or corrupt"), "{e}");

    let d = case("unknown-tensor");
    let mut inner = plain(&m);
    write_custom(&d, &m, &["model.safetensors"], |n| {
        let t = inner(n)?;
        Some(if n == "gpt_neox.final_layer_norm.bias" {
            ("gpt_neox.final_layer_norm.extra".into(), t.1, t.2, t.3)
        } else {
            t
        })
    });
    let e = load_err(&d);
    assert!(e.contains("`gpt_neox.final_layer_norm.extra`") && e.contains("unexpected tensor"), "{e}");

    let d = case("missing-tensor");
    let mut inner = plain(&m);
    write_custom(&d, &m, &["model.safetensors"], |n| {
        if n.contains("layers.1.mlp.dense_4h_to_h.bias") {
            None
        } else {
            inner(n)
        }
    });
    let e = load_err(&d);
    assert!(e.contains("`gpt_neox.layers.1.mlp.dense_4h_to_h.bias`") && e.contains("missing"), "{e}");

    let d = case("wrong-shape");
    let mut inner = plain(&m);
    write_custom(&d, &m, &["model.safetensors"], |n| {
        let t = inner(n)?;
        Some(if n == "gpt_neox.embed_in.weight" { (t.0, t.1, vec![t.2[1], t.2[0]], t.3) } else { t })
    });
    let e = load_err(&d);
    assert!(e.contains("embed_in.weight") && e.contains("shape [16, 40], expected [40, 16]"), "{e}");

    let d = case("wrong-dtype");
    let mut inner = plain(&m);
    write_custom(&d, &m, &["model.safetensors"], |n| {
        let t = inner(n)?;
        Some(if n.ends_with("input_layernorm.bias") { (t.0, Dtype::I32, t.2, t.3) } else { t })
    });
    let e = load_err(&d);
    assert!(e.contains("input_layernorm.bias") && e.contains("dtype I32"), "{e}");

    let d = case("duplicate");
    let mut inner = plain(&m);
    write_custom(&d, &m, &["a.safetensors", "b.safetensors"], |n| {
        let t = inner(n)?;
        Some(if n == "embed_out.weight" { ("lm_head.weight".into(), t.1, t.2, t.3) } else { t })
    });
    // add a second copy of the output matrix under the other name into the other shard
    let p = m.layout.find("embed_out.weight").unwrap();
    let data = f32_bytes(&m.params()[p.range()]);
    let other = [("embed_out.weight".to_string(), TensorView::new(Dtype::F32, p.shape.clone(), &data).unwrap())];
    std::fs::write(d.join("c.safetensors"), safetensors::serialize(other, None).unwrap()).unwrap();
    let idx_path = d.join("model.safetensors.index.json");
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    idx["weight_map"]["embed_out.weight"] = "c.safetensors".into();
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    assert!(load_err(&d).contains("appears twice"));

    for (label, target) in
        [("dotdot", "../escape.safetensors"), ("absolute", "/etc/passwd"), ("nested-dotdot", "x/../../y")]
    {
        let d = case(label);
        write_custom(&d, &m, &["a.safetensors", "b.safetensors"], plain(&m));
        let mut idx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap()).unwrap();
        idx["weight_map"]["embed_out.weight"] = target.into();
        std::fs::write(d.join("model.safetensors.index.json"), idx.to_string()).unwrap();
        let e = load_err(&d);
        assert!(e.contains("inside the model directory"), "{label}: {e}");
    }

    let d = case("symlink-out");
    write_custom(&d, &m, &["a.safetensors", "b.safetensors"], plain(&m));
    let outside = root.path().join("outside.safetensors");
    std::fs::rename(d.join("b.safetensors"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("b.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("outside the model directory"), "{e}");

    let d = case("bad-index");
    write_custom(&d, &m, &["a.safetensors", "b.safetensors"], plain(&m));
    std::fs::write(d.join("model.safetensors.index.json"), "{\"weight_map\": 5}").unwrap();
    assert!(load_err(&d).contains("weight_map"));
}

#[test]
fn vocab_resize_shrinks_and_grows_as_documented() {
    let mut m = tiny();
    let c = m.config.hidden_size;
    let orig = m.params().to_vec();
    let emb_in = m.layout.embed_in;
    let emb_out = m.layout.embed_out;
    m.resize_vocab(30).unwrap();
    assert_eq!(m.config.vocab_size, 30);
    assert_eq!(&m.params()[m.layout.embed_in..m.layout.embed_in + 30 * c], &orig[emb_in..emb_in + 30 * c]);
    assert_eq!(&m.params()[m.layout.embed_out..m.layout.embed_out + 30 * c], &orig[emb_out..emb_out + 30 * c]);
    let small = m.params().to_vec();
    m.resize_vocab(32).unwrap();
    let e = m.layout.embed_in;
    let mean: Vec<f32> =
        (0..c).map(|j| ((0..30).map(|r| small[r * c + j] as f64).sum::<f64>() / 30.0) as f32).collect();
    assert_eq!(&m.params()[e + 30 * c..e + 31 * c], &mean[..]);
    assert_eq!(&m.params()[e + 31 * c..e + 32 * c], &mean[..]);
    assert!(m.resize_vocab(0).is_err());
}

/// A base held in bf16 resizes like the f32 path on the same (bf16) values, each new row rounded to bf16 once:
/// the reference is the f32 resize above (itself checked against the definition), rounded.
#[test]
fn vocab_resize_of_a_bf16_base_is_the_f32_resize_rounded() {
    let tmp = tempfile::tempdir().unwrap();
    tiny().save(tmp.path(), SaveDtype::Bf16).unwrap();
    let round = |x: f32| half::bf16::from_f32(x).to_f32();
    for v in [30, 40, 45] {
        let mut want = Model::load(tmp.path()).unwrap();
        let mut got = Model::load_bf16(tmp.path()).unwrap();
        want.resize_vocab(v).unwrap();
        got.resize_vocab(v).unwrap();
        assert!(got.base_bf16());
        assert_eq!(got.config.vocab_size, v);
        assert_eq!(got.layout.total, want.layout.total);
        for p in &want.layout.params {
            let w: Vec<f32> = want.params()[p.range()].iter().map(|&x| round(x)).collect();
            assert_eq!(got.merged_tensor(p), w, "vocab {v}: {}", p.name);
        }
    }
}
