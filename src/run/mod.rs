//! Run directories: manifests, metrics (JSONL and TensorBoard), progress and
//! plots.

pub mod metrics;
pub mod tensorboard;
