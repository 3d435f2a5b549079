//! Training in scripts: the CTC loss, optimizers over a model's unfrozen
//! parameters (clipping, skipping non-finite steps), and the learning-rate
//! and sequence-length schedules.
//!
//! In a data-parallel run (several ranks, see `crate::parallel`) the CTC loss
//! of a chunk's targets is this rank's share of the whole chunk's loss, and
//! the optimizer sums the accumulated gradients over the ranks once per step
//! before clipping, checking or stepping, so every rank takes the same step.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use rhai::plugin::*;
use rhai::{Array, Dynamic, Map};

use super::errors::{script_error, IntoScript, ScriptResult};
use super::model_api::{lengths_from, Model, Output};
use super::session;
use super::tensor_api::{number, Tensor};
use crate::model::memory::{training_peak, StepShape};
use crate::parallel::grads::{all_reduce_gradients, broadcast_model, BUCKET_ELEMS};
use crate::train::clip::{grad_total_norm, grads_are_finite, scale_grads};
use crate::train::loss::{ctc, Reduction};
use crate::train::loss_scale::LossScale;
use crate::train::lr_schedule::{CosineWarmup, DecayUnit};
use crate::train::optimizer::{
    collect_params, DecayGroups, Optimizer as OptImpl, OptimizerConfig, Param,
};
use crate::train::sequence_schedule::{SequenceSchedule as SeqImpl, SequenceScheduleConfig};

/// Target token ids of a batch, one list per item (opaque in scripts), and
/// where they sit in a data-parallel run's chunk (`None` otherwise).
#[derive(Clone)]
pub struct Targets(pub Arc<Vec<Vec<u32>>>, pub Option<TargetShard>);

/// The part of a data-parallel chunk that a rank's targets are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetShard {
    /// Items of the whole chunk, over every rank.
    pub global_items: usize,
    /// True for a stand-in (the rank has none of the chunk's items): its loss
    /// counts nothing.
    pub stand_in: bool,
}

/// An optimizer in a script: a shared handle.
#[derive(Clone)]
pub struct Optimizer(Arc<Mutex<OptimizerInner>>);

/// The optimizer and its bookkeeping.
pub struct OptimizerInner {
    /// The update rule and its state.
    pub opt: Box<dyn OptImpl>,
    /// Every model parameter (frozen ones are skipped at each step).
    pub params: Vec<Param>,
    /// The model it updates.
    pub model: Model,
    /// `args.lr` of the config.
    pub peak_lr: f64,
    /// LR of the last step.
    pub last_lr: f64,
    /// Global gradient norm at the last `clip_grad_norm`.
    pub grad_norm: f64,
    /// Steps skipped because gradients were not finite.
    pub skipped: u64,
}

impl Optimizer {
    /// The inner state, locked.
    pub fn lock(&self) -> MutexGuard<'_, OptimizerInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The unfrozen parameters.
    fn trainable(inner: &OptimizerInner) -> Vec<Param> {
        inner
            .params
            .iter()
            .filter(|p| !inner.model.is_frozen(&p.name))
            .cloned()
            .collect()
    }
}

/// An LR schedule in a script: linear warmup then cosine decay.
#[derive(Clone)]
pub struct LrSchedule(pub Arc<Mutex<CosineWarmup>>);

impl LrSchedule {
    /// The schedule, locked.
    pub fn lock(&self) -> MutexGuard<'_, CosineWarmup> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A sequence-length schedule in a script.
#[derive(Clone)]
pub struct SequenceSchedule(pub Arc<Mutex<SeqImpl>>);

impl SequenceSchedule {
    /// The schedule, locked.
    pub fn lock(&self) -> MutexGuard<'_, SeqImpl> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Takes the run's accumulated gradients (leaving none).
fn take_grads() -> ScriptResult<GradStore> {
    session::with(|s| Ok(std::mem::take(&mut s.grads)))
}

/// In a data-parallel run, replaces the accumulated gradients of `params` by
/// their sums over every rank, once per optimizer step (a no-op otherwise).
fn sum_over_ranks(params: &[Param], grads: &mut GradStore) -> ScriptResult<()> {
    let Some(comm) = session::comm() else {
        return Ok(());
    };
    let done = session::with(|s| Ok(s.rank.as_ref().is_some_and(|r| r.grads_reduced)))?;
    if done {
        return Ok(());
    }
    all_reduce_gradients(params, grads, comm.as_ref(), true, BUCKET_ELEMS).script()?;
    session::with(|s| {
        if let Some(r) = s.rank.as_mut() {
            r.grads_reduced = true;
        }
        Ok(())
    })
}

/// Marks the accumulated gradients as this rank's own again (after a step
/// or `zero_grad()`).
fn gradients_cleared() -> ScriptResult<()> {
    session::with(|s| {
        if let Some(r) = s.rank.as_mut() {
            r.grads_reduced = false;
        }
        Ok(())
    })
}

/// A data-parallel chunk loss as this rank's share of the whole chunk's: a
/// mean over the items is rescaled to the whole chunk's item count, and a
/// stand-in's loss is multiplied by a zero tensor (its graph still reaches
/// every BatchRenorm, whose backward exchanges statistics with the other
/// ranks). Scalar shares are remembered so that `item()` sums them.
fn rank_share(
    loss: candle_core::Tensor,
    shard: TargetShard,
    reduction: Reduction,
    items: usize,
) -> ScriptResult<candle_core::Tensor> {
    let share = if shard.stand_in {
        loss.mul(&loss.zeros_like().script()?).script()?
    } else if reduction == Reduction::Mean {
        (loss * (items as f64 / shard.global_items.max(1) as f64)).script()?
    } else {
        loss
    };
    if reduction != Reduction::None {
        session::remember_loss(share.id(), !shard.stand_in)?;
    }
    Ok(share)
}

/// Puts gradients back as the run's accumulated gradients.
fn put_grads(grads: GradStore) -> ScriptResult<()> {
    session::with(|s| {
        s.grads = grads;
        Ok(())
    })
}

fn map_get<'a>(map: &'a Map, key: &str) -> Option<&'a Dynamic> {
    map.get(key).filter(|v| !v.is_unit())
}

fn check_keys(map: &Map, known: &[&str], what: &str) -> ScriptResult<()> {
    for k in map.keys() {
        if !known.contains(&k.as_str()) {
            return Err(script_error(format!(
                "{what}: unknown key `{k}` (known: {})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

fn int_of(map: &Map, key: &str, what: &str) -> ScriptResult<Option<u64>> {
    match map_get(map, key) {
        None => Ok(None),
        Some(v) => match v.as_int() {
            Ok(n) if n >= 0 => Ok(Some(n as u64)),
            _ => Err(script_error(format!(
                "{what}: `{key}` must be a non-negative int, got `{v}`"
            ))),
        },
    }
}

/// Training functions.
/// A loss scale as the map scripts keep.
fn loss_scale_map(s: LossScale) -> Map {
    let mut map = Map::new();
    map.insert("scale".into(), Dynamic::from(s.scale));
    map.insert("good_steps".into(), Dynamic::from(s.good_steps as i64));
    map
}

#[export_module]
pub mod train_module {
    use super::*;

    /// The summed CTC loss of a forward pass against `targets` (blank = the
    /// last class), a one-element tensor ready for `backward()`. In a
    /// data-parallel run, the loss of a chunk's targets is this rank's share:
    /// the shares of all ranks add up to the whole chunk's loss (a stand-in
    /// chunk's share is 0), and `item()` of it gives the whole chunk's value.
    #[rhai_fn(return_raw)]
    pub fn ctc_loss(out: Output, targets: Targets) -> Result<Tensor, Box<EvalAltResult>> {
        ctc_loss_with(out, targets, Map::new())
    }

    /// `ctc_loss` with options `#{ reduction: "sum" | "mean" | "none",
    /// zero_infinity: bool }` (mean: per item divided by its target length, then
    /// averaged; in a data-parallel run over the whole chunk's items; none: this
    /// rank's items).
    #[rhai_fn(name = "ctc_loss", return_raw)]
    pub fn ctc_loss_with(
        out: Output,
        targets: Targets,
        opts: Map,
    ) -> Result<Tensor, Box<EvalAltResult>> {
        ctc_on(Tensor(out.logits), int_lengths(&out.lengths), targets, opts)
    }

    /// The CTC loss of any (B, N, C) logits (e.g. `model.head(out.layers[i])`)
    /// with `lengths` valid frames per item; options as for `ctc_loss(out, ..)`.
    #[rhai_fn(name = "ctc_loss", return_raw)]
    pub fn ctc_on(
        logits: Tensor,
        lengths: Array,
        targets: Targets,
        opts: Map,
    ) -> Result<Tensor, Box<EvalAltResult>> {
        check_keys(&opts, &["reduction", "zero_infinity"], "ctc_loss()")?;
        let reduction = match map_get(&opts, "reduction").map(|v| v.to_string()) {
            None => Reduction::Sum,
            Some(r) if r == "sum" => Reduction::Sum,
            Some(r) if r == "mean" => Reduction::Mean,
            Some(r) if r == "none" => Reduction::None,
            Some(r) => {
                return Err(script_error(format!(
                    "ctc_loss(): reduction `{r}` is not sum, mean or none"
                )))
            }
        };
        let zero_infinity = match map_get(&opts, "zero_infinity") {
            None => false,
            Some(v) => v
                .as_bool()
                .map_err(|_| script_error("ctc_loss(): zero_infinity must be true or false"))?,
        };
        let lengths = lengths_from(&lengths)?;
        let (b, _, classes) = logits.0.dims3().script()?;
        if targets.0.len() != b || lengths.len() != b {
            return Err(script_error(format!(
                "ctc_loss(): {b} items of logits but {} target lists and {} lengths",
                targets.0.len(),
                lengths.len()
            )));
        }
        let blank = (classes - 1) as u32;
        let loss = ctc(
            &logits.0,
            &targets.0,
            &lengths,
            blank,
            reduction,
            zero_infinity,
        )
        .script()?;
        match (targets.1, session::comm()) {
            (Some(shard), Some(_)) => rank_share(loss, shard, reduction, b).map(Tensor),
            _ => Ok(Tensor(loss)),
        }
    }

    /// Number of items.
    #[rhai_fn(name = "len", pure)]
    pub fn targets_len(t: &mut Targets) -> i64 {
        t.0.len() as i64
    }

    /// Total number of target tokens.
    #[rhai_fn(get = "tokens", pure)]
    pub fn targets_tokens(t: &mut Targets) -> i64 {
        t.0.iter().map(Vec::len).sum::<usize>() as i64
    }

    /// The token ids of item `i`.
    #[rhai_fn(index_get, pure, return_raw)]
    pub fn targets_item(t: &mut Targets, i: i64) -> Result<Array, Box<EvalAltResult>> {
        t.0.get(i as usize)
            .map(|ids| ids.iter().map(|&v| Dynamic::from_int(v as i64)).collect())
            .ok_or_else(|| {
                script_error(format!(
                    "target index {i} out of range ({} items)",
                    t.0.len()
                ))
            })
    }

    /// An optimizer for `model` from the `optimizer` config map (`name`:
    /// madgrad | mirrormadgrad | adam | adamw, `args`, `weight_decay_groups`).
    /// In a data-parallel run every rank's model first takes rank 0's weights.
    #[rhai_fn(return_raw)]
    pub fn optimizer(model: Model, cfg: Map) -> Result<Optimizer, Box<EvalAltResult>> {
        check_keys(
            &cfg,
            &["name", "args", "weight_decay_groups"],
            "optimizer()",
        )?;
        let name = map_get(&cfg, "name")
            .map(|v| v.to_string())
            .ok_or_else(|| script_error("optimizer(): the map needs a `name`"))?;
        let args: serde_json::Value = match map_get(&cfg, "args") {
            None => serde_json::Value::Null,
            Some(a) => rhai::serde::from_dynamic(a)?,
        };
        let oc = OptimizerConfig::from_args(&name, &args).script()?;
        let groups = match map_get(&cfg, "weight_decay_groups").map(|v| v.to_string()) {
            None => DecayGroups::Conventional,
            Some(g) if g == "default" => DecayGroups::Conventional,
            Some(g) if g == "none" => DecayGroups::All,
            Some(g) => {
                return Err(script_error(format!(
                    "optimizer(): weight_decay_groups `{g}` is not default or none"
                )))
            }
        };
        if let Some(comm) = session::comm() {
            // Every rank starts from rank 0's weights.
            broadcast_model(model.encoder(), comm.as_ref()).script()?;
        }
        let params = collect_params(
            model
                .encoder()
                .params()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
            groups,
        );
        Ok(Optimizer(Arc::new(Mutex::new(OptimizerInner {
            opt: oc.build(),
            params,
            model,
            peak_lr: oc.lr,
            last_lr: 0.0,
            grad_norm: 0.0,
            skipped: 0,
        }))))
    }

    /// The config's peak learning rate (`args.lr`).
    #[rhai_fn(get = "peak_lr", pure)]
    pub fn peak_lr(opt: &mut Optimizer) -> f64 {
        opt.lock().peak_lr
    }

    /// Optimizer steps taken.
    #[rhai_fn(get = "steps", pure)]
    pub fn steps(opt: &mut Optimizer) -> i64 {
        opt.lock().opt.steps() as i64
    }

    /// The learning rate of the last step.
    #[rhai_fn(get = "lr", pure)]
    pub fn last_lr(opt: &mut Optimizer) -> f64 {
        opt.lock().last_lr
    }

    /// The global gradient norm measured by the last `clip_grad_norm`.
    #[rhai_fn(get = "grad_norm", pure)]
    pub fn grad_norm(opt: &mut Optimizer) -> f64 {
        opt.lock().grad_norm
    }

    /// Steps skipped because the gradients were not finite.
    #[rhai_fn(get = "skipped", pure)]
    pub fn skipped(opt: &mut Optimizer) -> i64 {
        opt.lock().skipped as i64
    }

    /// The predicted peak memory, in bytes, of one training step of the
    /// optimizer's model on chunks of `batch` recordings x `frames` input
    /// frames (f32, as on CPU): a map with `total` and its parts
    /// `parameters`, `gradients`, `optimizer`, `activations`, `backward`
    /// (transient gradients and recomputed blocks) and `io` (features, CTC
    /// head). Compare with `peak_memory()` after a step.
    #[rhai_fn(pure, return_raw)]
    pub fn predict_peak_memory(
        opt: &mut Optimizer,
        batch: i64,
        frames: i64,
    ) -> Result<Map, Box<EvalAltResult>> {
        if batch < 1 || frames < 1 {
            return Err(script_error(format!(
                "predict_peak_memory(): batch ({batch}) and frames ({frames}) must be >= 1"
            )));
        }
        let inner = opt.lock();
        let enc = inner.model.encoder();
        let step = StepShape {
            batch: batch as usize,
            frames: frames as usize,
            classes: enc.classes(),
            parameters: enc.num_parameters(),
            optimizer_buffers: inner.opt.state_buffers(),
            activation_bytes: 4,
        };
        let est = training_peak(enc.config(), &step);
        let mut map = Map::new();
        for (key, bytes) in [
            ("total", est.total()),
            ("parameters", est.parameters),
            ("gradients", est.gradients),
            ("optimizer", est.optimizer),
            ("activations", est.activations),
            ("backward", est.backward),
            ("io", est.io),
        ] {
            map.insert(key.into(), Dynamic::from(bytes as i64));
        }
        Ok(map)
    }

    /// The global L2 norm of the accumulated gradients of the unfrozen
    /// parameters; when `max_norm > 0` they are scaled down to at most
    /// `max_norm`. Returns the norm before clipping. In a data-parallel run
    /// the gradients are first summed over the ranks.
    #[rhai_fn(pure, return_raw)]
    pub fn clip_grad_norm(
        opt: &mut Optimizer,
        max_norm: Dynamic,
    ) -> Result<f64, Box<EvalAltResult>> {
        let max_norm = number(&max_norm, "clip_grad_norm(max_norm)")?;
        let mut grads = take_grads()?;
        let params = Optimizer::trainable(&opt.lock());
        if let Err(e) = sum_over_ranks(&params, &mut grads) {
            put_grads(grads)?;
            return Err(e);
        }
        let result = {
            let mut inner = opt.lock();
            let norm = if max_norm > 0.0 {
                crate::train::clip::clip_grad_norm(&params, &mut grads, max_norm)
            } else {
                grad_total_norm(&params, &grads)
            };
            if let Ok(n) = norm {
                inner.grad_norm = n;
            }
            norm
        };
        put_grads(grads)?;
        result.script()
    }

    /// Divides the accumulated gradients by `scale`: the loss scale of a
    /// float16 run, applied before `grads_finite`, `clip_grad_norm` and `step`
    /// (in a data-parallel run, after summing them over the ranks).
    #[rhai_fn(pure, return_raw)]
    pub fn unscale_grads(opt: &mut Optimizer, scale: Dynamic) -> Result<(), Box<EvalAltResult>> {
        let scale = number(&scale, "unscale_grads(scale)")?;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(script_error(format!(
                "unscale_grads(): the scale must be finite and > 0, got {scale}"
            )));
        }
        let mut grads = take_grads()?;
        let params = Optimizer::trainable(&opt.lock());
        let result = sum_over_ranks(&params, &mut grads)
            .and_then(|()| scale_grads(&params, &mut grads, 1.0 / scale).script());
        put_grads(grads)?;
        result
    }

    /// A fresh dynamic loss scale for float16 training, as a map to keep in
    /// the checkpointed `state`: `#{ scale: 65536.0, good_steps: 0 }`.
    /// Multiply the loss by `scale` before `backward()`, call
    /// `opt.unscale_grads(scale)` before the step, then `update_loss_scale`.
    pub fn loss_scale() -> Map {
        loss_scale_map(LossScale::default())
    }

    /// The loss scale after one optimizer step whose gradients were `finite`
    /// (or not): halved on an overflow, doubled after 2,000 finite steps in a
    /// row (PyTorch's GradScaler policy).
    #[rhai_fn(return_raw)]
    pub fn update_loss_scale(state: Map, finite: bool) -> Result<Map, Box<EvalAltResult>> {
        let value: serde_json::Value = rhai::serde::from_dynamic(&Dynamic::from_map(state))?;
        let mut s: LossScale = serde_json::from_value(value).map_err(|e| {
            script_error(format!(
                "update_loss_scale(): expected the map loss_scale() made: {e}"
            ))
        })?;
        s.update(finite);
        Ok(loss_scale_map(s))
    }

    /// True when every accumulated gradient is finite (in a data-parallel
    /// run, after summing them over the ranks).
    #[rhai_fn(pure, return_raw)]
    pub fn grads_finite(opt: &mut Optimizer) -> Result<bool, Box<EvalAltResult>> {
        let mut grads = take_grads()?;
        let params = Optimizer::trainable(&opt.lock());
        let finite = sum_over_ranks(&params, &mut grads)
            .and_then(|()| grads_are_finite(&params, &grads).script());
        put_grads(grads)?;
        finite
    }

    /// One update of the unfrozen parameters at learning rate `lr` with the
    /// accumulated gradients, which are then cleared. When any gradient is not
    /// finite the update is skipped (returns false) and a warning is logged.
    /// In a data-parallel run the gradients are summed over the ranks first
    /// (unless `clip_grad_norm` or `grads_finite` did so for this step).
    #[rhai_fn(pure, return_raw)]
    pub fn step(opt: &mut Optimizer, lr: Dynamic) -> Result<bool, Box<EvalAltResult>> {
        let lr = number(&lr, "step(lr)")?;
        if !lr.is_finite() || lr < 0.0 {
            return Err(script_error(format!(
                "step(): the learning rate must be finite and >= 0, got {lr}"
            )));
        }
        let mut grads = take_grads()?;
        let params = Optimizer::trainable(&opt.lock());
        sum_over_ranks(&params, &mut grads)?;
        gradients_cleared()?;
        let lead = session::is_lead();
        let stepped = {
            let mut inner = opt.lock();
            if grads_are_finite(&params, &grads).script()? {
                inner.opt.step(&params, &grads, lr).script()?;
                inner.last_lr = lr;
                true
            } else {
                inner.skipped += 1;
                if lead {
                    tracing::warn!(
                        "non-finite gradients: optimizer step {} skipped",
                        inner.opt.steps() + 1
                    );
                }
                false
            }
        };
        super::super::run_api::after_step()?;
        Ok(stepped)
    }

    /// Clears the accumulated gradients.
    #[rhai_fn(return_raw)]
    pub fn zero_grad(_opt: &mut Optimizer) -> Result<(), Box<EvalAltResult>> {
        take_grads().map(drop)?;
        gradients_cleared()
    }

    /// Multiplies the LR of parameters whose name starts with `prefix` by
    /// `scale` (e.g. a smaller LR for a pretrained subsampling); returns how many.
    #[rhai_fn(return_raw)]
    pub fn set_lr_scale(
        opt: &mut Optimizer,
        prefix: &str,
        scale: f64,
    ) -> Result<i64, Box<EvalAltResult>> {
        let mut inner = opt.lock();
        let mut n = 0;
        for p in inner
            .params
            .iter_mut()
            .filter(|p| p.name.starts_with(prefix))
        {
            p.lr_scale = scale;
            n += 1;
        }
        if n == 0 {
            return Err(script_error(format!(
                "set_lr_scale(): no parameter name starts with `{prefix}`"
            )));
        }
        Ok(n)
    }

    /// Prints as `Optimizer(madgrad, 12 steps)`.
    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn optimizer_to_string(opt: &mut Optimizer) -> String {
        let inner = opt.lock();
        format!(
            "Optimizer({}, {} steps)",
            inner.opt.name(),
            inner.opt.steps()
        )
    }

    /// Linear warmup over `cfg.warmup_steps` optimizer steps to `peak`, then
    /// cosine decay to 0 over `total` units (`cfg.decay_units`: recordings —
    /// the reference — or steps). `cfg` is the `scheduler` config map.
    #[rhai_fn(return_raw)]
    pub fn cosine_warmup(
        cfg: Map,
        peak: f64,
        total: i64,
    ) -> Result<LrSchedule, Box<EvalAltResult>> {
        check_keys(&cfg, &["warmup_steps", "decay_units"], "cosine_warmup()")?;
        let warmup = int_of(&cfg, "warmup_steps", "cosine_warmup()")?.unwrap_or(0);
        let unit = match map_get(&cfg, "decay_units").map(|v| v.to_string()) {
            None => DecayUnit::Recordings,
            Some(u) if u == "recordings" => DecayUnit::Recordings,
            Some(u) if u == "steps" => DecayUnit::Steps,
            Some(u) => {
                return Err(script_error(format!(
                    "cosine_warmup(): decay_units `{u}` is not recordings or steps"
                )))
            }
        };
        if total < 0 {
            return Err(script_error("cosine_warmup(): total must be >= 0"));
        }
        let s = CosineWarmup::new(peak, 0.0, warmup, total as u64, unit).script()?;
        Ok(LrSchedule(Arc::new(Mutex::new(s))))
    }

    /// The LR the next optimizer step should use.
    #[rhai_fn(get = "lr", pure)]
    pub fn schedule_lr(s: &mut LrSchedule) -> f64 {
        s.lock().lr()
    }

    /// True while warming up.
    #[rhai_fn(get = "in_warmup", pure)]
    pub fn in_warmup(s: &mut LrSchedule) -> bool {
        s.lock().in_warmup()
    }

    /// Call at the start of a batch with the recordings done including it.
    pub fn start_batch(s: &mut LrSchedule, recordings: i64) {
        s.lock().start_batch(recordings.max(0) as u64);
    }

    /// Call after each optimizer step.
    pub fn after_step(s: &mut LrSchedule) {
        s.lock().after_optimizer_step();
    }

    /// Call at the end of a batch with the recordings done.
    pub fn end_batch(s: &mut LrSchedule, recordings: i64) {
        s.lock().end_batch(recordings.max(0) as u64);
    }

    /// The sequence-length schedule of a config map: the chunk length starts at
    /// `audio_chunking.size` and the batch size at `training.batch_size`; with
    /// a `sequence_scheduler` section they grow and shrink as it says,
    /// otherwise they stay fixed.
    #[rhai_fn(return_raw)]
    pub fn sequence_schedule(cfg: Map) -> Result<SequenceSchedule, Box<EvalAltResult>> {
        let section = |name: &str| -> ScriptResult<Map> {
            map_get(&cfg, name)
                .and_then(|v| v.read_lock::<Map>().map(|m| m.clone()))
                .ok_or_else(|| {
                    script_error(format!(
                        "sequence_schedule(): the config has no `{name}` section"
                    ))
                })
        };
        let chunking = section("audio_chunking")?;
        let training = section("training")?;
        let size = int_of(&chunking, "size", "audio_chunking")?
            .ok_or_else(|| script_error("audio_chunking.size is missing"))?;
        let batch = int_of(&training, "batch_size", "training")?
            .ok_or_else(|| script_error("training.batch_size is missing"))?;
        let sc = match map_get(&cfg, "sequence_scheduler") {
            None => SequenceScheduleConfig {
                increase_every: 0,
                stop_after: u64::MAX,
                start_after: 0,
                max_sequence_length: size,
                increase_by_multiplier: 1.0,
                batch_size_multiplier: 1.0,
                interpolate_rotary: false,
            },
            Some(v) => {
                let mut json: serde_json::Value = rhai::serde::from_dynamic(v)?;
                if json.get("stop_after").is_none_or(|s| s.is_null()) {
                    json["stop_after"] = serde_json::json!(u64::MAX);
                }
                if let Some(obj) = json.as_object_mut() {
                    obj.remove("cur_position");
                    obj.remove("steps_since_last_increase");
                }
                serde_json::from_value(json)
                    .map_err(|e| script_error(format!("sequence_scheduler: {e}")))?
            }
        };
        let s = SeqImpl::new(sc, size, batch, 1.0).script()?;
        Ok(SequenceSchedule(Arc::new(Mutex::new(s))))
    }

    /// The current chunk length in frames.
    #[rhai_fn(get = "chunk_size", pure)]
    pub fn chunk_size(s: &mut SequenceSchedule) -> i64 {
        s.lock().sequence_length() as i64
    }

    /// The current batch size.
    #[rhai_fn(get = "batch_size", pure)]
    pub fn batch_size(s: &mut SequenceSchedule) -> i64 {
        s.lock().batch_size() as i64
    }

    /// Advances by one batch of `recordings`; true when the chunk length and
    /// batch size changed.
    pub fn advance(s: &mut SequenceSchedule, recordings: i64) -> bool {
        s.lock().step(recordings.max(0) as u64)
    }

    /// Overrides the chunk length (for curricula written in the script).
    #[rhai_fn(set = "chunk_size", return_raw)]
    pub fn set_chunk_size(s: &mut SequenceSchedule, frames: i64) -> Result<(), Box<EvalAltResult>> {
        if frames < 1 {
            return Err(script_error("chunk_size must be >= 1 frame"));
        }
        let mut g = s.lock();
        let mut st = g.state();
        st.sequence_length = frames as u64;
        g.load_state(st).script()
    }
}

fn int_lengths(v: &[usize]) -> Array {
    super::model_api::int_array(v)
}
