//! Training core: optimizers, learning-rate and sequence-length schedules,
//! gradient clipping, seeded randomness and training-state serialisation.

pub mod adam;
pub mod clip;
pub mod direct;
pub mod exact_f64;
pub mod loss;
pub mod loss_scale;
pub mod lr_schedule;
pub mod madgrad;
pub mod memory_plan;
pub mod mirror_madgrad;
pub mod optimizer;
pub mod rng;
pub mod sequence_schedule;
pub mod state;
