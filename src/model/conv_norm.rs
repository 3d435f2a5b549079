//! The norm of the convolution module and the SiLU after it
//! (`model.conv_norm`, reference-spec §3.7): BatchRenorm (the fused kernel,
//! the default), BatchNorm, LayerNorm over channels, GroupNorm with 32
//! groups, or none. Whatever its kind, the norm's tensors are named
//! `layers.{i}.conv.fn.batch_norm.*` (reference-spec §4).
//!
//! Padding: the statistics of BatchNorm (per channel over the batch) and of
//! GroupNorm (per item and group) count only valid frames, like BatchRenorm's;
//! with `ForwardOptions::compat_renorm_padding` they count every frame, as the
//! reference did (it never passed its mask). GroupNorm applies this in
//! evaluation too, so by default an item's output does not depend on how much
//! padding its batch adds. Padded frames are normalised with the same
//! statistics as the valid ones.
//!
//! BatchRenorm runs on the fused kernel; the other norms are compositions of
//! candle ops with autograd (they are not on the hot path).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use anyhow::anyhow;
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use lcasr_kernels::activation::silu;
use lcasr_kernels::batch_renorm::{batch_renorm_silu, RenormMode};
use lcasr_kernels::norm::layer_norm;

use super::builder::{Builder, Init};
use super::layers::Ctx;
use crate::config::ConvNorm;

/// Epsilon of BatchNorm, LayerNorm and GroupNorm (PyTorch's default).
pub const CONV_NORM_EPS: f64 = 1e-5;
/// Momentum of the BatchNorm running statistics (PyTorch's default).
pub const BATCH_NORM_MOMENTUM: f32 = 0.1;
/// Groups of the GroupNorm option.
pub const GROUP_NORM_GROUPS: usize = 32;
/// Momentum of the BatchRenorm running statistics.
const RENORM_MOMENTUM: f32 = 0.01;
/// Epsilon added to the BatchRenorm batch standard deviation.
const RENORM_EPS: f32 = 1e-3;

/// BatchRenorm running statistics (`running_mean`, `running_std`,
/// `num_batches_tracked`).
#[derive(Clone, Debug, PartialEq)]
pub struct RenormState {
    /// Running mean per channel.
    pub mean: Vec<f32>,
    /// Running standard deviation per channel.
    pub std: Vec<f32>,
    /// Training forward passes seen.
    pub num_batches_tracked: i64,
}

impl RenormState {
    /// The r and d clamps for the current count (reference-spec §3.7).
    pub fn limits(&self) -> (f32, f32) {
        let n = self.num_batches_tracked as f64;
        let rmax = (2.0 * n / 35000.0 + 25.0 / 35.0).clamp(1.0, 3.0);
        let dmax = (5.0 * n / 20000.0 - 25.0 / 20.0).clamp(0.0, 5.0);
        (rmax as f32, dmax as f32)
    }
}

/// BatchNorm running statistics (`running_mean`, `running_var`,
/// `num_batches_tracked`).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormState {
    /// Running mean per channel.
    pub mean: Vec<f32>,
    /// Running (unbiased) variance per channel.
    pub var: Vec<f32>,
    /// Training forward passes seen.
    pub num_batches_tracked: i64,
}

impl BatchNormState {
    /// The state of a fresh BatchNorm of `channels` channels: mean 0, variance 1.
    pub fn new(channels: usize) -> Self {
        BatchNormState {
            mean: vec![0.0; channels],
            var: vec![1.0; channels],
            num_batches_tracked: 0,
        }
    }

    /// PyTorch's update after a training batch: r ← r + momentum·(batch − r)
    /// with the batch's unbiased variance for `running_var`; counts the batch.
    pub fn update(&mut self, batch: &BatchMoments) {
        let unbias = batch.count as f32 / (batch.count as f32 - 1.0);
        for (r, m) in self.mean.iter_mut().zip(&batch.mean) {
            *r += BATCH_NORM_MOMENTUM * (m - *r);
        }
        for (r, v) in self.var.iter_mut().zip(&batch.var) {
            *r += BATCH_NORM_MOMENTUM * (v * unbias - *r);
        }
        self.num_batches_tracked += 1;
    }
}

/// The running statistics of a conv norm that keeps them.
#[derive(Clone, Debug, PartialEq)]
pub enum RunningStats {
    /// BatchRenorm's.
    Renorm(RenormState),
    /// BatchNorm's.
    Batch(BatchNormState),
}

impl RunningStats {
    /// The buffers under their state-dict names below `prefix`
    /// (`num_batches_tracked` as an I64 scalar).
    pub fn tensors(&self, prefix: &str, device: &Device) -> Result<Vec<(String, Tensor)>> {
        let (mean, (spread_name, spread), count) = match self {
            RunningStats::Renorm(s) => (&s.mean, ("running_std", &s.std), s.num_batches_tracked),
            RunningStats::Batch(s) => (&s.mean, ("running_var", &s.var), s.num_batches_tracked),
        };
        Ok(vec![
            (
                format!("{prefix}.running_mean"),
                Tensor::from_slice(mean, mean.len(), device)?,
            ),
            (
                format!("{prefix}.{spread_name}"),
                Tensor::from_slice(spread, spread.len(), device)?,
            ),
            (
                format!("{prefix}.num_batches_tracked"),
                Tensor::new(count, device)?,
            ),
        ])
    }

    /// Statistics of the same kind as these, read from `tensors` named as
    /// [`RunningStats::tensors`] names them.
    pub fn read_like(
        &self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
    ) -> anyhow::Result<RunningStats> {
        let get = |suffix: &str| {
            let key = format!("{prefix}.{suffix}");
            tensors
                .get(&key)
                .ok_or_else(|| anyhow!("no tensor `{key}`"))
        };
        let values = |suffix: &str| -> anyhow::Result<Vec<f32>> {
            Ok(get(suffix)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        let count: i64 = get("num_batches_tracked")?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?
            .first()
            .copied()
            .ok_or_else(|| anyhow!("`{prefix}.num_batches_tracked` is empty"))?;
        Ok(match self {
            RunningStats::Renorm(_) => RunningStats::Renorm(RenormState {
                mean: values("running_mean")?,
                std: values("running_std")?,
                num_batches_tracked: count,
            }),
            RunningStats::Batch(_) => RunningStats::Batch(BatchNormState {
                mean: values("running_mean")?,
                var: values("running_var")?,
                num_batches_tracked: count,
            }),
        })
    }
}

/// Per-channel statistics of a BatchNorm training batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchMoments {
    /// Mean over the counted positions.
    pub mean: Vec<f32>,
    /// Biased variance over the counted positions (the one normalised with).
    pub var: Vec<f32>,
    /// Number of positions counted.
    pub count: usize,
}

/// Where the BatchNorm statistics come from.
#[derive(Clone, Copy, Debug)]
pub enum BatchNormMode<'a> {
    /// The batch's: positions t < lengths[b] of every item b, or all of them
    /// when `lengths` is None.
    Train {
        /// Valid frames per item; None counts every position.
        lengths: Option<&'a [usize]>,
    },
    /// The running statistics.
    Eval {
        /// Running mean (C).
        running_mean: &'a [f32],
        /// Running variance (C).
        running_var: &'a [f32],
    },
}

/// BatchNorm1d (eps 1e-5) with its affine, then SiLU, on channels-last `x`
/// (B, N, C) with `weight` and `bias` (C), of any float dtype. In training
/// mode it returns the batch's moments too, for the caller's running
/// statistics; gradients flow through them to `x`.
pub fn batch_norm_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mode: BatchNormMode,
) -> Result<(Tensor, Option<BatchMoments>)> {
    let (b, n, c) = x.dims3()?;
    let (normalised, moments) = match mode {
        BatchNormMode::Train { lengths } => {
            let mask = count_mask(x, lengths)?;
            let count = lengths.map_or(b * n, |l| l.iter().sum());
            if count < 2 {
                bail!("batch_norm: training needs more than one value per channel, got {count}");
            }
            let total = |t: &Tensor| -> Result<Tensor> {
                masked(t, mask.as_ref())?.sum_keepdim(0)?.sum_keepdim(1)? / count as f64
            };
            let mean = total(x)?;
            let centered = x.broadcast_sub(&mean)?;
            let var = total(&centered.sqr()?)?;
            let y = centered.broadcast_div(&(&var + CONV_NORM_EPS)?.sqrt()?)?;
            let values = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1();
            let moments = BatchMoments {
                mean: values(&mean)?,
                var: values(&var)?,
                count,
            };
            (y, Some(moments))
        }
        BatchNormMode::Eval {
            running_mean,
            running_var,
        } => {
            if running_mean.len() != c || running_var.len() != c {
                bail!("batch_norm: the running statistics must have {c} channels");
            }
            let stat = |v: &[f32]| Tensor::from_slice(v, c, x.device())?.to_dtype(x.dtype());
            let (mean, var) = (stat(running_mean)?, stat(running_var)?);
            let y = x
                .broadcast_sub(&mean)?
                .broadcast_div(&(var + CONV_NORM_EPS)?.sqrt()?)?;
            (y, None)
        }
    };
    Ok((affine_silu(&normalised, weight, bias)?, moments))
}

/// GroupNorm (eps 1e-5) with `groups` groups of consecutive channels and a
/// per-channel affine, then SiLU, on channels-last `x` (B, N, C) of any float
/// dtype. Each item's
/// statistics are taken over its group's channels and its frames t <
/// lengths[b] (every frame when `lengths` is None).
pub fn group_norm_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    lengths: Option<&[usize]>,
) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if groups == 0 || !c.is_multiple_of(groups) {
        bail!("group_norm: {c} channels cannot form {groups} groups");
    }
    let per_group = c / groups;
    let mask = count_mask(x, lengths)?
        .map(|m| m.reshape((b, n, 1, 1)))
        .transpose()?;
    let counts: Vec<f32> = (0..b)
        .map(|i| (lengths.map_or(n, |l| l[i]).max(1) * per_group) as f32)
        .collect();
    let counts = Tensor::from_vec(counts, (b, 1, 1, 1), x.device())?.to_dtype(x.dtype())?;
    let total = |t: &Tensor| -> Result<Tensor> {
        masked(t, mask.as_ref())?
            .sum_keepdim(3)?
            .sum_keepdim(1)?
            .broadcast_div(&counts)
    };
    let x = x.reshape((b, n, groups, per_group))?;
    let centered = x.broadcast_sub(&total(&x)?)?;
    let var = total(&centered.sqr()?)?;
    let y = centered
        .broadcast_div(&(var + CONV_NORM_EPS)?.sqrt()?)?
        .reshape((b, n, c))?;
    affine_silu(&y, weight, bias)
}

/// LayerNorm over the channels (eps 1e-5, the fused kernel of the model's
/// other LayerNorms), then SiLU, on (B, N, C).
pub fn layer_norm_silu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    silu(&layer_norm(x, weight, bias, CONV_NORM_EPS)?)
}

/// SiLU(y·weight + bias) over the last dimension.
fn affine_silu(y: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    silu(&y.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// (B, N, 1) with 1 where t < lengths[b] and 0 elsewhere, for the (B, N, C)
/// `x`; None when `lengths` is None.
fn count_mask(x: &Tensor, lengths: Option<&[usize]>) -> Result<Option<Tensor>> {
    let (b, n, _) = x.dims3()?;
    let Some(lengths) = lengths else {
        return Ok(None);
    };
    if lengths.len() != b || lengths.iter().any(|&l| l > n) {
        bail!("conv norm: lengths {lengths:?} must be {b} values <= N = {n}");
    }
    let mask: Vec<f32> = lengths
        .iter()
        .flat_map(|&l| (0..n).map(move |t| if t < l { 1.0 } else { 0.0 }))
        .collect();
    Ok(Some(
        Tensor::from_vec(mask, (b, n, 1), x.device())?.to_dtype(x.dtype())?,
    ))
}

/// `t` times `mask` (broadcast), or `t` itself without a mask.
fn masked(t: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        Some(m) => t.broadcast_mul(m),
        None => Ok(t.clone()),
    }
}

/// The norm of one convolution module, its parameters and running statistics.
pub enum ConvNormLayer {
    /// BatchRenorm1d (the reference default).
    BatchRenorm {
        /// Scale.
        weight: Var,
        /// Shift.
        bias: Var,
        /// Running statistics.
        state: Mutex<RenormState>,
    },
    /// BatchNorm1d.
    BatchNorm {
        /// Scale.
        weight: Var,
        /// Shift.
        bias: Var,
        /// Running statistics.
        state: Mutex<BatchNormState>,
    },
    /// LayerNorm over the channels.
    Layer {
        /// Scale.
        weight: Var,
        /// Shift.
        bias: Var,
    },
    /// GroupNorm with [`GROUP_NORM_GROUPS`] groups.
    Group {
        /// Scale.
        weight: Var,
        /// Shift.
        bias: Var,
    },
    /// No norm (the SiLU stays).
    Identity,
}

impl ConvNormLayer {
    /// The norm of kind `kind` over `channels` channels, named `prefix`
    /// (`layers.{i}.conv.fn.batch_norm`).
    pub fn new(b: &Builder, prefix: &str, channels: usize, kind: ConvNorm) -> Self {
        let weight = || b.param(&format!("{prefix}.weight"), &[channels], Init::Const(1.0));
        let bias = || b.param(&format!("{prefix}.bias"), &[channels], Init::Const(0.0));
        let buffer = |name: &str, init: f32| {
            b.buffer(&format!("{prefix}.{name}"), &[channels], Init::Const(init))
        };
        let counter = || b.int_buffer(&format!("{prefix}.num_batches_tracked"), 0);
        match kind {
            ConvNorm::BatchRenorm => ConvNormLayer::BatchRenorm {
                weight: weight(),
                bias: bias(),
                state: Mutex::new(RenormState {
                    mean: buffer("running_mean", 0.0),
                    std: buffer("running_std", 1.0),
                    num_batches_tracked: counter(),
                }),
            },
            ConvNorm::BatchNorm => ConvNormLayer::BatchNorm {
                weight: weight(),
                bias: bias(),
                state: Mutex::new(BatchNormState {
                    mean: buffer("running_mean", 0.0),
                    var: buffer("running_var", 1.0),
                    num_batches_tracked: counter(),
                }),
            },
            ConvNorm::LayerNorm => ConvNormLayer::Layer {
                weight: weight(),
                bias: bias(),
            },
            ConvNorm::GroupNorm => ConvNormLayer::Group {
                weight: weight(),
                bias: bias(),
            },
            ConvNorm::None => ConvNormLayer::Identity,
        }
    }

    /// The norm and SiLU applied to (B, N, C). A training forward updates the
    /// running statistics once; the recomputation of a checkpointed block
    /// (`ctx.recomputing`) leaves them alone, and BatchRenorm's normalises
    /// with the state of the first pass (`ctx.renorm_replay`). Under mixed
    /// precision the norm runs in f32 (as autocast runs batch norm) and its
    /// output is cast back.
    pub fn forward(&self, h: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let dtype = h.dtype();
        self.forward_f32(&h.to_dtype(DType::F32)?, ctx)?
            .to_dtype(dtype)
    }

    fn forward_f32(&self, h: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        // Frames counted by the statistics (every frame for the reference's behaviour).
        let lengths = if ctx.brn_stats_include_padding {
            None
        } else {
            ctx.lengths.as_deref()
        };
        match self {
            ConvNormLayer::BatchRenorm {
                weight,
                bias,
                state,
            } => batch_renorm_forward(h, &ctx.w_f32(weight), &ctx.w_f32(bias), state, lengths, ctx),
            ConvNormLayer::BatchNorm {
                weight,
                bias,
                state,
            } => {
                let (w, b) = (ctx.w_f32(weight), ctx.w_f32(bias));
                if !ctx.train {
                    let s = lock(state);
                    let mode = BatchNormMode::Eval {
                        running_mean: &s.mean,
                        running_var: &s.var,
                    };
                    return Ok(batch_norm_silu(h, &w, &b, mode)?.0);
                }
                let (y, moments) = batch_norm_silu(h, &w, &b, BatchNormMode::Train { lengths })?;
                if let (Some(m), false) = (moments, ctx.recomputing) {
                    lock(state).update(&m);
                }
                Ok(y)
            }
            ConvNormLayer::Layer { weight, bias } => {
                layer_norm_silu(h, &ctx.w_f32(weight), &ctx.w_f32(bias))
            }
            ConvNormLayer::Group { weight, bias } => group_norm_silu(
                h,
                &ctx.w_f32(weight),
                &ctx.w_f32(bias),
                GROUP_NORM_GROUPS,
                lengths,
            ),
            ConvNormLayer::Identity => silu(h),
        }
    }

    /// A copy of the running statistics, for the norms that keep them.
    pub fn running_stats(&self) -> Option<RunningStats> {
        match self {
            ConvNormLayer::BatchRenorm { state, .. } => {
                Some(RunningStats::Renorm(lock(state).clone()))
            }
            ConvNormLayer::BatchNorm { state, .. } => {
                Some(RunningStats::Batch(lock(state).clone()))
            }
            _ => None,
        }
    }

    /// Replaces the running statistics; fails when `stats` are of another
    /// kind or width than this norm's.
    pub fn set_running_stats(&self, stats: RunningStats) -> anyhow::Result<()> {
        match (self, stats) {
            (ConvNormLayer::BatchRenorm { state, .. }, RunningStats::Renorm(s))
                if s.mean.len() == lock(state).mean.len() && s.std.len() == s.mean.len() =>
            {
                *lock(state) = s;
            }
            (ConvNormLayer::BatchNorm { state, .. }, RunningStats::Batch(s))
                if s.mean.len() == lock(state).mean.len() && s.var.len() == s.mean.len() =>
            {
                *lock(state) = s;
            }
            (_, s) => anyhow::bail!(
                "running statistics {} do not fit this conv norm ({:?})",
                describe(&Some(s)),
                describe(&self.running_stats())
            ),
        }
        Ok(())
    }
}

/// The kind and width of running statistics, for error messages.
fn describe(stats: &Option<RunningStats>) -> String {
    match stats {
        Some(RunningStats::Renorm(s)) => format!("BatchRenorm of {} channels", s.mean.len()),
        Some(RunningStats::Batch(s)) => format!("BatchNorm of {} channels", s.mean.len()),
        None => "none".into(),
    }
}

/// Locks a norm's running statistics; a poisoned lock only means another
/// thread panicked, and the values stay usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// BatchRenorm + SiLU on the fused kernel, updating `state` after a training
/// forward that is not a recomputation.
fn batch_renorm_forward(
    h: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    state: &Mutex<RenormState>,
    lengths: Option<&[usize]>,
    ctx: &Ctx,
) -> Result<Tensor> {
    let mut live = lock(state);
    if !ctx.train {
        let mode = RenormMode::Eval {
            running_mean: &live.mean,
            running_std: &live.std,
        };
        return Ok(batch_renorm_silu(h, weight, bias, mode)?.0);
    }
    // A checkpointed block's recomputation normalises with the state of its
    // first pass and must not update the statistics again.
    let replay = ctx.renorm_replay.as_ref();
    let used = replay.unwrap_or(&live);
    let (rmax, dmax) = used.limits();
    let mode = RenormMode::Train {
        running_mean: &used.mean,
        running_std: &used.std,
        rmax,
        dmax,
        eps: RENORM_EPS,
        lengths,
    };
    let (y, stats) = batch_renorm_silu(h, weight, bias, mode)?;
    if let (Some(stats), None) = (stats, replay) {
        let st = &mut *live;
        for (r, m) in st.mean.iter_mut().zip(&stats.mean) {
            *r += RENORM_MOMENTUM * (m - *r);
        }
        for (r, s) in st.std.iter_mut().zip(&stats.std) {
            *r += RENORM_MOMENTUM * (s - *r);
        }
        st.num_batches_tracked += 1;
    }
    Ok(y)
}
