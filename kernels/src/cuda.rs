//! Launching this crate's CUDA kernels (`cuda/*.cu`, compiled to PTX by the
//! build script) on candle's CUDA storage. Built with the `cuda` feature only.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{bail, CudaStorage, Layout, Result};

/// The PTX of `cuda/attention.cu`.
pub(crate) const ATTENTION: Module = Module {
    name: "lcasr-attention",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
};

/// The PTX of `cuda/attention_tc.cu`.
pub(crate) const ATTENTION_TC: Module = Module {
    name: "lcasr-attention-tc",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/attention_tc.ptx")),
};

/// The PTX of `cuda/conv.cu`.
pub(crate) const CONV: Module = Module {
    name: "lcasr-conv",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/conv.ptx")),
};

/// The PTX of `cuda/ctc.cu`.
pub(crate) const CTC: Module = Module {
    name: "lcasr-ctc",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/ctc.ptx")),
};

/// The PTX of `cuda/renorm.cu`.
pub(crate) const RENORM: Module = Module {
    name: "lcasr-renorm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/renorm.ptx")),
};

/// The PTX of `cuda/softmax.cu`.
pub(crate) const SOFTMAX: Module = Module {
    name: "lcasr-softmax",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx")),
};

/// The PTX of `cuda/glu.cu`.
pub(crate) const GLU: Module = Module {
    name: "lcasr-glu",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/glu.ptx")),
};

/// The PTX of `cuda/norm.cu`.
pub(crate) const NORM: Module = Module {
    name: "lcasr-norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/norm.ptx")),
};

/// One compiled `.cu` file.
pub(crate) struct Module {
    name: &'static str,
    ptx: &'static str,
}

impl Module {
    /// Kernel `func` of this module on `dev` (loaded once per device).
    pub(crate) fn func(&self, dev: &CudaDevice, func: &str) -> Result<CudaFunction> {
        Ok(dev
            .get_or_load_custom_func(func, self.name, self.ptx)?
            .into_cuda_function())
    }
}

/// An on/off switch in the environment: `name` unset, empty or `1` is on
/// (the default), `0` off; anything else an error naming the variable and
/// saying that 1 turns `what` on.
pub(crate) fn env_switch(name: &str, what: &str) -> Result<bool> {
    match std::env::var(name) {
        Err(_) => Ok(true),
        Ok(v) => match v.trim() {
            "1" | "" => Ok(true),
            "0" => Ok(false),
            _ => bail!("{name}={v:?}: expected 1 ({what}, the default) or 0"),
        },
    }
}

/// The contiguous `T` values of `s` described by `l`.
pub(crate) fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: expected a contiguous input")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// The contiguous f32 values of `s` described by `l`, and their device.
pub(crate) fn f32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<(CudaView<'a, f32>, &'a CudaDevice)> {
    Ok((view::<f32>(s, l, op)?, s.device()))
}

/// A fresh device buffer of `len` values, each written by the kernel that
/// receives it.
pub(crate) fn output_of<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel before it is read.
    unsafe { dev.alloc::<T>(len) }
}

/// [`output_of`] f32 values.
pub(crate) fn output(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    output_of::<f32>(dev, len)
}

/// A grid-stride launch over `elems` work items.
pub(crate) fn grid(elems: usize) -> LaunchConfig {
    const THREADS: u32 = 256;
    let blocks = elems.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Per-item lengths (valid frames) as the kernels' `int` buffer on `dev`.
pub(crate) fn device_lengths(dev: &CudaDevice, lengths: &[usize]) -> Result<CudaSlice<i32>> {
    let v: Vec<i32> = lengths.iter().map(|&l| l as i32).collect();
    dev.clone_htod(&v)
}

/// Most partial sums a reduction over rows is split into (one block each).
const MAX_ROW_PARTS: usize = 256;

/// How a reduction over `rows` rows splits into per-block partial sums:
/// (rows per part, number of parts).
pub(crate) fn row_parts(rows: usize) -> (usize, usize) {
    let per = rows.div_ceil(MAX_ROW_PARTS).max(1);
    (per, rows.div_ceil(per).max(1))
}

/// One block of `threads` threads per item of `blocks` (at least one block).
pub(crate) fn block_grid(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Which part of a backward split into two ops on (x, weight, dy) one op
/// computes (the convolutions', the norms'): each part skips the other's work.
#[derive(Clone, Copy)]
pub(crate) enum GradPart {
    /// The input gradient, in the activations' dtype.
    Input,
    /// Per-block partial sums of the weight (and bias) gradients, in f32.
    Params,
}

/// Launches kernel `$func` of `$module` on `$dev` with `$cfg` and the
/// arguments, mapping a launch failure to a candle error (timed with
/// `LCASR_KERNEL_PROFILE=1`, [`crate::kernel_profile`]).
///
/// Every kernel of this crate reads within the buffers whose sizes its
/// integer arguments describe and writes each element of its outputs once;
/// callers pass arguments that hold to that.
macro_rules! launch {
    ($module:expr, $dev:expr, $func:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name = $func;
        let f = $module.func($dev, name)?;
        let stream = $dev.cuda_stream();
        let timing = $crate::kernel_profile::start(&stream)?;
        let mut args = stream.launch_builder(&f);
        $(args.arg($arg);)+
        // SAFETY: see the macro's documentation.
        unsafe { args.launch($cfg) }.w()?;
        $crate::kernel_profile::finish(timing, name, &stream)?;
    }};
}
pub(crate) use launch;

/// The `cpu_fwd` of a custom op that runs on CUDA devices only (the CPU
/// computes the same thing in another op): an error naming the op. The
/// argument is the op's arity (1 to 3).
macro_rules! cuda_only_cpu_fwd {
    (1) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{}: runs on CUDA devices only", self.name())
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{}: runs on CUDA devices only", self.name())
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{}: runs on CUDA devices only", self.name())
        }
    };
}
pub(crate) use cuda_only_cpu_fwd;

/// Wraps a kernel's output as candle storage on `dev`.
pub(crate) fn storage<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// An activation dtype the kernels take, and the suffix of their names.
pub(crate) trait Act: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}

impl Act for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Act for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

impl Act for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// Runs `$body` with `$t` the [`Act`] type of `$dtype` (an error for others).
macro_rules! with_act {
    ($dtype:expr, $op:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            d => candle_core::bail!("{}: activations must be f32, bf16 or f16, got {d:?}", $op),
        }
    };
}
pub(crate) use with_act;

/// Kernel `base` for activations of type `T`.
pub(crate) fn kernel<T: Act>(base: &str) -> String {
    format!("{base}_{}", T::SUFFIX)
}
