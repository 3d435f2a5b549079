//! The communication a data-parallel run needs, behind a small trait, and its
//! in-process implementation: ranks are threads of one process, which is what
//! the CPU tests run (a GPU backend implements the same trait).
//!
//! Every rank makes the same calls in the same order with the same lengths.
//! The in-process group checks that and fails every rank with a clear error
//! otherwise; a rank that leaves the group (its thread ended, by error or
//! panic) makes every pending and later call of the others fail instead of
//! waiting for ever.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};

/// Collective operations over the ranks of a data-parallel group.
pub trait Collective: Send + Sync {
    /// This rank, from 0.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `data` by the element-wise sum of every rank's `data`; every
    /// rank receives bit-identical values.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    /// [`Collective::all_reduce_sum`] in f64 (statistics, loss totals).
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()>;
    /// Replaces `data` on every rank by rank `root`'s `data`.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// The element-wise sum over the ranks of every rank's f32 tensor `t`
    /// (same shape everywhere), on `t`'s device; every rank receives the same
    /// values. By default through the host with [`Collective::all_reduce_sum`];
    /// NCCL sums the device buffer in place.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut values = t
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        self.all_reduce_sum(&mut values)?;
        Ok(Tensor::from_vec(values, t.shape(), t.device())?)
    }
    /// Called when this rank failed: makes the other ranks' exchanges fail
    /// with [`RankLeft`] instead of waiting for it. The in-process group
    /// needs nothing (a communicator dropped mid-run does that); NCCL's
    /// communicators are aborted.
    fn abort_group(&self) {}
}

/// Raised on the remaining ranks when a rank leaves the group mid-run (the
/// first rank that left is named); the leaving rank's own error is the one
/// worth reporting.
#[derive(Debug, thiserror::Error)]
#[error("rank {rank} left the data-parallel group (it failed or stopped early)")]
pub struct RankLeft {
    /// The rank that left.
    pub rank: usize,
}

impl RankLeft {
    /// Whether an error message (e.g. a script failure's, which keeps only
    /// the text) reports that some rank left the group, rather than a
    /// failure of the rank's own.
    pub fn is_reported_in(message: &str) -> bool {
        message.contains("left the data-parallel group")
    }
}

/// What one rank brings to a collective call.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// Only the length: a non-root rank of a broadcast, or a barrier.
    Len(usize),
}

impl Payload {
    /// Number of values (or the announced length).
    pub(crate) fn len(&self) -> usize {
        match self {
            Payload::F32(v) => v.len(),
            Payload::F64(v) => v.len(),
            Payload::Len(n) => *n,
        }
    }
}

/// The kind of a collective call, to check that all ranks agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    SumF32,
    SumF64,
    Broadcast(usize),
    Barrier,
}

/// The group's shared state.
#[derive(Default)]
struct State {
    /// Completed collective calls.
    generation: u64,
    /// Contributions to the call in progress, by rank.
    slots: Vec<Option<(Kind, Payload)>>,
    /// The result of the last completed call.
    result: Option<Arc<std::result::Result<Payload, String>>>,
    /// Ranks whose communicator was dropped, in the order they left.
    left: Vec<usize>,
}

/// State shared by the communicators of one group.
struct Shared {
    state: Mutex<State>,
    done: Condvar,
    world: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only ever happens between complete
        // updates; the state stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Factory of the communicators of an in-process group.
pub struct InProcessGroup;

impl InProcessGroup {
    /// The `n` communicators of a new group (ranks 0..n), one per thread.
    /// Sums are taken in rank order, so every rank gets the same bits.
    pub fn with_ranks(n: usize) -> Result<Vec<InProcessComm>> {
        if n == 0 {
            bail!("a data-parallel group needs at least one rank");
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                slots: vec![None; n],
                ..State::default()
            }),
            done: Condvar::new(),
            world: n,
        });
        Ok((0..n)
            .map(|rank| InProcessComm {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect())
    }
}

/// One rank's end of an [`InProcessGroup`]. Dropping it leaves the group.
pub struct InProcessComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl InProcessComm {
    /// Takes part in one collective call and returns its result.
    fn exchange(&self, kind: Kind, payload: Payload) -> Result<Payload> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        if let Some(&rank) = st.left.first() {
            return Err(RankLeft { rank }.into());
        }
        let generation = st.generation;
        st.slots[self.rank] = Some((kind, payload));
        if st.slots.iter().all(Option::is_some) {
            let calls: Vec<(Kind, Payload)> =
                st.slots.iter_mut().filter_map(Option::take).collect();
            st.result = Some(Arc::new(combine(&calls)));
            st.generation += 1;
            shared.done.notify_all();
        } else {
            while st.generation == generation {
                if let Some(&rank) = st.left.first() {
                    return Err(RankLeft { rank }.into());
                }
                st = shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        // Nobody can start the next call before this rank has returned, so
        // the stored result is this call's.
        let result = st
            .result
            .clone()
            .expect("a completed call stores its result");
        drop(st);
        match &*result {
            Ok(p) => Ok(p.clone()),
            Err(e) => Err(anyhow!("{e}")),
        }
    }
}

/// The result of a call from every rank's contribution, in rank order.
pub(crate) fn combine(calls: &[(Kind, Payload)]) -> std::result::Result<Payload, String> {
    let (kind, first) = &calls[0];
    for (rank, (k, p)) in calls.iter().enumerate().skip(1) {
        if k != kind || p.len() != first.len() {
            return Err(format!(
                "collective calls disagree: rank 0 called {kind:?} with {} values, \
                 rank {rank} called {k:?} with {} values",
                first.len(),
                p.len()
            ));
        }
    }
    match kind {
        Kind::SumF32 => {
            let mut total = Vec::new();
            for (rank, (_, p)) in calls.iter().enumerate() {
                let Payload::F32(v) = p else {
                    return Err(format!("rank {rank} sent no f32 values to a sum"));
                };
                if rank == 0 {
                    total = v.clone();
                } else {
                    total.iter_mut().zip(v).for_each(|(t, x)| *t += x);
                }
            }
            Ok(Payload::F32(total))
        }
        Kind::SumF64 => {
            let mut total = Vec::new();
            for (rank, (_, p)) in calls.iter().enumerate() {
                let Payload::F64(v) = p else {
                    return Err(format!("rank {rank} sent no f64 values to a sum"));
                };
                if rank == 0 {
                    total = v.clone();
                } else {
                    total.iter_mut().zip(v).for_each(|(t, x)| *t += x);
                }
            }
            Ok(Payload::F64(total))
        }
        Kind::Broadcast(root) => match calls.get(*root) {
            Some((_, p @ Payload::F32(_))) => Ok(p.clone()),
            _ => Err(format!(
                "broadcast from rank {root}: no such rank in a group of {}",
                calls.len()
            )),
        },
        Kind::Barrier => Ok(Payload::Len(0)),
    }
}

/// A group member that takes part in a call by handing over its whole
/// payload and receiving the combined result ([`combine`]): the in-process
/// group and the TCP group of `super::tcp`. [`Collective`]'s operations
/// follow from it ([`exchanges_via_payloads!`]).
pub(crate) trait PayloadExchange {
    /// Takes part in one collective call and returns its result.
    fn exchange(&self, kind: Kind, payload: Payload) -> Result<Payload>;
}

/// [`Collective::all_reduce_sum`] over a [`PayloadExchange`].
pub(crate) fn sum_f32(ex: &impl PayloadExchange, data: &mut [f32]) -> Result<()> {
    match ex.exchange(Kind::SumF32, Payload::F32(data.to_vec()))? {
        Payload::F32(v) => data.copy_from_slice(&v),
        _ => bail!("all_reduce_sum: the group returned no f32 values"),
    }
    Ok(())
}

/// [`Collective::all_reduce_sum_f64`] over a [`PayloadExchange`].
pub(crate) fn sum_f64(ex: &impl PayloadExchange, data: &mut [f64]) -> Result<()> {
    match ex.exchange(Kind::SumF64, Payload::F64(data.to_vec()))? {
        Payload::F64(v) => data.copy_from_slice(&v),
        _ => bail!("all_reduce_sum_f64: the group returned no f64 values"),
    }
    Ok(())
}

/// [`Collective::broadcast`] over a [`PayloadExchange`] whose rank is `rank`.
pub(crate) fn broadcast_from(
    ex: &impl PayloadExchange,
    rank: usize,
    data: &mut [f32],
    root: usize,
) -> Result<()> {
    let payload = if rank == root {
        Payload::F32(data.to_vec())
    } else {
        Payload::Len(data.len())
    };
    match ex.exchange(Kind::Broadcast(root), payload)? {
        Payload::F32(v) => data.copy_from_slice(&v),
        _ => bail!("broadcast: the group returned no values"),
    }
    Ok(())
}

/// [`Collective::barrier`] over a [`PayloadExchange`].
pub(crate) fn barrier_of(ex: &impl PayloadExchange) -> Result<()> {
    ex.exchange(Kind::Barrier, Payload::Len(0)).map(|_| ())
}

impl PayloadExchange for InProcessComm {
    fn exchange(&self, kind: Kind, payload: Payload) -> Result<Payload> {
        InProcessComm::exchange(self, kind, payload)
    }
}

/// The exchanges of a [`Collective`] impl for a type that is a
/// [`PayloadExchange`]: [`sum_f32`], [`sum_f64`], [`broadcast_from`] and
/// [`barrier_of`].
macro_rules! exchanges_via_payloads {
    () => {
        fn all_reduce_sum(&self, data: &mut [f32]) -> anyhow::Result<()> {
            $crate::parallel::collective::sum_f32(self, data)
        }

        fn all_reduce_sum_f64(&self, data: &mut [f64]) -> anyhow::Result<()> {
            $crate::parallel::collective::sum_f64(self, data)
        }

        fn broadcast(&self, data: &mut [f32], root: usize) -> anyhow::Result<()> {
            $crate::parallel::collective::broadcast_from(self, self.rank(), data, root)
        }

        fn barrier(&self) -> anyhow::Result<()> {
            $crate::parallel::collective::barrier_of(self)
        }
    };
}
pub(crate) use exchanges_via_payloads;

impl Collective for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    exchanges_via_payloads!();
}

impl Drop for InProcessComm {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.left.push(self.rank);
        self.shared.done.notify_all();
    }
}
