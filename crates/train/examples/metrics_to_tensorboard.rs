//! Developer tool: replay a run's `SRC/metrics.jsonl` through `Metrics` (with TensorBoard on) into `DST`, and draw
//! `DST/loss.png` titled with SRC's name; `tools/check_tensorboard.py DST` then compares the events to the jsonl.
//! With RESUME_STEP it then acts out a resume: reopens DST as if resuming from a checkpoint at that step and replays
//! the later rows again, so DST ends with two event files (the first cut back to RESUME_STEP) telling one run.
//!
//!     cargo run --release -p train --example metrics_to_tensorboard -- SRC DST [RESUME_STEP]

use std::path::PathBuf;

fn main() -> Result<(), String> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let usage = "usage: metrics_to_tensorboard SRC_OUT DST_OUT [RESUME_STEP]";
    let (src, dst, resume) = match args.as_slice() {
        [s, d] => (s, d, None),
        [s, d, r] => (s, d, Some(r.to_string_lossy().parse::<u64>().map_err(|e| format!("RESUME_STEP: {e}"))?)),
        _ => return Err(usage.into()),
    };
    let rows = train::metrics::read(&src.join("metrics.jsonl")).map_err(|e| e.0)?;
    std::fs::create_dir_all(dst).map_err(|e| format!("creating {}: {e}", dst.display()))?;
    let mut m = train::metrics::Metrics::open(dst, None, true).map_err(|e| e.0)?;
    for r in &rows {
        m.write(r).map_err(|e| e.0)?;
    }
    if let Some(s) = resume {
        drop(m);
        m = train::metrics::Metrics::open(dst, Some(s), true).map_err(|e| e.0)?;
        for r in rows.iter().filter(|r| r.get("step").and_then(|x| x.as_u64()).is_some_and(|st| st > s)) {
            m.write(r).map_err(|e| e.0)?;
        }
    }
    let t = std::time::Instant::now();
    let (lo, hi) = train::plot::plot_loss(dst, &train::plot::run_name(src)).map_err(|e| e.0)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    println!("{} rows -> {}", rows.len(), m.event_file().map(|p| p.display().to_string()).unwrap_or_default());
    println!("loss.png: y {lo:.3} .. {hi:.3}, drawn in {ms:.1} ms");
    Ok(())
}
