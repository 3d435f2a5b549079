//! The Conformer-CTC encoder (`SCConformerXL`-compatible) and reference
//! checkpoint import. Parameter names equal the reference state dict's, so a
//! reference checkpoint loads without a renaming table.

mod builder;
mod checkpoint;
mod checkpointing;
mod conformer;
mod conv_norm;
mod decoder;
mod encoder;
mod layers;
pub mod memory;
mod subsampling;

pub use checkpoint::{load_reference_pt, load_safetensors, ReferenceCheckpoint};
pub use conv_norm::{
    batch_norm_silu, group_norm_silu, layer_norm_silu, BatchMoments, BatchNormMode, BatchNormState,
    RenormState, RunningStats, BATCH_NORM_MOMENTUM, CONV_NORM_EPS, GROUP_NORM_GROUPS,
};
pub use encoder::{Encoder, EncoderOutput, ForwardOptions, Hidden};
