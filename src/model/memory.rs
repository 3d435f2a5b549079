//! Predicted peak memory of a training step, from the model config alone.
//!
//! The prediction counts what this implementation keeps, tensor by tensor:
//! during a training step every tensor the forward pass creates stays alive
//! (the autograd graph holds it) until the backward pass ends, so the peak is
//! the parameters, their gradients and optimizer state, every activation of
//! the forward, and the transient gradients of the block that backward is
//! working on. Activation checkpointing keeps only a checkpointed block's
//! input and output and re-creates one block's activations during backward.
//! Attention keeps no score matrix (memory linear in length), so activations
//! grow linearly with batch x frames.
//!
//! `lcasr memory` prints it per sequence-scheduler stage; the training script
//! prints it next to the measured peak (`peak_memory()`), and a test keeps the
//! two within a stated tolerance on CPU.

use lcasr_kernels::conv2d::out_len;

use crate::config::{Activation, ConvNorm, ModelConfig, Subsampling};

/// Sizes of one training step's memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakEstimate {
    /// Parameters (f32 master weights), plus a compute-precision copy when
    /// activations are narrower than f32.
    pub parameters: u64,
    /// Parameter gradients (f32).
    pub gradients: u64,
    /// Optimizer state (f32 buffers per parameter).
    pub optimizer: u64,
    /// Activations the forward pass leaves for the backward pass.
    pub activations: u64,
    /// Transient memory of the backward pass: activation gradients and
    /// temporaries, and a checkpointed block's recomputed activations.
    pub backward: u64,
    /// Input features and the CTC head's output and gradient.
    pub io: u64,
}

impl PeakEstimate {
    /// The predicted peak: the sum of the parts.
    pub fn total(&self) -> u64 {
        self.parameters
            + self.gradients
            + self.optimizer
            + self.activations
            + self.backward
            + self.io
    }
}

/// What a training step looks like, beyond the model config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepShape {
    /// Recordings per chunk.
    pub batch: usize,
    /// Input (spectrogram) frames per recording chunk.
    pub frames: usize,
    /// Output classes of the CTC head (vocabulary + blank).
    pub classes: usize,
    /// Trainable parameter count.
    pub parameters: usize,
    /// f32 buffers the optimizer keeps per parameter (MADGRAD 3, Adam 2).
    pub optimizer_buffers: usize,
    /// Bytes per activation element: 4 for f32, 2 for bf16/fp16.
    pub activation_bytes: usize,
}

/// Frames (or bins) after one kernel-3, stride-2 stage; none of none.
fn stride2(len: u64) -> u64 {
    if len == 0 {
        0
    } else {
        out_len(len as usize) as u64
    }
}

/// Encoder frames after subsampling `frames` input frames.
pub fn encoder_frames(cfg: &ModelConfig, frames: usize) -> usize {
    let stages = cfg.subsampling_factor.trailing_zeros();
    (0..stages).fold(frames as u64, |t, _| stride2(t)) as usize
}

/// Predicted peak memory of one forward + backward + optimizer step.
pub fn training_peak(cfg: &ModelConfig, step: &StepShape) -> PeakEstimate {
    let a = step.activation_bytes as u64;
    let p = step.parameters as u64;
    let n = encoder_frames(cfg, step.frames);
    let positions = (step.batch * n) as u64;
    let block = block_elements(cfg) * positions;
    let layers = cfg.n_layers;
    let every = cfg.checkpoint_every_n_layers;
    let checkpointed = if every == 0 {
        0
    } else {
        layers.div_ceil(every)
    };
    let plain = layers - checkpointed;
    let d = cfg.d_model;
    // A checkpointed block keeps its output twice (the op's result and the
    // copy it hands to the recomputation) and nothing else.
    let kept_per_checkpointed = 2 * d * positions;
    let self_cond = if cfg.self_conditioning {
        layers.saturating_sub(1) * self_condition_elements(cfg, step.classes) * positions
    } else {
        0
    };
    let activations = (plain * block
        + checkpointed * kept_per_checkpointed
        + self_cond
        + subsampling_elements(cfg, step.batch, step.frames, n))
        * a;
    // Backward's transient memory, calibrated against the live bytes
    // measured on CPU (tests/memory.rs; 2 and 4 layers, 32 and 128
    // subsampling channels, with and without checkpointing, all within 10 %):
    // while it differentiates a block it holds gradients and temporaries of
    // about 1.3 blocks' activations (1.7 for a checkpointed block, whose
    // activations are re-created first), and while it differentiates the
    // subsampling, gradients of the convolution planes; on top of either,
    // about a third of a block's activations per block that ran without
    // checkpointing stays pending until the backward pass ends.
    let layer_phase = if checkpointed > 0 {
        block * 17 / 10
    } else {
        block * 13 / 10
    };
    let pending = plain * block * 34 / 100;
    let backward = (layer_phase.max(subsampling_backward_elements(cfg, step.batch, step.frames))
        + pending)
        * a;
    let classes = step.classes as u64;
    let io = (step.batch * step.frames * cfg.feat_in as usize) as u64 * 4
        + positions * (classes * 3 + if cfg.decoder_norm { 2 * d } else { 0 }) * a;
    let weights_copy = if a < 4 { p * a } else { 0 };
    PeakEstimate {
        parameters: p * 4 + weights_copy,
        gradients: p * 4,
        optimizer: p * 4 * step.optimizer_buffers as u64,
        activations,
        backward,
        io,
    }
}

/// Elements one Conformer block keeps per encoder position (batch x frame)
/// when it runs without checkpointing: each tensor the block's forward
/// creates, in the order `ConformerLayer::forward` creates them.
fn block_elements(cfg: &ModelConfig) -> u64 {
    let d = cfg.d_model;
    let hidden = cfg.expansion_factor * d;
    let inner = cfg.n_heads * cfg.head_dim;
    let conv = (d as f64 * cfg.conv_expansion_factor) as u64;
    let dropout = |p: f64| if p > 0.0 { 2 * d } else { 0 };
    let sandwich = if cfg.sandwich_norm { d } else { 0 };
    // The padding mask multiplies a copy in; counted as always present (the
    // last chunk of a batch is padded).
    let half_ff = d // norm
        + hidden + if cfg.bias_in_ff { hidden } else { 0 } // fc1 (+ bias)
        + hidden // GELU
        + d + if cfg.bias_in_ff { d } else { 0 } // fc2 (+ bias)
        + sandwich
        + d // x 0.5
        + dropout(cfg.dropout_ff)
        + d; // residual
    let attention = d // norm
        + d // padding mask
        + 3 * inner + if cfg.qkv_bias { 3 * inner } else { 0 }
        + if cfg.learned_rotary { 6 * inner } else { 0 }
        + inner // attention output
        + cfg.n_heads // log-sum-exp per head
        + d // out projection
        + dropout(cfg.dropout_ff.min(0.1))
        + sandwich
        + d; // residual
    let conv_module = if cfg.transformer {
        0
    } else {
        let norm_extra = match cfg.conv_norm {
            ConvNorm::BatchRenorm | ConvNorm::BatchNorm => 0,
            _ => conv,
        };
        d // norm
            + 4 * conv // pointwise 1 and its bias
            + conv // GLU
            + conv // padding mask
            + conv // depthwise conv
            + conv + norm_extra // norm + SiLU
            + 2 * d // pointwise 2 and its bias
            + dropout(cfg.dropout_conv)
            + d // residual
    };
    let ff_modules = if cfg.transformer { 1 } else { 2 };
    ff_modules * half_ff + attention + conv_module + d
}

/// Elements self-conditioning keeps per encoder position after a block.
fn self_condition_elements(cfg: &ModelConfig, classes: usize) -> u64 {
    let d = cfg.d_model;
    let c = classes as u64;
    let norm = if cfg.decoder_norm { d } else { 0 };
    let gate = if cfg.gated_sc { 2 + d } else { 0 };
    // norm, probabilities, reprojection and its bias, residual.
    norm + c + 3 * d + gate
}

/// Elements the subsampling keeps for a chunk of `batch` x `frames` input
/// frames giving `n` encoder frames.
fn subsampling_elements(cfg: &ModelConfig, batch: usize, frames: usize, n: usize) -> u64 {
    let c = cfg.subsampling_channels();
    let stages = cfg.subsampling_factor.trailing_zeros();
    let mut t = frames as u64;
    let mut f = cfg.feat_in;
    // The transposed input, made contiguous for the first convolution.
    let mut total = t * f;
    for s in 0..stages {
        t = stride2(t);
        f = stride2(f);
        let plane = c * t * f;
        // A full convolution fused with SiLU keeps only its output; any other
        // activation is one more tensor.
        let activation = match cfg.subsampling_act {
            Activation::Silu | Activation::None => 0,
            _ => plane,
        };
        total += match cfg.subsampling {
            // Depthwise, pointwise, its bias, the activation.
            Subsampling::DwStriding if s > 0 => {
                3 * plane
                    + if cfg.subsampling_act == Activation::None {
                        0
                    } else {
                        plane
                    }
            }
            _ => plane + activation,
        };
    }
    let d = cfg.d_model;
    // Channels-last copy, out projection (+ bias and norm).
    let tail = c * f + d + if cfg.subsampling_norm_out { 2 * d } else { 0 };
    batch as u64 * total + (batch * n) as u64 * tail
}

/// Elements the subsampling's backward holds at its peak: the gradients of
/// the first two convolution planes (twice the first, six times the second,
/// calibrated as [`training_peak`] says).
fn subsampling_backward_elements(cfg: &ModelConfig, batch: usize, frames: usize) -> u64 {
    let c = cfg.subsampling_channels();
    let stages = cfg.subsampling_factor.trailing_zeros();
    let (mut t, mut f) = (frames as u64, cfg.feat_in);
    let mut planes = Vec::new();
    for _ in 0..stages.min(2) {
        t = stride2(t);
        f = stride2(f);
        planes.push(c * t * f);
    }
    let first = planes.first().copied().unwrap_or(0);
    let second = planes.get(1).copied().unwrap_or(0);
    batch as u64 * (2 * first + 6 * second)
}

/// Bytes as a short human-readable string (GiB above 1 GiB, else MiB).
pub fn format_bytes(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(batch: usize, frames: usize) -> StepShape {
        StepShape {
            batch,
            frames,
            classes: 129,
            parameters: 1_000_000,
            optimizer_buffers: 3,
            activation_bytes: 4,
        }
    }

    #[test]
    fn activations_grow_linearly_with_batch_times_frames() {
        let cfg = ModelConfig::default();
        let a = training_peak(&cfg, &step(2, 8192));
        let b = training_peak(&cfg, &step(4, 8192));
        let c = training_peak(&cfg, &step(2, 16384));
        let ratio = |x: u64, y: u64| x as f64 / y as f64;
        assert!((ratio(b.activations, a.activations) - 2.0).abs() < 1e-3);
        assert!((ratio(c.activations, a.activations) - 2.0).abs() < 1e-3);
        assert_eq!(a.parameters, b.parameters);
    }

    #[test]
    fn checkpointing_every_layer_keeps_a_fraction() {
        let plain = ModelConfig::default();
        let ckpt = ModelConfig {
            checkpoint_every_n_layers: 1,
            ..ModelConfig::default()
        };
        let a = training_peak(&plain, &step(1, 360_000));
        let b = training_peak(&ckpt, &step(1, 360_000));
        assert!(b.activations * 2 < a.activations, "{a:?} vs {b:?}");
        assert!(b.total() < a.total());
    }

    #[test]
    fn narrow_activations_halve_activation_bytes_and_add_a_weight_copy() {
        let cfg = ModelConfig::default();
        let f32s = training_peak(&cfg, &step(2, 8192));
        let bf16 = training_peak(
            &cfg,
            &StepShape {
                activation_bytes: 2,
                ..step(2, 8192)
            },
        );
        assert_eq!(f32s.activations, 2 * bf16.activations);
        assert_eq!(bf16.parameters, f32s.parameters + 2_000_000);
    }

    #[test]
    fn encoder_frames_follow_the_stride_two_stages() {
        let cfg = ModelConfig::default();
        assert_eq!(encoder_frames(&cfg, 360_000), 45_000);
        assert_eq!(encoder_frames(&cfg, 17), 3);
        assert_eq!(encoder_frames(&cfg, 0), 0);
    }
}
