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
use candle_core::{DType, Device, Tensor};

use super::clip::{clip_grad_norm, grads_are_finite};
use super::loss::{ctc, Reduction};
use super::lr_schedule::{CosineWarmup, DecayUnit};
use super::optimizer::{collect_params, DecayGroups, OptimizerConfig, Param};
use super::rng::RunRng;
use crate::config::{Config, DecayUnits, ModelConfig, Seed};
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

/// What the direct procedure reads from its config before training, shared
/// with the data-parallel driver (`lcasr::parallel`), which follows the same
/// procedure.
pub struct DirectPlan {
    /// The run's master seed (`training.random_seed`).
    pub seed: u64,
    /// The training data (`data.path`) with its tokenizer.
    pub data: Dataset,
    /// The optimizer's settings; its peak LR is the schedule's peak.
    pub optimizer: OptimizerConfig,
    /// Chunk length in frames (`audio_chunking.size`).
    pub chunk: usize,
    /// Recordings per batch (`training.batch_size`).
    pub batch_size: usize,
    /// Epochs to train (`training.max_epochs`).
    pub epochs: u64,
    /// The gradient-norm bound (`training.clip_value`).
    pub clip_value: f64,
    /// (id, duration) of every recording in manifest order, what
    /// `epoch_batches` orders.
    pub recordings: Vec<(String, f64)>,
    /// The CTC blank id (the vocabulary size).
    pub blank: u32,
    model: ModelConfig,
    vocab_size: usize,
    warmup_steps: u64,
    decay_unit: DecayUnit,
}

impl DirectPlan {
    /// Checks that `cfg` is a configuration the direct procedure covers and
    /// opens its tokenizer and data (paths relative to the working directory).
    pub fn from_config(cfg: &Config) -> Result<Self> {
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
        let vocab_size = tok.vocab_size();
        let data = Dataset::open(Path::new(&cfg.data.path), tok)?;
        let args = serde_json::to_value(&cfg.optimizer.args)?;
        let name = serde_json::to_value(cfg.optimizer.name)?;
        let optimizer = OptimizerConfig::from_args(name.as_str().unwrap_or_default(), &args)?;
        let recordings = data
            .manifest()
            .recordings
            .iter()
            .map(|r| (r.id.clone(), r.duration))
            .collect();
        Ok(DirectPlan {
            seed,
            data,
            optimizer,
            chunk: cfg.audio_chunking.size as usize,
            batch_size: cfg.training.batch_size as usize,
            epochs: cfg.training.max_epochs,
            clip_value: cfg.training.clip_value,
            recordings,
            blank: vocab_size as u32,
            model: cfg.model.clone(),
            vocab_size,
            warmup_steps: cfg.scheduler.warmup_steps,
            decay_unit: match cfg.scheduler.decay_units {
                DecayUnits::Recordings => DecayUnit::Recordings,
                DecayUnits::Steps => DecayUnit::Steps,
            },
        })
    }

    /// A freshly initialised model, as scripts' `encoder()` makes it.
    pub fn init_model(&self) -> Result<Encoder> {
        Encoder::init(&self.model, self.vocab_size, INIT_SEED, &Device::Cpu)
    }

    /// The model's trainable parameters in optimizer order.
    pub fn params(model: &Encoder) -> Vec<Param> {
        collect_params(
            model.params().iter().map(|(k, v)| (k.clone(), v.clone())),
            DecayGroups::Conventional,
        )
    }

    /// The learning-rate schedule at the start of the run.
    pub fn lr_schedule(&self) -> Result<CosineWarmup> {
        let total = self.recordings.len() as u64 * self.epochs;
        CosineWarmup::new(
            self.optimizer.lr,
            0.0,
            self.warmup_steps,
            total,
            self.decay_unit,
        )
    }

    /// The factor the summed CTC loss of a chunk is scaled by before
    /// backward: 100 / (chunk frames x recordings per batch). A rank of a
    /// data-parallel run scales its share by the same (global) factor, so
    /// the ranks' gradients sum to the whole batch's.
    pub fn loss_scale(&self) -> f64 {
        100.0 / (self.chunk * self.batch_size) as f64
    }
}

/// The training forward pass of one chunk (`features` (B, 80, T) with
/// `lengths` valid frames) and its summed CTC loss against `targets`:
/// the loss tensor and its value.
pub fn chunk_loss(
    model: &Encoder,
    features: &Tensor,
    lengths: &[usize],
    targets: &[Vec<u32>],
    dropout_seed: u64,
    blank: u32,
) -> Result<(Tensor, f64)> {
    let opts = ForwardOptions {
        train: true,
        dropout_seed,
        ..Default::default()
    };
    let out = model.forward(features, Some(lengths), &opts)?;
    let loss = ctc(
        &out.logits,
        targets,
        &out.lengths,
        blank,
        Reduction::Sum,
        false,
    )?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((loss, value))
}

/// Trains as scripts/train.rhai does on `cfg` (paths relative to the
/// working directory).
pub fn train(cfg: &Config) -> Result<DirectRun> {
    let plan = DirectPlan::from_config(cfg)?;
    let data = &plan.data;
    let model = plan.init_model()?;
    let mut opt = plan.optimizer.build();
    let params = DirectPlan::params(&model);
    let mut lr = plan.lr_schedule()?;
    let (chunk, bs, seed) = (plan.chunk, plan.batch_size, plan.seed);
    let mut rng = RunRng::new(seed);
    let mut recordings_seen = 0u64;
    let mut losses = Vec::new();
    let start = Instant::now();
    for epoch in 0..plan.epochs {
        // The first ordering of an epoch, made when nothing in it is done.
        for batch in epoch_batches(&plan.recordings, epoch_seed(seed, epoch), bs) {
            lr.start_batch(recordings_seen + batch.len() as u64);
            for planned in data.plan(&batch, chunk)? {
                let c = data.load(&batch, &planned)?;
                let dropout_seed = rng.stream("dropout").next_u64();
                let (loss, value) = chunk_loss(
                    &model,
                    &c.features,
                    &c.lengths,
                    &c.targets,
                    dropout_seed,
                    plan.blank,
                )?;
                let scaled: Tensor = (&loss * plan.loss_scale())?;
                let mut grads = scaled.backward()?;
                clip_grad_norm(&params, &mut grads, plan.clip_value)?;
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
