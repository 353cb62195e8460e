//! Benchmark of the data target (issue 3): read, template, tokenize, filter and split all of databricks-dolly-15k
//! with the real 20B tokenizer, timing each phase; prints one JSON line. Not a test: timings never gate CI.
//! Usage: cargo run --release -p data --example bench_prepare [-- DATASET.jsonl TOKENIZER.json [MAX_LEN]]

use data::{prepare_examples, BadRecordPolicy, DollyTokenizer, PrepareOptions, TestSize};
use std::path::PathBuf;
use std::time::Instant;

// The same allocator as the `dolly` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shared = test_support::shared_file;
    let dataset = args.first().map(PathBuf::from).unwrap_or_else(|| shared("databricks-dolly-15k.jsonl"));
    let tokenizer = args.get(1).map(PathBuf::from).unwrap_or_else(|| shared("20B_tokenizer.json"));
    let max_length: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let run = || -> Result<(), data::DataError> {
        let t0 = Instant::now();
        let tok = DollyTokenizer::from_file(&tokenizer)?;
        let t_tok = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let (records, report) = data::record::read_path(&dataset, BadRecordPolicy::Fail)?;
        let t_read = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let opts = PrepareOptions { max_length, seed: 42, test_size: TestSize::Count(1000), dedup: false };
        let p = prepare_examples(&records, &tok, &opts)?;
        let t_prep = t2.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "records": records.len(), "skipped_bad": report.skipped_count(), "dropped": p.report.dropped,
                "kept": p.report.kept, "train": p.report.train, "test": p.report.test,
                "threads": rayon::current_num_threads(),
                "load_tokenizer_s": t_tok, "read_s": t_read, "template_tokenize_filter_split_s": t_prep,
                "read_to_split_s": t_read + t_prep, "total_s": t0.elapsed().as_secs_f64(),
            })
        );
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
