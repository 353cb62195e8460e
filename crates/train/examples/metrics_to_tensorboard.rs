//! Developer tool: replay a run's `SRC/metrics.jsonl` through `Metrics` (with TensorBoard on) into `DST`, and draw
//! `DST/loss.png` titled with SRC's name; `tools/check_tensorboard.py DST` then compares the events to the jsonl.
//!
//!     cargo run --release -p train --example metrics_to_tensorboard -- SRC DST

use std::path::PathBuf;

fn main() -> Result<(), String> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [src, dst] = args.as_slice() else { return Err("usage: metrics_to_tensorboard SRC_OUT DST_OUT".into()) };
    let rows = train::metrics::read(&src.join("metrics.jsonl")).map_err(|e| e.0)?;
    std::fs::create_dir_all(dst).map_err(|e| format!("creating {}: {e}", dst.display()))?;
    let mut m = train::metrics::Metrics::open_with(dst, None, true).map_err(|e| e.0)?;
    for r in &rows {
        m.write(r).map_err(|e| e.0)?;
    }
    let t = std::time::Instant::now();
    let (lo, hi) = train::plot::plot_loss(dst, &train::plot::run_name(src)).map_err(|e| e.0)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    println!("{} rows -> {}", rows.len(), m.event_file().map(|p| p.display().to_string()).unwrap_or_default());
    println!("loss.png: y {lo:.3} .. {hi:.3}, drawn in {ms:.1} ms");
    Ok(())
}
