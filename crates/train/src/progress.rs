//! What a person watching a run reads: one plain line per logging step and per evaluation (also when stderr is
//! a pipe or a file, where no bar is drawn), and on a terminal a progress bar of at most 80 columns with the
//! epoch, the running loss and the last eval loss. Lines print above the bar.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    /// Step and wall clock when this process started training (the ETA uses this session's speed only).
    start_step: u64,
    t0: Instant,
}

impl Progress {
    pub fn new(total: u64, start_step: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            let style = ProgressStyle::with_template("{bar:16} {pos}/{len} {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b.set_position(start_step);
            b
        });
        Progress { bar, total, start_step, t0: Instant::now() }
    }

    /// Print a line (above the bar when there is one).
    pub fn line(&self, say: &dyn Fn(&str), text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => say(text),
        }
    }

    /// Move the bar to `step`, showing epoch, loss and the last eval loss (<= 44 columns of message).
    pub fn update(&self, step: u64, epoch: f64, loss: f64, eval: Option<f64>) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            let ev = eval.map(|e| format!(" eval {e:.3}")).unwrap_or_default();
            b.set_message(format!("ep {epoch:.2} loss {loss:.4}{ev}"));
        }
    }

    /// Seconds until `total` at this session's pace so far (None before the first step).
    pub fn eta_s(&self, step: u64) -> Option<f64> {
        let done = step.checked_sub(self.start_step).filter(|&d| d > 0)?;
        let per = self.t0.elapsed().as_secs_f64() / done as f64;
        Some(per * self.total.saturating_sub(step) as f64)
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `1h02m03s`, `2m05s`, `12s`.
pub fn hms(secs: f64) -> String {
    let s = if secs.is_finite() { secs.max(0.0).round() as u64 } else { 0 };
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

/// The numbers of one logging line.
pub struct LogLine {
    pub step: u64,
    pub total: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub eta_s: Option<f64>,
}

impl std::fmt::Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}/{}  epoch {:.2}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {:.0} tok/s  elapsed {}  eta {}",
            self.step,
            self.total,
            self.epoch,
            self.loss,
            self.lr,
            self.grad_norm,
            self.tokens_per_s,
            hms(self.elapsed_s),
            self.eta_s.map(hms).unwrap_or_else(|| "?".into())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_lines_read_plainly() {
        assert_eq!(hms(12.4), "12s");
        assert_eq!(hms(125.0), "2m05s");
        assert_eq!(hms(3723.0), "1h02m03s");
        assert_eq!(hms(f64::NAN), "0s");
        let l = LogLine {
            step: 10,
            total: 300,
            epoch: 0.27,
            loss: 2.34567,
            lr: 1e-3,
            grad_norm: 1.5,
            tokens_per_s: 4567.2,
            elapsed_s: 62.0,
            eta_s: Some(1750.0),
        };
        assert_eq!(
            l.to_string(),
            "step 10/300  epoch 0.27  loss 2.3457  lr 1.00e-3  grad_norm 1.500  4567 tok/s  elapsed 1m02s  eta 29m10s"
        );
    }
}
