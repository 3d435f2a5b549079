//! Fused kernels for lcasr: each op has a forward and a backward pass and is
//! exposed as a candle custom op. The kernels run on CPU, and those with a
//! CUDA version (`cuda/*.cu`, the `cuda` feature: attention, the
//! convolutions, BatchRenorm, GLU, LayerNorm, RMSNorm, the CTC loss) on CUDA
//! devices; elsewhere each op
//! runs as its composition of candle ops ([`composed`]), recomputed in the
//! backward so that it keeps no more memory than a kernel.

pub mod activation;
pub mod attention;
#[cfg(feature = "cuda")]
mod attention_cuda;
#[cfg(feature = "flash-attn")]
mod attention_flash;
#[cfg(feature = "cuda")]
mod attention_tc_cuda;
pub mod backward;
pub mod batch_renorm;
pub mod composed;
pub mod conv2d;
#[cfg(feature = "cuda")]
mod conv_cuda;
mod cpu_f32;
pub mod ctc;
#[cfg(feature = "cuda")]
mod ctc_cuda;
#[cfg(feature = "cuda")]
mod cuda;
pub mod depthwise_conv;
pub mod device_memory;
pub mod glu;
#[cfg(feature = "cuda")]
pub mod kernel_profile;
pub mod norm;
#[cfg(feature = "cuda")]
mod norm_cuda;
mod recompute;
pub mod rotary;
pub mod softmax;
#[cfg(feature = "cuda")]
mod softmax_cuda;
pub mod storage_copy;

use std::cell::Cell;

use candle_core::Tensor;

thread_local! {
    static FORCE_COMPOSED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every fused op of this thread taking its [`composed`] path,
/// as it does on a device without native kernels: the way to test that path
/// (the one a GPU takes today) on the CPU.
pub fn with_composed_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCE_COMPOSED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCE_COMPOSED.with(|c| c.replace(true)));
    f()
}

/// True when the fused kernel of an op on `t` runs: `t` is on the CPU and
/// [`with_composed_ops`] is not in force.
pub(crate) fn native(t: &Tensor) -> bool {
    t.device().is_cpu() && !FORCE_COMPOSED.with(Cell::get)
}

/// True for bf16 and f16 tensors: the CPU kernels are f32, so off CUDA (and
/// on CUDA for the ops whose kernels are f32) mixed precision runs the ops'
/// compositions (which compute norms, softmax and statistics in f32, as
/// autocast does).
pub(crate) fn half(t: &Tensor) -> bool {
    matches!(
        t.dtype(),
        candle_core::DType::BF16 | candle_core::DType::F16
    )
}

/// True when the CUDA kernel of an op that has one runs: a `cuda` build, `t`
/// f32 on a CUDA device, and [`with_composed_ops`] not in force.
pub(crate) fn native_cuda(t: &Tensor) -> bool {
    cuda_kernels(t) && t.dtype() == candle_core::DType::F32
}

/// True when `t` is on a CUDA device of a `cuda` build and
/// [`with_composed_ops`] is not in force: the ops whose CUDA kernels take
/// bf16 and f16 too (the convolutions, GLU, the norms, the CTC loss;
/// attention computes them in f32) then run them.
pub(crate) fn cuda_kernels(t: &Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda() && !FORCE_COMPOSED.with(Cell::get)
}
