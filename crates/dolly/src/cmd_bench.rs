//! `dolly bench train|generate`: time our engine on a Pythia-shaped random model and print one JSON object
//! (median step time / tokens per second, peak RSS). `tools/bench_torch.py` runs PyTorch on the same shapes and
//! this command in one invocation and prints the ratios.

use crate::cmd_model::preset;
use clap::{Args, Subcommand};
use common::Rng;
use neox::{clip_coef, Activations, AdamW, AdamWConfig, BatchInput, Model, OwnedBatch};
use serde_json::json;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// One full training step (forward, backward, clip, AdamW) on random tokens.
    Train(TrainBench),
    /// Batch greedy decoding with the KV cache.
    Generate(GenBench),
    /// The Linear products alone: the bf16 product path against the f32 gemm at Pythia training shapes.
    Gemm(crate::cmd_bench_gemm::GemmBench),
}

#[derive(Args)]
pub struct TrainBench {
    #[arg(long, default_value = "pythia-70m")]
    preset: String,
    #[arg(long, alias = "batch", default_value_t = 4)]
    batch_size: usize,
    #[arg(long, alias = "seq", default_value_t = 256)]
    seq_len: usize,
    /// Timed steps (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Recompute activations per layer in the backward (gradient checkpointing).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Pack each row with documents of this many tokens (per-document attention and positions, as
    /// `--packing true` trains); 0 = one document per row.
    #[arg(long, default_value_t = 0)]
    doc_len: usize,
    /// bf16 mixed precision (bf16 product operands, f32 accumulation and master weights), as `--bf16 true`
    /// trains.
    #[arg(long)]
    bf16: bool,
    /// A LoRA step of this rank (alpha 2r, dropout 0.05, all-linear, Dolly's three token rows) on a frozen base,
    /// held in bf16 with --bf16, as `dolly train --lora-r` trains.
    #[arg(long)]
    lora_r: Option<usize>,
    /// With `--bf16`: multiply on the f32 gemm even where the CPU has AVX512_BF16 (the path other CPUs take).
    #[arg(long)]
    no_bf16_kernel: bool,
    /// With `--lora-r` and `--bf16` on an AMX CPU: pack the frozen weights in every product, as `dolly train` does
    /// where the packed copy (4 bytes per weight) would not fit; by default they are packed once when it fits.
    #[arg(long)]
    no_packed_weights: bool,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GenBench {
    #[arg(long, default_value = "pythia-70m")]
    preset: String,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Decode with bfloat16 weight copies (half the memory traffic per token).
    #[arg(long)]
    bf16: bool,
    /// Benchmark this model instead of a random --preset: a model directory or a .gguf file (its own weights
    /// and types; --quantize applies to float ones).
    #[arg(long, value_name = "PATH")]
    model: Option<String>,
    /// Quantize the model's weight matrices (q8_0 or q4_k) and decode with the int8 kernels.
    #[arg(long, value_name = "TYPE", value_parser = crate::flags::parse_quant)]
    quantize: Option<neox::QuantType>,
    #[arg(long)]
    json: bool,
}

/// Peak resident set size of this process in MiB (Linux VmHWM), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub fn run(c: BenchCommand) -> anyhow::Result<()> {
    match c {
        BenchCommand::Train(a) => train(a),
        BenchCommand::Generate(a) => generate(a),
        BenchCommand::Gemm(a) => crate::cmd_bench_gemm::run(a),
    }
}

fn train(a: TrainBench) -> anyhow::Result<()> {
    anyhow::ensure!(a.steps > 0 && a.batch_size > 0 && a.seq_len > 1, "steps, batch size and seq len must be > 0");
    let cfg = preset(&a.preset)?;
    let model_cfg = cfg.clone();
    // a LoRA step on a frozen base: held in bf16 with --bf16 (as `dolly train --lora-r --bf16 true` holds it)
    let mut model = match (a.lora_r, a.bf16) {
        (Some(_), true) => Model::new_random_bf16(cfg, 0),
        _ => Model::new_random(cfg, 0),
    };
    if let Some(r) = a.lora_r {
        let token_rows = [50277, 50278, 50279].into_iter().filter(|&id| id < model_cfg.vocab_size as u32).collect();
        let targets = neox::lora::Target::ALL.to_vec();
        let lora =
            neox::lora::LoraConfig { r, alpha: 2.0 * r as f64, dropout: 0.05, targets, rslora: false, token_rows };
        model.attach_lora(lora, neox::LoraInit::Seed(0))?;
    }
    model.set_compute_bf16(a.bf16);
    model.backend_mut().set_bf16_kernel(!a.no_bf16_kernel);
    // the frozen weights packed once, as `dolly train` does where it fits (half the available memory here)
    let packed =
        if a.lora_r.is_some() && a.bf16 && !a.no_packed_weights { Model::packed_weight_bytes(&model_cfg) } else { 0 };
    let packed = if common::sysmem::available_bytes().is_some_and(|m| packed as u64 <= m / 2) { packed } else { 0 };
    model.set_packed_weights(packed > 0);
    // which products ran: the AVX512_BF16 kernel, or the f32 gemm (on bf16 values with --bf16)
    let products = model.backend().product_path();
    let (b, t, v) = (a.batch_size, a.seq_len, model_cfg.vocab_size);
    let mut r = Rng::new(1);
    let ids: Vec<u32> = (0..b * t).map(|_| r.below(v as u64) as u32).collect();
    let mut batch = OwnedBatch::dense(b, t, ids.clone(), ids.iter().map(|&x| x as i32).collect());
    // packed rows: document k of a row covers tokens k*doc_len.., positions restart per document
    let docs: Option<Vec<u32>> = (a.doc_len > 0).then(|| (0..b * t).map(|i| ((i % t) / a.doc_len) as u32).collect());
    if a.doc_len > 0 {
        batch.position_ids = (0..b * t).map(|i| ((i % t) % a.doc_len) as u32).collect();
    }
    let view = || BatchInput { doc_ids: docs.as_deref(), ..batch.view() };
    let mut acts = Activations::new(&model_cfg, b, t, a.gradient_checkpointing);
    let mut grads = model.new_grads();
    let mut opt = AdamW::new(AdamWConfig::default(), model.grad_len());
    let count = view().target_count();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        // the training loop's step: forward/backward, norm, fused clip + AdamW + zero (gradients start at zero)
        if a.lora_r.is_some() {
            model.set_dropout_seed(Some(step as u64));
        }
        let (sum, n) = model.forward_backward(&view(), &mut acts, &mut grads, 1.0 / count as f32)?;
        let coef = clip_coef(model.grad_norm(&grads), 1.0);
        model.adamw_step(&mut opt, &mut grads, 1e-5, coef);
        let dt = t0.elapsed().as_secs_f64();
        losses.push(sum / n as f64);
        if step >= a.warmup {
            times.push(dt);
        }
    }
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let med = median(&mut times);
    let out = json!({
        "bench": "train", "engine": "dolly", "preset": a.preset, "batch_size": b, "seq_len": t,
        "threads": rayon::current_num_threads(), "gradient_checkpointing": a.gradient_checkpointing, "doc_len": a.doc_len, "bf16": a.bf16, "lora_r": a.lora_r, "trainable": model.grad_len(), "products": products, "packed_weights_mb": packed as f64 / 1048576.0,
        "steps": a.steps, "median_step_s": med, "min_step_s": min, "tokens_per_s": (b * t) as f64 / med,
        "loss_first": losses[0], "loss_last": losses[losses.len() - 1], "peak_rss_mb": peak_rss_mb(),
        "activation_mb": acts.bytes() as f64 / (1 << 20) as f64,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "train step {} b{}x{}{}: median {:.3} s/step, {:.0} tokens/s, activations {:.0} MiB, peak RSS {:.0} MiB",
            a.preset,
            b,
            t,
            match (a.bf16, products) {
                (false, _) => " f32".to_string(),
                (true, "f32") => " bf16 (products on the f32 gemm)".to_string(),
                (true, p) => format!(" bf16 (products on the {p} kernel)"),
            },
            med,
            (b * t) as f64 / med,
            acts.bytes() as f64 / (1 << 20) as f64,
            peak_rss_mb().unwrap_or(0.0)
        );
    }
    Ok(())
}

fn generate(a: GenBench) -> anyhow::Result<()> {
    anyhow::ensure!(a.runs > 0 && a.new_tokens > 0 && a.prompt_len > 0, "runs, tokens and prompt len must be > 0");
    let mut model = match &a.model {
        Some(m) if crate::model_arg::is_gguf(m) => Model::load_gguf(std::path::Path::new(m))?.0,
        Some(m) => crate::model_arg::load(&crate::model_arg::resolve(m)?)?,
        None => Model::new_random(preset(&a.preset)?, 0),
    };
    if let Some(q) = a.quantize.filter(|_| model.quantized().is_none()) {
        model = model.into_quantized(q)?;
    }
    let quantize = model.quantized();
    let file_bf16 = model.decode_bf16();
    model.set_decode_bf16(a.bf16 || file_bf16);
    // what a server builds at start (bf16 panels, the transposed copy long prompts use): not part of a token's time
    model.prepare_decode();
    let v = model.config.vocab_size;
    let mut r = Rng::new(2);
    let prompts: Vec<Vec<u32>> =
        (0..a.batch_size).map(|_| (0..a.prompt_len).map(|_| r.below(v as u64) as u32).collect()).collect();
    let mut tps = Vec::new();
    let mut ttft = Vec::new();
    for _ in 0..a.runs {
        let t0 = Instant::now();
        neox::generate::greedy(&model, &prompts, 1)?;
        ttft.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let out = neox::generate::greedy(&model, &prompts, a.new_tokens)?;
        let dt = t0.elapsed().as_secs_f64();
        tps.push(out.iter().map(|o| o.len()).sum::<usize>() as f64 / dt);
    }
    let out = json!({
        "bench": "generate", "engine": "dolly", "preset": a.preset, "batch_size": a.batch_size,
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "threads": rayon::current_num_threads(),
        "runs": a.runs, "decode_bf16": a.bf16, "model": a.model, "quantize": quantize.map(|q| q.name()), "int8_path": quantize.map(|_| neox::kernel_bench::q8_path()), "tokens_per_s": median(&mut tps), "ttft_s": median(&mut ttft), "peak_rss_mb": peak_rss_mb(),
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "generate {}{}: {:.1} tokens/s, time to first token {:.4} s",
            a.model.as_deref().unwrap_or(&a.preset),
            quantize.map(|q| format!(" {} ({} kernel)", q.name(), neox::kernel_bench::q8_path())).unwrap_or_default(),
            out["tokens_per_s"],
            out["ttft_s"]
        );
    }
    Ok(())
}
