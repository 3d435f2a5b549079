//! Every fused op on bf16 and f16 inputs (mixed precision: the op runs its
//! composition, with norms, softmax and statistics in f32) against the f32
//! kernel on the same values: outputs, and gradients that flow back through
//! the casts to f32 variables, agree to the narrow type's precision.

mod ops_support;

use candle_core::{DType, Result, Tensor, Var};
use lcasr_kernels::activation::{gelu_tanh, silu};
use lcasr_kernels::attention::{attention, AttentionOptions};
use lcasr_kernels::batch_renorm::{batch_renorm_silu, RenormMode};
use lcasr_kernels::conv2d::{conv2d_k3s2_silu, depthwise_conv2d_k3s2};
use lcasr_kernels::depthwise_conv::depthwise_conv1d;
use lcasr_kernels::glu::glu;
use lcasr_kernels::norm::{layer_norm, rms_norm};
use lcasr_kernels::rotary::{inv_freq, rotary_tables};
use lcasr_kernels::softmax::{linear_softmax, softmax_last_dim};
use ops_support::{assert_close, Rng};

/// Runs `op` on f32 variables made from `inputs`, and on the same variables
/// cast to `dtype`; outputs (cast back) and gradients must agree within `tol`.
fn narrow_matches_f32(
    what: &str,
    rng: &mut Rng,
    inputs: &[Tensor],
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    for dtype in [DType::BF16, DType::F16] {
        // Values the narrow type holds exactly, so only the arithmetic differs.
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| {
                let exact = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                Var::from_tensor(&exact).unwrap()
            })
            .collect();
        let wide: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let narrow: Vec<Tensor> = wide.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        let y32 = op(&wide).unwrap();
        let y = op(&narrow).unwrap();
        assert_eq!(y.dtype(), dtype, "{what}: output dtype");
        let y = y.to_dtype(DType::F32).unwrap();
        assert_close(&format!("{what} {dtype:?} forward"), &y, &y32, tol);
        let probe = rng.tensor(y32.dims(), -1.0, 1.0);
        let g32 = (&y32 * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in vars.iter().enumerate() {
            let want = g32.get(v.as_tensor()).expect("f32 gradient");
            let got = g.get(v.as_tensor()).expect("gradient through the casts");
            assert_eq!(got.dtype(), DType::F32, "{what}: gradient dtype");
            assert_close(
                &format!("{what} {dtype:?} gradient {i}"),
                got,
                want,
                4.0 * tol,
            );
        }
    }
}

#[test]
fn norms_activations_and_softmax() {
    let mut rng = Rng::new(21);
    let x = rng.tensor(&[3, 9, 64], -2.0, 2.0);
    let w = rng.tensor(&[64], 0.5, 1.5);
    let b = rng.tensor(&[64], -0.5, 0.5);
    let tol = 2e-2;
    narrow_matches_f32(
        "layer_norm",
        &mut rng,
        &[x.clone(), w.clone(), b],
        |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
        tol,
    );
    narrow_matches_f32(
        "rms_norm",
        &mut rng,
        &[x.clone(), w],
        |t| rms_norm(&t[0], &t[1], 1e-5),
        tol,
    );
    narrow_matches_f32(
        "glu",
        &mut rng,
        std::slice::from_ref(&x),
        |t| glu(&t[0]),
        tol,
    );
    narrow_matches_f32(
        "silu",
        &mut rng,
        std::slice::from_ref(&x),
        |t| silu(&t[0]),
        tol,
    );
    narrow_matches_f32(
        "gelu_tanh",
        &mut rng,
        std::slice::from_ref(&x),
        |t| gelu_tanh(&t[0]),
        tol,
    );
    narrow_matches_f32(
        "softmax",
        &mut rng,
        std::slice::from_ref(&x),
        |t| softmax_last_dim(&t[0]),
        tol,
    );
    let hw = rng.tensor(&[17, 64], -0.3, 0.3);
    let hb = rng.tensor(&[17], -0.3, 0.3);
    narrow_matches_f32(
        "linear_softmax",
        &mut rng,
        &[x, hw, hb],
        |t| linear_softmax(&t[0], &t[1], &t[2]),
        tol,
    );
}

#[test]
fn convolutions_and_batch_renorm() {
    let mut rng = Rng::new(22);
    let tol = 2e-2;
    let x = rng.tensor(&[2, 31, 16], -1.0, 1.0);
    let w = rng.tensor(&[16, 9], -0.5, 0.5);
    let b = rng.tensor(&[16], -0.5, 0.5);
    narrow_matches_f32(
        "depthwise_conv1d",
        &mut rng,
        &[x.clone(), w, b.clone()],
        |t| depthwise_conv1d(&t[0], &t[1], &t[2]),
        tol,
    );
    let rm: Vec<f32> = (0..16).map(|_| rng.uniform(-0.5, 0.5)).collect();
    let rs: Vec<f32> = (0..16).map(|_| rng.uniform(0.5, 2.0)).collect();
    let g = rng.tensor(&[16], 0.5, 1.5);
    let mode = RenormMode::Train {
        running_mean: &rm,
        running_std: &rs,
        rmax: 1.5,
        dmax: 0.5,
        eps: 1e-3,
        lengths: Some(&[31, 20]),
    };
    narrow_matches_f32(
        "batch_renorm",
        &mut rng,
        &[x, g, b],
        |t| batch_renorm_silu(&t[0], &t[1], &t[2], mode).map(|(y, _)| y),
        tol,
    );
    let x = rng.tensor(&[2, 1, 21, 16], -1.0, 1.0);
    let w = rng.tensor(&[8, 1, 3, 3], -0.5, 0.5);
    let b = rng.tensor(&[8], -0.5, 0.5);
    narrow_matches_f32(
        "conv2d_k3s2_silu",
        &mut rng,
        &[x, w, b],
        |t| conv2d_k3s2_silu(&t[0], &t[1], &t[2]),
        tol,
    );
    let x = rng.tensor(&[2, 8, 11, 8], -1.0, 1.0);
    let w = rng.tensor(&[8, 1, 3, 3], -0.5, 0.5);
    let b = rng.tensor(&[8], -0.5, 0.5);
    narrow_matches_f32(
        "depthwise_conv2d_k3s2",
        &mut rng,
        &[x, w, b],
        |t| depthwise_conv2d_k3s2(&t[0], &t[1], &t[2]),
        tol,
    );
}

#[test]
fn attention_in_narrow_types() {
    let mut rng = Rng::new(23);
    let (b, n, h, dh) = (2, 33, 2, 16);
    let qkv = rng.tensor(&[b, n, 3 * h * dh], -1.0, 1.0);
    let (cos, sin) = rotary_tables(&inv_freq(10_000.0, dh), n, 1.0);
    let lengths = [33, 20];
    let opts = AttentionOptions {
        n_heads: h,
        head_dim: dh,
        rotary: Some((&cos[..], &sin[..])),
        lengths: Some(&lengths),
        window_left: Some(9),
        window_right: Some(4),
        dropout: Some((0.1, 5)),
        ..Default::default()
    };
    narrow_matches_f32(
        "attention",
        &mut rng,
        &[qkv],
        |t| attention(&t[0], &opts),
        3e-2,
    );
}
