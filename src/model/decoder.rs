//! The CTC head and self-conditioning (reference-spec §3.8, §3.9.2).

use candle_core::{DType, Result, Tensor};
use lcasr_kernels::softmax::softmax_last_dim;

use super::builder::Builder;
use super::layers::{Ctx, Linear, Norm};
use crate::config::ModelConfig;

/// `decoder.*`: optional norm, the CTC head, the re-projection of its
/// posteriors back into the residual stream, and the optional gate.
pub struct Decoder {
    norm: Option<Norm>,
    ff: Linear,
    reprojection: Linear,
    gate: Option<Linear>,
    double_norm: bool,
}

impl Decoder {
    /// The head for `classes` output classes (vocabulary + blank).
    pub fn new(b: &Builder, cfg: &ModelConfig, classes: usize) -> Self {
        let d = cfg.d_model as usize;
        Decoder {
            norm: cfg
                .decoder_norm
                .then(|| Norm::new(b, "decoder.norm", d, cfg.default_norm)),
            ff: Linear::new(b, "decoder.ff", d, classes, true),
            reprojection: Linear::new(b, "decoder.reprojection", classes, d, true),
            gate: cfg
                .gated_sc
                .then(|| Linear::new(b, "decoder.gate", d, 1, true)),
            double_norm: cfg.legasee_double_norm,
        }
    }

    fn norm(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match &self.norm {
            Some(n) => n.forward(x, ctx),
            None => Ok(x.clone()),
        }
    }

    /// Logits of the head: ff(norm(x)).
    pub fn logits(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        // Logits leave the model in f32 whatever the compute dtype.
        self.ff
            .forward(&self.norm(x, ctx)?, ctx)?
            .to_dtype(DType::F32)
    }

    /// One self-conditioning step: x + reprojection(softmax(logits(x))),
    /// gated per frame when `gated_sc`. Returns the new stream and the logits.
    pub fn self_condition(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        keep_logits: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let normed = self.norm(x, ctx)?;
        // Without the logits, the fused head keeps only the probabilities for the backward.
        let (probs, logits) = if keep_logits {
            let logits = self.ff.forward(&normed, ctx)?;
            (
                softmax_last_dim(&logits)?,
                Some(logits.to_dtype(DType::F32)?),
            )
        } else {
            (self.ff.softmax(&normed, ctx)?, None)
        };
        let mut update = self.reprojection.forward(&probs, ctx)?;
        if let Some(gate) = &self.gate {
            let g = candle_nn::ops::sigmoid(&gate.forward(&normed, ctx)?)?;
            update = update.broadcast_mul(&g)?;
        }
        Ok(((x + update)?, logits))
    }

    /// Final logits; the norm runs twice with `legasee_double_norm`, as in the
    /// published checkpoints.
    pub fn final_logits(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if self.double_norm {
            self.logits(&self.norm(x, ctx)?, ctx)
        } else {
            self.logits(x, ctx)
        }
    }
}
