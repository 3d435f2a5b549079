//! SiLU and tanh-GELU custom ops against candle's own differentiable `silu` and
//! `gelu` (forward and backward), over sizes that cover the parallel chunking.

mod ops_support;

use candle_core::{DType, Device, Tensor};
use lcasr_kernels::activation::{gelu_tanh, silu};
use ops_support::{check_op, Rng};

#[test]
fn silu_matches_candle() {
    let mut rng = Rng::new(11);
    for dims in [&[3usize, 5][..], &[2, 7, 1000], &[40_000], &[1]] {
        let x = rng.var(dims, -30.0, 30.0);
        check_op(
            &format!("silu {dims:?}"),
            &mut rng,
            &[&x],
            || silu(&x),
            || x.silu(),
            2e-6,
        );
    }
}

#[test]
fn gelu_tanh_matches_candle() {
    let mut rng = Rng::new(12);
    for (dims, range) in [
        (&[3usize, 5][..], 3.0),
        (&[2, 7, 1000], 6.0),
        (&[40_000], 12.0),
        (&[1], 1.0),
    ] {
        let x = rng.var(dims, -range, range);
        check_op(
            &format!("gelu_tanh {dims:?}"),
            &mut rng,
            &[&x],
            || gelu_tanh(&x),
            || x.gelu(),
            2e-6,
        );
    }
}

#[test]
fn activations_saturate_at_extremes() {
    let x = Tensor::new(&[-1e4f32, -100.0, 0.0, 100.0, 1e4], &Device::Cpu).unwrap();
    for (name, y) in [("silu", silu(&x)), ("gelu_tanh", gelu_tanh(&x))] {
        let y: Vec<f32> = y.unwrap().to_vec1().unwrap();
        // Large negative inputs vanish (to below 1e-30), large positive ones pass through.
        assert!(y[..2].iter().all(|v| v.abs() < 1e-30), "{name}: {y:?}");
        assert_eq!(y[2..], [0.0, 100.0, 1e4], "{name}");
    }
}

#[test]
fn other_dtypes_use_candles_ops() {
    let x = Tensor::new(&[-2.0f64, -0.5, 0.0, 0.5, 3.0], &Device::Cpu).unwrap();
    assert_eq!(x.dtype(), DType::F64);
    let same = |a: Tensor, b: Tensor| {
        let (a, b): (Vec<f64>, Vec<f64>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
        assert_eq!(a, b);
    };
    same(silu(&x).unwrap(), x.silu().unwrap());
    same(gelu_tanh(&x).unwrap(), x.gelu().unwrap());
}
