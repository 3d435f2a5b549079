//! Fused kernels for lcasr: each op has a forward and a backward pass and is
//! exposed as a candle custom op. The kernels run on CPU; on any other device
//! each op runs as its composition of candle ops ([`composed`]).

pub mod activation;
pub mod attention;
pub mod batch_renorm;
pub mod composed;
pub mod conv2d;
mod cpu_f32;
pub mod ctc;
pub mod depthwise_conv;
pub mod glu;
pub mod norm;
pub mod rotary;
pub mod softmax;
