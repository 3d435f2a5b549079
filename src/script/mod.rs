//! The Rhai scripting host: engine construction, sandboxing and one
//! registration module per domain.
