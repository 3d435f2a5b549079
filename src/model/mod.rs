//! The Conformer-CTC encoder (`SCConformerXL`-compatible) and reference
//! checkpoint import. Parameter names equal the reference state dict's, so a
//! reference checkpoint loads without a renaming table.

mod builder;
mod checkpoint;
mod checkpointing;
mod conformer;
mod decoder;
mod encoder;
mod layers;
mod subsampling;

pub use checkpoint::{load_reference_pt, load_safetensors, ReferenceCheckpoint};
pub use conformer::RenormState;
pub use encoder::{Encoder, EncoderOutput, ForwardOptions, Hidden};
