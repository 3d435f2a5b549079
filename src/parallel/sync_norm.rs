//! Synchronised BatchRenorm: the kernel's statistics hook
//! (`lcasr_kernels::batch_renorm::StatsReducer`) served by a [`Collective`],
//! so the batch statistics of a data-parallel step are those of the whole
//! global batch and a split batch trains as the unsplit one would.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use lcasr_kernels::batch_renorm::{with_stats_reducer, StatsReducer};

use super::collective::Collective;

/// Sums BatchRenorm statistics over the ranks of a group.
pub struct CollectiveStats {
    comm: Arc<dyn Collective>,
    contributes: bool,
}

impl StatsReducer for CollectiveStats {
    fn sum(&self, values: &mut [f64]) -> candle_core::Result<()> {
        if !self.contributes {
            values.fill(0.0);
        }
        self.comm
            .all_reduce_sum_f64(values)
            .map_err(|e| candle_core::Error::Msg(format!("synchronised BatchRenorm: {e:#}")))
    }
}

/// Runs `f` (a training forward pass and its backward) with BatchRenorm
/// synchronised over the ranks of `comm`. A rank that does not `contribute`
/// (a stand-in pass on a rank without items) adds nothing to the statistics
/// but still takes part in every exchange.
pub fn synchronised<R>(comm: &Arc<dyn Collective>, contributes: bool, f: impl FnOnce() -> R) -> R {
    let reducer = CollectiveStats {
        comm: Arc::clone(comm),
        contributes,
    };
    with_stats_reducer(Rc::new(reducer), f)
}

/// Sums BatchRenorm statistics over the ranks of a group while this rank's
/// part changes from chunk to chunk (a scripted run, where the reducer stays
/// installed for the whole script).
pub struct SwitchedStats {
    comm: Arc<dyn Collective>,
    contributes: Rc<Cell<bool>>,
}

impl StatsReducer for SwitchedStats {
    fn sum(&self, values: &mut [f64]) -> candle_core::Result<()> {
        CollectiveStats {
            comm: Arc::clone(&self.comm),
            contributes: self.contributes.get(),
        }
        .sum(values)
    }
}

/// Runs `f` with BatchRenorm synchronised over the ranks of `comm`; this rank
/// adds its statistics whenever `contributes` holds true at the time of the
/// exchange (it may change inside `f`).
pub fn synchronised_switched<R>(
    comm: &Arc<dyn Collective>,
    contributes: Rc<Cell<bool>>,
    f: impl FnOnce() -> R,
) -> R {
    let reducer = SwitchedStats {
        comm: Arc::clone(comm),
        contributes,
    };
    with_stats_reducer(Rc::new(reducer), f)
}
