//! `lcasr eval`: corpus WER of a model on a prepared manifest at one or more
//! context lengths (the paper's protocol, reference §9.1 and §9.4): long-form
//! posteriors per recording, greedy CTC decoding (blank = last class), both
//! texts through the English normaliser, and corpus WER = Σ errors / Σ
//! reference words. The report is printed as a table and written as JSON with
//! a chart of WER against context length.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::Serialize;

use super::load::LoadedModel;
use super::longform::{log_probs_with_progress, ContextOptions, LongformMode};
use crate::audio::features::{FeatureRecipe, HOP_LENGTH, SAMPLE_RATE};
use crate::config::DtypeName;
use crate::data::dataset::read_whole_features;
use crate::data::manifest::{Manifest, Recording};
use crate::decode::greedy::greedy;
use crate::fsutil::write_atomic;
use crate::run::plot::line_chart;
use crate::run::run_dir::CHECKPOINTS_DIR;
use crate::text::normalize::normalize_english;
use crate::text::wer::{count_text_errors, ErrorCounts};

/// Feature frames per second of audio.
const FRAMES_PER_SECOND: usize = SAMPLE_RATE as usize / HOP_LENGTH;

/// One recording scored at one context.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UttResult {
    /// The recording's id.
    pub id: String,
    /// The normalised reference.
    pub reference: String,
    /// The normalised hypothesis.
    pub hypothesis: String,
    /// Its WER; `None` when the normalised reference has no words.
    pub wer: Option<f64>,
    /// Substituted reference words.
    pub substitutions: usize,
    /// Inserted hypothesis words.
    pub insertions: usize,
    /// Deleted reference words.
    pub deletions: usize,
    /// Reference words.
    pub ref_words: usize,
}

/// The corpus scored at one context.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContextResult {
    /// Window length in input frames; `None` for the whole recording.
    pub context_frames: Option<usize>,
    /// The same in seconds.
    pub context_seconds: Option<f64>,
    /// Overlap of consecutive windows, as a fraction of the window.
    pub overlap: f64,
    /// How windows were merged.
    pub mode: LongformMode,
    /// The compute dtype of the forward.
    pub dtype: DtypeName,
    /// Corpus WER: Σ errors / Σ reference words (a fraction, not a percentage).
    pub wer: f64,
    /// Σ substitutions.
    pub substitutions: usize,
    /// Σ insertions.
    pub insertions: usize,
    /// Σ deletions.
    pub deletions: usize,
    /// Σ reference words.
    pub ref_words: usize,
    /// Every recording, in manifest order.
    pub utterances: Vec<UttResult>,
}

/// The result of [`evaluate`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    /// The model's weights file.
    pub model: PathBuf,
    /// The manifest scored.
    pub manifest: PathBuf,
    /// Duration in seconds of the manifest's longest recording: the context
    /// that `full` amounts to.
    pub longest_recording: f64,
    /// One result per requested context, in request order.
    pub per_context: Vec<ContextResult>,
}

impl EvalReport {
    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("an eval report always serialises")
    }
}

/// Scores `model` on the recordings of `manifest` (a `lcasr prepare`
/// manifest; features are read from its cache) at every context of
/// `contexts`. With `progress`, a progress bar goes to stderr.
pub fn evaluate(
    model: &LoadedModel,
    manifest: &Path,
    contexts: &[ContextOptions],
    progress: bool,
) -> Result<EvalReport> {
    if contexts.is_empty() {
        bail!("no context lengths to evaluate");
    }
    let tokenizer = model.require_tokenizer()?;
    let recordings = Manifest::load(manifest)?.recordings;
    if recordings.is_empty() {
        bail!("{}: the manifest has no recordings", manifest.display());
    }
    let references: Vec<String> = recordings
        .iter()
        .map(|r| normalize_english(&reference_text(r)))
        .collect();
    if references
        .iter()
        .all(|r| r.split_whitespace().next().is_none())
    {
        bail!(
            "{}: the references have no words after normalisation: nothing to score",
            manifest.display()
        );
    }
    let bar = progress_bar(progress, &recordings, contexts.len());
    let mut utterances: Vec<Vec<UttResult>> = vec![Vec::new(); contexts.len()];
    let mut done_frames = 0u64;
    for (rec, reference) in recordings.iter().zip(&references) {
        let features = load_checked(&rec.features, model.recipe)
            .with_context(|| format!("recording `{}` of {}", rec.id, manifest.display()))?;
        let frames = features.dim(1)? as u64;
        for (ctx, out) in contexts.iter().zip(&mut utterances) {
            bar.set_message(format!("{} at {}", rec.id, format_context(ctx.window)));
            let lp = log_probs_with_progress(&model.encoder, &features, ctx, &|done, total| {
                bar.set_position(done_frames + frames * done as u64 / total.max(1) as u64);
            })
            .with_context(|| format!("recording `{}`", rec.id))?;
            done_frames += frames;
            let (n, classes) = lp.dims2()?;
            let ids = greedy(
                &lp.flatten_all()?.to_vec1::<f32>()?,
                n,
                classes,
                model.blank(),
            );
            let hypothesis = normalize_english(&tokenizer.decode(&ids));
            let counts = count_text_errors(reference, &hypothesis);
            out.push(utt_result(&rec.id, reference, hypothesis, counts));
        }
    }
    bar.finish_and_clear();
    let per_context = contexts
        .iter()
        .zip(utterances)
        .map(|(ctx, utts)| context_result(ctx, utts))
        .collect();
    Ok(EvalReport {
        model: model.source.clone(),
        manifest: manifest.to_path_buf(),
        longest_recording: recordings.iter().map(|r| r.duration).fold(0.0, f64::max),
        per_context,
    })
}

/// A recording's cached features, refused when `prepare` recorded a
/// different recipe than the model's (a power-mel model fed log-mel
/// features decodes garbage without any other sign).
fn load_checked(path: &Path, expected: FeatureRecipe) -> Result<Tensor> {
    let (features, recipe) = read_whole_features(path)?;
    match recipe {
        Some(found) if found != expected => bail!(
            "{}: features were prepared as {} but the model takes {}: {}",
            path.display(),
            recipe_name(found),
            recipe_name(expected),
            match expected {
                FeatureRecipe::PowerMel =>
                    "pass --log-mel if the model was trained on log-mel features, or re-run \
                     `lcasr prepare` without --log-mel",
                FeatureRecipe::LogMel =>
                    "re-run `lcasr prepare` with --log-mel (the model's recipe comes from \
                     --log-mel or from its checkpoint)",
            }
        ),
        _ => Ok(features),
    }
}

/// A recipe as the CLI names it.
fn recipe_name(recipe: FeatureRecipe) -> &'static str {
    match recipe {
        FeatureRecipe::PowerMel => "power-mel (the reference's)",
        FeatureRecipe::LogMel => "log-mel (--log-mel)",
    }
}

/// A recording's transcript: its text, or its timed words joined by spaces.
fn reference_text(rec: &Recording) -> String {
    match (&rec.text, &rec.words) {
        (Some(t), _) if !t.trim().is_empty() => t.clone(),
        (_, Some(words)) => words
            .iter()
            .map(|w| w.word.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// A bar over all input frames times contexts, or a hidden one.
fn progress_bar(show: bool, recordings: &[Recording], contexts: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let frames: f64 = recordings.iter().map(|r| r.duration).sum::<f64>()
        * FRAMES_PER_SECOND as f64
        * contexts as f64;
    indicatif::ProgressBar::new(frames as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {percent}% {msg}, {eta} left")
            .expect("valid template"),
    )
}

fn utt_result(id: &str, reference: &str, hypothesis: String, c: ErrorCounts) -> UttResult {
    UttResult {
        id: id.to_string(),
        reference: reference.to_string(),
        hypothesis,
        wer: c.wer(),
        substitutions: c.substitutions,
        insertions: c.insertions,
        deletions: c.deletions,
        ref_words: c.reference_words(),
    }
}

fn context_result(ctx: &ContextOptions, utterances: Vec<UttResult>) -> ContextResult {
    let sum = |f: fn(&UttResult) -> usize| utterances.iter().map(f).sum::<usize>();
    let (substitutions, insertions, deletions, ref_words) = (
        sum(|u| u.substitutions),
        sum(|u| u.insertions),
        sum(|u| u.deletions),
        sum(|u| u.ref_words),
    );
    let errors = substitutions + insertions + deletions;
    ContextResult {
        context_frames: ctx.window,
        context_seconds: ctx.window.map(|f| f as f64 / FRAMES_PER_SECOND as f64),
        overlap: ctx.overlap,
        mode: ctx.mode,
        dtype: ctx.dtype,
        wer: errors as f64 / ref_words.max(1) as f64,
        substitutions,
        insertions,
        deletions,
        ref_words,
        utterances,
    }
}

/// Parses a context length into input frames: `10s`, `80s`, `1.5m`, `20m`,
/// `20min`, `1h` (units of 10 ms frames: 100 per second), a plain frame count
/// such as `1024`, or `full` (`None`: the whole recording).
pub fn parse_context(s: &str) -> Result<Option<usize>> {
    let text = s.trim().to_ascii_lowercase();
    let bad = || {
        anyhow::anyhow!(
            "bad context length `{s}`: expected a duration such as 10s, 20m or 1h, a number of \
             10 ms frames such as 1024, or `full`"
        )
    };
    if text == "full" {
        return Ok(None);
    }
    const UNITS: [(&str, f64); 4] = [("min", 60.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)];
    let frames = match UNITS.iter().find(|(u, _)| text.ends_with(u)) {
        Some((unit, seconds)) => {
            let value: f64 = text[..text.len() - unit.len()]
                .trim()
                .parse()
                .map_err(|_| bad())?;
            if !value.is_finite() || value <= 0.0 {
                return Err(bad());
            }
            (value * seconds * FRAMES_PER_SECOND as f64).round() as usize
        }
        None => text.parse::<usize>().map_err(|_| bad())?,
    };
    if frames == 0 {
        bail!("context length `{s}` is shorter than one 10 ms frame");
    }
    Ok(Some(frames))
}

/// A context length for people: `full`, or seconds (`10.24 s`, `3600 s`).
pub fn format_context(frames: Option<usize>) -> String {
    match frames {
        None => "full".into(),
        Some(f) => {
            let seconds = format!("{:.2}", f as f64 / FRAMES_PER_SECOND as f64);
            let seconds = seconds.trim_end_matches('0').trim_end_matches('.');
            format!("{seconds} s")
        }
    }
}

/// The report as a table, one row per context (like the paper's table):
/// context in seconds, frames, WER %, and the error counts.
pub fn format_table(report: &EvalReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>10} {:>8} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "context", "frames", "WER %", "sub", "ins", "del", "words"
    );
    for c in &report.per_context {
        let frames = c
            .context_frames
            .map(|f| f.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:>10} {:>8} {:>7.2} {:>7} {:>7} {:>7} {:>8}",
            format_context(c.context_frames),
            frames,
            c.wer * 100.0,
            c.substitutions,
            c.insertions,
            c.deletions,
            c.ref_words
        );
    }
    out
}

/// File name of the JSON report that [`write_report`] writes.
pub const REPORT_FILE: &str = "eval.json";
/// File name of the per-utterance word alignments that [`write_report`] writes.
pub const ALIGNMENTS_FILE: &str = "alignments.txt";
/// File name of the chart of WER against context that [`write_report`] writes.
pub const PLOT_FILE: &str = "wer_vs_context.png";

/// Where `lcasr eval` writes its report unless told: `eval-<name>`, inside
/// `checkpoint` when it is a run directory (it has a `checkpoints/` folder),
/// otherwise in the current directory. `<name>` is the manifest's file stem,
/// or its folder's name for a file called `manifest.json`.
pub fn default_report_dir(checkpoint: &Path, manifest: &Path) -> PathBuf {
    let stem = manifest
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "manifest".into());
    let name = match manifest.parent().and_then(Path::file_name) {
        Some(folder) if stem == "manifest" => folder.to_string_lossy().into_owned(),
        _ => stem,
    };
    let dir = format!("eval-{name}");
    if checkpoint.join(CHECKPOINTS_DIR).is_dir() {
        checkpoint.join(dir)
    } else {
        PathBuf::from(dir)
    }
}

/// Writes the report as [`REPORT_FILE`] and its chart as [`PLOT_FILE`] into
/// `dir` (created if missing; earlier files are replaced). Returns the two
/// paths, JSON first.
pub fn write_report(report: &EvalReport, dir: &Path) -> Result<[PathBuf; 3]> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))?;
    let json = dir.join(REPORT_FILE);
    write_atomic(&json, format!("{}\n", report.to_json()).as_bytes())?;
    let png = dir.join(PLOT_FILE);
    plot_wer_vs_context(report, &png)?;
    let txt = dir.join(ALIGNMENTS_FILE);
    write_atomic(&txt, format_alignments(report).as_bytes())?;
    Ok([json, png, txt])
}

/// Largest reference x hypothesis word product aligned in the report (the
/// alignment needs one byte per word pair: 64 MB here).
const MAX_ALIGNMENT_CELLS: usize = 64 << 20;

/// Per-utterance word alignments of every context: `REF:`/`HYP:` lines with
/// `S`/`D`/`I` marks under the errors (normalised texts, as scored).
/// Utterances too long to align in bounded memory say so instead.
pub fn format_alignments(report: &EvalReport) -> String {
    let mut out = String::new();
    for c in &report.per_context {
        out.push_str(&format!(
            "== context {} ({:.2} % WER)\n",
            format_context(c.context_frames),
            c.wer * 100.0
        ));
        for u in &c.utterances {
            let hyp_words = u.hypothesis.split_whitespace().count();
            out.push_str(&format!(
                "-- {} (S {} D {} I {} of {} words)\n",
                u.id, u.substitutions, u.deletions, u.insertions, u.ref_words
            ));
            if (u.ref_words + 1).saturating_mul(hyp_words + 1) > MAX_ALIGNMENT_CELLS {
                out.push_str("(too long to align here)\n");
            } else {
                out.push_str(&crate::text::wer::align(&u.reference, &u.hypothesis).report());
                out.push('\n');
            }
        }
    }
    out
}

/// Draws corpus WER (%) against context length (seconds) as a PNG at `path`
/// (its directory must exist): one line per long-form setting (merge mode and
/// overlap) of the windowed contexts. Whole-recording results sit at the
/// longest recording's duration, the context they amount to, on every line.
pub fn plot_wer_vs_context(report: &EvalReport, path: &Path) -> Result<()> {
    let full: Vec<(f64, f64)> = report
        .per_context
        .iter()
        .filter(|c| c.context_seconds.is_none())
        .map(|c| (report.longest_recording, c.wer * 100.0))
        .collect();
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for c in &report.per_context {
        let Some(seconds) = c.context_seconds else {
            continue;
        };
        let name = format!("{}, overlap {}", mode_name(c.mode), c.overlap);
        let point = (seconds, c.wer * 100.0);
        match lines.iter_mut().find(|(n, _)| *n == name) {
            Some((_, points)) => points.push(point),
            None => lines.push((name, vec![point])),
        }
    }
    if lines.is_empty() {
        lines.push(("whole recording".into(), Vec::new()));
    }
    for (_, points) in &mut lines {
        points.extend_from_slice(&full);
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let x_label = if full.is_empty() {
        "context (s)".to_string()
    } else {
        format!(
            "context (s); full = the longest recording, {}",
            format_context(Some(
                (report.longest_recording * FRAMES_PER_SECOND as f64).round() as usize
            ))
        )
    };
    let series: Vec<(&str, Vec<(f64, f64)>)> = lines
        .iter()
        .map(|(name, points)| (name.as_str(), points.clone()))
        .collect();
    line_chart(
        path,
        "Word error rate against context length",
        &x_label,
        "WER (%)",
        &series,
    )
}

/// The reference's name of a long-form mode.
fn mode_name(mode: LongformMode) -> &'static str {
    match mode {
        LongformMode::AveragedMovingWindow => "averaged_moving_window",
        LongformMode::Buffered => "buffered",
    }
}
