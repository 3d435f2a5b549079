//! Depthwise conv1d custom op against shifted `narrow` * weight sums.

mod ops_support;

use candle_core::{DType, Device, Tensor};
use lcasr_kernels::composed;
use lcasr_kernels::depthwise_conv::depthwise_conv1d;
use ops_support::{check_op, Rng};

#[test]
fn depthwise_conv1d_matches_composed() {
    let mut rng = Rng::new(5);
    for &(b, t, c, k) in &[
        (2, 37, 16, 9),
        (1, 5, 3, 9),
        (3, 20, 33, 3),
        (2, 1, 8, 1),
        (1, 64, 256, 31),
    ] {
        let x = rng.var(&[b, t, c], -1.0, 1.0);
        let w = rng.var(&[c, k], -0.5, 0.5);
        let bias = rng.var(&[c], -0.5, 0.5);
        check_op(
            &format!("depthwise_conv1d b={b} t={t} c={c} k={k}"),
            &mut rng,
            &[&x, &w, &bias],
            || depthwise_conv1d(&x, &w, &bias),
            || composed::depthwise_conv1d(&x, &w, &bias),
            1e-4,
        );
    }
}

#[test]
fn depthwise_conv1d_accepts_strided_input() {
    let mut rng = Rng::new(6);
    let x = rng.var(&[2, 12, 10], -1.0, 1.0);
    let w = rng.var(&[12, 5], -0.5, 0.5);
    let bias = rng.var(&[12], -0.5, 0.5);
    check_op(
        "depthwise_conv1d transposed",
        &mut rng,
        &[&x, &w, &bias],
        || depthwise_conv1d(&x.transpose(1, 2)?, &w, &bias),
        || composed::depthwise_conv1d(&x.transpose(1, 2)?, &w, &bias),
        1e-4,
    );
}

#[test]
fn depthwise_conv1d_rejects_bad_input() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 3), DType::F32, &dev).unwrap();
    let even = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
    let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
    assert!(depthwise_conv1d(&x, &even, &b).is_err());
    let w = Tensor::zeros((3, 3), DType::F64, &dev).unwrap();
    assert!(depthwise_conv1d(&x, &w, &b)
        .unwrap_err()
        .to_string()
        .contains("f32"));
}
