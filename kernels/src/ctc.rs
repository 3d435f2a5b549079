//! CTC loss with a fused log-softmax, as a candle custom op with a backward pass.
//!
//! The forward-backward recursions run in log space with `f64` values, one
//! rayon task per batch item, restricted to the band of lattice states that can
//! still start and finish a valid alignment. The forward pass keeps the α rows
//! of every `K`-th frame (`K ≈ √T`), so the backward pass recomputes α one
//! segment at a time: memory is `O(√T·S)` per item instead of `O(T·S)`, which
//! keeps hour-long inputs affordable.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const NEG_INF: f64 = f64::NEG_INFINITY;

/// Per-item negative log-likelihood (B,) of CTC.
///
/// `logits`: (B, T, C) f32 — logits OR log-probs: a log_softmax is applied
/// inside (idempotent on log-probs), so the gradient w.r.t. the input is
/// `softmax(input) - occupancy`; frames `t >= input_lengths[b]` get 0.
/// `targets[b]` are the label ids of item `b` (never `blank`, all `< C`).
///
/// The forward/backward run in log space with f64 accumulators, rayon-parallel
/// over the batch. An impossible alignment gives `+inf` and a NaN gradient for
/// that item, or, with `zero_infinity`, a loss of 0 and a zero gradient.
pub fn ctc_loss(
    logits: &Tensor,
    targets: &[Vec<u32>],
    input_lengths: &[usize],
    blank: u32,
    zero_infinity: bool,
) -> Result<Tensor> {
    let (b, t, c) = logits.dims3()?;
    if logits.dtype() != DType::F32 {
        bail!("ctc_loss: logits must be f32, got {:?}", logits.dtype())
    }
    if targets.len() != b || input_lengths.len() != b {
        bail!(
            "ctc_loss: batch of {b} items but {} target sequences and {} input lengths",
            targets.len(),
            input_lengths.len()
        )
    }
    if blank as usize >= c {
        bail!("ctc_loss: blank id {blank} is not below the class count {c}")
    }
    for (i, (tg, &len)) in targets.iter().zip(input_lengths).enumerate() {
        if len > t {
            bail!("ctc_loss: input_lengths[{i}] = {len} exceeds the {t} frames of the logits")
        }
        if let Some(&bad) = tg.iter().find(|&&l| l == blank || l as usize >= c) {
            bail!("ctc_loss: target {i} holds label {bad}, which is the blank or not below {c}")
        }
    }
    let op = Ctc {
        labels: targets.iter().map(|tg| Labels::new(tg, blank)).collect(),
        input_lengths: input_lengths.to_vec(),
        #[cfg(feature = "cuda")]
        blank,
        zero_infinity,
        cache: Mutex::new(None),
        #[cfg(feature = "cuda")]
        cuda_cache: Mutex::new(None),
    };
    let device = logits.device().clone();
    // On a CUDA device the kernels of `cuda/ctc.cu`; elsewhere on the host.
    if device.is_cpu() || crate::cuda_kernels(logits) {
        logits.contiguous()?.apply_op1(op)
    } else {
        logits
            .to_device(&Device::Cpu)?
            .contiguous()?
            .apply_op1(op)?
            .to_device(&device)
    }
}

/// The extended label sequence `l'` of one item (blank, l1, blank, l2, ..., blank).
struct Labels {
    /// `l'`, length `S = 2U + 1`.
    ext: Vec<u32>,
    /// `0` where the α transition `s-2 → s` is allowed, `-inf` elsewhere.
    skip_in: Vec<f64>,
    /// `0` where the β transition `s → s+2` is allowed, `-inf` elsewhere.
    skip_out: Vec<f64>,
    /// Frames needed by the shortest valid alignment (`U` + adjacent repeats).
    min_frames: usize,
}

impl Labels {
    fn new(targets: &[u32], blank: u32) -> Self {
        let s_len = 2 * targets.len() + 1;
        let ext: Vec<u32> = (0..s_len)
            .map(|s| if s % 2 == 0 { blank } else { targets[s / 2] })
            .collect();
        let skip_in: Vec<f64> = (0..s_len)
            .map(|s| {
                if s >= 2 && ext[s] != blank && ext[s] != ext[s - 2] {
                    0.0
                } else {
                    NEG_INF
                }
            })
            .collect();
        let skip_out = (0..s_len)
            .map(|s| skip_in.get(s + 2).copied().unwrap_or(NEG_INF))
            .collect();
        let repeats = targets.windows(2).filter(|w| w[0] == w[1]).count();
        Self {
            ext,
            skip_in,
            skip_out,
            min_frames: targets.len() + repeats,
        }
    }

    fn len(&self) -> usize {
        self.ext.len()
    }

    /// The states `lo..=hi` at frame `t` of `tb` that lie on some valid alignment.
    fn band(&self, t: usize, tb: usize) -> (usize, usize) {
        let s_len = self.len();
        (
            s_len.saturating_sub(2 * (tb - t)),
            (2 * t + 1).min(s_len - 1),
        )
    }
}

/// What the forward pass of one item leaves for the backward pass.
struct ItemForward {
    nll: f64,
    /// log Σ_c exp(x[t, c]) for every valid frame.
    lse: Vec<f64>,
    /// Frames between stored α rows.
    k: usize,
    /// α rows (padded by two leading -inf) of frames 0, k, 2k, ...
    checkpoints: Vec<f64>,
}

struct Ctc {
    labels: Vec<Labels>,
    input_lengths: Vec<usize>,
    /// The blank's id (the CPU path has it in `labels`).
    #[cfg(feature = "cuda")]
    blank: u32,
    zero_infinity: bool,
    cache: Mutex<Option<Vec<ItemForward>>>,
    /// What the CUDA forward left for the backward.
    #[cfg(feature = "cuda")]
    cuda_cache: Mutex<Option<crate::ctc_cuda::Forward>>,
}

impl Ctc {
    fn forward_all(&self, x: &[f32], t: usize, c: usize) -> Vec<ItemForward> {
        self.labels
            .par_iter()
            .zip(self.input_lengths.par_iter())
            .enumerate()
            .map(|(b, (lab, &tb))| forward_item(&x[b * t * c..(b + 1) * t * c], c, tb, lab))
            .collect()
    }
}

impl CustomOp1 for Ctc {
    fn name(&self) -> &'static str {
        "ctc-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, c) = layout.shape().dims3()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("ctc_loss: logits must be contiguous")
        };
        let x = &storage.as_slice::<f32>()?[start..end];
        let items = self.forward_all(x, t, c);
        let loss: Vec<f32> = items
            .iter()
            .map(|it| {
                if self.zero_infinity && it.nll.is_infinite() {
                    0.0
                } else {
                    it.nll as f32
                }
            })
            .collect();
        *self
            .cache
            .lock()
            .map_err(|_| candle_core::Error::msg("ctc cache poisoned"))? = Some(items);
        Ok((CpuStorage::F32(loss), Shape::from(b)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let items: Vec<crate::ctc_cuda::Item> = self
            .labels
            .iter()
            .zip(&self.input_lengths)
            .map(|(lab, &len)| crate::ctc_cuda::Item {
                len,
                ext: &lab.ext,
                min_frames: lab.min_frames,
            })
            .collect();
        let (loss, fwd) =
            crate::ctc_cuda::forward(storage, layout, &items, self.blank, self.zero_infinity)?;
        *self
            .cuda_cache
            .lock()
            .map_err(|_| candle_core::Error::msg("ctc cache poisoned"))? = Some(fwd);
        Ok((loss, Shape::from(items.len())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if arg.device().is_cuda() {
            let guard = self
                .cuda_cache
                .lock()
                .map_err(|_| candle_core::Error::msg("ctc cache poisoned"))?;
            let Some(fwd) = guard.as_ref() else {
                bail!("ctc_loss backward: the CUDA forward did not run")
            };
            return Ok(Some(crate::ctc_cuda::backward(fwd, arg, grad_res)?));
        }
        let (b, t, c) = arg.dims3()?;
        let scales = grad_res
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let arg_cpu = arg.to_device(&Device::Cpu)?.contiguous()?;
        let (storage, layout) = arg_cpu.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            bail!("ctc_loss backward: logits are not on the CPU")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("ctc_loss backward: logits must be contiguous")
        };
        let x = &cpu.as_slice::<f32>()?[start..end];
        let mut guard = self
            .cache
            .lock()
            .map_err(|_| candle_core::Error::msg("ctc cache poisoned"))?;
        if guard.is_none() {
            *guard = Some(self.forward_all(x, t, c));
        }
        let items = guard.as_ref().expect("cache filled above");
        let mut grad = vec![0f32; b * t * c];
        grad.par_chunks_mut((t * c).max(1))
            .zip(items.par_iter())
            .enumerate()
            .for_each(|(i, (g, fwd))| {
                let item = ItemRef {
                    x: &x[i * t * c..(i + 1) * t * c],
                    c,
                    tb: self.input_lengths[i],
                    lab: &self.labels[i],
                };
                backward_item(&item, fwd, g, scales[i], self.zero_infinity);
            });
        drop(guard);
        drop(storage);
        Ok(Some(
            Tensor::from_vec(grad, (b, t, c), &Device::Cpu)?.to_device(arg.device())?,
        ))
    }
}

/// One batch item's inputs.
struct ItemRef<'a> {
    /// (T, C) logits of this item.
    x: &'a [f32],
    c: usize,
    /// Valid frames.
    tb: usize,
    lab: &'a Labels,
}

fn forward_item(x: &[f32], c: usize, tb: usize, lab: &Labels) -> ItemForward {
    let item = ItemRef { x, c, tb, lab };
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { forward_item_avx2(&item) };
    }
    forward_item_impl(&item)
}

fn backward_item(item: &ItemRef, fwd: &ItemForward, g: &mut [f32], scale: f64, zero_inf: bool) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { backward_item_avx2(item, fwd, g, scale, zero_inf) };
    }
    backward_item_impl(item, fwd, g, scale, zero_inf)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_item_avx2(item: &ItemRef) -> ItemForward {
    forward_item_impl(item)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_item_avx2(
    item: &ItemRef,
    fwd: &ItemForward,
    g: &mut [f32],
    scale: f64,
    zero_inf: bool,
) {
    backward_item_impl(item, fwd, g, scale, zero_inf)
}

#[inline(always)]
fn forward_item_impl(item: &ItemRef) -> ItemForward {
    let (c, tb, lab) = (item.c, item.tb, item.lab);
    let s_len = lab.len();
    if tb == 0 || tb < lab.min_frames {
        let nll = if tb == 0 && s_len == 1 {
            0.0
        } else {
            f64::INFINITY
        };
        return ItemForward {
            nll,
            lse: Vec::new(),
            k: 1,
            checkpoints: Vec::new(),
        };
    }
    let mut scratch = Vec::with_capacity(c);
    let lse: Vec<f64> = (0..tb)
        .map(|t| row_log_sum_exp(&item.x[t * c..(t + 1) * c], &mut scratch))
        .collect();
    let k = ((tb as f64).sqrt().ceil() as usize).max(1);
    let w = s_len + 2;
    let mut checkpoints = Vec::with_capacity(tb.div_ceil(k) * w);
    let mut prev = vec![NEG_INF; w];
    let mut cur = vec![NEG_INF; w];
    let mut emit = vec![0f64; s_len];
    alpha_init(item, &lse, &mut prev);
    checkpoints.extend_from_slice(&prev);
    for (t, &lse_t) in lse.iter().enumerate().skip(1) {
        alpha_step(item, t, lse_t, &prev, &mut cur, &mut emit);
        std::mem::swap(&mut prev, &mut cur);
        if t % k == 0 {
            checkpoints.extend_from_slice(&prev);
        }
    }
    let last = prev[s_len + 1];
    let before = if s_len > 1 { prev[s_len] } else { NEG_INF };
    ItemForward {
        nll: -lse2(last, before),
        lse,
        k,
        checkpoints,
    }
}

#[inline(always)]
fn backward_item_impl(
    item: &ItemRef,
    fwd: &ItemForward,
    g: &mut [f32],
    scale: f64,
    zero_inf: bool,
) {
    let (c, tb, lab) = (item.c, item.tb, item.lab);
    if tb == 0 {
        return;
    }
    if !fwd.nll.is_finite() {
        if !(zero_inf && fwd.nll.is_infinite()) {
            g[..tb * c].fill(f32::NAN);
        }
        return;
    }
    let s_len = lab.len();
    let w = s_len + 2;
    let logz = -fwd.nll;
    let k = fwd.k;
    let mut alphas = vec![NEG_INF; k * w];
    let mut beta_next = vec![NEG_INF; w];
    let mut beta_cur = vec![NEG_INF; w];
    let mut emit = vec![0f64; s_len];
    let mut occ = vec![0f64; s_len];
    for seg in (0..tb.div_ceil(k)).rev() {
        let t0 = seg * k;
        let t1 = (t0 + k).min(tb);
        alphas[..w].copy_from_slice(&fwd.checkpoints[seg * w..(seg + 1) * w]);
        for t in t0 + 1..t1 {
            let (done, rest) = alphas.split_at_mut((t - t0) * w);
            alpha_step(
                item,
                t,
                fwd.lse[t],
                &done[done.len() - w..],
                &mut rest[..w],
                &mut emit,
            );
        }
        for t in (t0..t1).rev() {
            let (lo, hi) = lab.band(t, tb);
            fill_emit(item, t, fwd.lse[t], lo, hi, &mut emit);
            if t + 1 == tb {
                beta_cur.fill(NEG_INF);
                let first = s_len.saturating_sub(2).max(lo);
                beta_cur[first..=hi].copy_from_slice(&emit[first..=hi]);
            } else {
                beta_step(lab, lo, hi, &beta_next, &mut beta_cur, &emit);
            }
            let alpha = &alphas[(t - t0) * w..(t - t0 + 1) * w];
            if lo <= hi {
                occupancy_row(
                    &mut occ[lo..=hi],
                    &alpha[lo + 2..hi + 3],
                    &beta_cur[lo..=hi],
                    &emit[lo..=hi],
                    logz,
                );
            }
            let row = &mut g[t * c..(t + 1) * c];
            softmax_row_scaled(&item.x[t * c..(t + 1) * c], fwd.lse[t], scale as f32, row);
            for s in lo..=hi {
                row[lab.ext[s] as usize] -= (scale * occ[s]) as f32;
            }
            std::mem::swap(&mut beta_cur, &mut beta_next);
        }
    }
}

/// α at frame 0: only the leading blank and the first label can start.
#[inline(always)]
fn alpha_init(item: &ItemRef, lse: &[f64], row: &mut [f64]) {
    let lab = item.lab;
    row.fill(NEG_INF);
    row[2] = item.x[lab.ext[0] as usize] as f64 - lse[0];
    if lab.len() > 1 {
        row[3] = item.x[lab.ext[1] as usize] as f64 - lse[0];
    }
}

/// Log-prob of each lattice state's label at frame `t`, over the band.
#[inline(always)]
fn fill_emit(item: &ItemRef, t: usize, lse_t: f64, lo: usize, hi: usize, emit: &mut [f64]) {
    let row = &item.x[t * item.c..(t + 1) * item.c];
    for s in lo..=hi.min(emit.len() - 1) {
        emit[s] = row[item.lab.ext[s] as usize] as f64 - lse_t;
    }
}

/// α row `t` from row `t - 1` (both padded by two leading -inf).
#[inline(always)]
fn alpha_step(
    item: &ItemRef,
    t: usize,
    lse_t: f64,
    prev: &[f64],
    cur: &mut [f64],
    emit: &mut [f64],
) {
    let lab = item.lab;
    let (lo, hi) = lab.band(t, item.tb);
    cur.fill(NEG_INF);
    if lo > hi {
        return;
    }
    fill_emit(item, t, lse_t, lo, hi, emit);
    lse3_rows(
        &mut cur[lo + 2..hi + 3],
        &prev[lo + 2..hi + 3],
        &prev[lo + 1..hi + 2],
        &prev[lo..=hi],
        &lab.skip_in[lo..=hi],
        &emit[lo..=hi],
    );
}

/// β row `t` from row `t + 1` (both padded by two trailing -inf).
#[inline(always)]
fn beta_step(lab: &Labels, lo: usize, hi: usize, next: &[f64], cur: &mut [f64], emit: &[f64]) {
    cur.fill(NEG_INF);
    if lo > hi {
        return;
    }
    lse3_rows(
        &mut cur[lo..=hi],
        &next[lo..=hi],
        &next[lo + 1..hi + 2],
        &next[lo + 2..hi + 3],
        &lab.skip_out[lo..=hi],
        &emit[lo..=hi],
    );
}

/// `out[i] = emit[i] + log(exp(a[i]) + exp(b[i]) + exp(c[i] + mask[i]))`.
#[inline(always)]
fn lse3_rows(out: &mut [f64], a: &[f64], b: &[f64], c: &[f64], mask: &[f64], emit: &[f64]) {
    let n = out.len();
    let (a, b, c, mask, emit) = (&a[..n], &b[..n], &c[..n], &mask[..n], &emit[..n]);
    for i in 0..n {
        out[i] = emit[i] + lse3(a[i], b[i], c[i] + mask[i]);
    }
}

/// `occ[i] = exp(alpha[i] + beta[i] - emit[i] - logz)`: the posterior of each state.
#[inline(always)]
fn occupancy_row(occ: &mut [f64], alpha: &[f64], beta: &[f64], emit: &[f64], logz: f64) {
    let n = occ.len();
    let (alpha, beta, emit) = (&alpha[..n], &beta[..n], &emit[..n]);
    for i in 0..n {
        occ[i] = exp_f64(alpha[i] + beta[i] - emit[i] - logz);
    }
}

/// `out[c] = scale · exp(x[c] - lse)`.
#[inline(always)]
fn softmax_row_scaled(x: &[f32], lse: f64, scale: f32, out: &mut [f32]) {
    let lse = lse as f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = scale * exp_f32(v - lse);
    }
}

/// `log Σ exp(x)` of one frame; the exponentials go through `scratch` so that
/// both loops vectorise, and are summed in eight f32 lanes.
#[inline(always)]
fn row_log_sum_exp(x: &[f32], scratch: &mut Vec<f32>) -> f64 {
    let mut mx = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for ch in chunks {
        for i in 0..8 {
            mx[i] = if ch[i] > mx[i] { ch[i] } else { mx[i] };
        }
    }
    let m = tail
        .iter()
        .chain(mx.iter())
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    if !m.is_finite() {
        // All -inf, or a +inf / NaN entry: the result is not a number.
        return if x.iter().any(|v| v.is_nan()) {
            f64::NAN
        } else {
            m as f64
        };
    }
    scratch.resize(x.len(), 0.0);
    for (o, &v) in scratch.iter_mut().zip(x) {
        *o = exp_f32(v - m);
    }
    let mut acc = [0f32; 8];
    let chunks = scratch.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for ch in chunks {
        for i in 0..8 {
            acc[i] += ch[i];
        }
    }
    // A NaN entry was skipped by the max but propagates through the sum.
    m as f64 + (acc.iter().map(|&v| v as f64).sum::<f64>() + tail).ln()
}

#[inline(always)]
fn lse2(a: f64, b: f64) -> f64 {
    lse3(a, b, NEG_INF)
}

/// `log(exp(a) + exp(b) + exp(c))`, branch-free so that rows vectorise: the
/// largest term contributes exactly 1, so only two exponentials are needed.
#[inline(always)]
fn lse3(a: f64, b: f64, c: f64) -> f64 {
    let lo_ab = a.min(b);
    let hi_ab = a.max(b);
    let m = hi_ab.max(c);
    let mid = hi_ab.min(c);
    let all_neg_inf = m == NEG_INF;
    let ms = if all_neg_inf { 0.0 } else { m };
    let s = 1.0 + exp_f64(lo_ab - ms) + exp_f64(mid - ms);
    let r = ms + ln_1_to_3(s);
    if all_neg_inf {
        NEG_INF
    } else {
        r
    }
}

/// `exp(x)` for `x <= ~1` (0 below -708), relative error ~1e-15.
#[inline(always)]
fn exp_f64(x: f64) -> f64 {
    const MAGIC: f64 = 6755399441055744.0; // 1.5 · 2^52: adding it rounds to an integer
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let under = x < -708.0;
    let xc = if under { -708.0 } else { x };
    let t = xc * std::f64::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor series to r^12 on |r| <= ln2/2.
    let mut p = 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f64::from_bits((ni.wrapping_add(1023) as u64) << 52);
    if under {
        0.0
    } else {
        p * scale
    }
}

/// `ln(y)` for `y` in [1, 3] (or 0 for 0), relative error ~1e-16.
#[inline(always)]
fn ln_1_to_3(y: f64) -> f64 {
    let big = y > 1.5;
    let z = if big { y * 0.5 } else { y };
    let u = (z - 1.0) / (z + 1.0);
    let u2 = u * u;
    let mut p = 1.0 / 21.0;
    p = p * u2 + 1.0 / 19.0;
    p = p * u2 + 1.0 / 17.0;
    p = p * u2 + 1.0 / 15.0;
    p = p * u2 + 1.0 / 13.0;
    p = p * u2 + 1.0 / 11.0;
    p = p * u2 + 1.0 / 9.0;
    p = p * u2 + 1.0 / 7.0;
    p = p * u2 + 1.0 / 5.0;
    p = p * u2 + 1.0 / 3.0;
    p = p * u2 + 1.0;
    2.0 * u * p + if big { std::f64::consts::LN_2 } else { 0.0 }
}

/// `exp(x)` in f32 for `x <= ~1` (0 below -87), relative error ~2e-7.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let under = x < -87.0;
    let xc = if under { -87.0 } else { x };
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if under {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_ln_approximations_are_accurate() {
        for i in 0..=20_000 {
            let x = -700.0 + i as f64 * 0.035_01;
            let (got, want) = (exp_f64(x), x.exp());
            assert!(
                (got - want).abs() <= 4e-15 * want,
                "exp_f64({x}) {got} vs {want}"
            );
            let xf = (-86.0 + i as f64 * 0.0043) as f32;
            let (got, want) = (exp_f32(xf), (xf as f64).exp());
            assert!(((got as f64) - want).abs() <= 4e-7 * want, "exp_f32({xf})");
        }
        for i in 0..=20_000 {
            let y = 1.0 + i as f64 * 1e-4;
            assert!((ln_1_to_3(y) - y.ln()).abs() <= 4e-16, "ln({y})");
        }
        assert_eq!(lse3(NEG_INF, NEG_INF, NEG_INF), NEG_INF);
        assert!((lse3(0.0, NEG_INF, NEG_INF)).abs() < 1e-15);
    }
}
