//! `lcasr reproduce`: a finished run re-run from its recorded scripts, config
//! and seed gives exactly its records; an edited script is reported before
//! running, and a change in behaviour shows up as the first divergence.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;

use lcasr::experiment::reproduce;
use lcasr::run::run_dir::StartMode;

fn train(config: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_lcasr"))
        .args(["train", config.to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_reproduce(run: &Path, into: PathBuf) -> (Vec<String>, lcasr::experiment::Reproduction) {
    let said = RefCell::new(Vec::new());
    let r = reproduce(run, Some(into), StartMode::New, vec!["test".into()], &|m| {
        said.borrow_mut().push(m.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    (said.into_inner(), r)
}

#[test]
fn reproduce_matches_then_reports_an_edited_script() {
    // As the lcasr binary does: allocation layout must not change the numbers.
    lcasr::runtime::tune_allocator();
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_experiment(dir.path(), 1);
    train(&config);
    let run = dir.path().join("run");

    let (mismatches, r) = run_reproduce(&run, dir.path().join("again"));
    assert!(mismatches.is_empty(), "{mismatches:?}");
    let c = r.comparison.unwrap();
    assert!(c.compared >= 4);
    assert_eq!(c.compared, c.original_records());
    assert_eq!(c.first_divergence, None);

    // Halving every LR: the mismatch is stated before the run, and the
    // records diverge once the LR is non-zero.
    let script = run.join("scripts/train.rhai");
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(text.contains("opt.step(step_lr);"));
    std::fs::write(
        &script,
        text.replace("opt.step(step_lr);", "opt.step(step_lr * 0.5);"),
    )
    .unwrap();
    let (mismatches, r) = run_reproduce(&run, dir.path().join("edited"));
    assert_eq!(mismatches.len(), 1, "{mismatches:?}");
    assert!(mismatches[0].contains("train.rhai"), "{mismatches:?}");
    let divergence = r
        .comparison
        .unwrap()
        .first_divergence
        .expect("a divergence");
    assert!(divergence.contains("loss"), "{divergence}");
}

#[test]
fn reproduce_command_reports_an_exact_match() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_experiment(dir.path(), 1);
    train(&config);
    let run = dir.path().join("run");
    let again = dir.path().join("again");
    let out = Command::new(env!("CARGO_BIN_EXE_lcasr"))
        .args([
            "reproduce",
            run.to_str().unwrap(),
            "--run-dir",
            again.to_str().unwrap(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Reproduced exactly: all"), "{stderr}");
    assert!(again.join("checkpoints/latest").exists());
}
