//! The small building blocks: linear maps, norms, dropout, and the per-forward
//! context they share.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var};
use lcasr_kernels::composed::add_bias;
use lcasr_kernels::norm::{layer_norm, rms_norm};
use lcasr_kernels::softmax::{linear_softmax, softmax_last_dim};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::builder::{Builder, Init};
use super::conv_norm::RenormState;
use crate::config::NormKind;

/// What one forward pass needs besides the input: the mode, the padding and
/// the dropout randomness.
pub struct Ctx {
    /// Training mode: batch statistics, dropout, a recorded graph.
    pub train: bool,
    /// Valid encoder frames per item, or `None` when every item is full
    /// length (then no masking happens anywhere, as in the reference).
    pub lengths: Option<Vec<usize>>,
    /// (B, N, 1) with 1 at valid frames and 0 at padding, when `lengths` is set.
    pub mask: Option<Tensor>,
    /// Rotary cos/sin tables (N x head_dim each), when rotary is on; shared
    /// with the recomputation of checkpointed blocks.
    pub rotary: Option<Arc<(Vec<f32>, Vec<f32>)>>,
    /// cos/sin (N x head_dim each) of trainable rotary frequencies
    /// (`learned_rotary`), recorded in the graph; the attention then rotates
    /// q and k itself ([`rotate_qkv`]) instead of its kernel.
    pub learned_rotary: Option<(Tensor, Tensor)>,
    /// BatchRenorm statistics include padded frames (the reference's behaviour).
    pub brn_stats_include_padding: bool,
    /// Set only while a checkpointed block recomputes its forward during
    /// backward: the BatchRenorm state the block saw in its first pass. The
    /// recomputation normalises with it and leaves the live running
    /// statistics alone, so they are updated once per training forward.
    pub renorm_replay: Option<RenormState>,
    /// True only while a checkpointed block recomputes its forward during
    /// backward: norms with running statistics must not update them again.
    pub recomputing: bool,
    /// The compute dtype (f32, or bf16/f16 under mixed precision).
    pub dtype: DType,
    /// Parameters enter the autograd graph (false in evaluation and in the
    /// graph-free first pass of a checkpointed block).
    graph: bool,
    dropout_rng: RefCell<ChaCha8Rng>,
}

impl Ctx {
    /// A context; `dropout_seed` seeds every dropout mask of this forward.
    pub fn new(train: bool, lengths: Option<Vec<usize>>, dropout_seed: u64) -> Self {
        Ctx {
            train,
            lengths,
            mask: None,
            rotary: None,
            learned_rotary: None,
            brn_stats_include_padding: false,
            renorm_replay: None,
            recomputing: false,
            dtype: DType::F32,
            graph: train,
            dropout_rng: RefCell::new(ChaCha8Rng::seed_from_u64(dropout_seed)),
        }
    }

    /// A copy of this context whose dropout stream starts where this one is
    /// now (so it draws the same masks next), recording a graph or not, with
    /// `renorm_replay` set as given and `recomputing` as in this one.
    pub fn fork(&self, graph: bool, renorm_replay: Option<RenormState>) -> Ctx {
        Ctx {
            train: self.train,
            lengths: self.lengths.clone(),
            mask: self.mask.clone(),
            rotary: self.rotary.clone(),
            learned_rotary: self.learned_rotary.clone(),
            brn_stats_include_padding: self.brn_stats_include_padding,
            renorm_replay,
            recomputing: self.recomputing,
            dtype: self.dtype,
            graph,
            dropout_rng: RefCell::new(self.dropout_rng.borrow().clone()),
        }
    }

    /// Moves this context's dropout stream to where `fork`'s is, after the
    /// fork ran part of the forward in this context's place.
    pub fn continue_after(&self, fork: &Ctx) {
        *self.dropout_rng.borrow_mut() = fork.dropout_rng.borrow().clone();
    }

    /// True when parameters enter the autograd graph of this forward.
    pub fn records_graph(&self) -> bool {
        self.graph
    }

    /// The f32 tensor of a parameter: tracked by autograd when this forward
    /// records a graph, detached otherwise.
    pub fn w_f32(&self, v: &Var) -> Tensor {
        if self.graph {
            v.as_tensor().clone()
        } else {
            v.as_detached_tensor()
        }
    }

    /// A parameter in the compute dtype ([`Ctx::w_f32`] cast, so that its
    /// gradient flows back to the f32 parameter).
    pub fn w(&self, v: &Var) -> Result<Tensor> {
        self.w_f32(v).to_dtype(self.dtype)
    }

    /// Inverted dropout with probability `p` (identity in eval or when p = 0).
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let scale = (1.0 / (1.0 - p)) as f32;
        let mut rng = self.dropout_rng.borrow_mut();
        let mask: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { scale })
            .collect();
        let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }

    /// A fresh seed for a kernel that draws its own dropout masks.
    pub fn next_seed(&self) -> u64 {
        self.dropout_rng.borrow_mut().random()
    }

    /// Zeroes padded frames of a (B, N, C) tensor (identity without padding).
    pub fn zero_padding(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(m) => x.broadcast_mul(m),
            None => Ok(x.clone()),
        }
    }
}

/// y = x·Wᵀ (+ b) over the last dimension. Weights may carry trailing unit
/// dimensions (1-wide convolutions), which are dropped.
pub struct Linear {
    weight: Var,
    bias: Option<Var>,
    out_dim: usize,
    in_dim: usize,
}

impl Linear {
    /// A linear map `name.weight` (out, in) and optionally `name.bias`.
    pub fn new(b: &Builder, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Self {
        Linear::with_shape(b, name, in_dim, out_dim, bias, &[out_dim, in_dim])
    }

    /// As [`Linear::new`], with the weight stored as `weight_shape`
    /// (e.g. (out, in, 1) for a kernel-1 convolution).
    pub fn with_shape(
        b: &Builder,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        weight_shape: &[usize],
    ) -> Self {
        let weight = b.param(&format!("{name}.weight"), weight_shape, Init::FanIn(in_dim));
        let bias = bias.then(|| b.param(&format!("{name}.bias"), &[out_dim], Init::FanIn(in_dim)));
        Linear {
            weight,
            bias,
            out_dim,
            in_dim,
        }
    }

    /// The weight as an (out, in) matrix, whatever shape it is stored in.
    fn matrix(&self, ctx: &Ctx) -> Result<Tensor> {
        ctx.w(&self.weight)?.reshape((self.out_dim, self.in_dim))
    }

    /// `softmax(forward(x))` over the last dimension; with a bias, as one fused
    /// op that keeps no logits for the backward (`linear_softmax`).
    pub fn softmax(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match &self.bias {
            Some(b) => linear_softmax(x, &self.matrix(ctx)?, &ctx.w(b)?),
            None => softmax_last_dim(&self.forward(x, ctx)?),
        }
    }

    /// Applies the map to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let mut y = x
            .reshape((rows, self.in_dim))?
            .matmul(&self.matrix(ctx)?.t()?)?;
        if let Some(b) = &self.bias {
            y = add_bias(&y, &ctx.w(b)?)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim;
        y.reshape(out_dims)
    }
}

/// LayerNorm (eps 1e-5, weight and bias) or RMSNorm (eps 1e-5, weight) over
/// the last dimension, on the fused kernels.
pub enum Norm {
    /// LayerNorm.
    Layer {
        /// Scale.
        weight: Var,
        /// Shift.
        bias: Var,
    },
    /// RMSNorm with apex semantics: x / sqrt(mean(x²) + eps) · weight.
    Rms {
        /// Scale.
        weight: Var,
    },
}

/// Epsilon of every LayerNorm and RMSNorm of the model.
const NORM_EPS: f64 = 1e-5;

impl Norm {
    /// A norm named `name` of width `dim`. For RMSNorm the reference's pure
    /// torch fallback stored the scale as `.scale`; both names load.
    pub fn new(b: &Builder, name: &str, dim: usize, kind: NormKind) -> Self {
        match kind {
            NormKind::LayerNorm => Norm::Layer {
                weight: b.param(&format!("{name}.weight"), &[dim], Init::Const(1.0)),
                bias: b.param(&format!("{name}.bias"), &[dim], Init::Const(0.0)),
            },
            NormKind::RmsNorm => {
                let key = if b.has(&format!("{name}.scale")) {
                    format!("{name}.scale")
                } else {
                    format!("{name}.weight")
                };
                Norm::Rms {
                    weight: b.param(&key, &[dim], Init::Const(1.0)),
                }
            }
        }
    }

    /// A LayerNorm whatever the model's default norm.
    pub fn layer(b: &Builder, name: &str, dim: usize) -> Self {
        Norm::new(b, name, dim, NormKind::LayerNorm)
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match self {
            Norm::Layer { weight, bias } => layer_norm(x, &ctx.w(weight)?, &ctx.w(bias)?, NORM_EPS),
            Norm::Rms { weight } => rms_norm(x, &ctx.w(weight)?, NORM_EPS),
        }
    }
}

/// cos and sin (N, head_dim) of the rotary angles (p / `factor`) ·
/// inv_freq[j mod head_dim/2] for positions p < `n`, built from `inv_freq`
/// (head_dim/2) with candle ops so that gradients reach the frequencies; the
/// layout and f32 arithmetic of `lcasr_kernels::rotary::rotary_tables`.
pub fn rotary_cos_sin(inv_freq: &Tensor, n: usize, factor: f32) -> Result<(Tensor, Tensor)> {
    let positions: Vec<f32> = (0..n).map(|p| p as f32 / factor).collect();
    let positions = Tensor::from_vec(positions, (n, 1), inv_freq.device())?;
    let half = positions.broadcast_mul(&inv_freq.reshape((1, ()))?)?;
    let angles = Tensor::cat(&[&half, &half], 1)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Rotates q and k of an interleaved (B, N, 3·H·Dh) qkv (reference-spec
/// §3.6: (h, dh, which) with "which" innermost) by the rotate-half rotary of
/// the attention kernel, r(z) = z·cos + (−z[Dh/2:], z[:Dh/2])·sin, with `cos`
/// and `sin` of shape (N, Dh); v is left as it is.
pub fn rotate_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    n_heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let (b, n, _) = qkv.dims3()?;
    let half = head_dim / 2;
    let parts = qkv.reshape((b, n, n_heads, head_dim, 3))?;
    let cos = cos.reshape((1, n, 1, head_dim, 1))?;
    let sin = sin.reshape((1, n, 1, head_dim, 1))?;
    let rotate = |z: Tensor| -> Result<Tensor> {
        let turned = Tensor::cat(
            &[&z.narrow(3, half, half)?.neg()?, &z.narrow(3, 0, half)?],
            3,
        )?;
        z.broadcast_mul(&cos)? + turned.broadcast_mul(&sin)?
    };
    let q = rotate(parts.narrow(4, 0, 1)?)?;
    let k = rotate(parts.narrow(4, 1, 1)?)?;
    let v = parts.narrow(4, 2, 1)?;
    Tensor::cat(&[&q, &k, &v], 4)?.reshape((b, n, 3 * n_heads * head_dim))
}
