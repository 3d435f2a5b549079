//! Fused kernels for lcasr: each op has a forward and a backward pass and is
//! exposed as a candle custom op.
