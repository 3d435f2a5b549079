//! LayerNorm / RMSNorm custom ops against compositions of differentiable candle ops.

mod ops_support;

use candle_core::{DType, Tensor};
use lcasr_kernels::composed;
use lcasr_kernels::norm::{layer_norm, rms_norm};
use ops_support::{check_op, Rng};

const SHAPES: &[&[usize]] = &[&[3, 5, 64], &[7, 33], &[2, 3, 4, 257], &[1, 1], &[130, 16]];

#[test]
fn layer_norm_matches_composed() {
    let mut rng = Rng::new(1);
    for dims in SHAPES {
        let d = *dims.last().unwrap();
        let x = rng.var(dims, -2.0, 3.0);
        let w = rng.var(&[d], 0.5, 1.5);
        let b = rng.var(&[d], -0.5, 0.5);
        check_op(
            &format!("layer_norm {dims:?}"),
            &mut rng,
            &[&x, &w, &b],
            || layer_norm(&x, &w, &b, 1e-5),
            || composed::layer_norm(&x, &w, &b, 1e-5),
            1e-4,
        );
    }
}

#[test]
fn rms_norm_matches_composed() {
    let mut rng = Rng::new(2);
    for dims in SHAPES {
        let d = *dims.last().unwrap();
        let x = rng.var(dims, -2.0, 3.0);
        let w = rng.var(&[d], 0.5, 1.5);
        check_op(
            &format!("rms_norm {dims:?}"),
            &mut rng,
            &[&x, &w],
            || rms_norm(&x, &w, 1e-5),
            || composed::rms_norm(&x, &w, 1e-5),
            1e-4,
        );
    }
}

#[test]
fn norms_accept_strided_input() {
    let mut rng = Rng::new(3);
    let x = rng.var(&[40, 6], -1.0, 1.0);
    let w = rng.var(&[40], 0.5, 1.5);
    let b = rng.var(&[40], -0.5, 0.5);
    check_op(
        "layer_norm transposed input",
        &mut rng,
        &[&x, &w, &b],
        || layer_norm(&x.t()?, &w, &b, 1e-5),
        || composed::layer_norm(&x.t()?, &w, &b, 1e-5),
        1e-4,
    );
}

#[test]
fn norms_reject_other_dtypes() {
    let x = Tensor::zeros((2, 4), DType::F64, &candle_core::Device::Cpu).unwrap();
    let w = Tensor::ones(4, DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = layer_norm(&x, &w, &w, 1e-5).unwrap_err().to_string();
    assert!(err.contains("f32"), "{err}");
    assert!(rms_norm(&x, &w, 1e-5).is_err());
    let w3 = Tensor::ones(3, DType::F32, &candle_core::Device::Cpu).unwrap();
    let x32 = x.to_dtype(DType::F32).unwrap();
    assert!(layer_norm(&x32, &w3, &w3, 1e-5).is_err());
}
