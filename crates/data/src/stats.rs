//! `dolly data stats` and `dolly data inspect` as pure functions returning JSON: counts (records, kept, dropped,
//! skipped bad records by reason, per category), token counts, and the padding waste of both batching modes;
//! or one record's training text, ids and labels. Does not print (the CLI does).

use crate::collate::{packed_waste, padded_waste};
use crate::dataset::LoadedDataset;
use crate::error::{DataError, Result};
use crate::example::{build_example, build_examples, dedup_indices, Example};
use crate::template::training_text;
use crate::tokenizer::DollyTokenizer;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Settings of `dolly data stats`.
#[derive(Clone, Debug)]
pub struct StatsOptions {
    pub max_length: usize,
    /// Rows per batch for the padding-waste figures (Dolly's per-device default is 8).
    pub batch_size: usize,
    /// Row length for packing (default: the max length).
    pub pack_length: usize,
    pub seed: u64,
    pub dedup: bool,
}

fn token_summary(lens: impl Iterator<Item = usize> + Clone) -> Value {
    let n = lens.clone().count();
    let total: u64 = lens.clone().map(|l| l as u64).sum();
    json!({
        "count": n,
        "total": total,
        "mean": if n == 0 { 0.0 } else { total as f64 / n as f64 },
        "min": lens.clone().min().unwrap_or(0),
        "max": lens.max().unwrap_or(0),
    })
}

/// The stats object (see docs/data.md for the fields).
pub fn stats_json(data: &LoadedDataset, tok: &DollyTokenizer, opts: &StatsOptions) -> Result<Value> {
    if opts.max_length == 0 || opts.batch_size == 0 || opts.pack_length == 0 {
        return Err(DataError::config("max length, batch size and pack length must be positive"));
    }
    let records = &data.records;
    let indices: Vec<usize> = if opts.dedup { dedup_indices(records) } else { (0..records.len()).collect() };
    let examples = build_examples(records, &indices, tok)?;
    let (mut kept, dropped): (Vec<&Example>, Vec<&Example>) = examples.iter().partition(|e| e.len() < opts.max_length);
    let mut categories: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in &indices {
        *categories.entry(records[i].category.as_str()).or_default() += 1;
    }
    let with_context = indices.iter().filter(|&&i| !records[i].context.is_empty()).count();
    common::Rng::new(opts.seed).shuffle(&mut kept);
    let padded = padded_waste(&kept, opts.batch_size, 8);
    let packed = packed_waste(&kept, opts.batch_size, opts.pack_length, false)?;
    let supervised: u64 = kept.iter().map(|e| (e.len() - e.prompt_len()) as u64).sum();
    Ok(json!({
        "files": data.report.files,
        "commit": data.commit,
        "records": records.len(),
        "skipped_bad": data.report.skipped_count(),
        "skipped_by_reason": data.report.skipped_by_reason,
        "blank_lines": data.report.blank_lines,
        "duplicates_removed": records.len() - indices.len(),
        "with_context": with_context,
        "max_length": opts.max_length,
        "kept": kept.len(),
        "dropped": dropped.len(),
        "dropped_records": dropped.iter().map(|e| records[e.record as usize].source.to_string()).collect::<Vec<_>>(),
        "categories": categories,
        "tokens": token_summary(examples.iter().map(|e| e.len())),
        "kept_tokens": token_summary(kept.iter().map(|e| e.len())),
        "supervised_tokens": supervised,
        "vocab_size": tok.vocab_size(),
        "special_ids": tok.special(),
        "padding_waste": {
            "padded": {"batch_size": opts.batch_size, "multiple_of": 8, "real_tokens": padded.real_tokens,
                       "total_tokens": padded.total_tokens, "waste": padded.fraction()},
            "packed": {"batch_size": opts.batch_size, "seq_len": opts.pack_length, "real_tokens": packed.real_tokens,
                       "total_tokens": packed.total_tokens, "waste": packed.fraction()},
        },
    }))
}

/// One record (0-based index among the records read, after skipped bad records) as the trainer sees it.
pub fn inspect_json(data: &LoadedDataset, index: usize, tok: &DollyTokenizer, max_length: usize) -> Result<Value> {
    let r = data.records.get(index).ok_or_else(|| {
        DataError::config(format!("--index {index} is out of range: {} records were read", data.records.len()))
    })?;
    let (ids, labels) = build_example(tok, &r.instruction, &r.context, &r.response)
        .map_err(|e| DataError::new(e.kind, format!("{}: {}", r.source, e.message)))?;
    let prompt = labels.iter().take_while(|&&l| l == crate::IGNORE_INDEX).count();
    Ok(json!({
        "index": index,
        "source": r.source.to_string(),
        "category": r.category,
        "text": training_text(&r.instruction, &r.context, &r.response),
        "length": ids.len(),
        "prompt_tokens": prompt,
        "supervised_tokens": ids.len() - prompt,
        "max_length": max_length,
        "dropped": ids.len() >= max_length,
        "input_ids": ids,
        "labels": labels,
    }))
}
