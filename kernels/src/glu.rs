//! GLU over the last dimension: `a * sigmoid(g)` where `a` and `g` are the first and
//! second halves, as a candle custom op with forward and backward.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_f32::{check_f32, cpu_slice, multiversion, sigmoid, with_f32};

/// Output rows handled by one rayon task.
const ROWS_PER_TASK: usize = 64;

/// GLU over the last dimension: the last dimension `2n` becomes `n`, the output is
/// `x[.., :n] * sigmoid(x[.., n:])`. f32 only; gradient flows to `x`.
pub fn glu(x: &Tensor) -> Result<Tensor> {
    check_f32(x, "glu", "x")?;
    match x.dims().last() {
        Some(&d) if d > 0 && d % 2 == 0 => {}
        _ => bail!(
            "glu: the last dimension must be even and non-zero, got {:?}",
            x.dims()
        ),
    }
    if !crate::native(x) {
        return crate::composed::glu(x);
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

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = self.name();
        let n = x.dims()[x.rank() - 1] / 2;
        let dx = with_f32(x, op, |x| {
            with_f32(grad, op, |dy| {
                let mut dx = vec![0.0f32; x.len()];
                dx.par_chunks_mut(2 * n * ROWS_PER_TASK)
                    .zip(x.par_chunks(2 * n * ROWS_PER_TASK))
                    .zip(dy.par_chunks(n * ROWS_PER_TASK))
                    .for_each(|((dxc, xc), dyc)| glu_bwd_rows(xc, dyc, dxc, n));
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
