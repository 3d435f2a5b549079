//! The CUDA side of softmax (`cuda/softmax.cu`): softmax over the last
//! dimension of f32, bf16 or f16 values with its backward from the output,
//! and the self-conditioning head's logits gradient recomputed from f32
//! logits. One block per row; arithmetic in f32.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cuda::{
    block_grid, cuda_only_cpu_fwd, kernel, launch, output_of, storage, view, with_act, Act, SOFTMAX,
};

/// Threads per block (`SOFTMAX_THREADS`).
const THREADS: u32 = 256;

/// Rows and row length of a contiguous tensor's layout.
fn rows_of(l: &Layout) -> (usize, usize) {
    let c = l.dims().last().copied().unwrap_or(1).max(1);
    (l.shape().elem_count() / c, c)
}

/// One block per row (grid-stride beyond 65,535 rows).
fn rows_grid(rows: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    block_grid(rows.min(65_535), THREADS)
}

/// Softmax over the last dimension of the contiguous `x` on a CUDA device,
/// in `x`'s dtype; the gradient flows to `x`.
pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// `dlogits = p (g - rowsum(g p))` (f32) with `p = softmax(logits)` over the
/// last dimension: `logits` f32, `g` the probabilities' gradient in any
/// float dtype, both (rows, C) on a CUDA device. No graph.
pub(crate) fn grad_from_logits(logits: Tensor, g: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad { from_logits: true })
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lcasr-softmax-cuda"
    }

    cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: Act>(s: &CudaStorage, l: &Layout, op: &str) -> Result<CudaStorage> {
            let x = view::<T>(s, l, op)?;
            let dev = &s.device;
            let (rows, c) = rows_of(l);
            let y = output_of::<T>(dev, rows * c)?;
            let (rows_arg, c_arg) = (rows as i64, c as i64);
            // Reads and writes rows x C values.
            launch!(
                SOFTMAX,
                dev,
                &kernel::<T>("lcasr_softmax_fwd"),
                rows_grid(rows),
                &x,
                &y,
                &rows_arg,
                &c_arg
            );
            Ok(storage(y, dev))
        }
        let y = with_act!(s.dtype(), self.name(), T => run::<T>(s, l, self.name())?);
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?.to_dtype(res.dtype())?;
        let grad_op = SoftmaxGrad { from_logits: false };
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&g, &grad_op)?))
    }
}

/// The backward kernels as an op on (a, g), `g` the probabilities'
/// gradient: from the output (`a` = y, `dx = y (g - rowsum(g y))` in y's
/// dtype), or from the f32 logits (`a` = logits, the logits' gradient in f32).
struct SoftmaxGrad {
    from_logits: bool,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        if self.from_logits {
            "lcasr-softmax-grad-logits-cuda"
        } else {
            "lcasr-softmax-grad-cuda"
        }
    }

    cuda_only_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        as_: &CudaStorage,
        al: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        /// Kernel `func` for `a` of type `A` and `g` of type `T`; the
        /// result has `a`'s type.
        fn run<A: Act, T: Act>(
            (as_, al): (&CudaStorage, &Layout),
            (gs, gl): (&CudaStorage, &Layout),
            func: &str,
        ) -> Result<CudaStorage> {
            let a = view::<A>(as_, al, func)?;
            let g = view::<T>(gs, gl, func)?;
            let dev: &CudaDevice = &as_.device;
            let (rows, c) = rows_of(al);
            let out = output_of::<A>(dev, rows * c)?;
            let (rows_arg, c_arg) = (rows as i64, c as i64);
            // Reads a and g, writes out: rows x C values each.
            launch!(
                SOFTMAX,
                dev,
                &kernel::<T>(func),
                rows_grid(rows),
                &a,
                &g,
                &out,
                &rows_arg,
                &c_arg
            );
            Ok(storage(out, dev))
        }
        if al.dims() != gl.dims() {
            candle_core::bail!(
                "{}: {:?} and its gradient {:?} differ",
                self.name(),
                al.dims(),
                gl.dims()
            );
        }
        let (a, g) = ((as_, al), (gs, gl));
        let out = with_act!(gs.dtype(), self.name(), T => if self.from_logits {
            run::<f32, T>(a, g, "lcasr_softmax_grad_logits")?
        } else {
            run::<T, T>(a, g, "lcasr_softmax_bwd")?
        });
        Ok((out, al.shape().clone()))
    }
}
