//! The data-parallel form of the direct training procedure
//! (`lcasr::train::direct`): `world` ranks, each a thread of this process
//! with its own model and optimizer, train on shares of the same global
//! batches and stay identical.
//!
//! Each rank
//! - builds the model as the direct run does and takes rank 0's weights;
//! - orders every epoch as the direct run does and plans each batch's chunks
//!   on the whole batch, then trains on its own recordings' items of each
//!   chunk ([`super::shard`]); a rank with no item in a chunk runs a stand-in
//!   pass on one silent item of the chunk's width that contributes nothing,
//!   so it still takes part in every exchange;
//! - scales its summed CTC loss by the global factor 100 / (chunk x global
//!   batch size), so the ranks' gradients sum to the whole batch's;
//! - normalises with BatchRenorm statistics of the whole batch
//!   ([`super::sync_norm`]);
//! - sums the gradients over the ranks in buckets ([`super::grads`]), then
//!   clips, checks finiteness and steps exactly as the direct run does; all
//!   ranks hold the same sums, so they take the same step.
//!
//! Dropout draws one seed per chunk from the run's `dropout` stream, as the
//! direct run does; rank 0 uses it as it is and every other rank a mix of it
//! with its rank, so ranks draw different masks. One rank therefore trains
//! bit-identically to `lcasr::train::direct::train`, and with dropout off any
//! number of ranks trains the same model up to floating-point summation
//! order; with dropout on, the masks (not the procedure) differ with the
//! number of ranks.
//!
//! Only rank 0 writes checkpoints (model, optimizer and training state via
//! `lcasr::train::state`); on resume every rank reads the same checkpoint and
//! continues at the next global batch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use super::collective::Collective;
use super::grads::{all_reduce_gradients, broadcast_model, BUCKET_ELEMS};
use super::shard::{shard_chunk, shard_range};
use super::sync_norm::synchronised;
use super::threads::run_on_threads;
use crate::audio::features::N_MELS;
use crate::config::{Config, ConvNorm};
use crate::data::batching::{epoch_batches, epoch_seed};
use crate::data::chunking::Chunk;
use crate::model::{Encoder, ForwardOptions};
use crate::train::clip::{clip_grad_norm, grads_are_finite};
use crate::train::direct::{chunk_loss, DirectPlan};
use crate::train::rng::RunRng;
use crate::train::state::{
    load_checkpoint, save_checkpoint, TrainingCounters, TrainingState, STATE_FILE,
};

/// How to run a data-parallel training.
#[derive(Clone, Debug)]
pub struct DataParallelOptions {
    /// Number of ranks (threads), at least 1.
    pub world: usize,
    /// Values per gradient all-reduce bucket.
    pub bucket_elems: usize,
    /// Where rank 0 keeps the training checkpoint; `None`: no checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// Save after every this many global batches (0: only at the end); a
    /// checkpoint is always saved when the call ends.
    pub save_every_n_batches: u64,
    /// Continue from the checkpoint in `checkpoint_dir` when there is one.
    pub resume: bool,
    /// Stop after this many global batches of this call (the run can then be
    /// resumed from its checkpoint); `None`: train to the end.
    pub max_batches: Option<u64>,
}

impl DataParallelOptions {
    /// `world` ranks, 4 MiB buckets, no checkpoints, trained to the end.
    pub fn new(world: usize) -> Self {
        DataParallelOptions {
            world,
            bucket_elems: BUCKET_ELEMS,
            checkpoint_dir: None,
            save_every_n_batches: 0,
            resume: false,
            max_batches: None,
        }
    }
}

/// What a data-parallel run produced.
pub struct DataParallelRun {
    /// Every rank's trained model, by rank (all hold the same weights).
    pub models: Vec<Encoder>,
    /// Optimizer steps taken over the whole run (resumed ones included).
    pub steps: u64,
    /// The loss of each step of this call, over the global batch (CTC nats
    /// per second of audio), as the direct run logs it.
    pub losses: Vec<f64>,
    /// Global batches trained by this call.
    pub batches: u64,
    /// Time spent training.
    pub elapsed: Duration,
}

/// What one rank returns.
struct RankOutcome {
    model: Encoder,
    steps: u64,
    losses: Vec<f64>,
    batches: u64,
}

/// Trains on `cfg` as `lcasr::train::direct::train` does, over
/// `opts.world` in-process ranks sharing each global batch
/// (`training.batch_size` recordings).
pub fn train_data_parallel(cfg: &Config, opts: &DataParallelOptions) -> Result<DataParallelRun> {
    refuse_unsynchronised_norm(cfg)?;
    let plan = DirectPlan::from_config(cfg)?;
    let start = Instant::now();
    let ran = run_on_threads(opts.world, |comm| run_rank(&plan, &comm, opts))?;
    let mut outcomes = Vec::with_capacity(opts.world);
    let mut errors = Vec::new();
    for (rank, result) in ran.results.into_iter().enumerate() {
        match result {
            Err(what) => bail!("rank {rank} panicked: {what}"),
            Ok(Err(e)) => errors.push((rank, e)),
            Ok(Ok(outcome)) => outcomes.push(outcome),
        }
    }
    if !errors.is_empty() {
        let first = ran.first_failure.unwrap_or(errors[0].0);
        let (rank, e) = errors
            .into_iter()
            .find(|(r, _)| *r == first)
            .ok_or_else(|| anyhow!("rank {first} failed without an error"))?;
        return Err(e.context(format!(
            "data-parallel rank {rank} of {} failed",
            opts.world
        )));
    }
    let rank0 = &outcomes[0];
    let (steps, losses, batches) = (rank0.steps, rank0.losses.clone(), rank0.batches);
    Ok(DataParallelRun {
        models: outcomes.into_iter().map(|o| o.model).collect(),
        steps,
        losses,
        batches,
        elapsed: start.elapsed(),
    })
}

/// Fails for conv norms whose statistics data parallelism does not
/// synchronise: BatchRenorm's batch statistics are summed over the ranks,
/// LayerNorm and GroupNorm take theirs per item (a rank holds whole items)
/// and no norm keeps none; BatchNorm's batch statistics are not synchronised.
pub fn refuse_unsynchronised_norm(cfg: &Config) -> Result<()> {
    if cfg.model.transformer || cfg.model.conv_norm != ConvNorm::BatchNorm {
        return Ok(());
    }
    bail!(
        "model.conv_norm: data-parallel training supports `batch_renorm`, `layer_norm`, \
         `group_norm` and `none`; `batch_norm` is not synchronised across ranks yet (train on \
         one rank)"
    )
}

/// The dropout seed of `rank` from the run's per-chunk draw: the draw itself
/// on rank 0 (so one rank is the direct run), a SplitMix64 mix of it with the
/// rank elsewhere.
pub fn rank_dropout_seed(draw: u64, rank: usize) -> u64 {
    if rank == 0 {
        return draw;
    }
    let mut z = draw ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The index of the batch that starts `position` recordings into an epoch.
fn batch_at(batches: &[Vec<usize>], position: u64, epoch: u64) -> Result<usize> {
    let mut seen = 0u64;
    for (i, b) in batches.iter().enumerate() {
        if seen == position {
            return Ok(i);
        }
        seen += b.len() as u64;
    }
    if seen == position {
        return Ok(batches.len());
    }
    bail!(
        "the checkpoint is {position} recordings into epoch {epoch}, which is not a batch boundary"
    )
}

/// One rank's whole run.
fn run_rank(
    plan: &DirectPlan,
    comm: &Arc<dyn Collective>,
    opts: &DataParallelOptions,
) -> Result<RankOutcome> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let model = plan.init_model()?;
    let mut opt = plan.optimizer.build();
    let params = DirectPlan::params(&model);
    let mut lr = plan.lr_schedule()?;
    let mut rng = RunRng::new(plan.seed);
    let mut counters = TrainingCounters::default();
    let checkpoint = opts.checkpoint_dir.as_deref();
    if let Some(dir) = checkpoint.filter(|d| opts.resume && d.join(STATE_FILE).exists()) {
        let state = load_checkpoint(dir, &model, opt.as_mut())?;
        lr.load_state(state.lr_schedule)?;
        rng = RunRng::from_state(&state.rng)?;
        counters = state.counters;
    }
    broadcast_model(&model, comm.as_ref())?;
    let mut losses = Vec::new();
    let mut batches_done = 0u64;
    let mut saved_at = None;
    let first_epoch = counters.epoch;
    'epochs: for epoch in first_epoch..plan.epochs {
        let batches = epoch_batches(
            &plan.recordings,
            epoch_seed(plan.seed, epoch),
            plan.batch_size,
        );
        let first = if epoch == first_epoch {
            batch_at(&batches, counters.position_in_epoch, epoch)?
        } else {
            0
        };
        for (index, batch) in batches.iter().enumerate().skip(first) {
            if opts.max_batches.is_some_and(|m| batches_done >= m) {
                break 'epochs;
            }
            lr.start_batch(counters.recordings_seen + batch.len() as u64);
            let mine = shard_range(batch.len(), world, rank);
            for planned in plan.data.plan(batch, plan.chunk)? {
                let draw = rng.stream("dropout").next_u64();
                let part = shard_chunk(&planned, &mine);
                let (mut grads, value, frames) = rank_pass(
                    plan,
                    &model,
                    comm,
                    batch,
                    &part,
                    rank_dropout_seed(draw, rank),
                )?;
                let active = !part.items.is_empty();
                all_reduce_gradients(
                    &params,
                    &mut grads,
                    comm.as_ref(),
                    active,
                    opts.bucket_elems,
                )?;
                let mut totals = [value, frames as f64];
                comm.all_reduce_sum_f64(&mut totals)?;
                clip_grad_norm(&params, &mut grads, plan.clip_value)?;
                if grads_are_finite(&params, &grads)? {
                    opt.step(&params, &grads, lr.lr())?;
                }
                lr.after_optimizer_step();
                losses.push(totals[0] / totals[1] * 100.0);
            }
            counters.recordings_seen += batch.len() as u64;
            counters.position_in_epoch += batch.len() as u64;
            if index + 1 == batches.len() {
                counters.epoch = epoch + 1;
                counters.position_in_epoch = 0;
            }
            counters.optimizer_steps = opt.steps();
            lr.end_batch(counters.recordings_seen);
            batches_done += 1;
            let every = opts.save_every_n_batches;
            if let (Some(dir), 0) = (checkpoint, rank) {
                if every > 0 && batches_done.is_multiple_of(every) {
                    save(dir, &model, opt.as_ref(), &counters, &lr, &rng)?;
                    saved_at = Some(batches_done);
                }
            }
        }
    }
    if let (Some(dir), 0) = (checkpoint, rank) {
        if saved_at != Some(batches_done) {
            save(dir, &model, opt.as_ref(), &counters, &lr, &rng)?;
        }
    }
    Ok(RankOutcome {
        model,
        steps: opt.steps(),
        losses,
        batches: batches_done,
    })
}

/// One rank's forward and backward pass over its part of a chunk of `batch`:
/// the gradients of its loss share, the summed loss and the valid frames.
/// A rank without items runs the stand-in pass (nothing counted).
fn rank_pass(
    plan: &DirectPlan,
    model: &Encoder,
    comm: &Arc<dyn Collective>,
    batch: &[usize],
    part: &Chunk,
    dropout_seed: u64,
) -> Result<(GradStore, f64, usize)> {
    if part.items.is_empty() {
        let features = Tensor::zeros((1, N_MELS, part.width), DType::F32, model.device())?;
        let opts = ForwardOptions {
            train: true,
            dropout_seed,
            ..Default::default()
        };
        let grads = synchronised(comm, false, || -> Result<GradStore> {
            let out = model.forward(&features, Some(&[part.width]), &opts)?;
            // A zero tensor, not the scalar 0 (candle prunes `x * 0.0`
            // from the graph): backward must reach every BatchRenorm.
            let zero = Tensor::zeros((), out.logits.dtype(), model.device())?;
            Ok(out.logits.sum_all()?.mul(&zero)?.backward()?)
        })?;
        return Ok((grads, 0.0, 0));
    }
    let c = plan.data.load(batch, part)?;
    let (grads, value) = synchronised(comm, true, || -> Result<(GradStore, f64)> {
        let (loss, value) = chunk_loss(
            model,
            &c.features,
            &c.lengths,
            &c.targets,
            dropout_seed,
            plan.blank,
        )?;
        Ok(((&loss * plan.loss_scale())?.backward()?, value))
    })?;
    Ok((grads, value, c.lengths.iter().sum()))
}

/// Rank 0's checkpoint of the run so far.
fn save(
    dir: &Path,
    model: &Encoder,
    opt: &dyn crate::train::optimizer::Optimizer,
    counters: &TrainingCounters,
    lr: &crate::train::lr_schedule::CosineWarmup,
    rng: &RunRng,
) -> Result<()> {
    let state = TrainingState {
        counters: counters.clone(),
        lr_schedule: lr.state(),
        sequence_schedule: None,
        rng: rng.state(),
        optimizer: opt.name().to_string(),
        script_state: serde_json::Value::Null,
    };
    save_checkpoint(dir, model, opt, &state, &[])
}
