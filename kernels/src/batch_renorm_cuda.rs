//! The CUDA side of BatchRenorm + SiLU (`cuda/renorm.cu`): the per-element
//! work and per-block partial sums over rows run on the device; the host adds
//! the partial sums up in block order, in f64 (deterministic), and computes
//! every per-channel coefficient with the CPU kernel's own code.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{moments_from_sums, stats_totals, BatchInfo, Renorm, StatsReducer};
use crate::cuda::{
    block_grid, cuda_only_cpu_fwd, device_lengths, f32_view, grid, launch, output, row_parts,
    storage, RENORM,
};

/// Threads per partial-sum block (one channel each, strided).
const THREADS: u32 = 256;

/// Per-channel sums of the partial-sum rows `part` (parts x width), in order, in f64.
fn fold_parts(part: &Tensor, width: usize) -> Result<Vec<f64>> {
    let values = part.flatten_all()?.to_vec1::<f32>()?;
    let mut total = vec![0.0f64; width];
    for row in values.chunks_exact(width) {
        total
            .iter_mut()
            .zip(row)
            .for_each(|(t, v)| *t += f64::from(*v));
    }
    Ok(total)
}

/// Per-channel mean and sqrt(biased variance) of `x` (B, T, C) over the
/// counted rows (t < valid[b]), and their number; with `reducer`, over every
/// rank (the device's partial sums are added up on the host, then reduced).
pub(super) fn batch_moments(
    x: &Tensor,
    t_len: usize,
    valid: &[usize],
    reducer: Option<&dyn StatsReducer>,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let c = x.dim(2)?;
    moments_from_sums(valid.iter().sum(), reducer, |mean| {
        let part = x.apply_op1_no_bwd(&ChannelSums {
            t_len,
            valid: valid.to_vec(),
            mean: mean.map(<[f32]>::to_vec),
        })?;
        fold_parts(&part, c)
    })
}

/// Partial per-channel sums of x (or of its squared deviations from `mean`)
/// over the counted rows: (parts, C).
struct ChannelSums {
    t_len: usize,
    valid: Vec<usize>,
    mean: Option<Vec<f32>>,
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "lcasr-renorm-sums-cuda"
    }

    cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (x, dev) = f32_view(xs, xl, self.name())?;
        let (_, _, c) = xl.shape().dims3()?;
        let rows = xl.shape().elem_count() / c;
        let (per, n_parts) = row_parts(rows);
        let part = output(dev, n_parts * c)?;
        let lens = device_lengths(dev, &self.valid)?;
        let mean = dev.clone_htod(self.mean.as_deref().unwrap_or(&[0.0]))?;
        let squared = i32::from(self.mean.is_some());
        let (rows, t_len, c_arg, per) = (rows as i64, self.t_len as i64, c as i32, per as i64);
        launch!(
            RENORM,
            dev,
            "lcasr_renorm_sums",
            block_grid(n_parts, THREADS),
            &x,
            &lens,
            &mean,
            &part,
            &rows,
            &t_len,
            &c_arg,
            &per,
            &squared
        );
        Ok((storage(part, dev), Shape::from((n_parts, c))))
    }
}

/// The forward of `r` on CUDA: y = silu((x - mean) * a + b).
pub(super) fn forward(
    r: &Renorm,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let op = "lcasr-batch-renorm-silu-cuda";
    let (xv, dev) = f32_view(x.0, x.1, op)?;
    let wv = dev.clone_dtoh(&f32_view(w.0, w.1, op)?.0)?;
    let bv = dev.clone_dtoh(&f32_view(b.0, b.1, op)?.0)?;
    let (a, bb) = r.affine_coefs(&wv, &bv);
    let coefs = dev.clone_htod(&[&r.mean[..], &a[..], &bb[..]].concat())?;
    let n = x.1.shape().elem_count();
    let c = wv.len();
    let y = output(dev, n)?;
    let (rows, c_arg) = ((n / c) as i64, c as i32);
    launch!(
        RENORM,
        dev,
        "lcasr_renorm_fwd",
        grid(n),
        &xv,
        &coefs,
        &y,
        &rows,
        &c_arg
    );
    Ok((storage(y, dev), x.1.shape().clone()))
}

/// The gradients of `r` on CUDA: of x (with what flows through the batch
/// statistics in training mode), of the weight and of the bias.
pub(super) fn backward(
    r: &Renorm,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (w, bs) = (host(weight)?, host(bias)?);
    let c = w.len();
    let (a, b) = r.affine_coefs(&w, &bs);
    let coefs = [&r.mean[..], &a[..], &b[..], &r.scale()[..], &r.d[..]].concat();
    let n = x.elem_count();
    let packed = x.apply_op2_no_bwd(&grad.contiguous()?, &DirectGrad { coefs, c })?;
    let mut dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let sums = fold_parts(&packed.narrow(0, n, packed.elem_count() - n)?, 2 * c)?;
    let (dw, db) = sums.split_at(c);
    if let Some(info) = &r.batch {
        let (tw, tb) = stats_totals(r.backward_reducer()?.as_deref(), dw, db)?;
        dx = x.apply_op2_no_bwd(&dx, &StatsGrad::new(r, &w, &tw, &tb, info, x.dim(1)?))?;
    }
    let dev = x.device();
    let to_f32 = |v: &[f64]| -> Vec<f32> { v.iter().map(|s| *s as f32).collect() };
    Ok((
        Some(dx),
        Some(Tensor::from_vec(to_f32(dw), c, dev)?),
        Some(Tensor::from_vec(to_f32(db), c, dev)?),
    ))
}

/// On (x, dy): dz * a for every element, then the partial sums of dweight and
/// dbias per block ((parts, 2C)), packed.
struct DirectGrad {
    /// [mean | a | b | u | d], C each.
    coefs: Vec<f32>,
    c: usize,
}

impl CustomOp2 for DirectGrad {
    fn name(&self) -> &'static str {
        "lcasr-renorm-grad-cuda"
    }

    cuda_only_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (x, dev) = f32_view(xs, xl, self.name())?;
        let (dy, _) = f32_view(gs, gl, self.name())?;
        let n = xl.shape().elem_count();
        let rows = n / self.c;
        let (per, n_parts) = row_parts(rows);
        let total = n + n_parts * 2 * self.c;
        let out = output(dev, total)?;
        let dx = out.slice(0..n);
        let part = out.slice(n..total);
        let coefs = dev.clone_htod(&self.coefs)?;
        let (rows, c, per) = (rows as i64, self.c as i32, per as i64);
        launch!(
            RENORM,
            dev,
            "lcasr_renorm_bwd",
            block_grid(n_parts, THREADS),
            &x,
            &dy,
            &coefs,
            &dx,
            &part,
            &rows,
            &c,
            &per
        );
        Ok((storage(out, dev), Shape::from(total)))
    }
}

/// On (x, dx): dx plus the gradient through the batch statistics on the
/// counted rows.
struct StatsGrad {
    /// [k1 | k2 | mean], C each.
    k: Vec<f32>,
    valid: Vec<usize>,
    t_len: usize,
}

impl StatsGrad {
    fn new(r: &Renorm, w: &[f32], dw: &[f64], db: &[f64], info: &BatchInfo, t_len: usize) -> Self {
        let (k1, k2) = r.stats_grad_coefs(w, dw, db, info);
        Self {
            k: [&k1[..], &k2[..], &r.mean[..]].concat(),
            valid: info.valid.clone(),
            t_len,
        }
    }
}

impl CustomOp2 for StatsGrad {
    fn name(&self) -> &'static str {
        "lcasr-renorm-stats-grad-cuda"
    }

    cuda_only_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (x, dev) = f32_view(xs, xl, self.name())?;
        let (dx, _) = f32_view(ds, dl, self.name())?;
        let n = xl.shape().elem_count();
        let c = self.k.len() / 3;
        let out = output(dev, n)?;
        let lens = device_lengths(dev, &self.valid)?;
        let k = dev.clone_htod(&self.k)?;
        let (rows, t_len, c_arg) = ((n / c) as i64, self.t_len as i64, c as i32);
        launch!(
            RENORM,
            dev,
            "lcasr_renorm_stats_grad",
            grid(n),
            &x,
            &dx,
            &lens,
            &k,
            &out,
            &rows,
            &t_len,
            &c_arg
        );
        Ok((storage(out, dev), xl.shape().clone()))
    }
}
