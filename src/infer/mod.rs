//! Inference: loading a trained model from any of the places one is kept,
//! long-form posteriors at a chosen context length, corpus evaluation
//! (`lcasr eval`) and transcription with word timestamps (`lcasr transcribe`).

pub mod eval;
pub mod load;
pub mod longform;
pub mod transcribe;

pub use eval::{evaluate, format_context, format_table, parse_context, EvalReport};
pub use load::{load_model, LoadOptions, LoadedModel};
pub use longform::{log_probs, ContextOptions, LongformMode};
pub use transcribe::{transcribe, Transcript};
