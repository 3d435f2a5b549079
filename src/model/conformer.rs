//! One pre-norm macaron Conformer block and its modules (reference-spec
//! §3.5a–§3.7): ½·FF, multi-head self-attention, the convolution module with
//! BatchRenorm, ½·FF, and a final norm.

use std::sync::Mutex;

use candle_core::{Result, Tensor, Var};
use lcasr_kernels::attention::{attention, AttentionOptions};
use lcasr_kernels::batch_renorm::{batch_renorm_silu, RenormMode};
use lcasr_kernels::depthwise_conv::depthwise_conv1d;
use lcasr_kernels::glu::glu;

use super::builder::{Builder, Init};
use super::layers::{Ctx, Linear, Norm};
use crate::config::ModelConfig;

/// Feed-forward: Linear(d → e·d), tanh-GELU, Linear(e·d → d).
struct FeedForward {
    fc1: Linear,
    fc2: Linear,
}

impl FeedForward {
    fn new(b: &Builder, name: &str, d: usize, hidden: usize, bias: bool) -> Self {
        FeedForward {
            fc1: Linear::new(b, &format!("{name}.fc1"), d, hidden, bias),
            fc2: Linear::new(b, &format!("{name}.fc2"), hidden, d, bias),
        }
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x, ctx)?.gelu()?, ctx)
    }
}

/// Multi-head self-attention on the memory-linear kernel.
struct SelfAttention {
    qkv: Linear,
    out: Linear,
    n_heads: usize,
    head_dim: usize,
    dropout: f64,
    window_left: Option<usize>,
    window_right: Option<usize>,
}

impl SelfAttention {
    fn new(b: &Builder, name: &str, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model as usize;
        let inner = (cfg.n_heads * cfg.head_dim) as usize;
        let side = |v: i64| (v >= 0).then_some(v as usize);
        let both = side(cfg.attention_window_size);
        let left = side(cfg.attention_window_size_left).or(both);
        let right = if cfg.causal {
            Some(0)
        } else {
            side(cfg.attention_window_size_right).or(both)
        };
        SelfAttention {
            qkv: Linear::new(b, &format!("{name}.qkv_proj"), d, 3 * inner, cfg.qkv_bias),
            out: Linear::new(b, &format!("{name}.out_proj"), inner, d, false),
            n_heads: cfg.n_heads as usize,
            head_dim: cfg.head_dim as usize,
            dropout: cfg.dropout_attn,
            window_left: left,
            window_right: right,
        }
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let x = ctx.zero_padding(x)?;
        let qkv = self.qkv.forward(&x, ctx)?;
        let dropout =
            (ctx.train && self.dropout > 0.0).then(|| (self.dropout as f32, ctx.next_seed()));
        let opts = AttentionOptions {
            n_heads: self.n_heads,
            head_dim: self.head_dim,
            rotary: ctx
                .rotary
                .as_deref()
                .map(|(c, s)| (c.as_slice(), s.as_slice())),
            lengths: ctx.lengths.as_deref(),
            window_left: self.window_left,
            window_right: self.window_right,
            dropout,
        };
        let o = attention(&qkv, &opts)?;
        self.out.forward(&o, ctx)
    }
}

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

/// Momentum of the BatchRenorm running statistics.
const RENORM_MOMENTUM: f32 = 0.01;
/// Epsilon added to the batch standard deviation.
const RENORM_EPS: f32 = 1e-3;

/// The convolution module: pointwise conv → GLU → depthwise conv →
/// BatchRenorm → SiLU → pointwise conv.
struct ConvModule {
    pw1: Linear,
    dw_weight: Var,
    dw_bias: Var,
    bn_weight: Var,
    bn_bias: Var,
    state: Mutex<RenormState>,
    pw2: Linear,
    inner: usize,
    kernel: usize,
    prefix: String,
}

impl ConvModule {
    fn new(b: &Builder, name: &str, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model as usize;
        let inner = (cfg.d_model as f64 * cfg.conv_expansion_factor) as usize;
        let k = cfg.conv_kernel_size as usize;
        let bn = format!("{name}.batch_norm");
        ConvModule {
            pw1: Linear::with_shape(
                b,
                &format!("{name}.pointwise_conv1"),
                d,
                2 * inner,
                true,
                &[2 * inner, d, 1],
            ),
            dw_weight: b.param(
                &format!("{name}.depthwise_conv.weight"),
                &[inner, 1, k],
                Init::FanIn(k),
            ),
            dw_bias: b.param(
                &format!("{name}.depthwise_conv.bias"),
                &[inner],
                Init::FanIn(k),
            ),
            bn_weight: b.param(&format!("{bn}.weight"), &[inner], Init::Const(1.0)),
            bn_bias: b.param(&format!("{bn}.bias"), &[inner], Init::Const(0.0)),
            state: Mutex::new(RenormState {
                mean: b.buffer(&format!("{bn}.running_mean"), &[inner], Init::Const(0.0)),
                std: b.buffer(&format!("{bn}.running_std"), &[inner], Init::Const(1.0)),
                num_batches_tracked: b.int_buffer(&format!("{bn}.num_batches_tracked"), 0),
            }),
            pw2: Linear::with_shape(
                b,
                &format!("{name}.pointwise_conv2"),
                inner,
                d,
                true,
                &[d, inner, 1],
            ),
            inner,
            kernel: k,
            prefix: bn,
        }
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let h = glu(&self.pw1.forward(x, ctx)?)?;
        let h = ctx.zero_padding(&h)?;
        let w = ctx.w(&self.dw_weight).reshape((self.inner, self.kernel))?;
        let h = depthwise_conv1d(&h, &w, &ctx.w(&self.dw_bias))?;
        let mut live = self.state.lock().expect("renorm state");
        let h = if ctx.train {
            // A checkpointed block's recomputation normalises with the state
            // of its first pass and must not update the statistics again.
            let replay = ctx.renorm_replay.as_ref();
            let state = replay.unwrap_or(&live);
            let (rmax, dmax) = state.limits();
            let lengths = if ctx.brn_stats_include_padding {
                None
            } else {
                ctx.lengths.as_deref()
            };
            let (h, stats) = batch_renorm_silu(
                &h,
                &ctx.w(&self.bn_weight),
                &ctx.w(&self.bn_bias),
                RenormMode::Train {
                    running_mean: &state.mean,
                    running_std: &state.std,
                    rmax,
                    dmax,
                    eps: RENORM_EPS,
                    lengths,
                },
            )?;
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
            h
        } else {
            batch_renorm_silu(
                &h,
                &ctx.w(&self.bn_weight),
                &ctx.w(&self.bn_bias),
                RenormMode::Eval {
                    running_mean: &live.mean,
                    running_std: &live.std,
                },
            )?
            .0
        };
        drop(live);
        self.pw2.forward(&h, ctx)
    }
}

/// One Conformer block (`layers.{i}.*`).
pub struct ConformerLayer {
    ff1: Option<(Norm, FeedForward, Option<Norm>)>,
    attn_norm: Norm,
    attn: SelfAttention,
    attn_norm_out: Option<Norm>,
    conv: Option<(Norm, ConvModule)>,
    ff2: (Norm, FeedForward, Option<Norm>),
    norm_out: Norm,
    dropout_ff: f64,
    dropout_conv: f64,
}

impl ConformerLayer {
    /// Block `index` of a model configured by `cfg`.
    pub fn new(b: &Builder, index: usize, cfg: &ModelConfig) -> Self {
        let p = format!("layers.{index}");
        let d = cfg.d_model as usize;
        let kind = cfg.default_norm;
        let hidden = (cfg.expansion_factor * cfg.d_model) as usize;
        let ff = |name: &str| {
            (
                Norm::new(b, &format!("{p}.{name}.fn.norm"), d, kind),
                FeedForward::new(b, &format!("{p}.{name}.fn.fn"), d, hidden, cfg.bias_in_ff),
                cfg.sandwich_norm
                    .then(|| Norm::new(b, &format!("{p}.{name}.fn.norm_out"), d, kind)),
            )
        };
        ConformerLayer {
            ff1: (!cfg.transformer).then(|| ff("ff1")),
            attn_norm: Norm::new(b, &format!("{p}.attend.norm"), d, kind),
            attn: SelfAttention::new(b, &format!("{p}.attend.fn"), cfg),
            attn_norm_out: cfg
                .sandwich_norm
                .then(|| Norm::new(b, &format!("{p}.attn_norm_out"), d, kind)),
            conv: (!cfg.transformer).then(|| {
                (
                    Norm::new(b, &format!("{p}.conv.norm"), d, kind),
                    ConvModule::new(b, &format!("{p}.conv.fn"), cfg),
                )
            }),
            ff2: ff("ff2"),
            norm_out: Norm::new(b, &format!("{p}.norm_out"), d, kind),
            dropout_ff: cfg.dropout_ff,
            dropout_conv: cfg.dropout_conv,
        }
    }

    fn half_ff(
        &self,
        x: &Tensor,
        ff: &(Norm, FeedForward, Option<Norm>),
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (norm, net, sandwich) = ff;
        let mut h = net.forward(&norm.forward(x, ctx)?, ctx)?;
        if let Some(n) = sandwich {
            h = n.forward(&h, ctx)?;
        }
        let h = ctx.dropout(&(h * 0.5)?, self.dropout_ff)?;
        x + h
    }

    /// The block applied to (B, N, d).
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(ff1) = &self.ff1 {
            x = self.half_ff(&x, ff1, ctx)?;
        }
        let mut h = self.attn.forward(&self.attn_norm.forward(&x, ctx)?, ctx)?;
        h = ctx.dropout(&h, self.dropout_ff.min(0.1))?;
        if let Some(n) = &self.attn_norm_out {
            h = n.forward(&h, ctx)?;
        }
        x = (x + h)?;
        if let Some((norm, conv)) = &self.conv {
            let h = conv.forward(&norm.forward(&x, ctx)?, ctx)?;
            x = (x + ctx.dropout(&h, self.dropout_conv)?)?;
        }
        x = self.half_ff(&x, &self.ff2, ctx)?;
        self.norm_out.forward(&x, ctx)
    }

    /// The BatchRenorm state of the block's convolution module, with its
    /// state-dict prefix (`layers.{i}.conv.fn.batch_norm`).
    pub fn renorm_state(&self) -> Option<(String, RenormState)> {
        self.conv.as_ref().map(|(_, c)| {
            (
                c.prefix.clone(),
                c.state.lock().expect("renorm state").clone(),
            )
        })
    }

    /// Replaces the BatchRenorm state (when resuming).
    pub fn set_renorm_state(&self, state: RenormState) {
        if let Some((_, c)) = &self.conv {
            *c.state.lock().expect("renorm state") = state;
        }
    }
}
