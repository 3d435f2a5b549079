//! PNG charts of a run's metrics (`lcasr plot`): one chart per logged series
//! against the training step, and a generic labelled line chart for other
//! commands (WER against context length, for example).
//!
//! Text is drawn with DejaVu Sans compiled into the binary
//! (`assets/fonts/DejaVuSans.ttf`, licence beside it) and registered with
//! plotters on first use, so no system font is ever looked up.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context};
use plotters::coord::Shift;
use plotters::data::float::pretty_print_float;
use plotters::prelude::*;
use plotters::style::register_font;
use serde_json::Value;

use super::metrics::read_metrics;
use super::run_dir::{METRICS_FILE, PLOTS_DIR};

/// Width and height in pixels of every chart written by this module.
pub const PLOT_SIZE: (u32, u32) = (1000, 600);

/// The bundled typeface, registered as plotters' `sans-serif` family.
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Series colours, in order of use (cycled when there are more series).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Lines with at most this many points also get a marker on each point, so
/// that short series (a single evaluation, say) stay visible.
const MARKER_LIMIT: usize = 60;

/// One per-step training series of `metrics.jsonl` and how it is charted.
struct TrainingMetric {
    /// Key of the value in training records.
    key: &'static str,
    /// File name of the chart in the output directory.
    file: &'static str,
    title: &'static str,
    y_label: &'static str,
    /// Draw the raw values as dots with a moving average line over them.
    smoothed: bool,
}

const TRAINING_METRICS: [TrainingMetric; 4] = [
    TrainingMetric {
        key: "loss",
        file: "loss.png",
        title: "Training loss",
        y_label: "loss",
        smoothed: true,
    },
    TrainingMetric {
        key: "lr",
        file: "lr.png",
        title: "Learning rate",
        y_label: "learning rate",
        smoothed: false,
    },
    TrainingMetric {
        key: "sequence_length",
        file: "sequence_length.png",
        title: "Chunk length",
        y_label: "sequence length (frames)",
        smoothed: false,
    },
    TrainingMetric {
        key: "grad_norm",
        file: "grad_norm.png",
        title: "Gradient norm",
        y_label: "gradient norm",
        smoothed: false,
    },
];

/// How a series is drawn.
#[derive(Clone, Copy)]
enum Style {
    /// A connected line (with markers when short).
    Line,
    /// Unconnected small dots, translucent.
    Dots,
}

/// The text of a chart.
struct Labels<'a> {
    title: &'a str,
    x: &'a str,
    y: &'a str,
    /// Draw a legend naming each series.
    legend: bool,
}

/// One named series of a chart.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    style: Style,
    color: RGBColor,
}

/// Writes PNG charts of the metrics file `metrics` into `out_dir` (created if
/// missing): `loss.png` (raw values and a moving average), `lr.png`,
/// `sequence_length.png`, `grad_norm.png` from training records, and
/// `wer.png` with one line per evaluation set, all against `step`. A series
/// with no values is skipped, as is a record without a numeric `step`.
/// Returns the files written, in that order.
///
/// Training records are those without a `split` key; WER values are taken
/// from any record with a numeric `wer`, grouped by its `split` name.
///
/// A metrics file with nothing to chart (empty, say) is an error naming the
/// file, and no directory is created for it.
pub fn plot_run(metrics: &Path, out_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let records = read_metrics(metrics)?;
    // (file name, text, series) of each chart with something to show
    let mut charts: Vec<(&str, Labels, Vec<Series>)> = Vec::new();
    for metric in &TRAINING_METRICS {
        let points = training_points(&records, metric.key);
        if points.is_empty() {
            continue;
        }
        let series = if metric.smoothed {
            smoothed_series(metric.key, points)
        } else {
            vec![Series {
                name: metric.key.to_string(),
                points,
                style: Style::Line,
                color: PALETTE[0],
            }]
        };
        let labels = Labels {
            title: metric.title,
            x: "step",
            y: metric.y_label,
            legend: series.len() > 1,
        };
        charts.push((metric.file, labels, series));
    }
    let wer = wer_series(&records);
    if !wer.is_empty() {
        let labels = Labels {
            title: "Word error rate",
            x: "step",
            y: "WER",
            legend: true,
        };
        charts.push(("wer.png", labels, wer));
    }
    if charts.is_empty() {
        bail!(
            "{}: nothing to plot (no record has a step with loss, lr, sequence_length, grad_norm or wer)",
            metrics.display()
        );
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create plot directory {}", out_dir.display()))?;
    let mut written = Vec::with_capacity(charts.len());
    for (file, labels, series) in charts {
        let path = out_dir.join(file);
        draw_chart(&path, &labels, &series)?;
        written.push(path);
    }
    Ok(written)
}

/// `lcasr plot`: charts the metrics of the run directory `run` into its
/// `plots/` folder with [`plot_run`]; returns the files written.
pub fn plot_run_dir(run: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !run.is_dir() {
        bail!(
            "run directory not found: {} is not a directory",
            run.display()
        );
    }
    let metrics = run.join(METRICS_FILE);
    if !metrics.is_file() {
        bail!(
            "{}: not a run directory, or a run that has logged nothing yet: {METRICS_FILE} is missing",
            run.display()
        );
    }
    plot_run(&metrics, &run.join(PLOTS_DIR))
}

/// Writes a PNG line chart of `series` (name, points) to `path`, with a
/// title, both axes labelled and a legend naming each series. Points whose
/// coordinates are not finite are left out; an error naming `path` is
/// returned if no point is left, or if the file cannot be written (its
/// directory must exist).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let series: Vec<Series> = series
        .iter()
        .zip(PALETTE.iter().cycle())
        .map(|((name, points), &color)| Series {
            name: name.to_string(),
            points: points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
            style: Style::Line,
            color,
        })
        .collect();
    let labels = Labels {
        title,
        x: x_label,
        y: y_label,
        legend: true,
    };
    draw_chart(path, &labels, &series)
}

/// `(step, value)` of every training record (no `split` key) holding a finite
/// number under `key`.
fn training_points(records: &[Value], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter(|r| r.get("split").is_none())
        .filter_map(|r| point(r, key))
        .collect()
}

/// The WER series, one per evaluation set name (`wer` when a record has no
/// string `split`), in name order.
fn wer_series(records: &[Value]) -> Vec<Series> {
    let mut sets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for record in records {
        if let Some(p) = point(record, "wer") {
            let name = record.get("split").and_then(Value::as_str).unwrap_or("wer");
            sets.entry(name.to_string()).or_default().push(p);
        }
    }
    sets.into_iter()
        .zip(PALETTE.iter().cycle())
        .map(|((name, points), &color)| Series {
            name,
            points,
            style: Style::Line,
            color,
        })
        .collect()
}

/// `(step, record[key])` when both are finite numbers.
fn point(record: &Value, key: &str) -> Option<(f64, f64)> {
    let step = record.get("step")?.as_f64()?;
    let value = record.get(key)?.as_f64()?;
    (step.is_finite() && value.is_finite()).then_some((step, value))
}

/// The raw points as dots plus a trailing moving average over a window of
/// about a twentieth of the points.
fn smoothed_series(name: &str, points: Vec<(f64, f64)>) -> Vec<Series> {
    let window = (points.len() / 20).clamp(1, 500);
    let average = moving_average(&points, window);
    vec![
        Series {
            name: name.to_string(),
            points,
            style: Style::Dots,
            color: PALETTE[0],
        },
        Series {
            name: format!("moving average ({window} points)"),
            points: average,
            style: Style::Line,
            color: PALETTE[1],
        },
    ]
}

/// Each point's y replaced by the mean of the last `window` y values up to
/// and including it (fewer at the start).
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

/// Registers the bundled font as `sans-serif`, once per process.
fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font(FontFamily::SansSerif.as_str(), FontStyle::Normal, FONT).is_ok()
    });
    if !ok {
        bail!("the bundled font assets/fonts/DejaVuSans.ttf is not a valid font");
    }
    Ok(())
}

/// Draws `series` into a PNG at `path`.
fn draw_chart(path: &Path, labels: &Labels, series: &[Series]) -> anyhow::Result<()> {
    ensure_font()?;
    let (x, y) = bounds(series.iter().flat_map(|s| s.points.iter().copied()))
        .ok_or_else(|| anyhow!("{}: no points to plot", path.display()))?;
    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    render(&root, labels, axis(x, 0.0), axis(y, 0.05), series)
        .and_then(|()| root.present())
        .map_err(|e| anyhow!("cannot draw plot {}: {e}", path.display()))
}

/// Lays out the chart on `root` and draws the series and legend.
fn render<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    labels: &Labels,
    x: Range<f64>,
    y: Range<f64>,
    series: &[Series],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(labels.title, (FontFamily::SansSerif, 28))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(90)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(labels.x)
        .y_desc(labels.y)
        .x_label_formatter(&|v| pretty_print_float(*v, false))
        .y_label_formatter(&|v| pretty_print_float(*v, false))
        .label_style((FontFamily::SansSerif, 15))
        .axis_desc_style((FontFamily::SansSerif, 18))
        .draw()?;
    for s in series {
        let color = s.color;
        let annotation = match s.style {
            Style::Line => {
                if s.points.len() <= MARKER_LIMIT {
                    chart
                        .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
                }
                chart.draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))?
            }
            Style::Dots => chart.draw_series(
                s.points
                    .iter()
                    .map(|&p| Circle::new(p, 2, color.mix(0.45).filled())),
            )?,
        };
        annotation.label(s.name.as_str()).legend(move |(lx, ly)| {
            PathElement::new(vec![(lx, ly), (lx + 24, ly)], color.stroke_width(3))
        });
    }
    if !labels.legend {
        return Ok(());
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FontFamily::SansSerif, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
}

/// `(min, max)` of the x coordinates and of the y coordinates.
type Bounds = ((f64, f64), (f64, f64));

/// The bounds of `points`, or `None` when there are none.
fn bounds(points: impl Iterator<Item = (f64, f64)>) -> Option<Bounds> {
    points.fold(None, |acc, (x, y)| match acc {
        None => Some(((x, x), (y, y))),
        Some(((x0, x1), (y0, y1))) => Some(((x0.min(x), x1.max(x)), (y0.min(y), y1.max(y)))),
    })
}

/// An axis range covering `lo..hi` with `pad` of its width added on each
/// side; a single value gets a range around it.
fn axis((lo, hi): (f64, f64), pad: f64) -> Range<f64> {
    let width = hi - lo;
    if width > f64::EPSILON * hi.abs().max(lo.abs()).max(1.0) {
        (lo - pad * width)..(hi + pad * width)
    } else {
        let half = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - half)..(hi + half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_uses_a_trailing_window() {
        let points: Vec<(f64, f64)> = [4.0, 2.0, 6.0, 0.0]
            .iter()
            .enumerate()
            .map(|(i, &y)| (i as f64, y))
            .collect();
        let ys: Vec<f64> = moving_average(&points, 2).iter().map(|p| p.1).collect();
        assert_eq!(ys, vec![4.0, 3.0, 4.0, 3.0]);
        let xs: Vec<f64> = moving_average(&points, 3).iter().map(|p| p.0).collect();
        assert_eq!(xs, vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn axis_pads_and_widens_a_single_value() {
        assert_eq!(axis((0.0, 10.0), 0.05), -0.5..10.5);
        assert_eq!(axis((0.0, 10.0), 0.0), 0.0..10.0);
        assert_eq!(axis((5.0, 5.0), 0.0), 4.5..5.5);
        assert_eq!(axis((0.0, 0.0), 0.05), -1.0..1.0);
    }
}
