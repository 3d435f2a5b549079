//! Running one thread per rank of an in-process group, and telling which
//! rank failed first.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use super::collective::{Collective, InProcessGroup};

/// Stack size of a rank's thread (the model's forward recurses through
/// candle's graph, and Rhai scripts through their call chains).
const RANK_STACK: usize = 64 << 20;

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
    let comms = InProcessGroup::with_ranks(world)?;
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
                    let outcome = body(Arc::new(comm));
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
