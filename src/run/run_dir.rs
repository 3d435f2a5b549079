//! The run directory: everything needed to reproduce, resume and inspect one
//! training run.
//!
//! ```text
//! <run>/
//!   config.yaml      the resolved config
//!   scripts/<name>   every script file the run used, as loaded
//!   manifest.json    the RunRecord: versions, hashes, seed, command line, resumes
//!   metrics.jsonl    one JSON object per step or event
//!   tensorboard/     TensorBoard event files
//!   checkpoints/     step_NNNNNNNNN/ checkpoints and the `latest` pointer
//!   plots/           PNG plots
//! ```
//!
//! Files are written atomically, so a crash leaves each one whole.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::checkpoints::CheckpointStore;
use crate::fsutil::write_atomic;

/// The resolved config file.
pub const CONFIG_FILE: &str = "config.yaml";
/// The folder holding the scripts as loaded.
pub const SCRIPTS_DIR: &str = "scripts";
/// The run record.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The metrics log.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The TensorBoard folder.
pub const TENSORBOARD_DIR: &str = "tensorboard";
/// The checkpoint folder.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The plot folder.
pub const PLOTS_DIR: &str = "plots";

/// Every name a run directory holds directly.
const LAYOUT: [&str; 7] = [
    CONFIG_FILE,
    SCRIPTS_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    CHECKPOINTS_DIR,
    PLOTS_DIR,
];

/// What a run was made from, stored as `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Version of the program that started the run.
    pub program_version: String,
    /// The program's git commit (`-dirty` when it had local changes), when known.
    pub git_commit: Option<String>,
    /// The command line that started the run.
    pub command_line: Vec<String>,
    /// When the run started, RFC 3339 in UTC (see [`utc_timestamp`]).
    pub started_at: String,
    /// The run's master seed.
    pub seed: u64,
    /// sha256 of the resolved config.
    pub config_sha256: String,
    /// Script name relative to `scripts/` → sha256 of its source.
    pub scripts: BTreeMap<String, String>,
    /// The entry script's name in `scripts/` (the one the run executed).
    #[serde(default)]
    pub entry_script: Option<String>,
    /// Script arguments (`--set name=value`).
    #[serde(default)]
    pub script_args: BTreeMap<String, String>,
    /// Data-parallel ranks the run trained with (`--ranks`; 1 for a single
    /// process and for runs recorded before ranks existed).
    #[serde(default = "one_rank")]
    pub ranks: usize,
    /// sha256 of the tokenizer file, when the run uses one.
    pub tokenizer_sha256: Option<String>,
    /// sha256 of the training data manifest, when the run uses one.
    pub data_manifest_sha256: Option<String>,
    /// Every time the run was resumed, in order.
    #[serde(default)]
    pub resumes: Vec<ResumeRecord>,
}

/// The rank count of a run record without one.
fn one_rank() -> usize {
    1
}

/// One resumption of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRecord {
    /// When it resumed, RFC 3339 in UTC.
    pub at: String,
    /// The command line that resumed it.
    pub command_line: Vec<String>,
    /// The checkpoint it resumed from.
    pub from_checkpoint: String,
}

/// How [`RunDir::start`] treats an existing directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// Start a new run; an existing non-empty directory is refused.
    New,
    /// Start a new run, first deleting the contents of an existing run directory.
    Force,
    /// Continue an existing run.
    Resume,
}

/// An open run directory.
#[derive(Clone, Debug)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Opens `root` as a run directory for `mode`, creating it and its
    /// sub-folders as needed.
    ///
    /// [`StartMode::New`] refuses a non-empty directory. [`StartMode::Force`]
    /// empties it first, but only if it looks like a run directory: it has a
    /// `manifest.json`, or holds nothing but run-directory entries (a run that
    /// stopped before writing its manifest); any other folder is refused.
    /// [`StartMode::Resume`] requires `manifest.json`.
    pub fn start(root: &Path, mode: StartMode) -> Result<RunDir> {
        let dir = RunDir {
            root: root.to_path_buf(),
        };
        match mode {
            StartMode::New => {
                if !is_empty_or_missing(root)? {
                    bail!(
                        "run directory {} already exists and is not empty: pass `--resume {}` \
                         to continue it or `--force` to replace it",
                        root.display(),
                        root.display()
                    );
                }
            }
            StartMode::Force => {
                if !is_empty_or_missing(root)? {
                    if !looks_like_run_dir(root)? {
                        bail!(
                            "refusing to delete {}: it is not empty and is not a run directory \
                             (no {MANIFEST_FILE}); remove it yourself or choose another directory",
                            root.display()
                        );
                    }
                    clear_dir(root)?;
                }
            }
            StartMode::Resume => {
                if !dir.path(MANIFEST_FILE).is_file() {
                    bail!(
                        "cannot resume {}: it has no {MANIFEST_FILE}, so it is not a run directory",
                        root.display()
                    );
                }
            }
        }
        for sub in [SCRIPTS_DIR, TENSORBOARD_DIR, CHECKPOINTS_DIR, PLOTS_DIR] {
            let path = dir.path(sub);
            fs::create_dir_all(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
        }
        Ok(dir)
    }

    /// Opens an existing run directory to read it, changing nothing; it must
    /// have a `manifest.json`.
    pub fn open(root: &Path) -> Result<RunDir> {
        let dir = RunDir {
            root: root.to_path_buf(),
        };
        if !dir.path(MANIFEST_FILE).is_file() {
            bail!(
                "{} is not a run directory: it has no {MANIFEST_FILE}",
                root.display()
            );
        }
        Ok(dir)
    }

    /// The run directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` inside the run directory.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    /// Where the resolved config is kept.
    pub fn config_path(&self) -> PathBuf {
        self.path(CONFIG_FILE)
    }

    /// The folder holding the scripts as loaded.
    pub fn scripts_dir(&self) -> PathBuf {
        self.path(SCRIPTS_DIR)
    }

    /// Writes the resolved config.
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        write_atomic(&self.config_path(), yaml.as_bytes())
    }

    /// Writes one script file under `scripts/`. `name` is relative (it may
    /// have folders) and may not contain `..`, `.` or a root.
    pub fn write_script(&self, name: &str, source: &str) -> Result<()> {
        let rel = Path::new(name);
        let plain = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            bail!("script name `{name}` must be a relative path without `..` or `.` components");
        }
        let path = self.scripts_dir().join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        write_atomic(&path, source.as_bytes())
    }

    /// Writes the run record as `manifest.json`.
    pub fn write_record(&self, record: &RunRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(record)?;
        write_atomic(&self.path(MANIFEST_FILE), &json)
    }

    /// Reads the run record from `manifest.json`.
    pub fn read_record(&self) -> Result<RunRecord> {
        let path = self.path(MANIFEST_FILE);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid run record", path.display()))
    }

    /// Adds one resumption to the run record.
    pub fn append_resume(&self, resume: ResumeRecord) -> Result<()> {
        let mut record = self.read_record()?;
        record.resumes.push(resume);
        self.write_record(&record)
    }

    /// The run's checkpoint store, keeping the `keep_last` newest (0: all).
    pub fn checkpoints(&self, keep_last: usize) -> CheckpointStore {
        CheckpointStore::new(self.path(CHECKPOINTS_DIR), keep_last)
    }

    /// Where the metrics log is kept.
    pub fn metrics_path(&self) -> PathBuf {
        self.path(METRICS_FILE)
    }

    /// The TensorBoard folder.
    pub fn tensorboard_dir(&self) -> PathBuf {
        self.path(TENSORBOARD_DIR)
    }

    /// The plot folder.
    pub fn plots_dir(&self) -> PathBuf {
        self.path(PLOTS_DIR)
    }
}

/// The commit checked out in the git work tree containing `dir`, with
/// `-dirty` appended when `git status --porcelain` reports any change; `None`
/// when git is missing, `dir` is not in a work tree, or git fails.
pub fn git_commit(dir: &Path) -> Option<String> {
    let head = run_git(dir, &["rev-parse", "HEAD"])?;
    let head = head.trim();
    if head.is_empty() {
        return None;
    }
    let status = run_git(dir, &["status", "--porcelain"])?;
    if status.trim().is_empty() {
        Some(head.to_string())
    } else {
        Some(format!("{head}-dirty"))
    }
}

/// The mismatches between a recorded run and the inputs of a run about to
/// reproduce it (seed, data-parallel ranks, config, scripts, tokenizer, data
/// manifest), one human-readable line each; empty when they all match.
pub fn compare_records(recorded: &RunRecord, current: &RunRecord) -> Vec<String> {
    let mut out = Vec::new();
    if recorded.seed != current.seed {
        out.push(format!(
            "seed differs (recorded {}, now {})",
            recorded.seed, current.seed
        ));
    }
    if recorded.ranks != current.ranks {
        out.push(format!(
            "data-parallel ranks differ (recorded {}, now {})",
            recorded.ranks, current.ranks
        ));
    }
    if recorded.config_sha256 != current.config_sha256 {
        out.push(format!(
            "config differs (recorded sha256 {}, now {})",
            short(&recorded.config_sha256),
            short(&current.config_sha256)
        ));
    }
    for (name, was) in &recorded.scripts {
        match current.scripts.get(name) {
            Some(now) if now != was => out.push(format!(
                "script `{name}` differs (recorded sha256 {}, now {})",
                short(was),
                short(now)
            )),
            Some(_) => {}
            None => out.push(format!(
                "script `{name}` was used by the recorded run but is not used now"
            )),
        }
    }
    for name in current.scripts.keys() {
        if !recorded.scripts.contains_key(name) {
            out.push(format!(
                "script `{name}` is used now but was not used by the recorded run"
            ));
        }
    }
    compare_optional(
        &mut out,
        "tokenizer",
        &recorded.tokenizer_sha256,
        &current.tokenizer_sha256,
    );
    compare_optional(
        &mut out,
        "data manifest",
        &recorded.data_manifest_sha256,
        &current.data_manifest_sha256,
    );
    out
}

/// The current time as RFC 3339 in UTC, e.g. `2024-02-29T23:59:59Z`.
pub fn now_utc() -> String {
    utc_timestamp(SystemTime::now())
}

/// `time` as RFC 3339 in UTC with whole seconds, e.g. `2024-02-29T23:59:59Z`.
/// Times before 1970 are given as the epoch.
pub fn utc_timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (mut days, rem) = (secs / 86_400, secs % 86_400);
    let mut year = 1970u64;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let feb = if is_leap(year) { 29 } else { 28 };
    let month_lengths = [31, feb, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 1;
    for len in month_lengths {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    format!(
        "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}Z",
        days + 1,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Whether `year` is a Gregorian leap year.
fn is_leap(year: u64) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

/// Appends the mismatch, if any, of an optional hash.
fn compare_optional(
    out: &mut Vec<String>,
    what: &str,
    recorded: &Option<String>,
    current: &Option<String>,
) {
    match (recorded, current) {
        (Some(was), Some(now)) if was != now => out.push(format!(
            "{what} differs (recorded sha256 {}, now {})",
            short(was),
            short(now)
        )),
        (Some(was), None) => out.push(format!(
            "the recorded run used a {what} (sha256 {}) but none is used now",
            short(was)
        )),
        (None, Some(now)) => out.push(format!(
            "a {what} is used now (sha256 {}) but the recorded run had none",
            short(now)
        )),
        _ => {}
    }
}

/// The first 12 characters of a hash, followed by `…` when cut.
fn short(hash: &str) -> String {
    match hash.char_indices().nth(12) {
        Some((cut, _)) => format!("{}…", &hash[..cut]),
        None => hash.to_string(),
    }
}

/// Runs git with `args` in `dir`; its stdout when it succeeds.
fn run_git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok()
}

/// Whether `dir` is missing or an empty directory; an existing file is an error.
fn is_empty_or_missing(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(true);
    }
    if !dir.is_dir() {
        bail!("{} exists and is not a directory", dir.display());
    }
    let mut entries =
        fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    Ok(entries.next().is_none())
}

/// Whether `dir` has a manifest or holds nothing but run-directory entries.
fn looks_like_run_dir(dir: &Path) -> Result<bool> {
    if dir.join(MANIFEST_FILE).is_file() {
        return Ok(true);
    }
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name();
        if !LAYOUT.iter().any(|known| name == *known) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Deletes everything inside `dir`, keeping `dir` itself.
fn clear_dir(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .with_context(|| format!("cannot inspect {}", path.display()))?
            .is_dir();
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.with_context(|| format!("cannot delete {}", path.display()))?;
    }
    Ok(())
}
