//! Depthwise 1-D convolution over time in channels-last layout (B, T, C), "same" zero
//! padding, stride 1, with bias: a candle custom op with forward and backward.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_f32::{add_partials, check_f32, cpu_slices3, multiversion, with_f32};

/// Most tasks the weight gradient is split into (each holds a partial sum).
const WEIGHT_GRAD_PARTS: usize = 32;

/// Time steps handled by one rayon task.
const ROWS_PER_TASK: usize = 32;

/// Depthwise conv1d: `x` (B, T, C), `weight` (C, K) with K odd, `bias` (C).
/// `y[b, t, c] = bias[c] + sum_k weight[c, k] * x[b, t + k - (K-1)/2, c]`, zero outside
/// [0, T). Gradients flow to all three inputs.
/// f32 on the CPU kernel (bf16 and f16 run the composition there, recomputed
/// in the backward); the CUDA kernels read and write f32, bf16 and f16.
pub fn depthwise_conv1d(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) =
        crate::conv_cuda::try_apply(crate::conv_cuda::Conv::Depthwise1d, x, weight, bias)?
    {
        return Ok(y);
    }
    if crate::half(x) {
        return crate::recompute::node(&[x, weight, bias], |t| {
            crate::composed::depthwise_conv1d(&t[0], &t[1], &t[2])
        });
    }
    let op = "depthwise_conv1d";
    check_f32(x, op, "x")?;
    check_f32(weight, op, "weight")?;
    check_f32(bias, op, "bias")?;
    let (_b, _t, c) = x.dims3()?;
    let (wc, k) = weight.dims2()?;
    if wc != c || k % 2 == 0 {
        bail!(
            "{op}: weight must be (C={c}, K odd), got {:?}",
            weight.dims()
        );
    }
    if bias.dims() != [c] {
        bail!("{op}: bias must be [{c}], got {:?}", bias.dims());
    }
    if !crate::native(x) {
        return crate::recompute::node(&[x, weight, bias], |t| {
            crate::composed::depthwise_conv1d(&t[0], &t[1], &t[2])
        });
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, DepthwiseConv1d)
}

struct DepthwiseConv1d;

/// The kernel transposed to (K, C) so that each tap is a contiguous row.
fn taps_by_row(w: &[f32], c: usize) -> Vec<f32> {
    let k = w.len() / c;
    let mut wt = vec![0.0f32; w.len()];
    for ci in 0..c {
        for ki in 0..k {
            wt[ki * c + ci] = w[ci * k + ki];
        }
    }
    wt
}

multiversion! {
    /// Output rows `r0..` (global row index b*T + t) into `y`.
    fn fwd_rows(x: &[f32], y: &mut [f32], wt: &[f32], bias: &[f32], r0: usize, t_len: usize) {
        let c = bias.len();
        let k = wt.len() / c;
        let pad = k / 2;
        for (i, yr) in y.chunks_exact_mut(c).enumerate() {
            let r = r0 + i;
            let (base, t) = (r - r % t_len, r % t_len);
            yr.copy_from_slice(bias);
            for (ki, wk) in wt.chunks_exact(c).enumerate() {
                let s = t + ki;
                if s < pad || s - pad >= t_len {
                    continue;
                }
                let xr = &x[(base + s - pad) * c..][..c];
                for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(wk) {
                    *yv += xv * wv;
                }
            }
        }
    }
}

multiversion! {
    /// dx rows `r0..` into `dx`, accumulating the (K, C) kernel and bias gradients.
    fn bwd_rows(
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        wt: &[f32],
        dwt: &mut [f32],
        db: &mut [f32],
        r0: usize,
        t_len: usize,
    ) {
        let c = db.len();
        let k = wt.len() / c;
        let pad = k / 2;
        for (i, dxr) in dx.chunks_exact_mut(c).enumerate() {
            let r = r0 + i;
            let (base, t) = (r - r % t_len, r % t_len);
            let dyr = &dy[r * c..][..c];
            for (dbv, g) in db.iter_mut().zip(dyr) {
                *dbv += g;
            }
            for ki in 0..k {
                // Kernel gradient: output t saw input t + ki - pad through tap ki.
                let s = t + ki;
                if s >= pad && s - pad < t_len {
                    let xr = &x[(base + s - pad) * c..][..c];
                    for ((dw, g), xv) in dwt[ki * c..][..c].iter_mut().zip(dyr).zip(xr) {
                        *dw += g * xv;
                    }
                }
                // Input gradient: input t fed output t - ki + pad through tap ki.
                let o = t + pad;
                if o >= ki && o - ki < t_len {
                    let gr = &dy[(base + o - ki) * c..][..c];
                    for ((d, g), wv) in dxr.iter_mut().zip(gr).zip(&wt[ki * c..][..c]) {
                        *d += g * wv;
                    }
                }
            }
        }
    }
}

impl CustomOp3 for DepthwiseConv1d {
    fn name(&self) -> &'static str {
        "lcasr-depthwise-conv1d"
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
        let (x, w, bias) = cpu_slices3(op, (s1, l1), (s2, l2), (s3, l3))?;
        let (_b, t_len, c) = l1.shape().dims3()?;
        let wt = taps_by_row(w, c);
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(c * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(i, yc)| fwd_rows(x, yc, &wt, bias, i * ROWS_PER_TASK, t_len));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let (_b, t_len, c) = x.dims3()?;
        let k = weight.dim(1)?;
        let wt = with_f32(weight, op, |w| Ok(taps_by_row(w, c)))?;
        let (dx, dwt, db) = with_f32(x, op, |x| {
            with_f32(grad, op, |dy| {
                let mut dx = vec![0.0f32; x.len()];
                // A fixed split into at most WEIGHT_GRAD_PARTS tasks whose
                // partial weight gradients are summed in task order, so the
                // result never depends on the thread pool's scheduling.
                let rows = x.len() / c;
                let per_task = rows
                    .div_ceil(WEIGHT_GRAD_PARTS)
                    .div_ceil(ROWS_PER_TASK)
                    .max(1)
                    * ROWS_PER_TASK;
                let (dwts, dbs): (Vec<_>, Vec<_>) = dx
                    .par_chunks_mut(c * per_task)
                    .enumerate()
                    .map(|(i, dxc)| {
                        let (mut dwt, mut db) = (vec![0.0f32; k * c], vec![0.0f32; c]);
                        bwd_rows(x, dy, dxc, &wt, &mut dwt, &mut db, i * per_task, t_len);
                        (dwt, db)
                    })
                    .unzip();
                Ok((dx, add_partials(dwts, k * c), add_partials(dbs, c)))
            })
        })?;
        let dw = taps_by_row(&dwt, k);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, (c, k), dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}
