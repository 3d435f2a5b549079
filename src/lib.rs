//! lcasr: train and run long-context Conformer-CTC speech recognisers.
//!
//! The library is usable without the command-line interface: every command of
//! the `lcasr` binary is a thin wrapper around the functions here.

pub mod audio;
pub mod config;
pub mod data;
pub mod decode;
pub mod experiment;
pub mod fsutil;
pub mod hash;
pub mod infer;
pub mod model;
pub mod parallel;
pub mod rank_processes;
pub mod run;
pub mod runtime;
pub mod script;
pub mod text;
pub mod train;
