//! Data pipeline: manifests, datasets, batching, chunking with word timings,
//! SpecAugment and background prefetch.

pub mod batching;
pub mod chunking;
pub mod dataset;
pub mod manifest;
pub mod prepare;
pub mod spec_augment;
pub mod torch_spec;
pub mod transcripts;
