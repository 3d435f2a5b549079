//! The attention forward of inference on candle-flash-attn (FlashAttention-2
//! on CUTLASS; feature `flash-attn`). It returns no log-sum-exp, so it takes
//! only calls that will not be differentiated ([`AttentionOptions::forward_only`]);
//! training keeps the kernels of `attention_cuda` / `attention_tc_cuda`, whose
//! backward needs the forward's log-sum-exp.
//!
//! The crate takes q, k, v as (B, N, H, Dh) and key padding as packed
//! variable-length sequences, so this module splits the interleaved qkv into
//! heads (rotated as our kernels rotate them), packs the valid rows of each
//! item when some item is shorter than N, and puts the zero rows back after.

use candle_core::{DType, Device, Result, Tensor};

use crate::attention::AttentionOptions;
use crate::attention_tc_cuda::sm80_or_newer;

/// Largest head dim the crate compiles kernels for (it also has 512 for
/// paged caches only); head dims must be multiples of 8.
const MAX_HEAD_DIM: usize = 256;

/// Whether candle-flash-attn may take forward-only attention (where
/// [`unsupported`] finds nothing against it): yes unless
/// `LCASR_FLASH_ATTN=0` turns it off.
pub(crate) fn enabled() -> Result<bool> {
    crate::cuda::env_switch("LCASR_FLASH_ATTN", "flash attention")
}

/// Why candle-flash-attn cannot take `qkv` under `opts`, if it cannot.
pub(crate) fn unsupported(qkv: &Tensor, opts: &AttentionOptions) -> Result<Option<String>> {
    let dh = opts.head_dim;
    Ok(if !opts.forward_only {
        Some("flash attention has no backward here: it takes forward-only calls".into())
    } else if opts.dropout.is_some() {
        Some("flash attention (candle-flash-attn) applies no attention dropout".into())
    } else if !qkv.device().is_cuda() || !crate::half(qkv) {
        Some(format!(
            "flash attention takes bf16 or f16 on a CUDA device, got {:?} on {:?}",
            qkv.dtype(),
            qkv.device().location()
        ))
    } else if !dh.is_multiple_of(8) || dh > MAX_HEAD_DIM {
        Some(format!(
            "flash attention: head dim {dh} is not a multiple of 8 up to {MAX_HEAD_DIM}"
        ))
    } else if !sm80_or_newer(qkv)? {
        Some("flash attention needs a GPU of compute capability 8.0 or newer".into())
    } else {
        None
    })
}

/// [`crate::attention::attention`] of `qkv` (B, N, 3*H*Dh) on
/// candle-flash-attn, once [`unsupported`] has found nothing against it and
/// the options are checked (`Problem::new`): (B, N, H*Dh) in `qkv`'s dtype,
/// rows past each item's length zero.
pub(crate) fn attention(qkv: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
    let (b, n, _) = qkv.dims3()?;
    let (h, dh) = (opts.n_heads, opts.head_dim);
    // Rotated in f32 (as our kernels rotate), then rounded once to qkv's
    // dtype; (B, H, N, Dh) contiguous, as (B, N, H, Dh) views: the crate
    // reads strides.
    let heads = crate::composed::attention_heads(&qkv.to_dtype(DType::F32)?, opts)?;
    let view = |t: Tensor| t.to_dtype(qkv.dtype())?.transpose(1, 2);
    let (q, k, v) = (view(heads.0)?, view(heads.1)?, view(heads.2)?);
    let scale = 1.0 / (dh as f32).sqrt();
    let (left, right) = (opts.window_left, opts.window_right);
    let lengths = match opts.lengths {
        Some(l) if l.iter().any(|&len| len < n) => l,
        _ => {
            let o = candle_flash_attn::flash_attn_windowed(&q, &k, &v, scale, left, right)?;
            return o.reshape((b, n, h * dh));
        }
    };
    if lengths.iter().all(|&len| len == 0) {
        return Tensor::zeros((b, n, h * dh), qkv.dtype(), qkv.device());
    }
    let pack = |t: &Tensor| -> Result<Tensor> {
        let rows = lengths
            .iter()
            .enumerate()
            .filter(|(_, &len)| len > 0)
            .map(|(i, &len)| t.get(i)?.narrow(0, 0, len))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    };
    let (q, k, v) = (pack(&q)?, pack(&k)?, pack(&v)?);
    let bounds = cumulative(lengths, qkv.device())?;
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let o = candle_flash_attn::flash_attn_varlen_windowed(
        &q, &k, &v, &bounds, &bounds, longest, longest, scale, left, right,
    )?
    .reshape((q.dim(0)?, h * dh))?;
    unpack(&o, lengths, n)
}

/// The crate's `cu_seqlens`: 0 and the running sums of `lengths`, u32.
fn cumulative(lengths: &[usize], device: &Device) -> Result<Tensor> {
    let mut bounds = Vec::with_capacity(lengths.len() + 1);
    let mut total = 0u32;
    bounds.push(total);
    for &len in lengths {
        total += u32::try_from(len).map_err(candle_core::Error::wrap)?;
        bounds.push(total);
    }
    let count = bounds.len();
    Tensor::from_vec(bounds, count, device)
}

/// Packed rows (sum of `lengths`, C) back to (B, `n`, C), zero past each length.
fn unpack(packed: &Tensor, lengths: &[usize], n: usize) -> Result<Tensor> {
    let c = packed.dim(1)?;
    let mut start = 0;
    let items = lengths
        .iter()
        .map(|&len| {
            let mut parts = Vec::with_capacity(2);
            if len > 0 {
                parts.push(packed.narrow(0, start, len)?);
            }
            if len < n {
                parts.push(Tensor::zeros(
                    (n - len, c),
                    packed.dtype(),
                    packed.device(),
                )?);
            }
            start += len;
            Tensor::cat(&parts, 0)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&items, 0)
}
