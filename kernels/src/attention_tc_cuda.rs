//! Attention on tensor cores (`cuda/attention_tc.cu`) for bf16 and f16
//! heads: the algorithm of the CUDA-core kernels (row log-sum-exp kept,
//! probabilities recomputed in the backward; memory linear in the sequence
//! length) with every product on `mma.sync` in the input type, accumulating
//! in f32. Head dims 32, 64, 96 and 128, compute capability 8.0 or newer.
//! [`crate::attention_cuda`] holds the op; this module launches its kernels.
//!
//! The default for half-precision attention on a GPU (verified on an H100 by
//! `gpu_parity`); `LCASR_ATTENTION_TC=0` selects the CUDA-core kernels
//! instead. The kernels are also checked on the CPU under an emulation of
//! CUDA (`tests/cuda_emu`, `tests/cuda_emulated.rs`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, Device, Layout, Result, Tensor};

use super::attention::Problem;
use crate::attention_cuda::{head_forward, head_grads, row_deltas, GradInputs};
use crate::cuda::{storage, view, with_act, Act, ATTENTION_TC};

/// The head dims the kernels are compiled for.
const HEAD_DIMS: [usize; 4] = [32, 64, 96, 128];
/// Rows (queries or keys) per block: 4 warps of 16.
const BLOCK_ROWS: u32 = 64;
/// Threads per block.
const THREADS: u32 = 128;

/// Whether tensor cores may take half-precision attention (where
/// [`unsupported`] finds nothing against them): yes unless
/// `LCASR_ATTENTION_TC=0` turns them off.
pub(crate) fn enabled() -> Result<bool> {
    crate::cuda::env_switch("LCASR_ATTENTION_TC", "tensor cores")
}

/// Why the kernels cannot take `qkv` with `head_dim`, if they cannot.
pub(crate) fn unsupported(qkv: &Tensor, head_dim: usize) -> Result<Option<String>> {
    Ok(if !qkv.device().is_cuda() || !crate::half(qkv) {
        Some(format!(
            "attention on tensor cores takes bf16 or f16 on a CUDA device, got {:?} on {:?}",
            qkv.dtype(),
            qkv.device().location()
        ))
    } else if !HEAD_DIMS.contains(&head_dim) {
        Some(format!(
            "attention on tensor cores: head dim {head_dim} is not one of {HEAD_DIMS:?}"
        ))
    } else if !sm80_or_newer(qkv)? {
        Some("attention on tensor cores needs a GPU of compute capability 8.0 or newer".into())
    } else {
        None
    })
}

/// Whether `t` is on a CUDA device of compute capability 8.0 or newer (the
/// bf16 `mma.sync` shapes the kernels use).
pub(crate) fn sm80_or_newer(t: &Tensor) -> Result<bool> {
    let Device::Cuda(dev) = t.device() else {
        return Ok(false);
    };
    let (major, _) = dev.cuda_stream().context().compute_capability().w()?;
    Ok(major >= 8)
}

/// Kernel `stem` for input type `T` and `p`'s head dim.
fn func<T: Act>(p: &Problem, stem: &str) -> String {
    format!("{stem}_{}_{}", T::SUFFIX, p.dh)
}

/// One block per 64 rows of every head.
fn blocks(p: &Problem) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((p.n as u32).div_ceil(BLOCK_ROWS), (p.b * p.h) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Values per 16-byte chunk, the unit in which the kernels read a head.
pub(crate) const CHUNK: usize = 8;

/// An error unless `T` is a 16-bit float (the kernels' inputs) and every
/// input starts on a 16-byte boundary (an offset that is a multiple of
/// [`CHUNK`] values; allocations themselves are aligned).
fn check_inputs<T: Act>(layouts: &[&Layout]) -> Result<()> {
    if std::mem::size_of::<T>() != 2 {
        bail!(
            "attention on tensor cores takes bf16 or f16 heads, got {}",
            T::SUFFIX
        );
    }
    if let Some(l) = layouts.iter().find(|l| l.start_offset() % CHUNK != 0) {
        bail!(
            "attention on tensor cores: an input starts at offset {}, not a multiple of {CHUNK}",
            l.start_offset()
        );
    }
    Ok(())
}

/// The forward on the (B, H, N, Dh) heads of problem `p`: the output (in
/// the heads' dtype) and each row's log-sum-exp.
pub(crate) fn forward(
    p: &Problem,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    with_act!(q.0.dtype(), "lcasr-attention-tc", T => forward_typed::<T>(p, q, k, v))
}

fn forward_typed<T: Act>(
    p: &Problem,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    check_inputs::<T>(&[ql, kl, vl])?;
    let op = "lcasr-attention-tc";
    let q = view::<T>(qs, ql, op)?;
    let k = view::<T>(ks, kl, op)?;
    let v = view::<T>(vs, vl, op)?;
    let dev = &qs.device;
    let (out, lse) = head_forward(
        dev,
        p,
        &ATTENTION_TC,
        (&func::<T>(p, "lcasr_attention_tc_fwd"), blocks(p)),
        [&q, &k, &v],
    )?;
    Ok((storage(out, dev), lse))
}

/// The backward of problem `p`: dq, dk, dv packed, f32.
pub(crate) fn backward(p: &Problem, g: &GradInputs) -> Result<CudaStorage> {
    with_act!(g.q.0.dtype(), "lcasr-attention-tc-grad", T => backward_typed::<T>(p, g))
}

fn backward_typed<T: Act>(p: &Problem, g: &GradInputs) -> Result<CudaStorage> {
    check_inputs::<T>(&[g.q.1, g.k.1, g.v.1, g.out.1, g.dout.1])?;
    let op = "lcasr-attention-tc-grad";
    let q = view::<T>(g.q.0, g.q.1, op)?;
    let k = view::<T>(g.k.0, g.k.1, op)?;
    let v = view::<T>(g.v.0, g.v.1, op)?;
    let o = view::<T>(g.out.0, g.out.1, op)?;
    let dout = view::<T>(g.dout.0, g.dout.1, op)?;
    let dev = &g.q.0.device;
    let delta = row_deltas(
        dev,
        (
            &ATTENTION_TC,
            &format!("lcasr_attention_tc_delta_{}", T::SUFFIX),
        ),
        (&o, &dout),
        (p.b * p.h * p.n, p.dh),
    )?;
    head_grads(
        dev,
        p,
        &ATTENTION_TC,
        [
            (&func::<T>(p, "lcasr_attention_tc_bwd_dq"), blocks(p)),
            (&func::<T>(p, "lcasr_attention_tc_bwd_dkv"), blocks(p)),
        ],
        [&q, &k, &v, &dout],
        (g.lse, &delta),
    )
}
