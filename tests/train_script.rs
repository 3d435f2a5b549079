//! scripts/train.rhai end to end on a tiny experiment: the host adds no hidden
//! behaviour (direct Rust calls give bit-identical weights), Ctrl-C saves a
//! checkpoint and says how to resume, and resumed runs (after Ctrl-C or a
//! SIGKILL at any point) log exactly the losses of an uninterrupted run.

mod common;

use common::{lcasr, repo, text, wait_for_records};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use lcasr::config::{self, LoadOptions};
use lcasr::run::metrics::read_metrics;
use serde_json::Value;

fn train(config: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    lcasr(&args).output().unwrap()
}

/// The newest checkpoint's model tensors.
fn final_weights(run: &Path) -> HashMap<String, Tensor> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let path = run
        .join("checkpoints")
        .join(latest.trim())
        .join("model.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The final parameters of the direct-call baseline (lcasr::train::direct).
fn train_directly(config: &Path) -> HashMap<String, Tensor> {
    let cfg = config::load_file(config, &LoadOptions::default())
        .unwrap()
        .config;
    let run = lcasr::train::direct::train(&cfg).unwrap();
    assert!(run.steps > 0 && run.losses.iter().all(|l| l.is_finite()));
    run.model
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

#[test]
fn train_rhai_equals_direct_library_calls() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_experiment(dir.path(), 1);
    let out = train(&config, &[]);
    assert!(out.status.success(), "{}", text(&out));
    // The stage's peak memory, predicted and measured, is printed.
    assert!(
        text(&out).contains("training step predicted"),
        "{}",
        text(&out)
    );
    let scripted = final_weights(&dir.path().join("run"));
    let direct = train_directly(&config);
    assert!(!direct.is_empty());
    for (name, want) in &direct {
        let got = &scripted[name];
        let a = got
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = want
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(a == b, "{name} differs between train.rhai and direct calls");
    }
    // The run directory records what made the run.
    let run = dir.path().join("run");
    for f in [
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "scripts/train.rhai",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let steps = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert!(steps.len() >= 4, "{} records", steps.len());
    assert!(steps
        .iter()
        .all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)));
}

/// (step, loss) of every training record.
fn losses(run: &Path) -> Vec<(u64, String)> {
    read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].to_string()))
        .collect()
}

/// (step, loss, lr) of every record of a metrics file.
fn step_loss_lr(metrics: &Path) -> Vec<(Value, Value, Value)> {
    read_metrics(metrics)
        .unwrap()
        .iter()
        .map(|r| (r["step"].clone(), r["loss"].clone(), r["lr"].clone()))
        .collect()
}

/// Starts a training run in the background.
fn spawn(config: &Path, extra: &[&str]) -> Child {
    let mut args = vec!["train", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    lcasr(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A two-epoch tiny experiment in `dir` run without interruption: its
/// config and its (step, loss) records.
fn uninterrupted_run(dir: &Path) -> (PathBuf, Vec<(u64, String)>) {
    let config = common::tiny_experiment(dir, 2);
    let reference = dir.join("reference");
    let out = train(&config, &["--run-dir", reference.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    (config, losses(&reference))
}

#[test]
fn ctrl_c_checkpoints_and_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (config, want) = uninterrupted_run(dir.path());
    // After 2 records the run stops inside the batch in which the LR warmup
    // ends (resuming must not restart the cosine phase there); after 5, in a
    // later one.
    for stop_after in [2usize, 5] {
        let run = dir.path().join(format!("run{stop_after}"));
        let run_arg = run.to_str().unwrap().to_string();
        let mut child = spawn(&config, &["--run-dir", &run_arg]);
        wait_for_records(
            &mut child,
            &run.join("metrics.jsonl"),
            stop_after,
            Duration::from_secs(600),
        );
        // SAFETY: sending SIGINT to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(130), "{msg}");
        assert!(
            msg.contains("Resume with:") && msg.contains(&format!("--resume {run_arg}")),
            "{msg}"
        );
        assert!(run.join("checkpoints/latest").exists());
        assert!(losses(&run).len() < want.len(), "the run stopped early");

        let out = train(&config, &["--resume", &run_arg]);
        assert!(out.status.success(), "{}", text(&out));
        let got = step_loss_lr(&run.join("metrics.jsonl"));
        let expected = step_loss_lr(&dir.path().join("reference/metrics.jsonl"));
        assert_eq!(
            got, expected,
            "stopped after {stop_after}: resumed records differ"
        );
    }
}

#[test]
fn sigkill_at_any_point_then_resume_matches_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (config, want) = uninterrupted_run(dir.path());
    for (i, kill_after) in [2usize, 7, 11].into_iter().enumerate() {
        let run = dir.path().join(format!("run{i}"));
        let run_arg = run.to_str().unwrap().to_string();
        let mut child = spawn(&config, &["--run-dir", &run_arg]);
        wait_for_records(
            &mut child,
            &run.join("metrics.jsonl"),
            kill_after,
            Duration::from_secs(600),
        );
        // A little later than the record, to land inside other work too
        // (checkpoint writes included) at different points.
        std::thread::sleep(Duration::from_millis(7 * i as u64));
        // SAFETY: killing our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let out = train(&config, &["--resume", &run_arg]);
        if !out.status.success() {
            // Killed before the first checkpoint: nothing to resume, so the
            // run must say so; starting it again gives the same run.
            let msg = text(&out);
            assert!(msg.contains("no valid checkpoint"), "{msg}");
            let out = train(&config, &["--run-dir", &run_arg, "--force"]);
            assert!(out.status.success(), "{}", text(&out));
        }
        assert_eq!(
            losses(&run),
            want,
            "kill after {kill_after} records: losses differ"
        );
    }
}

#[test]
fn a_script_error_after_a_step_saves_the_state_and_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = uninterrupted_run(dir.path());
    let expected = step_loss_lr(&dir.path().join("reference/metrics.jsonl"));
    // train.rhai with a failure injected right after step 4 was logged.
    let source = std::fs::read_to_string(repo().join("scripts/train.rhai")).unwrap();
    let marker = "            bar.message(";
    assert!(source.contains(marker));
    let failing = source.replacen(
        marker,
        &format!("            if opt.steps == 4 {{ throw \"injected failure\"; }}\n{marker}"),
        1,
    );
    let script = dir.path().join("failing.rhai");
    std::fs::write(&script, failing).unwrap();

    let run = dir.path().join("run");
    let run_arg = run.to_str().unwrap();
    let out = train(
        &config,
        &["--run-dir", run_arg, "--script", script.to_str().unwrap()],
    );
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.contains("injected failure"), "{msg}");
    assert!(
        msg.contains("step_000000004") && msg.contains("--resume"),
        "{msg}"
    );

    let out = train(&config, &["--resume", run_arg]);
    assert!(out.status.success(), "{}", text(&out));
    let got = step_loss_lr(&run.join("metrics.jsonl"));
    assert_eq!(got, expected);

    // A failure in the middle of a step (after a forward) leaves no intact
    // state: nothing is saved.
    let mid = source.replacen(
        "        let loss = ctc_loss(out, chunk.targets);",
        "        if opt.steps == 2 { throw \"mid-step failure\"; }\n        let loss = ctc_loss(out, chunk.targets);",
        1,
    );
    let script = dir.path().join("mid.rhai");
    std::fs::write(&script, mid).unwrap();
    let run = dir.path().join("mid-run");
    let out = train(
        &config,
        &[
            "--run-dir",
            run.to_str().unwrap(),
            "--script",
            script.to_str().unwrap(),
        ],
    );
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("mid-step failure") && !msg.contains("was saved"),
        "{msg}"
    );
}
