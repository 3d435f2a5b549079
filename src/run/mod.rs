//! Run directories: manifests, metrics (JSONL and TensorBoard), progress and
//! plots.

pub mod tensorboard;
