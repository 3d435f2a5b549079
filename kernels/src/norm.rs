//! LayerNorm and RMSNorm over the last dimension, as candle custom ops with
//! forward and backward (candle-nn's fused versions have no gradient).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_f32::{
    add_partials, check_f32, cpu_slice, cpu_slices3, dot, multiversion, sum, to_vec_f32, with_f32,
};

/// Rows handled by one rayon task (enough work to amortise scheduling).
const ROWS_PER_TASK: usize = 64;

/// Layer normalisation over the last dimension of `x` (any number of leading
/// dimensions), then `* weight + bias`. `weight` and `bias` have the size of the last
/// dimension. Gradients flow to all three inputs. f32 on the CPU; on a CUDA
/// device also bf16 and f16 activations (statistics and weights in f32).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::cuda_kernels(x) {
        let d = norm_dim("layer_norm", x, weight)?;
        if bias.dims() != [d] {
            bail!("layer_norm: bias shape {:?} must be [{d}]", bias.dims());
        }
        return x.contiguous()?.apply_op3(
            &f32_contiguous(weight)?,
            &f32_contiguous(bias)?,
            LayerNorm { eps: eps as f32 },
        );
    }
    if crate::half(x) {
        return crate::recompute::node(&[x, weight, bias], move |t| {
            crate::composed::layer_norm(&t[0], &t[1], &t[2], eps)
        });
    }
    let op = "layer_norm";
    let d = check_norm_args(op, x, weight)?;
    check_f32(bias, op, "bias")?;
    if bias.dims() != [d] {
        bail!("{op}: bias shape {:?} must be [{d}]", bias.dims());
    }
    if !crate::native(x) {
        return crate::recompute::node(&[x, weight, bias], move |t| {
            crate::composed::layer_norm(&t[0], &t[1], &t[2], eps)
        });
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

/// RMS normalisation over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
/// Gradients flow to `x` and `weight`. f32 on the CPU; on a CUDA device also
/// bf16 and f16 activations (statistics and weights in f32).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::cuda_kernels(x) {
        norm_dim("rms_norm", x, weight)?;
        return x
            .contiguous()?
            .apply_op2(&f32_contiguous(weight)?, RmsNorm { eps: eps as f32 });
    }
    if crate::half(x) {
        return crate::recompute::node(&[x, weight], move |t| {
            crate::composed::rms_norm(&t[0], &t[1], eps)
        });
    }
    check_norm_args("rms_norm", x, weight)?;
    if !crate::native(x) {
        return crate::recompute::node(&[x, weight], move |t| {
            crate::composed::rms_norm(&t[0], &t[1], eps)
        });
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// Checks dtypes and shapes shared by both norms; returns the normalised size.
fn check_norm_args(op: &str, x: &Tensor, weight: &Tensor) -> Result<usize> {
    check_f32(x, op, "x")?;
    check_f32(weight, op, "weight")?;
    norm_dim(op, x, weight)
}

/// The normalised size, after checking that `weight` has it.
fn norm_dim(op: &str, x: &Tensor, weight: &Tensor) -> Result<usize> {
    let d = match x.dims().last() {
        Some(&d) if d > 0 => d,
        _ => bail!(
            "{op}: x must have a non-empty last dimension, got {:?}",
            x.dims()
        ),
    };
    if weight.dims() != [d] {
        bail!("{op}: weight shape {:?} must be [{d}]", weight.dims());
    }
    Ok(d)
}

/// `t` as a contiguous f32 tensor (the CUDA kernels' weights).
fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(candle_core::DType::F32)?.contiguous()
}

struct LayerNorm {
    eps: f32,
}

struct RmsNorm {
    eps: f32,
}

/// Mean and 1/std of one row (two passes for accuracy).
#[inline(always)]
fn mean_rstd(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let mut acc = [0.0f32; crate::cpu_f32::LANES];
    let chunks = x.chunks_exact(acc.len());
    let mut tail = 0.0f32;
    for v in chunks.remainder() {
        tail += (v - mean) * (v - mean);
    }
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    let var = (acc.iter().sum::<f32>() + tail) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversion! {
    fn ln_fwd_rows(x: &[f32], y: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        let d = w.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mean, rstd) = mean_rstd(xr, eps);
            for (((yv, xv), wv), bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *yv = (xv - mean) * rstd * wv + bv;
            }
        }
    }
}

multiversion! {
    /// dx for a block of rows, accumulating dweight and dbias into `dw`, `db`.
    fn ln_bwd_rows(
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        w: &[f32],
        dw: &mut [f32],
        db: &mut [f32],
        g: &mut [f32],
        eps: f32,
    ) {
        let d = w.len();
        let n = d as f32;
        for ((xr, dyr), dxr) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let (mean, rstd) = mean_rstd(xr, eps);
            // xhat goes into dx, g = dy * w into the scratch row.
            for (xh, xv) in dxr.iter_mut().zip(xr) {
                *xh = (xv - mean) * rstd;
            }
            for (((gv, dyv), wv), dbv) in g.iter_mut().zip(dyr).zip(w).zip(db.iter_mut()) {
                *gv = dyv * wv;
                *dbv += dyv;
            }
            for ((dwv, dyv), xh) in dw.iter_mut().zip(dyr).zip(dxr.iter()) {
                *dwv += dyv * xh;
            }
            let mean_g = sum(g) / n;
            let mean_gx = dot(g, dxr) / n;
            for (dxv, gv) in dxr.iter_mut().zip(g.iter()) {
                *dxv = rstd * (gv - mean_g - *dxv * mean_gx);
            }
        }
    }
}

multiversion! {
    fn rms_fwd_rows(x: &[f32], y: &mut [f32], w: &[f32], eps: f32) {
        let d = w.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let rinv = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = xv * rinv * wv;
            }
        }
    }
}

multiversion! {
    fn rms_bwd_rows(x: &[f32], dy: &[f32], dx: &mut [f32], w: &[f32], dw: &mut [f32], eps: f32) {
        let d = w.len();
        let n = d as f32;
        for ((xr, dyr), dxr) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let rinv = 1.0 / (dot(xr, xr) / n + eps).sqrt();
            for ((dwv, dyv), xv) in dw.iter_mut().zip(dyr).zip(xr) {
                *dwv += dyv * xv * rinv;
            }
            // g = dy * w into dx; then dx = rinv * (g - xhat * mean(g * xhat)).
            for ((gv, dyv), wv) in dxr.iter_mut().zip(dyr).zip(w) {
                *gv = dyv * wv;
            }
            let mean_gx = dot(dxr, xr) * rinv / n;
            for (dxv, xv) in dxr.iter_mut().zip(xr) {
                *dxv = rinv * (*dxv - xv * rinv * mean_gx);
            }
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "lcasr-layer-norm"
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
        let d = w.len();
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(yc, xc)| ln_fwd_rows(xc, yc, w, b, self.eps));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::norm_cuda::forward((s1, l1), (s2, l2), Some((s3, l3)), self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw, db) = crate::norm_cuda::backward(x, weight, grad, self.eps, true)?;
            return Ok((Some(dx), Some(dw), db));
        }
        let op = self.name();
        let w = to_vec_f32(weight, op)?;
        let d = w.len();
        let (dx, dw, db) = with_f32(x, op, |x| {
            with_f32(grad, op, |dy| {
                let mut dx = vec![0.0f32; x.len()];
                let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
                    .par_chunks_mut(d * ROWS_PER_TASK)
                    .zip(x.par_chunks(d * ROWS_PER_TASK))
                    .zip(dy.par_chunks(d * ROWS_PER_TASK))
                    .map(|((dxc, xc), dyc)| {
                        let (mut dw, mut db, mut g) = (vec![0.0; d], vec![0.0; d], vec![0.0; d]);
                        ln_bwd_rows(xc, dyc, dxc, &w, &mut dw, &mut db, &mut g, self.eps);
                        (dw, db)
                    })
                    .collect();
                let (dws, dbs): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
                Ok((dx, add_partials(dws, d), add_partials(dbs, d)))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, d, dev)?),
            Some(Tensor::from_vec(db, d, dev)?),
        ))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "lcasr-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, w) = (cpu_slice(s1, l1, op)?, cpu_slice(s2, l2, op)?);
        let d = w.len();
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(yc, xc)| rms_fwd_rows(xc, yc, w, self.eps));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::norm_cuda::forward((s1, l1), (s2, l2), None, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw, _) = crate::norm_cuda::backward(x, weight, grad, self.eps, false)?;
            return Ok((Some(dx), Some(dw)));
        }
        let op = self.name();
        let w = to_vec_f32(weight, op)?;
        let d = w.len();
        let (dx, dw) = with_f32(x, op, |x| {
            with_f32(grad, op, |dy| {
                let mut dx = vec![0.0f32; x.len()];
                let parts: Vec<Vec<f32>> = dx
                    .par_chunks_mut(d * ROWS_PER_TASK)
                    .zip(x.par_chunks(d * ROWS_PER_TASK))
                    .zip(dy.par_chunks(d * ROWS_PER_TASK))
                    .map(|((dxc, xc), dyc)| {
                        let mut dw = vec![0.0; d];
                        rms_bwd_rows(xc, dyc, dxc, &w, &mut dw, self.eps);
                        dw
                    })
                    .collect();
                Ok((dx, add_partials(parts, d)))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, d, dev)?),
        ))
    }
}
