//! Data-parallel ranks as processes (`lcasr train --ranks N --processes`):
//! rank 0 in the launching process, the others as `lcasr rank-worker`
//! processes exchanging over loopback TCP. They train the same bits as
//! threads do (the sums are the same, in the same order, and each rank
//! computes with its share of the cores either way), Ctrl-C stops every
//! process at the same step and the run resumes exactly, and a failing rank
//! ends the run with its own error instead of leaving the others waiting.

mod common;

use common::{lcasr, text};

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use lcasr::run::metrics::read_metrics;
use serde_json::Value;

/// Dropout off and batches of 3 of the 4 recordings (uneven shards), as in
/// tests/data_parallel_script.rs.
const OVERRIDES: [&str; 4] = [
    "model.dropout_ff=0",
    "model.dropout_attn=0",
    "model.dropout_conv=0",
    "training.batch_size=3",
];

/// `lcasr train` arguments of the tiny experiment into `run` with `ranks`
/// ranks as processes.
fn process_args<'a>(config: &'a Path, run: &'a Path, ranks: &'a str) -> Vec<&'a str> {
    let mut args = vec!["train", config.to_str().unwrap()];
    args.extend_from_slice(&OVERRIDES);
    args.extend_from_slice(&["--run-dir", run.to_str().unwrap(), "--ranks", ranks]);
    args.push("--processes");
    args
}

fn train(config: &Path, run: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", config.to_str().unwrap()];
    args.extend_from_slice(&OVERRIDES);
    args.extend_from_slice(&["--run-dir", run.to_str().unwrap()]);
    args.extend_from_slice(extra);
    lcasr(&args).output().unwrap()
}

/// The newest checkpoint's model tensors, by name, as f32 values.
fn final_values(run: &Path) -> Vec<(String, Vec<f32>)> {
    let name = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let path: PathBuf = run.join("checkpoints").join(name.trim());
    let tensors: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(path.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut values: Vec<(String, Vec<f32>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), common::to_f32_vec(t)))
        .collect();
    values.sort_by(|a, b| a.0.cmp(&b.0));
    values
}

/// Every record of a run, without its wall-clock fields.
fn records(run: &Path) -> Vec<Value> {
    read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|mut r| {
            if let Some(m) = r.as_object_mut() {
                m.retain(|k, _| !k.contains("time") && !k.contains("per_s") && k != "elapsed_s");
            }
            r
        })
        .collect()
}

fn assert_same_bits(got: &Path, want: &Path, what: &str) {
    let (a, b) = (final_values(got), final_values(want));
    assert_eq!(a.len(), b.len(), "{what}");
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let same = x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{what}: {name} differs");
    }
}

#[test]
fn processes_train_the_bits_threads_train_and_resume_after_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_experiment(dir.path(), 2);
    let threads = dir.path().join("threads");
    let out = train(&config, &threads, &["--ranks", "3"]);
    assert!(out.status.success(), "{}", text(&out));

    let procs = dir.path().join("procs");
    let out = train(&config, &procs, &["--ranks", "3", "--processes"]);
    let msg = text(&out);
    assert!(out.status.success(), "{msg}");
    // Rank 0 alone speaks.
    assert_eq!(msg.matches("trained ").count(), 1, "{msg}");
    assert_same_bits(&procs, &threads, "3 processes vs 3 threads");
    let want = records(&threads);
    assert!(want.len() >= 4, "{} records", want.len());
    assert_eq!(records(&procs), want, "records");
    assert_eq!(
        common::entry_names(&procs),
        common::entry_names(&threads),
        "the same run directory"
    );

    // Ctrl-C (to the launcher only) stops every rank at the same step; the
    // run resumes as processes and ends where the thread run ended.
    let run = dir.path().join("run");
    let args = process_args(&config, &run, "3");
    let out = common::interrupt_after_records(
        &args,
        &run.join("metrics.jsonl"),
        2,
        Duration::from_secs(600),
    );
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(130), "{msg}");
    assert!(msg.contains("Resume with:"), "{msg}");
    let stopped = records(&run);
    assert!(stopped.len() < want.len(), "the run stopped early");
    assert_eq!(stopped, want[..stopped.len()], "records before the stop");
    let mut args = vec!["train", config.to_str().unwrap()];
    args.extend_from_slice(&OVERRIDES);
    args.extend_from_slice(&["--resume", run.to_str().unwrap(), "--processes"]);
    let out = lcasr(&args).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(records(&run), want, "resumed records");
    assert_same_bits(&run, &threads, "resumed processes vs threads");
}

#[test]
fn a_failing_worker_ends_the_run_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_experiment(dir.path(), 1);
    let script = common::failing_train_script(dir.path());
    let out = train(
        &config,
        &dir.path().join("run"),
        &[
            "--ranks",
            "2",
            "--processes",
            "--script",
            script.to_str().unwrap(),
        ],
    );
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("rank 1 of 2 failed") && msg.contains("no items here"),
        "{msg}"
    );
}

/// Processes whose environment carries `LCASR_TEST_TAG=tag` and whose
/// command line is a rank worker's.
fn tagged_workers(tag: &str) -> Vec<u32> {
    let needle = format!("LCASR_TEST_TAG={tag}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let read =
                |what: &str| std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
            let has =
                |bytes: Vec<u8>, s: &str| bytes.split(|&b| b == 0).any(|part| part == s.as_bytes());
            has(read("environ"), &needle) && has(read("cmdline"), "rank-worker")
        })
        .collect()
}

/// A launcher killed outright (SIGKILL: no chance to clean up) takes its
/// workers with it. Over TCP the workers would also stop at their next
/// exchange (the socket closes); the parent-death signal the launcher sets
/// (`die_with_launcher`) is what ends NCCL workers, which have no socket to
/// notice, and it makes this faster here.
#[test]
fn killing_the_launcher_leaves_no_worker_behind() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_experiment(dir.path(), 50);
    let run = dir.path().join("run");
    let tag = format!("{}-{}", std::process::id(), dir.path().display());
    let args = process_args(&config, &run, "2");
    let mut child = lcasr(&args)
        .env("LCASR_TEST_TAG", &tag)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_records(
        &mut child,
        &run.join("metrics.jsonl"),
        1,
        Duration::from_secs(300),
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run is still going"
    );
    assert_eq!(tagged_workers(&tag).len(), 1, "one worker runs");
    child.kill().unwrap();
    child.wait().unwrap();
    let start = std::time::Instant::now();
    while !tagged_workers(&tag).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "workers outlived their launcher: {:?}",
            tagged_workers(&tag)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The hidden worker command reports a part it cannot read as a failure
/// (a JSON line on stdout, exit status 1), which the launcher shows.
#[test]
fn a_worker_given_a_malformed_part_reports_it() {
    use std::io::Write;
    let mut child = lcasr(&["rank-worker"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"rank\": 1}")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let message = report["message"].as_str().unwrap_or_default();
    assert!(message.contains("malformed rank part"), "{report}");
    assert_eq!(report["interrupted"], false);
}
