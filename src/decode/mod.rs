//! Decoding: greedy and beam-search CTC, long-form windowing and timestamps.
