//! The state one running script shares with the host functions it calls: the
//! config, the run's random streams, the accumulated gradients, the run
//! directory's writers and the objects a checkpoint saves.
//!
//! Scripts run on one thread, so the session is thread-local; each script run
//! installs a fresh one ([`install`]) and removes it when it ends.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::backprop::GradStore;

use super::errors::{script_error, ScriptResult};
use crate::config::Config;
use crate::train::rng::RunRng;

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
