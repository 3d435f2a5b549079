//! Running one thread per rank of an in-process group, and telling which
//! rank failed first.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use super::collective::{Collective, InProcessGroup};

/// Stack size of a rank's thread (the model's forward recurses through
/// candle's graph, and Rhai scripts through their call chains).
const RANK_STACK: usize = 64 << 20;

/// Gives each of `world` ranks on this machine its share of the cores for
/// its compute, unless `RAYON_NUM_THREADS` is set: sets that variable (which
/// rayon and candle's CPU kernels read; candle at each call) to the share and
/// returns it. Ranks that each took the whole machine would oversubscribe
/// it, and ranks sharing one pool wait on each other's work (measured on 2
/// cores, the demo with 2 ranks: 55 s as processes sized to the machine,
/// 41-45 s as threads sharing one pool, 32 s as processes with their share).
pub fn share_cores(world: usize) -> Option<usize> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = (cores / world.max(1)).max(1);
    // Called before the ranks start, while no other thread of ours reads
    // the environment.
    std::env::set_var("RAYON_NUM_THREADS", share.to_string());
    Some(share)
}

/// Runs `work` in a rayon pool of its own with `threads` threads when given
/// (a rank's share of the cores), else as it is.
pub fn in_own_pool<R: Send>(threads: Option<usize>, work: impl FnOnce() -> R + Send) -> R {
    let pool = threads.and_then(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().ok());
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

/// What the ranks' threads returned.
pub struct RankResults<T> {
    /// Each rank's result in rank order; `Err(message)` for a rank that
    /// panicked.
    pub results: Vec<std::result::Result<T, String>>,
    /// The first rank whose result was an error: the others usually failed
    /// because it left the group.
    pub first_failure: Option<usize>,
}

/// Runs `body` on `world` threads named `lcasr-rank-{r}`, each with its rank's
/// communicator of a fresh in-process group. A rank's communicator is dropped
/// as soon as its body returns, so ranks still waiting on it fail with
/// [`super::RankLeft`] instead of hanging.
pub fn run_on_threads<T: Send, E: Send>(
    world: usize,
    body: impl Fn(Arc<dyn Collective>) -> std::result::Result<T, E> + Sync,
) -> Result<RankResults<std::result::Result<T, E>>> {
    let comms = InProcessGroup::with_ranks(world)?
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Collective>)
        .collect();
    run_on_threads_with(comms, body)
}

/// Calls [`Collective::abort_group`] when dropped during a panic or after
/// the rank's body failed.
struct AbortOnFailure {
    comm: Arc<dyn Collective>,
    failed: bool,
}

impl Drop for AbortOnFailure {
    fn drop(&mut self) {
        if self.failed || std::thread::panicking() {
            self.comm.abort_group();
        }
    }
}

/// [`run_on_threads`] over the given communicators (one thread per
/// communicator, e.g. one per GPU of an NCCL group). A rank whose body fails
/// or panics aborts the group ([`Collective::abort_group`]).
pub fn run_on_threads_with<T: Send, E: Send>(
    comms: Vec<Arc<dyn Collective>>,
    body: impl Fn(Arc<dyn Collective>) -> std::result::Result<T, E> + Sync,
) -> Result<RankResults<std::result::Result<T, E>>> {
    let world = comms.len();
    let first_failure: Mutex<Option<usize>> = Mutex::new(None);
    let joined = std::thread::scope(|s| -> Result<Vec<_>> {
        let mut handles = Vec::with_capacity(world);
        for comm in comms {
            let (body, first_failure) = (&body, &first_failure);
            let rank = comm.rank();
            let handle = std::thread::Builder::new()
                .name(format!("lcasr-rank-{rank}"))
                .stack_size(RANK_STACK)
                .spawn_scoped(s, move || {
                    let mut guard = AbortOnFailure {
                        comm: Arc::clone(&comm),
                        failed: false,
                    };
                    let outcome = body(comm);
                    guard.failed = outcome.is_err();
                    drop(guard);
                    if outcome.is_err() {
                        let mut first = first_failure.lock().unwrap_or_else(|e| e.into_inner());
                        first.get_or_insert(rank);
                    }
                    outcome
                })
                .with_context(|| format!("cannot start the thread of rank {rank}"))?;
            handles.push(handle);
        }
        Ok(handles.into_iter().map(|h| h.join()).collect())
    })?;
    let results = joined
        .into_iter()
        .map(|r| {
            r.map_err(|panic| {
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            })
        })
        .collect();
    let first_failure = first_failure
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    Ok(RankResults {
        results,
        first_failure,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A communicator that only counts `abort_group` calls.
    struct Counting<'a> {
        rank: usize,
        aborts: &'a AtomicUsize,
    }

    impl Collective for Counting<'static> {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            3
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
            Ok(())
        }
        fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn abort_group(&self) {
            self.aborts.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn group(aborts: &'static AtomicUsize) -> Vec<Arc<dyn Collective>> {
        (0..3)
            .map(|rank| Arc::new(Counting { rank, aborts }) as Arc<dyn Collective>)
            .collect()
    }

    /// Ranks that fail or panic abort the group, each once; ranks that
    /// finish do not; the first failure is reported.
    #[test]
    fn failing_ranks_abort_the_group() {
        static OK: AtomicUsize = AtomicUsize::new(0);
        let ran = run_on_threads_with(group(&OK), |c| Ok::<_, ()>(c.rank())).unwrap();
        assert_eq!(OK.load(Ordering::SeqCst), 0);
        assert!(ran.first_failure.is_none());

        static FAILED: AtomicUsize = AtomicUsize::new(0);
        let ran = run_on_threads_with(group(&FAILED), |c| match c.rank() {
            1 => Err(()),
            2 => panic!("rank 2 panics"),
            r => Ok(r),
        })
        .unwrap();
        assert_eq!(FAILED.load(Ordering::SeqCst), 2);
        assert!(matches!(ran.results[1], Ok(Err(()))));
        assert!(ran.results[2].is_err());
        // A panic is reported by its join, not as the first failure.
        assert_eq!(ran.first_failure, Some(1));
    }
}
