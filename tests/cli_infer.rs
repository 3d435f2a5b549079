//! `lcasr eval`, `lcasr transcribe` and `lcasr plot` as a user runs them, on
//! a tiny model trained by `lcasr train`: what they print, the files they
//! write, and clean errors for bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lcasr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lcasr"))
        .args(args)
        .current_dir(repo())
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run lcasr")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn all_output(out: &Output) -> String {
    format!("{}{}", stdout(out), String::from_utf8_lossy(&out.stderr))
}

/// Runs lcasr and checks it succeeded; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = lcasr(args);
    assert!(out.status.success(), "{args:?}: {}", all_output(&out));
    stdout(&out)
}

/// Checks that `out` failed with `code` and one `error: ` paragraph (after
/// any warnings) containing `must_contain`, without a panic or source paths.
fn assert_clean_error(out: &Output, code: i32, must_contain: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let after_warnings = stderr
        .lines()
        .skip_while(|l| l.starts_with("warning: "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(after_warnings.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(must_contain), "{stderr}");
    for bad in ["panicked", "internal error", "stack backtrace", "src/"] {
        assert!(!stderr.contains(bad), "{bad:?} in: {stderr}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Trains the one-epoch tiny experiment into `dir/run`; returns the run
/// directory.
fn trained_run(dir: &Path) -> PathBuf {
    let config = common::tiny_experiment(dir, 1);
    let run = dir.join("run");
    ok(&["train", s(&config), "--run-dir", s(&run)]);
    run
}

/// The run's latest weights with the CTC blank's bias pushed far down, saved
/// as a bare safetensors file: a model that emits a token on every frame, so
/// that transcripts have words and subtitles have cues.
fn talkative_weights(run: &Path, out: &Path) -> PathBuf {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let weights = run
        .join("checkpoints")
        .join(latest.trim())
        .join("model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let bias = tensors["decoder.ff.bias"]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut pushed = bias.clone();
    *pushed.last_mut().unwrap() -= 1e4;
    let n = pushed.len();
    tensors.insert(
        "decoder.ff.bias".into(),
        Tensor::from_vec(pushed, n, &Device::Cpu).unwrap(),
    );
    let path = out.join("talkative.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn eval_transcribe_and_plot_a_trained_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = trained_run(dir);
    let manifest = dir.join("data/manifest.json");

    // eval at two contexts, report in the default place: the run directory.
    let table = ok(&["eval", s(&run), s(&manifest), "--context", "1s,full"]);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].contains("WER %"), "{table}");
    assert!(rows[1].trim_start().starts_with("1 s"), "{table}");
    assert!(rows[2].trim_start().starts_with("full"), "{table}");
    let out_dir = run.join("eval-data");
    assert!(
        table.contains(s(&out_dir.join("eval.json"))),
        "the report location is printed: {table}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("eval.json")).unwrap()).unwrap();
    let per_context = report["per_context"].as_array().unwrap();
    assert_eq!(per_context.len(), 2);
    assert_eq!(per_context[0]["context_frames"], 100);
    assert!(per_context[1]["context_frames"].is_null());
    let count = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    for (c, row) in per_context.iter().zip(&rows[1..]) {
        let utts = c["utterances"].as_array().unwrap();
        assert_eq!(utts.len(), 4);
        for key in ["substitutions", "insertions", "deletions", "ref_words"] {
            let sum: u64 = utts.iter().map(|u| count(u, key)).sum();
            assert_eq!(sum, count(c, key), "{key}");
        }
        let errors = count(c, "substitutions") + count(c, "insertions") + count(c, "deletions");
        let words = count(c, "ref_words");
        assert!(words > 0);
        let wer = c["wer"].as_f64().unwrap();
        assert!((wer - errors as f64 / words as f64).abs() < 1e-12);
        // The table row shows the same numbers.
        let cells: Vec<&str> = row.split_whitespace().collect();
        let tail = &cells[cells.len() - 5..];
        assert_eq!(tail[0], format!("{:.2}", wer * 100.0), "{row}");
        let counts = ["substitutions", "insertions", "deletions", "ref_words"]
            .map(|k| count(c, k).to_string());
        assert_eq!(tail[1..], counts, "{row}");
    }
    // Per-utterance alignments: one block per context and utterance, whose
    // S/D/I marks add up to the utterance's counts.
    let alignments = std::fs::read_to_string(out_dir.join("alignments.txt")).unwrap();
    assert_eq!(alignments.matches("== context").count(), 2, "{alignments}");
    let first = &per_context[0]["utterances"][0];
    let block = alignments
        .split("-- ")
        .find(|b| b.starts_with(first["id"].as_str().unwrap()))
        .unwrap();
    let marks = block.lines().rfind(|l| !l.trim().is_empty()).unwrap();
    for (mark, key) in [
        ('S', "substitutions"),
        ('D', "deletions"),
        ('I', "insertions"),
    ] {
        let n = marks.chars().filter(|&c| c == mark).count() as u64;
        assert_eq!(n, count(first, key), "{key} marks in:\n{block}");
    }
    let png = image::open(out_dir.join("wer_vs_context.png")).unwrap();
    assert_eq!(
        (png.width(), png.height()),
        lcasr::run::plot::PLOT_SIZE,
        "chart size"
    );

    // transcribe: text on stdout, JSON and SRT files in --out.
    let weights = talkative_weights(&run, dir);
    let audio = dir.join("src/train-000.mp3");
    let (config, tokenizer) = (run.join("config.yaml"), dir.join("tokenizer.json"));
    let model_args = [
        s(&weights),
        s(&audio),
        "--config",
        s(&config),
        "--tokenizer",
        s(&tokenizer),
    ];
    let text = ok(&[&["transcribe"][..], &model_args].concat());
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(!text.trim().is_empty(), "the model should emit words");

    let outs = dir.join("transcripts");
    let json_out = ok(&[
        &["transcribe"][..],
        &model_args,
        &["--format", "json", "--out", s(&outs), "--context", "2s"],
    ]
    .concat());
    let json_path = outs.join("train-000.json");
    assert_eq!(json_out.trim(), format!("wrote {}", json_path.display()));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let duration = t["duration"].as_f64().unwrap();
    assert!(duration > 1.0, "{duration}");
    let words = t["words"].as_array().unwrap();
    assert!(!words.is_empty());
    let mut last_end = 0.0;
    for w in words {
        let (start, end) = (w["start"].as_f64().unwrap(), w["end"].as_f64().unwrap());
        assert!(
            last_end <= start && start <= end && end <= duration + 0.05,
            "{w}"
        );
        last_end = end;
    }
    let joined: String = words
        .iter()
        .map(|w| w["word"].as_str().unwrap().replace(' ', ""))
        .collect();
    assert_eq!(joined, t["text"].as_str().unwrap().replace(' ', ""));

    ok(&[
        &["transcribe"][..],
        &model_args,
        &["--format", "srt", "--out", s(&outs)],
    ]
    .concat());
    let srt = std::fs::read_to_string(outs.join("train-000.srt")).unwrap();
    let cues: Vec<&str> = srt.trim().split("\n\n").collect();
    assert!(!cues.is_empty());
    for (i, cue) in cues.iter().enumerate() {
        let mut lines = cue.lines();
        assert_eq!(lines.next(), Some((i + 1).to_string().as_str()), "{srt}");
        assert!(lines.next().unwrap().contains(" --> "), "{srt}");
    }

    // plot: charts of the run's metrics.
    let listed = ok(&["plot", s(&run)]);
    let loss = run.join("plots/loss.png");
    assert!(listed.contains(s(&loss)), "{listed}");
    let png = image::open(&loss).unwrap();
    assert_eq!((png.width(), png.height()), lcasr::run::plot::PLOT_SIZE);

    // Log-mel features: refused for a power-mel model, with the way out named;
    // accepted with --log-mel.
    let logmel = dir.join("logmel");
    ok(&[
        "prepare",
        s(&dir.join("src")),
        "--out",
        s(&logmel),
        "--log-mel",
    ]);
    let logmel_manifest = logmel.join("manifest.json");
    assert_clean_error(
        &lcasr(&["eval", s(&run), s(&logmel_manifest), "--context", "full"]),
        1,
        "pass --log-mel",
    );
    let report_dir = dir.join("logmel-report");
    let table = ok(&[
        "eval",
        s(&run),
        s(&logmel_manifest),
        "--context",
        "full",
        "--log-mel",
        "--out",
        s(&report_dir),
    ]);
    assert!(table.contains("full"), "{table}");
    assert_clean_error(
        &lcasr(&[
            "eval",
            s(&run),
            s(&manifest),
            "--context",
            "full",
            "--log-mel",
        ]),
        1,
        "re-run `lcasr prepare` with --log-mel",
    );
    // Training records the data's recipe with every checkpoint, and inference
    // takes it from there: a model trained on log-mel data needs no flag.
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let saved = run
        .join("checkpoints")
        .join(latest.trim())
        .join("features.json");
    assert_eq!(
        std::fs::read_to_string(saved).unwrap(),
        r#"{"recipe":"PowerMel"}"#
    );
    let logmel_run = dir.join("logmel-run");
    ok(&[
        "train",
        s(&dir.join("config.yaml")),
        &format!("data.path={}", s(&logmel_manifest)),
        "--run-dir",
        s(&logmel_run),
    ]);
    let table = ok(&[
        "eval",
        s(&logmel_run),
        s(&logmel_manifest),
        "--context",
        "full",
        "--out",
        s(&dir.join("logmel-run-report")),
    ]);
    assert!(table.contains("full"), "{table}");
    assert_clean_error(
        &lcasr(&["eval", s(&logmel_run), s(&manifest), "--context", "full"]),
        1,
        "re-run `lcasr prepare` with --log-mel",
    );

    // Bad input files: exit 1 with one clean error.
    let missing = dir.join("missing.flac");
    assert_clean_error(
        &lcasr(&["transcribe", s(&run), s(&missing)]),
        1,
        "missing.flac",
    );
    assert_clean_error(
        &lcasr(&["eval", s(&run), s(&dir.join("nothing.json"))]),
        1,
        "nothing.json",
    );
    // Weights without a config: the error says how to give one.
    assert_clean_error(
        &lcasr(&["transcribe", s(&weights), s(&audio)]),
        1,
        "--config",
    );
}

#[test]
fn bad_arguments_give_clean_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("no-such-run");
    let audio = repo().join("data/demo/train/train-000.mp3");
    assert_clean_error(
        &lcasr(&["transcribe", s(&nowhere), s(&audio)]),
        1,
        "no-such-run does not exist",
    );
    assert_clean_error(
        &lcasr(&["eval", s(&nowhere), "manifest.json", "--context", "10s"]),
        1,
        "no-such-run does not exist",
    );
    assert_clean_error(&lcasr(&["plot", s(&nowhere)]), 1, "no-such-run");
    // Usage problems are clap's: exit 2, before any model is loaded.
    assert_clean_error(
        &lcasr(&["eval", s(&nowhere), "m.json", "--context", "10s,ten"]),
        2,
        "bad context length `ten`",
    );
    assert_clean_error(
        &lcasr(&["transcribe", s(&nowhere), s(&audio), "--overlap", "1.5"]),
        2,
        "[0, 1)",
    );
    assert_clean_error(
        &lcasr(&["transcribe", s(&nowhere), s(&audio), "--format", "doc"]),
        2,
        "doc",
    );
    // Two inputs that would overwrite each other's transcript.
    let twin = tmp.path().join("train-000.mp3");
    std::fs::copy(&audio, &twin).unwrap();
    assert_clean_error(
        &lcasr(&[
            "transcribe",
            s(&nowhere),
            s(&audio),
            s(&twin),
            "--format",
            "srt",
        ]),
        1,
        "would both be written to",
    );
}

#[test]
fn report_and_transcript_locations() {
    use lcasr::infer::eval::default_report_dir;
    use lcasr::infer::transcribe::output_paths;

    let tmp = tempfile::tempdir().unwrap();
    // A checkpoint that is not a run directory: the current directory.
    let weights = tmp.path().join("model.safetensors");
    assert_eq!(
        default_report_dir(&weights, Path::new("sets/tedlium/manifest.json")),
        PathBuf::from("eval-tedlium")
    );
    assert_eq!(
        default_report_dir(&weights, Path::new("dev-clean.json")),
        PathBuf::from("eval-dev-clean")
    );
    // A run directory keeps its reports.
    std::fs::create_dir(tmp.path().join("checkpoints")).unwrap();
    assert_eq!(
        default_report_dir(tmp.path(), Path::new("data/manifest.json")),
        tmp.path().join("eval-data")
    );

    let audio = [PathBuf::from("a/talk.v2.flac"), PathBuf::from("b/talk.wav")];
    assert_eq!(
        output_paths(&audio, Path::new("out"), "srt").unwrap(),
        [
            PathBuf::from("out/talk.v2.srt"),
            PathBuf::from("out/talk.srt")
        ]
    );
    let clash = [PathBuf::from("a/talk.flac"), PathBuf::from("b/talk.wav")];
    let err = output_paths(&clash, Path::new("out"), "json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a/talk.flac") && err.contains("b/talk.wav") && err.contains("out/talk.json"),
        "{err}"
    );
}
