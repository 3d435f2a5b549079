//! The convolutional front-end: 2^k time (and frequency) reduction with
//! stride-2 3x3 convolutions, then a linear map to d_model (reference-spec §3.2).

use candle_core::{Result, Tensor, Var};
use lcasr_kernels::activation::silu;
use lcasr_kernels::composed::add_bias;
use lcasr_kernels::conv2d::{conv2d_k3s2, conv2d_k3s2_silu, depthwise_conv2d_k3s2, out_len};

use super::builder::{Builder, Init};
use super::layers::{Ctx, Linear, Norm};
use crate::config::{Activation, ModelConfig, Subsampling as Kind};

/// Output frames per window when the front-end runs without a graph on a
/// long input ([`Subsampling::forward`]): 2,048 frames (16,384 input
/// frames at 8x) keep the first convolution's output near 340 MB at 256
/// channels instead of 7.4 GB for one hour.
pub const CHUNK_OUTPUT_FRAMES: usize = 2048;

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
    ///
    /// Without an autograd graph (evaluation, inference) an input longer
    /// than [`CHUNK_OUTPUT_FRAMES`] output frames is processed in windows of
    /// that many output frames, so the peak memory of the wide first
    /// convolutions is bounded by the window rather than the recording; the
    /// result is the same as in one pass (see [`Subsampling::windowed`]).
    pub fn forward(
        &self,
        x: &Tensor,
        lengths: &[usize],
        ctx: &Ctx,
    ) -> Result<(Tensor, Vec<usize>)> {
        let t = x.dim(1)?;
        let factor = 1usize << self.stages.len();
        let y = if !ctx.records_graph() && t > CHUNK_OUTPUT_FRAMES * factor {
            self.windowed(x, ctx, CHUNK_OUTPUT_FRAMES)?
        } else {
            self.convolve(x, ctx)?
        };
        let out_lengths = lengths.iter().map(|&l| self.output_len(l)).collect();
        Ok((y, out_lengths))
    }

    /// Output frames of an input of `t` frames.
    fn output_len(&self, t: usize) -> usize {
        (0..self.stages.len()).fold(t, |l, _| if l == 0 { 0 } else { out_len(l) })
    }

    /// The whole front-end on (B, T, F) in one pass: (B, N, d).
    fn convolve(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (batch, _, _) = x.dims3()?;
        let mut h = x.unsqueeze(1)?;
        for stage in &self.stages {
            h = match stage {
                // The fused op keeps no pre-activation: at long context the largest tensor.
                Stage::Full { weight, bias } if self.act == Activation::Silu => {
                    conv2d_k3s2_silu(&h, &ctx.w(weight)?, &ctx.w(bias)?)?
                }
                Stage::Full { weight, bias } => {
                    activate(&conv2d_k3s2(&h, &ctx.w(weight)?, &ctx.w(bias)?)?, self.act)?
                }
                Stage::Separable {
                    dw_weight,
                    dw_bias,
                    pw_weight,
                    pw_bias,
                } => {
                    let h = depthwise_conv2d_k3s2(&h, &ctx.w(dw_weight)?, &ctx.w(dw_bias)?)?;
                    activate(
                        &pointwise(&h, &ctx.w(pw_weight)?, &ctx.w(pw_bias)?)?,
                        self.act,
                    )?
                }
            };
        }
        let (_, c, t, f) = h.dims4()?;
        debug_assert_eq!(c, self.channels);
        let h = h.permute((0, 2, 1, 3))?.reshape((batch, t, c * f))?;
        let y = self.out.forward(&h, ctx)?;
        match &self.norm_out {
            Some(norm) => norm.forward(&y, ctx),
            None => Ok(y),
        }
    }

    /// [`Subsampling::convolve`] in windows of `chunk` output frames.
    ///
    /// Every stage is a 3x3 convolution with stride 2 and padding 1, so with
    /// `k` stages output frame `j` depends on input frames `[j·2^k - 2^k + 1,
    /// j·2^k + 2^k)`. A window for outputs `[a, b)` starts `2^k` input
    /// frames before `a·2^k` (a multiple of `2^k`, so every stage's grid
    /// lines up with the one-pass grid): the window's own zero padding then
    /// spoils only its first output at each stage, which is dropped. It ends
    /// at `b·2^k` (or the input's end, where the one-pass padding applies
    /// too), which covers output `b - 1`.
    fn windowed(&self, x: &Tensor, ctx: &Ctx, chunk: usize) -> Result<Tensor> {
        let t = x.dim(1)?;
        let factor = 1usize << self.stages.len();
        let n = self.output_len(t);
        let mut parts = Vec::with_capacity(n.div_ceil(chunk));
        let mut a = 0;
        while a < n {
            let b = (a + chunk).min(n);
            let skip = usize::from(a > 0);
            let from = (a - skip) * factor;
            let to = (b * factor).min(t);
            let y = self.convolve(&x.narrow(1, from, to - from)?, ctx)?;
            parts.push(y.narrow(1, skip, b - a)?);
            a = b;
        }
        Tensor::cat(&parts, 1)
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
    add_bias(&y, &bias.reshape((c_out, 1))?)?.reshape((b, c_out, h, w))
}

fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Silu => silu(x),
        Activation::Relu => x.relu(),
        Activation::Gelu => x.gelu_erf(),
        Activation::None => Ok(x.clone()),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The windowed front-end equals the one-pass front-end for every
    /// subsampling kind, depth and window size, including inputs whose
    /// length is not a multiple of the factor and windows of one frame.
    #[test]
    fn windows_equal_one_pass() {
        for (kind, factor, norm_out) in [
            (Kind::DwStriding, 8, false),
            (Kind::Striding, 4, true),
            (Kind::DwStriding, 2, false),
        ] {
            let cfg = ModelConfig {
                feat_in: 20,
                d_model: 12,
                subsampling: kind,
                subsampling_factor: factor,
                subsampling_conv_channels: 6,
                subsampling_norm_out: norm_out,
                ..ModelConfig::default()
            };
            let b = Builder::init(7, &Device::Cpu);
            let sub = Subsampling::new(&b, &cfg).unwrap();
            let ctx = Ctx::new(false, None, 0);
            for t in [1usize, 7, 64, 101, 203] {
                let n = 2 * t * 20;
                let x: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                    .collect();
                let x = Tensor::from_vec(x, (2, t, 20), &Device::Cpu).unwrap();
                let whole = sub.convolve(&x, &ctx).unwrap();
                for chunk in [1usize, 3, 5, 16] {
                    let parts = sub.windowed(&x, &ctx, chunk).unwrap();
                    assert_eq!(parts.dims(), whole.dims(), "{kind:?} x{factor} t {t}");
                    let diff = (&parts - &whole)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        diff <= 1e-5,
                        "{kind:?} x{factor}, t {t}, window {chunk}: max diff {diff}"
                    );
                }
            }
        }
    }
}
