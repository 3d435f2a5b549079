//! The example experiments of scripts/examples/ run briefly on a tiny
//! experiment, each checked for what it exists to show: the LR follows the
//! tri-stage closure, the curriculum grows the chunk length only on plateaus
//! and resumes exactly after Ctrl-C, intermediate CTC logs the weighted sum of
//! its two losses, fine-tuning leaves the frozen subsampling untouched, and
//! evaluation scores every recording as `lcasr eval` does.
//!
//! Examples whose constants must differ for a short run (or that name a
//! model to start from) are copied into the test's folder with those
//! constants replaced, as a user would copy and edit them.

mod common;

use common::{lcasr, repo, text};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use lcasr::config::{self, LoadOptions};
use lcasr::run::metrics::read_metrics;
use serde_json::Value;

/// The path of example `name` in the repository.
fn example(name: &str) -> PathBuf {
    repo().join("scripts/examples").join(format!("{name}.rhai"))
}

/// `lcasr run <script> --config <config> [extra...]`, to its end.
fn run_script(script: &Path, config: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        script.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lcasr(&args).output().unwrap()
}

/// Runs `script` into the run directory `run`; panics with the output when
/// it fails.
fn run_ok(script: &Path, config: &Path, run: &Path, extra: &[&str]) -> String {
    let mut args = extra.to_vec();
    args.extend_from_slice(&["--run-dir", run.to_str().unwrap()]);
    let out = run_script(script, config, &args);
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

/// The `const NAME = value;` lines of a script: name → value text.
fn constants(script: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(script)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("const ")?;
            let (name, value) = rest.split_once('=')?;
            let value = value.split_once(';')?.0;
            Some((name.trim().to_string(), value.trim().to_string()))
        })
        .collect()
}

fn constant_f64(consts: &HashMap<String, String>, name: &str) -> f64 {
    consts[name]
        .parse()
        .unwrap_or_else(|e| panic!("const {name} = {}: {e}", consts[name]))
}

/// Copies example `name` and the shared `lib/` into `dir`, with each
/// `(NAME, value)` replacing the value of `const NAME`; returns the copy.
fn edited_example(name: &str, dir: &Path, replace: &[(&str, &str)]) -> PathBuf {
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    for entry in std::fs::read_dir(repo().join("scripts/examples/lib")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, lib.join(path.file_name().unwrap())).unwrap();
    }
    let consts = constants(&example(name));
    let mut script = std::fs::read_to_string(example(name)).unwrap();
    for (key, value) in replace {
        let old = format!("const {key} = {};", consts[*key]);
        assert!(script.contains(&old), "{name}.rhai has no `{old}`");
        script = script.replacen(&old, &format!("const {key} = {value};"), 1);
    }
    let path = dir.join(format!("{name}.rhai"));
    std::fs::write(&path, script).unwrap();
    path
}

/// The records of optimizer steps (those with a loss) in a run's metrics.
fn steps(run: &Path) -> Vec<Value> {
    read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.get("loss").is_some())
        .collect()
}

fn num(record: &Value, key: &str) -> f64 {
    record[key]
        .as_f64()
        .unwrap_or_else(|| panic!("record without a number `{key}`: {record}"))
}

/// The model tensors of a run's newest checkpoint.
fn latest_weights(run: &Path) -> HashMap<String, Tensor> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let path = run
        .join("checkpoints")
        .join(latest.trim())
        .join("model.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Trains a tiny model for one epoch with `lcasr train` into `dir/run`;
/// returns the config.
fn pretrained(dir: &Path) -> PathBuf {
    let config = common::tiny_experiment(dir, 1);
    let out = lcasr(&["train", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    config
}

#[test]
fn lr_schedule_steps_at_the_tri_stage_closures_lr() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_experiment(dir.path(), 2);
    let run = dir.path().join("run");
    // The training recordings double as the held-out set.
    let heldout = format!(
        "data.eval_path={}",
        dir.path().join("data/manifest.json").display()
    );
    let out = run_ok(&example("lr_schedule"), &config, &run, &[&heldout]);
    assert!(out.contains("held-out WER"), "{out}");
    let logged = read_metrics(&run.join("metrics.jsonl")).unwrap();
    let wer = logged.last().unwrap();
    assert_eq!(wer["split"], "heldout", "{wer}");
    assert!(
        num(wer, "wer").is_finite() && num(wer, "wer") >= 0.0,
        "{wer}"
    );

    let consts = constants(&example("lr_schedule"));
    let warmup = constant_f64(&consts, "WARMUP");
    let hold = constant_f64(&consts, "HOLD");
    let init = constant_f64(&consts, "INIT_SCALE");
    let last = constant_f64(&consts, "FINAL_SCALE");
    let cfg = config::load_file(&config, &LoadOptions::default())
        .unwrap()
        .config;
    let peak = cfg.optimizer.args.lr.unwrap();
    let tri_stage = |p: f64| {
        if p < warmup {
            peak * (init + (1.0 - init) * p / warmup)
        } else if p < warmup + hold {
            peak
        } else {
            peak * last.powf((p - warmup - hold) / (1.0 - warmup - hold))
        }
    };

    let records = steps(&run);
    assert!(records.len() >= 8, "{} steps", records.len());
    let mut stages = [0; 3];
    let mut previous = 0.0;
    for r in &records {
        let (p, lr) = (num(r, "progress"), num(r, "lr"));
        assert!(p > previous && p <= 1.0, "progress {p} after {previous}");
        previous = p;
        let want = tri_stage(p);
        assert!(
            (lr - want).abs() <= 1e-12 * peak,
            "step {}: lr {lr}, the closure gives {want} at progress {p}",
            r["step"]
        );
        stages[if p < warmup {
            0
        } else if p < warmup + hold {
            1
        } else {
            2
        }] += 1;
    }
    assert!(stages.iter().all(|&n| n > 0), "steps per stage {stages:?}");
    assert_eq!(previous, 1.0, "the run ends at progress 1");
    let final_lr = num(records.last().unwrap(), "lr");
    assert!((final_lr - peak * last).abs() <= 1e-12 * peak, "{final_lr}");
}

/// (step, loss, chunk length, moving average, steps without improvement)
/// of every step, as logged.
fn curriculum_trace(run: &Path) -> Vec<String> {
    steps(run)
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {}",
                r["step"],
                r["loss"],
                r["sequence_length"],
                r["loss_ema"],
                r["steps_without_improvement"]
            )
        })
        .collect()
}

#[test]
fn curriculum_doubles_the_chunk_length_on_plateaus_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_experiment(dir.path(), 2);
    // Short chunks (many steps per batch, so that Ctrl-C lands inside one),
    // a short patience and a large required improvement so that the tiny run
    // plateaus, and a cap that is not a power-of-two multiple of the start.
    let (patience, max_chunk) = (2u64, 1500u64);
    let overrides = ["audio_chunking.size=500"];
    let script = edited_example(
        "curriculum",
        &dir.path().join("experiment"),
        &[
            ("PATIENCE", &patience.to_string()),
            ("MIN_IMPROVEMENT", "0.5"),
            ("MAX_CHUNK", &max_chunk.to_string()),
        ],
    );
    let reference = dir.path().join("reference");
    run_ok(&script, &config, &reference, &overrides);

    let records = steps(&reference);
    let len = |r: &Value| r["sequence_length"].as_u64().unwrap();
    assert_eq!(len(&records[0]), 500, "starts at audio_chunking.size");
    let mut growths = 0;
    for pair in records.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let batch_ended = before["recordings"] != after["recordings"];
        let plateaued = before["steps_without_improvement"].as_u64().unwrap() >= patience;
        let grows = batch_ended && plateaued && len(before) < max_chunk;
        if grows {
            growths += 1;
            assert_eq!(len(after), (2 * len(before)).min(max_chunk), "{after}");
            assert_eq!(after["steps_without_improvement"], 0, "{after}");
        } else {
            assert_eq!(len(after), len(before), "grew without a plateau: {after}");
        }
    }
    assert!(growths >= 2, "{growths} growths");
    assert_eq!(len(records.last().unwrap()), max_chunk);

    // Ctrl-C, then resume: the same steps, losses and curriculum decisions.
    let want = curriculum_trace(&reference);
    let run = dir.path().join("run");
    let mut args = vec![
        "run",
        script.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ];
    args.extend_from_slice(&overrides);
    let out = common::interrupt_after_records(
        &args,
        &run.join("metrics.jsonl"),
        3,
        Duration::from_secs(300),
    );
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(curriculum_trace(&run).len() < want.len(), "stopped early");
    let mut args = overrides.to_vec();
    args.extend_from_slice(&["--resume", run.to_str().unwrap()]);
    let out = run_script(&script, &config, &args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(curriculum_trace(&run), want);
}

#[test]
fn intermediate_ctc_logs_the_weighted_sum_of_both_losses() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_experiment(dir.path(), 1);
    let script = example("intermediate_ctc");

    // One block has no middle to score.
    let out = run_script(
        &script,
        &config,
        &["--run-dir", dir.path().join("one").to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("at least 2 blocks (model.n_layers is 1)"),
        "{}",
        text(&out)
    );

    let run = dir.path().join("run");
    // With SpecAugment from the start, to run that path too.
    let overrides = [
        "model.n_layers=2",
        "spec_augment.n_time_masks=2",
        "training.start_spec_augment_after_n_epochs=0",
    ];
    run_ok(&script, &config, &run, &overrides);
    let weight = constant_f64(&constants(&script), "INTER_WEIGHT");
    let records = steps(&run);
    assert!(records.len() >= 4, "{} steps", records.len());
    for r in &records {
        let (total, last, inter) = (num(r, "loss"), num(r, "ctc_final"), num(r, "ctc_inter"));
        assert!(last.is_finite() && last > 0.0, "{r}");
        assert!(inter.is_finite() && inter > 0.0, "{r}");
        let sum = (1.0 - weight) * last + weight * inter;
        assert!((total - sum).abs() <= 1e-4 * total, "{r}: expected {sum}");
        assert_eq!(r["inter_layer"], 0, "the middle of two blocks");
    }
    // The two heads see different layers, so their losses differ.
    assert!(records
        .iter()
        .any(|r| (num(r, "ctc_final") - num(r, "ctc_inter")).abs() > 1e-3));
}

#[test]
fn finetune_leaves_the_frozen_subsampling_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let config = pretrained(dir.path());
    let original = dir.path().join("run");
    let script = example("finetune");
    let set = format!("pretrained={}", original.display());
    // A config whose model section is not the pretrained model's is refused
    // (this run's checkpoints would otherwise describe the wrong model).
    let wrong = dir.path().join("wrong");
    let out = run_script(
        &script,
        &config,
        &[
            "model.d_model=48",
            "--run-dir",
            wrong.to_str().unwrap(),
            "--set",
            &set,
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("model section does not describe"),
        "{}",
        text(&out)
    );

    let tuned = dir.path().join("tuned");
    let out = run_ok(&script, &config, &tuned, &["--set", &set]);
    assert!(out.contains("frozen tensors are unchanged"), "{out}");
    assert!(steps(&tuned).len() >= 4);

    let before = latest_weights(&original);
    let after = latest_weights(&tuned);
    assert_eq!(
        before.keys().collect::<std::collections::BTreeSet<_>>(),
        after.keys().collect()
    );
    let mut frozen = 0;
    for (name, t) in &before {
        let same = values(t) == values(&after[name]);
        if name.starts_with("subsampling.") {
            assert!(same, "frozen {name} changed");
            frozen += 1;
        } else if name.starts_with("layers.") || name.starts_with("decoder.ff.") {
            assert!(!same, "{name} did not train");
        }
    }
    assert!(frozen >= 4, "{frozen} subsampling tensors");
}

#[test]
fn evaluate_scores_every_recording_as_lcasr_eval_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = pretrained(dir.path());
    let model = dir.path().join("run");
    let script = example("evaluate");
    let eval_run = dir.path().join("eval");
    let set = format!("model={}", model.display());
    let out = run_ok(&script, &config, &eval_run, &["--set", &set]);
    // The argument is recorded with the run.
    let record = std::fs::read_to_string(eval_run.join("manifest.json")).unwrap();
    assert!(
        record.contains(&format!("\"model\": \"{}\"", model.display())),
        "{record}"
    );
    assert!(
        !eval_run.join("checkpoints/latest").exists(),
        "no checkpoints"
    );

    // The reference: `lcasr eval` on the same model and manifest.
    let manifest = dir.path().join("data/manifest.json");
    let eval = lcasr(&["eval", model.to_str().unwrap(), manifest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", text(&eval));
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("eval-data/eval.json")).unwrap())
            .unwrap();
    let full = &report["per_context"][0];
    let utterances = full["utterances"].as_array().unwrap();
    assert_eq!(utterances.len(), 4);
    for u in utterances {
        let id = u["id"].as_str().unwrap();
        let line = format!(
            "{id}: WER {:.1}% ({} words:",
            u["wer"].as_f64().unwrap() * 100.0,
            u["ref_words"]
        );
        assert!(out.contains(&line), "no `{line}` in\n{out}");
        let hyp = format!("{id}: ");
        let block = &out[out.find(&hyp).unwrap()..];
        let printed = block.lines().nth(2).unwrap();
        assert_eq!(
            printed.trim_end(),
            format!("  HYP: {}", u["hypothesis"].as_str().unwrap()).trim_end()
        );
    }
    let corpus = format!(
        "corpus WER {:.1}% ({} words: {} sub, {} del, {} ins) over 4 recordings",
        full["wer"].as_f64().unwrap() * 100.0,
        full["ref_words"],
        full["substitutions"],
        full["deletions"],
        full["insertions"]
    );
    assert!(out.contains(&corpus), "no `{corpus}` in\n{out}");
    let logged = read_metrics(&eval_run.join("metrics.jsonl")).unwrap();
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0]["split"], "eval");
    assert_eq!(logged[0]["words"], full["ref_words"]);
    assert_eq!(logged[0]["deletions"], full["deletions"]);
}
