//! Reading model weights: safetensors files and the reference trainer's
//! torch `.pt` checkpoints (a zip of pickles), including the model config the
//! reference pickles as an OmegaConf object.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{Device, Tensor};

use crate::config::{model_config_from_json, ModelConfig};

/// What a reference `.pt` checkpoint holds that we use.
pub struct ReferenceCheckpoint {
    /// The `model` state dict.
    pub tensors: HashMap<String, Tensor>,
    /// The `model:` section of the pickled run config, when present.
    pub model_config: Option<ModelConfig>,
    /// Recordings processed when it was saved (`podcast_step`).
    pub podcast_step: Option<i64>,
    /// Epoch when it was saved.
    pub epoch: Option<i64>,
}

/// Every tensor of a safetensors file, by name.
pub fn load_safetensors(path: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read safetensors file {}", path.display()))
}

/// Reads a reference trainer checkpoint (`torch.save` of a dict with `model`,
/// `config`, `podcast_step`, `epoch`, ...), without Python.
pub fn load_reference_pt(path: &Path, device: &Device) -> anyhow::Result<ReferenceCheckpoint> {
    let context = || format!("cannot read reference checkpoint {}", path.display());
    let pth = PthTensors::new(path, Some("model")).with_context(context)?;
    let mut tensors = HashMap::new();
    for name in pth.tensor_infos().keys() {
        let t = pth
            .get(name)
            .with_context(context)?
            .ok_or_else(|| anyhow!("tensor `{name}` listed but unreadable"))
            .with_context(context)?;
        tensors.insert(name.clone(), t.to_device(device)?);
    }
    if tensors.is_empty() {
        bail!(
            "{}: no `model` state dict found (is this an lcasr reference checkpoint?)",
            path.display()
        );
    }
    let top = read_top_level(path).with_context(context)?;
    let entry = |key: &str| {
        top.iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
            .map(|(_, v)| v.clone())
    };
    let model_config = match entry("config") {
        None | Some(Object::None) => None,
        Some(cfg) => {
            let json = omegaconf_to_json(&cfg)?;
            match json.get("model") {
                Some(m) => Some(
                    model_config_from_json(m, &path.display().to_string())
                        .map_err(|e| anyhow!("{e}"))?,
                ),
                None => None,
            }
        }
    };
    let int = |key: &str| match entry(key) {
        Some(Object::Int(i)) => Some(i as i64),
        Some(Object::Long(i)) => Some(i),
        _ => None,
    };
    Ok(ReferenceCheckpoint {
        tensors,
        model_config,
        podcast_step: int("podcast_step"),
        epoch: int("epoch"),
    })
}

/// The top-level dict of the checkpoint's `data.pkl`.
fn read_top_level(path: &Path) -> anyhow::Result<Vec<(Object, Object)>> {
    let file = std::fs::File::open(path)?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| anyhow!("no data.pkl inside the zip"))?;
    let mut reader = BufReader::new(zip.by_name(&name)?);
    let mut stack = Stack::empty();
    stack.read_loop(&mut reader)?;
    match stack.finalize()? {
        Object::Dict(entries) => Ok(entries),
        _ => bail!("the checkpoint's top level is not a dict"),
    }
}

/// Converts a pickled OmegaConf container (DictConfig/ListConfig of value
/// nodes) or a plain pickled value into JSON.
fn omegaconf_to_json(obj: &Object) -> anyhow::Result<serde_json::Value> {
    use serde_json::Value;
    Ok(match obj {
        Object::None => Value::Null,
        Object::Bool(b) => Value::Bool(*b),
        Object::Int(i) => Value::from(*i),
        Object::Long(i) => Value::from(*i),
        Object::Float(x) => Value::from(*x),
        Object::Unicode(s) => Value::String(s.clone()),
        Object::List(items) | Object::Tuple(items) => Value::Array(
            items
                .iter()
                .map(omegaconf_to_json)
                .collect::<anyhow::Result<_>>()?,
        ),
        Object::Dict(entries) => {
            let mut map = serde_json::Map::new();
            for (k, v) in entries {
                if let Object::Unicode(k) = k {
                    map.insert(k.clone(), omegaconf_to_json(v)?);
                }
            }
            Value::Object(map)
        }
        // An OmegaConf object: its state dict holds `_content` (containers)
        // or `_val` (value nodes).
        Object::Build { args, .. } => {
            let Object::Dict(state) = args.as_ref() else {
                bail!("unexpected pickled object state")
            };
            let field = |name: &str| {
                state
                    .iter()
                    .find(|(k, _)| matches!(k, Object::Unicode(s) if s == name))
                    .map(|(_, v)| v)
            };
            if let Some(content) = field("_content") {
                omegaconf_to_json(content)?
            } else if let Some(val) = field("_val") {
                omegaconf_to_json(val)?
            } else {
                Value::Null
            }
        }
        other => bail!("unsupported pickled value in the checkpoint config: {other:?}"),
    })
}
