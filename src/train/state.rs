//! Training-state checkpoints: a directory holding `model.safetensors` (every
//! parameter and buffer), `optimizer.safetensors` (the optimizer's per-parameter
//! buffers), any extra small files the caller adds (the resolved config, the
//! tokenizer) and `state.json` (counters, schedule and RNG positions, the
//! script's own state, optimizer scalars, the sha256 of every other file and the
//! model's tensor fingerprint).
//!
//! Saving is atomic: everything is written and synced in a temporary sibling
//! directory that is then renamed onto the target, so a crash leaves either the
//! old checkpoint or the new one, never a mix. Loading verifies every hash, the
//! model's tensor names and shapes and the optimizer's name before it changes
//! anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::lr_schedule::LrScheduleState;
use super::optimizer::Optimizer;
use super::rng::RunRngState;
use super::sequence_schedule::SequenceScheduleState;
use crate::fsutil::{sync_dir, write_synced};
use crate::hash::sha256_hex;
use crate::model::Encoder;

/// File holding the model's state dict.
pub const MODEL_FILE: &str = "model.safetensors";
/// File holding the optimizer's per-parameter state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File holding [`TrainingState`] and the metadata that ties the files together.
pub const STATE_FILE: &str = "state.json";

/// Version of the `state.json` layout.
const FORMAT_VERSION: u32 = 1;

/// Where the run is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingCounters {
    /// Optimizer steps done.
    pub optimizer_steps: u64,
    /// Recordings seen over the whole run.
    pub recordings_seen: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Recordings seen within the current epoch.
    pub position_in_epoch: u64,
}

/// Everything besides the tensors that a resumed run needs to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Run counters.
    pub counters: TrainingCounters,
    /// Learning-rate schedule counters.
    pub lr_schedule: LrScheduleState,
    /// Sequence-length schedule counters, when the run uses one.
    pub sequence_schedule: Option<SequenceScheduleState>,
    /// Positions of the run's random streams.
    pub rng: RunRngState,
    /// The optimizer's config name ([`Optimizer::name`]).
    pub optimizer: String,
    /// Whatever the training script stores to find again on resume (its own
    /// counters, for example); `null` when it stores nothing.
    #[serde(default)]
    pub script_state: Value,
}

/// Name, shape and dtype of one model tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    dtype: String,
}

/// The layout of `state.json`.
#[derive(Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    training: TrainingState,
    optimizer_scalars: Value,
    /// File name → lowercase hex sha256.
    sha256: BTreeMap<String, String>,
    model_fingerprint: Vec<TensorSpec>,
}

/// Writes a checkpoint of `model`, `opt` and `state` to the directory `dir`,
/// atomically replacing any previous checkpoint there.
///
/// `extra` lists further files to keep with the checkpoint, as (file name,
/// contents): they are written in the same atomic step and their hashes are
/// checked on load like the tensors'. A name must be a plain file name, not one
/// of the checkpoint's own files, and appear once.
pub fn save_checkpoint(
    dir: &Path,
    model: &Encoder,
    opt: &dyn Optimizer,
    state: &TrainingState,
    extra: &[(&str, &[u8])],
) -> Result<()> {
    if state.optimizer != opt.name() {
        bail!(
            "training state names optimizer `{}` but the optimizer is `{}`",
            state.optimizer,
            opt.name()
        );
    }
    check_extra_names(extra)?;
    let (parent, name) = split_dir(dir)?;
    fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let written = write_files(&tmp, model, opt, state, extra);
    let result = written.and_then(|()| replace_dir(&tmp, dir, &parent, &name));
    if result.is_err() && tmp.exists() {
        // Best effort: the error being reported matters more than leftovers.
        let _ = fs::remove_dir_all(&tmp);
    }
    result.with_context(|| format!("cannot save checkpoint {}", dir.display()))
}

/// Reads the checkpoint in `dir` into `model` and `opt` and returns the saved
/// training state. Nothing is changed unless the files are intact, the model
/// has exactly the saved tensor names and shapes, and the optimizer is the
/// saved kind.
pub fn load_checkpoint(
    dir: &Path,
    model: &Encoder,
    opt: &mut dyn Optimizer,
) -> Result<TrainingState> {
    let context = || format!("cannot load checkpoint {}", dir.display());
    let file = read_state_file(dir).with_context(context)?;
    if file.training.optimizer != opt.name() {
        return Err(anyhow!(
            "the checkpoint holds `{}` optimizer state but the optimizer is `{}`",
            file.training.optimizer,
            opt.name()
        ))
        .with_context(context);
    }
    let current = fingerprint(model)?;
    check_fingerprint(&file.model_fingerprint, &current).with_context(context)?;

    let device = model.device();
    let model_tensors =
        read_verified(dir, MODEL_FILE, &file.sha256, device).with_context(context)?;
    let opt_tensors =
        read_verified(dir, OPTIMIZER_FILE, &file.sha256, device).with_context(context)?;
    for extra in file.sha256.keys().filter(|f| !is_tensor_file(f)) {
        read_hashed(dir, extra, &file.sha256).with_context(context)?;
    }
    let saved: Vec<TensorSpec> = sorted_specs(&model_tensors);
    check_fingerprint(&file.model_fingerprint, &saved)
        .with_context(|| format!("{MODEL_FILE} does not match {STATE_FILE}"))
        .with_context(context)?;

    let running = model
        .running_stats_from(&model_tensors)
        .with_context(|| format!("cannot read the running statistics from {MODEL_FILE}"))
        .with_context(context)?;
    opt.load_state(&opt_tensors, &file.optimizer_scalars)
        .with_context(|| format!("cannot restore the optimizer from {OPTIMIZER_FILE}"))
        .with_context(context)?;
    for (name, var) in model.params() {
        let t = &model_tensors[name];
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)
            .with_context(|| format!("cannot set parameter `{name}`"))
            .with_context(context)?;
    }
    model.set_running_stats(&running).with_context(context)?;
    Ok(file.training)
}

/// Checks, without a model, that the checkpoint in `dir` is complete and
/// intact: `state.json` parses and every file it hashes (tensors and extras)
/// is present with that hash.
pub fn verify_checkpoint(dir: &Path) -> Result<()> {
    let context = || format!("checkpoint {} is not intact", dir.display());
    let file = read_state_file(dir).with_context(context)?;
    for tensor_file in [MODEL_FILE, OPTIMIZER_FILE] {
        if !file.sha256.contains_key(tensor_file) {
            return Err(anyhow!("{STATE_FILE} records no sha256 for {tensor_file}"))
                .with_context(context);
        }
    }
    for name in file.sha256.keys() {
        read_hashed(dir, name, &file.sha256).with_context(context)?;
    }
    Ok(())
}

/// The contents of the extra file `name` saved with the checkpoint in `dir`
/// (see [`save_checkpoint`]), after checking its hash.
pub fn read_checkpoint_file(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let context = || format!("cannot read `{name}` from checkpoint {}", dir.display());
    let file = read_state_file(dir).with_context(context)?;
    read_hashed(dir, name, &file.sha256).with_context(context)
}

/// Reads and parses `dir/state.json`, checking its format version.
fn read_state_file(dir: &Path) -> Result<StateFile> {
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let file: StateFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid training state", state_path.display()))?;
    if file.format_version != FORMAT_VERSION {
        bail!(
            "{}: unsupported format version {} (expected {FORMAT_VERSION})",
            state_path.display(),
            file.format_version
        );
    }
    if let Some(bad) = file.sha256.keys().find(|name| !is_plain_name(name)) {
        bail!(
            "{}: hashed file `{bad}` is not a plain file name",
            state_path.display()
        );
    }
    Ok(file)
}

/// Whether `name` names a file directly inside a directory (no separators,
/// not `.`, `..` or hidden).
fn is_plain_name(name: &str) -> bool {
    !name.starts_with('.') && Path::new(name).file_name().and_then(|n| n.to_str()) == Some(name)
}

/// Whether `name` is one of the checkpoint's tensor files.
fn is_tensor_file(name: &str) -> bool {
    name == MODEL_FILE || name == OPTIMIZER_FILE
}

/// Fails unless every extra file name is a plain, unique name that does not
/// clash with the checkpoint's own files.
fn check_extra_names(extra: &[(&str, &[u8])]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (name, _) in extra {
        if !is_plain_name(name) {
            bail!("extra checkpoint file `{name}` must be a plain file name not starting with `.`");
        }
        if is_tensor_file(name) || *name == STATE_FILE {
            bail!("extra checkpoint file `{name}` clashes with the checkpoint's own {name}");
        }
        if !seen.insert(*name) {
            bail!("extra checkpoint file `{name}` is given twice");
        }
    }
    Ok(())
}

/// The parent directory and final name of a checkpoint directory.
fn split_dir(dir: &Path) -> Result<(PathBuf, String)> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("checkpoint path {} has no usable final name", dir.display()))?
        .to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// Writes every file of the checkpoint into a fresh `tmp` and syncs them and
/// the directory.
fn write_files(
    tmp: &Path,
    model: &Encoder,
    opt: &dyn Optimizer,
    state: &TrainingState,
    extra: &[(&str, &[u8])],
) -> Result<()> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    fs::create_dir(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let model_dict = model.state_dict()?;
    let model_bytes = safetensors::serialize(model_dict.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| anyhow!("cannot serialise the model: {e}"))?;
    let opt_dict = opt.state_tensors();
    let opt_bytes = safetensors::serialize(opt_dict.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| anyhow!("cannot serialise the optimizer state: {e}"))?;
    let mut sha256 = BTreeMap::from([
        (MODEL_FILE.to_string(), sha256_hex(&model_bytes)),
        (OPTIMIZER_FILE.to_string(), sha256_hex(&opt_bytes)),
    ]);
    for (name, bytes) in extra {
        sha256.insert(name.to_string(), sha256_hex(bytes));
    }
    let file = StateFile {
        format_version: FORMAT_VERSION,
        training: state.clone(),
        optimizer_scalars: opt.state_scalars(),
        sha256,
        model_fingerprint: fingerprint(model)?,
    };
    let json = serde_json::to_vec_pretty(&file)?;
    write_synced(&tmp.join(MODEL_FILE), &model_bytes)?;
    write_synced(&tmp.join(OPTIMIZER_FILE), &opt_bytes)?;
    for (name, bytes) in extra {
        write_synced(&tmp.join(name), bytes)?;
    }
    write_synced(&tmp.join(STATE_FILE), &json)?;
    sync_dir(tmp)
}

/// Moves `tmp` onto `dir`, setting any existing `dir` aside first, then syncs `parent`.
fn replace_dir(tmp: &Path, dir: &Path, parent: &Path, name: &str) -> Result<()> {
    if dir.exists() {
        let old = parent.join(format!(".old-{name}-{}", std::process::id()));
        if old.exists() {
            fs::remove_dir_all(&old).with_context(|| format!("cannot clear {}", old.display()))?;
        }
        fs::rename(dir, &old).with_context(|| format!("cannot move {} aside", dir.display()))?;
        fs::rename(tmp, dir).with_context(|| format!("cannot rename {}", tmp.display()))?;
        sync_dir(parent)?;
        fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    } else {
        fs::rename(tmp, dir).with_context(|| format!("cannot rename {}", tmp.display()))?;
    }
    sync_dir(parent)
}

/// Name, shape and dtype of every tensor of the model's state dict, by name.
fn fingerprint(model: &Encoder) -> Result<Vec<TensorSpec>> {
    let dict: HashMap<String, Tensor> = model.state_dict()?.into_iter().collect();
    Ok(sorted_specs(&dict))
}

/// The specs of `tensors`, sorted by name.
fn sorted_specs(tensors: &HashMap<String, Tensor>) -> Vec<TensorSpec> {
    let mut specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, t)| TensorSpec {
            name: name.clone(),
            shape: t.dims().to_vec(),
            dtype: t.dtype().as_str().to_string(),
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// Fails with every difference between the saved and the present tensor lists.
fn check_fingerprint(saved: &[TensorSpec], present: &[TensorSpec]) -> Result<()> {
    let saved: BTreeMap<&str, &TensorSpec> = saved.iter().map(|s| (s.name.as_str(), s)).collect();
    let present: BTreeMap<&str, &TensorSpec> =
        present.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut problems = Vec::new();
    for (name, s) in &saved {
        match present.get(name) {
            None => problems.push(format!(
                "`{name}` is in the checkpoint but not in the model"
            )),
            Some(p) if p.shape != s.shape || p.dtype != s.dtype => problems.push(format!(
                "`{name}`: checkpoint {:?} {}, model {:?} {}",
                s.shape, s.dtype, p.shape, p.dtype
            )),
            Some(_) => {}
        }
    }
    for name in present.keys().filter(|n| !saved.contains_key(*n)) {
        problems.push(format!(
            "`{name}` is in the model but not in the checkpoint"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "the model does not match the checkpoint ({} differences):\n  {}",
            problems.len(),
            problems.join("\n  ")
        )
    }
}

/// Reads `dir/file`, checks its sha256 against the recorded one and parses it.
fn read_verified(
    dir: &Path,
    file: &str,
    hashes: &BTreeMap<String, String>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let bytes = read_hashed(dir, file, hashes)?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("cannot parse {}", dir.join(file).display()))
}

/// Reads `dir/file` and checks its sha256 against the one recorded for it.
fn read_hashed(dir: &Path, file: &str, hashes: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let want = hashes
        .get(file)
        .ok_or_else(|| anyhow!("{STATE_FILE} records no sha256 for {file}"))?;
    let path = dir.join(file);
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let got = sha256_hex(&bytes);
    if &got != want {
        bail!(
            "{} is corrupted or truncated: sha256 {got} ({} bytes), expected {want}",
            path.display(),
            bytes.len()
        );
    }
    Ok(bytes)
}
