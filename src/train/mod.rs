//! Training core: optimizers, learning-rate and sequence-length schedules,
//! gradient clipping, seeded randomness and training-state serialisation.
