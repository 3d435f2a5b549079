//! One pre-norm macaron Conformer block and its modules (reference-spec
//! §3.5a–§3.7): ½·FF, multi-head self-attention, the convolution module with
//! its norm (BatchRenorm by default), ½·FF, and a final norm.

use candle_core::{Result, Tensor, Var};
use lcasr_kernels::activation::gelu_tanh;
use lcasr_kernels::attention::{attention, AttentionOptions};
use lcasr_kernels::depthwise_conv::depthwise_conv1d;
use lcasr_kernels::glu::glu;

use super::builder::{Builder, Init};
use super::conv_norm::{ConvNormLayer, RenormState, RunningStats};
use super::layers::{rotate_qkv, Ctx, Linear, Norm};
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
        self.fc2
            .forward(&gelu_tanh(&self.fc1.forward(x, ctx)?)?, ctx)
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
        let mut qkv = self.qkv.forward(&x, ctx)?;
        if let Some((cos, sin)) = &ctx.learned_rotary {
            qkv = rotate_qkv(&qkv, cos, sin, self.n_heads, self.head_dim)?;
        }
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
            // Inference keeps no graph: candle-flash-attn may take it.
            forward_only: !ctx.train,
        };
        let o = attention(&qkv, &opts)?;
        self.out.forward(&o, ctx)
    }
}

/// The convolution module: pointwise conv → GLU → depthwise conv → the
/// conv norm and SiLU ([`ConvNormLayer`]) → pointwise conv.
struct ConvModule {
    pw1: Linear,
    dw_weight: Var,
    dw_bias: Var,
    norm: ConvNormLayer,
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
            norm: ConvNormLayer::new(b, &bn, inner, cfg.conv_norm),
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
        let w = ctx.w(&self.dw_weight)?.reshape((self.inner, self.kernel))?;
        let h = depthwise_conv1d(&h, &w, &ctx.w(&self.dw_bias)?)?;
        let h = self.norm.forward(&h, ctx)?;
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

    /// The running statistics of the block's conv norm, when it keeps them,
    /// with their state-dict prefix (`layers.{i}.conv.fn.batch_norm`).
    pub fn running_stats(&self) -> Option<(String, RunningStats)> {
        let (_, conv) = self.conv.as_ref()?;
        Some((conv.prefix.clone(), conv.norm.running_stats()?))
    }

    /// The BatchRenorm state of the block's conv norm, if it is one.
    pub fn renorm_state(&self) -> Option<RenormState> {
        match self.running_stats()? {
            (_, RunningStats::Renorm(s)) => Some(s),
            _ => None,
        }
    }

    /// Replaces the running statistics of the block's conv norm (when
    /// resuming); fails when the block keeps none or others.
    pub fn set_running_stats(&self, stats: RunningStats) -> anyhow::Result<()> {
        match &self.conv {
            Some((_, conv)) => conv
                .norm
                .set_running_stats(stats)
                .map_err(|e| anyhow::anyhow!("`{}`: {e}", conv.prefix)),
            None => {
                anyhow::bail!("a block without a convolution module keeps no running statistics")
            }
        }
    }
}
