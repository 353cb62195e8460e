//! The loss curve as a PNG (`OUT/loss.png`): a title (the run's name), train loss (blue line) and eval loss (orange
//! line with dots) against the optimizer step, tick labels on both axes, axis names and a legend. Drawn with
//! `plotters` into an RGB buffer and encoded with `png`; text uses a font embedded in the binary
//! (`assets/DejaVuSans-subset.ttf`), so it renders on machines without system fonts. Cheap enough (a few
//! milliseconds) to redraw at every logging or eval step; the file is replaced atomically.
//!
//! The y range ignores non-finite losses and is robust to a huge first loss: its top is at most the 90th percentile
//! plus twice its distance to the minimum, and points above it are drawn on the top edge.

use crate::error::{io_ctx, Result, TrainError};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const W: u32 = 900;
const H: u32 = 480;
const FONT: &str = "sans-serif";
const TRAIN_RGB: RGBColor = RGBColor(31, 119, 180);
const EVAL_RGB: RGBColor = RGBColor(255, 127, 14);

/// Registers the embedded font with plotters once per process (plotters looks fonts up by family name).
fn font_ready() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(TrainError("loss plot: the embedded font does not parse".into()))
    }
}

/// The y axis range for these losses (all finite): `[lo, hi]` padded by 5%, `hi` capped as the module doc says.
pub fn y_range(values: &[f64]) -> Option<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let (lo, max) = (v[0], v[v.len() - 1]);
    let q90 = v[((v.len() - 1) as f64 * 0.9).round() as usize];
    let hi = max.min(q90 + 2.0 * (q90 - lo));
    let span = if hi - lo > 1e-9 { hi - lo } else { lo.abs().max(1.0) };
    Some((lo - 0.05 * span, hi + 0.05 * span))
}

fn draw_err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> TrainError + '_ {
    move |e| TrainError(format!("drawing {}: {e:?}", path.display()))
}

/// A y tick label: up to 6 decimals, trailing zeros cut (ticks are round numbers at any scale).
fn tick_label(y: f64) -> String {
    let s = format!("{y:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// Draw `train` and `eval` (step, loss) series into `path`; non-finite points are skipped. Returns the y range.
pub fn loss_png(path: &Path, title: &str, train: &[(f64, f64)], eval: &[(f64, f64)]) -> Result<(f64, f64)> {
    font_ready()?;
    let finite = |s: &[(f64, f64)]| -> Vec<(f64, f64)> {
        s.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect()
    };
    let (train, eval) = (finite(train), finite(eval));
    let ys: Vec<f64> = train.iter().chain(&eval).map(|p| p.1).collect();
    let Some((ylo, yhi)) = y_range(&ys) else {
        return Err(TrainError(format!("{}: no finite losses to plot", path.display())));
    };
    let xmax = train.iter().chain(&eval).map(|p| p.0).fold(1f64, f64::max);
    let clamp = |s: &[(f64, f64)]| -> Vec<(f64, f64)> { s.iter().map(|&(x, y)| (x, y.min(yhi))).collect() };

    let mut rgb = vec![0u8; (W * H * 3) as usize];
    {
        let err = draw_err(path);
        let root = BitMapBackend::with_buffer(&mut rgb, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..xmax, ylo..yhi)
            .map_err(&err)?;
        let int_fmt = |x: &f64| format!("{x:.0}");
        let y_fmt = |y: &f64| tick_label(*y);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .x_labels(10)
            .y_labels(8)
            .x_label_formatter(&int_fmt)
            .y_label_formatter(&y_fmt)
            .axis_desc_style((FONT, 16))
            .label_style((FONT, 13))
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(&err)?;
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(clamp(&train), TRAIN_RGB.stroke_width(2)))
                .map_err(&err)?
                .label("train loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TRAIN_RGB.stroke_width(2)));
        }
        if !eval.is_empty() {
            let pts = clamp(&eval);
            chart.draw_series(LineSeries::new(pts.clone(), EVAL_RGB.stroke_width(2))).map_err(&err)?;
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, EVAL_RGB.filled())))
                .map_err(&err)?
                .label("eval loss")
                .legend(|(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (20, 0)], EVAL_RGB.stroke_width(2))
                        + Circle::new((10, 0), 4, EVAL_RGB.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    let mut bytes = Vec::new();
    {
        let png_err = |e: png::EncodingError| TrainError(format!("{}: {e}", path.display()));
        let mut enc = png::Encoder::new(&mut bytes, W, H);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(png_err)?;
        wr.write_image_data(&rgb).map_err(png_err)?;
    }
    io_ctx(common::atomic_write(path, &bytes), || path.display().to_string())?;
    Ok((ylo, yhi))
}

/// Plot `OUT/metrics.jsonl` into `OUT/loss.png` under `title` (the trainer passes the output dir's name).
/// Returns the y axis range.
pub fn plot_loss(out: &Path, title: &str) -> Result<(f64, f64)> {
    let rows = crate::metrics::read(&out.join("metrics.jsonl"))?;
    let pick = |key: &str| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).collect()
    };
    loss_png(&out.join("loss.png"), title, &pick("loss"), &pick("eval_loss"))
}

/// The name a run is shown under: the output dir's last component (of its absolute path when it has none, e.g. ".").
pub fn run_name(out: &Path) -> String {
    let abs = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dolly".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(p: &Path) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        (info.width, info.height, buf)
    }

    #[test]
    fn draws_both_series_and_text() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l.png");
        let train: Vec<(f64, f64)> = (1..50).map(|s| (s as f64, 3.0 / (s as f64).sqrt())).collect();
        loss_png(&p, "run", &train, &[(10.0, 1.5), (40.0, 1.0)]).unwrap();
        let (w, h, buf) = decode(&p);
        assert_eq!((w, h), (W, H));
        let has = |c: RGBColor| buf.chunks(3).any(|p| p == [c.0, c.1, c.2]);
        assert!(has(TRAIN_RGB) && has(EVAL_RGB));
        // Anti-aliased glyphs leave grey pixels that neither the grid nor the series produce.
        let grey = buf.chunks(3).filter(|p| p[0] == p[1] && p[1] == p[2] && (40..200).contains(&p[0])).count();
        assert!(grey > 500, "no text drawn ({grey} grey pixels)");
        let err = loss_png(&p, "run", &[(1.0, f64::NAN)], &[]).unwrap_err();
        assert!(err.0.contains("no finite losses"), "{err}");
    }

    #[test]
    fn range_skips_nonfinite_and_caps_a_huge_first_loss() {
        let mut v: Vec<f64> = (0..40).map(|i| 4.0 - i as f64 * 0.02).collect();
        v.insert(0, 1e6);
        v.push(f64::NAN);
        v.push(f64::INFINITY);
        let (lo, hi) = y_range(&v).unwrap();
        assert!(lo < 3.22 && lo > 3.1 && hi > 4.0 && hi < 6.0, "{lo} {hi}");
        // An ordinary decaying curve keeps its first point in range.
        let (_, hi) = y_range(&[10.8, 7.0, 6.0, 5.5, 5.2, 5.0, 4.9, 4.8, 4.7, 4.6]).unwrap();
        assert!(hi >= 10.8, "{hi}");
        assert_eq!(y_range(&[f64::NAN]), None);
        let (lo, hi) = y_range(&[2.0, 2.0]).unwrap();
        assert!(lo < 2.0 && hi > 2.0);
    }

    #[test]
    fn tick_labels_drop_trailing_zeros() {
        assert_eq!(tick_label(2.504_000_000_01), "2.504");
        assert_eq!(tick_label(10.0), "10");
        assert_eq!(tick_label(9.5), "9.5");
        assert_eq!(tick_label(-0.000_000_1), "0");
    }

    #[test]
    fn run_name_is_the_dir_name() {
        assert_eq!(run_name(Path::new("/tmp/runs/my-run")), "my-run");
        assert!(!run_name(Path::new(".")).is_empty());
    }
}
