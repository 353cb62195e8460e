//! `dolly bench gemm`: GFLOP/s of the three Linear products of training (forward x·Wᵀ, dX = dY·W,
//! dW += dYᵀ·X) on the bf16 product path against the f32 gemm, at the Linear shapes of Pythia presets
//! (hidden -> 3·hidden, hidden -> 4·hidden, 4·hidden -> hidden, and with `--head` the LM head hidden -> vocab),
//! in alternating rounds. With `--lora-rank R`: the LoRA branch's fused rank-R products against gemm plus a
//! separate dropout pass, at the same shapes.

use crate::cmd_model::preset;
use clap::Args;
use neox::kernel_bench::{bf16_path, linear_products, lora_products, Dims};
use serde_json::json;

#[derive(Args)]
pub struct GemmBench {
    /// Presets whose Linear shapes are timed.
    #[arg(long, value_delimiter = ',', default_value = "pythia-70m,pythia-410m")]
    presets: Vec<String>,
    /// Rows of every product (batch x sequence).
    #[arg(long, default_value_t = 1024)]
    rows: usize,
    /// Timed rounds (each: bf16 then f32, then the AVX512_BF16 kernel where bf16 runs on AMX; after one untimed
    /// round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Also time the LM head's products (hidden -> vocab; the step's largest).
    #[arg(long)]
    head: bool,
    /// Time the LoRA branch's products at this rank instead (fused dropout kernel against gemm + a mask pass),
    /// with each preset's Linear input widths.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// Print one JSON object per shape instead of sentences.
    #[arg(long)]
    json: bool,
}

pub fn run(a: GemmBench) -> anyhow::Result<()> {
    anyhow::ensure!(a.rounds > 0 && a.rows > 0, "rounds and rows must be > 0");
    if let Some(r) = a.lora_rank {
        return lora(&a, r);
    }
    let path = bf16_path();
    if !a.json {
        println!(
            "bf16 products on the {path} path, {} threads, median of {} rounds",
            rayon::current_num_threads(),
            a.rounds
        );
    }
    for name in &a.presets {
        let cfg = preset(name)?;
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let head = a.head.then_some((h, cfg.vocab_size));
        for (ic, oc) in [(h, 3 * h), (h, f), (f, h)].into_iter().chain(head) {
            let d = Dims { n: a.rows, ic, oc };
            let times = linear_products(d, a.rounds);
            if a.json {
                let per: Vec<_> = times
                    .iter()
                    .map(|t| {
                        json!({"product": t.product, "bf16_s": t.bf16_s, "f32_s": t.f32_s,
                        "bf16_gflops": t.flops / t.bf16_s / 1e9, "f32_gflops": t.flops / t.f32_s / 1e9,
                        "avx512bf16_s": t.avx512_s, "avx512bf16_gflops": t.avx512_s.map(|s| t.flops / s / 1e9)})
                    })
                    .collect();
                let out = json!({"bench": "gemm", "preset": name, "rows": a.rows, "ic": ic, "oc": oc,
                    "bf16_path": path, "threads": rayon::current_num_threads(), "rounds": a.rounds, "products": per});
                println!("{out}");
            } else {
                for t in &times {
                    let vnni = t.avx512_s.map_or(String::new(), |s| {
                        format!(", avx512bf16 {:6.1} GFLOP/s ({:.2}x)", t.flops / s / 1e9, s / t.bf16_s)
                    });
                    println!(
                        "{name} {:>4} x {ic:>4}->{oc:<5} {:>3}: bf16 {:6.1} GFLOP/s, f32 {:6.1} GFLOP/s ({:.2}x){vnni}",
                        a.rows,
                        t.product,
                        t.flops / t.bf16_s / 1e9,
                        t.flops / t.f32_s / 1e9,
                        t.f32_s / t.bf16_s
                    );
                }
            }
        }
    }
    Ok(())
}

/// `--lora-rank`: the three masked products at each distinct Linear input width of the presets.
fn lora(a: &GemmBench, r: usize) -> anyhow::Result<()> {
    anyhow::ensure!(r > 0 && r <= 1024, "--lora-rank must be in 1..=1024");
    if !a.json {
        println!(
            "LoRA rank-{r} products (dropout 0.05), {} threads, median of {} rounds: fused kernel vs gemm + mask pass",
            rayon::current_num_threads(),
            a.rounds
        );
    }
    for name in &a.presets {
        let cfg = preset(name)?;
        for ic in [cfg.hidden_size, cfg.intermediate_size] {
            for t in lora_products(a.rows, ic, r, a.rounds) {
                let (fused, gemm) = (t.flops / t.fused_s / 1e9, t.flops / t.gemm_s / 1e9);
                if a.json {
                    let out = json!({"bench": "gemm-lora", "preset": name, "rows": a.rows, "ic": ic, "r": r,
                        "product": t.product, "fused_s": t.fused_s, "gemm_s": t.gemm_s, "fused_gflops": fused,
                        "gemm_gflops": gemm, "threads": rayon::current_num_threads(), "rounds": a.rounds});
                    println!("{out}");
                } else {
                    println!(
                        "{name} {:>4} x {ic:>5} {:<16}: fused {:7.3} ms ({fused:6.1} GFLOP/s), gemm + mask {:7.3} ms ({gemm:6.1}): {:.2}x",
                        a.rows,
                        t.product,
                        t.fused_s * 1e3,
                        t.gemm_s * 1e3,
                        t.gemm_s / t.fused_s
                    );
                }
            }
        }
    }
    Ok(())
}
