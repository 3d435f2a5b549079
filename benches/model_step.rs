//! One training step (forward, CTC, backward) and long-input inference of the
//! 6-layer d_model 256, 8 x 32-head encoder with 4096 classes, timed; the
//! PyTorch side is `benches/model_torch.py` (run both via `benches/model_vs_torch.sh`).
//!
//! Shapes from the environment: `LCASR_BENCH_B` (batch, default 2),
//! `LCASR_BENCH_T` (input frames, default 2048), `LCASR_BENCH_RUNS` (default 3),
//! `LCASR_BENCH_INFER_T` (frames for the inference run, default 0 = skip);
//! the device from `LCASR_BENCH_DEVICE` (`cpu`, default, or `cuda:N` in a
//! `--features cuda` build; `benches/gpu/run.sh`). `LCASR_BENCH_MODEL=reference`
//! times the reference config's 6-layer d_model 768 (6 x 128-head) model
//! instead, `LCASR_BENCH_CKPT=n` checkpoints every n-th block and
//! `LCASR_BENCH_DTYPE=bf16|f16` computes in half precision (f32 weights);
//! `LCASR_BENCH_COMPOSED=1` forces every op onto its composed path (the one
//! an op takes without a native kernel) and `LCASR_BENCH_PHASES=1` reports
//! the forward, CTC and backward times of each step (synchronising between);
//! on a GPU, `LCASR_KERNEL_PROFILE=1` adds each step's GPU time per lcasr
//! kernel (`lcasr_kernels::kernel_profile`; the rest is candle and cuBLAS).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lcasr::config::ModelConfig;
use lcasr::model::{Encoder, ForwardOptions};
use lcasr::runtime::device::open_device;
use lcasr::train::loss::{ctc, Reduction};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `", <label> N MiB"` with the device's peak allocated memory, or nothing
/// on the CPU.
fn gpu_peak_note(device: &Device, label: &str) -> String {
    lcasr::runtime::peak::device_peak(device).map_or(String::new(), |b| {
        format!(", {label} {:.0} MiB", b as f64 / (1u64 << 20) as f64)
    })
}

fn peak_rss_mib() -> f64 {
    lcasr::runtime::peak::peak().map_or(f64::NAN, |b| b as f64 / (1u64 << 20) as f64)
}

fn features(b: usize, t: usize) -> Tensor {
    let v: Vec<f32> = (0..b * 80 * t)
        .map(|i| (((i as u64).wrapping_mul(2654435761) % 2001) as f32 / 1000.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (b, 80, t), &Device::Cpu).unwrap()
}

/// Large tensors come from huge pages and are reused across steps.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: lcasr::runtime::LargeBlockAlloc = lcasr::runtime::LargeBlockAlloc;

fn main() {
    lcasr::runtime::tune_allocator();
    let (b, t, runs) = (
        env("LCASR_BENCH_B", 2),
        env("LCASR_BENCH_T", 2048),
        env("LCASR_BENCH_RUNS", 3),
    );
    let reference = std::env::var("LCASR_BENCH_MODEL").is_ok_and(|m| m == "reference");
    let (d_model, n_heads, head_dim) = if reference {
        (768, 6, 128)
    } else {
        (256, 8, 32)
    };
    let cfg = ModelConfig {
        n_layers: 6,
        d_model,
        n_heads,
        head_dim,
        use_rotary: true,
        decoder_norm: true,
        rotary_base_freq: 1.5e6,
        checkpoint_every_n_layers: env("LCASR_BENCH_CKPT", 0) as u64,
        ..ModelConfig::default()
    };
    let compute_dtype = match std::env::var("LCASR_BENCH_DTYPE").as_deref() {
        Ok("bf16") => Some(DType::BF16),
        Ok("f16") => Some(DType::F16),
        _ => None,
    };
    let name = std::env::var("LCASR_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = open_device(&name).unwrap_or_else(|e| panic!("LCASR_BENCH_DEVICE: {e:#}"));
    let model = Encoder::init(&cfg, 4095, 0, &device).unwrap();
    let x = features(b, t);
    let n = t.div_ceil(8);
    let targets: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            (0..n / 4)
                .map(|j| ((i * 977 + j * 131) % 4094) as u32)
                .collect()
        })
        .collect();
    let mut times = Vec::new();
    let composed = std::env::var("LCASR_BENCH_COMPOSED").is_ok_and(|v| v == "1");
    let phases = std::env::var("LCASR_BENCH_PHASES").is_ok_and(|v| v == "1");
    let mut step = || {
        let start = Instant::now();
        let out = model
            .forward(
                &x,
                None,
                &ForwardOptions {
                    train: true,
                    compute_dtype,
                    ..Default::default()
                },
            )
            .unwrap();
        let forward_done = phases.then(|| {
            device.synchronize().unwrap();
            let elapsed = start.elapsed();
            // Reported at once: a step killed later by a time limit still
            // tells how far it got.
            eprintln!(
                "  forward done after {:.0} ms{}",
                elapsed.as_secs_f64() * 1e3,
                gpu_peak_note(&device, "peak GPU allocated so far")
            );
            elapsed
        });
        let loss = ctc(
            &out.logits,
            &targets,
            &out.lengths,
            4095,
            Reduction::Sum,
            false,
        )
        .unwrap();
        let ctc_done = phases.then(|| {
            device.synchronize().unwrap();
            start.elapsed()
        });
        lcasr_kernels::device_memory::trace(|| "CTC loss done".into(), &device);
        let grads = loss.backward().unwrap();
        device.synchronize().unwrap();
        drop(grads);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        // Each step as it ends: a long step killed by a time limit still reports.
        let split = match (forward_done, ctc_done) {
            (Some(f), Some(c)) => format!(
                " (forward {:.0} ms, CTC {:.0} ms, backward {:.0} ms)",
                f.as_secs_f64() * 1e3,
                (c - f).as_secs_f64() * 1e3,
                ms - c.as_secs_f64() * 1e3
            ),
            _ => String::new(),
        };
        eprintln!("  step {}: {ms:.0} ms{split}", times.len() + 1);
        #[cfg(feature = "cuda")]
        if let Some(report) = lcasr_kernels::kernel_profile::take_report().unwrap() {
            eprint!("{report}");
        }
        times.push(ms);
    };
    for _ in 0..runs {
        if composed {
            lcasr_kernels::with_composed_ops(&mut step);
        } else {
            step();
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "lcasr ({name}, {}{}): train step B {b} x T {t}: best {:.0} ms, median {:.0} ms, peak RSS {:.0} MiB{}",
        if reference { "d768" } else { "d256" },
        compute_dtype.map_or(String::new(), |d| format!(" {d:?}")),
        times[0],
        times[times.len() / 2],
        peak_rss_mib(),
        gpu_peak_note(&device, "peak GPU allocated")
    );
    let infer_t = env("LCASR_BENCH_INFER_T", 0);
    if infer_t > 0 {
        let x = features(1, infer_t);
        let start = Instant::now();
        let out = model.forward(&x, None, &ForwardOptions::default()).unwrap();
        device.synchronize().unwrap();
        println!(
            "lcasr ({name}): inference T {infer_t} ({} encoder frames): {:.1} s, peak RSS {:.0} MiB",
            out.lengths[0],
            start.elapsed().as_secs_f64(),
            peak_rss_mib()
        );
    }
}
