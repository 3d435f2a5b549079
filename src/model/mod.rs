//! The Conformer-CTC encoder (`SCConformerXL`-compatible) and reference
//! checkpoint import.
