//! Dolly training examples (spec section 5-6): ids and labels built by construction from the prompt/response split
//! (prompt tokens -100; response, the `"\n\n"` and `### End` supervised), the max-length lookup, Dolly's drop rule
//! (length >= max length), optional exact-duplicate removal, and the seeded shuffle + train/test split.
//! Does not pad or batch (see `batch`), does not search token ids for the response key (the original's trap).

use crate::error::{DataError, Result};
use crate::record::Record;
use crate::template::{training_prompt, training_target};
use crate::tokenizer::DollyTokenizer;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;

/// Label value the loss ignores.
pub const IGNORE_INDEX: i32 = -100;
/// Dolly's fallback when the model config names no maximum length.
pub const DEFAULT_MAX_LENGTH: usize = 1024;

/// One tokenized training example. `labels[i]` is `IGNORE_INDEX` or `input_ids[i]` (not shifted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    /// Index of the source record in the slice given to `prepare_examples`.
    pub record: u32,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Number of prompt (unsupervised) tokens.
    pub fn prompt_len(&self) -> usize {
        self.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count()
    }
}

/// Tokenize one record's training text and build its labels by construction (pure; spec section 6).
/// The prompt ends with the special `### Response:\n` token, so encoding prompt and target separately gives the
/// same ids as encoding the whole text: the tokenizer splits at special tokens before anything else.
pub fn build_example(
    tok: &DollyTokenizer,
    instruction: &str,
    context: &str,
    response: &str,
) -> Result<(Vec<u32>, Vec<i32>)> {
    let special = tok.special();
    let mut ids = tok.encode(&training_prompt(instruction, context))?;
    if ids.last() != Some(&special.response) {
        return Err(DataError::tokenizer(format!(
            "prompt does not end with the `### Response:\\n` token {}: is it a special token of this tokenizer?",
            special.response
        )));
    }
    let prompt_len = ids.len();
    let target = tok.encode(&training_target(response))?;
    if target.last() != Some(&special.end) || target.len() < 2 {
        return Err(DataError::tokenizer(format!(
            "response does not end with the `### End` token {}: is it a special token of this tokenizer?",
            special.end
        )));
    }
    ids.extend_from_slice(&target);
    let mut labels = vec![IGNORE_INDEX; prompt_len];
    labels.extend(target.iter().map(|&t| t as i32));
    Ok((ids, labels))
}

/// Max length from a model's `config.json`: first truthy of `n_positions`, `max_position_embeddings`,
/// `seq_length` (Dolly's order); else 1024.
pub fn max_length_from_config(config_json: &Path) -> Result<usize> {
    let text = std::fs::read_to_string(config_json)
        .map_err(|e| DataError::io(format!("{}: cannot read model config: {e}", config_json.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| DataError::config(format!("{}:{}: invalid JSON: {e}", config_json.display(), e.line())))?;
    max_length_from_config_value(&v).map_err(|m| DataError::config(format!("{}: {m}", config_json.display())))
}

/// The lookup of `max_length_from_config` on parsed JSON.
pub fn max_length_from_config_value(v: &serde_json::Value) -> std::result::Result<usize, String> {
    for key in ["n_positions", "max_position_embeddings", "seq_length"] {
        match v.get(key) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => continue,
            Some(serde_json::Value::Number(n)) => match n.as_u64() {
                Some(0) => continue,
                Some(x) => return usize::try_from(x).map_err(|_| format!("`{key}` = {x} is too large")),
                None => return Err(format!("`{key}` must be a positive integer, got {n}")),
            },
            Some(other) => return Err(format!("`{key}` must be a positive integer, got {other}")),
        }
    }
    Ok(DEFAULT_MAX_LENGTH)
}

/// `--test-size`: a count (`200`) or a ratio in (0, 1) (`0.05`, rounded up like HF `train_test_split`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum TestSize {
    Count(usize),
    Ratio(f64),
}

impl std::str::FromStr for TestSize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if let Ok(n) = s.parse::<usize>() {
            return Ok(TestSize::Count(n));
        }
        match s.parse::<f64>() {
            Ok(r) if r > 0.0 && r < 1.0 => Ok(TestSize::Ratio(r)),
            Ok(r) => Err(format!("a ratio must be in (0, 1), got {r}")),
            Err(_) => Err(format!("expected a count (200) or a ratio (0.05), got {s:?}")),
        }
    }
}

impl TestSize {
    /// Number of held-out examples out of `n`.
    pub fn count(self, n: usize) -> usize {
        match self {
            TestSize::Count(c) => c,
            TestSize::Ratio(r) => (r * n as f64).ceil() as usize,
        }
    }
}

/// How to turn records into the train/test split.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Dolly drops every example with `len >= max_length`.
    pub max_length: usize,
    pub seed: u64,
    pub test_size: TestSize,
    /// Remove records equal to an earlier one in all four fields (off by default, as in Dolly).
    pub dedup: bool,
}

/// What preparation did, for logs and `dolly data stats`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PrepareReport {
    pub records: usize,
    pub duplicates_removed: usize,
    /// Examples with `len >= max_length` (Dolly's drop rule).
    pub dropped: usize,
    /// Locations (file:line) of the dropped records.
    pub dropped_records: Vec<String>,
    pub kept: usize,
    pub train: usize,
    pub test: usize,
    pub max_length: usize,
    pub seed: u64,
    /// Tokens over the kept examples.
    pub kept_tokens: u64,
    /// Supervised tokens (label != -100) over the kept examples.
    pub supervised_tokens: u64,
}

/// The prepared data: shuffled train and test examples.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    pub report: PrepareReport,
}

/// Indices of records that are not exact duplicates of an earlier record.
pub fn dedup_indices(records: &[Record]) -> Vec<usize> {
    let mut seen = HashSet::with_capacity(records.len());
    (0..records.len())
        .filter(|&i| {
            let r = &records[i];
            seen.insert((r.instruction.as_str(), r.context.as_str(), r.response.as_str(), r.category.as_str()))
        })
        .collect()
}

/// Tokenize and label the given records (in parallel, order kept). Errors name the record's file:line.
pub fn build_examples(records: &[Record], indices: &[usize], tok: &DollyTokenizer) -> Result<Vec<Example>> {
    indices
        .par_iter()
        .map(|&i| {
            let r = &records[i];
            let (input_ids, labels) = build_example(tok, &r.instruction, &r.context, &r.response)
                .map_err(|e| DataError::new(e.kind, format!("{}: {}", r.source, e.message)))?;
            Ok(Example { input_ids, labels, record: i as u32 })
        })
        .collect()
}

/// Records -> (dedup) -> examples -> drop `len >= max_length` -> shuffle(seed) -> split (test first).
pub fn prepare_examples(records: &[Record], tok: &DollyTokenizer, opts: &PrepareOptions) -> Result<Prepared> {
    if opts.max_length == 0 {
        return Err(DataError::config("max length must be positive"));
    }
    let indices: Vec<usize> = if opts.dedup { dedup_indices(records) } else { (0..records.len()).collect() };
    let mut report = PrepareReport {
        records: records.len(),
        duplicates_removed: records.len() - indices.len(),
        max_length: opts.max_length,
        seed: opts.seed,
        ..Default::default()
    };
    if records.is_empty() {
        return Err(DataError::config("the dataset has no records"));
    }
    // Records too long to fit whatever their text (a lower bound from their byte length) are dropped without
    // tokenizing them: the same examples are dropped as after tokenizing, at bounded cost per record.
    let (indices, too_long): (Vec<usize>, Vec<usize>) = indices.into_iter().partition(|&i| {
        let r = &records[i];
        tok.min_tokens_for_bytes(r.instruction.len() + r.context.len() + r.response.len()) < opts.max_length
    });
    report.dropped += too_long.len();
    report.dropped_records.extend(too_long.iter().map(|&i| records[i].source.to_string()));
    let all = build_examples(records, &indices, tok)?;
    let mut kept = Vec::with_capacity(all.len());
    for ex in all {
        if ex.len() >= opts.max_length {
            report.dropped += 1;
            report.dropped_records.push(records[ex.record as usize].source.to_string());
        } else {
            kept.push(ex);
        }
    }
    report.kept = kept.len();
    report.kept_tokens = kept.iter().map(|e| e.len() as u64).sum();
    report.supervised_tokens = kept.iter().map(|e| (e.len() - e.prompt_len()) as u64).sum();
    let n_test = opts.test_size.count(kept.len());
    if kept.is_empty() {
        return Err(DataError::config(format!(
            "no training examples: all {} records are at least {} tokens long (Dolly drops those); raise \
             --max-length",
            records.len() - report.duplicates_removed,
            opts.max_length
        )));
    }
    if n_test >= kept.len() {
        return Err(DataError::config(format!(
            "test size {n_test} leaves no training examples ({} kept of {} records at max length {})",
            kept.len(),
            records.len(),
            opts.max_length
        )));
    }
    common::Rng::new(opts.seed).shuffle(&mut kept);
    let train = kept.split_off(n_test);
    report.train = train.len();
    report.test = kept.len();
    Ok(Prepared { train, test: kept, report })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn max_length_lookup_order() {
        let f = |v| max_length_from_config_value(&v);
        assert_eq!(f(json!({"max_position_embeddings": 2048})), Ok(2048));
        assert_eq!(f(json!({"n_positions": 512, "max_position_embeddings": 2048})), Ok(512));
        assert_eq!(f(json!({"n_positions": null, "max_position_embeddings": 0, "seq_length": 77})), Ok(77));
        assert_eq!(f(json!({})), Ok(1024));
        assert!(f(json!({"n_positions": "x"})).is_err());
        assert!(f(json!({"n_positions": -3})).is_err());
    }

    #[test]
    fn test_size_parses_counts_and_ratios() {
        assert_eq!("200".parse::<TestSize>(), Ok(TestSize::Count(200)));
        assert_eq!("0.05".parse::<TestSize>(), Ok(TestSize::Ratio(0.05)));
        assert!("1.5".parse::<TestSize>().is_err());
        assert!("0.0".parse::<TestSize>().is_err());
        assert!("abc".parse::<TestSize>().is_err());
        assert_eq!(TestSize::Ratio(0.05).count(14977), 749);
        assert_eq!(TestSize::Count(7).count(10), 7);
    }
}
