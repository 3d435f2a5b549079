//! Helpers shared by the integration tests: where the parity fixtures live and
//! how to read them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

/// The fixture directory: `$LCASR_FIXTURES`, or `tests/fixtures` in this crate.
///
/// Tests must derive every shape from the files, so that any directory with the
/// same layout (other seeds and sizes) passes too.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("LCASR_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// Path of one fixture file.
pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// All tensors of a safetensors fixture, on the CPU.
pub fn load_tensors(name: &str) -> HashMap<String, Tensor> {
    let path = fixture(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// A JSON fixture.
pub fn load_json(name: &str) -> serde_json::Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {}: {e}", path.display()))
}

/// Flattened f32 values of a tensor (any dtype is converted).
pub fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("tensor to f32 vec")
}

/// Largest absolute element-wise difference between two equally sized slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// A tiny experiment in `dir`: four bundled demo recordings prepared into
/// `dir/data`, a 48-piece tokenizer, and `dir/config.yaml` for a one-block
/// model (run directory `dir/run`) trained for `max_epochs`. Returns the
/// config path.
pub fn tiny_experiment(dir: &std::path::Path, max_epochs: u64) -> PathBuf {
    use lcasr::data::prepare::{discover, prepare, PrepareOptions};
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/demo/train");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4 {
        for ext in ["mp3", "json"] {
            let name = format!("train-{i:03}.{ext}");
            std::fs::copy(demo.join(&name), src.join(&name)).unwrap();
        }
    }
    let (sources, problems) = discover(&src).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let data = dir.join("data");
    let (manifest, _) = prepare(&sources, &data, &PrepareOptions::default(), &|_, _| {}).unwrap();
    let texts: Vec<String> = manifest
        .recordings
        .iter()
        .map(|r| {
            r.words
                .as_ref()
                .map(|ws| {
                    ws.iter()
                        .map(|w| w.word.clone())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        })
        .collect();
    let tok = dir.join("tokenizer.json");
    lcasr::text::tokenizer::train_and_save(texts, 48, &tok).unwrap();
    let config = dir.join("config.yaml");
    let yaml = format!(
        "model:\n  feat_in: 80\n  n_layers: 1\n  d_model: 32\n  n_heads: 2\n  head_dim: 16\n  \
         subsampling_factor: 4\n  subsampling_conv_channels: 16\n  conv_kernel_size: 5\n  \
         self_conditioning: false\n  dropout_ff: 0.1\n  dropout_attn: 0.1\n  dropout_conv: 0.1\n\
         optimizer:\n  name: madgrad\n  args:\n    lr: 3e-3\n\
         scheduler:\n  warmup_steps: 3\n\
         audio_chunking:\n  size: 1000\n\
         checkpointing:\n  dir: {run}\n  save_every_n_steps: 2\n\
         data:\n  path: {data}\n  tokenizer: {tok}\n\
         training:\n  max_epochs: {max_epochs}\n  batch_size: 2\n  backprop_every: 1\n  clip_value: 0.8\n  random_seed: 7\n",
        run = dir.join("run").display(),
        data = data.join("manifest.json").display(),
        tok = tok.display(),
    );
    std::fs::write(&config, yaml).unwrap();
    config
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `lcasr` binary with `args`, run from the repository root.
pub fn lcasr(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lcasr"));
    cmd.args(args).current_dir(repo());
    cmd
}

/// A finished command's stdout and stderr, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until the run has logged `n` records in `metrics` (or the process
/// ended); fails after `limit` without progress.
pub fn wait_for_records(child: &mut Child, metrics: &Path, n: usize, limit: Duration) {
    let start = Instant::now();
    loop {
        let count = std::fs::read_to_string(metrics)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if count >= n || child.try_wait().unwrap().is_some() {
            return;
        }
        assert!(start.elapsed() < limit, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `lcasr args`, sends it SIGINT once the run has logged `n` records in
/// `metrics`, and returns what it printed and its exit status.
pub fn interrupt_after_records(args: &[&str], metrics: &Path, n: usize, limit: Duration) -> Output {
    let mut child = lcasr(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_records(&mut child, metrics, n, limit);
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait_with_output().unwrap()
}

/// The names of the entries directly inside `dir`, sorted.
pub fn entry_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// An integer tensor's values as `usize` (lengths stored in fixtures).
pub fn to_usize_vec(t: &Tensor) -> Vec<usize> {
    t.to_dtype(candle_core::DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

/// A training batch: features (B, F, T), valid frames and target ids per item.
pub struct Batch {
    pub features: Tensor,
    pub lengths: Vec<usize>,
    pub targets: Vec<Vec<u32>>,
}

/// The training batch of the `train_step` fixture (its items' lengths differ).
pub fn train_step_batch() -> Batch {
    let ts = load_tensors("train_step.safetensors");
    let target_lengths = to_usize_vec(&ts["target_lengths"]);
    let flat = ts["targets"].to_dtype(candle_core::DType::I64).unwrap();
    let targets = (0..target_lengths.len())
        .map(|b| {
            let row = flat.get(b).unwrap().to_vec1::<i64>().unwrap();
            row[..target_lengths[b]].iter().map(|&v| v as u32).collect()
        })
        .collect();
    Batch {
        features: ts["input"].clone(),
        lengths: to_usize_vec(&ts["input_lengths"]),
        targets,
    }
}

/// A training-mode forward of `model` on `batch` (dropout drawn from
/// `dropout_seed`) and its CTC loss summed over the batch.
pub fn ctc_forward(
    model: &lcasr::model::Encoder,
    batch: &Batch,
    dropout_seed: u64,
) -> (lcasr::model::EncoderOutput, Tensor) {
    let opts = lcasr::model::ForwardOptions {
        train: true,
        dropout_seed,
        ..Default::default()
    };
    let out = model
        .forward(&batch.features, Some(&batch.lengths), &opts)
        .unwrap();
    let blank = (model.classes() - 1) as u32;
    let loss = lcasr::train::loss::ctc(
        &out.logits,
        &batch.targets,
        &out.lengths,
        blank,
        lcasr::train::loss::Reduction::Sum,
        false,
    )
    .unwrap();
    (out, loss)
}

/// `model` saved as a safetensors state dict at `path` and built again from
/// that file with `cfg`.
pub fn reload_via_safetensors(
    model: &lcasr::model::Encoder,
    cfg: &lcasr::config::ModelConfig,
    path: &Path,
) -> lcasr::model::Encoder {
    let dict: HashMap<String, Tensor> = model.state_dict().unwrap().into_iter().collect();
    candle_core::safetensors::save(&dict, path).unwrap();
    lcasr::model::Encoder::from_state_dict(
        cfg,
        candle_core::safetensors::load(path, &Device::Cpu).unwrap(),
        &Device::Cpu,
    )
    .unwrap()
}

/// Deterministic values in [-1, 1) (a 64-bit LCG), times `scale`, offset by `shift`.
pub fn noise(n: usize, seed: u64, scale: f64, shift: f64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale + shift
        })
        .collect()
}

/// scripts/train.rhai changed to fail ("no items here") on a data-parallel
/// rank that holds none of a chunk's items (rank 1 of 2 in a batch of one
/// recording), written into `dir`.
pub fn failing_train_script(dir: &Path) -> PathBuf {
    let source = std::fs::read_to_string(repo().join("scripts/train.rhai")).unwrap();
    let marker = "        let x = chunk.features;";
    assert!(source.contains(marker));
    let failing = source.replacen(
        marker,
        &format!("        if chunk.size == 0 {{ throw \"no items here\"; }}\n{marker}"),
        1,
    );
    let script = dir.join("failing.rhai");
    std::fs::write(&script, failing).unwrap();
    script
}
