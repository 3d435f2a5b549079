//! Backward kernel (FlashAttention-2 maths): score tiles are recomputed from the
//! saved row log-sum-exp, `dS = P * (dP - rowsum(dO * O))`.
//!
//! Tasks own a contiguous run of key blocks of one (batch, head), so dK and dV
//! are written without sharing; each task accumulates its own partial dQ over
//! the query rows it touches, and the partials are summed at the end.

use rayon::prelude::*;

use super::simd::{self, matmul, MatRef};
use super::{Heads, Problem, KEY_BLOCK};

/// Query rows per tile.
const BR: usize = 64;
/// Keys per tile (one packed key block); key runs start on block boundaries.
const BC: usize = KEY_BLOCK;

/// Gradients of one task: dK, dV for keys `j_lo..`, partial dQ for queries `q_lo..`.
struct TaskGrad {
    j_lo: usize,
    dk: Vec<f32>,
    dv: Vec<f32>,
    q_lo: usize,
    dq: Vec<f32>,
}

/// Per-head output gradient (B, H, N, Dh) and `rowsum(dO * O)` (B, H, N).
fn head_grads(p: &Problem, out: &[f32], d_out: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let Problem { b, n, h, dh, .. } = *p;
    let mut g = vec![0f32; b * h * n * dh];
    let mut dsum = vec![0f32; b * h * n];
    g.par_chunks_mut(n * dh)
        .zip(dsum.par_chunks_mut(n))
        .enumerate()
        .for_each(|(bh, (g, dsum))| {
            let (bi, hi) = (bh / h, bh % h);
            for t in 0..p.lengths[bi] {
                let off = (bi * n + t) * h * dh + hi * dh;
                let src = &d_out[off..off + dh];
                g[t * dh..(t + 1) * dh].copy_from_slice(src);
                dsum[t] = simd::dot(src, &out[off..off + dh]);
            }
        });
    (g, dsum)
}

/// Gradients with respect to the scaled rotated queries, the rotated keys and
/// the values, each (B, H, N, Dh).
pub(crate) fn backward(p: &Problem, x: &Heads, out: &[f32], d_out: &[f32], lse: &[f32]) -> Heads {
    let Problem { b, n, h, dh, .. } = *p;
    let (g, dsum) = head_grads(p, out, d_out);
    let bh_count = b * h;
    let groups_wanted = (4 * rayon::current_num_threads()).div_ceil(bh_count.max(1));
    let mut tasks = Vec::new();
    for bh in 0..bh_count {
        let len = p.lengths[bh / h];
        let blocks = len.div_ceil(BC);
        let groups = groups_wanted.min(blocks);
        for gi in 0..groups {
            let (k0, k1) = (gi * blocks / groups, (gi + 1) * blocks / groups);
            tasks.push((bh, k0 * BC, (k1 * BC).min(len)));
        }
    }
    let ctx = Ctx {
        p,
        x,
        g: &g,
        dsum: &dsum,
        lse,
    };
    let results: Vec<(usize, TaskGrad)> = tasks
        .par_iter()
        .map(|&(bh, j_lo, j_hi)| (bh, ctx.key_run(bh, j_lo, j_hi)))
        .collect();

    let size = b * h * n * dh;
    let (mut dq, mut dk, mut dv) = (vec![0f32; size], vec![0f32; size], vec![0f32; size]);
    let mut by_head: Vec<Vec<&TaskGrad>> = vec![Vec::new(); bh_count];
    for (bh, t) in &results {
        by_head[*bh].push(t);
    }
    dq.par_chunks_mut(n * dh)
        .zip(dk.par_chunks_mut(n * dh))
        .zip(dv.par_chunks_mut(n * dh))
        .zip(by_head.par_iter())
        .for_each(|(((dq, dk), dv), parts)| {
            for t in parts {
                dk[t.j_lo * dh..][..t.dk.len()].copy_from_slice(&t.dk);
                dv[t.j_lo * dh..][..t.dv.len()].copy_from_slice(&t.dv);
                for (a, &v) in dq[t.q_lo * dh..][..t.dq.len()].iter_mut().zip(&t.dq) {
                    *a += v;
                }
            }
        });
    Heads {
        q: dq,
        k: dk,
        v: dv,
        kt: Vec::new(),
        vt: Vec::new(),
    }
}

/// Read-only inputs shared by the backward tasks.
struct Ctx<'a> {
    p: &'a Problem,
    x: &'a Heads,
    /// dO per head (B, H, N, Dh).
    g: &'a [f32],
    /// rowsum(dO * O) (B, H, N).
    dsum: &'a [f32],
    /// Row log-sum-exp (B, H, N).
    lse: &'a [f32],
}

impl Ctx<'_> {
    /// Gradients from the keys `j_lo..j_hi` of head `bh`.
    fn key_run(&self, bh: usize, j_lo: usize, j_hi: usize) -> TaskGrad {
        let p = self.p;
        let (n, dh) = (p.n, p.dh);
        let (bi, hi) = (bh / p.h, bh % p.h);
        let len = p.lengths[bi];
        let (q_lo, q_hi) = if j_lo < j_hi {
            p.query_range(len, j_lo, j_hi)
        } else {
            (0, 0)
        };
        let mut t = TaskGrad {
            j_lo,
            dk: vec![0f32; (j_hi - j_lo) * dh],
            dv: vec![0f32; (j_hi - j_lo) * dh],
            q_lo,
            dq: vec![0f32; q_hi.saturating_sub(q_lo) * dh],
        };
        let base = bh * n * dh;
        fn rows(a: &[f32], base: usize, dh: usize, i0: usize, i1: usize) -> &[f32] {
            &a[base + i0 * dh..base + i1 * dh]
        }
        let mut s = vec![0f32; BR * BC];
        let mut ds = vec![0f32; BR * BC];
        let dropout = p.dropout.is_some();
        let mut z = vec![0f32; if dropout { BR * BC } else { 0 }];
        let mut pz = vec![0f32; if dropout { BR * BC } else { 0 }];
        for j0 in (j_lo..j_hi).step_by(BC) {
            let j1 = (j0 + BC).min(j_hi);
            let bc = j1 - j0;
            let kj = rows(&self.x.k, base, dh, j0, j1);
            let jr = (j0 - j_lo) * dh..(j1 - j_lo) * dh;
            let (qs, qe) = p.query_range(len, j0, j1);
            for i0 in (qs..qe).step_by(BR) {
                let i1 = (i0 + BR).min(qe);
                let nr = i1 - i0;
                let qi = rows(&self.x.q, base, dh, i0, i1);
                let gi = rows(self.g, base, dh, i0, i1);
                matmul(
                    nr,
                    bc,
                    dh,
                    &mut s,
                    BC,
                    false,
                    MatRef::rows(qi, dh),
                    Heads::t_block(&self.x.kt, bh, n, dh, j0),
                );
                for r in 0..nr {
                    let i = i0 + r;
                    let row = &mut s[r * BC..r * BC + bc];
                    let (c_lo, c_hi) = p.cols(i, j0, j1);
                    row[..c_lo].fill(0.0);
                    row[c_hi..].fill(0.0);
                    if c_lo < c_hi {
                        simd::exp_sub(&mut row[c_lo..c_hi], self.lse[bh * n + i]);
                    }
                    if let Some(d) = &p.dropout {
                        let zr = &mut z[r * BC..r * BC + bc];
                        d.fill_row(zr, d.row_key(bi, hi, i), j0);
                        simd::mul_into(&mut pz[r * BC..r * BC + bc], row, zr);
                    }
                }
                let p_used = if dropout { &pz } else { &s };
                // dV_j += P^T dO_i
                matmul(
                    bc,
                    dh,
                    nr,
                    &mut t.dv[jr.clone()],
                    dh,
                    true,
                    MatRef::transposed(p_used, BC),
                    MatRef::rows(gi, dh),
                );
                // dP = dO_i V_j^T
                matmul(
                    nr,
                    bc,
                    dh,
                    &mut ds,
                    BC,
                    false,
                    MatRef::rows(gi, dh),
                    Heads::t_block(&self.x.vt, bh, n, dh, j0),
                );
                for r in 0..nr {
                    let range = r * BC..r * BC + bc;
                    let d = self.dsum[bh * n + i0 + r];
                    if dropout {
                        simd::softmax_grad_dropout(
                            &mut ds[range.clone()],
                            &s[range.clone()],
                            &z[range],
                            d,
                        );
                    } else {
                        simd::softmax_grad(&mut ds[range.clone()], &s[range], d);
                    }
                }
                // dK_j += dS^T Q_i
                matmul(
                    bc,
                    dh,
                    nr,
                    &mut t.dk[jr.clone()],
                    dh,
                    true,
                    MatRef::transposed(&ds, BC),
                    MatRef::rows(qi, dh),
                );
                // dQ_i += dS K_j
                matmul(
                    nr,
                    dh,
                    bc,
                    &mut t.dq[(i0 - q_lo) * dh..(i1 - q_lo) * dh],
                    dh,
                    true,
                    MatRef::rows(&ds, BC),
                    MatRef::rows(kj, dh),
                );
            }
        }
        t
    }
}
