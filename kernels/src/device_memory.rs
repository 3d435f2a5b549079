//! Memory of a CUDA device as candle's tensors hold it: the device's default
//! stream-ordered memory pool, which candle allocates from. In use now and
//! the high-water mark (PyTorch's `memory_allocated` and
//! `max_memory_allocated`); nothing on the CPU.
//!
//! `LCASR_MEMORY_TRACE=1` makes [`trace`] print both at the points the
//! crate marks (the recomputing nodes' backward passes): where a long
//! sequence's backward pass spends its memory.

use std::sync::OnceLock;
use std::time::Instant;

use candle_core::Device;

/// Bytes allocated on `device` now and at most since the process started or
/// the last [`reset_high`]; `None` on the CPU or where the driver cannot tell.
pub fn usage(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return pool::usage(dev);
    }
    let _ = device;
    None
}

/// Starts a new high-water mark from the memory allocated now; false on the
/// CPU or where the driver refuses.
pub fn reset_high(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return pool::reset_high(dev);
    }
    let _ = device;
    false
}

/// When `LCASR_MEMORY_TRACE=1`: the time of the first trace.
fn tracing() -> Option<Instant> {
    static ON: OnceLock<Option<Instant>> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("LCASR_MEMORY_TRACE")
            .is_ok_and(|v| v == "1")
            .then(Instant::now)
    })
}

/// With `LCASR_MEMORY_TRACE=1`, prints `what` with the seconds since the
/// first trace and `device`'s memory in use and its high-water mark to
/// stderr (it synchronises the device); nothing otherwise, or on the CPU.
pub fn trace(what: impl FnOnce() -> String, device: &Device) {
    let Some(start) = tracing() else {
        return;
    };
    if let Some((now, high)) = usage(device) {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        eprintln!(
            "[memory {:7.2} s] {}: {:.0} MiB in use, {:.0} MiB at most",
            start.elapsed().as_secs_f64(),
            what(),
            mib(now),
            mib(high)
        );
    }
}

/// The default memory pool's attributes.
#[cfg(feature = "cuda")]
mod pool {
    use candle_core::backend::BackendDevice;
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::CudaDevice;

    use sys::CUmemPool_attribute::{
        CU_MEMPOOL_ATTR_USED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_HIGH,
    };

    fn default_pool(dev: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let stream = dev.cuda_stream();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: writes the pool handle of a device the context was made for.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, stream.context().cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    fn attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let mut bytes: u64 = 0;
        // SAFETY: both attributes are cuuint64_t values written to `bytes`.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut bytes as *mut u64).cast()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(bytes)
    }

    pub(super) fn usage(dev: &CudaDevice) -> Option<(u64, u64)> {
        dev.synchronize().ok()?;
        let pool = default_pool(dev)?;
        Some((
            attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        ))
    }

    pub(super) fn reset_high(dev: &CudaDevice) -> bool {
        if dev.synchronize().is_err() {
            return false;
        }
        let Some(pool) = default_pool(dev) else {
            return false;
        };
        // The driver accepts only 0: "reset to the memory in use now".
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute read from `zero`.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        };
        r == sys::CUresult::CUDA_SUCCESS
    }
}
