//! GLU over the last dimension: `a * sigmoid(g)` where `a` and `g` are the first and
//! second halves, as a candle custom op with forward and backward.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_f32::{check_f32, cpu_slice, multiversion, sigmoid};

/// Output rows handled by one rayon task.
const ROWS_PER_TASK: usize = 64;

/// GLU over the last dimension: the last dimension `2n` becomes `n`, the output is
/// `x[.., :n] * sigmoid(x[.., n:])`. f32 only; gradient flows to `x`.
pub fn glu(x: &Tensor) -> Result<Tensor> {
    if crate::half(x) {
        return crate::recompute::node(&[x], |t| crate::composed::glu(&t[0]));
    }
    check_f32(x, "glu", "x")?;
    match x.dims().last() {
        Some(&d) if d > 0 && d % 2 == 0 => {}
        _ => bail!(
            "glu: the last dimension must be even and non-zero, got {:?}",
            x.dims()
        ),
    }
    if !(crate::native(x) || crate::native_cuda(x)) {
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
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        let (x, dev) = crate::cuda::f32_view(s, l, self.name())?;
        let mut dims = l.dims().to_vec();
        let n = dims[dims.len() - 1] / 2;
        *dims.last_mut().expect("rank checked") = n;
        let rows = l.shape().elem_count() / (2 * n);
        let y = crate::cuda::output(dev, rows * n)?;
        let func = crate::cuda::GLU.func(dev, "lcasr_glu_fwd")?;
        let (rows_arg, n_arg) = (rows as i64, n as i64);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&x).arg(&y).arg(&rows_arg).arg(&n_arg);
        // SAFETY: the kernel reads rows x 2n values of `x` and writes rows x n of `y`.
        unsafe { launch.launch(crate::cuda::grid(rows * n)) }.w()?;
        Ok((crate::cuda::storage(y, dev), Shape::from(dims)))
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
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        let (x, dev) = crate::cuda::f32_view(xs, xl, self.name())?;
        let (dy, _) = crate::cuda::f32_view(dys, dyl, self.name())?;
        let n = xl.dims()[xl.dims().len() - 1] / 2;
        let rows = xl.shape().elem_count() / (2 * n);
        let dx = crate::cuda::output(dev, 2 * rows * n)?;
        let func = crate::cuda::GLU.func(dev, "lcasr_glu_bwd")?;
        let (rows_arg, n_arg) = (rows as i64, n as i64);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&x).arg(&dy).arg(&dx).arg(&rows_arg).arg(&n_arg);
        // SAFETY: the kernel reads rows x 2n values of `x`, rows x n of `dy`,
        // and writes all rows x 2n of `dx`.
        unsafe { launch.launch(crate::cuda::grid(rows * n)) }.w()?;
        Ok((crate::cuda::storage(dx, dev), xl.shape().clone()))
    }
}
