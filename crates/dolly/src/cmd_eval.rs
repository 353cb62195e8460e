//! `dolly eval MODEL --dataset FILE`: held-out loss and perplexity of a Dolly model, overall and per Dolly
//! category, on the training run's own split by default (the seed, test size, maximum length and dedup setting
//! are read from MODEL's newest checkpoint when it is a `dolly train` output directory), and N sample answers per
//! category written to JSONL next to their reference responses — the seed's "Enjoy the predictions", measurable.
//! The loss is the training forward's response-only cross-entropy (`Model::forward_loss`, the same numbers as the
//! trainer's `eval_loss` and as the server's `echo` log-probabilities), token-weighted over the split.
//! Front-end only: data preparation lives in `data`, the model in `neox`, generation in `infer`.

use crate::flags::parse_bool;
use anyhow::{bail, ensure, Context};
use clap::Args;
use common::Rng;
use data::{generation_prompt, BadRecordPolicy, DollyTokenizer, Example, HubOptions, PrepareOptions};
use infer::{extract_response, SamplingParams, SeqParams};
use neox::{Activations, Model, NeoxConfig};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct EvalArgs {
    /// Model directory (a `dolly train` output directory gives its split settings too), hub id, or LoRA adapter
    /// directory, as for `dolly generate`.
    pub model: String,
    /// PEFT LoRA adapter directory to apply to MODEL without merging.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Dataset: a local JSONL/JSON/Parquet file or directory, or a hub id (default: the training run's, else
    /// databricks/databricks-dolly-15k).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Which examples: `test` (the held-out split), `train`, or `all` (every kept example).
    #[arg(long, default_value = "test", value_parser = ["test", "train", "all"])]
    pub split: String,
    /// Split seed (default: the training run's, else 42 as `dolly train`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Held-out records: a count or a ratio (default: the training run's, else 1000 as `dolly train`).
    #[arg(long)]
    pub test_size: Option<String>,
    /// Examples this long or longer are dropped, as Dolly does (default: the training run's, else the model's
    /// context window).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Remove exact duplicate records first (default: the training run's, else off). `--dedup` = true.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub dedup: Option<bool>,
    /// Evaluate with quantized weight matrices, q8_0 or q4_k (quantized while loading, ~1.06 or ~0.58 bytes a
    /// weight): the quality of a quantized model, and models too large for f32 here.
    #[arg(long, value_name = "TYPE", value_parser = crate::flags::parse_quant)]
    pub quantize: Option<neox::QuantType>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Sample answers to write per category (0 = none); needs --output.
    #[arg(long, default_value_t = 0)]
    pub samples: usize,
    /// JSONL of the sample answers (category, instruction, context, reference, answer, finish_reason), written
    /// atomically.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The loss and perplexity per category as JSON, written atomically.
    #[arg(long, value_name = "FILE")]
    pub metrics_json: Option<PathBuf>,
    /// Sample answers: tokens at most (Dolly: 256).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sample answers: greedy instead of Dolly's sampling (top_p 0.92). `--greedy` = true.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_bool)]
    pub greedy: bool,
    /// Sample answers: seed of the sampling RNG.
    #[arg(long, default_value_t = 42)]
    pub sample_seed: u64,
}

/// The split settings: from the flags, else the training run's, else `dolly train`'s defaults.
struct Split {
    dataset: String,
    seed: u64,
    test_size: data::TestSize,
    max_length: Option<usize>,
    dedup: bool,
    from_run: Option<PathBuf>,
}

/// The newest checkpoint's training config of the first of `dirs` that holds one.
fn run_config(dirs: &[&Path]) -> Option<(PathBuf, train::TrainConfig)> {
    dirs.iter().find_map(|d| {
        let ck = train::checkpoint::latest(d)?;
        let st = train::checkpoint::read_state(&ck).ok()?;
        Some((ck, st.config))
    })
}

fn split_settings(a: &EvalArgs, dirs: &[&Path]) -> anyhow::Result<Split> {
    let run = run_config(dirs);
    let test_size = match &a.test_size {
        Some(s) => s.parse::<data::TestSize>().map_err(|e| anyhow::anyhow!("--test-size: {e}"))?,
        None => run.as_ref().map_or(data::TestSize::Count(1000), |(_, c)| c.test_size.to_data()),
    };
    Ok(Split {
        dataset: a
            .dataset
            .clone()
            .or_else(|| run.as_ref().map(|(_, c)| c.training_dataset.clone()))
            .unwrap_or_else(|| data::DOLLY_DATASET.into()),
        seed: a.seed.or(run.as_ref().map(|(_, c)| c.seed)).unwrap_or(42),
        test_size,
        max_length: a.max_length.or(run.as_ref().and_then(|(_, c)| c.max_length)),
        dedup: a.dedup.or(run.as_ref().map(|(_, c)| c.dedup)).unwrap_or(false),
        from_run: run.map(|(p, _)| p),
    })
}

/// Loss sum and target count per category.
#[derive(Default, Clone, Copy)]
struct Tally {
    examples: usize,
    loss: f64,
    targets: usize,
}

fn loss_by_category(
    model: &Model,
    examples: &[&Example],
    category: &dyn Fn(&Example) -> String,
    bs: usize,
) -> anyhow::Result<BTreeMap<String, Tally>> {
    let mut groups: BTreeMap<String, Vec<&Example>> = BTreeMap::new();
    for &e in examples {
        groups.entry(category(e)).or_default().push(e);
    }
    let longest = examples.iter().map(|e| e.len()).max().unwrap_or(1);
    let mut acts = Activations::new(&model.config, bs, longest.next_multiple_of(8), false);
    let (t0, total) = (Instant::now(), examples.len());
    let mut done = 0;
    let mut out = BTreeMap::new();
    for (cat, list) in groups {
        let mut t = Tally { examples: list.len(), ..Default::default() };
        for chunk in list.chunks(bs) {
            let b = data::pad_batch(chunk, 8, 0)?;
            acts.ensure(&model.config, b.batch_size, b.seq_len);
            let (s, c) = model.forward_loss(&train::trainer::view(&b), &mut acts)?;
            t.loss += s;
            t.targets += c;
            done += chunk.len();
        }
        eprintln!("[{done}/{total} examples, {:.1} s] {cat}", t0.elapsed().as_secs_f64());
        out.insert(cat, t);
    }
    Ok(out)
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    ensure!(a.batch_size >= 1, "--batch-size must be at least 1");
    ensure!(a.max_new_tokens >= 1, "--max-new-tokens must be at least 1");
    ensure!(a.samples <= 10_000, "--samples must be at most 10000 per category, got {}", a.samples);
    if a.samples > 0 && a.output.is_none() {
        bail!("--samples {} needs --output FILE.jsonl for the answers", a.samples);
    }
    // the split's settings, the paths and the model's config before any data or weights are read
    let model_path = Path::new(&a.model);
    let dirs: Vec<&Path> = a.adapter.as_deref().into_iter().chain([model_path]).collect();
    let split = split_settings(&a, &dirs)?;
    for (flag, p) in [("--output", &a.output), ("--metrics-json", &a.metrics_json)] {
        if let Some(p) = p {
            crate::flags::check_output_file(flag, p, Some(("dataset", Path::new(&split.dataset))))?;
        }
    }
    let src = crate::adapter_arg::resolve(&a.model, a.adapter.as_deref())?;
    let cfg = NeoxConfig::from_file(&src.base.join("config.json"))?;
    let context = cfg.max_position_embeddings;
    let max_length = split.max_length.unwrap_or(context);
    ensure!(max_length <= context, "--max-length {max_length} exceeds the model's context window of {context} tokens");
    ensure!(a.max_new_tokens < context, "--max-new-tokens must be below the context window of {context} tokens");
    let tok = DollyTokenizer::resolve(Some(src.tokenizer_dir()), a.tokenizer.as_deref())?;
    crate::adapter_arg::check(&src, &crate::adapter_arg::config_for(&src, tok.vocab_size())?)?;
    match &split.from_run {
        Some(ck) => eprintln!("split settings of the training run ({})", ck.display()),
        None => eprintln!("split settings: dolly train's defaults (no training run found under MODEL)"),
    }
    let test_size_text = match split.test_size {
        data::TestSize::Count(n) => n.to_string(),
        data::TestSize::Ratio(r) => r.to_string(),
    };
    eprintln!(
        "dataset {}, seed {}, test size {test_size_text}, max length {max_length}, dedup {}",
        split.dataset, split.seed, split.dedup
    );

    // data: the training run's preparation exactly (drop rule, shuffle, split)
    let loaded = data::load_dataset(&split.dataset, BadRecordPolicy::Fail, &HubOptions::from_env())?;
    let opts = PrepareOptions { max_length, seed: split.seed, test_size: split.test_size, dedup: split.dedup };
    let prep = data::prepare_examples(&loaded.records, &tok, &opts)?;
    let chosen: Vec<&Example> = match a.split.as_str() {
        "test" => prep.test.iter().collect(),
        "train" => prep.train.iter().collect(),
        _ => prep.test.iter().chain(&prep.train).collect(),
    };
    ensure!(!chosen.is_empty(), "the {} split is empty (--test-size {test_size_text})", a.split);
    let records = &loaded.records;
    let category = |e: &Example| {
        let c = &records[e.record as usize].category;
        if c.is_empty() {
            "(none)".to_string()
        } else {
            c.clone()
        }
    };

    let model = crate::adapter_arg::load(&src, tok.vocab_size(), a.quantize)?;
    let t0 = Instant::now();
    let tallies = loss_by_category(&model, &chosen, &category, a.batch_size)?;
    let secs = t0.elapsed().as_secs_f64();
    let total = tallies.values().fold(Tally::default(), |acc, t| Tally {
        examples: acc.examples + t.examples,
        loss: acc.loss + t.loss,
        targets: acc.targets + t.targets,
    });
    let mean = |t: &Tally| if t.targets == 0 { f64::NAN } else { t.loss / t.targets as f64 };
    println!("{:<24} {:>8} {:>10} {:>8} {:>10}", "category", "examples", "tokens", "loss", "ppl");
    for (cat, t) in tallies.iter().chain([(&"all".to_string(), &total)]) {
        let l = mean(t);
        println!("{cat:<24} {:>8} {:>10} {l:>8.4} {:>10.3}", t.examples, t.targets, l.exp());
    }
    eprintln!("[{} examples, {} target tokens in {secs:.1} s]", total.examples, total.targets);

    if let Some(p) = &a.metrics_json {
        let cats: serde_json::Map<String, Value> = tallies
            .iter()
            .map(|(c, t)| {
                let l = mean(t);
                (c.clone(), json!({"examples": t.examples, "tokens": t.targets, "loss": l, "ppl": l.exp()}))
            })
            .collect();
        let v = json!({
            "split": a.split, "dataset": split.dataset, "seed": split.seed, "test_size": test_size_text,
            "max_length": max_length, "dedup": split.dedup, "examples": total.examples, "tokens": total.targets,
            "loss": mean(&total), "ppl": mean(&total).exp(), "categories": cats,
        });
        let text = serde_json::to_string_pretty(&v)? + "\n";
        common::atomic_write(p, text.as_bytes()).with_context(|| format!("--metrics-json {}", p.display()))?;
    }
    if a.samples > 0 {
        let out = a.output.as_deref().context("--output")?;
        write_samples(&a, &model, &tok, &chosen, records, &category, out)?;
    }
    Ok(())
}

/// The first `--samples` examples of each category answered with Dolly's pipeline, next to their references.
fn write_samples(
    a: &EvalArgs,
    model: &Model,
    tok: &DollyTokenizer,
    chosen: &[&Example],
    records: &[data::Record],
    category: &dyn Fn(&Example) -> String,
    out: &Path,
) -> anyhow::Result<()> {
    let mut per: BTreeMap<String, Vec<&Example>> = BTreeMap::new();
    for &e in chosen {
        let v = per.entry(category(e)).or_default();
        if v.len() < a.samples {
            v.push(e);
        }
    }
    let sampling = if a.greedy { SamplingParams::greedy() } else { SamplingParams::default() };
    let special = tok.special();
    let ctx = model.config.max_position_embeddings;
    let mut lines = String::new();
    let mut stream = 0u64;
    let t0 = Instant::now();
    let todo: Vec<(&String, &Example)> = per.iter().flat_map(|(c, v)| v.iter().map(move |e| (c, *e))).collect();
    for (k, chunk) in todo.chunks(a.batch_size).enumerate() {
        let mut seqs = Vec::with_capacity(chunk.len());
        for (_, e) in chunk {
            let r = &records[e.record as usize];
            let context = (!r.context.is_empty()).then_some(r.context.as_str());
            let ids = tok.encode(&generation_prompt(&r.instruction, context))?;
            let max_new = a.max_new_tokens.min(ctx.saturating_sub(ids.len())).max(1);
            seqs.push((ids, SeqParams::new(sampling, max_new, Rng::derive(a.sample_seed, stream))));
            stream += 1;
        }
        let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.clone()).collect();
        let outs = infer::generate(model, seqs, tok.vocab_size(), Some(special.end), |_, _| {})?;
        for (((cat, e), o), prompt) in chunk.iter().zip(&outs).zip(&prompts) {
            let r = &records[e.record as usize];
            let mut seq = prompt.clone();
            seq.extend_from_slice(&o.tokens);
            let answer = extract_response(&seq, &special, |ids| tok.decode(ids))?;
            let row = json!({"category": cat, "instruction": r.instruction, "context": r.context,
                "reference": r.response, "answer": answer, "finish_reason": o.finish.as_str(),
                "generated_tokens": o.tokens.len(), "source": r.source.to_string()});
            lines.push_str(&row.to_string());
            lines.push('\n');
        }
        eprintln!(
            "[{}/{} sample answers, {:.1} s]",
            (k * a.batch_size + chunk.len()),
            todo.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    common::atomic_write(out, lines.as_bytes()).with_context(|| format!("--output {}", out.display()))?;
    eprintln!("{} sample answers -> {}", todo.len(), out.display());
    Ok(())
}
