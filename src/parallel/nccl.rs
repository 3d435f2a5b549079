//! Data parallelism across the GPUs of this machine over NCCL (the `nccl`
//! feature; `lcasr train --gpus N`): one communicator per GPU, made together
//! in this process (`ncclCommInitAll`), each driven by its rank's thread, so
//! the data-parallel code that runs in CI on CPU threads
//! ([`super::InProcessGroup`]) drives the GPUs unchanged.
//!
//! The exchanges take host slices, as every [`Collective`] does: the values
//! go up to the rank's GPU, NCCL sums or broadcasts them there, and they come
//! back (the optimizers update on the host today). NCCL's all-reduce hands
//! every rank the same values.
//!
//! A rank that fails mid-run would leave the others waiting in NCCL forever;
//! [`Collective::abort_group`] (called by the rank runner when a rank fails)
//! aborts every communicator of the group, so the others' next (or current)
//! exchange fails with [`RankLeft`] naming the failed rank. A rank that ends
//! normally finalises its communicator (pending exchanges complete) and
//! destroys it.
//!
//! Written without a multi-GPU machine to run it on: it builds and lints with
//! `--features nccl`; docs/gpu.md says what has run where.

use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::{result, sys};
use candle_core::Device;

use super::collective::{Collective, RankLeft};

/// A communicator handle (a pointer NCCL owns), movable between threads.
#[derive(Clone, Copy)]
struct Handle(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one at a time;
// each is used by its own rank's thread (under `NcclComm::busy`), and only
// aborted from another.
unsafe impl Send for Handle {}

/// What the ranks of a group share: their communicators while they live, and
/// the first rank that failed.
struct Shared {
    comms: Mutex<Vec<Option<Handle>>>,
    failed: Mutex<Option<usize>>,
}

impl Shared {
    fn comms(&self) -> MutexGuard<'_, Vec<Option<Handle>>> {
        self.comms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Aborts every communicator still alive, after `rank` failed.
    fn abort_all(&self, rank: usize) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(rank);
        for slot in self.comms().iter_mut() {
            if let Some(h) = slot.take() {
                // SAFETY: the handle came from ncclCommInitAll and is taken
                // out of its slot, so it is aborted once; NCCL allows an
                // abort while another thread waits in an exchange on it.
                unsafe {
                    let _ = result::comm_abort(h.0);
                }
            }
        }
    }
}

/// One rank's NCCL communicator, on its own GPU.
pub struct NcclComm {
    rank: usize,
    world: usize,
    /// The stream of the rank's candle device: exchanges run in order with
    /// its kernels.
    stream: Arc<CudaStream>,
    shared: Arc<Shared>,
    /// One exchange at a time.
    busy: Mutex<()>,
}

/// One communicator per device of `devices` (distinct CUDA devices), rank `r`
/// on `devices[r]`.
pub fn nccl_group(devices: &[Device]) -> Result<Vec<NcclComm>> {
    if devices.is_empty() {
        bail!("an NCCL group needs at least one GPU");
    }
    let mut streams = Vec::with_capacity(devices.len());
    let mut ordinals = Vec::with_capacity(devices.len());
    for (rank, device) in devices.iter().enumerate() {
        let Device::Cuda(dev) = device else {
            bail!("rank {rank}: NCCL needs a CUDA device, got {device:?}");
        };
        let stream = dev.cuda_stream();
        let ordinal = stream.context().ordinal() as i32;
        if ordinals.contains(&ordinal) {
            bail!("GPU {ordinal} is given to two ranks: NCCL needs one GPU per rank");
        }
        ordinals.push(ordinal);
        streams.push(stream);
    }
    let n = devices.len();
    let mut raw: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); n];
    // SAFETY: `raw` has room for one communicator per device of `ordinals`.
    unsafe { result::comm_init_all(raw.as_mut_ptr(), n as i32, ordinals.as_ptr()) }
        .map_err(|e| nccl_error(e, "cannot set up NCCL over the GPUs"))
        .with_context(|| format!("GPUs {ordinals:?}"))?;
    let shared = Arc::new(Shared {
        comms: Mutex::new(raw.into_iter().map(|c| Some(Handle(c))).collect()),
        failed: Mutex::new(None),
    });
    Ok(streams
        .into_iter()
        .enumerate()
        .map(|(rank, stream)| NcclComm {
            rank,
            world: n,
            stream,
            shared: Arc::clone(&shared),
            busy: Mutex::new(()),
        })
        .collect())
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
    /// This rank's communicator, or [`RankLeft`] once the group was aborted.
    fn handle(&self) -> Result<sys::ncclComm_t> {
        match self.shared.comms()[self.rank] {
            Some(h) => Ok(h.0),
            None => {
                let failed = *self.shared.failed.lock().unwrap_or_else(|e| e.into_inner());
                Err(RankLeft {
                    rank: failed.unwrap_or(self.rank),
                }
                .into())
            }
        }
    }

    /// `exchange` of `data` with the other ranks, through the GPU.
    fn exchange<T: Value>(&self, data: &mut [T], exchange: Exchange) -> Result<()> {
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let comm = self.handle()?;
        let s = &self.stream;
        // NCCL works on the calling thread's current device: this rank's.
        s.context()
            .bind_to_thread()
            .context("cannot make the rank's GPU current")?;
        let mut buf = s.clone_htod(data).context("cannot copy to the GPU")?;
        {
            let (ptr, _written) = buf.device_ptr_mut(s);
            let stream = s.cu_stream() as _;
            // SAFETY: `ptr` holds `data.len()` values of type T on this
            // rank's GPU, and `comm` is alive (aborted only through `shared`).
            let done = unsafe {
                match exchange {
                    Exchange::Sum => result::all_reduce(
                        ptr as _,
                        ptr as _,
                        data.len(),
                        T::NCCL,
                        sys::ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    ),
                    Exchange::Broadcast { root } => result::broadcast(
                        ptr as _,
                        ptr as _,
                        data.len(),
                        T::NCCL,
                        root as i32,
                        comm,
                        stream,
                    ),
                }
            };
            done.map_err(|e| nccl_error(e, "NCCL exchange failed"))?;
        }
        s.memcpy_dtoh(&buf, data)
            .context("cannot copy from the GPU")?;
        s.synchronize()
            .context("the NCCL exchange did not complete")?;
        // An abort meanwhile (another rank failed) makes the values garbage.
        self.handle()?;
        Ok(())
    }
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

    fn abort_group(&self) {
        self.shared.abort_all(self.rank);
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let Some(h) = self.shared.comms()[self.rank].take() else {
            return; // aborted with the group
        };
        // SAFETY: the handle is taken out of its slot: finalised and
        // destroyed once, after this rank's last exchange.
        unsafe {
            let _ = result::comm_finalize(h.0);
            let _ = result::comm_destroy(h.0);
        }
    }
}
