//! The training procedure of `scripts/train.rhai` written as plain library
//! calls: the baseline the scripted loop is checked against (it must give
//! bit-identical weights, so the script host adds no hidden behaviour) and
//! timed against (the script's overhead per step, `benches/script_overhead.rs`).
//!
//! It covers the configurations those comparisons use: a fixed chunk length
//! and batch size (no `sequence_scheduler`), no SpecAugment, one chunk per
//! optimizer step (`backprop_every: 1`); anything else is refused.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};

use super::clip::{clip_grad_norm, grads_are_finite};
use super::loss::{ctc, Reduction};
use super::lr_schedule::{CosineWarmup, DecayUnit};
use super::optimizer::{collect_params, DecayGroups, OptimizerConfig};
use super::rng::RunRng;
use crate::config::{Config, DecayUnits, Seed};
use crate::data::batching::{epoch_batches, epoch_seed};
use crate::data::dataset::Dataset;
use crate::model::{Encoder, ForwardOptions};
use crate::text::tokenizer::Tokenizer;

/// Seed of a fresh model's initialisation, as scripts' `encoder()` uses.
const INIT_SEED: u64 = 12345;

/// What a direct run produced.
pub struct DirectRun {
    /// The trained model.
    pub model: Encoder,
    /// Optimizer steps taken.
    pub steps: u64,
    /// The loss logged at each step (CTC nats per second of audio).
    pub losses: Vec<f64>,
    /// Time spent in the training loop (data loading included).
    pub elapsed: Duration,
}

/// Trains as scripts/train.rhai does on `cfg` (paths relative to the
/// working directory).
pub fn train(cfg: &Config) -> Result<DirectRun> {
    if cfg.sequence_scheduler.is_some() {
        bail!("the direct baseline trains at a fixed chunk length: remove sequence_scheduler");
    }
    if cfg.spec_augment.is_some() && cfg.training.start_spec_augment_after_n_epochs >= 0 {
        bail!("the direct baseline has no SpecAugment: remove the spec_augment section");
    }
    if cfg.training.backprop_every != 1 {
        bail!("the direct baseline takes one optimizer step per chunk (backprop_every: 1)");
    }
    let seed = match cfg.training.random_seed {
        Seed::Fixed(s) => s,
        Seed::Random => bail!("the direct baseline needs a fixed training.random_seed"),
    };
    let tok_path = cfg
        .data
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow!("data.tokenizer is not set"))?;
    let tok = Arc::new(Tokenizer::from_file(Path::new(tok_path))?);
    let data = Dataset::open(Path::new(&cfg.data.path), Arc::clone(&tok))?;
    let model = Encoder::init(&cfg.model, tok.vocab_size(), INIT_SEED, &Device::Cpu)?;
    let args = serde_json::to_value(&cfg.optimizer.args)?;
    let name = serde_json::to_value(cfg.optimizer.name)?;
    let oc = OptimizerConfig::from_args(name.as_str().unwrap_or_default(), &args)?;
    let mut opt = oc.build();
    let params = collect_params(
        model.params().iter().map(|(k, v)| (k.clone(), v.clone())),
        DecayGroups::Conventional,
    );
    let recs = &data.manifest().recordings;
    let epochs = cfg.training.max_epochs;
    let unit = match cfg.scheduler.decay_units {
        DecayUnits::Recordings => DecayUnit::Recordings,
        DecayUnits::Steps => DecayUnit::Steps,
    };
    let total = recs.len() as u64 * epochs;
    let mut lr = CosineWarmup::new(oc.lr, 0.0, cfg.scheduler.warmup_steps, total, unit)?;
    let chunk = cfg.audio_chunking.size as usize;
    let bs = cfg.training.batch_size as usize;
    let blank = tok.vocab_size() as u32;
    let keyed: Vec<(String, f64)> = recs.iter().map(|r| (r.id.clone(), r.duration)).collect();
    let mut rng = RunRng::new(seed);
    let mut recordings_seen = 0u64;
    let mut losses = Vec::new();
    let start = Instant::now();
    for epoch in 0..epochs {
        // The first ordering of an epoch, made when nothing in it is done.
        for batch in epoch_batches(&keyed, epoch_seed(seed, epoch), bs) {
            lr.start_batch(recordings_seen + batch.len() as u64);
            for planned in data.plan(&batch, chunk)? {
                let c = data.load(&batch, &planned)?;
                let opts = ForwardOptions {
                    train: true,
                    dropout_seed: rng.stream("dropout").next_u64(),
                    ..Default::default()
                };
                let out = model.forward(&c.features, Some(&c.lengths), &opts)?;
                let loss = ctc(
                    &out.logits,
                    &c.targets,
                    &out.lengths,
                    blank,
                    Reduction::Sum,
                    false,
                )?;
                let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                let scaled: Tensor = (&loss * (100.0 / (chunk * bs) as f64))?;
                let mut grads = scaled.backward()?;
                clip_grad_norm(&params, &mut grads, cfg.training.clip_value)?;
                if grads_are_finite(&params, &grads)? {
                    opt.step(&params, &grads, lr.lr())?;
                }
                lr.after_optimizer_step();
                let frames: usize = c.lengths.iter().sum();
                losses.push(value / frames as f64 * 100.0);
            }
            recordings_seen += batch.len() as u64;
            lr.end_batch(recordings_seen);
        }
    }
    Ok(DirectRun {
        steps: opt.steps(),
        model,
        losses,
        elapsed: start.elapsed(),
    })
}
