//! Memory-efficient multi-head self-attention (FlashAttention-2 style) on CPU, f32
//! (on CUDA devices: `attention_cuda.rs`, the same algorithm).
//!
//! The op takes the qkv projection output in the reference's interleaved layout,
//! applies rotary embedding to q and k, and computes masked softmax attention
//! with tiled online softmax. Forward keeps only the per-row log-sum-exp for the
//! backward, which recomputes the score tiles, so memory is linear in N.

#[path = "attention_bwd.rs"]
mod bwd;
#[path = "attention_chunked.rs"]
mod chunked;
#[path = "attention_dropout.rs"]
mod dropout;
#[path = "attention_fwd.rs"]
mod fwd;
#[path = "attention_simd.rs"]
mod simd;

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

pub use chunked::attention_chunked;
pub use dropout::dropout_keep;
use dropout::Dropout;

/// Options of [`attention`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionOptions<'a> {
    /// Number of heads H.
    pub n_heads: usize,
    /// Head dimension Dh.
    pub head_dim: usize,
    /// Rotate-half (GPT-NeoX) rotary applied to q and k over the whole head dim:
    /// cos, sin each (n_max >= N rows) x head_dim, row-major.
    pub rotary: Option<(&'a [f32], &'a [f32])>,
    /// Valid length per batch item; keys >= length are masked, query rows >= length output exactly 0.
    pub lengths: Option<&'a [usize]>,
    /// Local window in frames: key j is visible to query i iff i-left <= j <= i+right (None = unbounded).
    pub window_left: Option<usize>,
    /// Right side of the local window (None = unbounded).
    pub window_right: Option<usize>,
    /// Dropout on the attention probabilities (training only): (p, seed). The mask is a
    /// counter-based hash of (seed, b, h, i, j), regenerated in backward.
    pub dropout: Option<(f32, u64)>,
    /// No gradient will be taken through this call (inference). In a
    /// `flash-attn` build, bf16/f16 on a CUDA device then run on
    /// candle-flash-attn (`LCASR_FLASH_ATTN=0` opts out); its output cannot
    /// be differentiated.
    pub forward_only: bool,
}

/// Multi-head self-attention on the interleaved qkv projection output.
///
/// `qkv`: (B, N, 3*H*Dh) with q[b,n,h,d] = qkv[b,n,(h*Dh+d)*3+0], k at +1, v at +2.
/// Returns (B, N, H*Dh) with heads concatenated in (h, d) order:
/// softmax(q k^T / sqrt(Dh) + mask) v, rows past each item's length set to 0.
/// The gradient flows back to `qkv` in the same interleaved layout.
/// f32 on the CPU runs the fused kernel here; on a CUDA device (any float
/// dtype, computed in f32, Dh <= 128) the kernel of `cuda/attention.cu`, or
/// [`attention_chunked`] when `LCASR_ATTENTION_CHUNK` asks for it, or for
/// bf16/f16 the tensor-core kernels of `cuda/attention_tc.cu` (unless
/// `LCASR_ATTENTION_TC=0`; head dims 32, 64, 96, 128 on compute capability
/// 8.0 or newer, else the CUDA-core kernel), or, for a forward-only call in a
/// `flash-attn` build, candle-flash-attn (see [`attention_flash`]); anything
/// else the composition [`crate::composed::attention`].
pub fn attention(qkv: &Tensor, opts: &AttentionOptions) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda_kernels(qkv) {
        if let Some(rows) = chunk_rows_from_env()? {
            return attention_chunked(qkv, opts, rows);
        }
        #[cfg(feature = "flash-attn")]
        if crate::attention_flash::enabled()?
            && crate::attention_flash::unsupported(qkv, opts)?.is_none()
        {
            Problem::new(qkv, opts)?;
            return crate::attention_flash::attention(qkv, opts);
        }
        // The kernels take one (item, head) per grid row: at most 65,535
        // (many short items; the chunked path has no such bound).
        if qkv.dim(0)? * opts.n_heads > crate::attention_cuda::MAX_ITEM_HEADS {
            return attention_chunked(qkv, opts, CHUNK_ROWS_BEYOND_GRID);
        }
        if crate::attention_tc_cuda::enabled()?
            && crate::attention_tc_cuda::unsupported(qkv, opts.head_dim)?.is_none()
        {
            return tensor_cores(qkv, opts);
        }
        if opts.head_dim <= crate::attention_cuda::MAX_HEAD_DIM {
            // Half precision on a GPU computes in f32 too: the composition
            // would materialise (B, H, N, N) scores.
            let x = qkv.to_dtype(DType::F32)?;
            let p = Problem::new(&x, opts)?;
            let kernels = crate::attention_cuda::Kernels::CudaCores;
            return crate::attention_cuda::attention(&x, p, opts, kernels)?.to_dtype(qkv.dtype());
        }
    }
    if crate::half(qkv) {
        return crate::composed::attention(qkv, opts);
    }
    let op = AttentionOp::new(qkv, opts)?;
    if !crate::native(qkv) {
        return crate::composed::attention(qkv, opts);
    }
    qkv.contiguous()?.apply_op1(op)
}

/// [`attention`] of a bf16 or f16 `qkv` on a CUDA device of compute
/// capability 8.0 or newer, on tensor cores (`cuda/attention_tc.cu`), head
/// dims 32, 64, 96 or 128; the output in `qkv`'s dtype. What [`attention`]
/// takes for half precision; an error where the kernels do not apply.
#[cfg(feature = "cuda")]
pub fn attention_tensor_cores(
    qkv: &Tensor,
    opts: &AttentionOptions,
) -> candle_core::Result<Tensor> {
    if let Some(why) = crate::attention_tc_cuda::unsupported(qkv, opts.head_dim)? {
        bail!("{why}");
    }
    let pairs = qkv.dim(0)? * opts.n_heads;
    if pairs > crate::attention_cuda::MAX_ITEM_HEADS {
        bail!(
            "attention on tensor cores: {pairs} (item, head) pairs exceed the grid's {}",
            crate::attention_cuda::MAX_ITEM_HEADS
        );
    }
    tensor_cores(qkv, opts)
}

/// [`attention`] on candle-flash-attn (feature `flash-attn`): a forward-only
/// call ([`AttentionOptions::forward_only`]) without dropout, bf16 or f16 on
/// a CUDA device of compute capability 8.0 or newer, head dim a multiple of 8
/// up to 256; the output in `qkv`'s dtype. An error where it does not apply.
#[cfg(feature = "flash-attn")]
pub fn attention_flash(qkv: &Tensor, opts: &AttentionOptions) -> candle_core::Result<Tensor> {
    if let Some(why) = crate::attention_flash::unsupported(qkv, opts)? {
        bail!("{why}");
    }
    Problem::new(qkv, opts)?;
    crate::attention_flash::attention(qkv, opts)
}

/// [`attention_tensor_cores`] once its conditions are known to hold.
#[cfg(feature = "cuda")]
fn tensor_cores(qkv: &Tensor, opts: &AttentionOptions) -> candle_core::Result<Tensor> {
    let p = Problem::new(qkv, opts)?;
    crate::attention_cuda::attention(qkv, p, opts, crate::attention_cuda::Kernels::TensorCores)
}

/// Query rows per chunk when a batch has more (item, head) pairs than the
/// CUDA kernels' grid takes.
#[cfg(feature = "cuda")]
const CHUNK_ROWS_BEYOND_GRID: usize = 256;

/// `LCASR_ATTENTION_CHUNK=rows`: on a CUDA device, attention runs as
/// [`attention_chunked`] with that many query rows per chunk
/// (matmuls through cuBLAS) instead of the CUDA kernel. Unset: the kernel.
#[cfg(feature = "cuda")]
fn chunk_rows_from_env() -> candle_core::Result<Option<usize>> {
    match std::env::var("LCASR_ATTENTION_CHUNK") {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(rows) if rows > 0 => Ok(Some(rows)),
            _ => bail!("LCASR_ATTENTION_CHUNK={v:?}: expected a positive number of query rows"),
        },
    }
}

/// Shape and masking of one attention call, shared by the forward and backward kernels.
#[derive(Clone, Debug)]
pub(crate) struct Problem {
    /// Batch size.
    pub b: usize,
    /// Sequence length.
    pub n: usize,
    /// Heads.
    pub h: usize,
    /// Head dimension.
    pub dh: usize,
    /// Valid length of each batch item.
    pub lengths: Vec<usize>,
    /// Left window.
    pub left: Option<usize>,
    /// Right window.
    pub right: Option<usize>,
    /// Attention dropout, if any.
    pub dropout: Option<Dropout>,
}

impl Problem {
    /// The problem of `qkv` (B, N, 3*H*Dh) under `o`, every option checked
    /// (the rotary tables too, which the problem does not keep).
    pub fn new(qkv: &Tensor, o: &AttentionOptions) -> candle_core::Result<Self> {
        let (b, n, c) = qkv.dims3()?;
        let (h, dh) = (o.n_heads, o.head_dim);
        if h == 0 || dh == 0 || c != 3 * h * dh {
            bail!("attention: qkv last dim {c} != 3 * n_heads {h} * head_dim {dh}");
        }
        if let Some((cos, sin)) = o.rotary {
            if dh % 2 != 0 {
                bail!("attention: rotary needs an even head_dim, got {dh}");
            }
            if cos.len() != sin.len() || cos.len() % dh != 0 || cos.len() / dh < n {
                bail!(
                    "attention: rotary tables must both be (n_max >= {n}) x {dh}, got {} and {} values",
                    cos.len(),
                    sin.len()
                );
            }
        }
        let lengths = match o.lengths {
            None => vec![n; b],
            Some(l) => {
                if l.len() != b || l.iter().any(|&x| x > n) {
                    bail!("attention: lengths {l:?} must be {b} values <= {n}");
                }
                l.to_vec()
            }
        };
        let dropout = match o.dropout {
            None => None,
            Some((p, seed)) => {
                if !(0.0..1.0).contains(&p) {
                    bail!("attention: dropout probability {p} must be in [0, 1)");
                }
                (p > 0.0).then(|| Dropout::new(p, seed))
            }
        };
        Ok(Self {
            b,
            n,
            h,
            dh,
            lengths,
            left: o.window_left,
            right: o.window_right,
            dropout,
        })
    }

    /// Keys visible to at least one query in `[i0, i1)` of an item of length `len`.
    pub fn key_range(&self, len: usize, i0: usize, i1: usize) -> (usize, usize) {
        let lo = self.left.map_or(0, |l| i0.saturating_sub(l));
        let hi = self.right.map_or(len, |r| {
            (i1 - 1).saturating_add(r).saturating_add(1).min(len)
        });
        (lo, hi)
    }

    /// Queries (below `len`) that see at least one key in `[j0, j1)`.
    pub fn query_range(&self, len: usize, j0: usize, j1: usize) -> (usize, usize) {
        let lo = self.right.map_or(0, |r| j0.saturating_sub(r));
        let hi = self.left.map_or(len, |l| {
            (j1 - 1).saturating_add(l).saturating_add(1).min(len)
        });
        (lo, hi)
    }

    /// Visible columns `[lo, hi)` of query `i` within the key tile `[j0, j1)`, relative to `j0`.
    pub fn cols(&self, i: usize, j0: usize, j1: usize) -> (usize, usize) {
        let lo = self.left.map_or(j0, |l| i.saturating_sub(l).max(j0));
        let hi = self
            .right
            .map_or(j1, |r| i.saturating_add(r).saturating_add(1).min(j1));
        (lo.min(j1) - j0, hi.max(lo).min(j1) - j0)
    }
}

/// Per-(b, h) contiguous head tensors (B, H, N, Dh).
pub(crate) struct Heads {
    /// Rotated queries, pre-multiplied by 1/sqrt(Dh).
    pub q: Vec<f32>,
    /// Rotated keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Keys in the packed transposed block layout of [`pack_transposed`]; empty when unused.
    pub kt: Vec<f32>,
    /// Values in the packed transposed block layout; empty when unused.
    pub vt: Vec<f32>,
}

/// Keys per block of the packed transposed layout; every key tile is one block.
pub(crate) const KEY_BLOCK: usize = 64;
/// Row stride of a packed block: padded so that its rows fall in distinct cache sets.
const KEY_STRIDE: usize = KEY_BLOCK + 16;

impl Heads {
    /// The (Dh x up to KEY_BLOCK) block of transposed keys or values that starts at
    /// key `j0` (a multiple of [`KEY_BLOCK`]) of head `bh`, from [`pack_transposed`] output.
    pub fn t_block(xt: &[f32], bh: usize, n: usize, dh: usize, j0: usize) -> simd::MatRef<'_> {
        let blocks = n.div_ceil(KEY_BLOCK);
        let off = (bh * blocks + j0 / KEY_BLOCK) * dh * KEY_STRIDE;
        simd::MatRef {
            data: &xt[off..off + dh * KEY_STRIDE],
            rs: KEY_STRIDE,
            cs: 1,
        }
    }
}

/// Packs each (N, Dh) head of `x` (B, H, N, Dh) as transposed key blocks
/// (blocks, Dh, KEY_STRIDE), so tile products read short contiguous rows.
fn pack_transposed(x: &[f32], n: usize, dh: usize) -> Vec<f32> {
    let blocks = n.div_ceil(KEY_BLOCK);
    let heads = x.len() / (n * dh).max(1);
    let mut t = vec![0f32; heads * blocks * dh * KEY_STRIDE];
    t.par_chunks_mut(dh * KEY_STRIDE)
        .enumerate()
        .for_each(|(hb, t)| {
            let (bh, blk) = (hb / blocks, hb % blocks);
            let j0 = blk * KEY_BLOCK;
            let j1 = (j0 + KEY_BLOCK).min(n);
            for j in j0..j1 {
                let row = &x[(bh * n + j) * dh..][..dh];
                for (d, &v) in row.iter().enumerate() {
                    t[d * KEY_STRIDE + j - j0] = v;
                }
            }
        });
    t
}

/// The custom op; owns everything its backward needs.
struct AttentionOp {
    p: Problem,
    /// Rotary cos/sin tables trimmed to N rows.
    rotary: Option<(Vec<f32>, Vec<f32>)>,
    /// Row log-sum-exp (B, H, N) saved by the forward.
    lse: Mutex<Option<Vec<f32>>>,
}

impl AttentionOp {
    fn new(qkv: &Tensor, o: &AttentionOptions) -> candle_core::Result<Self> {
        if qkv.dtype() != DType::F32 {
            bail!("attention: qkv must be f32, got {:?}", qkv.dtype());
        }
        let p = Problem::new(qkv, o)?;
        let rotary = o
            .rotary
            .map(|(cos, sin)| (cos[..p.n * p.dh].to_vec(), sin[..p.n * p.dh].to_vec()));
        Ok(Self {
            p,
            rotary,
            lse: Mutex::new(None),
        })
    }

    /// Splits the interleaved qkv (B, N, 3*H*Dh) into rotated, scaled heads, with the
    /// transposed keys and, if `with_vt`, the transposed values.
    fn split(&self, qkv: &[f32], with_vt: bool) -> Heads {
        let Problem { b, n, h, dh, .. } = self.p;
        let size = b * h * n * dh;
        let (mut q, mut k, mut v) = (vec![0f32; size], vec![0f32; size], vec![0f32; size]);
        let scale = 1.0 / (dh as f32).sqrt();
        let c = 3 * h * dh;
        q.par_chunks_mut(n * dh)
            .zip(k.par_chunks_mut(n * dh))
            .zip(v.par_chunks_mut(n * dh))
            .enumerate()
            .for_each(|(bh, ((q, k), v))| {
                let (bi, hi) = (bh / h, bh % h);
                for t in 0..self.p.lengths[bi] {
                    let src = &qkv[(bi * n + t) * c + hi * dh * 3..][..dh * 3];
                    let row = t * dh..(t + 1) * dh;
                    for d in 0..dh {
                        q[row.start + d] = src[3 * d];
                        k[row.start + d] = src[3 * d + 1];
                        v[row.start + d] = src[3 * d + 2];
                    }
                    self.rotate(&mut q[row.clone()], t, false);
                    self.rotate(&mut k[row.clone()], t, false);
                    simd::scale(&mut q[row], scale);
                }
            });
        let kt = pack_transposed(&k, n, dh);
        let vt = if with_vt {
            pack_transposed(&v, n, dh)
        } else {
            Vec::new()
        };
        Heads { q, k, v, kt, vt }
    }

    /// Applies the rotary rotation of position `t` to `x` in place, or its transpose.
    fn rotate(&self, x: &mut [f32], t: usize, transpose: bool) {
        let Some((cos, sin)) = &self.rotary else {
            return;
        };
        let dh = x.len();
        let half = dh / 2;
        let (c, s) = (&cos[t * dh..][..dh], &sin[t * dh..][..dh]);
        // Forward: r[j] = x[j] c[j] - x[j+half] s[j];  r[j+half] = x[j+half] c[j+half] + x[j] s[j+half].
        // Transpose: g[j] = x[j] c[j] + x[j+half] s[j+half];  g[j+half] = x[j+half] c[j+half] - x[j] s[j].
        for j in 0..half {
            let (a, bb) = (x[j], x[j + half]);
            if transpose {
                x[j] = a * c[j] + bb * s[j + half];
                x[j + half] = bb * c[j + half] - a * s[j];
            } else {
                x[j] = a * c[j] - bb * s[j];
                x[j + half] = bb * c[j + half] + a * s[j + half];
            }
        }
    }

    /// Runs the forward kernel: output (B, N, H*Dh) and the row log-sum-exp (B, H, N).
    fn run_forward(&self, qkv: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let Problem { b, n, h, dh, .. } = self.p;
        let heads = self.split(qkv, false);
        let (o, lse) = fwd::forward(&self.p, &heads);
        let mut out = vec![0f32; b * n * h * dh];
        out.par_chunks_mut(h * dh)
            .enumerate()
            .for_each(|(bt, row)| {
                let (bi, t) = (bt / n, bt % n);
                for hi in 0..h {
                    let src = &o[((bi * h + hi) * n + t) * dh..][..dh];
                    row[hi * dh..(hi + 1) * dh].copy_from_slice(src);
                }
            });
        (out, lse)
    }
}

/// Reads a contiguous f32 tensor into a vector.
fn tensor_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Borrows the f32 data of a CPU storage with a contiguous layout.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("attention: expected a contiguous input"),
    }
}

impl candle_core::CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "lcasr-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s, l)?;
        let (out, lse) = self.run_forward(qkv);
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        let Problem { b, n, h, dh, .. } = self.p;
        Ok((CpuStorage::F32(out), Shape::from((b, n, h * dh))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let qkv = tensor_vec(arg)?;
        let out = tensor_vec(res)?;
        let d_out = tensor_vec(grad_res)?;
        let saved = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let lse = match saved {
            Some(lse) => lse,
            None => self.run_forward(&qkv).1,
        };
        let heads = self.split(&qkv, true);
        let grads = bwd::backward(&self.p, &heads, &out, &d_out, &lse);
        drop(heads);
        let dqkv = self.merge_grads(&grads);
        Tensor::from_vec(dqkv, arg.shape(), arg.device()).map(Some)
    }
}

impl AttentionOp {
    /// Interleaves head gradients (B, H, N, Dh) back into the qkv layout, undoing rotary and scale.
    fn merge_grads(&self, g: &Heads) -> Vec<f32> {
        let Problem { b, n, h, dh, .. } = self.p;
        let c = 3 * h * dh;
        let scale = 1.0 / (dh as f32).sqrt();
        let mut out = vec![0f32; b * n * c];
        out.par_chunks_mut(c).enumerate().for_each(|(bt, row)| {
            let (bi, t) = (bt / n, bt % n);
            if t >= self.p.lengths[bi] {
                return;
            }
            let mut dq = vec![0f32; dh];
            let mut dk = vec![0f32; dh];
            for hi in 0..h {
                let off = ((bi * h + hi) * n + t) * dh;
                dq.copy_from_slice(&g.q[off..off + dh]);
                dk.copy_from_slice(&g.k[off..off + dh]);
                simd::scale(&mut dq, scale);
                self.rotate(&mut dq, t, true);
                self.rotate(&mut dk, t, true);
                let dst = &mut row[hi * dh * 3..(hi + 1) * dh * 3];
                for d in 0..dh {
                    dst[3 * d] = dq[d];
                    dst[3 * d + 1] = dk[d];
                    dst[3 * d + 2] = g.v[off + d];
                }
            }
        });
        out
    }
}
