//! Gradient clipping by global L2 norm, the finiteness check that decides
//! whether a step is taken, and gradient accumulation across chunks.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use super::optimizer::{with_f32_slice, Param};

/// The global L2 norm of the parameters' gradients, accumulated in f64.
pub fn grad_total_norm(params: &[Param], grads: &GradStore) -> Result<f64> {
    total_norm(params, grads, false)
}

/// [`grad_total_norm`]; with `tensor_ops` even CPU gradients take the path of
/// device gradients (tensor ops, one transfer of the per-parameter sums).
fn total_norm(params: &[Param], grads: &GradStore, tensor_ops: bool) -> Result<f64> {
    let mut sum_sq = 0f64;
    let mut on_device = Vec::new();
    for g in params.iter().filter_map(|p| grads.get(p.var.as_tensor())) {
        if g.device().is_cpu() && !tensor_ops {
            sum_sq += with_f32_slice(g, |s| {
                s.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
            })?;
        } else {
            on_device.push(g);
        }
    }
    sum_sq += squared_sums(&on_device)?.iter().sum::<f64>();
    Ok(sum_sq.sqrt())
}

/// The sum of squares of each of `gradients`, in f64, computed on their device
/// with one transfer of the sums to the host. A sum is finite exactly when its
/// gradient is: an f32 value squared stays far inside f64's range.
fn squared_sums(gradients: &[&Tensor]) -> Result<Vec<f64>> {
    if gradients.is_empty() {
        return Ok(Vec::new());
    }
    let sums = gradients
        .iter()
        .map(|g| g.detach().to_dtype(DType::F64)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&sums, 0)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f64>()?)
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
    all_finite(params, grads, false)
}

/// [`grads_are_finite`]; `tensor_ops` as in [`total_norm`].
fn all_finite(params: &[Param], grads: &GradStore, tensor_ops: bool) -> Result<bool> {
    let mut on_device = Vec::new();
    for g in params.iter().filter_map(|p| grads.get(p.var.as_tensor())) {
        if g.device().is_cpu() && !tensor_ops {
            if !with_f32_slice(g, |s| s.iter().all(|v| v.is_finite()))? {
                return Ok(false);
            }
        } else {
            on_device.push(g);
        }
    }
    Ok(squared_sums(&on_device)?.iter().all(|s| s.is_finite()))
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    /// Two parameters with gradients `a` and `b`.
    fn case(a: &[f32], b: &[f32]) -> (Vec<Param>, GradStore) {
        let mut grads = GradStore::default();
        let params: Vec<Param> = [a, b]
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let var = Var::zeros(g.len(), DType::F32, &Device::Cpu).unwrap();
                grads.insert(var.as_tensor(), Tensor::new(*g, &Device::Cpu).unwrap());
                Param::new(format!("p{i}"), var)
            })
            .collect();
        (params, grads)
    }

    #[test]
    fn device_path_matches_the_host_path() {
        let (params, grads) = case(&[3.0, -4.0, 1e30], &[0.5, 1e-20]);
        let host = total_norm(&params, &grads, false).unwrap();
        let device = total_norm(&params, &grads, true).unwrap();
        assert!((host - 1e30f32 as f64).abs() <= 1e30 * 1e-12, "{host}");
        assert!((host - device).abs() <= host * 1e-12, "{host} vs {device}");
        for tensor_ops in [false, true] {
            assert!(all_finite(&params, &grads, tensor_ops).unwrap());
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let (params, grads) = case(&[3.0, f32::MAX], &[0.5, bad]);
                assert!(!all_finite(&params, &grads, tensor_ops).unwrap(), "{bad}");
                let norm = total_norm(&params, &grads, tensor_ops).unwrap();
                assert!(!norm.is_finite(), "{bad}: {norm}");
            }
        }
    }
}
