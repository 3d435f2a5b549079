//! The ops' composed path as it runs where no native kernel exists: one
//! graph node per op that keeps only its inputs and output and recomputes
//! the composition in the backward (`src/recompute.rs`). Through that node,
//! every op must give the output and the gradients of its plain composition
//! (`lcasr_kernels::composed`, which records every intermediate), in f32 and
//! in bf16, and in inference it must add no node at all.

mod ops_support;

use candle_core::{DType, Result, Tensor, Var};
use lcasr_kernels::batch_renorm::{batch_renorm_silu, RenormMode};
use lcasr_kernels::composed;
use lcasr_kernels::conv2d::{conv2d_k3s2_silu, depthwise_conv2d_k3s2};
use lcasr_kernels::depthwise_conv::depthwise_conv1d;
use lcasr_kernels::glu::glu;
use lcasr_kernels::norm::{layer_norm, rms_norm};
use lcasr_kernels::softmax::{linear_softmax, softmax_last_dim};
use lcasr_kernels::with_composed_ops;
use ops_support::{assert_close, Rng};

type Op = fn(&[Tensor]) -> Result<Tensor>;

/// A fixed gradient probe of shape `dims`: values in [-1, 1], all different.
fn probe(dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7919).sin()).collect();
    Tensor::from_vec(v, dims, &candle_core::Device::Cpu).unwrap()
}

/// `dispatched` (the op, forced onto its composed path) against `plain` (the
/// composition itself) on `inputs` cast to `dtype`: outputs and gradients.
fn check(what: &str, inputs: &[Tensor], dtype: DType, dispatched: Op, plain: Op) {
    let run = |f: Op| -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = with_composed_ops(|| f(&tensors)).unwrap();
        // Not ones: the gradient of a softmax's sum is zero.
        let probe = probe(out.dims()).to_dtype(out.dtype()).unwrap();
        let grads = (&out * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
            .collect();
        (out, grads)
    };
    let (want, want_grads) = run(plain);
    let (got, got_grads) = run(dispatched);
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    // The same computations in the same order: equal up to rounding.
    let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
    assert_close(
        &format!("{what} {dtype:?} output"),
        &f32_of(&got),
        &f32_of(&want),
        tol,
    );
    for (i, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
        assert_close(
            &format!("{what} {dtype:?} gradient {i}"),
            &f32_of(g),
            &f32_of(w),
            tol,
        );
    }
    // Inference: the output alone, the same.
    let plain_inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
    let out = with_composed_ops(|| dispatched(&plain_inputs)).unwrap();
    assert_close(
        &format!("{what} {dtype:?} inference"),
        &f32_of(&out),
        &f32_of(&want),
        tol,
    );
}

const RM: [f32; 6] = [0.1, -0.2, 0.3, 0.0, 0.5, -0.4];
const RS: [f32; 6] = [1.0, 0.5, 2.0, 1.5, 0.8, 1.2];
const LENGTHS: [usize; 2] = [9, 5];

fn renorm_train() -> RenormMode<'static> {
    RenormMode::Train {
        running_mean: &RM,
        running_std: &RS,
        rmax: 1.5,
        dmax: 0.5,
        eps: 1e-3,
        lengths: Some(&LENGTHS),
    }
}

#[test]
fn composed_ops_through_the_recompute_node_match_their_compositions() {
    let mut rng = Rng::new(11);
    let seq = rng.tensor(&[2, 9, 6], -1.5, 1.5);
    let (w6, b6) = (rng.tensor(&[6], 0.5, 1.5), rng.tensor(&[6], -0.5, 0.5));
    let plane = rng.tensor(&[2, 3, 7, 6], -1.0, 1.0);
    let cases: Vec<(&str, Vec<Tensor>, Op, Op)> = vec![
        (
            "layer_norm",
            vec![seq.clone(), w6.clone(), b6.clone()],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            |t| composed::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        ),
        (
            "rms_norm",
            vec![seq.clone(), w6.clone()],
            |t| rms_norm(&t[0], &t[1], 1e-5),
            |t| composed::rms_norm(&t[0], &t[1], 1e-5),
        ),
        (
            "glu",
            vec![seq.clone()],
            |t| glu(&t[0]),
            |t| composed::glu(&t[0]),
        ),
        (
            "softmax_last_dim",
            vec![seq.clone()],
            |t| softmax_last_dim(&t[0]),
            |t| composed::softmax_last_dim(&t[0]),
        ),
        (
            "linear_softmax",
            vec![
                seq.clone(),
                rng.tensor(&[10, 6], -0.5, 0.5),
                rng.tensor(&[10], -0.5, 0.5),
            ],
            |t| linear_softmax(&t[0], &t[1], &t[2]),
            |t| composed::linear_softmax(&t[0], &t[1], &t[2]),
        ),
        (
            "depthwise_conv1d",
            vec![seq.clone(), rng.tensor(&[6, 5], -0.5, 0.5), b6.clone()],
            |t| depthwise_conv1d(&t[0], &t[1], &t[2]),
            |t| composed::depthwise_conv1d(&t[0], &t[1], &t[2]),
        ),
        (
            "conv2d_k3s2_silu",
            vec![
                plane.clone(),
                rng.tensor(&[4, 3, 3, 3], -0.5, 0.5),
                rng.tensor(&[4], -0.5, 0.5),
            ],
            |t| conv2d_k3s2_silu(&t[0], &t[1], &t[2]),
            |t| composed::conv2d_k3s2_silu(&t[0], &t[1], &t[2]),
        ),
        (
            "depthwise_conv2d_k3s2",
            vec![
                plane,
                rng.tensor(&[3, 1, 3, 3], -0.5, 0.5),
                rng.tensor(&[3], -0.5, 0.5),
            ],
            |t| depthwise_conv2d_k3s2(&t[0], &t[1], &t[2]),
            |t| composed::depthwise_conv2d_k3s2(&t[0], &t[1], &t[2]),
        ),
        (
            "batch_renorm_silu train",
            vec![seq, w6, b6],
            |t| Ok(batch_renorm_silu(&t[0], &t[1], &t[2], renorm_train())?.0),
            |t| Ok(composed::batch_renorm_silu(&t[0], &t[1], &t[2], renorm_train())?.0),
        ),
    ];
    for (what, inputs, dispatched, plain) in cases {
        for dtype in [DType::F32, DType::BF16] {
            check(what, &inputs, dtype, dispatched, plain);
        }
    }
}
