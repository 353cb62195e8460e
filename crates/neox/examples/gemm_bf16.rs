//! Kernel tuning: GFLOP/s of the bf16 products vs f32 at the training shapes.
use neox::kernel_bench::{bf16_path, linear_products, Dims};

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    println!("bf16 path: {}", bf16_path());
    for (ic, oc) in [(512, 1536), (512, 2048), (2048, 512), (1024, 3072), (1024, 4096), (4096, 1024)] {
        let ts = linear_products(Dims { n: 1024, ic, oc }, rounds);
        for t in ts {
            println!(
                "{ic:>5}->{oc:<5} {:>3}: bf16 {:7.1} GFLOP/s  f32 {:7.1} GFLOP/s  x{:.2}",
                t.product,
                t.flops / t.bf16_s / 1e9,
                t.flops / t.f32_s / 1e9,
                t.f32_s / t.bf16_s
            );
        }
    }
}
