//! The loss curve as a PNG (`OUT/loss.png`): train loss (blue) and eval loss (orange) against the optimizer
//! step, on a light grid with 5 horizontal and 5 vertical divisions. Deliberately minimal: no text rendering
//! (the numbers are in metrics.jsonl); the y range is printed by the caller. Written atomically.

use crate::error::{io_ctx, Result, TrainError};
use std::path::Path;

const W: usize = 800;
const H: usize = 400;
const PAD: usize = 30;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            self.px[y as usize * W + x as usize] = c;
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
            for dx in -thick / 2..=thick / 2 {
                for dy in -thick / 2..=thick / 2 {
                    self.put(x + dx, y + dy, c);
                }
            }
        }
    }
}

/// Draw `train` and `eval` (step, loss) series; returns the (min, max) loss of the y axis.
pub fn loss_png(path: &Path, train: &[(f64, f64)], eval: &[(f64, f64)]) -> Result<(f64, f64)> {
    let all = train.iter().chain(eval).filter(|p| p.1.is_finite());
    let (mut xmax, mut ymin, mut ymax) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if !ymin.is_finite() {
        return Err(TrainError("no finite losses to plot".into()));
    }
    if ymax - ymin < 1e-9 {
        ymax = ymin + 1.0;
    }
    let mut cv = Canvas { px: vec![[255, 255, 255]; W * H] };
    let (pw, ph) = ((W - 2 * PAD) as f64, (H - 2 * PAD) as f64);
    let to = |x: f64, y: f64| (PAD as f64 + x / xmax * pw, PAD as f64 + (ymax - y) / (ymax - ymin) * ph);
    for k in 0..=5 {
        let f = k as f64 / 5.0;
        let gy = PAD as f64 + f * ph;
        let gx = PAD as f64 + f * pw;
        cv.line((PAD as f64, gy), (PAD as f64 + pw, gy), [225, 225, 225], 1);
        cv.line((gx, PAD as f64), (gx, PAD as f64 + ph), [225, 225, 225], 1);
    }
    cv.line((PAD as f64, PAD as f64 + ph), (PAD as f64 + pw, PAD as f64 + ph), [90, 90, 90], 1);
    cv.line((PAD as f64, PAD as f64), (PAD as f64, PAD as f64 + ph), [90, 90, 90], 1);
    for (series, color) in [(train, [31u8, 119, 180]), (eval, [255, 127, 14])] {
        let pts: Vec<(f64, f64)> = series.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| to(x, y)).collect();
        for w in pts.windows(2) {
            cv.line(w[0], w[1], color, 2);
        }
        for &p in &pts {
            cv.line(p, p, color, 4);
        }
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| TrainError(format!("{}: {e}", path.display())))?;
        let raw: Vec<u8> = cv.px.iter().flatten().copied().collect();
        wr.write_image_data(&raw).map_err(|e| TrainError(format!("{}: {e}", path.display())))?;
    }
    io_ctx(common::atomic_write(path, &bytes), || path.display().to_string())?;
    Ok((ymin, ymax))
}

/// Plot `OUT/metrics.jsonl` into `OUT/loss.png`.
pub fn plot_metrics(out: &Path) -> Result<(f64, f64)> {
    let rows = crate::metrics::read(&out.join("metrics.jsonl"))?;
    let pick = |key: &str| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).collect()
    };
    loss_png(&out.join("loss.png"), &pick("loss"), &pick("eval_loss"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_with_both_series() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l.png");
        let train: Vec<(f64, f64)> = (1..50).map(|s| (s as f64, 3.0 / (s as f64).sqrt())).collect();
        let (lo, hi) = loss_png(&p, &train, &[(10.0, 1.5), (40.0, 1.0)]).unwrap();
        assert!((lo - 3.0 / 49f64.sqrt()).abs() < 1e-12 && hi == 3.0);
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (800, 400));
        let has = |c: [u8; 3]| buf.chunks(3).any(|p| p == c);
        assert!(has([31, 119, 180]) && has([255, 127, 14]));
        assert!(loss_png(&p, &[], &[]).is_err());
    }
}
