//! Decoding: greedy and beam-search CTC, long-form windowing and timestamps.

pub mod align;
pub mod arpa;
pub mod beam;
pub mod greedy;
pub mod window;
