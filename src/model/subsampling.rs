//! The convolutional front-end: 2^k time (and frequency) reduction with
//! stride-2 3x3 convolutions, then a linear map to d_model (reference-spec §3.2).

use candle_core::{Result, Tensor, Var};
use lcasr_kernels::conv2d::{conv2d_k3s2, depthwise_conv2d_k3s2, out_len};

use super::builder::{Builder, Init};
use super::layers::{Ctx, Linear, Norm};
use crate::config::{Activation, ModelConfig, Subsampling as Kind};

/// One stride-2 stage.
enum Stage {
    /// A full 3x3 convolution.
    Full { weight: Var, bias: Var },
    /// A depthwise 3x3 convolution followed by a pointwise (1x1) one.
    Separable {
        dw_weight: Var,
        dw_bias: Var,
        pw_weight: Var,
        pw_bias: Var,
    },
}

/// The subsampling module (`subsampling.*` in the state dict).
pub struct Subsampling {
    stages: Vec<Stage>,
    act: Activation,
    channels: usize,
    out: Linear,
    norm_out: Option<Norm>,
}

impl Subsampling {
    /// Builds the module for `cfg`; `stacking` is refused.
    pub fn new(b: &Builder, cfg: &ModelConfig) -> anyhow::Result<Self> {
        let c = cfg.subsampling_channels() as usize;
        let n_stages = cfg.subsampling_factor.trailing_zeros() as usize;
        let d = cfg.d_model as usize;
        let mut stages = Vec::with_capacity(n_stages);
        match cfg.subsampling {
            Kind::Stacking => anyhow::bail!(
                "model.subsampling: `stacking` is not supported; use dw_striding or striding"
            ),
            Kind::DwStriding => {
                stages.push(full_stage(b, "subsampling.conv.0", 1, c));
                for s in 1..n_stages {
                    let dw = format!("subsampling.conv.{}", 3 * s - 1);
                    let pw = format!("subsampling.conv.{}", 3 * s);
                    stages.push(Stage::Separable {
                        dw_weight: b.param(&format!("{dw}.weight"), &[c, 1, 3, 3], Init::FanIn(9)),
                        dw_bias: b.param(&format!("{dw}.bias"), &[c], Init::FanIn(9)),
                        pw_weight: b.param(&format!("{pw}.weight"), &[c, c, 1, 1], Init::FanIn(c)),
                        pw_bias: b.param(&format!("{pw}.bias"), &[c], Init::FanIn(c)),
                    });
                }
            }
            Kind::Striding => {
                for s in 0..n_stages {
                    let c_in = if s == 0 { 1 } else { c };
                    stages.push(full_stage(
                        b,
                        &format!("subsampling.conv.{}", 2 * s),
                        c_in,
                        c,
                    ));
                }
            }
        }
        let mut f = cfg.feat_in as usize;
        for _ in 0..n_stages {
            f = out_len(f);
        }
        let out = Linear::new(b, "subsampling.out", c * f, d, cfg.subsampling_norm_out);
        let norm_out = cfg
            .subsampling_norm_out
            .then(|| Norm::layer(b, "subsampling.norm_out", d));
        Ok(Subsampling {
            stages,
            act: cfg.subsampling_act,
            channels: c,
            out,
            norm_out,
        })
    }

    /// (B, T, F) features and valid lengths to (B, N, d) and encoder lengths.
    pub fn forward(
        &self,
        x: &Tensor,
        lengths: &[usize],
        ctx: &Ctx,
    ) -> Result<(Tensor, Vec<usize>)> {
        let (batch, _, _) = x.dims3()?;
        let mut h = x.unsqueeze(1)?;
        for stage in &self.stages {
            h = match stage {
                Stage::Full { weight, bias } => conv2d_k3s2(&h, &ctx.w(weight), &ctx.w(bias))?,
                Stage::Separable {
                    dw_weight,
                    dw_bias,
                    pw_weight,
                    pw_bias,
                } => {
                    let h = depthwise_conv2d_k3s2(&h, &ctx.w(dw_weight), &ctx.w(dw_bias))?;
                    pointwise(&h, &ctx.w(pw_weight), &ctx.w(pw_bias))?
                }
            };
            h = activate(&h, self.act)?;
        }
        let (_, c, t, f) = h.dims4()?;
        debug_assert_eq!(c, self.channels);
        let h = h.permute((0, 2, 1, 3))?.reshape((batch, t, c * f))?;
        let mut y = self.out.forward(&h, ctx)?;
        if let Some(norm) = &self.norm_out {
            y = norm.forward(&y, ctx)?;
        }
        let out_lengths = lengths
            .iter()
            .map(|&l| {
                let mut l = l;
                for _ in 0..self.stages.len() {
                    l = if l == 0 { 0 } else { out_len(l) };
                }
                l
            })
            .collect();
        Ok((y, out_lengths))
    }
}

fn full_stage(b: &Builder, name: &str, c_in: usize, c_out: usize) -> Stage {
    Stage::Full {
        weight: b.param(
            &format!("{name}.weight"),
            &[c_out, c_in, 3, 3],
            Init::FanIn(c_in * 9),
        ),
        bias: b.param(&format!("{name}.bias"), &[c_out], Init::FanIn(c_in * 9)),
    }
}

/// A 1x1 convolution over NCHW as a batched matrix product.
fn pointwise(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let c_out = weight.dim(0)?;
    let wm = weight.reshape((c_out, c))?.broadcast_left(b)?;
    let y = wm.matmul(&x.reshape((b, c, h * w))?)?;
    y.broadcast_add(&bias.reshape((c_out, 1))?)?
        .reshape((b, c_out, h, w))
}

fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Silu => x.silu(),
        Activation::Relu => x.relu(),
        Activation::Gelu => x.gelu_erf(),
        Activation::None => Ok(x.clone()),
    }
}
