//! The CUDA side of LayerNorm and RMSNorm (`cuda/norm.cu`): forward passes
//! for the ops' `cuda_fwd`, and the backward as one op whose output packs dx
//! and the per-block partial sums of the weight (and bias) gradients, which
//! are then summed over blocks (no atomics: deterministic).

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cuda::{cuda_only_cpu_fwd, f32_view, output, storage, NORM};

/// Threads per block (`NORM_THREADS` in norm.cu).
const THREADS: u32 = 256;
/// Most blocks of a backward launch: rows beyond are strided over them.
const MAX_BWD_BLOCKS: usize = 512;

/// One block per row, grid-stride beyond 65,535 rows.
fn row_grid(rows: usize, max_blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, max_blocks) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// LayerNorm (with `bias`) or RMSNorm (without) forward of `x` (rows, d).
pub(crate) fn forward(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    bias: Option<(&CudaStorage, &Layout)>,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = "norm";
    let (xv, dev) = f32_view(x.0, x.1, op)?;
    let (wv, _) = f32_view(w.0, w.1, op)?;
    let d = w.1.shape().elem_count();
    let rows = x.1.shape().elem_count() / d;
    let y = output(dev, rows * d)?;
    let (rows_arg, d_arg) = (rows as i64, d as i64);
    let stream = dev.cuda_stream();
    match bias {
        Some(b) => {
            let (bv, _) = f32_view(b.0, b.1, op)?;
            let func = NORM.func(dev, "lcasr_ln_fwd")?;
            let mut launch = stream.launch_builder(&func);
            launch
                .arg(&xv)
                .arg(&wv)
                .arg(&bv)
                .arg(&y)
                .arg(&rows_arg)
                .arg(&d_arg)
                .arg(&eps);
            // SAFETY: reads rows x d of x, d of w and b; writes rows x d of y.
            unsafe { launch.launch(row_grid(rows, 65_535)) }.w()?;
        }
        None => {
            let func = NORM.func(dev, "lcasr_rms_fwd")?;
            let mut launch = stream.launch_builder(&func);
            launch
                .arg(&xv)
                .arg(&wv)
                .arg(&y)
                .arg(&rows_arg)
                .arg(&d_arg)
                .arg(&eps);
            // SAFETY: reads rows x d of x and d of w; writes rows x d of y.
            unsafe { launch.launch(row_grid(rows, 65_535)) }.w()?;
        }
    }
    Ok((storage(y, dev), x.1.shape().clone()))
}

/// The gradients of a norm on CUDA: (dx, dweight, dbias when `layer`).
pub(crate) fn backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f32,
    layer: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let d = w.elem_count();
    let rows = x.elem_count() / d;
    let blocks = rows.clamp(1, MAX_BWD_BLOCKS);
    let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormGrad { eps, layer })?;
    let dx = packed.narrow(0, 0, rows * d)?.reshape(x.shape())?;
    let part = |i: usize| -> Result<Tensor> {
        packed
            .narrow(0, rows * d + i * blocks * d, blocks * d)?
            .reshape((blocks, d))?
            .sum(0)
    };
    let db = if layer { Some(part(1)?) } else { None };
    Ok((dx, part(0)?, db))
}

/// The packed backward of a norm: dx (rows x d), then the per-block partial
/// sums of dweight and, for LayerNorm, of dbias (blocks x d each).
struct NormGrad {
    eps: f32,
    layer: bool,
}

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        "lcasr-norm-grad-cuda"
    }

    cuda_only_cpu_fwd!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (x, dev) = f32_view(xs, xl, op)?;
        let (w, _) = f32_view(ws, wl, op)?;
        let (dy, _) = f32_view(dys, dyl, op)?;
        let d = wl.shape().elem_count();
        let rows = xl.shape().elem_count() / d;
        let blocks = rows.clamp(1, MAX_BWD_BLOCKS);
        let parts = if self.layer { 2 } else { 1 };
        let total = rows * d + parts * blocks * d;
        let out = output(dev, total)?;
        {
            let dx = out.slice(0..rows * d);
            let dw = out.slice(rows * d..rows * d + blocks * d);
            let (rows_arg, d_arg) = (rows as i64, d as i64);
            let stream = dev.cuda_stream();
            if self.layer {
                let db = out.slice(rows * d + blocks * d..total);
                let func = NORM.func(dev, "lcasr_ln_bwd")?;
                let mut launch = stream.launch_builder(&func);
                launch
                    .arg(&x)
                    .arg(&w)
                    .arg(&dy)
                    .arg(&dx)
                    .arg(&dw)
                    .arg(&db)
                    .arg(&rows_arg)
                    .arg(&d_arg)
                    .arg(&self.eps);
                // SAFETY: writes all of dx and one row of the partials per block.
                unsafe { launch.launch(row_grid(rows, MAX_BWD_BLOCKS)) }.w()?;
            } else {
                let func = NORM.func(dev, "lcasr_rms_bwd")?;
                let mut launch = stream.launch_builder(&func);
                launch
                    .arg(&x)
                    .arg(&w)
                    .arg(&dy)
                    .arg(&dx)
                    .arg(&dw)
                    .arg(&rows_arg)
                    .arg(&d_arg)
                    .arg(&self.eps);
                // SAFETY: writes all of dx and one row of the partials per block.
                unsafe { launch.launch(row_grid(rows, MAX_BWD_BLOCKS)) }.w()?;
            }
        }
        Ok((storage(out, dev), Shape::from(total)))
    }
}
