//! Every fused op of this crate as a composition of candle's differentiable
//! tensor ops, with the same arguments and the same maths.
//!
//! Two uses: the path the fused ops take where they have no native kernel
//! (on a CUDA device: BatchRenorm, softmax and the softmax head, and mixed
//! precision's half dtypes for the norms and GLU; candle has CUDA kernels for
//! every op used here), and the straightforward reference the fused kernels
//! are tested against on CPU. Called directly, a composition keeps every
//! intermediate for the backward pass, and attention materialises its
//! (B, H, N, N) scores; the ops' dispatch wraps it in a node that keeps only
//! its inputs and output and recomputes it in the backward (`recompute.rs`).
//!
//! They accept f32, bf16 and f16 alike (mixed precision runs them): norms,
//! softmax and batch statistics are computed in f32 and cast back, as
//! PyTorch's autocast does; the rest runs in the input's dtype.

use candle_core::{bail, DType, Device, Result, Tensor, D};

use crate::attention::{dropout_keep, AttentionOptions};
use crate::batch_renorm::{BatchStats, RenormMode};

/// SiLU, `z * sigmoid(z)`.
pub fn silu(z: &Tensor) -> Result<Tensor> {
    z * (z.neg()?.exp()? + 1.0)?.recip()?
}

/// `t` widened to f32 when it is bf16 or f16 (itself otherwise).
fn f32_of(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// `y + bias` (bias broadcast to `y`'s shape), added in f32 and cast back to
/// `y`'s dtype: under mixed precision the bias gradient, a sum over every
/// position, then accumulates in f32 (a bf16 sum over thousands of positions
/// loses most of its digits). Free for f32.
pub fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if y.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        return y.broadcast_add(bias);
    }
    f32_of(y)?
        .broadcast_add(&f32_of(bias)?)?
        .to_dtype(y.dtype())
}

/// LayerNorm over the last dimension with affine `weight`, `bias` (in f32).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = f32_of(x)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&f32_of(weight)?)?
        .broadcast_add(&f32_of(bias)?)?
        .to_dtype(x.dtype())
}

/// RMSNorm over the last dimension with scale `weight` (in f32).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = f32_of(x)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    xf.broadcast_div(&(ms + eps)?.sqrt()?)?
        .broadcast_mul(&f32_of(weight)?)?
        .to_dtype(x.dtype())
}

/// Softmax over the last dimension (in f32).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let xf = f32_of(x)?;
    let max = xf.max_keepdim(D::Minus1)?;
    let e = xf.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(x.dtype())
}

/// `softmax(x · weightᵀ + bias)` over the last dimension: `x` (.., d),
/// `weight` (C, d), `bias` (C) -> (.., C).
pub fn linear_softmax(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    linear_softmax_with(x, weight, bias, softmax_last_dim)
}

/// [`linear_softmax`] with the softmax of the (.., C) logits (in `x`'s
/// dtype) computed by `softmax`.
pub(crate) fn linear_softmax_with(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    softmax: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let c = weight.dim(0)?;
    let logits = linear_logits(x, weight, bias)?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = c;
    softmax(&logits.reshape(dims)?)
}

/// `x · weightᵀ + bias` as (rows, C) in `x`'s dtype, and `x` as (rows, d).
fn linear_logits(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    add_bias(&x.reshape((rows, d))?.matmul(&weight.t()?)?, bias)
}

/// `p (g - rowsum(g p))` with `p = softmax(logits)` over the last dimension,
/// in f32 (`logits` f32, `g` any float dtype): the gradient of the logits.
/// Takes the logits to drop them as soon as the exponentials exist.
pub fn softmax_grad_from_logits(logits: Tensor, g: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    drop(logits);
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    drop(e);
    let g = f32_of(g)?;
    let row_dot = (&g * &p)?.sum_keepdim(D::Minus1)?;
    g.broadcast_sub(&row_dot)? * p
}

/// The gradients of [`linear_softmax`]'s `x`, `weight` and `bias` for the
/// output gradient `grad`, written out: the logits recomputed, then their
/// gradient `dlogits = p (grad - rowsum(grad p))` by `dlogits_of(logits f32,
/// grad)` ([`softmax_grad_from_logits`], or a kernel; it takes the logits so
/// that they can go before its peak), and two matmuls, with the dtypes (and
/// so the roundings) of the composition's autograd. With the composition,
/// about four tensors of the probabilities' size at a time, half of what
/// autograd through the composition holds.
pub(crate) fn linear_softmax_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    grad: &Tensor,
    dlogits_of: impl Fn(Tensor, &Tensor) -> Result<Tensor>,
) -> Result<[Tensor; 3]> {
    let d = x.dim(D::Minus1)?;
    let c = weight.dim(0)?;
    let rows = x.elem_count() / d.max(1);
    let x2 = x.reshape((rows, d))?;
    let logits = f32_of(&linear_logits(x, weight, bias)?)?;
    let dlogits = dlogits_of(logits, &grad.reshape((rows, c))?)?;
    let db = dlogits.sum(0)?.to_dtype(bias.dtype())?;
    let dl = dlogits.to_dtype(x.dtype())?;
    drop(dlogits);
    let dx = dl.matmul(weight)?.reshape(x.shape())?;
    let dw = dl.t()?.matmul(&x2)?;
    Ok([dx, dw, db])
}

/// GLU over the last dimension: first half times the sigmoid of the second.
pub fn glu(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? / 2;
    let a = x.narrow(D::Minus1, 0, n)?;
    let g = x.narrow(D::Minus1, n, n)?;
    a * (g.neg()?.exp()? + 1.0)?.recip()?
}

/// Depthwise conv1d on channels-last `x` (B, T, C), `weight` (C, K), "same"
/// zero padding of K/2 frames each side: `y[:, t, c] = bias[c] + sum_k
/// weight[c, k] * x[:, t + k - K/2, c]`. In f32 (its weight gradient sums
/// over every position).
pub fn depthwise_conv1d(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if crate::half(x) {
        return depthwise_conv1d(&f32_of(x)?, &f32_of(weight)?, &f32_of(bias)?)?
            .to_dtype(x.dtype());
    }
    let (_b, t, _c) = x.dims3()?;
    let k = weight.dim(1)?;
    let pad = k / 2;
    let xp = x.pad_with_zeros(1, pad, k - 1 - pad)?;
    let y = sum_terms((0..k).map(|ki| {
        let tap = weight.narrow(1, ki, 1)?.reshape((1, 1, ()))?;
        xp.narrow(1, ki, t)?.broadcast_mul(&tap)
    }))?;
    add_bias(&y, &bias.reshape((1, 1, ()))?)
}

/// The sum of a convolution's per-tap terms, in tap order.
fn sum_terms(terms: impl IntoIterator<Item = Result<Tensor>>) -> Result<Tensor> {
    let mut terms = terms.into_iter();
    let first = terms
        .next()
        .ok_or_else(|| candle_core::Error::Msg("no taps".into()))??;
    terms.try_fold(first, |acc, term| acc + term?)
}

/// The nine (row, column) taps of a 3 x 3 kernel, row-major.
const TAPS: [(usize, usize); 9] = [
    (0, 0),
    (0, 1),
    (0, 2),
    (1, 0),
    (1, 1),
    (1, 2),
    (2, 0),
    (2, 1),
    (2, 2),
];

/// Output rows and columns of a kernel-3, stride-2, padding-1 convolution.
fn out_hw(x: &Tensor) -> Result<(usize, usize)> {
    let (_, _, h, w) = x.dims4()?;
    Ok((crate::conv2d::out_len(h), crate::conv2d::out_len(w)))
}

/// The padded input's pixels (2i + kh, 2j + kw) for every output (i, j).
fn tap(xp: &Tensor, kh: usize, kw: usize, ho: usize, wo: usize) -> Result<Tensor> {
    let rows: Vec<u32> = (0..ho).map(|i| (2 * i + kh) as u32).collect();
    let cols: Vec<u32> = (0..wo).map(|i| (2 * i + kw) as u32).collect();
    let dev = xp.device();
    // candle's index_select reads contiguous tensors only.
    xp.contiguous()?
        .index_select(&Tensor::new(rows, dev)?, 2)?
        .contiguous()?
        .index_select(&Tensor::new(cols, dev)?, 3)
}

/// Conv2d, kernel 3, stride 2, padding 1, on (B, Cin, H, W) with `weight`
/// (Cout, Cin, 3, 3): the sum over the nine taps of `weight[:, :, kh, kw] @ tap`.
pub fn conv2d_k3s2(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (bsz, cin, _, _) = x.dims4()?;
    let cout = weight.dim(0)?;
    let (ho, wo) = out_hw(x)?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let y = sum_terms(TAPS.into_iter().map(|(kh, kw)| {
        let t = tap(&xp, kh, kw, ho, wo)?.reshape((bsz, cin, ho * wo))?;
        let wk = weight
            .narrow(2, kh, 1)?
            .narrow(3, kw, 1)?
            .reshape((1, cout, cin))?;
        wk.broadcast_as((bsz, cout, cin))?.matmul(&t)
    }))?
    .reshape((bsz, cout, ho, wo))?;
    add_bias(&y, &bias.reshape((1, cout, 1, 1))?)
}

/// [`conv2d_k3s2`] followed by SiLU.
pub fn conv2d_k3s2_silu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    silu(&conv2d_k3s2(x, weight, bias)?)
}

/// Depthwise conv2d, kernel 3, stride 2, padding 1, on (B, C, H, W) with
/// `weight` (C, 1, 3, 3): the sum over the nine taps of `weight[c] * tap`.
/// In f32 (its weight gradient sums over every position).
pub fn depthwise_conv2d_k3s2(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if crate::half(x) {
        return depthwise_conv2d_k3s2(&f32_of(x)?, &f32_of(weight)?, &f32_of(bias)?)?
            .to_dtype(x.dtype());
    }
    let c = x.dim(1)?;
    let (ho, wo) = out_hw(x)?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let y = sum_terms(TAPS.into_iter().map(|(kh, kw)| {
        let wk = weight
            .narrow(2, kh, 1)?
            .narrow(3, kw, 1)?
            .reshape((1, c, 1, 1))?;
        tap(&xp, kh, kw, ho, wo)?.broadcast_mul(&wk)
    }))?;
    add_bias(&y, &bias.reshape((1, c, 1, 1))?)
}

/// A (1, 1, C) row of `values` on `device`.
fn row(values: &[f32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(values, (1, 1, values.len()), device)
}

/// BatchRenorm + affine + SiLU on (B, T, C), as
/// [`crate::batch_renorm::batch_renorm_silu`]: in training mode the batch
/// mean and std (over the positions `lengths` counts) carry gradient, the
/// corrections r and d do not. Synchronised statistics (a data-parallel
/// stats reducer) are not supported here.
pub fn batch_renorm_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mode: RenormMode,
) -> Result<(Tensor, Option<BatchStats>)> {
    let dtype = x.dtype();
    let (x, weight, bias) = (&f32_of(x)?, &f32_of(weight)?, &f32_of(bias)?);
    let dev = x.device();
    match mode {
        RenormMode::Eval {
            running_mean,
            running_std,
        } => {
            let z = x
                .broadcast_sub(&row(running_mean, dev)?)?
                .broadcast_div(&row(running_std, dev)?)?
                .broadcast_mul(weight)?
                .broadcast_add(bias)?;
            Ok((silu(&z)?.to_dtype(dtype)?, None))
        }
        RenormMode::Train {
            running_mean,
            running_std,
            rmax,
            dmax,
            eps,
            lengths,
        } => {
            if crate::batch_renorm::stats_reducer_installed() {
                bail!(
                    "batch_renorm_silu: synchronised batch statistics across ranks run on CPU only"
                )
            }
            let (bsz, t, c) = x.dims3()?;
            let mask: Vec<f32> = (0..bsz * t)
                .map(|i| match lengths {
                    Some(l) if i % t >= l[i / t] => 0.0,
                    _ => 1.0,
                })
                .collect();
            let n = mask.iter().sum::<f32>() as f64;
            if n == 0.0 {
                bail!("batch_renorm_silu: the lengths leave no position to take statistics over")
            }
            let mask = Tensor::from_vec(mask, (bsz, t, 1), dev)?;
            let sum_bt = |v: &Tensor| -> Result<Tensor> { v.sum_keepdim(0)?.sum_keepdim(1) };
            let mean = (sum_bt(&x.broadcast_mul(&mask)?)? / n)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = (sum_bt(&xc.sqr()?.broadcast_mul(&mask)?)? / n)?;
            let std = (var.sqrt()? + eps as f64)?;
            let mean_v: Vec<f32> = mean.flatten_all()?.to_vec1()?;
            let std_v: Vec<f32> = std.flatten_all()?.to_vec1()?;
            let r: Vec<f32> = (0..c)
                .map(|i| (std_v[i] / running_std[i]).clamp(1.0 / rmax, rmax))
                .collect();
            let d: Vec<f32> = (0..c)
                .map(|i| ((mean_v[i] - running_mean[i]) / running_std[i]).clamp(-dmax, dmax))
                .collect();
            let z = xc
                .broadcast_div(&std)?
                .broadcast_mul(&row(&r, dev)?)?
                .broadcast_add(&row(&d, dev)?)?
                .broadcast_mul(weight)?
                .broadcast_add(bias)?;
            let stats = BatchStats {
                mean: mean_v,
                std: std_v,
            };
            Ok((silu(&z)?.to_dtype(dtype)?, Some(stats)))
        }
    }
}

/// Rotate-half rotary of `z` (B, H, N, Dh) with `cos`, `sin` (N, Dh).
fn rotate(z: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = z.dim(D::Minus1)? / 2;
    let turned = Tensor::cat(
        &[&z.narrow(3, half, half)?.neg()?, &z.narrow(3, 0, half)?],
        3,
    )?;
    z.broadcast_mul(cos)? + turned.broadcast_mul(sin)?
}

/// The heads of the interleaved `qkv` (B, N, 3*H*Dh) of [`attention`]:
/// q, k, v as contiguous (B, H, N, Dh), q and k rotated when `opts` has
/// rotary tables (not scaled).
pub fn attention_heads(qkv: &Tensor, opts: &AttentionOptions) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, width) = qkv.dims3()?;
    let (h, dh) = (opts.n_heads, opts.head_dim);
    if width != 3 * h * dh {
        bail!("attention: qkv width {width} is not 3 x {h} heads x {dh}");
    }
    let dev = qkv.device();
    let x = qkv.reshape((b, n, h, dh, 3))?;
    let part = |i: usize| -> Result<Tensor> {
        x.narrow(4, i, 1)?.squeeze(4)?.transpose(1, 2)?.contiguous()
    };
    let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
    if let Some((cos, sin)) = opts.rotary {
        if cos.len() < n * dh || sin.len() < n * dh {
            bail!("attention: rotary tables hold fewer than {n} rows of {dh}");
        }
        let cos = Tensor::from_slice(&cos[..n * dh], (n, dh), dev)?.to_dtype(qkv.dtype())?;
        let sin = Tensor::from_slice(&sin[..n * dh], (n, dh), dev)?.to_dtype(qkv.dtype())?;
        q = rotate(&q, &cos, &sin)?.contiguous()?;
        k = rotate(&k, &cos, &sin)?.contiguous()?;
    }
    Ok((q, k, v))
}

/// Multi-head self-attention as [`crate::attention::attention`]: the same
/// interleaved qkv layout, rotary tables, key padding, windows, dropout mask
/// (the same hash of seed, item, head, query and key) and zeroed padded
/// query rows; softmax over materialised (B, H, N, N) scores.
pub fn attention(qkv: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
    let (b, n, _) = qkv.dims3()?;
    let (h, dh) = (opts.n_heads, opts.head_dim);
    let dev = qkv.device();
    let (q, k, v) = attention_heads(qkv, opts)?;
    // Scores in the input's dtype; mask and softmax in f32.
    let scores = f32_of(&(q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?)?;
    let lengths = opts.lengths.map_or_else(|| vec![n; b], <[usize]>::to_vec);
    let mut mask = vec![0f32; b * n * n];
    let mut row_keep = vec![0f32; b * n];
    for (bi, &len) in lengths.iter().enumerate() {
        for i in 0..n {
            row_keep[bi * n + i] = if i < len { 1.0 } else { 0.0 };
            for j in 0..n {
                // Padded query rows attend everywhere and are zeroed below.
                let hidden = i < len
                    && (j >= len
                        || opts.window_left.is_some_and(|l| j + l < i)
                        || opts.window_right.is_some_and(|r| j > i + r));
                if hidden {
                    mask[(bi * n + i) * n + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, n, n), dev)?;
    let scores = scores.broadcast_add(&mask)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let e = scores.broadcast_sub(&max)?.exp()?;
    let mut probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    if let Some((p, seed)) = opts.dropout {
        let scale = 1.0 / (1.0 - p);
        let mut keep = Vec::with_capacity(b * h * n * n);
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..n {
                    for j in 0..n {
                        let kept = dropout_keep(p, seed, bi, hi, i, j);
                        keep.push(if kept { scale } else { 0.0 });
                    }
                }
            }
        }
        probs = (probs * Tensor::from_vec(keep, (b, h, n, n), dev)?)?;
    }
    let out = probs
        .to_dtype(qkv.dtype())?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, n, h * dh))?;
    out.broadcast_mul(&Tensor::from_vec(row_keep, (b, n, 1), dev)?.to_dtype(qkv.dtype())?)
}
