//! Data parallelism across the GPUs of this machine over NCCL (the `nccl`
//! feature; `lcasr train --gpus N`): one process per GPU
//! (`crate::rank_processes`), each joining the group with the id rank 0 made
//! ([`unique_id`], [`join`]), so the data-parallel code that runs in CI on
//! CPU threads and processes drives the GPUs unchanged.
//!
//! The gradient buckets are summed on the GPU in place
//! ([`Collective::all_reduce_sum_tensor`]); the other exchanges take host
//! slices: the values go up to the rank's GPU, NCCL sums or broadcasts them
//! there, and they come back. NCCL's all-reduce hands every rank the same
//! values.
//!
//! A rank that fails mid-run would leave the others waiting in NCCL for
//! ever: rank 0's watcher of the worker processes calls
//! [`Collective::abort_group`] when a worker fails, which aborts rank 0's
//! communicator (its current or next exchange then fails with [`RankLeft`])
//! and the other workers are killed. A rank that ends normally finalises its
//! communicator (pending exchanges complete) and destroys it.
//!
//! Written without a multi-GPU machine to run it on: it builds and lints with
//! `--features nccl`; docs/gpu.md says what has run where.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::{result, sys};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};

use super::collective::{Collective, RankLeft};

/// A communicator handle (a pointer NCCL owns), movable between threads.
#[derive(Clone, Copy)]
struct Handle(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one at a time;
// it is used by its rank's thread (under `NcclComm::busy`), and only
// aborted from another.
unsafe impl Send for Handle {}

/// This process's rank of an NCCL group, on its own GPU.
pub struct NcclComm {
    rank: usize,
    world: usize,
    /// The rank's candle device.
    device: CudaDevice,
    /// The stream of the rank's candle device: exchanges run in order with
    /// its kernels.
    stream: Arc<CudaStream>,
    /// The communicator while it lives (taken out by an abort).
    comm: Mutex<Option<Handle>>,
    /// One exchange at a time.
    busy: Mutex<()>,
}

/// A fresh group id, hex-encoded for the other ranks' processes.
pub fn unique_id() -> Result<String> {
    let id = result::get_uniqueid().map_err(|e| nccl_error(e, "cannot make an NCCL group id"))?;
    let mut hex = String::with_capacity(2 * id.internal.len());
    for byte in id.internal {
        write!(hex, "{:02x}", byte as u8).expect("writing to a String");
    }
    Ok(hex)
}

/// Joins the group `id` ([`unique_id`]) as rank `rank` of `world` on
/// `device`. NCCL returns once every rank has joined; meanwhile `check` runs
/// every few milliseconds (it fails when another rank's process ended), and
/// after `timeout` the join is given up.
pub fn join(
    id: &str,
    rank: usize,
    world: usize,
    device: &Device,
    timeout: Duration,
    mut check: impl FnMut() -> Result<()>,
) -> Result<NcclComm> {
    let Device::Cuda(dev) = device else {
        bail!("rank {rank}: NCCL needs a CUDA device, got {device:?}");
    };
    let bytes: Vec<u8> = (0..id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(id.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| anyhow!("a malformed NCCL group id"))?;
    let mut unique = sys::ncclUniqueId { internal: [0; 128] };
    if bytes.len() != unique.internal.len() {
        bail!("an NCCL group id of {} bytes, expected 128", bytes.len());
    }
    for (dst, src) in unique.internal.iter_mut().zip(&bytes) {
        *dst = *src as _;
    }
    let stream = dev.cuda_stream();
    let ctx = Arc::clone(stream.context());
    // NCCL returns once all ranks have joined: wait on another thread, so a
    // rank that died before joining is noticed here.
    let joining = std::thread::spawn(move || -> Result<Handle> {
        ctx.bind_to_thread()
            .context("cannot make the rank's GPU current")?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is 128 bytes.
        unsafe { result::comm_init_rank(&mut comm, world as i32, unique, rank as i32) }
            .map_err(|e| nccl_error(e, "cannot join the NCCL group"))?;
        Ok(Handle(comm))
    });
    let deadline = Instant::now() + timeout;
    while !joining.is_finished() {
        check()?;
        if Instant::now() > deadline {
            bail!(
                "rank {rank}: the NCCL group did not form within {} s",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let handle = joining
        .join()
        .map_err(|_| anyhow!("rank {rank}: joining the NCCL group panicked"))??;
    Ok(NcclComm {
        rank,
        world,
        device: dev.clone(),
        stream,
        comm: Mutex::new(Some(handle)),
        busy: Mutex::new(()),
    })
}

/// An NCCL error as a message naming what failed.
fn nccl_error(e: result::NcclError, what: &str) -> anyhow::Error {
    anyhow!("{what}: NCCL error {:?}", e.0)
}

/// The NCCL type of a value type.
trait Value: DeviceRepr + Copy {
    const NCCL: sys::ncclDataType_t;
}

impl Value for f32 {
    const NCCL: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
}

impl Value for f64 {
    const NCCL: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat64;
}

/// Which exchange.
#[derive(Clone, Copy)]
enum Exchange {
    Sum,
    Broadcast { root: usize },
}

impl NcclComm {
    fn comm(&self) -> MutexGuard<'_, Option<Handle>> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This rank's communicator, or [`RankLeft`] once the group was aborted.
    fn handle(&self) -> Result<sys::ncclComm_t> {
        match *self.comm() {
            Some(h) => Ok(h.0),
            None => Err(RankLeft { rank: self.rank }.into()),
        }
    }

    /// Makes the rank's GPU current on this thread (NCCL works on the
    /// current device) and returns the communicator.
    fn begin(&self) -> Result<sys::ncclComm_t> {
        let comm = self.handle()?;
        self.stream
            .context()
            .bind_to_thread()
            .context("cannot make the rank's GPU current")?;
        Ok(comm)
    }

    /// Enqueues `exchange` of the `len` values of type T at `ptr` on this
    /// rank's GPU, in place, on the rank's stream.
    fn enqueue<T: Value>(
        &self,
        comm: sys::ncclComm_t,
        ptr: u64,
        len: usize,
        exchange: Exchange,
    ) -> Result<()> {
        let stream = self.stream.cu_stream() as _;
        // SAFETY: the caller hands `len` values of type T at `ptr` on this
        // rank's GPU, and `comm` is alive (an abort takes it out of
        // `self.comm` first).
        let done = unsafe {
            match exchange {
                Exchange::Sum => result::all_reduce(
                    ptr as _,
                    ptr as _,
                    len,
                    T::NCCL,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                ),
                Exchange::Broadcast { root } => {
                    result::broadcast(ptr as _, ptr as _, len, T::NCCL, root as i32, comm, stream)
                }
            }
        };
        done.map_err(|e| nccl_error(e, "NCCL exchange failed"))?;
        Ok(())
    }

    /// Waits for the rank's stream, then fails if the group was aborted
    /// meanwhile (another rank failed: the values are garbage).
    fn finish(&self) -> Result<()> {
        self.stream
            .synchronize()
            .context("the NCCL exchange did not complete")?;
        self.handle()?;
        Ok(())
    }

    /// `exchange` of `data` with the other ranks, through the GPU.
    fn exchange<T: Value>(&self, data: &mut [T], exchange: Exchange) -> Result<()> {
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let comm = self.begin()?;
        let s = &self.stream;
        let mut buf = s.clone_htod(data).context("cannot copy to the GPU")?;
        {
            let (ptr, _written) = buf.device_ptr_mut(s);
            self.enqueue::<T>(comm, ptr, data.len(), exchange)?;
        }
        s.memcpy_dtoh(&buf, data)
            .context("cannot copy from the GPU")?;
        self.finish()
    }
}

/// The in-place NCCL sum of a device tensor's storage (what
/// [`NcclComm::all_reduce_sum_tensor`] applies to its private copy).
struct DeviceSum<'a>(&'a NcclComm);

impl InplaceOp1 for DeviceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("the NCCL sum takes tensors on the rank's GPU")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL sum takes a contiguous tensor")
        };
        sum_in_place(self.0, storage, start, end)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
}

/// Sums values `start..end` of `storage` (f32, on `comm`'s GPU) over the
/// ranks, in place.
fn sum_in_place(
    comm: &NcclComm,
    storage: &mut CudaStorage,
    start: usize,
    end: usize,
) -> Result<()> {
    let handle = comm.begin()?;
    let slice = storage.as_cuda_slice_mut::<f32>()?;
    let mut view = slice.slice_mut(start..end);
    {
        let (ptr, _written) = view.device_ptr_mut(&comm.stream);
        comm.enqueue::<f32>(handle, ptr, end - start, Exchange::Sum)?;
    }
    comm.finish()
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        self.exchange(data, Exchange::Sum)
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        self.exchange(data, Exchange::Sum)
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            bail!("broadcast from rank {root} of a group of {}", self.world);
        }
        self.exchange(data, Exchange::Broadcast { root })
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(&mut [0f32], Exchange::Sum)
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().same_device(&Device::Cuda(self.device.clone())) {
            bail!(
                "rank {}: the NCCL sum takes tensors on the rank's GPU, got {:?}",
                self.rank,
                t.device()
            );
        }
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        // A private contiguous copy, summed in place: the gradients never
        // leave the GPU.
        let sum = t.to_dtype(DType::F32)?.contiguous()?.copy()?;
        sum.inplace_op1(&DeviceSum(self))?;
        Ok(sum)
    }

    fn abort_group(&self) {
        if let Some(h) = self.comm().take() {
            // SAFETY: the handle came from ncclCommInitRank and is taken out
            // of its slot, so it is aborted once; NCCL allows an abort while
            // another thread waits in an exchange on it.
            unsafe {
                let _ = result::comm_abort(h.0);
            }
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let Some(h) = self.comm().take() else {
            return; // aborted
        };
        // SAFETY: the handle is taken out of its slot: finalised and
        // destroyed once, after this rank's last exchange.
        unsafe {
            let _ = result::comm_finalize(h.0);
            let _ = result::comm_destroy(h.0);
        }
    }
}
