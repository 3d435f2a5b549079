//! Softmax over the last dimension as a candle custom op with a one-pass backward.
//!
//! candle's differentiable softmax is composed of five ops forward and about a
//! dozen backward, each a full-size tensor; `candle_nn::ops::softmax_last_dim`
//! is fused but has no backward (the graph is silently cut, see
//! docs/candle-notes.md). Self-conditioning takes a softmax over the whole
//! vocabulary at every intermediate layer, so this op carries real weight.

use std::mem::MaybeUninit;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

use crate::cpu_f32::{
    add_partials, cpu_slice, cpu_slices3, dot, exp, matmul, multiversion, par_uninit, with_f32,
};

/// Target elements per rayon task (whole rows).
const TASK_ELEMS: usize = 1 << 15;

/// Softmax over the last dimension, any rank; gradient flows to `x`. f32 on the
/// CPU runs the fused kernel, any float dtype on a CUDA device the kernels of
/// `cuda/softmax.cu`; anything else the composition, recomputed in the
/// backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        bail!("softmax_last_dim: expected at least one dimension");
    }
    if x.dim(D::Minus1)? == 0 {
        return Ok(x.clone());
    }
    #[cfg(feature = "cuda")]
    if crate::cuda_kernels(x) {
        return crate::softmax_cuda::softmax(x);
    }
    if x.dtype() != DType::F32 || !crate::native(x) {
        return crate::recompute::node(&[x], |t| crate::composed::softmax_last_dim(&t[0]));
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

multiversion! {
    /// Softmax of each row of length `n`, in place.
    fn softmax_rows(y: &mut [f32], n: usize) {
        for yr in y.chunks_exact_mut(n) {
            let mut m = f32::NEG_INFINITY;
            for &v in yr.iter() {
                m = if v > m { v } else { m };
            }
            let mut sum = 0.0f32;
            for v in yr.iter_mut() {
                // Below e^-87 the clamped exp would leave ~1e-38: flush to 0, so -inf masks hold.
                let d = *v - m;
                *v = if d < -87.0 { 0.0 } else { exp(d) };
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in yr.iter_mut() {
                *v *= inv;
            }
        }
    }
}

/// Elements per rayon task: whole rows of length `n`, about [`TASK_ELEMS`].
fn task_elems(n: usize) -> usize {
    (TASK_ELEMS / n).max(1) * n
}

/// Softmax of the rows (length `n`) of `y` in place, in parallel over groups of rows.
fn softmax_in_place(y: &mut [f32], n: usize) {
    y.par_chunks_mut(task_elems(n))
        .for_each(|c| softmax_rows(c, n));
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

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lcasr-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut y = cpu_slice(s, l, self.name())?.to_vec();
        softmax_in_place(&mut y, *l.dims().last().expect("rank checked"));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = self.name();
        let dx = with_f32(res, op, |y| {
            with_f32(grad, op, |dy| Ok(softmax_grad(y, dy, res.dim(D::Minus1)?)))
        })?;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// The softmax input gradient `y * (dy - rowsum(dy * y))` of rows of length `n`.
fn softmax_grad(y: &[f32], dy: &[f32], n: usize) -> Vec<f32> {
    par_uninit(y.len(), task_elems(n), |start, c| {
        let r = start..start + c.len();
        softmax_bwd_rows(&y[r.clone()], &dy[r], c, n);
    })
}

/// `softmax(x · weightᵀ + bias)` over the last dimension as one op: `x` (.., d),
/// `weight` (C, d), `bias` (C) -> (.., C); gradients flow to all three.
///
/// The softmax gradient needs only the probabilities, so this op keeps its inputs
/// and output and never the logits: for self-conditioning's head (C = 4,096 classes
/// at every intermediate layer) candle's graph would otherwise hold each layer's
/// logits until the backward ends, where PyTorch frees them at once. f32 on the CPU
/// runs the fused kernel; on a CUDA device candle's matmuls with the softmax
/// kernels of `cuda/softmax.cu`; other dtypes and devices the composition.
pub fn linear_softmax(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let op = "linear_softmax";
    if x.rank() == 0 {
        bail!("{op}: expected at least one dimension");
    }
    let d = x.dim(D::Minus1)?;
    let (c, wd) = weight.dims2()?;
    if wd != d || bias.dims() != [c] {
        bail!(
            "{op}: x {:?} needs weight (C, {d}) and bias (C), got {:?} and {:?}",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let fused = [x, weight, bias]
        .iter()
        .all(|t| t.dtype() == DType::F32 && crate::native(t));
    if !fused || d == 0 || c == 0 {
        let (softmax, logits_grad) = head_steps(x, d, c);
        let (xd, wd, bd) = (x.detach(), weight.detach(), bias.detach());
        let first = crate::composed::linear_softmax_with(&xd, &wd, &bd, softmax)?;
        return crate::recompute::node_with_grads(&[x, weight, bias], first, move |t, grad| {
            let grads =
                crate::composed::linear_softmax_backward(&t[0], &t[1], &t[2], grad, logits_grad)?;
            Ok(grads.into_iter().map(Some).collect())
        });
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LinearSoftmax)
}

/// The softmax of the head's logits.
type SoftmaxStep = fn(&Tensor) -> Result<Tensor>;
/// The logits' gradient from f32 logits and the probabilities' gradient.
type LogitsGradStep = fn(Tensor, &Tensor) -> Result<Tensor>;

/// The softmax steps around candle's matmuls when [`linear_softmax`] of `x`
/// (d features, c classes) does not run its fused CPU kernel: the CUDA
/// kernels on a CUDA device (the forward's probabilities in one pass, the
/// backward's logits gradient in one), the composition elsewhere.
fn head_steps(x: &Tensor, d: usize, c: usize) -> (SoftmaxStep, LogitsGradStep) {
    #[cfg(feature = "cuda")]
    if crate::cuda_kernels(x) && d > 0 && c > 0 {
        return (
            crate::softmax_cuda::softmax,
            crate::softmax_cuda::grad_from_logits,
        );
    }
    let _ = (x, d, c);
    (
        crate::composed::softmax_last_dim,
        crate::composed::softmax_grad_from_logits,
    )
}

struct LinearSoftmax;

impl CustomOp3 for LinearSoftmax {
    fn name(&self) -> &'static str {
        "lcasr-linear-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, w, b) = cpu_slices3(op, (s1, l1), (s2, l2), (s3, l3))?;
        let (c, d) = (b.len(), *l1.dims().last().expect("rank checked"));
        let rows = x.len() / d;
        let mut y = vec![0.0f32; rows * c];
        y.par_chunks_mut(c).for_each(|r| r.copy_from_slice(b));
        // SAFETY: y is (rows, C); x is (rows, d); w is (C, d), read transposed.
        unsafe {
            matmul(
                rows,
                c,
                d,
                y.as_mut_ptr(),
                c,
                true,
                (x.as_ptr(), d, 1),
                (w.as_ptr(), 1, d),
            )
        };
        softmax_in_place(&mut y, c);
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("rank checked") = c;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let (c, d) = weight.dims2()?;
        let rows = x.elem_count() / d;
        let dl = with_f32(res, op, |y| {
            with_f32(grad, op, |dy| Ok(softmax_grad(y, dy, c)))
        })?;
        let (dx, dw) = with_f32(x, op, |x| {
            with_f32(weight, op, |w| {
                let mut dx = vec![0.0f32; rows * d];
                let mut dw = vec![0.0f32; c * d];
                // SAFETY: dl is (rows, C), w is (C, d), x is (rows, d); dx is (rows, d)
                // and dw is (C, d), with dl read transposed for dw.
                unsafe {
                    matmul(
                        rows,
                        d,
                        c,
                        dx.as_mut_ptr(),
                        d,
                        false,
                        (dl.as_ptr(), c, 1),
                        (w.as_ptr(), d, 1),
                    );
                    matmul(
                        c,
                        d,
                        rows,
                        dw.as_mut_ptr(),
                        d,
                        false,
                        (dl.as_ptr(), 1, c),
                        (x.as_ptr(), d, 1),
                    );
                }
                Ok((dx, dw))
            })
        })?;
        let partial_db: Vec<Vec<f32>> = dl
            .par_chunks(task_elems(c))
            .map(|block| {
                let mut acc = vec![0.0f32; c];
                for row in block.chunks_exact(c) {
                    acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .collect();
        let db = add_partials(partial_db, c);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, (c, d), dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}
