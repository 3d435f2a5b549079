//! Softmax over the last dimension as a candle custom op with a one-pass backward.
//!
//! candle's differentiable softmax is composed of five ops forward and about a
//! dozen backward, each a full-size tensor; `candle_nn::ops::softmax_last_dim`
//! is fused but has no backward (the graph is silently cut, see
//! docs/candle-notes.md). Self-conditioning takes a softmax over the whole
//! vocabulary at every intermediate layer, so this op carries real weight.

use std::mem::MaybeUninit;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu_f32::{cpu_slice, dot, exp, multiversion, with_f32};

/// Target elements per rayon task (whole rows).
const TASK_ELEMS: usize = 1 << 15;

/// Softmax over the last dimension, any rank; gradient flows to `x`. f32 on the
/// CPU runs the fused kernel; other dtypes and devices use candle's composed
/// `softmax`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        bail!("softmax_last_dim: expected at least one dimension");
    }
    if x.dim(D::Minus1)? == 0 {
        return Ok(x.clone());
    }
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return composed_softmax(x);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// The composed softmax for dtypes and devices without the fused kernel.
fn composed_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

struct Softmax;

multiversion! {
    fn softmax_rows(x: &[f32], y: &mut [MaybeUninit<f32>], n: usize) {
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let mut m = f32::NEG_INFINITY;
            for &v in xr {
                m = if v > m { v } else { m };
            }
            let mut sum = 0.0f32;
            for (o, &v) in yr.iter_mut().zip(xr) {
                // Below e^-87 the clamped exp would leave ~1e-38: flush to 0, so -inf masks hold.
                let d = v - m;
                let e = if d < -87.0 { 0.0 } else { exp(d) };
                sum += e;
                o.write(e);
            }
            let inv = 1.0 / sum;
            for o in yr.iter_mut() {
                // SAFETY: every element of the row was written just above.
                let v = unsafe { o.assume_init() };
                o.write(v * inv);
            }
        }
    }
}

multiversion! {
    fn softmax_bwd_rows(y: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], n: usize) {
        for ((yr, gr), dr) in y.chunks_exact(n).zip(dy.chunks_exact(n)).zip(dx.chunks_exact_mut(n)) {
            let s = dot(yr, gr);
            for ((d, &yv), &g) in dr.iter_mut().zip(yr).zip(gr) {
                d.write(yv * (g - s));
            }
        }
    }
}

/// A vector of `len` values written in parallel by `f(first row, rows)` over
/// groups of whole rows of length `n`; never zero-filled first.
fn par_rows(len: usize, n: usize, f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let rows_per_task = (TASK_ELEMS / n.max(1)).max(1);
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(rows_per_task * n.max(1))
        .enumerate()
        .for_each(|(i, c)| f(i * rows_per_task, c));
    // SAFETY: the chunks cover `0..len` and the kernels write every element of theirs.
    unsafe { out.set_len(len) };
    out
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lcasr-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, self.name())?;
        let n = *l.dims().last().expect("rank checked");
        let y = par_rows(x.len(), n, |r0, c| {
            softmax_rows(&x[r0 * n..r0 * n + c.len()], c, n);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = self.name();
        let n = res.dim(D::Minus1)?;
        let dx = with_f32(res, op, |y| {
            with_f32(grad, op, |dy| {
                Ok(par_rows(y.len(), n, |r0, c| {
                    let r = r0 * n..r0 * n + c.len();
                    softmax_bwd_rows(&y[r.clone()], &dy[r], c, n);
                }))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}
