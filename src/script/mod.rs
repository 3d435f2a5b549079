//! The Rhai scripting host: engine construction, sandboxing and one
//! registration module per domain (tensors, models, training, data, runs,
//! evaluation). See docs/rhai-api.md for the API and scripts/ for examples.

pub mod data_api;
pub mod docs;
pub mod errors;
pub mod eval_api;
pub mod host;
pub mod model_api;
pub mod resolver;
pub mod run_api;
pub mod session;
pub mod tensor_api;
pub mod train_api;

pub use host::{compile, CompileOptions, Compiled, ScriptFailure};
pub use session::SessionSetup;
