//! Long-form inference timed one row per process, so that each row's peak
//! RSS (`VmHWM`) is its own; the PyTorch side is `benches/inference_torch.py`
//! and `benches/inference_vs_torch.sh` runs both.
//!
//! ```text
//! inference_long export <model> <dir>           weights + config + a numerics check
//! inference_long run <model> <context> <minutes>
//! ```
//!
//! `<model>` is `6l` (6 layers, d_model 256, 8 x 32 heads, 4095 + 1 classes,
//! as in `model_step`) or `demo` (`configs/demo.yaml`'s model, 64 + 1 classes);
//! `<context>` is `full` (one forward over the whole recording) or a window in
//! seconds (averaged moving windows at the default overlap). Both run
//! `lcasr::infer::longform::log_probs` in eval mode on synthetic features (a
//! fixed hash pattern in [-1, 1], the same as `benches/model_step.rs` and the
//! PyTorch side); feature extraction is not timed. Arguments starting with
//! `--` (cargo's `--bench`) are ignored.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use lcasr::config::{load_model_section, ModelConfig};
use lcasr::infer::{log_probs, ContextOptions};
use lcasr::model::Encoder;

/// Input frames per second of audio (10 ms hop).
const FRAMES_PER_SECOND: usize = 100;
/// Frames and window of the exported numerics check.
const CHECK_FRAMES: usize = 4000;
const CHECK_WINDOW: usize = 1600;

fn peak_rss_mib() -> f64 {
    lcasr::runtime::peak::peak().map_or(f64::NAN, |b| b as f64 / (1u64 << 20) as f64)
}

/// (80, t) synthetic features: the hash pattern of `benches/model_step.rs`.
fn features(t: usize) -> Result<Tensor> {
    let v: Vec<f32> = (0..80 * t)
        .map(|i| (((i as u64).wrapping_mul(2654435761) % 2001) as f32 / 1000.0) - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, (80, t), &Device::Cpu)?)
}

/// The benchmarked model and its vocabulary size (without the blank).
fn model_config(name: &str) -> Result<(ModelConfig, usize)> {
    match name {
        "6l" => Ok((
            ModelConfig {
                n_layers: 6,
                d_model: 256,
                n_heads: 8,
                head_dim: 32,
                use_rotary: true,
                decoder_norm: true,
                rotary_base_freq: 1.5e6,
                ..ModelConfig::default()
            },
            4095,
        )),
        "demo" => {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/demo.yaml");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Ok((load_model_section(&text, &path.display().to_string())?, 64))
        }
        other => bail!("unknown model `{other}`: expected 6l or demo"),
    }
}

fn context(arg: &str) -> Result<ContextOptions> {
    if arg == "full" {
        return Ok(ContextOptions::with_window(None));
    }
    let seconds: usize = arg
        .parse()
        .with_context(|| format!("context `{arg}` is neither `full` nor whole seconds"))?;
    Ok(ContextOptions::with_window(Some(
        seconds * FRAMES_PER_SECOND,
    )))
}

/// Writes `weights.safetensors`, `config.json` and `check.safetensors` (the
/// check input and our log-probs at full context and at short windows) to `dir`.
fn export(model_name: &str, dir: &Path) -> Result<()> {
    let (cfg, vocab) = model_config(model_name)?;
    let model = Encoder::init(&cfg, vocab, 0, &Device::Cpu)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let weights: HashMap<String, Tensor> = model.state_dict()?.into_iter().collect();
    candle_core::safetensors::save(&weights, dir.join("weights.safetensors"))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let x = features(CHECK_FRAMES)?;
    let full = log_probs(&model, &x, &ContextOptions::with_window(None))?;
    let windowed = log_probs(&model, &x, &ContextOptions::with_window(Some(CHECK_WINDOW)))?;
    let check = HashMap::from([
        ("features".to_string(), x),
        ("log_probs_full".to_string(), full),
        ("log_probs_window".to_string(), windowed),
        (
            "window".to_string(),
            Tensor::new(CHECK_WINDOW as i64, &Device::Cpu)?,
        ),
    ]);
    candle_core::safetensors::save(&check, dir.join("check.safetensors"))?;
    println!("lcasr: exported {model_name} to {}", dir.display());
    Ok(())
}

fn run(model_name: &str, ctx_arg: &str, minutes: f64) -> Result<()> {
    let (cfg, vocab) = model_config(model_name)?;
    let opts = context(ctx_arg)?;
    let model = Encoder::init(&cfg, vocab, 0, &Device::Cpu)?;
    let frames = (minutes * 60.0 * FRAMES_PER_SECOND as f64).round() as usize;
    let x = features(frames)?;
    let audio_s = frames as f64 / FRAMES_PER_SECOND as f64;
    let start = Instant::now();
    let lp = log_probs(&model, &x, &opts)?;
    let wall = start.elapsed().as_secs_f64();
    let (out_frames, classes) = lp.dims2()?;
    println!(
        "lcasr row model={model_name} context={ctx_arg} audio_s={audio_s:.0} \
         out={out_frames}x{classes} wall_s={wall:.1} x_realtime={:.1} peak_rss_mib={:.0}",
        audio_s / wall,
        peak_rss_mib()
    );
    Ok(())
}

/// Large tensors come from huge pages and are reused across steps.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: lcasr::runtime::LargeBlockAlloc = lcasr::runtime::LargeBlockAlloc;

fn main() -> Result<()> {
    lcasr::runtime::tune_allocator();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["export", model, dir] => export(model, Path::new(dir)),
        ["run", model, ctx, minutes] => {
            let minutes: f64 = minutes
                .parse()
                .with_context(|| format!("minutes `{minutes}` is not a number"))?;
            run(model, ctx, minutes)
        }
        _ => bail!(
            "usage: inference_long export <6l|demo> <dir> | \
             inference_long run <6l|demo> <full|window seconds> <minutes>"
        ),
    }
}
