//! The whole encoder, `SCConformerXL`-compatible (reference-spec §3.1):
//! subsampling, optional Fourier positions, Conformer blocks with
//! self-conditioning between them, and the CTC head.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use lcasr_kernels::rotary::{inv_freq, rotary_tables};

use super::builder::{Builder, Init};
use super::checkpointing::checkpointed_block;
use super::conformer::ConformerLayer;
use super::conv_norm::{RenormState, RunningStats, GROUP_NORM_GROUPS};
use super::decoder::Decoder;
use super::layers::{rotary_cos_sin, Ctx};
use super::subsampling::Subsampling;
use crate::config::{ConvNorm, ConvType, ModelConfig};

/// How to run a forward pass.
#[derive(Clone, Debug, Default)]
pub struct ForwardOptions {
    /// Training mode (batch statistics, dropout, autograd graph).
    pub train: bool,
    /// Seed of this pass's dropout masks.
    pub dropout_seed: u64,
    /// Keep every block's output (for inspection and tests).
    pub keep_layer_outputs: bool,
    /// Keep the self-conditioning logits in [`EncoderOutput::interim_logits`].
    /// Off, the self-conditioning head runs as one fused op that keeps no logits
    /// for the backward (about a layer's worth of 4,096-class logits per block
    /// less peak memory in training).
    pub keep_interim_logits: bool,
    /// The conv norm's batch statistics (BatchRenorm, BatchNorm, GroupNorm)
    /// include padded frames, as the reference computed them (needed to
    /// reproduce its training numerics exactly).
    pub compat_renorm_padding: bool,
    /// Mixed precision: the dtype activations and weight copies are computed
    /// in (bf16 or f16), with the parameters kept in f32 and their gradients
    /// flowing back through the casts; norms, softmax, batch statistics,
    /// positional tables and the logits stay f32. `None`: f32 throughout.
    pub compute_dtype: Option<DType>,
}

/// What a forward pass returns.
pub struct EncoderOutput {
    /// (B, N, C) logits of the CTC head; `log_probs()` normalises them.
    pub logits: Tensor,
    /// Valid encoder frames per item.
    pub lengths: Vec<usize>,
    /// The self-conditioning logits after each block but the last, when
    /// [`ForwardOptions::keep_interim_logits`] asked for them (else empty).
    pub interim_logits: Vec<Tensor>,
    /// Block outputs (before self-conditioning), when asked for.
    pub layer_outputs: Vec<Tensor>,
}

impl EncoderOutput {
    /// (B, N, C) log-probabilities: log_softmax of the logits.
    pub fn log_probs(&self) -> Result<Tensor> {
        candle_nn::ops::log_softmax(&self.logits, D::Minus1)
    }
}

/// Rotary frequencies and the interpolation factor (a checkpoint's values
/// win over the config's base).
struct Rotary {
    inv_freq: Frequencies,
    factor: f32,
}

/// The rotary frequencies `rotary_pos_emb.inv_freq`.
enum Frequencies {
    /// A buffer; the attention kernel rotates with precomputed tables.
    Fixed(Vec<f32>),
    /// A trainable parameter (`learned_rotary`); the attention rotates q and
    /// k with graph-recorded tables outside its kernel.
    Learned(Var),
}

/// The encoder's state between stages when it is run block by block
/// ([`Encoder::subsample`], [`Encoder::block`], [`Encoder::self_condition`]).
#[derive(Clone)]
pub struct Hidden {
    /// (B, N, d_model) hidden states.
    pub x: Tensor,
    /// Valid encoder frames per item.
    pub lengths: Vec<usize>,
    /// The interim logits of the last self-conditioning step, if any.
    pub interim_logits: Option<Tensor>,
    /// The pass's context (mode, padding mask, rotary tables, dropout).
    ctx: Rc<Ctx>,
}

impl Hidden {
    /// The same stage with other hidden states (e.g. changed by a script).
    pub fn with_x(&self, x: Tensor) -> Hidden {
        Hidden {
            x,
            lengths: self.lengths.clone(),
            interim_logits: None,
            ctx: Rc::clone(&self.ctx),
        }
    }
}

/// The encoder.
pub struct Encoder {
    cfg: ModelConfig,
    classes: usize,
    subsampling: Subsampling,
    fourier: Option<Var>,
    layers: Vec<Arc<ConformerLayer>>,
    decoder: Decoder,
    rotary: Option<Rotary>,
    params: BTreeMap<String, Var>,
    device: Device,
}

impl Encoder {
    /// A freshly initialised model with `vocab_size` pieces (+1 blank class);
    /// the initialisation is a function of `seed` only.
    pub fn init(
        cfg: &ModelConfig,
        vocab_size: usize,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<Self> {
        Encoder::build(cfg, vocab_size + 1, Builder::init(seed, device))
    }

    /// A model whose parameters and buffers come from a reference state dict;
    /// the number of classes is read from `decoder.ff.weight`.
    pub fn from_state_dict(
        cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let classes = tensors
            .get("decoder.ff.weight")
            .map(|t| t.dims()[0])
            .ok_or_else(|| {
                anyhow::anyhow!("the checkpoint has no `decoder.ff.weight`: not an lcasr model")
            })?;
        Encoder::build(cfg, classes, Builder::from_tensors(tensors, device))
    }

    fn build(cfg: &ModelConfig, classes: usize, b: Builder) -> anyhow::Result<Self> {
        refuse_unsupported(cfg)?;
        let d = cfg.d_model as usize;
        let subsampling = Subsampling::new(&b, cfg)?;
        let fourier = cfg
            .fourier_pos_enc
            .then(|| b.param("fourier_pos_enc.w_r", &[1, d / 2], Init::Normal));
        let layers = (0..cfg.n_layers as usize)
            .map(|i| Arc::new(ConformerLayer::new(&b, i, cfg)))
            .collect();
        let decoder = Decoder::new(&b, cfg, classes);
        let rotary = cfg.use_rotary.then(|| {
            let dh = cfg.head_dim as usize;
            let computed = inv_freq(cfg.rotary_base_freq, dh);
            let name = "rotary_pos_emb.inv_freq";
            let inv = if cfg.learned_rotary {
                let stored = b.has(name);
                let var = b.param(name, &[dh / 2], Init::Const(0.0));
                if !stored {
                    Tensor::from_vec(computed, dh / 2, b.device())
                        .and_then(|t| var.set(&t))
                        .expect("a tensor of the parameter's shape");
                }
                Frequencies::Learned(var)
            } else if b.has(name) {
                Frequencies::Fixed(b.buffer(name, &[dh / 2], Init::Const(0.0)))
            } else {
                b.accept(name);
                Frequencies::Fixed(computed)
            };
            let factor = if b.has("rotary_pos_emb.rotary_interpolation_factor") {
                b.buffer(
                    "rotary_pos_emb.rotary_interpolation_factor",
                    &[],
                    Init::Const(1.0),
                )[0]
            } else {
                cfg.rotary_interpolation_factor as f32
            };
            Rotary {
                inv_freq: inv,
                factor,
            }
        });
        let device = b.device().clone();
        let params = b.finish()?;
        Ok(Encoder {
            cfg: cfg.clone(),
            classes,
            subsampling,
            fourier,
            layers,
            decoder,
            rotary,
            params,
            device,
        })
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Output classes (vocabulary + blank); the blank is the last class.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trainable parameters by reference state-dict name.
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    /// Runs the model on (B, F, T) features with `lengths` valid frames per
    /// item (all T when `None`).
    pub fn forward(
        &self,
        features: &Tensor,
        lengths: Option<&[usize]>,
        opts: &ForwardOptions,
    ) -> Result<EncoderOutput> {
        let mut h = self.subsample(features, lengths, opts)?;
        let mut interim_logits = Vec::new();
        let mut layer_outputs = Vec::new();
        let last = self.layers.len().saturating_sub(1);
        for i in 0..self.layers.len() {
            h = self.block(i, &h)?;
            if opts.keep_layer_outputs {
                layer_outputs.push(h.x.clone());
            }
            if self.cfg.self_conditioning && i < last {
                h = self.self_condition_keeping(&h, opts.keep_interim_logits)?;
                interim_logits.extend(h.interim_logits.clone());
            }
        }
        let logits = self.decoder.final_logits(&h.x, &h.ctx)?;
        Ok(EncoderOutput {
            logits,
            lengths: h.lengths,
            interim_logits,
            layer_outputs,
        })
    }

    /// The first stage of a forward pass, for running the encoder block by
    /// block: subsampling (plus the positional encoding and, when configured,
    /// self-conditioning of the subsampled frames) of (B, F, T) features.
    pub fn subsample(
        &self,
        features: &Tensor,
        lengths: Option<&[usize]>,
        opts: &ForwardOptions,
    ) -> Result<Hidden> {
        let (batch, _, t) = features.dims3()?;
        let lengths: Vec<usize> = match lengths {
            Some(l) => l.to_vec(),
            None => vec![t; batch],
        };
        let mut ctx = Ctx::new(opts.train, None, opts.dropout_seed);
        ctx.brn_stats_include_padding = opts.compat_renorm_padding;
        ctx.dtype = opts.compute_dtype.unwrap_or(DType::F32);
        // Features come from the data pipeline on the host.
        let x = features
            .to_device(&self.device)?
            .to_dtype(ctx.dtype)?
            .transpose(1, 2)?;
        let (mut x, out_lengths) = self.subsampling.forward(&x, &lengths, &ctx)?;
        let n = x.dim(1)?;
        // Masked whenever an item is shorter than the frames (a data-parallel
        // rank's share of a chunk may hold only items shorter than its width).
        let padded = out_lengths.iter().any(|&l| l < n);
        if padded {
            let clamped: Vec<usize> = out_lengths.iter().map(|&l| l.min(n)).collect();
            let mask: Vec<f32> = clamped
                .iter()
                .flat_map(|&l| (0..n).map(move |i| if i < l { 1.0 } else { 0.0 }))
                .collect();
            ctx.mask =
                Some(Tensor::from_vec(mask, (batch, n, 1), x.device())?.to_dtype(ctx.dtype)?);
            ctx.lengths = Some(clamped);
        }
        if let Some(r) = &self.rotary {
            match &r.inv_freq {
                Frequencies::Fixed(f) => {
                    ctx.rotary = Some(Arc::new(rotary_tables(f, n, r.factor)));
                }
                Frequencies::Learned(v) => {
                    // Angles in f32 whatever the compute dtype.
                    let (cos, sin) = rotary_cos_sin(&ctx.w_f32(v), n, r.factor)?;
                    ctx.learned_rotary = Some((cos.to_dtype(ctx.dtype)?, sin.to_dtype(ctx.dtype)?));
                }
            }
        }
        if let Some(w) = &self.fourier {
            let pe = fourier_features(&ctx.w_f32(w), n, self.cfg.d_model as usize)?;
            x = x.broadcast_add(&pe.to_dtype(ctx.dtype)?)?;
        }
        if self.cfg.self_condition_subsampling {
            x = self.decoder.self_condition(&x, &ctx, false)?.0;
        }
        Ok(Hidden {
            x,
            lengths: out_lengths,
            interim_logits: None,
            ctx: Rc::new(ctx),
        })
    }

    /// Conformer block `i` applied to `h` (activation-checkpointed in
    /// training when `checkpoint_every_n_layers` says so).
    pub fn block(&self, i: usize, h: &Hidden) -> Result<Hidden> {
        let layer = self.layers.get(i).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "block {i} does not exist: the model has {} blocks",
                self.layers.len()
            ))
        })?;
        let every = self.cfg.checkpoint_every_n_layers as usize;
        let x = if h.ctx.train && every > 0 && i.is_multiple_of(every) {
            checkpointed_block(layer, self.layer_params(i), &h.x, &h.ctx)?
        } else {
            layer.forward(&h.x, &h.ctx)?
        };
        Ok(h.with_x(x))
    }

    /// Self-conditioning (the CTC head's posteriors projected back and
    /// added) applied to `h`; the interim logits are in the result's
    /// `interim_logits`.
    pub fn self_condition(&self, h: &Hidden) -> Result<Hidden> {
        self.self_condition_keeping(h, true)
    }

    /// [`Encoder::self_condition`], keeping the interim logits only when asked
    /// (without them the graph holds no logits, see `Decoder::self_condition`).
    fn self_condition_keeping(&self, h: &Hidden, keep_logits: bool) -> Result<Hidden> {
        let (x, logits) = self.decoder.self_condition(&h.x, &h.ctx, keep_logits)?;
        let mut out = h.with_x(x);
        out.interim_logits = logits;
        Ok(out)
    }

    /// The trainable parameters block `i` reads (`layers.{i}.*`, and the
    /// rotary frequencies when they are trained).
    fn layer_params(&self, i: usize) -> Vec<Var> {
        let prefix = format!("layers.{i}.");
        let mut params: Vec<Var> = self
            .params
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect();
        if let Some(Rotary {
            inv_freq: Frequencies::Learned(v),
            ..
        }) = &self.rotary
        {
            params.push(v.clone());
        }
        params
    }

    /// The CTC head's logits for hidden states `x` of shape (B, N, d_model),
    /// e.g. a block's output for an intermediate CTC loss (the head is shared).
    pub fn ctc_head(&self, x: &Tensor) -> Result<Tensor> {
        self.decoder.final_logits(x, &Ctx::new(false, None, 0))
    }

    /// Every parameter and buffer under its reference state-dict name
    /// (BatchRenorm counters as I64 scalars), sorted by name.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: BTreeMap<String, Tensor> = self
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect();
        for (prefix, stats) in self.running_stats() {
            out.extend(stats.tensors(&prefix, &self.device)?);
        }
        if let Some(r) = &self.rotary {
            if let Frequencies::Fixed(f) = &r.inv_freq {
                out.insert(
                    "rotary_pos_emb.inv_freq".into(),
                    Tensor::from_slice(f, f.len(), &self.device)?,
                );
            }
            out.insert(
                "rotary_pos_emb.rotary_interpolation_factor".into(),
                Tensor::new(r.factor, &self.device)?,
            );
        }
        Ok(out.into_iter().collect())
    }

    /// The BatchRenorm state of every block (prefix, state), in block order;
    /// empty unless `conv_norm` is `batch_renorm`.
    pub fn renorm_states(&self) -> Vec<(String, RenormState)> {
        self.running_stats()
            .into_iter()
            .filter_map(|(prefix, stats)| match stats {
                RunningStats::Renorm(s) => Some((prefix, s)),
                RunningStats::Batch(_) => None,
            })
            .collect()
    }

    /// Restores BatchRenorm states saved by [`Encoder::renorm_states`].
    ///
    /// # Panics
    /// When a state's width differs from its block's (states of a model of
    /// another config).
    pub fn set_renorm_states(&self, states: &[(String, RenormState)]) {
        for (layer, (prefix, s)) in self
            .layers
            .iter()
            .filter(|l| l.renorm_state().is_some())
            .zip(states)
        {
            if let Err(e) = layer.set_running_stats(RunningStats::Renorm(s.clone())) {
                panic!("cannot restore `{prefix}`: {e}");
            }
        }
    }

    /// The running statistics of every block whose conv norm keeps them
    /// (BatchRenorm, BatchNorm), with their state-dict prefixes, in block order.
    pub fn running_stats(&self) -> Vec<(String, RunningStats)> {
        self.layers
            .iter()
            .filter_map(|l| l.running_stats())
            .collect()
    }

    /// The running statistics of every block, read from `tensors` named as in
    /// [`Encoder::state_dict`] (e.g. a saved `model.safetensors`), without
    /// changing the model.
    pub fn running_stats_from(
        &self,
        tensors: &HashMap<String, Tensor>,
    ) -> anyhow::Result<Vec<(String, RunningStats)>> {
        self.running_stats()
            .into_iter()
            .map(|(prefix, live)| Ok((prefix.clone(), live.read_like(tensors, &prefix)?)))
            .collect()
    }

    /// Restores running statistics saved by [`Encoder::running_stats`] or
    /// read by [`Encoder::running_stats_from`]; fails, changing nothing, when
    /// they do not match the model's blocks.
    pub fn set_running_stats(&self, stats: &[(String, RunningStats)]) -> anyhow::Result<()> {
        let live = self.running_stats();
        let fits = live.len() == stats.len()
            && live.iter().zip(stats).all(|((p, l), (q, s))| {
                p == q && std::mem::discriminant(l) == std::mem::discriminant(s)
            });
        if !fits {
            let names = |v: &[(String, RunningStats)]| {
                v.iter()
                    .map(|(p, _)| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            anyhow::bail!(
                "running statistics for [{}] do not fit the model's [{}]",
                names(stats),
                names(&live)
            );
        }
        let with_stats = self.layers.iter().filter(|l| l.running_stats().is_some());
        for (layer, (_, s)) in with_stats.zip(stats) {
            layer.set_running_stats(s.clone())?;
        }
        Ok(())
    }
}

/// Learnable Fourier features: concat(cos(p·w), sin(p·w)) / √d for p < n.
fn fourier_features(w: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    let p: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let p = Tensor::from_vec(p, (n, 1), w.device())?;
    let angles = p.matmul(w)?;
    let pe = Tensor::cat(&[angles.cos()?, angles.sin()?], 1)?;
    (pe / (d as f64).sqrt())?.to_dtype(DType::F32)
}

/// Options the model cannot honour yet fail loudly instead of being ignored.
fn refuse_unsupported(cfg: &ModelConfig) -> anyhow::Result<()> {
    let mut problems: Vec<String> = Vec::new();
    if cfg.conv_type == ConvType::Longconv {
        problems.push("model.conv_type: `longconv` is not supported yet; use `standard`".into());
    }
    let inner = (cfg.d_model as f64 * cfg.conv_expansion_factor) as usize;
    if cfg.conv_norm == ConvNorm::GroupNorm
        && !cfg.transformer
        && !inner.is_multiple_of(GROUP_NORM_GROUPS)
    {
        problems.push(format!(
            "model.conv_norm: `group_norm` needs the convolution module's width \
             (d_model x conv_expansion_factor = {inner}) to be a multiple of {GROUP_NORM_GROUPS}"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", problems.join("\n"))
    }
}
