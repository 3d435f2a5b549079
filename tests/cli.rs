//! The `lcasr` binary as a user runs it: exit codes, and errors that are one
//! clear paragraph without a panic or a Rust backtrace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lcasr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lcasr"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run lcasr")
}

fn reference() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/reference.yaml")
        .display()
        .to_string()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lcasr-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes the reference config with one edit and returns its path.
fn edited_config(name: &str, old: &str, new: &str) -> String {
    let text = std::fs::read_to_string(reference()).unwrap();
    assert!(text.contains(old));
    let path = temp_dir(name).join("config.yaml");
    std::fs::write(&path, text.replacen(old, new, 1)).unwrap();
    path.display().to_string()
}

fn assert_clean_error(out: &Output, code: i32, must_contain: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(must_contain), "{stderr}");
    for bad in ["panicked", "stack backtrace", "RUST_BACKTRACE", "src/"] {
        assert!(!stderr.contains(bad), "{bad:?} in: {stderr}");
    }
    assert!(
        !stderr.trim_end().contains("\n\n"),
        "not one paragraph: {stderr}"
    );
}

#[test]
fn config_check_prints_the_resolved_config() {
    let out = lcasr(&["config", "check", &reference()]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("valid. Resolved config (sha256 "));
    assert!(stdout.contains("  rotary_base_freq: 10000.0"));
    assert!(stdout.contains("    momentum: 0.9"));
}

#[test]
fn misspelt_key_warns_and_strict_fails() {
    let path = edited_config("typo", "  n_layers: 6", "  n_layres: 6");
    let out = lcasr(&["config", "check", &path]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":3:3: model.n_layres: unknown key, ignored; did you mean model.n_layers?"),
        "{stderr}"
    );
    let out = lcasr(&["config", "check", &path, "--strict"]);
    assert_clean_error(&out, 2, "config.yaml:3:3: model.n_layres: unknown key");
}

#[test]
fn wrong_type_missing_section_and_broken_yaml_exit_2() {
    let path = edited_config("type", "  d_model: 768", "  d_model: wide");
    assert_clean_error(
        &lcasr(&["config", "check", &path]),
        2,
        "config.yaml:4:12: model.d_model: expected a whole number >= 0",
    );
    let path = edited_config("section", "training:", "trainingx:");
    assert_clean_error(
        &lcasr(&["config", "check", &path]),
        2,
        "training: section `training:` is required but missing",
    );
    let path = edited_config("yaml", "  n_heads: 6", "  n_heads: [6");
    assert_clean_error(
        &lcasr(&["config", "check", &path]),
        2,
        "config.yaml:6:11: not valid YAML",
    );
    assert_clean_error(
        &lcasr(&["config", "check", "/nonexistent/x.yaml"]),
        2,
        "cannot read config file /nonexistent/x.yaml",
    );
}

#[test]
fn overrides_are_applied_and_checked() {
    let out = lcasr(&["config", "check", &reference(), "model.n_layers=9"]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("  n_layers: 9\n"));
    assert_clean_error(
        &lcasr(&["config", "check", &reference(), "optimizer.name=adamm"]),
        2,
        "command-line override `optimizer.name=adamm`: optimizer.name: \"adamm\" is not one of",
    );
}

#[test]
fn train_script_errors_name_the_script_line() {
    // The reference config names no tokenizer: train.rhai stops with its message.
    let run = temp_dir("train-error").join("run");
    let out = lcasr(&["train", &reference(), "--run-dir", run.to_str().unwrap()]);
    assert_clean_error(&out, 1, "data.tokenizer is not set");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--> scripts/train.rhai:"), "{stderr}");
}

#[test]
fn tokenizer_train_writes_a_usable_tokenizer() {
    let text =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_train_text.txt");
    let out_path = temp_dir("tok").join("tokenizer.json");
    let out = lcasr(&[
        "tokenizer",
        "train",
        text.to_str().unwrap(),
        "--vocab-size",
        "64",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = lcasr::text::tokenizer::Tokenizer::from_file(&out_path).unwrap();
    assert_eq!(tok.vocab_size(), 64);
    let line = std::fs::read_to_string(&text).unwrap();
    let first = line.lines().find(|l| !l.trim().is_empty()).unwrap();
    let ids = tok.encode(first).unwrap();
    let normalised = first
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    assert_eq!(tok.decode(&ids), normalised);
}

#[test]
fn tokenizer_train_reads_manifests() {
    let dir = temp_dir("tok-manifest");
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"version": 1, "recordings": [
            {"id": "a", "features": "a.safetensors", "duration": 1.0, "text": "the cat sat"},
            {"id": "b", "features": "b.safetensors", "duration": 1.0,
             "words": [{"word": "on", "start": 0.1, "end": 0.2}, {"word": "the", "start": 0.3, "end": 0.4}, {"word": "mat", "start": 0.5, "end": 0.6}]}
        ]}"#,
    )
    .unwrap();
    let out_path = dir.join("tokenizer.json");
    let out = lcasr(&[
        "tokenizer",
        "train",
        manifest.to_str().unwrap(),
        "--vocab-size",
        "40",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = lcasr::text::tokenizer::Tokenizer::from_file(&out_path).unwrap();
    for text in ["the cat sat", "on the mat"] {
        assert_eq!(tok.decode(&tok.encode(text).unwrap()), text);
    }
    let out = lcasr(&[
        "tokenizer",
        "train",
        dir.join("nope.json").to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert_clean_error(&out, 1, "nope.json");
}

#[test]
fn bundled_configs_are_valid_without_warnings() {
    for name in ["reference.yaml", "demo.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("configs")
            .join(name);
        let out = lcasr(&["config", "check", path.to_str().unwrap(), "--strict"]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn memory_prints_every_stage_and_whether_it_fits() {
    // The reference schedule: 512 frames doubling up to 16,384 (6 stages).
    let small = ["model.n_layers=2", "model.d_model=128", "model.n_heads=2"];
    let config = reference();
    let memory = |budget: &str| {
        let mut args = vec![
            "memory",
            &config,
            "--classes",
            "129",
            "--budget-gib",
            budget,
        ];
        args.extend(small);
        lcasr(&args)
    };
    let out = memory("1000");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = stdout.lines().filter(|l| l.ends_with("yes")).collect();
    assert_eq!(rows.len(), 6, "{stdout}");
    assert!(rows[0].split_whitespace().nth(1) == Some("512"), "{stdout}");
    assert!(
        rows[5].split_whitespace().nth(1) == Some("16384"),
        "{stdout}"
    );
    // A tiny budget: no stage fits.
    let out = memory("0.01");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with("NO")).count(),
        6,
        "{stdout}"
    );
    let out = lcasr(&["memory", &reference(), "--budget-gib=0"]);
    assert_clean_error(&out, 2, "--budget-gib");
}

#[test]
fn device_names_are_checked_and_a_cpu_build_refuses_cuda_before_writing() {
    let run = temp_dir("device").join("run");
    let run_dir = run.display().to_string();
    let train = |device: &str| {
        lcasr(&[
            "train",
            &reference(),
            "--run-dir",
            &run_dir,
            "--device",
            device,
        ])
    };
    assert_clean_error(&train("gpu0"), 2, "training.device");
    if !cfg!(feature = "cuda") {
        assert_clean_error(&train("cuda:1"), 1, "--features cuda");
    }
    assert!(
        !run.exists(),
        "a refused device must leave no run directory"
    );
}
