//! The CUDA side of attention: memory linear in the sequence length.
//! Rotary embedding and the split of the interleaved qkv into heads are
//! candle ops ([`crate::composed::attention_heads`], their gradients by
//! autograd); the core op takes the (B, H, N, Dh) heads, keeps each row's
//! log-sum-exp from the forward, and recomputes the probabilities in the
//! backward (three kernels: the row deltas, dQ, then dK and dV). Two kernel
//! families run it ([`Kernels`]): the CUDA-core f32 kernels of
//! `cuda/attention.cu` (launched here) and the tensor-core bf16/f16 kernels
//! of `cuda/attention_tc.cu` ([`crate::attention_tc_cuda`]).

use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::attention::{AttentionOptions, Problem};
use crate::cuda::{
    cuda_only_cpu_fwd, device_lengths, f32_view, grid, launch, output, output_of, storage, Module,
    ATTENTION,
};

/// Largest head dimension the kernels take (four values per lane).
pub(crate) const MAX_HEAD_DIM: usize = 128;
/// Most (item, head) pairs per launch: both families put them on the grid's
/// y axis, which CUDA limits to 65,535 blocks.
pub(crate) const MAX_ITEM_HEADS: usize = 65_535;
/// Warps per block (`ATT_WARPS`).
const WARPS: usize = 4;
/// Keys (or queries) per streamed tile (`ATT_TILE`).
const TILE: usize = 32;
/// Query rows per warp in the forward.
const FWD_RPW: usize = 4;
/// Rows per warp in both backward kernels.
const BWD_RPW: usize = 2;

/// The kernels' `AttShape` (`cuda/attention_mask.cuh`), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttShape {
    n: i64,
    left: i64,
    right: i64,
    seed: u64,
    heads: i32,
    dh: i32,
    threshold: u32,
    scale: f32,
    keep_scale: f32,
    pad: u32,
}

// SAFETY: a plain `repr(C)` struct of scalars, laid out as the kernels' struct.
unsafe impl DeviceRepr for AttShape {}

/// The kernels' shape argument for problem `p`.
pub(crate) fn att_shape(p: &Problem) -> AttShape {
    let window = |w: Option<usize>| w.map_or(-1, |w| w.min(i64::MAX as usize) as i64);
    let (seed, threshold, keep_scale) = p
        .dropout
        .map_or((0, 0, 1.0), |d| (d.seed, d.threshold, d.keep_scale));
    AttShape {
        n: p.n as i64,
        left: window(p.left),
        right: window(p.right),
        seed,
        heads: p.h as i32,
        dh: p.dh as i32,
        threshold,
        scale: 1.0 / (p.dh as f32).sqrt(),
        keep_scale,
        pad: 0,
    }
}

/// Which kernels compute the core op.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kernels {
    /// `cuda/attention.cu`: f32 heads (half precision is converted first).
    CudaCores,
    /// `cuda/attention_tc.cu`: bf16 or f16 heads on tensor cores.
    TensorCores,
}

/// Attention of the interleaved `qkv` (B, N, 3*H*Dh) on a CUDA device, for
/// the validated problem `p`, by `kernels` (f32 `qkv` for the CUDA cores,
/// bf16 or f16 for the tensor cores): (B, N, H*Dh) in `qkv`'s dtype, as
/// [`super::attention::attention`].
pub(crate) fn attention(
    qkv: &Tensor,
    p: Problem,
    opts: &AttentionOptions,
    kernels: Kernels,
) -> Result<Tensor> {
    let (b, n, h, dh) = (p.b, p.n, p.h, p.dh);
    let (q, k, v) = crate::composed::attention_heads(qkv, opts)?;
    let core = Core {
        p,
        kernels,
        lse: Mutex::new(None),
    };
    let o = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, core)?;
    o.transpose(1, 2)?.reshape((b, n, h * dh))
}

/// The core op on (B, H, N, Dh) heads; owns the forward's row log-sum-exp.
struct Core {
    p: Problem,
    kernels: Kernels,
    lse: Mutex<Option<CudaSlice<f32>>>,
}

/// The inputs of a backward launch: the heads, the forward's output and its
/// gradient (contiguous, the problem's shape), the forward's row log-sum-exp.
pub(crate) struct GradInputs<'a> {
    /// Queries, keys, values.
    pub q: (&'a CudaStorage, &'a Layout),
    /// See `q`.
    pub k: (&'a CudaStorage, &'a Layout),
    /// See `q`.
    pub v: (&'a CudaStorage, &'a Layout),
    /// The forward's output.
    pub out: (&'a CudaStorage, &'a Layout),
    /// The output's gradient.
    pub dout: (&'a CudaStorage, &'a Layout),
    /// Each row's log-sum-exp.
    pub lse: &'a CudaSlice<f32>,
}

impl Core {
    /// The name of kernel `stem` for this head dimension.
    fn func(&self, stem: &str) -> String {
        format!("{stem}_{}", self.p.dh.div_ceil(32))
    }

    /// A launch of `rows_per_warp * WARPS` rows per block over every head,
    /// with `shared_floats` floats of shared memory.
    fn grid(&self, rows_per_warp: usize, shared_floats: usize) -> LaunchConfig {
        let rows = rows_per_warp * WARPS;
        LaunchConfig {
            grid_dim: (
                self.p.n.div_ceil(rows) as u32,
                (self.p.b * self.p.h) as u32,
                1,
            ),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: (shared_floats * 4) as u32,
        }
    }

    /// The CUDA-core forward: the output and each row's log-sum-exp.
    fn forward_f32(
        &self,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, CudaSlice<f32>)> {
        let op = "lcasr-attention-cuda";
        let (q, dev) = f32_view(qs, ql, op)?;
        let (k, _) = f32_view(ks, kl, op)?;
        let (v, _) = f32_view(vs, vl, op)?;
        let shared = (2 * TILE + WARPS * FWD_RPW) * (self.p.dh + 1);
        let (out, lse) = head_forward(
            dev,
            &self.p,
            &ATTENTION,
            (
                &self.func("lcasr_attention_fwd"),
                self.grid(FWD_RPW, shared),
            ),
            [&q, &k, &v],
        )?;
        Ok((storage(out, dev), lse))
    }

    /// The CUDA-core backward: dq, dk, dv packed, f32.
    fn backward_f32(&self, g: &GradInputs) -> Result<CudaStorage> {
        let op = "lcasr-attention-grad-cuda";
        let (q, dev) = f32_view(g.q.0, g.q.1, op)?;
        let (k, _) = f32_view(g.k.0, g.k.1, op)?;
        let (v, _) = f32_view(g.v.0, g.v.1, op)?;
        let (o, _) = f32_view(g.out.0, g.out.1, op)?;
        let (dout, _) = f32_view(g.dout.0, g.dout.1, op)?;
        let Problem { b, n, h, dh, .. } = self.p;
        let delta = row_deltas(
            dev,
            (&ATTENTION, "lcasr_attention_delta"),
            (&o, &dout),
            (b * h * n, dh),
        )?;
        let shared = (2 * TILE + 2 * WARPS * BWD_RPW) * (dh + 1);
        head_grads(
            dev,
            &self.p,
            &ATTENTION,
            [
                (
                    &self.func("lcasr_attention_bwd_dq"),
                    self.grid(BWD_RPW, shared),
                ),
                (
                    &self.func("lcasr_attention_bwd_dkv"),
                    self.grid(BWD_RPW, shared + 3 * TILE),
                ),
            ],
            [&q, &k, &v, &dout],
            (g.lse, &delta),
        )
    }
}

/// The output (in the heads' type) and each row's log-sum-exp, by the
/// forward kernel `func` of `module` (either family's: the same arguments)
/// launched with `cfg` on the heads q, k, v.
pub(crate) fn head_forward<T: DeviceRepr>(
    dev: &CudaDevice,
    p: &Problem,
    module: &Module,
    (func, cfg): (&str, LaunchConfig),
    [q, k, v]: [&CudaView<T>; 3],
) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
    let out = output_of::<T>(dev, p.b * p.h * p.n * p.dh)?;
    let lse = output(dev, p.b * p.h * p.n)?;
    let lengths = device_lengths(dev, &p.lengths)?;
    let shape = att_shape(p);
    // Reads B*H*N*Dh of q, k, v and B lengths; writes every row below N of
    // out (Dh values) and of lse.
    launch!(module, dev, func, cfg, q, k, v, &lengths, &out, &lse, &shape);
    Ok((out, lse))
}

/// dq, dk, dv packed (f32) by the dQ and the dK/dV kernels `launches` of
/// `module` (either family's: the same arguments) from the heads q, k, v,
/// the output's gradient, each row's log-sum-exp and delta.
pub(crate) fn head_grads<T: DeviceRepr>(
    dev: &CudaDevice,
    p: &Problem,
    module: &Module,
    launches: [(&str, LaunchConfig); 2],
    [q, k, v, dout]: [&CudaView<T>; 4],
    (lse, delta): (&CudaSlice<f32>, &CudaSlice<f32>),
) -> Result<CudaStorage> {
    let size = p.b * p.h * p.n * p.dh;
    let grads = output(dev, 3 * size)?;
    let lengths = device_lengths(dev, &p.lengths)?;
    let shape = att_shape(p);
    let dq = grads.slice(0..size);
    let dk = grads.slice(size..2 * size);
    let dv = grads.slice(2 * size..3 * size);
    let [(dq_func, dq_cfg), (dkv_func, dkv_cfg)] = launches;
    // Both read the heads, dout, lse and delta; they write every row of dq,
    // and of dk and dv.
    launch!(module, dev, dq_func, dq_cfg, q, k, v, dout, lse, delta, &lengths, &dq, &shape);
    launch!(module, dev, dkv_func, dkv_cfg, q, k, v, dout, lse, delta, &lengths, &dk, &dv, &shape);
    Ok(storage(grads, dev))
}

/// Each row's `delta = sum_d dO[d] * O[d]` by kernel `func` of `module`
/// (either family's, one warp per row), for `rows` rows of `dh` values.
pub(crate) fn row_deltas<T: DeviceRepr>(
    dev: &CudaDevice,
    (module, func): (&Module, &str),
    (out, dout): (&CudaView<T>, &CudaView<T>),
    (rows, dh): (usize, usize),
) -> Result<CudaSlice<f32>> {
    let delta = output(dev, rows)?;
    let (rows_arg, dh_arg) = (rows as i64, dh as i32);
    // One warp per row: reads rows x Dh of out and dout, writes rows of delta.
    launch!(
        module,
        dev,
        func,
        grid(rows * 32),
        out,
        dout,
        &delta,
        &rows_arg,
        &dh_arg
    );
    Ok(delta)
}

/// Checks that a head tensor has the problem's shape.
fn check(p: &Problem, l: &Layout, what: &str) -> Result<()> {
    if l.shape().dims() != [p.b, p.h, p.n, p.dh] {
        bail!(
            "attention (cuda): {what} has shape {:?}, expected {:?}",
            l.shape().dims(),
            [p.b, p.h, p.n, p.dh]
        );
    }
    Ok(())
}

impl CustomOp3 for Core {
    fn name(&self) -> &'static str {
        "lcasr-attention-cuda"
    }

    cuda_only_cpu_fwd!(3);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        for (l, what) in [(ql, "q"), (kl, "k"), (vl, "v")] {
            check(&self.p, l, what)?;
        }
        let (q, k, v) = ((qs, ql), (ks, kl), (vs, vl));
        let (out, lse) = match self.kernels {
            Kernels::CudaCores => self.forward_f32(q, k, v)?,
            Kernels::TensorCores => crate::attention_tc_cuda::forward(&self.p, q, k, v)?,
        };
        *self.lse.lock().expect("attention lse lock") = Some(lse);
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut dout = grad_res.contiguous()?;
        if matches!(self.kernels, Kernels::TensorCores)
            && dout.layout().start_offset() % crate::attention_tc_cuda::CHUNK != 0
        {
            // The tensor-core kernels read 16-byte chunks.
            dout = dout.copy()?;
        }
        let out = res.contiguous()?;
        let packed = q.apply_op3_no_bwd(
            k,
            v,
            &Grad {
                core: self,
                out: &out,
                dout: &dout,
            },
        )?;
        // The kernels write f32 gradients; the heads' dtype flows back.
        let size = q.elem_count();
        let part = |i: usize| -> Result<Tensor> {
            packed
                .narrow(0, i * size, size)?
                .reshape(q.shape())?
                .to_dtype(q.dtype())
        };
        Ok((Some(part(0)?), Some(part(1)?), Some(part(2)?)))
    }
}

/// The backward of [`Core`] as one op on (q, k, v): dq, dk, dv packed, f32.
struct Grad<'a> {
    core: &'a Core,
    out: &'a Tensor,
    dout: &'a Tensor,
}

/// The CUDA storage of a contiguous tensor, read-locked.
fn cuda_storage<'t>(
    t: &'t Tensor,
    what: &str,
) -> Result<(candle_core::StorageRef<'t>, &'t Layout)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cuda(_)) {
        bail!("attention (cuda): {what} is not on a CUDA device");
    }
    Ok((s, l))
}

impl CustomOp3 for Grad<'_> {
    fn name(&self) -> &'static str {
        "lcasr-attention-grad-cuda"
    }

    cuda_only_cpu_fwd!(3);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let core = self.core;
        let (os, ol) = cuda_storage(self.out, "the output")?;
        let (dos, dol) = cuda_storage(self.dout, "the output gradient")?;
        let (Storage::Cuda(os), Storage::Cuda(dos)) = (&*os, &*dos) else {
            bail!("{op}: expected CUDA storage");
        };
        for (l, what) in [(ql, "q"), (kl, "k"), (vl, "v"), (ol, "out"), (dol, "dout")] {
            check(&core.p, l, what)?;
        }
        let guard = core.lse.lock().expect("attention lse lock");
        let Some(lse) = guard.as_ref() else {
            bail!("{op}: backward before forward");
        };
        let inputs = GradInputs {
            q: (qs, ql),
            k: (ks, kl),
            v: (vs, vl),
            out: (os, ol),
            dout: (dos, dol),
            lse,
        };
        let grads = match core.kernels {
            Kernels::CudaCores => core.backward_f32(&inputs)?,
            Kernels::TensorCores => crate::attention_tc_cuda::backward(&core.p, &inputs)?,
        };
        let Problem { b, n, h, dh, .. } = core.p;
        Ok((grads, Shape::from(3 * b * h * n * dh)))
    }
}

/// The dropout factors (0 or 1/(1-p), by the kernels' hash) of query rows
/// `[i0, i0 + rows)` of every item and head against all `n` keys, as a
/// (B, H, rows, N) f32 tensor on `like`'s device (chunked attention).
pub(crate) fn dropout_mask(
    like: &Tensor,
    (b, h, i0, rows, n): (usize, usize, usize, usize, usize),
    (seed, threshold, keep_scale): (u64, u32, f32),
) -> Result<Tensor> {
    like.apply_op1_no_bwd(&DropoutMask {
        dims: (b, h, i0, rows, n),
        seed,
        threshold,
        keep_scale,
    })
}

/// Writes [`dropout_mask`]'s tensor; its input only names the device.
struct DropoutMask {
    dims: (usize, usize, usize, usize, usize),
    seed: u64,
    threshold: u32,
    keep_scale: f32,
}

impl candle_core::CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "lcasr-attention-dropout-mask-cuda"
    }

    cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &s.device;
        let (b, h, i0, rows, n) = self.dims;
        let total = b * h * rows * n;
        let out = output(dev, total)?;
        let (items, heads, i0, rows_arg, n_arg) =
            (b as i64, h as i32, i0 as i64, rows as i64, n as i64);
        // Writes each of the B*H*rows*N elements of `out` once.
        launch!(
            ATTENTION,
            dev,
            "lcasr_attention_dropout_mask",
            grid(total),
            &out,
            &items,
            &heads,
            &i0,
            &rows_arg,
            &n_arg,
            &self.seed,
            &self.threshold,
            &self.keep_scale
        );
        Ok((storage(out, dev), Shape::from((b, h, rows, n))))
    }
}
