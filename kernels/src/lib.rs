//! Fused kernels for lcasr: each op has a forward and a backward pass and is
//! exposed as a candle custom op.

pub mod activation;
pub mod attention;
pub mod batch_renorm;
pub mod conv2d;
mod cpu_f32;
pub mod ctc;
pub mod depthwise_conv;
pub mod glu;
pub mod norm;
pub mod rotary;
pub mod softmax;
