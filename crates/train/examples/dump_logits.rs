//! Print our logits of the last position for a token-id sequence, as JSON, for `tools/check_export.py`.
//!
//! Usage: `cargo run --release -p train --example dump_logits -- MODEL_DIR 12092,399,10378,2`
//! Output (stdout, one line): `{"vocab_size": V, "seq_len": T, "logits": [V floats]}`. The model is loaded with
//! `neox::Model::load` (bf16 files are widened to float32) and run in float32, one row, positions 0..T.

use neox::{Activations, Model, OwnedBatch};
use std::path::Path;

fn main() {
    if let Err(e) = run() {
        eprintln!("dump_logits: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, ids] = args.as_slice() else {
        return Err("usage: dump_logits MODEL_DIR ID,ID,...".into());
    };
    let ids: Vec<u32> = ids
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<u32>().map_err(|e| format!("bad token id `{s}`: {e}")))
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err("no token ids given".into());
    }
    let model = Model::load(Path::new(dir)).map_err(|e| e.to_string())?;
    let t = ids.len();
    let batch = OwnedBatch::dense(1, t, ids, vec![neox::IGNORE_INDEX; t]);
    let mut acts = Activations::new(&model.config, 1, t, false);
    let logits = model.forward_logits(&batch.view(), &mut acts).map_err(|e| e.to_string())?;
    let v = model.config.vocab_size;
    let last = &logits[(t - 1) * v..t * v];
    let out = serde_json::json!({"vocab_size": v, "seq_len": t, "logits": last});
    println!("{out}");
    Ok(())
}
