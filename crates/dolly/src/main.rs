//! `dolly` command-line front-end: parses flags and dispatches to the library crates. The only place for
//! `anyhow`; holds no model, data or training logic of its own.

use clap::{Parser, Subcommand};

mod adapter_arg;
mod cmd_bench;
mod cmd_bench_gemm;
mod cmd_data;
mod cmd_eval;
mod cmd_generate;
mod cmd_gguf;
mod cmd_merge;
mod cmd_model;
mod cmd_serve;
mod cmd_train;
mod flags;
mod model_arg;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "dolly",
    version,
    about = "Instruction-tune Pythia (GPT-NeoX) on databricks-dolly-15k and answer instructions"
)]
struct Cli {
    /// Worker threads for compute (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a randomly initialised GPT-NeoX model in Hugging Face layout.
    InitModel(cmd_model::InitModelArgs),
    /// Measure training-step time or generation speed.
    #[command(subcommand)]
    Bench(cmd_bench::BenchCommand),
    /// Download databricks-dolly-15k (or another dataset) into the Hugging Face cache.
    CacheDataset(cmd_data::CacheDatasetArgs),
    /// Inspect the training data: statistics and single examples.
    #[command(subcommand)]
    Data(cmd_data::DataCommand),
    /// Fine-tune a GPT-NeoX model on Dolly data (the seed trainer's flags).
    #[command(args_override_self = true)]
    Train(Box<cmd_train::TrainArgs>),
    /// Answer instructions with a Dolly model: one, interactively, or a JSONL batch.
    Generate(cmd_generate::GenerateArgs),
    /// Held-out loss and perplexity per Dolly category, and sample answers per category to JSONL.
    Eval(cmd_eval::EvalArgs),
    /// Serve a Dolly model over an OpenAI-compatible HTTP API.
    Serve(cmd_serve::ServeArgs),
    /// Merge a LoRA adapter into its base model and write a Hugging Face model directory.
    Merge(cmd_merge::MergeArgs),
    /// Write a model as a llama.cpp GGUF file (f32, f16, bf16, q8_0 or q4_k), tokenizer included.
    ExportGguf(cmd_gguf::GgufArgs),
    /// Write a model as a quantized GGUF file (q8_0 or q4_k), quantizing one tensor at a time.
    Quantize(cmd_gguf::GgufArgs),
}

/// mimalloc's `mi_option_purge_delay` (index 15 in both its v2 and v3 option enums).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Never hand freed memory back to the OS: training reallocates the same large buffers every step (gemm's
    // packing buffers among them) and re-faulting them was a large share of a step (see
    // docs/benchmarks.md#training-step-tuning). Peak RSS is unchanged; the memory is reused, not leaked.
    // SAFETY: called first thing in main, before any other thread exists (the call is not thread safe).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global() {
            eprintln!("error: cannot set up {n} threads: {e}");
            std::process::exit(2);
        }
    }
    let result = match cli.command {
        Command::InitModel(a) => cmd_model::run_init(a),
        Command::Bench(c) => cmd_bench::run(c),
        Command::CacheDataset(a) => cmd_data::run_cache(a),
        Command::Data(c) => cmd_data::run(c),
        Command::Train(a) => cmd_train::run(*a, cli.threads),
        Command::Generate(a) => cmd_generate::run(a),
        Command::Eval(a) => cmd_eval::run(a),
        Command::Serve(a) => cmd_serve::run(a),
        Command::Merge(a) => cmd_merge::run(a),
        Command::ExportGguf(a) => cmd_gguf::run_export(a),
        Command::Quantize(a) => cmd_gguf::run_quantize(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
