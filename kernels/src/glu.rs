//! GLU over the last dimension: `a * sigmoid(g)` where `a` and `g` are the first and
//! second halves, as a candle custom op with forward and backward.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_f32::{check_f32, cpu_slice, multiversion, sigmoid};

/// Output rows handled by one rayon task.
const ROWS_PER_TASK: usize = 64;

/// GLU over the last dimension: the last dimension `2n` becomes `n`, the output is
/// `x[.., :n] * sigmoid(x[.., n:])`. Gradient flows to `x`. f32 on the CPU;
/// on a CUDA device also bf16 and f16 (computed in f32).
pub fn glu(x: &Tensor) -> Result<Tensor> {
    match x.dims().last() {
        Some(&d) if d > 0 && d % 2 == 0 => {}
        _ => bail!(
            "glu: the last dimension must be even and non-zero, got {:?}",
            x.dims()
        ),
    }
    if crate::cuda_kernels(x) {
        return x.contiguous()?.apply_op1(Glu);
    }
    if crate::half(x) {
        return crate::recompute::node(&[x], |t| crate::composed::glu(&t[0]));
    }
    check_f32(x, "glu", "x")?;
    if !crate::native(x) {
        return crate::recompute::node(&[x], |t| crate::composed::glu(&t[0]));
    }
    x.contiguous()?.apply_op1(Glu)
}

struct Glu;

multiversion! {
    fn glu_fwd_rows(x: &[f32], y: &mut [f32], n: usize) {
        for (xr, yr) in x.chunks_exact(2 * n).zip(y.chunks_exact_mut(n)) {
            let (a, g) = xr.split_at(n);
            for ((yv, av), gv) in yr.iter_mut().zip(a).zip(g) {
                *yv = av * sigmoid(*gv);
            }
        }
    }
}

multiversion! {
    fn glu_bwd_rows(x: &[f32], dy: &[f32], dx: &mut [f32], n: usize) {
        for ((xr, dyr), dxr) in x.chunks_exact(2 * n).zip(dy.chunks_exact(n)).zip(dx.chunks_exact_mut(2 * n)) {
            let (a, g) = xr.split_at(n);
            let (da, dg) = dxr.split_at_mut(n);
            for ((((dav, dgv), av), gv), dyv) in
                da.iter_mut().zip(dg.iter_mut()).zip(a).zip(g).zip(dyr)
            {
                let s = sigmoid(*gv);
                *dav = dyv * s;
                *dgv = dyv * av * s * (1.0 - s);
            }
        }
    }
}

impl CustomOp1 for Glu {
    fn name(&self) -> &'static str {
        "lcasr-glu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, self.name())?;
        let mut dims = l.dims().to_vec();
        let n = dims[dims.len() - 1] / 2;
        *dims.last_mut().expect("rank checked") = n;
        let mut y = vec![0.0f32; x.len() / 2];
        y.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(2 * n * ROWS_PER_TASK))
            .for_each(|(yc, xc)| glu_fwd_rows(xc, yc, n));
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{grid, kernel, launch, output_of, storage, view, with_act, GLU};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        let mut dims = l.dims().to_vec();
        let n = dims[dims.len() - 1] / 2;
        *dims.last_mut().expect("rank checked") = n;
        let rows = l.shape().elem_count() / (2 * n);
        let (rows_arg, n_arg) = (rows as i64, n as i64);
        let dev = s.device();
        let y = with_act!(s.dtype(), self.name(), T => {
            let x = view::<T>(s, l, self.name())?;
            let y = output_of::<T>(dev, rows * n)?;
            let f = kernel::<T>("lcasr_glu_fwd");
            launch!(GLU, dev, &f, grid(rows * n), &x, &y, &rows_arg, &n_arg);
            storage(y, dev)
        });
        Ok((y, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        x.apply_op2_no_bwd(&grad.contiguous()?, &GluGrad).map(Some)
    }
}

/// The gradient of [`glu`] with respect to its input, from the input and the
/// output's gradient.
struct GluGrad;

impl CustomOp2 for GluGrad {
    fn name(&self) -> &'static str {
        "lcasr-glu-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(xs, xl, self.name())?;
        let dy = cpu_slice(dys, dyl, self.name())?;
        let n = xl.dims()[xl.dims().len() - 1] / 2;
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(2 * n * ROWS_PER_TASK)
            .zip(x.par_chunks(2 * n * ROWS_PER_TASK))
            .zip(dy.par_chunks(n * ROWS_PER_TASK))
            .for_each(|((dxc, xc), dyc)| glu_bwd_rows(xc, dyc, dxc, n));
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        dys: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{grid, kernel, launch, output_of, storage, view, with_act, GLU};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        let n = xl.dims()[xl.dims().len() - 1] / 2;
        let rows = xl.shape().elem_count() / (2 * n);
        let (rows_arg, n_arg) = (rows as i64, n as i64);
        let dev = xs.device();
        let dx = with_act!(xs.dtype(), self.name(), T => {
            let x = view::<T>(xs, xl, self.name())?;
            let dy = view::<T>(dys, dyl, self.name())?;
            let dx = output_of::<T>(dev, 2 * rows * n)?;
            let f = kernel::<T>("lcasr_glu_bwd");
            launch!(GLU, dev, &f, grid(rows * n), &x, &dy, &dx, &rows_arg, &n_arg);
            storage(dx, dev)
        });
        Ok((dx, xl.shape().clone()))
    }
}
