//! The typed configuration: one struct per YAML section, with the reference
//! trainer's defaults (reference-spec §1).
//!
//! Optional keys carry `#[serde(default)]`; keys without it are required.
//! Every struct derives `Serialize`, so the resolved config can be written back
//! as YAML and read again to the same value.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A whole experiment config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// The encoder architecture.
    pub model: ModelConfig,
    /// Optimizer name and arguments.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// How recordings are cut into training chunks.
    pub audio_chunking: AudioChunkingConfig,
    /// Sequence-length warmup; absent means a fixed chunk length and batch size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_scheduler: Option<SequenceSchedulerConfig>,
    /// Experiment tracking (logged locally as TensorBoard + JSONL).
    #[serde(default)]
    pub wandb: WandbConfig,
    /// Where and how often checkpoints are written.
    #[serde(default)]
    pub checkpointing: CheckpointingConfig,
    /// Training data.
    pub data: DataConfig,
    /// SpecAugment; absent means never applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_augment: Option<SpecAugmentConfig>,
    /// The training loop.
    pub training: TrainingConfig,
}

/// Subsampling front-end kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subsampling {
    /// 2-D depthwise-separable convolutions (the paper's "8x depthwise").
    DwStriding,
    /// Full 2-D convolutions.
    Striding,
    /// Frame stacking followed by an MLP.
    Stacking,
}

/// Activation of the subsampling stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU (swish).
    Silu,
    /// ReLU.
    Relu,
    /// Exact (erf) GELU.
    Gelu,
    /// Identity.
    None,
}

/// Norm used for every pre-norm, block-final norm and the decoder norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// LayerNorm, eps 1e-5, weight and bias.
    LayerNorm,
    /// RMSNorm, x / sqrt(mean(x²) + 1e-5) · weight.
    RmsNorm,
}

/// Convolution-module kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvType {
    /// The Conformer convolution module.
    Standard,
    /// Bidirectional long convolution (reference-spec §3.9.3).
    Longconv,
}

/// Norm inside the convolution module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvNorm {
    /// BatchRenorm with a running standard deviation (the reference default).
    BatchRenorm,
    /// Standard batch norm.
    BatchNorm,
    /// LayerNorm over channels.
    LayerNorm,
    /// GroupNorm with 32 groups.
    GroupNorm,
    /// No norm.
    None,
}

fn yes() -> bool {
    true
}

/// The `model:` section (reference-spec §1.1, including the hidden keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// Mel bins of the input.
    pub feat_in: u64,
    /// Number of Conformer blocks.
    pub n_layers: u64,
    /// Width of the residual stream.
    pub d_model: u64,
    /// Attention heads.
    pub n_heads: u64,
    /// Per-head dimension (n_heads·head_dim need not equal d_model).
    pub head_dim: u64,
    /// Dropout after the feed-forward modules (and, capped at 0.1, after attention).
    pub dropout_ff: f64,
    /// Dropout on attention probabilities (training only).
    pub dropout_attn: f64,
    /// Dropout after the convolution module.
    pub dropout_conv: f64,
    /// Time subsampling factor; a power of 2.
    pub subsampling_factor: u64,
    /// Subsampling kind.
    pub subsampling: Subsampling,
    /// Activation after each subsampling stage.
    pub subsampling_act: Activation,
    /// Channels of the subsampling convolutions; -1 means d_model.
    pub subsampling_conv_channels: i64,
    /// LayerNorm (and a bias) on the subsampling output.
    pub subsampling_norm_out: bool,
    /// One self-conditioning step on the subsampling output.
    pub self_condition_subsampling: bool,
    /// Feed-forward hidden size as a multiple of d_model.
    pub expansion_factor: u64,
    /// Depthwise convolution kernel size (odd).
    pub conv_kernel_size: u64,
    /// Width of the convolution module as a multiple of d_model.
    pub conv_expansion_factor: f64,
    /// Convolution-module kind.
    pub conv_type: ConvType,
    /// Self-conditioned CTC after every block but the last.
    #[serde(default = "yes")]
    pub self_conditioning: bool,
    /// Sigmoid-gated self-conditioning.
    pub gated_sc: bool,
    /// A norm before the CTC head.
    pub decoder_norm: bool,
    /// Rotary position embeddings on queries and keys.
    pub use_rotary: bool,
    /// Norm kind used throughout.
    pub default_norm: NormKind,
    /// Extra norms after the feed-forward and attention modules.
    pub sandwich_norm: bool,
    /// Biases in the feed-forward linears.
    pub bias_in_ff: bool,
    /// Activation checkpointing of every n-th layer (0 = off).
    pub checkpoint_every_n_layers: u64,
    /// Use a flash-attention kernel where available (same maths either way).
    #[serde(default = "yes")]
    pub flash_attn: bool,
    /// Rotary base θ (the paper's best models used 1.5e6).
    pub rotary_base_freq: f64,
    /// Rotary positions are divided by this.
    pub rotary_interpolation_factor: f64,
    /// Make the rotary frequencies trainable.
    pub learned_rotary: bool,
    /// Learnable Fourier positional features after subsampling.
    pub fourier_pos_enc: bool,
    /// Local attention window per side in encoder frames (-1 = unbounded).
    pub attention_window_size: i64,
    /// Left window, overriding `attention_window_size` when >= 0.
    pub attention_window_size_left: i64,
    /// Right window, overriding `attention_window_size` when >= 0.
    pub attention_window_size_right: i64,
    /// Causal attention.
    pub causal: bool,
    /// Bias on the qkv projection.
    pub qkv_bias: bool,
    /// Norm inside the convolution module.
    pub conv_norm: ConvNorm,
    /// Recompute level of the fused MLP (performance only).
    pub ff_checkpoint_lvl: u64,
    /// Activation checkpointing of the subsampling (performance only).
    pub checkpoint_subsampling: bool,
    /// FFT depthwise convolution (performance only).
    pub use_fft_conv: bool,
    /// Drop the convolution module and the first feed-forward module.
    pub transformer: bool,
    /// Apply the decoder norm twice before the CTC head, as the published checkpoints do.
    #[serde(default = "yes")]
    pub legasee_double_norm: bool,
    /// Debug output of attention weights.
    pub return_attention_weights: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            feat_in: 80,
            n_layers: 6,
            d_model: 768,
            n_heads: 6,
            head_dim: 128,
            dropout_ff: 0.0,
            dropout_attn: 0.0,
            dropout_conv: 0.0,
            subsampling_factor: 8,
            subsampling: Subsampling::DwStriding,
            subsampling_act: Activation::Silu,
            subsampling_conv_channels: 256,
            subsampling_norm_out: false,
            self_condition_subsampling: false,
            expansion_factor: 4,
            conv_kernel_size: 9,
            conv_expansion_factor: 1.0,
            conv_type: ConvType::Standard,
            self_conditioning: true,
            gated_sc: false,
            decoder_norm: false,
            use_rotary: false,
            default_norm: NormKind::LayerNorm,
            sandwich_norm: false,
            bias_in_ff: false,
            checkpoint_every_n_layers: 0,
            flash_attn: true,
            rotary_base_freq: 10000.0,
            rotary_interpolation_factor: 1.0,
            learned_rotary: false,
            fourier_pos_enc: false,
            attention_window_size: -1,
            attention_window_size_left: -1,
            attention_window_size_right: -1,
            causal: false,
            qkv_bias: false,
            conv_norm: ConvNorm::BatchRenorm,
            ff_checkpoint_lvl: 0,
            checkpoint_subsampling: false,
            use_fft_conv: false,
            transformer: false,
            legasee_double_norm: true,
            return_attention_weights: false,
        }
    }
}

impl ModelConfig {
    /// Subsampling channels with -1 resolved to d_model.
    pub fn subsampling_channels(&self) -> u64 {
        if self.subsampling_conv_channels < 0 {
            self.d_model
        } else {
            self.subsampling_conv_channels as u64
        }
    }
}

/// Optimizer names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    /// Adam with coupled L2 weight decay (torch.optim.Adam).
    Adam,
    /// Adam with decoupled weight decay (torch.optim.AdamW).
    Adamw,
    /// MADGRAD (the reference's default).
    Madgrad,
    /// MirrorMADGRAD.
    Mirrormadgrad,
}

impl fmt::Display for OptimizerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerName::Adam => "adam",
            OptimizerName::Adamw => "adamw",
            OptimizerName::Madgrad => "madgrad",
            OptimizerName::Mirrormadgrad => "mirrormadgrad",
        })
    }
}

/// Which parameters get weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WeightDecayGroups {
    /// Matrices and convolution kernels decay; norms, biases and embeddings do not.
    #[default]
    Default,
    /// Every parameter decays.
    None,
}

/// The `optimizer:` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Optimizer kind.
    pub name: OptimizerName,
    /// Arguments; missing ones take the optimizer's defaults when resolved.
    #[serde(default)]
    pub args: OptimizerArgs,
    /// Weight-decay parameter grouping.
    #[serde(default)]
    pub weight_decay_groups: WeightDecayGroups,
}

/// Optimizer arguments (`optimizer.args`). `lr` is also the schedule's peak.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct OptimizerArgs {
    /// Peak learning rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Momentum (MADGRAD family).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// Weight decay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Numerical epsilon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Decoupled weight decay (MADGRAD family).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decouple_decay: Option<bool>,
    /// Adam's (beta1, beta2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub betas: Option<(f64, f64)>,
    /// AMSGrad variant of Adam (not supported; must be false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amsgrad: Option<bool>,
}

/// Units in which the cosine decay is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DecayUnits {
    /// Recordings seen (the reference).
    #[default]
    Recordings,
    /// Optimizer steps.
    Steps,
}

/// The `scheduler:` section: linear warmup then cosine decay to 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Warmup length in optimizer steps.
    pub warmup_steps: u64,
    /// Units of the cosine decay.
    pub decay_units: DecayUnits,
}

/// The `audio_chunking:` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AudioChunkingConfig {
    /// Chunk length in input frames (100 per second).
    pub size: u64,
    /// Overlap between chunks in frames; only 0 is supported.
    #[serde(default)]
    pub overlap: u64,
}

/// The `sequence_scheduler:` section (reference-spec §1.5, §5.6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequenceSchedulerConfig {
    /// Recordings between increases; -1 disables the scheduler.
    pub increase_every: i64,
    /// Recording position after which no new increase period starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after: Option<u64>,
    /// Nothing happens before this recording position.
    #[serde(default)]
    pub start_after: u64,
    /// Cap on the chunk length in frames.
    pub max_sequence_length: u64,
    /// Chunk length multiplier per increase.
    #[serde(default = "two")]
    pub increase_by_multiplier: f64,
    /// Batch size multiplier per increase (floored at 1).
    #[serde(default = "half")]
    pub batch_size_multiplier: f64,
    /// Multiply the rotary interpolation factor on each increase.
    #[serde(default)]
    pub interpolate_rotary: bool,
    /// Initial position counter (normally restored from a checkpoint).
    #[serde(default)]
    pub cur_position: u64,
    /// Initial counter since the last increase.
    #[serde(default)]
    pub steps_since_last_increase: u64,
}

fn two() -> f64 {
    2.0
}

fn half() -> f64 {
    0.5
}

/// The `wandb:` section. Logging goes to TensorBoard event files and JSONL;
/// `wandb sync --sync-tensorboard` uploads them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WandbConfig {
    /// Write the logs for W&B.
    #[serde(rename = "use")]
    pub enabled: bool,
    /// Project name.
    pub project_name: String,
    /// Run name.
    pub name: String,
    /// Run id to resume ('' starts a new run).
    pub id: String,
    /// Directory of W&B files.
    pub dir: String,
    /// Write the new run id back into the YAML file.
    pub update_config_with_wandb_id: bool,
}

impl Default for WandbConfig {
    fn default() -> Self {
        WandbConfig {
            enabled: false,
            project_name: "lcasr".into(),
            name: String::new(),
            id: String::new(),
            dir: "./wandb".into(),
            update_config_with_wandb_id: false,
        }
    }
}

/// The `checkpointing:` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointingConfig {
    /// Directory for checkpoints (created if missing).
    pub dir: String,
    /// Save when more than this many recordings were processed since the last save.
    pub save_every_n_steps: u64,
    /// Keep only this many newest checkpoints (0: keep all, as the reference);
    /// an lcasr extension.
    pub keep_last: u64,
}

impl Default for CheckpointingConfig {
    fn default() -> Self {
        CheckpointingConfig {
            dir: "checkpoints".into(),
            save_every_n_steps: 2000,
            keep_last: 0,
        }
    }
}

/// The `data:` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// The recording index: an lcasr manifest or a reference `audio_txt_pairs.json`.
    pub path: String,
    /// SentencePiece tokenizer model; absent means the reference's tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// A prepared held-out manifest scored (greedy WER) by scripts/train.rhai
    /// at the end of training; an lcasr extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_path: Option<String>,
}

/// The `spec_augment:` section (reference-spec §1.9, §7).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpecAugmentConfig {
    /// Number of time masks.
    pub n_time_masks: u64,
    /// Maximum time-mask width in frames (-1: derived from `min_p`).
    pub time_mask_param: i64,
    /// Number of frequency masks.
    pub n_freq_masks: u64,
    /// Maximum frequency-mask width in bins.
    pub freq_mask_param: i64,
    /// A different mask per example.
    pub iid_masks: bool,
    /// Maximum proportion of an axis one mask may cover (the reference's `max_p`).
    pub p: f64,
    /// When not -1, time-mask width = T·min_p / n_time_masks.
    pub min_p: f64,
    /// Masked values are 0 (else the mean of the valid input).
    pub zero_masking: bool,
}

impl Default for SpecAugmentConfig {
    fn default() -> Self {
        SpecAugmentConfig {
            n_time_masks: 2,
            time_mask_param: 100,
            n_freq_masks: 2,
            freq_mask_param: 27,
            iid_masks: true,
            p: 1.0,
            min_p: -1.0,
            zero_masking: false,
        }
    }
}

/// The training run seed: a number, or `random` for one derived from the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seed {
    /// A fixed seed.
    Fixed(u64),
    /// Derived from the time at start (recorded in the run directory).
    Random,
}

impl Serialize for Seed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Seed::Fixed(v) => s.serialize_u64(*v),
            Seed::Random => s.serialize_str("random"),
        }
    }
}

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SeedVisitor;
        impl Visitor<'_> for SeedVisitor {
            type Value = Seed;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number >= 0 or \"random\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seed, E> {
                u64::try_from(v).map(Seed::Fixed).map_err(|_| {
                    E::custom(format!(
                        "expected a whole number >= 0 or \"random\", found {v}"
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seed, E> {
                Ok(Seed::Fixed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seed, E> {
                if v == "random" {
                    Ok(Seed::Random)
                } else {
                    Err(E::custom(format!(
                        "expected a whole number >= 0 or \"random\", found {v:?}"
                    )))
                }
            }
        }
        d.deserialize_any(SeedVisitor)
    }
}

/// Compute dtype under autocast on GPUs (CPU training is float32); also
/// `--dtype` of `lcasr eval` / `transcribe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DtypeName {
    /// bfloat16 mixed precision (the reference's).
    #[default]
    Bfloat16,
    /// float16 mixed precision (training adds a dynamic loss scale).
    Float16,
    /// float32 throughout.
    Float32,
}

impl DtypeName {
    /// The dtype forward passes compute in under this name: bf16 or f16
    /// (mixed precision), `None` for float32.
    pub fn compute_dtype(self) -> Option<candle_core::DType> {
        match self {
            DtypeName::Bfloat16 => Some(candle_core::DType::BF16),
            DtypeName::Float16 => Some(candle_core::DType::F16),
            DtypeName::Float32 => None,
        }
    }
}

/// The `training:` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingConfig {
    /// Epoch (0-based) from which SpecAugment applies; -1 disables it.
    #[serde(default = "minus_one")]
    pub start_spec_augment_after_n_epochs: i64,
    /// Passes over the data.
    #[serde(default = "one")]
    pub max_epochs: u64,
    /// Recordings per batch (the initial value under a sequence scheduler).
    pub batch_size: u64,
    /// Take an optimizer step every k chunks.
    pub backprop_every: u64,
    /// Run backward every k chunks (losses in between are summed).
    #[serde(default = "one")]
    pub backwards_every: u64,
    /// Maximum global gradient L2 norm; <= 0 disables clipping.
    #[serde(default = "clip")]
    pub clip_value: f64,
    /// Seed of every random choice of the run.
    #[serde(default = "seed")]
    pub random_seed: Seed,
    /// Compute dtype on GPUs.
    #[serde(default)]
    pub dtype: DtypeName,
    /// Where the model trains: `cpu`, `cuda` or `cuda:N`. Left out of the
    /// resolved config when `cpu`, so CPU configs keep their hashes.
    #[serde(default = "cpu", skip_serializing_if = "is_cpu")]
    pub device: String,
    /// Transformer-XL cache length of the 2023 code; only 0 is supported.
    #[serde(default)]
    pub max_cache_length: u64,
}

fn cpu() -> String {
    "cpu".into()
}

fn is_cpu(device: &str) -> bool {
    device == "cpu"
}

fn minus_one() -> i64 {
    -1
}

fn one() -> u64 {
    1
}

fn clip() -> f64 {
    0.8
}

fn seed() -> Seed {
    Seed::Fixed(1234)
}
