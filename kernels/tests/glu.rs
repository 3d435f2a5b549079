//! GLU custom op against a composition of differentiable candle ops.

mod ops_support;

use candle_core::{DType, Device, Tensor};
use lcasr_kernels::composed;
use lcasr_kernels::glu::glu;
use ops_support::{check_op, Rng};

#[test]
fn glu_matches_composed() {
    let mut rng = Rng::new(4);
    for dims in [&[2usize, 7, 128][..], &[5, 2], &[3, 1, 4, 66], &[100, 18]] {
        let x = rng.var(dims, -6.0, 6.0);
        check_op(
            &format!("glu {dims:?}"),
            &mut rng,
            &[&x],
            || glu(&x),
            || composed::glu(&x),
            1e-5,
        );
    }
}

#[test]
fn glu_rejects_bad_input() {
    let odd = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(glu(&odd).is_err());
    let f64s = Tensor::zeros((2, 4), DType::F64, &Device::Cpu).unwrap();
    assert!(glu(&f64s).unwrap_err().to_string().contains("f32"));
}
