//! The CUDA side of the convolutions (`cuda/conv.cu`): depthwise conv1d,
//! depthwise conv2d k3 s2 and conv2d k3 s2 (with optional SiLU) on f32, bf16
//! or f16 activations, with f32 weights and arithmetic. Each runs as one op
//! whose backward runs two more: the input gradient in the activations'
//! dtype (only when the input takes part in a graph), and the per-block
//! partial sums of the weight and bias gradients in f32, which are then added
//! up (no atomics: deterministic).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use crate::conv2d::out_len;
use crate::cuda::{
    block_grid, cuda_only_cpu_fwd, f32_view, grid, kernel, launch, output, output_of, row_parts,
    storage, view, with_act, Act, GradPart, CONV,
};

/// Threads per block of the per-plane weight-gradient kernels (`CONV_THREADS`).
const THREADS: u32 = 256;
/// Largest input channel count the conv2d kernel takes (it loops over them
/// per output; wider inputs take the composition).
pub(crate) const MAX_CONV2D_CIN: usize = 4;

/// Which convolution.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Conv {
    /// Depthwise conv1d on (B, T, C), weight (C, K).
    Depthwise1d,
    /// Depthwise conv2d k3 s2 on (B, C, H, W), weight (C, 1, 3, 3).
    Depthwise2d,
    /// Conv2d k3 s2 on (B, Cin, H, W), weight (Cout, Cin, 3, 3), then SiLU if set.
    Full {
        /// Apply SiLU to the output.
        silu: bool,
    },
}

/// The kernels' `ConvShape`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConvShape {
    batch: i64,
    cin: i32,
    cout: i32,
    h: i32,
    wd: i32,
    ho: i32,
    wo: i32,
    silu: i32,
    pad: i32,
}

// SAFETY: a plain `repr(C)` struct of scalars, laid out as the kernels' struct.
unsafe impl DeviceRepr for ConvShape {}

/// `conv` by its CUDA kernel when `x` is on a CUDA device (bf16 and f16
/// activations read and written as such, the weights taken in f32); `None`
/// where another path must run it (not CUDA, the composed path forced, or a
/// conv2d wider than [`MAX_CONV2D_CIN`] input channels).
pub(crate) fn try_apply(
    conv: Conv,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Option<Tensor>> {
    if !crate::cuda_kernels(x) {
        return Ok(None);
    }
    check(conv, x, weight, bias)?;
    if matches!(conv, Conv::Full { .. }) && x.dim(1)? > MAX_CONV2D_CIN {
        return Ok(None);
    }
    // The weights in f32 (small; the casts' backward returns their
    // gradients in the weights' dtype); the activations stay as they are:
    // no f32 copy of a plane, which at the subsampling's first convolution
    // of a long input is gigabytes.
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    Ok(Some(x.contiguous()?.apply_op3(
        &f32_of(weight)?,
        &f32_of(bias)?,
        ConvOp(conv),
    )?))
}

/// The shapes the kernels rely on.
fn check(conv: Conv, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<()> {
    let ok = match conv {
        Conv::Depthwise1d => {
            let (_, _, c) = x.dims3()?;
            let (wc, k) = w.dims2()?;
            wc == c && k % 2 == 1 && b.dims() == [c]
        }
        Conv::Depthwise2d => {
            let (_, c, h, wd) = x.dims4()?;
            w.dims() == [c, 1, 3, 3] && b.dims() == [c] && h > 0 && wd > 0
        }
        Conv::Full { .. } => {
            let (_, cin, h, wd) = x.dims4()?;
            let (cout, wcin, kh, kw) = w.dims4()?;
            (wcin, kh, kw) == (cin, 3, 3) && b.dims() == [cout] && h > 0 && wd > 0
        }
    };
    if !ok {
        bail!(
            "{conv:?} convolution: x {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    Ok(())
}

/// Dimensions of one call.
struct Dims {
    /// The input's dims.
    x: Vec<usize>,
    /// The weight's dims.
    w: Vec<usize>,
}

impl Dims {
    fn new(xl: &Layout, wl: &Layout) -> Self {
        Self {
            x: xl.dims().to_vec(),
            w: wl.dims().to_vec(),
        }
    }

    /// Output dims of `conv`.
    fn out(&self, conv: Conv) -> Vec<usize> {
        match conv {
            Conv::Depthwise1d => self.x.clone(),
            Conv::Depthwise2d => vec![self.x[0], self.x[1], out_len(self.x[2]), out_len(self.x[3])],
            Conv::Full { .. } => vec![self.x[0], self.w[0], out_len(self.x[2]), out_len(self.x[3])],
        }
    }

    /// The conv2d kernels' shape argument.
    fn shape(&self, silu: bool) -> ConvShape {
        ConvShape {
            batch: self.x[0] as i64,
            cin: self.x[1] as i32,
            cout: self.w[0] as i32,
            h: self.x[2] as i32,
            wd: self.x[3] as i32,
            ho: out_len(self.x[2]) as i32,
            wo: out_len(self.x[3]) as i32,
            silu: i32::from(silu),
            pad: 0,
        }
    }

    /// Rows (B*T) per partial sum of the depthwise conv1d weight gradient, and the partial count.
    fn parts_1d(&self) -> (usize, usize) {
        row_parts(self.x[0] * self.x[1])
    }

    /// Length of the packed partial sums of the weight and bias gradients.
    fn partial_len(&self, conv: Conv) -> usize {
        match conv {
            Conv::Depthwise1d => self.parts_1d().1 * (self.w[1] + 1) * self.x[2],
            Conv::Depthwise2d => self.x[0] * self.x[1] * 10,
            Conv::Full { .. } => self.x[0] * self.w[0] * (self.x[1] * 9 + 1),
        }
    }
}

/// The forward op.
struct ConvOp(Conv);

impl ConvOp {
    /// The forward on activations of type `T`.
    fn fwd<T: Act>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let x = view::<T>(xs, xl, op)?;
        let (w, dev) = f32_view(ws, wl, op)?;
        let (b, _) = f32_view(bs, bl, op)?;
        let d = Dims::new(xl, wl);
        let out_dims = d.out(self.0);
        let n: usize = out_dims.iter().product();
        let y = output_of::<T>(dev, n)?;
        match self.0 {
            Conv::Depthwise1d => {
                let (rows, t_len) = ((d.x[0] * d.x[1]) as i64, d.x[1] as i64);
                let (c, k) = (d.x[2] as i32, d.w[1] as i32);
                let f = kernel::<T>("lcasr_dwconv1d_fwd");
                launch!(
                    CONV,
                    dev,
                    &f,
                    grid(n),
                    &x,
                    &w,
                    &b,
                    &y,
                    &rows,
                    &t_len,
                    &c,
                    &k
                );
            }
            Conv::Depthwise2d => {
                let s = d.shape(false);
                let planes = (d.x[0] * d.x[1]) as i64;
                let f = kernel::<T>("lcasr_dwconv2d_fwd");
                launch!(
                    CONV,
                    dev,
                    &f,
                    grid(n),
                    &x,
                    &w,
                    &b,
                    &y,
                    &planes,
                    &s.cin,
                    &s.h,
                    &s.wd,
                    &s.ho,
                    &s.wo
                );
            }
            Conv::Full { silu } => {
                let s = d.shape(silu);
                let f = kernel::<T>("lcasr_conv2d_fwd");
                launch!(CONV, dev, &f, grid(n), &x, &w, &b, &y, &s);
            }
        }
        Ok((storage(y, dev), Shape::from(out_dims)))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "lcasr-conv-cuda"
    }

    cuda_only_cpu_fwd!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        with_act!(xs.dtype(), self.name(), T => self.fwd::<T>((xs, xl), (ws, wl), (bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let grad_op = |part| ConvGrad {
            conv: self.0,
            bias,
            part,
        };
        // The input gradient only where the input takes part in a graph
        // (not for the subsampling's features, where it is the costliest part).
        let dx = if x.track_op() {
            Some(x.apply_op3_no_bwd(weight, &dy, &grad_op(GradPart::Input))?)
        } else {
            None
        };
        let parts = x.apply_op3_no_bwd(weight, &dy, &grad_op(GradPart::Params))?;
        let (dw, db) = match self.0 {
            Conv::Depthwise1d => {
                let (c, k) = weight.dims2()?;
                let sums = parts.reshape(((), (k + 1) * c))?.sum(0)?;
                let dw = sums
                    .narrow(0, 0, k * c)?
                    .reshape((k, c))?
                    .t()?
                    .contiguous()?;
                (dw, sums.narrow(0, k * c, c)?)
            }
            Conv::Depthwise2d | Conv::Full { .. } => {
                let (cout, cin) = (weight.dim(0)?, weight.dim(1)?);
                let sums = parts.reshape(((), cout, cin * 9 + 1))?.sum(0)?;
                let dw = sums
                    .narrow(1, 0, cin * 9)?
                    .contiguous()?
                    .reshape(weight.shape())?;
                (dw, sums.narrow(1, cin * 9, 1)?.contiguous()?.reshape(cout)?)
            }
        };
        Ok((dx, Some(dw), Some(db)))
    }
}

/// A part of the backward of [`ConvOp`], as one op on (x, weight, dy).
struct ConvGrad<'a> {
    conv: Conv,
    /// The bias (the fused SiLU's backward recomputes the pre-activation).
    bias: &'a Tensor,
    part: GradPart,
}

impl ConvGrad<'_> {
    /// The backward part on activations of type `T`.
    fn run<T: Act>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let bias = self.bias.contiguous()?;
        let (bs, bl) = bias.storage_and_layout();
        let Storage::Cuda(bs) = &*bs else {
            bail!("{op}: the bias is not on a CUDA device");
        };
        let x = view::<T>(xs, xl, op)?;
        let dy = view::<T>(gs, gl, op)?;
        let (w, dev) = f32_view(ws, wl, op)?;
        let (b, _) = f32_view(bs, bl, op)?;
        let d = Dims::new(xl, wl);
        let n = xl.shape().elem_count();
        match self.part {
            GradPart::Input => {
                let dx = output_of::<T>(dev, n)?;
                match self.conv {
                    Conv::Depthwise1d => {
                        let (rows, t_len) = ((d.x[0] * d.x[1]) as i64, d.x[1] as i64);
                        let (c, k) = (d.x[2] as i32, d.w[1] as i32);
                        let f = kernel::<T>("lcasr_dwconv1d_dx");
                        launch!(CONV, dev, &f, grid(n), &dy, &w, &dx, &rows, &t_len, &c, &k);
                    }
                    Conv::Depthwise2d => {
                        let s = d.shape(false);
                        let planes = (d.x[0] * d.x[1]) as i64;
                        let f = kernel::<T>("lcasr_dwconv2d_dx");
                        launch!(
                            CONV,
                            dev,
                            &f,
                            grid(n),
                            &dy,
                            &w,
                            &dx,
                            &planes,
                            &s.cin,
                            &s.h,
                            &s.wd,
                            &s.ho,
                            &s.wo
                        );
                    }
                    Conv::Full { silu } => {
                        let s = d.shape(silu);
                        let f = kernel::<T>("lcasr_conv2d_dx");
                        launch!(CONV, dev, &f, grid(n), &x, &w, &b, &dy, &dx, &s);
                    }
                }
                Ok((storage(dx, dev), xl.shape().clone()))
            }
            GradPart::Params => {
                let len = d.partial_len(self.conv);
                let part = output(dev, len)?;
                match self.conv {
                    Conv::Depthwise1d => {
                        let (rows, t_len) = ((d.x[0] * d.x[1]) as i64, d.x[1] as i64);
                        let (c, k) = (d.x[2] as i32, d.w[1] as i32);
                        let (per, parts) = d.parts_1d();
                        let per = per as i64;
                        let f = kernel::<T>("lcasr_dwconv1d_dw");
                        let cfg = block_grid(parts, THREADS);
                        launch!(CONV, dev, &f, cfg, &x, &dy, &part, &rows, &t_len, &c, &k, &per);
                    }
                    Conv::Depthwise2d => {
                        let s = d.shape(false);
                        let f = kernel::<T>("lcasr_dwconv2d_dw");
                        let cfg = block_grid(d.x[0] * d.x[1], THREADS);
                        launch!(CONV, dev, &f, cfg, &x, &dy, &part, &s.h, &s.wd, &s.ho, &s.wo);
                    }
                    Conv::Full { silu } => {
                        let s = d.shape(silu);
                        let f = kernel::<T>("lcasr_conv2d_dw");
                        let cfg = block_grid(d.x[0] * d.w[0], THREADS);
                        launch!(CONV, dev, &f, cfg, &x, &w, &b, &dy, &part, &s);
                    }
                }
                Ok((storage(part, dev), Shape::from(len)))
            }
        }
    }
}

impl CustomOp3 for ConvGrad<'_> {
    fn name(&self) -> &'static str {
        match self.part {
            GradPart::Input => "lcasr-conv-grad-input-cuda",
            GradPart::Params => "lcasr-conv-grad-params-cuda",
        }
    }

    cuda_only_cpu_fwd!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        with_act!(xs.dtype(), self.name(), T => self.run::<T>((xs, xl), (ws, wl), (gs, gl)))
    }
}
