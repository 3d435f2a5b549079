//! Attention as a sequence of query chunks built from candle ops, each chunk
//! one recompute node (`recompute.rs`): the scores of a chunk, (B, H, chunk,
//! N), exist only while that chunk is computed, forward or backward, so the
//! memory is linear in N for a fixed chunk, and the products are plain
//! matmuls (cuBLAS, tensor cores in half precision on a GPU). Masks come from
//! index comparisons on the device; the dropout mask, the fused kernels' own
//! counter-based hash, is made per chunk (a CUDA kernel, or on the host).

use candle_core::{bail, DType, Result, Tensor, D};

use super::{AttentionOptions, Dropout, Problem};

/// Attention of the interleaved `qkv` (B, N, 3*H*Dh), as
/// [`crate::attention::attention`] (the same dropout mask), in query chunks
/// of `chunk` rows.
pub fn attention_chunked(qkv: &Tensor, opts: &AttentionOptions, chunk: usize) -> Result<Tensor> {
    if chunk == 0 {
        bail!("attention_chunked: the chunk must hold at least one query");
    }
    let Problem {
        b,
        n,
        h,
        dh,
        lengths,
        left,
        right,
        dropout,
    } = Problem::new(qkv, opts)?;
    let (q, k, v) = crate::composed::attention_heads(qkv, opts)?;
    let window = (left, right);
    let mut outs = Vec::with_capacity(n.div_ceil(chunk));
    for i0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - i0);
        let lengths = lengths.clone();
        outs.push(crate::recompute::node(&[&q, &k, &v], move |t| {
            chunk_attention(&t[0], &t[1], &t[2], i0, rows, &lengths, window, dropout)
        })?);
    }
    Tensor::cat(&outs, 2)?
        .transpose(1, 2)?
        .reshape((b, n, h * dh))
}

/// Query rows `[i0, i0 + rows)` of attention over the heads `q`, `k`, `v`
/// (B, H, N, Dh): (B, H, rows, Dh), rows past an item's length zero.
#[allow(clippy::too_many_arguments)]
fn chunk_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    i0: usize,
    rows: usize,
    lengths: &[usize],
    (left, right): (Option<usize>, Option<usize>),
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let (b, h, n, dh) = q.dims4()?;
    let dev = q.device();
    let scores = (q.narrow(2, i0, rows)?.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?
        .to_dtype(DType::F32)?;
    // Positions as f32 (exact below 2^24) for the comparisons.
    let keys = Tensor::arange(0u32, n as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((1, 1, 1, n))?;
    let queries = Tensor::arange(i0 as u32, (i0 + rows) as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((1, 1, rows, 1))?;
    let lens: Vec<f32> = lengths.iter().map(|&l| l as f32).collect();
    let lens = Tensor::from_vec(lens, (b, 1, 1, 1), dev)?;
    // A key is hidden from a live query when past the item's length or
    // outside the window; padded query rows see everything (zeroed below).
    let mut hidden = keys.broadcast_ge(&lens)?.to_dtype(DType::F32)?;
    if let Some(l) = left {
        let before = keys.broadcast_lt(&(&queries - l as f64)?)?;
        hidden = hidden.broadcast_maximum(&before.to_dtype(DType::F32)?)?;
    }
    if let Some(r) = right {
        let after = keys.broadcast_gt(&(&queries + r as f64)?)?;
        hidden = hidden.broadcast_maximum(&after.to_dtype(DType::F32)?)?;
    }
    let live = queries.broadcast_lt(&lens)?.to_dtype(DType::F32)?;
    let hidden = hidden.broadcast_mul(&live)?;
    let masked = (scores.broadcast_add(&(hidden * -1e30)?))?;
    let max = masked.max_keepdim(D::Minus1)?.detach();
    let e = masked.broadcast_sub(&max)?.exp()?;
    let mut probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    if let Some(d) = dropout {
        probs = (probs * dropout_mask(q, (b, h, i0, rows, n), d)?)?;
    }
    probs
        .to_dtype(v.dtype())?
        .matmul(v)?
        .broadcast_mul(&live.to_dtype(v.dtype())?)
}

/// The dropout factors of query rows `[i0, i0 + rows)` (B, H, rows, N) on
/// `like`'s device.
fn dropout_mask(
    like: &Tensor,
    (b, h, i0, rows, n): (usize, usize, usize, usize, usize),
    d: Dropout,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if like.device().is_cuda() {
        return crate::attention_cuda::dropout_mask(
            like,
            (b, h, i0, rows, n),
            (d.seed, d.threshold, d.keep_scale),
        );
    }
    let mut mask = vec![0f32; b * h * rows * n];
    for (row, z) in mask.chunks_exact_mut(n).enumerate() {
        let (bh, r) = (row / rows, row % rows);
        d.fill_row(z, d.row_key(bh / h, bh % h, i0 + r), 0);
    }
    Tensor::from_vec(mask, (b, h, rows, n), like.device())
}
