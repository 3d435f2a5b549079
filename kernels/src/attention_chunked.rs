//! Attention as a sequence of query chunks built from candle ops, each chunk
//! one graph node (`recompute.rs`) with the attention backward written out:
//! the scores of a chunk, (B, H, chunk, N), exist only while that chunk is
//! computed, forward or backward, so the memory is linear in N for a fixed
//! chunk, and the products are plain matmuls (cuBLAS, tensor cores in half
//! precision on a GPU). Masks come from
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
    let (q0, k0, v0) = (q.detach(), k.detach(), v.detach());
    let mut outs = Vec::with_capacity(n.div_ceil(chunk));
    for i0 in (0..n).step_by(chunk) {
        let c = Chunk {
            i0,
            rows: chunk.min(n - i0),
            lengths: lengths.clone(),
            window: (left, right),
            dropout,
        };
        let first = c.forward(&q0, &k0, &v0)?;
        outs.push(crate::recompute::node_with_grads(
            &[&q, &k, &v],
            first,
            move |t, grad| c.backward(&t[0], &t[1], &t[2], grad),
        )?);
    }
    Tensor::cat(&outs, 2)?
        .transpose(1, 2)?
        .reshape((b, n, h * dh))
}

/// One chunk of query rows, `[i0, i0 + rows)`.
struct Chunk {
    i0: usize,
    rows: usize,
    lengths: Vec<usize>,
    window: (Option<usize>, Option<usize>),
    dropout: Option<Dropout>,
}

/// What the forward and the backward of a chunk share.
struct Probs {
    /// Softmax probabilities (B, H, rows, N), f32, before dropout.
    p: Tensor,
    /// The dropout factors (B, H, rows, N), f32, when dropout is on.
    mask: Option<Tensor>,
    /// 1 for the rows within their item's length, 0 past it (B, 1, rows, 1).
    live: Tensor,
    /// `1 / sqrt(Dh)`.
    scale: f64,
}

impl Chunk {
    /// The chunk's attention probabilities over the heads `q`, `k` (B, H, N, Dh).
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Probs> {
        let (b, h, n, dh) = q.dims4()?;
        let (i0, rows) = (self.i0, self.rows);
        let dev = q.device();
        let scale = 1.0 / (dh as f64).sqrt();
        let scores = (q.narrow(2, i0, rows)?.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        // Positions as f32 (exact below 2^24) for the comparisons.
        let keys = Tensor::arange(0u32, n as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((1, 1, 1, n))?;
        let queries = Tensor::arange(i0 as u32, (i0 + rows) as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((1, 1, rows, 1))?;
        let lens: Vec<f32> = self.lengths.iter().map(|&l| l as f32).collect();
        let lens = Tensor::from_vec(lens, (b, 1, 1, 1), dev)?;
        // A key is hidden from a live query when past the item's length or
        // outside the window; padded query rows see everything (zeroed later).
        let mut hidden = keys.broadcast_ge(&lens)?.to_dtype(DType::F32)?;
        let (left, right) = self.window;
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
        let masked = scores.broadcast_add(&(hidden * -1e30)?)?;
        let max = masked.max_keepdim(D::Minus1)?;
        let e = masked.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let mask = match self.dropout {
            Some(d) => Some(dropout_mask(q, (b, h, i0, rows, n), d)?),
            None => None,
        };
        Ok(Probs {
            p,
            mask,
            live,
            scale,
        })
    }

    /// The chunk's output (B, H, rows, Dh), rows past an item's length zero.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let Probs { p, mask, live, .. } = self.probs(q, k)?;
        let p = match &mask {
            Some(m) => (p * m)?,
            None => p,
        };
        p.to_dtype(v.dtype())?
            .matmul(v)?
            .broadcast_mul(&live.to_dtype(v.dtype())?)
    }

    /// The gradients of `q`, `k`, `v` for the output gradient `grad`, by
    /// the attention backward written out (recomputed probabilities, then
    /// `dS = P (dP - rowsum(dP P))`), not through autograd: about four
    /// chunk-sized tensors at a time instead of the composition's graph.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let dt = v.dtype();
        let (i0, rows) = (self.i0, self.rows);
        let Probs {
            p,
            mask,
            live,
            scale,
        } = self.probs(q, k)?;
        let d_out = grad.broadcast_mul(&live.to_dtype(dt)?)?;
        // Through the dropout: the kept probabilities and their gradient.
        let kept = match &mask {
            Some(m) => (&p * m)?,
            None => p.clone(),
        };
        let dv = kept.to_dtype(dt)?.t()?.matmul(&d_out)?;
        drop(kept);
        let mut dp = d_out.matmul(&v.t()?)?.to_dtype(DType::F32)?;
        if let Some(m) = &mask {
            dp = (dp * m)?;
        }
        let row_dot = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = ((dp.broadcast_sub(&row_dot)? * p)? * scale)?.to_dtype(dt)?;
        let dq_rows = ds.matmul(k)?;
        let dk = ds.t()?.matmul(&q.narrow(2, i0, rows)?)?;
        drop(ds);
        let (b, h, _, dh) = q.dims4()?;
        let dq = Tensor::zeros(q.shape(), dt, q.device())?
            .slice_assign(&[0..b, 0..h, i0..i0 + rows, 0..dh], &dq_rows)?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    }
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
