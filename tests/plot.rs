//! `lcasr plot` charts: the PNGs written for a synthetic run decode, have the
//! chart size, carry drawn curves and rendered title text.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::RgbImage;
use lcasr::run::plot::{line_chart, plot_run, PLOT_SIZE};
use serde_json::json;

/// Rows from the top of a chart that hold the title and nothing else.
const TITLE_ROWS: u32 = 50;

/// Writes `records` as a metrics.jsonl in `dir`.
fn write_metrics(dir: &Path, records: &[serde_json::Value]) -> PathBuf {
    let path = dir.join("metrics.jsonl");
    let mut text = String::new();
    for r in records {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// A training run of `steps` steps with every key, and a held-out and a dev
/// evaluation every 40 steps.
fn synthetic_run(steps: u64) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    for step in 0..steps {
        let t = step as f64;
        records.push(json!({
            "step": step,
            "loss": 5.0 * (-t / 60.0).exp() + 0.3 * (t * 1.7).sin().abs(),
            "lr": 1e-3 * (t / 20.0).min(1.0),
            "sequence_length": 1024 * (1 + step / 50),
            "batch_size": 4,
            "grad_norm": 2.0 + (t * 0.3).cos(),
            "blank_p": 0.9,
            "epoch": 0,
            "recordings": 4 * (step + 1),
            "audio_hours": 0.01 * t,
        }));
        if step % 40 == 39 {
            records.push(json!({"step": step, "split": "heldout", "wer": 0.9 - t / 400.0}));
            records.push(json!({"step": step, "split": "dev", "wer": 0.8 - t / 500.0}));
        }
    }
    records
}

/// Decodes `path` as an RGB image and checks it is a chart: the chart size,
/// many colours (antialiased text and curves), saturated curve pixels in
/// the plot, and dark text pixels in the title rows.
fn check_chart(path: &Path) -> RgbImage {
    assert!(path.is_file(), "{} was not written", path.display());
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
        .to_rgb8();
    assert_eq!(img.dimensions(), PLOT_SIZE, "{}", path.display());
    let colours: HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(
        colours.len() > 20,
        "{} has only {} colours",
        path.display(),
        colours.len()
    );
    let saturated = img
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0;
            r.max(g).max(b) - r.min(g).min(b) > 100
        })
        .count();
    assert!(saturated > 40, "{}: no series drawn", path.display());
    let title: Vec<[u8; 3]> = (0..TITLE_ROWS)
        .flat_map(|y| (0..img.width()).map(move |x| (x, y)))
        .map(|(x, y)| img.get_pixel(x, y).0)
        .collect();
    let dark = title.iter().filter(|p| p.iter().all(|&c| c < 100)).count();
    assert!(
        dark > 50,
        "{}: no title text in the top {TITLE_ROWS} rows",
        path.display()
    );
    assert!(
        title.contains(&[255, 255, 255]),
        "{}: title area has no background",
        path.display()
    );
    img
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn plots_every_series_of_a_full_run() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = write_metrics(dir.path(), &synthetic_run(200));
    let out = dir.path().join("plots");
    let written = plot_run(&metrics, &out).unwrap();
    assert_eq!(
        names(&written),
        [
            "loss.png",
            "lr.png",
            "sequence_length.png",
            "grad_norm.png",
            "wer.png"
        ]
    );
    for path in &written {
        assert_eq!(path.parent(), Some(out.as_path()));
        check_chart(path);
    }
}

#[test]
fn skips_series_without_points() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = write_metrics(
        dir.path(),
        &[
            json!({"step": 0, "loss": 3.0}),
            json!({"step": 1, "loss": 2.5, "batch_size": 4}),
            json!({"loss": 9.0}),
            json!({"step": 2, "loss": null}),
            json!({"step": 2, "split": "heldout", "wer": 0.5}),
        ],
    );
    let written = plot_run(&metrics, dir.path()).unwrap();
    assert_eq!(names(&written), ["loss.png", "wer.png"]);
    for path in &written {
        check_chart(path);
    }
    assert!(!dir.path().join("lr.png").exists());
}

#[test]
fn empty_metrics_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = write_metrics(dir.path(), &[]);
    let out = dir.path().join("plots");
    let err = format!("{:#}", plot_run(&metrics, &out).unwrap_err());
    assert!(err.contains(&metrics.display().to_string()), "{err}");
    assert!(err.contains("nothing to plot"), "{err}");
    assert!(!out.exists(), "no plot directory for nothing to plot");

    let missing = dir.path().join("absent.jsonl");
    let err = format!("{:#}", plot_run(&missing, &out).unwrap_err());
    assert!(err.contains("absent.jsonl"), "{err}");
}

#[test]
fn line_chart_draws_labelled_series_with_a_legend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wer_vs_context.png");
    let short: Vec<(f64, f64)> = [(1.0, 0.30), (2.0, 0.25), (4.0, 0.22), (8.0, 0.21)].to_vec();
    let long: Vec<(f64, f64)> = [(1.0, 0.35), (2.0, 0.28), (4.0, f64::NAN), (8.0, 0.19)].to_vec();
    line_chart(
        &path,
        "WER against context length",
        "context (minutes)",
        "WER",
        &[("short-context model", short), ("long-context model", long)],
    )
    .unwrap();
    let img = check_chart(&path);
    // Two series in two colours: at least two distinct saturated colours
    // each cover a good number of pixels (lines, markers, legend swatches).
    let mut counts = std::collections::HashMap::new();
    for p in img.pixels() {
        let [r, g, b] = p.0;
        if r.max(g).max(b) - r.min(g).min(b) > 100 {
            *counts.entry(p.0).or_insert(0usize) += 1;
        }
    }
    let strong = counts.values().filter(|&&n| n > 100).count();
    assert!(strong >= 2, "expected two series colours, got {counts:?}");
}

#[test]
fn line_chart_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.png");
    let err = line_chart(&path, "t", "x", "y", &[("a", vec![(1.0, f64::NAN)])]).unwrap_err();
    assert!(err.to_string().contains("empty.png"), "{err}");
    assert!(!path.exists());

    let path = dir.path().join("no/such/dir/chart.png");
    let err = line_chart(&path, "t", "x", "y", &[("a", vec![(1.0, 2.0)])]).unwrap_err();
    assert!(err.to_string().contains("no/such/dir/chart.png"), "{err}");
}
