//! Hostile or mismatched adapter directories are refused with an error naming the file and the field or tensor,
//! and a refused adapter leaves the model without one (never a partial load). Each case starts from the
//! PEFT-written fixture `tests/fixtures/lora-tiny/adapter` and breaks one thing.

use neox::Model;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora-tiny")
}

/// A copy of the fixture adapter with `edit` applied to its config and `tensors` to its safetensors bytes.
fn broken(
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
    tensors: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture().join("adapter");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(dir.path().join("adapter_config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let st = tensors(std::fs::read(src.join("adapter_model.safetensors")).unwrap());
    std::fs::write(dir.path().join("adapter_model.safetensors"), st).unwrap();
    dir
}

/// The fixture's tensors re-written with `f` applied to the (name -> (shape, f32 values)) map.
fn retensor(f: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) -> impl FnOnce(Vec<u8>) -> Vec<u8> {
    move |bytes| {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = st
            .iter()
            .map(|(n, v)| {
                let vals = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                (n.to_string(), v.shape().to_vec(), vals)
            })
            .collect();
        f(&mut t);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let specs: Vec<(&str, &[usize], &[f32])> =
            t.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
        neox::weights::save_tensors(&p, &specs, neox::SaveDtype::F32).unwrap();
        std::fs::read(&p).unwrap()
    }
}

fn refused(dir: &Path, base: &Path, want: &[&str]) {
    let mut m = Model::load_bf16(base).unwrap();
    let err = m.load_adapter(dir).unwrap_err().to_string();
    for w in want {
        assert!(err.contains(w), "error `{err}` should mention `{w}`");
    }
    assert!(m.lora().is_none(), "a refused adapter must not be attached");
}

const A0: &str = "base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight";

#[test]
fn the_fixture_itself_loads() {
    let mut m = Model::load_bf16(&fixture()).unwrap();
    m.load_adapter(&fixture().join("adapter")).unwrap();
    assert!(m.lora().is_some());
}

#[test]
fn mismatched_or_hostile_adapters_are_refused_by_name() {
    let base = fixture();
    let keep = |b: Vec<u8>| b;
    let none = |_: &mut serde_json::Map<String, Value>| {};
    // rank in the config != the tensors' rank
    refused(
        broken(|c| drop(c.insert("r".into(), 8.into())), keep).path(),
        &base,
        &["layers.0.attention.dense.lora_A.weight", "shape [4, 16]", "[8, 16]"],
    );
    // a tensor the configuration does not have
    let extra = retensor(|t| {
        t.push((
            "base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_C.weight".into(),
            vec![2],
            vec![0.0; 2],
        ))
    });
    refused(broken(none, extra).path(), &base, &["lora_C", "not a tensor of this adapter"]);
    // a missing tensor
    refused(broken(none, retensor(|t| t.retain(|x| x.0 != A0))).path(), &base, &[A0, "missing"]);
    // full embedding matrices (PEFT's save after a resize)
    let emb = retensor(|t| {
        t.push((
            "base_model.model.gpt_neox.embed_in.token_adapter.base_layer.weight".into(),
            vec![1, 16],
            vec![0.0; 16],
        ))
    });
    refused(broken(none, emb).path(), &base, &["base_layer.weight", "save_embedding_layers"]);
    // non-finite values
    refused(broken(none, retensor(|t| t[0].2[0] = f32::NAN)).path(), &base, &["non-finite"]);
    // a truncated file
    refused(
        broken(none, |mut b: Vec<u8>| {
            b.truncate(b.len() - 100);
            b
        })
        .path(),
        &base,
        &["adapter_model.safetensors", "truncated"],
    );
    // a target module GPT-NeoX lacks; per-layer targets
    refused(
        broken(|c| drop(c.insert("target_modules".into(), serde_json::json!(["q_proj"]))), keep).path(),
        &base,
        &["target_modules", "q_proj"],
    );
    let one_layer =
        serde_json::json!(["gpt_neox.layers.0.attention.dense", "query_key_value", "dense_h_to_4h", "dense_4h_to_h"]);
    refused(
        broken(|c| drop(c.insert("target_modules".into(), one_layer)), keep).path(),
        &base,
        &["only 1 of 2 layers"],
    );
    // PEFT variants we do not implement
    refused(
        broken(|c| drop(c.insert("use_dora".into(), true.into())), keep).path(),
        &base,
        &["use_dora", "not supported"],
    );
    refused(broken(|c| drop(c.insert("peft_type".into(), "IA3".into())), keep).path(), &base, &["peft_type", "IA3"]);
    refused(
        broken(|c| drop(c.insert("rank_pattern".into(), serde_json::json!({"dense": 2}))), keep).path(),
        &base,
        &["rank_pattern"],
    );
    refused(
        broken(|c| drop(c.insert("layers_to_transform".into(), serde_json::json!([0]))), keep).path(),
        &base,
        &["layers_to_transform"],
    );
    refused(
        broken(|c| drop(c.insert("modules_to_save".into(), serde_json::json!(["embed_out"]))), keep).path(),
        &base,
        &["modules_to_save"],
    );
    refused(broken(|c| drop(c.insert("fan_in_fan_out".into(), true.into())), keep).path(), &base, &["fan_in_fan_out"]);
    // token rows: only one matrix, ids past the vocabulary
    refused(
        broken(|c| drop(c.insert("trainable_token_indices".into(), serde_json::json!([50277]))), keep).path(),
        &base,
        &["trainable_token_indices"],
    );
    let past = serde_json::json!({"embed_in": [50277, 50280], "lm_head": [50277, 50280]});
    refused(
        broken(|c| drop(c.insert("trainable_token_indices".into(), past)), keep).path(),
        &base,
        &["50280", "vocabulary"],
    );
    // a base of another shape (the tiny-parallel fixture: vocab 512, hidden 32)
    let other = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-parallel");
    let dir = broken(
        |c| drop(c.insert("trainable_token_indices".into(), Value::Null)),
        retensor(|t| t.retain(|x| !x.0.contains("token_adapter"))),
    );
    refused(dir.path(), &other, &["adapter_model.safetensors", ".lora_", "shape"]);
    // not JSON
    let dir = broken(none, keep);
    std::fs::write(dir.path().join("adapter_config.json"), b"{ nope").unwrap();
    refused(dir.path(), &base, &["adapter_config.json", "JSON"]);
}

#[test]
fn transformers4_spelling_of_the_output_rows_loads() {
    let rename = retensor(|t| {
        for x in t.iter_mut() {
            x.0 = x.0.replace("base_model.model.lm_head.", "base_model.model.embed_out.");
        }
    });
    let tokens = serde_json::json!({"embed_in": [50277, 50278, 50279], "embed_out": [50277, 50278, 50279]});
    let dir = broken(|c| drop(c.insert("trainable_token_indices".into(), tokens)), rename);
    let mut a = Model::load_bf16(&fixture()).unwrap();
    a.load_adapter(dir.path()).unwrap();
    let mut b = Model::load_bf16(&fixture()).unwrap();
    b.load_adapter(&fixture().join("adapter")).unwrap();
    assert_eq!(a.trainable(), b.trainable());
}
