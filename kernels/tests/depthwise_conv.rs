//! Depthwise conv1d custom op against shifted `narrow` * weight sums.

mod ops_support;

use candle_core::{DType, Device, Result, Tensor};
use lcasr_kernels::depthwise_conv::depthwise_conv1d;
use ops_support::{check_op, Rng};

/// y[:, t, c] = bias[c] + sum_k w[c, k] * x[:, t + k - pad, c], built from differentiable ops.
fn composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_bsz, t, _c) = x.dims3()?;
    let k = w.dim(1)?;
    let pad = k / 2;
    let xp = x.pad_with_zeros(1, pad, pad)?;
    let mut y = b.reshape((1, 1, ()))?.broadcast_as(x.shape())?.clone();
    for ki in 0..k {
        let tap = w.narrow(1, ki, 1)?.reshape((1, 1, ()))?;
        y = (y + xp.narrow(1, ki, t)?.broadcast_mul(&tap)?)?;
    }
    Ok(y)
}

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
            || composed(&x, &w, &bias),
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
        || composed(&x.transpose(1, 2)?, &w, &bias),
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
