//! The CUDA side of the CTC loss (`cuda/ctc.cu`): the CPU kernel's algorithm
//! (log-space f64 recursions over the band of live lattice states, alpha
//! rows kept every `K ≈ √T` frames and recomputed per segment in the
//! backward) on the device, so the logits and their gradient never leave it.
//! The batch items' label sequences go up once per loss as one int buffer.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::cuda::{
    block_grid, cuda_only_cpu_fwd, f32_view, grid, launch, output, output_of, storage, view, CTC,
};

/// Threads per block of the per-item kernels (`CTC_ITEM_THREADS`).
const ITEM_THREADS: u32 = 1024;
/// Threads per block of the per-frame log-sum-exp (`CTC_ROW_THREADS`).
const ROW_THREADS: u32 = 256;

/// The kernels' `CtcShape`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CtcShape {
    batch: i32,
    t: i32,
    c: i32,
    blank: i32,
    k: i32,
    w: i32,
    n_ck: i32,
    zero_infinity: i32,
}

/// The kernels' `CtcOffsets`: where each item array starts in the int buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CtcOffsets {
    len: i32,
    s_len: i32,
    min_frames: i32,
    ext_off: i32,
    ext: i32,
    lab_first: i32,
    lab_id: i32,
    lab_pos_off: i32,
    lab_pos: i32,
}

// SAFETY: plain `repr(C)` structs of `i32`s, laid out as the kernels' structs.
unsafe impl DeviceRepr for CtcShape {}
// SAFETY: as above.
unsafe impl DeviceRepr for CtcOffsets {}

/// One batch item as the kernels see it.
pub(crate) struct Item<'a> {
    /// Valid frames.
    pub len: usize,
    /// The extended label sequence (blank, l1, blank, ..., blank).
    pub ext: &'a [u32],
    /// Frames the shortest valid alignment needs.
    pub min_frames: usize,
}

/// The items' arrays packed into one buffer (`CtcOffsets` says where).
fn pack(items: &[Item], blank: u32) -> Result<(Vec<i32>, CtcOffsets)> {
    let to_i32 = |v: usize| {
        i32::try_from(v).map_err(|_| candle_core::Error::msg("ctc_loss: sizes exceed i32"))
    };
    let mut len = Vec::new();
    let mut s_len = Vec::new();
    let mut min_frames = Vec::new();
    let mut ext_off = Vec::new();
    let mut ext = Vec::new();
    let mut lab_first = vec![0];
    let mut lab_id = Vec::new();
    let mut lab_pos_off = vec![0];
    let mut lab_pos = Vec::new();
    for item in items {
        len.push(to_i32(item.len)?);
        s_len.push(to_i32(item.ext.len())?);
        min_frames.push(to_i32(item.min_frames)?);
        ext_off.push(to_i32(ext.len())?);
        ext.extend(item.ext.iter().map(|&l| l as i32));
        // Each distinct label with its states, in state order.
        let mut distinct: Vec<u32> = item.ext.iter().copied().filter(|&l| l != blank).collect();
        distinct.sort_unstable();
        distinct.dedup();
        for label in distinct {
            lab_id.push(label as i32);
            for (s, &l) in item.ext.iter().enumerate() {
                if l == label {
                    lab_pos.push(to_i32(s)?);
                }
            }
            lab_pos_off.push(to_i32(lab_pos.len())?);
        }
        lab_first.push(to_i32(lab_id.len())?);
    }
    let mut meta = Vec::new();
    let mut place = |part: Vec<i32>| -> Result<i32> {
        let at = to_i32(meta.len())?;
        meta.extend(part);
        Ok(at)
    };
    let offsets = CtcOffsets {
        len: place(len)?,
        s_len: place(s_len)?,
        min_frames: place(min_frames)?,
        ext_off: place(ext_off)?,
        ext: place(ext)?,
        lab_first: place(lab_first)?,
        lab_id: place(lab_id)?,
        lab_pos_off: place(lab_pos_off)?,
        lab_pos: place(lab_pos)?,
    };
    Ok((meta, offsets))
}

/// What the forward leaves on the device for the backward.
pub(crate) struct Forward {
    meta: CudaSlice<i32>,
    offsets: CtcOffsets,
    shape: CtcShape,
    /// Log-sum-exp of every valid frame, (B, T).
    lse: CudaSlice<f64>,
    /// Every K-th alpha row, (B, n_ck, w).
    ckpt: CudaSlice<f64>,
    /// Negative log-likelihood per item.
    nll: CudaSlice<f64>,
}

/// The loss (B,) f32 of `x` (B, T, C) f32 on a CUDA device, and what its
/// backward needs.
pub(crate) fn forward(
    xs: &CudaStorage,
    xl: &Layout,
    items: &[Item],
    blank: u32,
    zero_infinity: bool,
) -> Result<(CudaStorage, Forward)> {
    let op = "ctc_loss (CUDA)";
    let (x, dev) = f32_view(xs, xl, op)?;
    let (b, t, c) = xl.shape().dims3()?;
    let k = ((t as f64).sqrt().ceil() as usize).max(1);
    let w = items.iter().map(|i| i.ext.len()).max().unwrap_or(1) + 2;
    let n_ck = t.div_ceil(k).max(1);
    let shape = CtcShape {
        batch: b as i32,
        t: t as i32,
        c: c as i32,
        blank: blank as i32,
        k: k as i32,
        w: w as i32,
        n_ck: n_ck as i32,
        zero_infinity: i32::from(zero_infinity),
    };
    let (meta, offsets) = pack(items, blank)?;
    let meta = dev.clone_htod(&meta)?;
    let lse = output_of::<f64>(dev, b * t)?;
    let ckpt = output_of::<f64>(dev, b * n_ck * w)?;
    let rows = output_of::<f64>(dev, b * 2 * w)?;
    let nll = output_of::<f64>(dev, b)?;
    let loss = output(dev, b)?;
    let rows_cfg = block_grid((b * t).min(65_535), ROW_THREADS);
    launch!(
        CTC,
        dev,
        "lcasr_ctc_lse",
        rows_cfg,
        &x,
        &lse,
        &meta,
        &offsets,
        &shape
    );
    let items_cfg = block_grid(b, ITEM_THREADS);
    launch!(
        CTC,
        dev,
        "lcasr_ctc_alpha",
        items_cfg,
        &x,
        &lse,
        &rows,
        &ckpt,
        &nll,
        &loss,
        &meta,
        &offsets,
        &shape
    );
    let fwd = Forward {
        meta,
        offsets,
        shape,
        lse,
        ckpt,
        nll,
    };
    Ok((storage(loss, dev), fwd))
}

/// The gradient (B, T, C) of `scales · loss` for the logits `x` of `fwd`'s
/// forward; `scales` (B,) is the loss's incoming gradient.
pub(crate) fn backward(fwd: &Forward, x: &Tensor, scales: &Tensor) -> Result<Tensor> {
    let scales = scales.to_dtype(DType::F64)?.contiguous()?;
    x.contiguous()?.apply_op2_no_bwd(&scales, &CtcGrad(fwd))
}

/// The backward as one op on (logits, scales).
struct CtcGrad<'a>(&'a Forward);

impl CustomOp2 for CtcGrad<'_> {
    fn name(&self) -> &'static str {
        "ctc-loss-grad-cuda"
    }

    cuda_only_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let fwd = self.0;
        let sh = fwd.shape;
        let (x, dev) = f32_view(xs, xl, op)?;
        let scales = view::<f64>(ss, sl, op)?;
        let (b, t, c) = xl.shape().dims3()?;
        if (b, t, c) != (sh.batch as usize, sh.t as usize, sh.c as usize) {
            bail!("{op}: logits {:?} are not those of the forward", xl.dims());
        }
        let w = sh.w as usize;
        let grad = output(dev, b * t * c)?;
        let rows = output_of::<f64>(dev, b * 2 * w)?;
        let seg = output_of::<f64>(dev, b * sh.k as usize * w)?;
        let occ = output_of::<f64>(dev, b * w)?;
        let (meta, offsets) = (&fwd.meta, &fwd.offsets);
        launch!(
            CTC,
            dev,
            "lcasr_ctc_softmax",
            grid(b * t * c),
            &x,
            &fwd.lse,
            &fwd.nll,
            &scales,
            &grad,
            meta,
            offsets,
            &sh
        );
        launch!(
            CTC,
            dev,
            "lcasr_ctc_beta",
            block_grid(b, ITEM_THREADS),
            &x,
            &fwd.lse,
            &fwd.ckpt,
            &rows,
            &seg,
            &occ,
            &fwd.nll,
            &scales,
            &grad,
            meta,
            offsets,
            &sh
        );
        Ok((storage(grad, dev), xl.shape().clone()))
    }
}
