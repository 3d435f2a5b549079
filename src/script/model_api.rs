//! The `Model` script type (a Conformer-CTC encoder with train/eval mode and
//! frozen parameters) and the `Output` of its forward pass.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Tensor as CTensor;
use rhai::plugin::*;
use rhai::{Array, Dynamic, Map};

use super::errors::{script_error, IntoScript, ScriptResult};
use super::session;
use super::tensor_api::Tensor;
use crate::config::{model_config_from_json, ModelConfig};
use crate::model::{Encoder, ForwardOptions, Hidden};
use crate::parallel::driver::rank_dropout_seed;

/// The seed of a fresh model's initialisation (the reference seeds torch with
/// 12345 before building the model, so every run starts from the same weights).
pub const INIT_SEED: u64 = 12345;

/// A model in a script: a shared handle (copies refer to the same model).
#[derive(Clone)]
pub struct Model(Arc<ModelInner>);

/// The encoder and its script-side state.
pub struct ModelInner {
    encoder: Encoder,
    state: Mutex<ModelState>,
}

struct ModelState {
    train: bool,
    frozen: BTreeSet<String>,
}

impl Model {
    /// Wraps an encoder (in training mode, nothing frozen).
    pub fn new(encoder: Encoder) -> Self {
        Model(Arc::new(ModelInner {
            encoder,
            state: Mutex::new(ModelState {
                train: true,
                frozen: BTreeSet::new(),
            }),
        }))
    }

    /// The encoder.
    pub fn encoder(&self) -> &Encoder {
        &self.0.encoder
    }

    fn state(&self) -> MutexGuard<'_, ModelState> {
        // A poisoned lock only means a panic elsewhere; the flags stay valid.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True in training mode.
    pub fn is_training(&self) -> bool {
        self.state().train
    }

    /// True when parameter `name` is frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.state().frozen.contains(name)
    }

    /// True when both handles are the same model.
    pub fn same(&self, other: &Model) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The forward options of the current mode; training mode draws the
    /// dropout seed from the run's `dropout` stream (mixed with the rank in a
    /// data-parallel run, rank 0 using the draw itself).
    fn options(&self, keep: Keep) -> ScriptResult<ForwardOptions> {
        let train = self.is_training();
        let dropout_seed = if train {
            session::with(|s| {
                s.since_step = true;
                let draw = s.rng.stream("dropout").next_u64();
                // Ranks of a data-parallel run draw different masks.
                Ok(match &s.rank {
                    Some(r) => rank_dropout_seed(draw, r.comm.rank()),
                    None => draw,
                })
            })?
        } else {
            0
        };
        Ok(ForwardOptions {
            train,
            dropout_seed,
            keep_layer_outputs: keep.layers,
            keep_interim_logits: keep.interim,
            compat_renorm_padding: false,
            compute_dtype: session::compute_dtype(),
        })
    }

    /// Runs the model in its current mode; training mode draws the dropout
    /// seed from the run's `dropout` stream.
    pub fn run(&self, features: &CTensor, lengths: &[usize], keep: Keep) -> ScriptResult<Output> {
        let opts = self.options(keep)?;
        let out = self
            .0
            .encoder
            .forward(features, Some(lengths), &opts)
            .script()?;
        Ok(Output {
            logits: out.logits,
            lengths: out.lengths,
            interim: out.interim_logits,
            layers: out.layer_outputs,
        })
    }
}

/// Which intermediate results a forward pass keeps (`forward`'s options).
#[derive(Clone, Copy, Debug, Default)]
pub struct Keep {
    /// Every block's output (`layer_outputs`).
    pub layers: bool,
    /// The self-conditioning logits (`interim_logits`).
    pub interim: bool,
}

/// What a forward pass returns.
#[derive(Clone)]
pub struct Output {
    /// (B, N, C) CTC logits.
    pub logits: CTensor,
    /// Valid output frames per item.
    pub lengths: Vec<usize>,
    /// Self-conditioning logits after each block but the last, when kept.
    pub interim: Vec<CTensor>,
    /// Block outputs, when asked for.
    pub layers: Vec<CTensor>,
}

/// A model config from a script map (the `model:` section of the config);
/// keys the model does not have are errors (with the closest known key).
pub fn model_config(cfg: &Map) -> ScriptResult<ModelConfig> {
    let json: serde_json::Value = rhai::serde::from_dynamic(&Dynamic::from_map(cfg.clone()))?;
    let parsed = model_config_from_json(&json, "the script's model map")
        .map_err(|e| script_error(e.to_string()))?;
    let known = serde_json::to_value(&parsed).map_err(|e| script_error(e.to_string()))?;
    let known: Vec<&str> = known
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    for key in cfg.keys() {
        if !known.contains(&key.as_str()) {
            let hint = crate::config::suggest::closest(key, known.iter().copied())
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            return Err(script_error(format!(
                "encoder(): unknown model key `{key}`{hint}"
            )));
        }
    }
    Ok(parsed)
}

/// Lengths from a script array of non-negative ints.
pub fn lengths_from(array: &Array) -> ScriptResult<Vec<usize>> {
    super::tensor_api::counts_from(array, "lengths")
}

/// Ints as a script array.
pub fn int_array(values: &[usize]) -> Array {
    values
        .iter()
        .map(|&v| Dynamic::from_int(v as i64))
        .collect()
}

fn tensors(values: &[CTensor]) -> Array {
    values
        .iter()
        .map(|t| Dynamic::from(Tensor(t.clone())))
        .collect()
}

/// Model functions.
#[export_module]
pub mod model_module {
    use super::*;

    /// A freshly initialised encoder for the `model` config map (e.g.
    /// `cfg.model`) and a tokenizer with `vocab_size` pieces (the CTC head gets
    /// one more class, the blank), on the run's device (`device()`). The
    /// initial weights depend only on the config (fixed seed 12345, as the
    /// reference; drawn on the CPU, then moved).
    #[rhai_fn(return_raw)]
    pub fn encoder(cfg: Map, vocab_size: i64) -> Result<Model, Box<EvalAltResult>> {
        encoder_seeded(cfg, vocab_size, INIT_SEED as i64)
    }

    /// As `encoder(cfg, vocab_size)` with an explicit initialisation seed.
    #[rhai_fn(name = "encoder", return_raw)]
    pub fn encoder_seeded(
        cfg: Map,
        vocab_size: i64,
        seed: i64,
    ) -> Result<Model, Box<EvalAltResult>> {
        if vocab_size < 1 {
            return Err(script_error(format!(
                "encoder(): vocab_size must be >= 1, got {vocab_size}"
            )));
        }
        let cfg = model_config(&cfg)?;
        let enc =
            Encoder::init(&cfg, vocab_size as usize, seed as u64, &session::device()).script()?;
        Ok(Model::new(enc))
    }

    /// A trained model: an lcasr checkpoint or run directory (its newest
    /// checkpoint), a reference `.pt` file, or `model.safetensors` of a
    /// checkpoint; the model config is read from the checkpoint.
    #[rhai_fn(return_raw)]
    pub fn load_model(path: &str) -> Result<Model, Box<EvalAltResult>> {
        let p = session::resolve_path(path)?;
        let loaded =
            crate::infer::load::load_model(&p, &crate::infer::load::LoadOptions::default())
                .script()?;
        Ok(Model::new(loaded.encoder))
    }

    /// Runs the model on (B, 80, T) features with `lengths` valid frames per
    /// item; dropout and batch statistics follow the train/eval mode.
    #[rhai_fn(pure, return_raw)]
    pub fn forward(
        model: &mut Model,
        features: Tensor,
        lengths: Array,
    ) -> Result<Output, Box<EvalAltResult>> {
        model.run(&features.0, &lengths_from(&lengths)?, Keep::default())
    }

    /// `forward` with options: `#{ layer_outputs: true }` keeps every block's
    /// output in `out.layers` (for intermediate losses); `#{ interim_logits: true }`
    /// keeps the self-conditioning logits in `out.interim` (without it the fused
    /// self-conditioning head keeps no logits, which saves memory in training).
    #[rhai_fn(name = "forward", pure, return_raw)]
    pub fn forward_with(
        model: &mut Model,
        features: Tensor,
        lengths: Array,
        opts: Map,
    ) -> Result<Output, Box<EvalAltResult>> {
        let mut keep = Keep::default();
        for (k, v) in opts {
            let slot = match k.as_str() {
                "layer_outputs" => &mut keep.layers,
                "interim_logits" => &mut keep.interim,
                other => {
                    return Err(script_error(format!(
                        "forward(): unknown option `{other}` (known: layer_outputs, interim_logits)"
                    )))
                }
            };
            *slot = v.as_bool().map_err(|_| {
                script_error(format!("forward(): option `{k}` must be true or false"))
            })?;
        }
        model.run(&features.0, &lengths_from(&lengths)?, keep)
    }

    /// The first stage of running the model block by block: subsampling of
    /// (B, 80, T) features with `lengths` valid frames per item. Continue with
    /// `model.block(i, h)` and `model.self_condition(h)`, end with `model.head(h.x)`.
    #[rhai_fn(pure, return_raw)]
    pub fn subsample(
        model: &mut Model,
        features: Tensor,
        lengths: Array,
    ) -> Result<Hidden, Box<EvalAltResult>> {
        let opts = model.options(Keep::default())?;
        model
            .encoder()
            .subsample(&features.0, Some(&lengths_from(&lengths)?), &opts)
            .script()
    }

    /// Conformer block `i` (from 0) applied to the stage `h`.
    #[rhai_fn(pure, return_raw)]
    pub fn block(model: &mut Model, i: i64, h: Hidden) -> Result<Hidden, Box<EvalAltResult>> {
        let i =
            usize::try_from(i).map_err(|_| script_error(format!("block({i}): no such block")))?;
        model.encoder().block(i, &h).script()
    }

    /// Self-conditioning applied to the stage `h` (its interim logits are in
    /// the result's `interim`).
    #[rhai_fn(name = "self_condition", pure, return_raw)]
    pub fn self_condition_h(model: &mut Model, h: Hidden) -> Result<Hidden, Box<EvalAltResult>> {
        model.encoder().self_condition(&h).script()
    }

    /// (B, N, d_model) hidden states of a stage.
    #[rhai_fn(get = "x", pure)]
    pub fn hidden_x(h: &mut Hidden) -> Tensor {
        Tensor(h.x.clone())
    }

    /// Replaces the hidden states of a stage (same shape), e.g. to add noise.
    #[rhai_fn(set = "x", return_raw)]
    pub fn set_hidden_x(h: &mut Hidden, x: Tensor) -> Result<(), Box<EvalAltResult>> {
        if x.0.dims() != h.x.dims() {
            return Err(script_error(format!(
                "hidden states must keep their shape {:?}, got {:?}",
                h.x.dims(),
                x.0.dims()
            )));
        }
        *h = h.with_x(x.0);
        Ok(())
    }

    /// Valid encoder frames per item of a stage.
    #[rhai_fn(get = "lengths", pure)]
    pub fn hidden_lengths(h: &mut Hidden) -> Array {
        int_array(&h.lengths)
    }

    /// The interim logits of the stage's self-conditioning, or `()`.
    #[rhai_fn(get = "interim", pure)]
    pub fn hidden_interim(h: &mut Hidden) -> Dynamic {
        h.interim_logits
            .clone()
            .map_or(Dynamic::UNIT, |t| Dynamic::from(Tensor(t)))
    }

    /// Prints as `Hidden[B, N, d]`.
    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn hidden_to_string(h: &mut Hidden) -> String {
        format!("Hidden{:?}", h.x.dims())
    }

    /// The CTC head applied to hidden states (B, N, d_model), e.g. `out.layers[i]`.
    #[rhai_fn(pure, return_raw)]
    pub fn head(model: &mut Model, hidden: Tensor) -> Result<Tensor, Box<EvalAltResult>> {
        model.encoder().ctc_head(&hidden.0).script().map(Tensor)
    }

    /// Switches to training mode (dropout, batch statistics).
    pub fn train_mode(model: &mut Model) {
        model.state().train = true;
    }

    /// Switches to evaluation mode (no dropout, running statistics). Named
    /// `eval_mode` because `eval` is a disabled keyword in experiment scripts.
    pub fn eval_mode(model: &mut Model) {
        model.state().train = false;
    }

    /// True in training mode.
    #[rhai_fn(get = "training", pure)]
    pub fn training(model: &mut Model) -> bool {
        model.is_training()
    }

    /// Sets training (true) or evaluation (false) mode.
    #[rhai_fn(set = "training")]
    pub fn set_training(model: &mut Model, on: bool) {
        model.state().train = on;
    }

    /// Number of trainable values (frozen ones included).
    #[rhai_fn(get = "num_parameters", pure)]
    pub fn num_parameters(model: &mut Model) -> i64 {
        model.encoder().num_parameters() as i64
    }

    /// Number of Conformer blocks.
    #[rhai_fn(get = "n_layers", pure)]
    pub fn n_layers(model: &mut Model) -> i64 {
        model.encoder().config().n_layers as i64
    }

    /// Number of output classes (pieces + blank; the blank is the last).
    #[rhai_fn(get = "classes", pure)]
    pub fn classes(model: &mut Model) -> i64 {
        model.encoder().classes() as i64
    }

    /// Every parameter as `#{ name, shape, numel, frozen }`, sorted by name.
    #[rhai_fn(pure)]
    pub fn parameters(model: &mut Model) -> Array {
        let frozen = model.state().frozen.clone();
        model
            .encoder()
            .params()
            .iter()
            .map(|(name, var)| {
                let mut m = Map::new();
                m.insert("name".into(), name.clone().into());
                m.insert("shape".into(), Dynamic::from_array(int_array(var.dims())));
                m.insert("numel".into(), (var.elem_count() as i64).into());
                m.insert("frozen".into(), frozen.contains(name).into());
                Dynamic::from_map(m)
            })
            .collect()
    }

    /// The parameter `name` as a tensor (gradients flow into it), for
    /// regularisers written in the script.
    #[rhai_fn(pure, return_raw)]
    pub fn param(model: &mut Model, name: &str) -> Result<Tensor, Box<EvalAltResult>> {
        model
            .encoder()
            .params()
            .get(name)
            .map(|v| Tensor(v.as_tensor().clone()))
            .ok_or_else(|| script_error(format!("the model has no parameter `{name}`")))
    }

    /// Freezes every parameter whose name starts with `prefix` (the optimizer
    /// leaves them unchanged); returns how many were frozen. A prefix that
    /// matches nothing is an error.
    #[rhai_fn(return_raw)]
    pub fn freeze(model: &mut Model, prefix: &str) -> Result<i64, Box<EvalAltResult>> {
        let names: Vec<String> = model
            .encoder()
            .params()
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect();
        if names.is_empty() {
            return Err(script_error(format!(
                "freeze(): no parameter name starts with `{prefix}` (see model.parameters())"
            )));
        }
        let n = names.len() as i64;
        model.state().frozen.extend(names);
        Ok(n)
    }

    /// Unfreezes every parameter whose name starts with `prefix`; returns how many.
    pub fn unfreeze(model: &mut Model, prefix: &str) -> i64 {
        let mut st = model.state();
        let before = st.frozen.len();
        st.frozen.retain(|n| !n.starts_with(prefix));
        (before - st.frozen.len()) as i64
    }

    /// Writes the model's state dict (reference names) to a safetensors file.
    #[rhai_fn(pure, return_raw)]
    pub fn save(model: &mut Model, path: &str) -> Result<(), Box<EvalAltResult>> {
        let path = session::resolve_path(path)?;
        let sd = model.encoder().state_dict().script()?;
        let bytes = safetensors::serialize(sd.iter().map(|(k, t)| (k.as_str(), t)), None)
            .map_err(|e| script_error(format!("cannot serialise the model: {e}")))?;
        crate::fsutil::write_atomic(&path, &bytes).script()
    }

    /// Prints as `Model(4 layers, 1.2M parameters)`.
    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn model_to_string(model: &mut Model) -> String {
        format!(
            "Model({} layers, {:.2}M parameters)",
            model.encoder().config().n_layers,
            model.encoder().num_parameters() as f64 / 1e6
        )
    }

    /// (B, N, C) CTC logits.
    #[rhai_fn(get = "logits", pure)]
    pub fn logits(out: &mut Output) -> Tensor {
        Tensor(out.logits.clone())
    }

    /// (B, N, C) log-probabilities.
    #[rhai_fn(get = "log_probs", pure, return_raw)]
    pub fn log_probs(out: &mut Output) -> Result<Tensor, Box<EvalAltResult>> {
        candle_nn::ops::log_softmax(&out.logits, candle_core::D::Minus1)
            .script()
            .map(Tensor)
    }

    /// Valid output frames per item.
    #[rhai_fn(get = "lengths", pure)]
    pub fn out_lengths(out: &mut Output) -> Array {
        int_array(&out.lengths)
    }

    /// Self-conditioning logits after each block but the last, when `forward`
    /// was asked for them with `#{ interim_logits: true }` (else empty).
    #[rhai_fn(get = "interim", pure)]
    pub fn interim(out: &mut Output) -> Array {
        tensors(&out.interim)
    }

    /// Block outputs (B, N, d_model), when `forward` was asked for them.
    #[rhai_fn(get = "layers", pure)]
    pub fn layers(out: &mut Output) -> Array {
        tensors(&out.layers)
    }

    /// Prints as `Output[B, N, C]`.
    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn output_to_string(out: &mut Output) -> String {
        format!("Output{:?}", out.logits.dims())
    }
}
