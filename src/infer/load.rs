//! Loading a trained model for inference from any of the places one is kept:
//!
//! - an lcasr checkpoint directory (`model.safetensors`, `state.json`, and the
//!   trainer's `config.yaml` and `tokenizer.json` or `tokenizer.model`);
//! - a run directory, whose `checkpoints/latest` names the newest checkpoint;
//! - a reference trainer `.pt` file (its model config is pickled inside);
//! - a bare `.safetensors` state dict, with the model config given separately.
//!
//! The number of output classes always comes from the CTC head's weight; the
//! model config and tokenizer come from the options first, then (for
//! checkpoint and run directories) from the files the trainer saved.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;

use crate::audio::features::{FeatureRecipe, HOP_LENGTH, SAMPLE_RATE};
use crate::config::{load_model_section, ModelConfig};
use crate::model::{load_reference_pt, Encoder};
use crate::run::checkpoints::LATEST_FILE;
use crate::run::run_dir::{CHECKPOINTS_DIR, CONFIG_FILE};
use crate::text::tokenizer::Tokenizer;
use crate::train::state::{read_checkpoint_file, MODEL_FILE, STATE_FILE};

/// The tokenizer the trainer saves with a checkpoint (or in the run
/// directory), in `tokenizers` JSON.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The same when the run's tokenizer is a SentencePiece `.model` file.
pub const SENTENCEPIECE_FILE: &str = "tokenizer.model";
/// The feature recipe of the training data, `{"recipe": "LogMel"}`, saved
/// with a checkpoint when the data's caches record one.
pub const FEATURES_FILE: &str = "features.json";

/// What to load besides the weights.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// A YAML file with a `model:` section; overrides any config found with
    /// the weights.
    pub config: Option<PathBuf>,
    /// A tokenizer (`.json` or SentencePiece `.model`); overrides any found
    /// with the weights.
    pub tokenizer: Option<PathBuf>,
    /// The feature recipe the model was trained on; `None`: the one saved
    /// with the checkpoint, else the reference's power-mel.
    pub recipe: Option<FeatureRecipe>,
    /// Where the model runs.
    pub device: Device,
}

impl Default for LoadOptions {
    /// Nothing overridden, the reference's power-mel features, on the CPU.
    fn default() -> Self {
        Self {
            config: None,
            tokenizer: None,
            recipe: None,
            device: Device::Cpu,
        }
    }
}

/// A model ready for inference.
pub struct LoadedModel {
    /// The network, its classes read from the CTC head.
    pub encoder: Encoder,
    /// Its config.
    pub config: ModelConfig,
    /// The tokenizer mapping class ids to text, when one was found.
    pub tokenizer: Option<Tokenizer>,
    /// The weights file the model was read from.
    pub source: PathBuf,
    /// The feature recipe the model expects.
    pub recipe: FeatureRecipe,
}

impl LoadedModel {
    /// The tokenizer, or an error saying that one is needed.
    pub fn require_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            anyhow!(
                "{}: no tokenizer ({TOKENIZER_FILE} or {SENTENCEPIECE_FILE} is only looked \
                 for in checkpoint and run directories): pass --tokenizer",
                self.source.display()
            )
        })
    }

    /// The CTC blank: the last class.
    pub fn blank(&self) -> u32 {
        self.encoder.classes().saturating_sub(1) as u32
    }

    /// Seconds per output frame: the subsampling factor times the feature hop.
    pub fn frame_seconds(&self) -> f64 {
        self.config.subsampling_factor as f64 * HOP_LENGTH as f64 / SAMPLE_RATE as f64
    }
}

/// Where the pieces of a model are.
struct Located {
    /// The weights file.
    weights: PathBuf,
    /// Whether the weights are a reference `.pt` file.
    reference_pt: bool,
    /// The checkpoint directory whose `state.json` records the weights' hash.
    hashed_in: Option<PathBuf>,
    /// A config found with the weights.
    config: Option<PathBuf>,
    /// A tokenizer found with the weights.
    tokenizer: Option<PathBuf>,
    /// The training data's feature recipe, saved with a checkpoint.
    features: Option<PathBuf>,
}

/// Loads the model at `path` (a checkpoint directory, a run directory, a
/// reference `.pt` file or a `.safetensors` file; see the module docs).
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let found = locate(path)?;
    let config_path = opts.config.clone().or(found.config.clone());
    let (config, tensors) = if found.reference_pt {
        let ckpt = load_reference_pt(&found.weights, &opts.device)?;
        let config = match (&config_path, ckpt.model_config) {
            (Some(p), _) => read_model_config(p)?,
            (None, Some(c)) => c,
            (None, None) => bail!(
                "{}: the checkpoint holds no model config: pass --config <a YAML file with a \
                 model: section>",
                found.weights.display()
            ),
        };
        (config, ckpt.tensors)
    } else {
        let Some(p) = &config_path else {
            bail!(
                "{}: no model config (no {CONFIG_FILE} found with the weights): pass --config <a YAML file \
                 with a model: section>",
                path.display()
            )
        };
        let config = read_model_config(p)?;
        let bytes = match &found.hashed_in {
            Some(dir) => read_checkpoint_file(dir, MODEL_FILE)?,
            None => std::fs::read(&found.weights)
                .with_context(|| format!("cannot read {}", found.weights.display()))?,
        };
        let tensors =
            candle_core::safetensors::load_buffer(&bytes, &opts.device).with_context(|| {
                format!("cannot parse safetensors file {}", found.weights.display())
            })?;
        (config, tensors)
    };
    let encoder = Encoder::from_state_dict(&config, tensors, &opts.device).with_context(|| {
        let from = config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the config inside it".into());
        format!(
            "cannot build the model of {} with the config from {from}",
            found.weights.display()
        )
    })?;
    let tokenizer = match opts.tokenizer.as_ref().or(found.tokenizer.as_ref()) {
        Some(p) => {
            let tok = Tokenizer::from_file(p)?;
            if tok.vocab_size() + 1 != encoder.classes() {
                bail!(
                    "tokenizer {} has {} pieces but the model {} has {} classes (expected the \
                     pieces plus one blank): is it the tokenizer the model was trained with?",
                    p.display(),
                    tok.vocab_size(),
                    found.weights.display(),
                    encoder.classes()
                );
            }
            Some(tok)
        }
        None => None,
    };
    Ok(LoadedModel {
        encoder,
        config,
        tokenizer,
        recipe: resolve_recipe(opts.recipe, &found)?,
        source: found.weights,
    })
}

/// The recipe asked for, else the one saved with the checkpoint, else the
/// reference's. Asking for another than the saved one is allowed (the saved
/// file could be wrong) but warned about.
fn resolve_recipe(asked: Option<FeatureRecipe>, found: &Located) -> Result<FeatureRecipe> {
    let saved =
        match &found.features {
            Some(path) => {
                let bytes = match &found.hashed_in {
                    Some(dir) => read_checkpoint_file(dir, FEATURES_FILE)?,
                    None => std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                };
                let value: serde_json::Value = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not valid JSON", path.display()))?;
                let name = value["recipe"].as_str().unwrap_or_default();
                Some(FeatureRecipe::from_name(name).ok_or_else(|| {
                    anyhow!("{}: unknown feature recipe `{name}`", path.display())
                })?)
            }
            None => None,
        };
    match (asked, saved) {
        (Some(a), Some(s)) if a != s => {
            eprintln!(
                "warning: the checkpoint was trained on {} features; using {} as asked",
                s.name(),
                a.name()
            );
            Ok(a)
        }
        (Some(a), _) => Ok(a),
        (None, s) => Ok(s.unwrap_or_default()),
    }
}

/// Works out what kind of thing `path` is and where its parts are.
fn locate(path: &Path) -> Result<Located> {
    if !path.exists() {
        bail!("model not found: {} does not exist", path.display());
    }
    if path.is_dir() {
        let latest = path.join(CHECKPOINTS_DIR).join(LATEST_FILE);
        if latest.exists() {
            let dir = resolve_latest(&latest)?;
            return checkpoint_dir(&dir);
        }
        if path.join(MODEL_FILE).is_file() {
            return checkpoint_dir(path);
        }
        if path.join(CHECKPOINTS_DIR).is_dir() {
            bail!(
                "{}: a run directory without {CHECKPOINTS_DIR}/{LATEST_FILE}: it has no complete \
                 checkpoint yet (or pass a checkpoint directory under {CHECKPOINTS_DIR}/)",
                path.display()
            );
        }
        bail!(
            "{}: not a model directory: expected a checkpoint directory (with {MODEL_FILE}) or a \
             run directory (with {CHECKPOINTS_DIR}/{LATEST_FILE})",
            path.display()
        );
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    match ext.as_str() {
        "pt" | "pth" | "ckpt" => Ok(Located {
            weights: path.to_path_buf(),
            reference_pt: true,
            hashed_in: None,
            config: None,
            tokenizer: None,
            features: None,
        }),
        "safetensors" => {
            // The weights file of a checkpoint directory: use the whole checkpoint.
            if path.file_name().is_some_and(|n| n == MODEL_FILE) && dir.join(STATE_FILE).is_file() {
                return checkpoint_dir(dir);
            }
            Ok(Located {
                weights: path.to_path_buf(),
                reference_pt: false,
                hashed_in: None,
                config: None,
                tokenizer: None,
                features: None,
            })
        }
        _ => bail!(
            "{}: unknown model file type: expected a checkpoint or run directory, a reference \
             .pt file or a .safetensors file",
            path.display()
        ),
    }
}

/// The checkpoint directory named by a run's `checkpoints/latest`.
fn resolve_latest(latest: &Path) -> Result<PathBuf> {
    let checkpoints = latest.parent().unwrap_or_else(|| Path::new(""));
    if latest.is_dir() {
        return Ok(latest.to_path_buf());
    }
    let text = std::fs::read_to_string(latest)
        .with_context(|| format!("cannot read {}", latest.display()))?;
    let name = text.trim();
    if name.is_empty() {
        bail!(
            "{} is empty: it should name a checkpoint directory",
            latest.display()
        );
    }
    let dir = checkpoints.join(name);
    if !dir.is_dir() {
        bail!(
            "{} names `{name}`, but {} is not a directory",
            latest.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// The parts of an lcasr checkpoint directory. The config and tokenizer may
/// also sit in the run directory that holds it.
fn checkpoint_dir(dir: &Path) -> Result<Located> {
    let weights = dir.join(MODEL_FILE);
    if !weights.is_file() {
        bail!(
            "{}: not an lcasr checkpoint: {MODEL_FILE} is missing",
            dir.display()
        );
    }
    let run_dir = dir
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == CHECKPOINTS_DIR))
        .and_then(Path::parent);
    let first = |name: &str| {
        std::iter::once(dir)
            .chain(run_dir)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    };
    Ok(Located {
        weights,
        reference_pt: false,
        hashed_in: dir.join(STATE_FILE).is_file().then(|| dir.to_path_buf()),
        config: first(CONFIG_FILE),
        tokenizer: first(TOKENIZER_FILE).or_else(|| first(SENTENCEPIECE_FILE)),
        features: Some(dir.join(FEATURES_FILE)).filter(|p| p.is_file()),
    })
}

/// The `model:` section of a YAML file, which must have one.
fn read_model_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read model config {}", path.display()))?;
    let root: serde_json::Value = serde_saphyr::from_str(&text)
        .with_context(|| format!("{} is not valid YAML", path.display()))?;
    if root.get("model").is_none_or(|m| !m.is_object()) {
        bail!(
            "{}: no `model:` section (the model config must be under a `model:` key)",
            path.display()
        );
    }
    load_model_section(&text, &path.display().to_string()).map_err(|e| anyhow!("{e}"))
}
