//! BatchRenorm1d (reference §3.7) fused with its affine and a SiLU, for channels-last
//! input (B, T, C), as a candle custom op with forward and backward.
//!
//! Data-parallel training synchronises the batch statistics: while a
//! [`StatsReducer`] is installed on the calling thread ([`with_stats_reducer`]),
//! the per-channel sums behind the mean and the variance, and in backward the
//! per-channel gradient sums that flow through them, are summed over every
//! rank, so a batch split over ranks is normalised as the whole batch would be.
//! Without a reducer nothing changes.

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::{bail, CpuStorage, CustomOp3, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_f32::{check_f32, cpu_slices3, multiversion, sigmoid, to_vec_f32, with_f32};

#[cfg(feature = "cuda")]
#[path = "batch_renorm_cuda.rs"]
mod cuda;

/// Time steps handled by one rayon task.
const ROWS_PER_TASK: usize = 64;

/// Sums per-channel statistics over the ranks of a data-parallel step
/// (synchronised BatchRenorm).
pub trait StatsReducer {
    /// Replaces `values` by their element-wise sum over every rank. Every rank
    /// makes the same calls in the same order with the same lengths.
    fn sum(&self, values: &mut [f64]) -> Result<()>;
}

thread_local! {
    /// The reducer of the data-parallel step running on this thread, if any.
    static REDUCER: RefCell<Option<Rc<dyn StatsReducer>>> = const { RefCell::new(None) };
}

/// Runs `f` with `reducer` installed on this thread: every training-mode
/// [`batch_renorm_silu`] called in `f`, and the backward pass of each such op
/// (which must also run in `f`), takes its statistics over all ranks. The
/// previous reducer (usually none) is restored afterwards, even on a panic.
pub fn with_stats_reducer<R>(reducer: Rc<dyn StatsReducer>, f: impl FnOnce() -> R) -> R {
    /// Puts the previous reducer back when dropped.
    struct Restore(Option<Rc<dyn StatsReducer>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            REDUCER.with(|r| *r.borrow_mut() = previous);
        }
    }
    let previous = REDUCER.with(|r| r.borrow_mut().replace(reducer));
    let _restore = Restore(previous);
    f()
}

/// The reducer installed on this thread.
/// True while a [`StatsReducer`] is installed on this thread.
pub(crate) fn stats_reducer_installed() -> bool {
    REDUCER.with(|r| r.borrow().is_some())
}

fn installed_reducer() -> Option<Rc<dyn StatsReducer>> {
    REDUCER.with(|r| r.borrow().clone())
}

/// Per-channel batch statistics of a training forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Mean over the counted positions.
    pub mean: Vec<f32>,
    /// sqrt(biased variance) + eps over the counted positions.
    pub std: Vec<f32>,
}

/// How the normalisation statistics are obtained.
#[derive(Debug, Clone, Copy)]
pub enum RenormMode<'a> {
    /// Batch statistics. Positions counted: all B*T when `lengths` is None (reference behaviour, includes padding),
    /// otherwise only t < lengths[b]. r = clamp(std/running_std, 1/rmax, rmax), d = clamp((mean-running_mean)/running_std, -dmax, dmax), both constants (no gradient);
    /// y = ((x-mean)/std * r + d) * weight + bias, then SiLU. Gradient flows through mean and std.
    Train {
        /// Running mean buffer (C).
        running_mean: &'a [f32],
        /// Running std buffer (C).
        running_std: &'a [f32],
        /// Bound of the std correction r.
        rmax: f32,
        /// Bound of the mean correction d.
        dmax: f32,
        /// Added to the std (not the variance).
        eps: f32,
        /// Valid time steps per batch item; None counts every position.
        lengths: Option<&'a [usize]>,
    },
    /// y = ((x - running_mean)/running_std) * weight + bias, then SiLU (no eps, as the reference).
    Eval {
        /// Running mean buffer (C).
        running_mean: &'a [f32],
        /// Running std buffer (C).
        running_std: &'a [f32],
    },
}

/// BatchRenorm + affine + SiLU on `x` (B, T, C) with `weight`, `bias` (C). Returns the
/// output and, in training mode, the batch statistics so the caller can update its
/// running buffers. Gradients flow to `x`, `weight` and `bias`. f32 on the CPU
/// and on CUDA devices runs the kernels (bf16/f16 on CUDA too when the
/// statistics are synchronised, converted to f32 around them); other dtypes
/// and devices run the composition.
///
/// In training mode under [`with_stats_reducer`] the statistics (returned and
/// used) are those of the batches of all ranks together, and the gradient of
/// `x` includes what flows through them from every rank; the gradients of
/// `weight` and `bias` stay this rank's own (they are summed with the other
/// parameters' gradients afterwards).
pub fn batch_renorm_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mode: RenormMode,
) -> Result<(Tensor, Option<BatchStats>)> {
    if crate::half(x) {
        if crate::cuda_kernels(x) && stats_reducer_installed() {
            // Synchronised statistics (data parallel) need the kernels, which
            // are f32: convert around them. Without a reducer the composition's
            // node is leaner (it keeps the half tensors only; the conversions
            // would keep f32 copies of the input and output in the graph).
            let f32_of = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
            let (y, stats) =
                batch_renorm_silu(&f32_of(x)?, &f32_of(weight)?, &f32_of(bias)?, mode)?;
            return Ok((y.to_dtype(x.dtype())?, stats));
        }
        return composed_node(x, weight, bias, mode);
    }
    let op = "batch_renorm_silu";
    check_f32(x, op, "x")?;
    check_f32(weight, op, "weight")?;
    check_f32(bias, op, "bias")?;
    let (b, t, c) = x.dims3()?;
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!(
            "{op}: weight and bias must be [{c}], got {:?} and {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    let (running_mean, running_std) = match mode {
        RenormMode::Train {
            running_mean,
            running_std,
            ..
        }
        | RenormMode::Eval {
            running_mean,
            running_std,
        } => (running_mean, running_std),
    };
    if running_mean.len() != c || running_std.len() != c {
        bail!("{op}: running buffers must have {c} channels");
    }
    if let RenormMode::Train {
        lengths: Some(l), ..
    } = mode
    {
        if l.len() != b || l.iter().any(|&v| v > t) {
            bail!("{op}: lengths {l:?} must be {b} values <= T = {t}");
        }
    }
    let on_cuda = crate::native_cuda(x);
    if !crate::native(x) && !on_cuda {
        return composed_node(x, weight, bias, mode);
    }
    let x = x.contiguous()?;
    let (renorm, stats) = match mode {
        RenormMode::Eval { .. } => {
            let renorm = Renorm {
                mean: running_mean.to_vec(),
                inv_std: running_std.iter().map(|s| 1.0 / s).collect(),
                r: vec![1.0; c],
                d: vec![0.0; c],
                batch: None,
            };
            (renorm, None)
        }
        RenormMode::Train {
            rmax,
            dmax,
            eps,
            lengths,
            ..
        } => {
            let valid = match lengths {
                None => vec![t; b],
                Some(l) => l.to_vec(),
            };
            let reducer = installed_reducer();
            let (mean, sigma, count) = if on_cuda {
                moments_on_device(&x, t, &valid, reducer.as_deref())?
            } else {
                with_f32(&x, op, |xs| {
                    batch_moments(xs, c, t, &valid, reducer.as_deref())
                })?
            };
            let std: Vec<f32> = sigma.iter().map(|s| s + eps).collect();
            let r = std
                .iter()
                .zip(running_std)
                .map(|(s, rs)| (s / rs).clamp(1.0 / rmax, rmax))
                .collect();
            let d = mean
                .iter()
                .zip(running_mean.iter().zip(running_std))
                .map(|(m, (rm, rs))| ((m - rm) / rs).clamp(-dmax, dmax))
                .collect();
            let renorm = Renorm {
                mean: mean.clone(),
                inv_std: std.iter().map(|s| 1.0 / s).collect(),
                r,
                d,
                batch: Some(BatchInfo {
                    valid,
                    count,
                    sigma,
                    synchronised: reducer.is_some(),
                }),
            };
            (renorm, Some(BatchStats { mean, std }))
        }
    };
    let y = x.apply_op3(&weight.contiguous()?, &bias.contiguous()?, renorm)?;
    Ok((y, stats))
}

/// Per-channel mean and sqrt(biased variance) over the counted positions of
/// `x` on a CUDA device, and their number.
fn moments_on_device(
    x: &Tensor,
    t_len: usize,
    valid: &[usize],
    reducer: Option<&dyn StatsReducer>,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    #[cfg(feature = "cuda")]
    {
        cuda::batch_moments(x, t_len, valid, reducer)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, t_len, valid, reducer);
        bail!("batch_renorm_silu: built without CUDA")
    }
}

/// The composition [`crate::composed::batch_renorm_silu`] as one graph node
/// that keeps only its inputs and output (see `recompute.rs`).
fn composed_node(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mode: RenormMode,
) -> Result<(Tensor, Option<BatchStats>)> {
    let (first, stats) =
        crate::composed::batch_renorm_silu(&x.detach(), &weight.detach(), &bias.detach(), mode)?;
    let owned = OwnedMode::of(&mode);
    let y = crate::recompute::node_with(&[x, weight, bias], first, move |t| {
        Ok(crate::composed::batch_renorm_silu(&t[0], &t[1], &t[2], owned.mode())?.0)
    })?;
    Ok((y, stats))
}

/// A [`RenormMode`] that owns its buffers (for a recomputation in backward;
/// training mode recomputes the same batch statistics from the same input).
struct OwnedMode {
    running_mean: Vec<f32>,
    running_std: Vec<f32>,
    /// (rmax, dmax, eps, lengths) in training mode.
    train: Option<(f32, f32, f32, Option<Vec<usize>>)>,
}

impl OwnedMode {
    fn of(mode: &RenormMode) -> Self {
        match *mode {
            RenormMode::Train {
                running_mean,
                running_std,
                rmax,
                dmax,
                eps,
                lengths,
            } => Self {
                running_mean: running_mean.to_vec(),
                running_std: running_std.to_vec(),
                train: Some((rmax, dmax, eps, lengths.map(<[usize]>::to_vec))),
            },
            RenormMode::Eval {
                running_mean,
                running_std,
            } => Self {
                running_mean: running_mean.to_vec(),
                running_std: running_std.to_vec(),
                train: None,
            },
        }
    }

    fn mode(&self) -> RenormMode<'_> {
        match &self.train {
            Some((rmax, dmax, eps, lengths)) => RenormMode::Train {
                running_mean: &self.running_mean,
                running_std: &self.running_std,
                rmax: *rmax,
                dmax: *dmax,
                eps: *eps,
                lengths: lengths.as_deref(),
            },
            None => RenormMode::Eval {
                running_mean: &self.running_mean,
                running_std: &self.running_std,
            },
        }
    }
}

/// Which positions the batch statistics counted, for the backward pass.
struct BatchInfo {
    /// Valid time steps per batch item.
    valid: Vec<usize>,
    /// Number of counted positions.
    count: usize,
    /// sqrt(biased variance) per channel (the std without eps).
    sigma: Vec<f32>,
    /// The statistics were taken over all ranks (`count` is the total), so the
    /// backward pass sums its per-channel terms over all ranks too.
    synchronised: bool,
}

/// z = ((x - mean) * inv_std * r + d) * weight + bias; y = silu(z).
struct Renorm {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    r: Vec<f32>,
    d: Vec<f32>,
    /// Present in training mode: gradients then flow through the batch statistics.
    batch: Option<BatchInfo>,
}

/// Is global row `row` (b*T + t) a counted position?
fn is_valid(row: usize, t_len: usize, valid: &[usize]) -> bool {
    row % t_len < valid[row / t_len]
}

multiversion! {
    /// Adds the rows of `x` (or their squared deviations from `mean`) into `acc`.
    fn accumulate_rows(x: &[f32], acc: &mut [f32], mean: &[f32], squared: bool) {
        for xr in x.chunks_exact(acc.len()) {
            if squared {
                for ((a, v), m) in acc.iter_mut().zip(xr).zip(mean) {
                    *a += (v - m) * (v - m);
                }
            } else {
                for (a, v) in acc.iter_mut().zip(xr) {
                    *a += v;
                }
            }
        }
    }
}

/// Sums over the counted rows of (B*T, C) data, per channel, in f64 across tasks.
fn channel_sums(
    x: &[f32],
    c: usize,
    t_len: usize,
    valid: &[usize],
    mean: &[f32],
    squared: bool,
) -> Vec<f64> {
    x.par_chunks(c * ROWS_PER_TASK)
        .enumerate()
        .map(|(i, xc)| {
            let mut acc = vec![0.0f32; c];
            let r0 = i * ROWS_PER_TASK;
            let rows = xc.len() / c;
            // Counted rows come in runs; sum each run at once.
            let mut j = 0;
            while j < rows {
                let start = j;
                let keep = is_valid(r0 + j, t_len, valid);
                while j < rows && is_valid(r0 + j, t_len, valid) == keep {
                    j += 1;
                }
                if keep {
                    accumulate_rows(&xc[start * c..j * c], &mut acc, mean, squared);
                }
            }
            acc
        })
        .collect::<Vec<_>>()
        // Summed in task order, so the result never depends on how the
        // thread pool split the work (training must be bit-reproducible).
        .into_iter()
        .fold(vec![0.0f64; c], |mut total, part| {
            total
                .iter_mut()
                .zip(&part)
                .for_each(|(t, p)| *t += *p as f64);
            total
        })
}

/// Per-channel mean and sqrt(biased variance) over the counted positions, and
/// their number; with a reducer, over the counted positions of every rank
/// (the centred squares are taken around the global mean, as in one process).
fn batch_moments(
    x: &[f32],
    c: usize,
    t_len: usize,
    valid: &[usize],
    reducer: Option<&dyn StatsReducer>,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let zeros = vec![0.0f32; c];
    moments_from_sums(valid.iter().sum(), reducer, |mean| {
        Ok(match mean {
            None => channel_sums(x, c, t_len, valid, &zeros, false),
            Some(m) => channel_sums(x, c, t_len, valid, m, true),
        })
    })
}

/// Per-channel mean, sqrt(biased variance) and the count of the counted
/// positions, from this rank's `count` positions and per-channel f64 sums:
/// `sums(None)` of x, `sums(Some(mean))` of (x - mean)^2. With `reducer` the
/// sums and the count are those of every rank. The CPU kernel and the CUDA
/// one (whose sums come from the device) share it.
fn moments_from_sums(
    count: usize,
    reducer: Option<&dyn StatsReducer>,
    mut sums: impl FnMut(Option<&[f32]>) -> Result<Vec<f64>>,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let mut totals = sums(None)?;
    totals.push(count as f64);
    if let Some(r) = reducer {
        r.sum(&mut totals)?;
    }
    let n = totals.pop().unwrap_or_default();
    if n == 0.0 {
        bail!("batch_renorm_silu: no valid positions to take batch statistics over");
    }
    let mean: Vec<f32> = totals.iter().map(|s| (s / n) as f32).collect();
    let mut squares = sums(Some(&mean))?;
    if let Some(r) = reducer {
        r.sum(&mut squares)?;
    }
    let sigma = squares.iter().map(|s| (s / n).sqrt() as f32).collect();
    Ok((mean, sigma, n as usize))
}

multiversion! {
    /// y = silu((x - m) * a + b) per row, with per-channel m, a and b.
    fn fwd_rows(x: &[f32], y: &mut [f32], m: &[f32], a: &[f32], b: &[f32]) {
        for (xr, yr) in x.chunks_exact(a.len()).zip(y.chunks_exact_mut(a.len())) {
            for ((((yv, xv), mv), av), bv) in yr.iter_mut().zip(xr).zip(m).zip(a).zip(b) {
                let z = (xv - mv) * av + bv;
                *yv = z * sigmoid(z);
            }
        }
    }
}

multiversion! {
    /// Direct part of dx, plus partial sums of dweight (into `dw`) and dbias (into `db`).
    /// With xc = x - m: z = xc*a + b, the normalised value is xc*u + v and the direct
    /// input gradient is dz * a.
    fn bwd_rows(
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        coefs: &[&[f32]; 5],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let [m, a, b, u, v] = *coefs;
        let c = a.len();
        let (m, b, u, v, dw, db) = (&m[..c], &b[..c], &u[..c], &v[..c], &mut dw[..c], &mut db[..c]);
        for ((xr, dyr), dxr) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            let (xr, dyr, dxr) = (&xr[..c], &dyr[..c], &mut dxr[..c]);
            for i in 0..c {
                let xc = xr[i] - m[i];
                let z = xc * a[i] + b[i];
                let s = sigmoid(z);
                let dz = dyr[i] * s * (1.0 + z * (1.0 - s));
                dw[i] += dz * (xc * u[i] + v[i]);
                db[i] += dz;
                dxr[i] = dz * a[i];
            }
        }
    }
}

multiversion! {
    /// Adds the batch-statistics part of dx: k1 + k2 * (x - mean) per counted row.
    fn stats_grad_rows(x: &[f32], dx: &mut [f32], k1: &[f32], k2: &[f32], mean: &[f32]) {
        let c = k1.len();
        for (xr, dxr) in x.chunks_exact(c).zip(dx.chunks_exact_mut(c)) {
            for ((((d, xv), p), q), m) in dxr.iter_mut().zip(xr).zip(k1).zip(k2).zip(mean) {
                *d += p + q * (xv - m);
            }
        }
    }
}

impl Renorm {
    /// Per-channel scale u = r / std: the normalised value is (x - mean) * u + d.
    fn scale(&self) -> Vec<f32> {
        self.inv_std
            .iter()
            .zip(&self.r)
            .map(|(s, r)| s * r)
            .collect()
    }

    /// Per-channel (a, b) such that z = (x - mean) * a + b.
    fn affine_coefs(&self, w: &[f32], bias: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let a = self.scale().iter().zip(w).map(|(u, w)| u * w).collect();
        let b = self
            .d
            .iter()
            .zip(w)
            .zip(bias)
            .map(|((d, w), b)| d * w + b)
            .collect();
        (a, b)
    }
}

impl CustomOp3 for Renorm {
    fn name(&self) -> &'static str {
        "lcasr-batch-renorm-silu"
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
        let c = w.len();
        let (a, b) = self.affine_coefs(w, bias);
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(x.par_chunks(c * ROWS_PER_TASK))
            .for_each(|(yc, xc)| fwd_rows(xc, yc, &self.mean, &a, &b));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, (xs, xl), (ws, wl), (bs, bl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return cuda::backward(self, x, weight, bias, grad);
        }
        let op = self.name();
        let (w, bs) = (to_vec_f32(weight, op)?, to_vec_f32(bias, op)?);
        let c = w.len();
        let t_len = x.dim(1)?;
        let (a, b) = self.affine_coefs(&w, &bs);
        let u = self.scale();
        let reducer = self.backward_reducer()?;
        let (dx, dw, db) = with_f32(x, op, |xs| {
            with_f32(grad, op, |dy| {
                let mut dx = vec![0.0f32; xs.len()];
                let coefs = [&self.mean[..], &a[..], &b[..], &u[..], &self.d[..]];
                let (dw, db) = dx
                    .par_chunks_mut(c * ROWS_PER_TASK)
                    .zip(xs.par_chunks(c * ROWS_PER_TASK))
                    .zip(dy.par_chunks(c * ROWS_PER_TASK))
                    .map(|((dxc, xc), dyc)| {
                        let (mut dw, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
                        bwd_rows(xc, dyc, dxc, &coefs, &mut dw, &mut db);
                        (dw, db)
                    })
                    .collect::<Vec<_>>()
                    // In task order: deterministic whatever the thread pool did.
                    .into_iter()
                    .fold(
                        (vec![0.0f64; c], vec![0.0f64; c]),
                        |(mut tw, mut tb), (pw, pb)| {
                            tw.iter_mut().zip(&pw).for_each(|(t, p)| *t += *p as f64);
                            tb.iter_mut().zip(&pb).for_each(|(t, p)| *t += *p as f64);
                            (tw, tb)
                        },
                    );
                if let Some(info) = &self.batch {
                    let (tw, tb) = stats_totals(reducer.as_deref(), &dw, &db)?;
                    self.add_stats_grad(xs, &mut dx, &w, &tw, &tb, info, t_len);
                }
                let dw: Vec<f32> = dw.iter().map(|v| *v as f32).collect();
                let db: Vec<f32> = db.iter().map(|v| *v as f32).collect();
                Ok((dx, dw, db))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// The per-channel sums of the weight and bias gradients that the gradient
/// through the batch statistics needs: over every rank with `reducer`, this
/// rank's own without. (The weight and bias gradients themselves stay this
/// rank's, summed with the other parameters' afterwards.)
fn stats_totals(
    reducer: Option<&dyn StatsReducer>,
    dw: &[f64],
    db: &[f64],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let Some(r) = reducer else {
        return Ok((dw.to_vec(), db.to_vec()));
    };
    let mut total = [dw, db].concat();
    r.sum(&mut total)?;
    let tb = total.split_off(dw.len());
    Ok((total, tb))
}

impl Renorm {
    /// The reducer the backward pass sums the statistics' terms with: the
    /// installed one when the forward synchronised its statistics (an error
    /// if none is installed now), none otherwise.
    fn backward_reducer(&self) -> Result<Option<Rc<dyn StatsReducer>>> {
        match &self.batch {
            Some(info) if info.synchronised => installed_reducer().map(Some).ok_or_else(|| {
                Error::Msg(
                    "batch_renorm_silu: the forward pass took its statistics over all ranks \
                     but the backward pass runs without the ranks' reducer installed"
                        .into(),
                )
            }),
            _ => Ok(None),
        }
    }

    /// The per-channel coefficients (k1, k2) of the gradient that flows
    /// through the batch mean and std: counted row j gains k1 + k2 * (x_j -
    /// mean). With g = dL/dxhat = dz * r * w: dL/dmean = -sum(g) / std and
    /// dL/dstd = -sum(g * xhat) / std, where sum(g) = r*w*dbias and
    /// sum(g * xhat) = w * (dweight - d * dbias).
    fn stats_grad_coefs(
        &self,
        w: &[f32],
        dw: &[f64],
        db: &[f64],
        info: &BatchInfo,
    ) -> (Vec<f32>, Vec<f32>) {
        let c = w.len();
        let n = info.count as f64;
        let mut k1 = vec![0.0f32; c];
        let mut k2 = vec![0.0f32; c];
        for i in 0..c {
            let inv_std = self.inv_std[i] as f64;
            let (wi, ri, di) = (w[i] as f64, self.r[i] as f64, self.d[i] as f64);
            let sum_g = ri * wi * db[i];
            let sum_gx = wi * (dw[i] - di * db[i]);
            let dmean = -sum_g * inv_std;
            let dstd = -sum_gx * inv_std;
            k1[i] = (dmean / n) as f32;
            // d sigma / d x_j = (x_j - mean) / (n * sigma); no contribution when sigma = 0.
            let sigma = info.sigma[i] as f64;
            k2[i] = if sigma > 0.0 {
                (dstd / (n * sigma)) as f32
            } else {
                0.0
            };
        }
        (k1, k2)
    }

    /// Adds the gradient that flows through the batch mean and std to the
    /// counted rows ([`Renorm::stats_grad_coefs`]).
    #[allow(clippy::too_many_arguments)]
    fn add_stats_grad(
        &self,
        x: &[f32],
        dx: &mut [f32],
        w: &[f32],
        dw: &[f64],
        db: &[f64],
        info: &BatchInfo,
        t_len: usize,
    ) {
        let c = w.len();
        let (k1, k2) = self.stats_grad_coefs(w, dw, db, info);
        dx.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(x.par_chunks(c * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(i, (dxc, xc))| {
                let r0 = i * ROWS_PER_TASK;
                for (j, (dxr, xr)) in dxc.chunks_exact_mut(c).zip(xc.chunks_exact(c)).enumerate() {
                    if is_valid(r0 + j, t_len, &info.valid) {
                        stats_grad_rows(xr, dxr, &k1, &k2, &self.mean);
                    }
                }
            });
    }
}
