//! The state one running script shares with the host functions it calls: the
//! config, the run's random streams, the accumulated gradients, the run
//! directory's writers and the objects a checkpoint saves.
//!
//! Scripts run on one thread, so the session is thread-local; each script run
//! installs a fresh one ([`install`]) and removes it when it ends. In a
//! data-parallel run every rank is a thread with its own session, which also
//! holds the rank's [`RankState`] ([`join_group`]).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, TensorId};

use super::errors::{script_error, ScriptResult};
use crate::config::Config;
use crate::parallel::Collective;
use crate::train::rng::RunRng;

/// How many of the latest chunk losses a rank remembers, so that `item()`
/// of one of them is summed over the ranks.
const REMEMBERED_LOSSES: usize = 64;

/// What the host sets up before a script starts.
pub struct SessionSetup {
    /// The validated config, when the script runs with one.
    pub config: Option<Config>,
    /// The run's master seed (random streams derive from it).
    pub seed: u64,
    /// Where relative paths in the script resolve (the working directory).
    pub base_dir: PathBuf,
    /// The run directory's writers, when the run records one.
    pub run: Option<super::run_api::RunOutputs>,
    /// Script arguments (`--set name=value`).
    pub args: BTreeMap<String, String>,
    /// Where models are built (`training.device`, opened by the host).
    pub device: Device,
}

/// The live state of a script run.
pub struct Session {
    /// The validated config.
    pub config: Option<Config>,
    /// The run's random streams.
    pub rng: RunRng,
    /// Gradients accumulated by `backward()` since the last optimizer step.
    pub grads: GradStore,
    /// Where relative paths resolve.
    pub base_dir: PathBuf,
    /// Ctrl-C presses so far.
    pub interrupts: Arc<AtomicUsize>,
    /// The run directory's writers and checkpoint bookkeeping.
    pub run: Option<super::run_api::RunOutputs>,
    /// The objects the last `restore`/`checkpoint` call named, saved again
    /// when Ctrl-C stops the run at a step boundary.
    pub tracked: Option<super::run_api::Tracked>,
    /// Script arguments (`--set name=value`).
    pub args: BTreeMap<String, String>,
    /// The argument names the script asked for.
    pub args_read: BTreeSet<String>,
    /// True once something a checkpoint cannot undo happened after the last
    /// optimizer step (a training forward, a random draw): an error then
    /// leaves no intact state to save.
    pub since_step: bool,
    /// The tracked dataset's position right after the last optimizer step.
    pub step_position: Option<super::data_api::DataPosition>,
    /// This rank's part in a data-parallel run (`None`: a single process).
    pub rank: Option<RankState>,
    /// Where models are built.
    pub device: Device,
}

/// A rank's part in a data-parallel run: the group, and what the host
/// functions need to make the ranks' shares add up to the whole batch.
pub struct RankState {
    /// The group's collective operations.
    pub comm: Arc<dyn Collective>,
    /// False while the current chunk is a stand-in (this rank has none of its
    /// items): shared with the synchronised BatchRenorm statistics, which
    /// then count nothing from this rank.
    pub contributes: Rc<Cell<bool>>,
    /// The current chunk's items over every rank, while a chunk is in use.
    pub chunk: Option<ChunkShard>,
    /// The latest losses `ctc_loss` computed on a chunk's targets, and
    /// whether this rank's value counts (not for a stand-in).
    pub losses: VecDeque<(TensorId, bool)>,
    /// True once the accumulated gradients hold the sums over every rank
    /// (until the optimizer steps or `zero_grad()`).
    pub grads_reduced: bool,
}

/// The current chunk of a data-parallel run as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkShard {
    /// Valid frames of every item of the chunk, over every rank.
    pub lengths: Vec<usize>,
    /// Which of them are this rank's (none for a stand-in).
    pub mine: Vec<usize>,
}

thread_local! {
    static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

/// Installs a fresh session for the current thread; it lives until the
/// returned guard is dropped.
/// `interrupts` counts Ctrl-C presses (shared with the signal handler).
pub fn install(setup: SessionSetup, interrupts: Arc<AtomicUsize>) -> SessionGuard {
    let session = Session {
        config: setup.config,
        rng: RunRng::new(setup.seed),
        grads: GradStore::default(),
        base_dir: setup.base_dir,
        interrupts,
        run: setup.run,
        tracked: None,
        args: setup.args,
        args_read: BTreeSet::new(),
        since_step: false,
        step_position: None,
        rank: None,
        device: setup.device,
    };
    SESSION.with(|s| *s.borrow_mut() = Some(session));
    SessionGuard(())
}

/// Removes the session when dropped.
pub struct SessionGuard(());

impl SessionGuard {
    /// The `--set` names the script never asked for (likely typos).
    pub fn unread_args(&self) -> Vec<String> {
        SESSION.with(|s| {
            s.borrow().as_ref().map_or_else(Vec::new, |s| {
                s.args
                    .keys()
                    .filter(|k| !s.args_read.contains(*k))
                    .cloned()
                    .collect()
            })
        })
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        SESSION.with(|s| s.borrow_mut().take());
    }
}

/// Runs `f` on the session. Host functions must not call back into the
/// script while inside `f`.
pub fn with<R>(f: impl FnOnce(&mut Session) -> ScriptResult<R>) -> ScriptResult<R> {
    SESSION.with(|s| match s.borrow_mut().as_mut() {
        Some(session) => f(session),
        None => Err(script_error(
            "this function needs a running experiment (use `lcasr run` or `lcasr train`)",
        )),
    })
}

/// The device models are built on: the session's, or the CPU outside a run.
pub fn device() -> Device {
    SESSION.with(|s| {
        s.borrow()
            .as_ref()
            .map_or(Device::Cpu, |session| session.device.clone())
    })
}

/// The compute dtype of forward passes: `training.dtype` on a GPU (bf16 or
/// f16 mixed precision, `None` for float32), always f32 (`None`) on the CPU.
pub fn compute_dtype() -> Option<DType> {
    SESSION.with(|s| {
        let s = s.borrow();
        let session = s.as_ref()?;
        if session.device.is_cpu() {
            return None;
        }
        session.config.as_ref()?.training.dtype.compute_dtype()
    })
}

/// Resolves a script-given path against the session's base directory.
pub fn resolve_path(path: &str) -> ScriptResult<PathBuf> {
    with(|s| Ok(resolve_in(&s.base_dir, path)))
}

/// `path` against `base` unless it is absolute.
pub fn resolve_in(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Ctrl-C presses so far in this session (0 without a session).
pub fn interrupts() -> usize {
    SESSION.with(|s| {
        s.borrow()
            .as_ref()
            .map_or(0, |s| s.interrupts.load(Ordering::SeqCst))
    })
}

/// True when a `restore`/`checkpoint` call named objects to save on Ctrl-C.
pub fn has_tracked() -> bool {
    SESSION.with(|s| s.borrow().as_ref().is_some_and(|s| s.tracked.is_some()))
}

/// Makes the current session one rank of the data-parallel group `comm`;
/// returns the flag that says whether this rank contributes to the current
/// chunk (for the synchronised BatchRenorm statistics).
pub fn join_group(comm: Arc<dyn Collective>) -> ScriptResult<Rc<Cell<bool>>> {
    let contributes = Rc::new(Cell::new(true));
    let flag = Rc::clone(&contributes);
    with(|s| {
        s.rank = Some(RankState {
            comm,
            contributes,
            chunk: None,
            losses: VecDeque::new(),
            grads_reduced: false,
        });
        Ok(flag)
    })
}

/// The data-parallel group of this session, when the run has several ranks.
pub fn comm() -> Option<Arc<dyn Collective>> {
    SESSION.with(|s| {
        s.borrow()
            .as_ref()
            .and_then(|s| s.rank.as_ref())
            .map(|r| Arc::clone(&r.comm))
    })
}

/// True on the rank that writes the run directory and speaks to the user:
/// rank 0, or the only process (also without a session).
pub fn is_lead() -> bool {
    SESSION.with(|s| {
        s.borrow()
            .as_ref()
            .and_then(|s| s.rank.as_ref())
            .is_none_or(|r| r.comm.rank() == 0)
    })
}

/// Enters a chunk of a data-parallel run (`None` ends the chunks): BatchRenorm
/// counts this rank's statistics unless it holds none of the chunk's items.
pub fn enter_chunk(chunk: Option<ChunkShard>) -> ScriptResult<()> {
    with(|s| {
        if let Some(r) = s.rank.as_mut() {
            r.contributes
                .set(chunk.as_ref().is_none_or(|c| !c.mine.is_empty()));
            r.chunk = chunk;
        }
        Ok(())
    })
}

/// Remembers a chunk loss whose `item()` is summed over the ranks (counting
/// this rank's value when `counts`).
pub fn remember_loss(id: TensorId, counts: bool) -> ScriptResult<()> {
    with(|s| {
        if let Some(r) = s.rank.as_mut() {
            if r.losses.len() == REMEMBERED_LOSSES {
                r.losses.pop_front();
            }
            r.losses.push_back((id, counts));
        }
        Ok(())
    })
}

/// For a loss remembered by [`remember_loss`]: whether this rank's value counts.
pub fn remembered_loss(id: TensorId) -> Option<bool> {
    SESSION.with(|s| {
        s.borrow()
            .as_ref()
            .and_then(|s| s.rank.as_ref())
            .and_then(|r| r.losses.iter().find(|(i, _)| *i == id).map(|(_, c)| *c))
    })
}
