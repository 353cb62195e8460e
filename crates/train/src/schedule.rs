//! Learning-rate schedules as pure functions of the optimizer step (0-based: the lr used for update `step`).
//! Linear follows HF `get_linear_schedule_with_warmup`; warmup-log follows DeepSpeed `WarmupLR` with its default
//! log warmup: `lr = min + (max - min) * ln(step + 1) / ln(warmup)` for step < warmup, then max.

use crate::config::LrScheduler;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: LrScheduler,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn lr_at(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        match self.kind {
            LrScheduler::Linear => {
                if step < w {
                    self.lr * step as f64 / w.max(1) as f64
                } else {
                    let rest = self.total_steps.saturating_sub(w).max(1) as f64;
                    self.lr * (self.total_steps.saturating_sub(step) as f64 / rest).max(0.0)
                }
            }
            LrScheduler::Constant => {
                if step < w {
                    self.lr * step as f64 / w.max(1) as f64
                } else {
                    self.lr
                }
            }
            LrScheduler::WarmupLog => {
                if step < w {
                    let frac = ((step + 1) as f64).ln() / (w.max(2) as f64).ln();
                    self.min_lr + (self.lr - self.min_lr) * frac
                } else {
                    self.lr
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: LrScheduler, w: u64, t: u64) -> Schedule {
        Schedule { kind, lr: 1.0, min_lr: 0.0, warmup_steps: w, total_steps: t }
    }

    #[test]
    fn linear_matches_hf_formula() {
        // HF: step < w: step / max(1, w); else max(0, (T - step) / max(1, T - w)).
        let x = s(LrScheduler::Linear, 10, 110);
        assert_eq!(x.lr_at(0), 0.0);
        assert_eq!(x.lr_at(5), 0.5);
        assert_eq!(x.lr_at(10), 1.0);
        assert_eq!(x.lr_at(60), 0.5);
        assert_eq!(x.lr_at(110), 0.0);
        let nw = s(LrScheduler::Linear, 0, 4);
        assert_eq!([nw.lr_at(0), nw.lr_at(1), nw.lr_at(3)], [1.0, 0.75, 0.25]);
    }

    #[test]
    fn warmup_log_matches_deepspeed() {
        // DeepSpeed WarmupLR: gamma = log(step + 1) * (1 / log(warmup_num_steps)).
        let x = s(LrScheduler::WarmupLog, 50, 1000);
        assert_eq!(x.lr_at(0), 0.0);
        assert!((x.lr_at(9) - (10f64).ln() / (50f64).ln()).abs() < 1e-12);
        assert_eq!(x.lr_at(50), 1.0);
        assert_eq!(x.lr_at(999), 1.0);
        assert_eq!(s(LrScheduler::Constant, 0, 10).lr_at(7), 1.0);
    }
}
