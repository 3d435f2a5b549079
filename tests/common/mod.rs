//! Helpers shared by the integration tests: where the parity fixtures live and
//! how to read them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// The fixture directory: `$LCASR_FIXTURES`, or `tests/fixtures` in this crate.
///
/// Tests must derive every shape from the files, so that any directory with the
/// same layout (other seeds and sizes) passes too.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("LCASR_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// Path of one fixture file.
pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// All tensors of a safetensors fixture, on the CPU.
pub fn load_tensors(name: &str) -> HashMap<String, Tensor> {
    let path = fixture(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// A JSON fixture.
pub fn load_json(name: &str) -> serde_json::Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {}: {e}", path.display()))
}

/// Flattened f32 values of a tensor (any dtype is converted).
pub fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("tensor to f32 vec")
}

/// Largest absolute element-wise difference between two equally sized slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}
