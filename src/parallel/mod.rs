//! Data-parallel training: ranks that each train on a share of every global
//! batch and keep identical weights by summing their gradients, with
//! BatchRenorm statistics taken over the whole batch.
//!
//! The communication sits behind [`collective::Collective`]; the in-process
//! implementation ([`collective::InProcessGroup`], threads as ranks) runs the
//! whole logic on the CPU, [`tcp`] between processes ([`processes`] starts
//! and watches them); with the `nccl` feature, `nccl` runs the same code on
//! the GPUs of one machine, one process per GPU. [`driver::train_data_parallel`]
//! is the direct training procedure (`lcasr::train::direct`) over such a group: one rank
//! reproduces the direct run bit for bit, and with dropout off any number of
//! ranks trains the same model up to floating-point summation order.

pub mod collective;
pub mod driver;
pub mod grads;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod processes;
pub mod shard;
pub mod sync_norm;
pub mod tcp;
pub mod threads;

pub use collective::{Collective, InProcessComm, InProcessGroup, RankLeft};
pub use driver::{train_data_parallel, DataParallelOptions, DataParallelRun};
