//! A run's checkpoint directory: one `step_NNNNNNNNN` checkpoint per save, a
//! `latest` file naming the newest complete one, and keep-last-K retention.
//!
//! Every checkpoint is written atomically (see [`save_checkpoint`]) before the
//! `latest` pointer moves to it, so a crash at any point leaves the pointer on
//! a complete checkpoint. Finding the checkpoint to resume from verifies its
//! hashes and, when it is damaged, falls back to the newest intact one before
//! it with a warning.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::fsutil::write_atomic;
use crate::model::Encoder;
use crate::train::optimizer::Optimizer;
use crate::train::state::{load_checkpoint, save_checkpoint, verify_checkpoint, TrainingState};

/// Name of the file that holds the newest checkpoint's directory name.
pub const LATEST_FILE: &str = "latest";

/// Prefix of a checkpoint directory's name; the step follows, zero-padded.
const STEP_PREFIX: &str = "step_";

/// Prefix of the temporary entries left by an interrupted write or removal.
const TEMP_PREFIXES: [&str; 2] = [".tmp-", ".old-"];

/// The checkpoints of one run, kept in one directory.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep_last: usize,
}

impl CheckpointStore {
    /// A store over `dir` (created on the first save) that keeps the
    /// `keep_last` newest checkpoints; 0 keeps all.
    pub fn new(dir: PathBuf, keep_last: usize) -> Self {
        CheckpointStore { dir, keep_last }
    }

    /// The directory holding the checkpoints.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many checkpoints are kept (0: all).
    pub fn keep_last(&self) -> usize {
        self.keep_last
    }

    /// Where the checkpoint of `step` lives.
    pub fn path_for(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{STEP_PREFIX}{step:09}"))
    }

    /// Saves a checkpoint for `step` (replacing one saved before for the same
    /// step), points `latest` at it, then removes the oldest checkpoints
    /// beyond the retention limit, never the one just written. `extra` files
    /// are kept and hashed with the checkpoint (see [`save_checkpoint`]).
    /// Returns the checkpoint's directory.
    pub fn save(
        &self,
        step: u64,
        model: &Encoder,
        opt: &dyn Optimizer,
        state: &TrainingState,
        extra: &[(&str, &[u8])],
    ) -> Result<PathBuf> {
        let path = self.path_for(step);
        save_checkpoint(&path, model, opt, state, extra)?;
        let name = dir_name(&path);
        write_atomic(&self.dir.join(LATEST_FILE), format!("{name}\n").as_bytes())
            .with_context(|| format!("cannot point `{LATEST_FILE}` at checkpoint {name}"))?;
        self.prune(step)?;
        Ok(path)
    }

    /// Every checkpoint in the store as (step, directory), by increasing step.
    /// Temporary leftovers of interrupted writes and anything else not named
    /// like a checkpoint are ignored; a missing store directory is empty.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list checkpoints in {}", self.dir.display()))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry
                .with_context(|| format!("cannot list checkpoints in {}", self.dir.display()))?;
            let Some(step) = entry.file_name().to_str().and_then(parse_step) else {
                continue;
            };
            if entry.path().is_dir() {
                found.push((step, entry.path()));
            }
        }
        found.sort_by_key(|(step, _)| *step);
        Ok(found)
    }

    /// The checkpoint to resume from: the one `latest` names if it verifies,
    /// else the newest one before it that does, with a warning naming each
    /// damaged checkpoint and why. A missing or unreadable `latest`, or one
    /// naming a checkpoint that is not there, falls back to the highest step.
    /// `None` when no checkpoint verifies (or there are none).
    pub fn latest_valid(&self) -> Result<Option<PathBuf>> {
        let all = self.list()?;
        let Some((highest, _)) = all.last() else {
            return Ok(None);
        };
        let start = match self.read_latest() {
            Ok(step) if all.iter().any(|(s, _)| *s == step) => step,
            Ok(step) => {
                tracing::warn!(
                    "{} names checkpoint step {step}, which is not in {}; using the highest step {highest}",
                    self.dir.join(LATEST_FILE).display(),
                    self.dir.display()
                );
                *highest
            }
            Err(e) => {
                tracing::warn!("{e:#}; using the highest step {highest}");
                *highest
            }
        };
        for (_, path) in all.iter().rev().filter(|(s, _)| *s <= start) {
            match verify_checkpoint(path) {
                Ok(()) => return Ok(Some(path.clone())),
                Err(e) => tracing::warn!(
                    "skipping damaged checkpoint {}: {e:#}; trying the previous one",
                    path.display()
                ),
            }
        }
        tracing::warn!("no intact checkpoint in {}", self.dir.display());
        Ok(None)
    }

    /// Loads the checkpoint [`Self::latest_valid`] picks into `model` and `opt`
    /// and returns its directory and training state; `None` when there is no
    /// intact checkpoint. A checkpoint that is intact but does not fit the
    /// model or optimizer is an error, not a reason to fall back.
    pub fn load_latest(
        &self,
        model: &Encoder,
        opt: &mut dyn Optimizer,
    ) -> Result<Option<(PathBuf, TrainingState)>> {
        let Some(path) = self.latest_valid()? else {
            return Ok(None);
        };
        let state = load_checkpoint(&path, model, opt)?;
        Ok(Some((path, state)))
    }

    /// Removes the temporary entries (`.tmp-*`, `.old-*`, `latest.tmp-*`)
    /// that interrupted saves or removals left in the store and returns how
    /// many there were.
    /// Call it only while no other process writes into this store.
    pub fn remove_leftovers(&self) -> Result<usize> {
        if !self.dir.exists() {
            return Ok(0);
        }
        let mut removed = 0;
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", self.dir.display()))?;
            let name = entry.file_name();
            if !name.to_str().is_some_and(is_leftover) {
                continue;
            }
            let path = entry.path();
            let is_dir = entry
                .file_type()
                .with_context(|| format!("cannot inspect {}", path.display()))?
                .is_dir();
            let result = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.with_context(|| format!("cannot remove leftover {}", path.display()))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// The step the `latest` file names.
    fn read_latest(&self) -> Result<u64> {
        let path = self.dir.join(LATEST_FILE);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        parse_step(text.trim()).with_context(|| {
            format!(
                "{} does not name a checkpoint (it holds {:?})",
                path.display(),
                text.trim()
            )
        })
    }

    /// Removes the oldest checkpoints beyond `keep_last`, sparing `just_saved`.
    /// Each is first renamed to a temporary name, so that a crash mid-removal
    /// never leaves a half-deleted directory that looks like a checkpoint.
    fn prune(&self, just_saved: u64) -> Result<()> {
        if self.keep_last == 0 {
            return Ok(());
        }
        let others: Vec<(u64, PathBuf)> = self
            .list()?
            .into_iter()
            .filter(|(step, _)| *step != just_saved)
            .collect();
        let excess = others.len().saturating_sub(self.keep_last - 1);
        for (_, path) in &others[..excess] {
            let doomed = self
                .dir
                .join(format!(".old-{}-{}", dir_name(path), std::process::id()));
            if doomed.exists() {
                fs::remove_dir_all(&doomed)
                    .with_context(|| format!("cannot clear {}", doomed.display()))?;
            }
            fs::rename(path, &doomed)
                .with_context(|| format!("cannot retire old checkpoint {}", path.display()))?;
            fs::remove_dir_all(&doomed)
                .with_context(|| format!("cannot remove old checkpoint {}", doomed.display()))?;
        }
        Ok(())
    }
}

/// Whether `name` is a temporary entry of an interrupted checkpoint write or
/// removal, or of an interrupted `latest` update.
fn is_leftover(name: &str) -> bool {
    TEMP_PREFIXES.iter().any(|p| name.starts_with(p))
        || name.starts_with(&format!("{LATEST_FILE}.tmp-"))
}

/// The step of a checkpoint directory named `step_<digits>`.
fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The final component of a path the store built itself.
fn dir_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
