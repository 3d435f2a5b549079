//! The CUDA side of LayerNorm and RMSNorm (`cuda/norm.cu`) on f32, bf16 or
//! f16 activations with f32 weights: forward passes for the ops'
//! `cuda_fwd`, and the backward as two ops, the input gradient in the
//! activations' dtype and the per-block partial sums of the weight (and
//! bias) gradients in f32, which are then summed over blocks (no atomics:
//! deterministic).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cuda::{
    cuda_only_cpu_fwd, f32_view, kernel, launch, output, output_of, storage, view, with_act, Act,
    GradPart, NORM,
};

/// Threads per block (`NORM_THREADS` in norm.cu).
const THREADS: u32 = 256;
/// Most blocks of a backward launch: rows beyond are strided over them.
const MAX_BWD_BLOCKS: usize = 512;

/// One block per row, grid-stride beyond `max_blocks` rows.
fn row_grid(rows: usize, max_blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, max_blocks) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of a backward launch over `rows` rows: as many rows of partial
/// sums as the weight-partials kernel writes.
fn bwd_blocks(rows: usize) -> usize {
    rows.clamp(1, MAX_BWD_BLOCKS)
}

/// LayerNorm (with `bias`) or RMSNorm (without) forward of `x` (rows, d);
/// `w` and `bias` are f32.
pub(crate) fn forward(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    bias: Option<(&CudaStorage, &Layout)>,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = "norm";
    with_act!(x.0.dtype(), op, T => forward_typed::<T>(x, w, bias, eps))
}

fn forward_typed<T: Act>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    bias: Option<(&CudaStorage, &Layout)>,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = "norm";
    let xv = view::<T>(x.0, x.1, op)?;
    let (wv, dev) = f32_view(w.0, w.1, op)?;
    let d = w.1.shape().elem_count();
    let rows = x.1.shape().elem_count() / d;
    let y = output_of::<T>(dev, rows * d)?;
    let (rows_arg, d_arg) = (rows as i64, d as i64);
    let cfg = row_grid(rows, 65_535);
    match bias {
        Some(b) => {
            let (bv, _) = f32_view(b.0, b.1, op)?;
            let f = kernel::<T>("lcasr_ln_fwd");
            launch!(NORM, dev, &f, cfg, &xv, &wv, &bv, &y, &rows_arg, &d_arg, &eps);
        }
        None => {
            let f = kernel::<T>("lcasr_rms_fwd");
            launch!(NORM, dev, &f, cfg, &xv, &wv, &y, &rows_arg, &d_arg, &eps);
        }
    }
    Ok((storage(y, dev), x.1.shape().clone()))
}

/// The gradients of a norm on CUDA: (dx, dweight, dbias when `layer`), with
/// `w` the f32 weight the forward used.
pub(crate) fn backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f32,
    layer: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let d = w.elem_count();
    let rows = x.elem_count() / d;
    let blocks = bwd_blocks(rows);
    let dy = grad.contiguous()?;
    let grad_op = |part| NormGrad { eps, layer, part };
    let dx = x.apply_op3_no_bwd(w, &dy, &grad_op(GradPart::Input))?;
    let parts = x.apply_op3_no_bwd(w, &dy, &grad_op(GradPart::Params))?;
    let part = |i: usize| -> Result<Tensor> {
        parts
            .narrow(0, i * blocks * d, blocks * d)?
            .reshape((blocks, d))?
            .sum(0)
    };
    let db = if layer { Some(part(1)?) } else { None };
    Ok((dx, part(0)?, db))
}

/// A part of the backward of a norm, as one op on (x, weight, dy).
struct NormGrad {
    eps: f32,
    layer: bool,
    part: GradPart,
}

impl NormGrad {
    fn run<T: Act>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (dys, dyl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let x = view::<T>(xs, xl, op)?;
        let dy = view::<T>(dys, dyl, op)?;
        let (w, dev) = f32_view(ws, wl, op)?;
        let d = wl.shape().elem_count();
        let rows = xl.shape().elem_count() / d;
        let (rows_arg, d_arg, eps) = (rows as i64, d as i64, self.eps);
        match self.part {
            GradPart::Input => {
                let dx = output_of::<T>(dev, rows * d)?;
                let base = if self.layer {
                    "lcasr_ln_bwd_dx"
                } else {
                    "lcasr_rms_bwd_dx"
                };
                let f = kernel::<T>(base);
                let cfg = row_grid(rows, 65_535);
                launch!(NORM, dev, &f, cfg, &x, &w, &dy, &dx, &rows_arg, &d_arg, &eps);
                Ok((storage(dx, dev), xl.shape().clone()))
            }
            GradPart::Params => {
                let blocks = bwd_blocks(rows);
                let n_parts = if self.layer { 2 } else { 1 };
                let total = n_parts * blocks * d;
                let out = output(dev, total)?;
                {
                    let dw = out.slice(0..blocks * d);
                    let cfg = row_grid(rows, MAX_BWD_BLOCKS);
                    if self.layer {
                        let db = out.slice(blocks * d..total);
                        let f = kernel::<T>("lcasr_ln_bwd_params");
                        launch!(NORM, dev, &f, cfg, &x, &dy, &dw, &db, &rows_arg, &d_arg, &eps);
                    } else {
                        let f = kernel::<T>("lcasr_rms_bwd_params");
                        launch!(NORM, dev, &f, cfg, &x, &dy, &dw, &rows_arg, &d_arg, &eps);
                    }
                }
                Ok((storage(out, dev), Shape::from(total)))
            }
        }
    }
}

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        match self.part {
            GradPart::Input => "lcasr-norm-grad-input-cuda",
            GradPart::Params => "lcasr-norm-grad-params-cuda",
        }
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
        with_act!(xs.dtype(), self.name(), T => self.run::<T>((xs, xl), (ws, wl), (dys, dyl)))
    }
}
