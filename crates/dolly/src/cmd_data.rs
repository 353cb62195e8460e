//! `dolly cache-dataset` and `dolly data stats|inspect`: thin wrappers over the `data` crate (flag parsing,
//! printing). Does not hold data logic: everything it prints is computed by `data::stats` / `data::dataset`.

use anyhow::Context;
use clap::{Args, Subcommand};
use data::hub::HubOptions;
use data::stats::{inspect_json, stats_json, StatsOptions};
use data::{BadRecordPolicy, DollyTokenizer};
use std::path::PathBuf;

/// Max length when neither `--max-length` nor a model config gives one: Pythia's 2048.
const DEFAULT_MAX_LENGTH: usize = 2048;

#[derive(Args)]
pub struct CacheDatasetArgs {
    /// Hub dataset id.
    #[arg(long, default_value = data::DOLLY_DATASET)]
    dataset: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Hub cache directory (default: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Do not draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// Where the data comes from and how it is tokenized (shared by `stats` and `inspect`).
#[derive(Args)]
pub struct DataSourceArgs {
    /// A hub dataset id, a .jsonl/.json/.parquet file, or a directory of them.
    #[arg(long)]
    training_dataset: String,
    /// tokenizer.json to use (default: INPUT_MODEL/tokenizer.json).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Local model directory: its tokenizer.json and its config.json's max length.
    #[arg(long)]
    input_model: Option<PathBuf>,
    /// Max length (default: from the model's config.json, Dolly's lookup order; else 2048).
    #[arg(long)]
    max_length: Option<usize>,
    /// What to do with malformed records.
    #[arg(long, default_value = "fail", value_parser = parse_policy)]
    on_bad_record: BadRecordPolicy,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatsArgs {
    #[command(flatten)]
    src: DataSourceArgs,
    /// Rows per batch for the padding-waste figures.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Row length for packing (default: the max length).
    #[arg(long)]
    pack_length: Option<usize>,
    /// Shuffle seed (batches are measured in the shuffled order, as training sees them).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Remove exact duplicate records first.
    #[arg(long)]
    dedup: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    src: DataSourceArgs,
    /// 0-based index among the records read (bad records skipped under `--on-bad-record skip` do not count).
    #[arg(long)]
    index: usize,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Counts, token statistics and padding waste of a dataset (JSON with --json).
    Stats(StatsArgs),
    /// One record's training text, input_ids and labels (unpadded).
    Inspect(InspectArgs),
}

fn parse_policy(s: &str) -> Result<BadRecordPolicy, String> {
    s.parse()
}

pub fn run_cache(a: CacheDatasetArgs) -> anyhow::Result<()> {
    let mut opts = HubOptions::from_env();
    if let Some(d) = a.cache_dir {
        opts.cache_dir = d;
    }
    opts.progress = !a.no_progress;
    let snap = data::dataset::cache_hub_dataset(&opts, &a.dataset, &a.revision)
        .with_context(|| format!("cannot cache dataset {} at revision {}", a.dataset, a.revision))?;
    out(&format!("{} @ {} -> {}", a.dataset, snap.commit, snap.dir.display()))?;
    for f in &snap.files {
        out(&format!("  {f}"))?;
    }
    Ok(())
}

pub fn run(c: DataCommand) -> anyhow::Result<()> {
    match c {
        DataCommand::Stats(a) => stats(a),
        DataCommand::Inspect(a) => inspect(a),
    }
}

struct Loaded {
    data: data::LoadedDataset,
    tok: DollyTokenizer,
    max_length: usize,
}

fn load(src: &DataSourceArgs) -> anyhow::Result<Loaded> {
    let tok = DollyTokenizer::resolve(src.input_model.as_deref(), src.tokenizer.as_deref())?;
    let max_length = match (src.max_length, &src.input_model) {
        (Some(n), _) => n,
        (None, Some(dir)) => data::max_length_from_config(&dir.join("config.json"))?,
        (None, None) => DEFAULT_MAX_LENGTH,
    };
    if max_length == 0 {
        anyhow::bail!("--max-length must be positive");
    }
    let data = data::load_dataset(&src.training_dataset, src.on_bad_record, &HubOptions::from_env())?;
    if data.report.skipped_count() > 0 {
        eprintln!("warning: {}", data.report.summary());
    }
    Ok(Loaded { data, tok, max_length })
}

/// Print to stdout; a closed pipe (`| head`) ends output quietly instead of panicking.
fn out(s: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match writeln!(o, "{s}").and_then(|_| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    out(&serde_json::to_string_pretty(v)?)
}

fn stats(a: StatsArgs) -> anyhow::Result<()> {
    let l = load(&a.src)?;
    let opts = StatsOptions {
        max_length: l.max_length,
        batch_size: a.batch_size,
        pack_length: a.pack_length.unwrap_or(l.max_length),
        seed: a.seed,
        dedup: a.dedup,
    };
    let v = stats_json(&l.data, &l.tok, &opts)?;
    if a.src.json {
        return print_json(&v);
    }
    let g = |k: &str| v[k].to_string();
    out(&format!(
        "files: {}",
        l.data.report.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    ))?;
    out(&format!(
        "records {}  skipped_bad {}  duplicates_removed {}  kept {}  dropped {} (length >= {})",
        g("records"),
        g("skipped_bad"),
        g("duplicates_removed"),
        g("kept"),
        g("dropped"),
        l.max_length
    ))?;
    let t = &v["tokens"];
    out(&format!("tokens: total {}  mean {:.1}  max {}", t["total"], t["mean"].as_f64().unwrap_or(0.0), t["max"]))?;
    if let Some(cats) = v["categories"].as_object() {
        let parts: Vec<String> = cats.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out(&format!("categories: {}", parts.join(", ")))?;
    }
    for mode in ["padded", "packed"] {
        let w = &v["padding_waste"][mode];
        out(&format!("padding waste ({mode}): {:.1}%", 100.0 * w["waste"].as_f64().unwrap_or(0.0)))?;
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let l = load(&a.src)?;
    let v = inspect_json(&l.data, a.index, &l.tok, l.max_length)?;
    if a.src.json {
        return print_json(&v);
    }
    out(&format!("# record {} ({}), category {}", a.index, v["source"].as_str().unwrap_or(""), v["category"]))?;
    out(&format!(
        "# {} tokens, {} prompt, {} supervised, dropped at max length {}: {}",
        v["length"], v["prompt_tokens"], v["supervised_tokens"], l.max_length, v["dropped"]
    ))?;
    out(v["text"].as_str().unwrap_or(""))?;
    out(&format!("# input_ids {}", v["input_ids"]))?;
    out(&format!("# labels {}", v["labels"]))?;
    Ok(())
}
