//! Typed, validated configuration.
