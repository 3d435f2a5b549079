//! Run directories: manifests, metrics (JSONL and TensorBoard), progress and
//! plots.

pub mod checkpoints;
pub mod metrics;
pub mod plot;
pub mod run_dir;
pub mod tensorboard;
