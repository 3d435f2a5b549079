//! Fused softmax over the last dimension against a composition of
//! differentiable candle ops, forward and backward.

mod ops_support;

use candle_core::{DType, Device, Result, Tensor, D};
use lcasr_kernels::softmax::{linear_softmax, softmax_last_dim};
use ops_support::{check_op, Rng};

fn composed(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

#[test]
fn softmax_matches_composed() {
    let mut rng = Rng::new(21);
    // Rows shorter and longer than a task, a single column, ranks 1 to 4.
    for dims in [
        &[7usize][..],
        &[3, 1],
        &[2, 5, 4097],
        &[9, 33],
        &[2, 2, 3, 300],
    ] {
        let x = rng.var(dims, -20.0, 20.0);
        check_op(
            &format!("softmax {dims:?}"),
            &mut rng,
            &[&x],
            || softmax_last_dim(&x),
            || composed(&x),
            1e-5,
        );
    }
}

#[test]
fn rows_sum_to_one_and_extremes_stay_finite() {
    let x = Tensor::new(&[[1e4f32, -1e4, 0.0], [-1e30, -1e30, -1e30]], &Device::Cpu).unwrap();
    let y: Vec<Vec<f32>> = softmax_last_dim(&x).unwrap().to_vec2().unwrap();
    assert_eq!(y[0], [1.0, 0.0, 0.0]);
    for v in &y[1] {
        assert!((v - 1.0 / 3.0).abs() < 1e-6, "{y:?}");
    }
}

#[test]
fn other_dtypes_and_empty_rows_use_the_composition() {
    let x = Tensor::new(&[[0.5f64, -1.0, 2.0]], &Device::Cpu).unwrap();
    let (a, b): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (
        softmax_last_dim(&x).unwrap().to_vec2().unwrap(),
        composed(&x).unwrap().to_vec2().unwrap(),
    );
    assert_eq!(a, b);
    let empty = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(softmax_last_dim(&empty).unwrap().dims(), [3, 0]);
    let scalar = Tensor::new(1.0f32, &Device::Cpu).unwrap();
    assert!(softmax_last_dim(&scalar).is_err());
}

fn composed_linear_softmax(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (rows, d) = (x.elem_count() / x.dim(D::Minus1)?, x.dim(D::Minus1)?);
    let logits = x.reshape((rows, d))?.matmul(&w.t()?)?.broadcast_add(b)?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap() = w.dim(0)?;
    composed(&logits.reshape(dims)?)
}

#[test]
fn linear_softmax_matches_composed() {
    let mut rng = Rng::new(22);
    // (input dims, classes): rows in one task and in several, ranks 2 and 3.
    for (dims, c) in [
        (&[5usize, 8][..], 3usize),
        (&[2, 37, 16], 65),
        (&[300, 4], 130),
    ] {
        let x = rng.var(dims, -2.0, 2.0);
        let w = rng.var(&[c, dims[dims.len() - 1]], -1.0, 1.0);
        let b = rng.var(&[c], -1.0, 1.0);
        check_op(
            &format!("linear_softmax {dims:?} x {c}"),
            &mut rng,
            &[&x, &w, &b],
            || linear_softmax(&x, &w, &b),
            || composed_linear_softmax(&x, &w, &b),
            1e-5,
        );
    }
}

#[test]
fn linear_softmax_rejects_mismatched_shapes() {
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let err = linear_softmax(&x, &w, &b).unwrap_err().to_string();
    assert!(err.contains("weight (C, 4)"), "{err}");
}
