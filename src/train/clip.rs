//! Gradient clipping by global L2 norm, the finiteness check that decides
//! whether a step is taken, and gradient accumulation across chunks.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::optimizer::{with_f32_slice, Param};

/// The global L2 norm of the parameters' gradients, accumulated in f64.
pub fn grad_total_norm(params: &[Param], grads: &GradStore) -> Result<f64> {
    let mut sum_sq = 0f64;
    for param in params {
        if let Some(g) = grads.get(param.var.as_tensor()) {
            sum_sq += with_f32_slice(g, |s| {
                s.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
            })?;
        }
    }
    Ok(sum_sq.sqrt())
}

/// The factor `clip_grad_norm` multiplies the gradients by: `min(1, max_norm / (total + 1e-6))`.
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f64 {
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

/// Scales the gradients of `params` in `grads` so that their global L2 norm is
/// at most `max_norm` (as torch's `clip_grad_norm_`), and returns the norm
/// before clipping. Gradients are left alone when the coefficient is 1.
pub fn clip_grad_norm(params: &[Param], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let total = grad_total_norm(params, grads)?;
    let coef = clip_coefficient(total, max_norm);
    if coef < 1.0 {
        scale_grads(params, grads, coef)?;
    }
    Ok(total)
}

/// Multiplies the gradients of `params` in `grads` by `factor`.
pub fn scale_grads(params: &[Param], grads: &mut GradStore, factor: f64) -> Result<()> {
    for param in params {
        if let Some(g) = grads.get(param.var.as_tensor()) {
            let scaled = (g * factor)?;
            grads.insert(param.var.as_tensor(), scaled);
        }
    }
    Ok(())
}

/// Whether every gradient of `params` is finite (no NaN or ±inf).
pub fn grads_are_finite(params: &[Param], grads: &GradStore) -> Result<bool> {
    for param in params {
        if let Some(g) = grads.get(param.var.as_tensor()) {
            if !with_f32_slice(g, |s| s.iter().all(|v| v.is_finite()))? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Sums the parameter gradients of several backward passes (`backprop_every`
/// chunks per optimizer step) and keeps only those, so the graph's
/// intermediate gradients are dropped as soon as each chunk is added.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sum: Option<GradStore>,
    count: usize,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the parameters' gradients from one backward pass.
    pub fn add(&mut self, params: &[Param], grads: &GradStore) -> Result<()> {
        let sum = self.sum.get_or_insert_with(GradStore::default);
        for param in params {
            let key = param.var.as_tensor();
            if let Some(g) = grads.get(key) {
                let total: Tensor = match sum.get(key) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                sum.insert(key, total);
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Adds one backward pass's gradients only if they are all finite, and
    /// reports whether it did: a chunk with a NaN or infinite gradient is
    /// skipped without touching what earlier chunks accumulated (the
    /// reference's NaN handling threw those away).
    pub fn add_if_finite(&mut self, params: &[Param], grads: &GradStore) -> Result<bool> {
        if !grads_are_finite(params, grads)? {
            return Ok(false);
        }
        self.add(params, grads)?;
        Ok(true)
    }

    /// Number of backward passes added since the last [`GradAccumulator::take`].
    pub fn count(&self) -> usize {
        self.count
    }

    /// The summed gradients (empty if nothing was added), resetting the accumulator.
    pub fn take(&mut self) -> GradStore {
        self.count = 0;
        self.sum.take().unwrap_or_default()
    }

    /// Drops everything accumulated so far.
    pub fn clear(&mut self) {
        self.count = 0;
        self.sum = None;
    }
}
