//! Element-wise activations as candle custom ops with a one-pass backward:
//! SiLU and tanh-approximated GELU.
//!
//! candle differentiates `silu` and `gelu` by composing its backward from nine
//! and thirteen full-size tensor ops; on the subsampling's activations at long
//! context (hundreds of megabytes each) those temporaries dominated the memory
//! traffic and the fresh pages of a training step. Here the backward reads `x`
//! and the incoming gradient once and writes the input gradient once.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::cpu_f32::{cpu_slice, multiversion, par_uninit, sigmoid, with_f32};

/// Elements handled by one rayon task.
const CHUNK: usize = 1 << 14;
/// sqrt(2 / pi), the tanh-GELU input scale.
const GELU_C: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh-GELU.
const GELU_A: f32 = 0.044_715;

/// SiLU `x * sigmoid(x)`, element-wise, any shape; gradient flows to `x`.
/// f32 on the CPU runs the fused kernel; other dtypes and devices use candle's `silu`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return x.silu();
    }
    x.contiguous()?.apply_op1(Activation::Silu)
}

/// GELU with the tanh approximation `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`
/// (candle's `gelu`, PyTorch's `approximate="tanh"`), element-wise; f32, any
/// shape; gradient flows to `x`. f32 on the CPU runs the fused kernel; other
/// dtypes and devices use candle's `gelu`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(Activation::GeluTanh)
}

/// Whether the fused CPU kernels handle `x`.
fn fused(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && crate::native(x)
}

/// Which activation a custom op applies.
#[derive(Clone, Copy)]
enum Activation {
    Silu,
    GeluTanh,
}

/// SiLU of one value.
#[inline(always)]
fn silu_of(x: f32) -> f32 {
    x * sigmoid(x)
}

/// The gradient before a SiLU at input `x`, given the gradient `g` after it.
#[inline(always)]
fn silu_grad(x: f32, g: f32) -> f32 {
    let s = sigmoid(x);
    g * s * (1.0 + x * (1.0 - s))
}

/// tanh(u) as 2 sigmoid(2u) - 1: branch-free, so the loops vectorise.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    2.0 * sigmoid(2.0 * u) - 1.0
}

multiversion! {
    fn silu_fwd(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (yv, &xv) in y.iter_mut().zip(x) {
            yv.write(silu_of(xv));
        }
    }
}

multiversion! {
    fn silu_bwd(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
        for ((d, &xv), &g) in dx.iter_mut().zip(x).zip(dy) {
            d.write(silu_grad(xv, g));
        }
    }
}

multiversion! {
    fn gelu_fwd(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (yv, &xv) in y.iter_mut().zip(x) {
            let t = tanh(GELU_C * (xv + GELU_A * xv * xv * xv));
            yv.write(0.5 * xv * (1.0 + t));
        }
    }
}

multiversion! {
    fn gelu_bwd(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
        for ((d, &xv), &g) in dx.iter_mut().zip(x).zip(dy) {
            let x2 = xv * xv;
            let t = tanh(GELU_C * xv * (1.0 + GELU_A * x2));
            let du = GELU_C * (1.0 + 3.0 * GELU_A * x2);
            d.write(g * (0.5 * (1.0 + t) + 0.5 * xv * (1.0 - t * t) * du));
        }
    }
}

multiversion! {
    /// `y = silu(y)` in place.
    pub(crate) fn silu_in_place(y: &mut [f32]) {
        for v in y.iter_mut() {
            *v = silu_of(*v);
        }
    }
}

multiversion! {
    /// `pre = dy * silu'(pre)` in place: the gradient before a SiLU from its input and output gradient.
    pub(crate) fn silu_grad_in_place(pre: &mut [f32], dy: &[f32]) {
        for (p, &g) in pre.iter_mut().zip(dy) {
            *p = silu_grad(*p, g);
        }
    }
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self {
            Activation::Silu => "lcasr-silu",
            Activation::GeluTanh => "lcasr-gelu-tanh",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, self.name())?;
        let kernel = match self {
            Activation::Silu => silu_fwd,
            Activation::GeluTanh => gelu_fwd,
        };
        let y = par_uninit(x.len(), CHUNK, |start, c| {
            kernel(&x[start..start + c.len()], c);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = self.name();
        let kernel = match self {
            Activation::Silu => silu_bwd,
            Activation::GeluTanh => gelu_bwd,
        };
        let dx = with_f32(x, op, |x| {
            with_f32(grad, op, |dy| {
                Ok(par_uninit(x.len(), CHUNK, |start, c| {
                    let r = start..start + c.len();
                    kernel(&x[r.clone()], &dy[r], c);
                }))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
