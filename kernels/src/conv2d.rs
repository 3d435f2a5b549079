//! The subsampling convolutions: 3x3 kernels, stride 2, padding 1, with bias, in NCHW
//! layout like PyTorch, for any H and W. `conv2d_k3s2` (groups = 1) uses a blocked
//! im2col and gemm; `depthwise_conv2d_k3s2` (groups = C) uses direct loops. Both are
//! candle custom ops with forward and backward. `conv2d_k3s2_silu` fuses the SiLU that
//! follows the subsampling's first convolution and keeps only its output: the backward
//! recomputes the pre-activation block by block, so neither it nor its gradient is ever
//! held whole (at 16,384 input frames each would be 256 x 8192 x 40 floats per item).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::activation::{silu_grad_in_place, silu_in_place};
use crate::cpu_f32::{
    check_f32, cpu_slices3, dot, matmul, multiversion, sum, to_vec_f32, with_f32,
};

/// Upper bound on the elements of one im2col block.
const COL_BLOCK: usize = 1 << 20;
/// Upper bound on the output columns (pixels) of one block.
const MAX_BLOCK_COLS: usize = 8192;

/// Output size of a k3 s2 p1 convolution along a dimension of size `len`.
pub fn out_len(len: usize) -> usize {
    (len.max(1) - 1) / 2 + 1
}

/// Full 2-D convolution (groups = 1), kernel 3x3, stride 2, padding 1:
/// `x` (B, Cin, H, W), `weight` (Cout, Cin, 3, 3), `bias` (Cout) ->
/// (B, Cout, (H-1)/2+1, (W-1)/2+1). Gradients flow to all three inputs (to `x` only
/// when it takes part in a graph).
/// f32 on the CPU kernel (bf16 and f16 run the composition there, recomputed
/// in the backward); the CUDA kernels read and write f32, bf16 and f16.
pub fn conv2d_k3s2(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::conv_cuda::try_apply(
        crate::conv_cuda::Conv::Full { silu: false },
        x,
        weight,
        bias,
    )? {
        return Ok(y);
    }
    if crate::half(x) {
        return crate::recompute::node(&[x, weight, bias], |t| {
            crate::composed::conv2d_k3s2(&t[0], &t[1], &t[2])
        });
    }
    let op = "conv2d_k3s2";
    let (_b, cin, _h, _w) = check_args(op, x, weight, bias)?;
    let (_cout, wcin, _, _) = weight.dims4()?;
    if wcin != cin {
        bail!(
            "{op}: weight must be (Cout, Cin={cin}, 3, 3), got {:?}",
            weight.dims()
        );
    }
    if !crate::native(x) {
        return crate::recompute::node(&[x, weight, bias], |t| {
            crate::composed::conv2d_k3s2(&t[0], &t[1], &t[2])
        });
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        Conv2d { silu: false },
    )
}

/// `silu(conv2d_k3s2(x, weight, bias))` as one op that saves only `x` and its
/// output; same shapes, gradients and f32 requirement as [`conv2d_k3s2`].
pub fn conv2d_k3s2_silu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) =
        crate::conv_cuda::try_apply(crate::conv_cuda::Conv::Full { silu: true }, x, weight, bias)?
    {
        return Ok(y);
    }
    if crate::half(x) {
        return crate::recompute::node(&[x, weight, bias], |t| {
            crate::composed::conv2d_k3s2_silu(&t[0], &t[1], &t[2])
        });
    }
    let (_b, cin, _h, _w) = check_args("conv2d_k3s2_silu", x, weight, bias)?;
    if weight.dim(1)? != cin {
        bail!(
            "conv2d_k3s2_silu: weight must be (Cout, Cin={cin}, 3, 3), got {:?}",
            weight.dims()
        );
    }
    if !crate::native(x) {
        return crate::recompute::node(&[x, weight, bias], |t| {
            crate::composed::conv2d_k3s2_silu(&t[0], &t[1], &t[2])
        });
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        Conv2d { silu: true },
    )
}

/// Depthwise 2-D convolution (groups = C), kernel 3x3, stride 2, padding 1:
/// `x` (B, C, H, W), `weight` (C, 1, 3, 3), `bias` (C) -> (B, C, (H-1)/2+1, (W-1)/2+1).
/// Gradients flow to all three inputs.
/// f32 on the CPU kernel (bf16 and f16 run the composition there, recomputed
/// in the backward); the CUDA kernels read and write f32, bf16 and f16.
pub fn depthwise_conv2d_k3s2(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) =
        crate::conv_cuda::try_apply(crate::conv_cuda::Conv::Depthwise2d, x, weight, bias)?
    {
        return Ok(y);
    }
    if crate::half(x) {
        return crate::recompute::node(&[x, weight, bias], |t| {
            crate::composed::depthwise_conv2d_k3s2(&t[0], &t[1], &t[2])
        });
    }
    let op = "depthwise_conv2d_k3s2";
    let (_b, c, _h, _w) = check_args(op, x, weight, bias)?;
    if weight.dims() != [c, 1, 3, 3] {
        bail!(
            "{op}: weight must be (C={c}, 1, 3, 3), got {:?}",
            weight.dims()
        );
    }
    if !crate::native(x) {
        return crate::recompute::node(&[x, weight, bias], |t| {
            crate::composed::depthwise_conv2d_k3s2(&t[0], &t[1], &t[2])
        });
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, DepthwiseConv2d)
}

/// Shared checks; returns the input dims.
fn check_args(
    op: &str,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    check_f32(x, op, "x")?;
    check_f32(weight, op, "weight")?;
    check_f32(bias, op, "bias")?;
    let dims = x.dims4()?;
    let (cout, _, kh, kw) = weight.dims4()?;
    if (kh, kw) != (3, 3) {
        bail!("{op}: the kernel must be 3x3, got {:?}", weight.dims());
    }
    if bias.dims() != [cout] {
        bail!("{op}: bias must be [{cout}], got {:?}", bias.dims());
    }
    if dims.2 == 0 || dims.3 == 0 {
        bail!("{op}: empty spatial input {:?}", x.dims());
    }
    Ok(dims)
}

/// Sizes of one groups=1 problem.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
}

impl Dims {
    fn new(x: &[usize], cout: usize) -> Self {
        let (h, w) = (x[2], x[3]);
        Dims {
            b: x[0],
            cin: x[1],
            cout,
            h,
            w,
            ho: out_len(h),
            wo: out_len(w),
        }
    }

    /// Rows of the im2col matrix.
    fn k(&self) -> usize {
        self.cin * 9
    }

    /// Output rows per block so that an im2col block stays small.
    fn rows_per_block(&self) -> usize {
        let cols = (COL_BLOCK / self.k()).clamp(1, MAX_BLOCK_COLS);
        (cols / self.wo).clamp(1, self.ho)
    }

    /// Output row blocks [h0, h1).
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let step = self.rows_per_block();
        let ho = self.ho;
        (0..ho)
            .step_by(step)
            .map(move |h0| (h0, (h0 + step).min(ho)))
    }
}

/// Fills `col` (Cin*9, (h1-h0)*Wo) from one batch item `x` (Cin, H, W).
fn im2col(x: &[f32], d: &Dims, h0: usize, h1: usize, col: &mut [f32]) {
    let nb = (h1 - h0) * d.wo;
    col[..d.k() * nb]
        .par_chunks_mut(nb)
        .enumerate()
        .for_each(|(row, dst)| {
            let (ci, kh, kw) = (row / 9, (row % 9) / 3, row % 3);
            let plane = &x[ci * d.h * d.w..][..d.h * d.w];
            for (ho, out) in (h0..h1).zip(dst.chunks_exact_mut(d.wo)) {
                let r = 2 * ho + kh;
                if r == 0 || r > d.h {
                    out.fill(0.0);
                    continue;
                }
                let xr = &plane[(r - 1) * d.w..][..d.w];
                for (wo, o) in out.iter_mut().enumerate() {
                    let c = 2 * wo + kw;
                    *o = if c == 0 || c > d.w { 0.0 } else { xr[c - 1] };
                }
            }
        });
}

/// Adds `col` (Cin*9, (h1-h0)*Wo) back into one batch item `dx` (Cin, H, W).
fn col2im(col: &[f32], d: &Dims, h0: usize, h1: usize, dx: &mut [f32]) {
    let nb = (h1 - h0) * d.wo;
    dx.par_chunks_mut(d.h * d.w)
        .enumerate()
        .for_each(|(ci, plane)| {
            for tap in 0..9 {
                let (kh, kw) = (tap / 3, tap % 3);
                let src = &col[(ci * 9 + tap) * nb..][..nb];
                for (ho, row) in (h0..h1).zip(src.chunks_exact(d.wo)) {
                    let r = 2 * ho + kh;
                    if r == 0 || r > d.h {
                        continue;
                    }
                    let xr = &mut plane[(r - 1) * d.w..][..d.w];
                    for (wo, v) in row.iter().enumerate() {
                        let c = 2 * wo + kw;
                        if c != 0 && c <= d.w {
                            xr[c - 1] += v;
                        }
                    }
                }
            }
        });
}

/// Sum of each (H*W) plane of an NCHW tensor, accumulated per channel.
fn channel_sums(data: &[f32], c: usize, plane: usize) -> Vec<f32> {
    let sums: Vec<f32> = data.par_chunks(plane).map(sum).collect();
    let mut out = vec![0.0f32; c];
    for (i, s) in sums.iter().enumerate() {
        out[i % c] += s;
    }
    out
}

/// The groups = 1 convolution, optionally followed by SiLU.
struct Conv2d {
    silu: bool,
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        if self.silu {
            "lcasr-conv2d-k3s2-silu"
        } else {
            "lcasr-conv2d-k3s2"
        }
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
        let d = Dims::new(l1.dims(), bias.len());
        let plane = d.ho * d.wo;
        let mut y = vec![0.0f32; d.b * d.cout * plane];
        y.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(i, p)| p.fill(bias[i % d.cout]));
        let mut col = vec![0.0f32; d.k() * d.rows_per_block() * d.wo];
        for bi in 0..d.b {
            let xb = &x[bi * d.cin * d.h * d.w..][..d.cin * d.h * d.w];
            for (h0, h1) in d.blocks() {
                let nb = (h1 - h0) * d.wo;
                im2col(xb, &d, h0, h1, &mut col);
                let dst = y[bi * d.cout * plane + h0 * d.wo..].as_mut_ptr();
                // SAFETY: dst spans Cout rows of stride `plane` holding nb values each, all
                // inside `y`; w is (Cout, k) and col is (k, nb), both contiguous.
                unsafe {
                    matmul(
                        d.cout,
                        nb,
                        d.k(),
                        dst,
                        plane,
                        true,
                        (w.as_ptr(), d.k(), 1),
                        (col.as_ptr(), nb, 1),
                    )
                };
            }
        }
        if self.silu {
            y.par_chunks_mut(plane).for_each(silu_in_place);
        }
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.cout, d.ho, d.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let w = to_vec_f32(weight, op)?;
        let bias = to_vec_f32(bias, op)?;
        let d = Dims::new(x.dims(), weight.dim(0)?);
        let want_dx = x.track_op();
        let plane = d.ho * d.wo;
        let (dx, dw, db) =
            with_f32(x, op, |x| {
                with_f32(grad, op, |dy| {
                    let mut db = vec![0.0f32; d.cout];
                    let mut dw = vec![0.0f32; d.cout * d.k()];
                    let mut dx = vec![0.0f32; if want_dx { x.len() } else { 0 }];
                    let cols = d.rows_per_block() * d.wo;
                    let mut col = vec![0.0f32; d.k() * cols];
                    let mut dcol = vec![0.0f32; if want_dx { d.k() * cols } else { 0 }];
                    // With the fused SiLU: one block's recomputed pre-activation, then its gradient.
                    let mut pre = vec![0.0f32; if self.silu { d.cout * cols } else { 0 }];
                    let in_size = d.cin * d.h * d.w;
                    for bi in 0..d.b {
                        let xb = &x[bi * in_size..][..in_size];
                        for (h0, h1) in d.blocks() {
                            let nb = (h1 - h0) * d.wo;
                            let dy_block = &dy[bi * d.cout * plane + h0 * d.wo..];
                            im2col(xb, &d, h0, h1, &mut col);
                            if self.silu {
                                pre[..d.cout * nb]
                                    .par_chunks_mut(nb)
                                    .zip(bias.par_iter())
                                    .for_each(|(r, &b)| r.fill(b));
                                // SAFETY: pre is (Cout, nb); w is (Cout, k); col is (k, nb).
                                unsafe {
                                    matmul(
                                        d.cout,
                                        nb,
                                        d.k(),
                                        pre.as_mut_ptr(),
                                        nb,
                                        true,
                                        (w.as_ptr(), d.k(), 1),
                                        (col.as_ptr(), nb, 1),
                                    )
                                };
                                pre[..d.cout * nb].par_chunks_mut(nb).enumerate().for_each(
                                    |(c, r)| silu_grad_in_place(r, &dy_block[c * plane..][..nb]),
                                );
                            }
                            // The output gradient of this block: Cout rows of nb values, row stride g_rs.
                            let (g, g_rs) = if self.silu {
                                (&pre[..d.cout * nb], nb)
                            } else {
                                (dy_block, plane)
                            };
                            let sums: Vec<f32> = (0..d.cout)
                                .into_par_iter()
                                .map(|c| sum(&g[c * g_rs..][..nb]))
                                .collect();
                            for (acc, s) in db.iter_mut().zip(sums) {
                                *acc += s;
                            }
                            // SAFETY: dw is (Cout, k); g spans Cout rows of stride g_rs with nb
                            // values each; col is (k, nb), read transposed.
                            unsafe {
                                matmul(
                                    d.cout,
                                    d.k(),
                                    nb,
                                    dw.as_mut_ptr(),
                                    d.k(),
                                    true,
                                    (g.as_ptr(), g_rs, 1),
                                    (col.as_ptr(), 1, nb),
                                )
                            };
                            if want_dx {
                                // SAFETY: dcol is (k, nb); w is (Cout, k) read transposed; g as above.
                                unsafe {
                                    matmul(
                                        d.k(),
                                        nb,
                                        d.cout,
                                        dcol.as_mut_ptr(),
                                        nb,
                                        false,
                                        (w.as_ptr(), 1, d.k()),
                                        (g.as_ptr(), g_rs, 1),
                                    )
                                };
                                col2im(&dcol, &d, h0, h1, &mut dx[bi * in_size..][..in_size]);
                            }
                        }
                    }
                    Ok((dx, dw, db))
                })
            })?;
        let dev = x.device();
        let dx = if want_dx {
            Some(Tensor::from_vec(dx, x.shape(), dev)?)
        } else {
            None
        };
        Ok((
            dx,
            Some(Tensor::from_vec(dw, weight.shape(), dev)?),
            Some(Tensor::from_vec(db, d.cout, dev)?),
        ))
    }
}

/// Splits input row `xr` into the three stride-2 tap vectors of length `wo`:
/// left[j] = x[2j-1], mid[j] = x[2j], right[j] = x[2j+1] (zero outside the row).
#[inline(always)]
fn split_row(xr: &[f32], taps: &mut [Vec<f32>; 3]) {
    let [left, mid, right] = taps;
    let wo = mid.len();
    for j in 0..wo {
        mid[j] = xr[2 * j];
        left[j] = if j > 0 { xr[2 * j - 1] } else { 0.0 };
        right[j] = xr.get(2 * j + 1).copied().unwrap_or(0.0);
    }
}

/// Input row feeding output row `ho` through kernel row `kh`, if inside the image.
#[inline(always)]
fn input_row(ho: usize, kh: usize, h: usize) -> Option<usize> {
    let r = 2 * ho + kh;
    (r >= 1 && r <= h).then(|| r - 1)
}

multiversion! {
    /// One output plane of the depthwise conv.
    fn dw_fwd_plane(x: &[f32], y: &mut [f32], k: &[f32], bias: f32, h: usize, w: usize) {
        let wo = out_len(w);
        let mut taps = [vec![0.0f32; wo], vec![0.0f32; wo], vec![0.0f32; wo]];
        for (ho, yr) in y.chunks_exact_mut(wo).enumerate() {
            yr.fill(bias);
            for kh in 0..3 {
                let Some(r) = input_row(ho, kh, h) else { continue };
                split_row(&x[r * w..][..w], &mut taps);
                let (k0, k1, k2) = (k[kh * 3], k[kh * 3 + 1], k[kh * 3 + 2]);
                for (((yv, a), b), c) in yr.iter_mut().zip(&taps[0]).zip(&taps[1]).zip(&taps[2]) {
                    *yv += k0 * a + k1 * b + k2 * c;
                }
            }
        }
    }
}

multiversion! {
    /// Gradients of one plane: dx into `dx`, the 9 kernel gradients into `dk`.
    fn dw_bwd_plane(x: &[f32], dy: &[f32], dx: &mut [f32], k: &[f32], dk: &mut [f32], h: usize, w: usize) {
        let wo = out_len(w);
        let mut taps = [vec![0.0f32; wo], vec![0.0f32; wo], vec![0.0f32; wo]];
        let mut even = vec![0.0f32; wo];
        let mut odd = vec![0.0f32; wo];
        for (ho, g) in dy.chunks_exact(wo).enumerate() {
            for kh in 0..3 {
                let Some(r) = input_row(ho, kh, h) else { continue };
                split_row(&x[r * w..][..w], &mut taps);
                for kw in 0..3 {
                    dk[kh * 3 + kw] += dot(g, &taps[kw]);
                }
                // x[2j] feeds out j via tap 1; x[2j+1] feeds out j via tap 2, out j+1 via tap 0.
                let (k0, k1, k2) = (k[kh * 3], k[kh * 3 + 1], k[kh * 3 + 2]);
                for ((e, o), gv) in even.iter_mut().zip(odd.iter_mut()).zip(g) {
                    *e = k1 * gv;
                    *o = k2 * gv;
                }
                for (o, gv) in odd.iter_mut().zip(&g[1..]) {
                    *o += k0 * gv;
                }
                let dr = &mut dx[r * w..][..w];
                for (j, pair) in dr.chunks_mut(2).enumerate() {
                    pair[0] += even[j];
                    if let Some(v) = pair.get_mut(1) {
                        *v += odd[j];
                    }
                }
            }
        }
    }
}

struct DepthwiseConv2d;

impl CustomOp3 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        "lcasr-depthwise-conv2d-k3s2"
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
        let (x, k, bias) = cpu_slices3(op, (s1, l1), (s2, l2), (s3, l3))?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let (ho, wo) = (out_len(h), out_len(w));
        let mut y = vec![0.0f32; b * c * ho * wo];
        y.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .enumerate()
            .for_each(|(i, (yp, xp))| {
                let ci = i % c;
                dw_fwd_plane(xp, yp, &k[ci * 9..][..9], bias[ci], h, w)
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, ho, wo))))
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
        let (_b, c, h, w) = x.dims4()?;
        let plane = out_len(h) * out_len(w);
        let k = to_vec_f32(weight, op)?;
        let (dx, dk, db) = with_f32(x, op, |x| {
            with_f32(grad, op, |dy| {
                let mut dx = vec![0.0f32; x.len()];
                let dks: Vec<[f32; 9]> = dx
                    .par_chunks_mut(h * w)
                    .zip(x.par_chunks(h * w))
                    .zip(dy.par_chunks(plane))
                    .enumerate()
                    .map(|(i, ((dxp, xp), gp))| {
                        let mut dk = [0.0f32; 9];
                        dw_bwd_plane(xp, gp, dxp, &k[(i % c) * 9..][..9], &mut dk, h, w);
                        dk
                    })
                    .collect();
                let mut dk = vec![0.0f32; c * 9];
                for (i, p) in dks.iter().enumerate() {
                    dk[(i % c) * 9..][..9]
                        .iter_mut()
                        .zip(p)
                        .for_each(|(a, b)| *a += b);
                }
                Ok((dx, dk, channel_sums(dy, c, plane)))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dk, weight.shape(), dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}
