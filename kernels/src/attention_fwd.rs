//! Forward kernel: tiled online softmax over key blocks, one task per
//! (batch, head, query block).

use rayon::prelude::*;

use super::simd::{self, matmul, MatRef};
use super::{Heads, Problem, KEY_BLOCK};

/// Query rows per task.
const BR: usize = 64;
/// Keys per tile (one packed key block).
const BC: usize = KEY_BLOCK;

/// Returns the attention output per head (B, H, N, Dh) and the row
/// log-sum-exp (B, H, N); rows past an item's length are 0.
pub(crate) fn forward(p: &Problem, x: &Heads) -> (Vec<f32>, Vec<f32>) {
    let Problem { b, n, h, dh, .. } = *p;
    let mut o = vec![0f32; b * h * n * dh];
    let mut lse = vec![0f32; b * h * n];
    o.par_chunks_mut(n * dh)
        .zip(lse.par_chunks_mut(n))
        .enumerate()
        .for_each(|(bh, (o, lse))| {
            o.par_chunks_mut(BR * dh)
                .zip(lse.par_chunks_mut(BR))
                .enumerate()
                .for_each(|(blk, (o, lse))| query_block(p, x, bh, blk * BR, o, lse));
        });
    (o, lse)
}

/// Attention for queries `i0..i0 + lse.len()` of head `bh`.
fn query_block(p: &Problem, x: &Heads, bh: usize, i0: usize, o: &mut [f32], lse: &mut [f32]) {
    let (n, dh) = (p.n, p.dh);
    let (bi, hi) = (bh / p.h, bh % p.h);
    let len = p.lengths[bi];
    let i1 = (i0 + lse.len()).min(len);
    if i0 >= i1 {
        return;
    }
    let nr = i1 - i0;
    let base = bh * n * dh;
    let q = MatRef::rows(&x.q[base + i0 * dh..base + i1 * dh], dh);
    let (ks, ke) = p.key_range(len, i0, i1);
    let mut s = vec![0f32; nr * BC];
    let mut z = vec![0f32; if p.dropout.is_some() { BC } else { 0 }];
    let mut m = vec![f32::NEG_INFINITY; nr];
    let mut l = vec![0f32; nr];
    let acc = &mut o[..nr * dh];
    // Tiles are aligned to the packed key blocks; `cols` masks keys before `ks`.
    for j0 in (ks / BC * BC..ke).step_by(BC) {
        let j1 = (j0 + BC).min(ke);
        let bc = j1 - j0;
        let k_t = Heads::t_block(&x.kt, bh, n, dh, j0);
        matmul(nr, bc, dh, &mut s, BC, false, q, k_t);
        for r in 0..nr {
            let i = i0 + r;
            let row = &mut s[r * BC..r * BC + bc];
            let (c_lo, c_hi) = p.cols(i, j0, j1);
            row[..c_lo].fill(0.0);
            row[c_hi..].fill(0.0);
            if c_lo >= c_hi {
                continue;
            }
            let m_new = m[r].max(simd::row_max(&row[c_lo..c_hi]));
            let alpha = (m[r] - m_new).exp();
            let sum = simd::exp_sub_sum(&mut row[c_lo..c_hi], m_new);
            l[r] = l[r] * alpha + sum;
            m[r] = m_new;
            if alpha != 1.0 {
                simd::scale(&mut acc[r * dh..(r + 1) * dh], alpha);
            }
            if let Some(d) = &p.dropout {
                d.fill_row(&mut z[..bc], d.row_key(bi, hi, i), j0);
                let (pr, zr) = (&mut row[c_lo..c_hi], &z[c_lo..c_hi]);
                for (a, &zz) in pr.iter_mut().zip(zr) {
                    *a *= zz;
                }
            }
        }
        let v = MatRef::rows(&x.v[base + j0 * dh..base + j1 * dh], dh);
        matmul(nr, dh, bc, acc, dh, true, MatRef::rows(&s, BC), v);
    }
    for r in 0..nr {
        // Every valid query sees at least itself, so l > 0; the guard keeps NaN out regardless.
        if l[r] > 0.0 {
            simd::scale(&mut acc[r * dh..(r + 1) * dh], 1.0 / l[r]);
            lse[r] = m[r] + l[r].ln();
        }
    }
}
