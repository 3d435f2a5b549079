//! k3 s2 p1 conv2d custom ops against a composed (pad + strided index_select + matmul)
//! reference for any H/W parity, against candle's conv2d where candle is correct, and
//! the dw_striding subsampling against the reference fixture.

mod ops_support;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lcasr_kernels::composed;
use lcasr_kernels::conv2d::{conv2d_k3s2, conv2d_k3s2_silu, depthwise_conv2d_k3s2};
use ops_support::{check_op, Rng};

const SHAPES: &[(usize, usize, usize, usize)] = &[
    (2, 1, 9, 8),
    (1, 3, 25, 20),
    (2, 4, 10, 7),
    (1, 2, 1, 1),
    (3, 5, 2, 3),
    (1, 1, 77, 80),
];

#[test]
fn conv2d_matches_composed_for_any_parity() {
    let mut rng = Rng::new(21);
    for &(b, cin, h, w) in SHAPES {
        for cout in [1, 6] {
            let x = rng.var(&[b, cin, h, w], -1.0, 1.0);
            let wt = rng.var(&[cout, cin, 3, 3], -0.5, 0.5);
            let bias = rng.var(&[cout], -0.5, 0.5);
            check_op(
                &format!("conv2d_k3s2 x={:?} cout={cout}", (b, cin, h, w)),
                &mut rng,
                &[&x, &wt, &bias],
                || conv2d_k3s2(&x, &wt, &bias),
                || composed::conv2d_k3s2(&x, &wt, &bias),
                1e-4,
            );
        }
    }
}

#[test]
fn conv2d_blocks_cover_large_inputs() {
    // More output pixels than one im2col block holds: several blocks, the last partial.
    let mut rng = Rng::new(22);
    let x = rng.var(&[2, 1, 260, 129], -1.0, 1.0);
    let wt = rng.var(&[4, 1, 3, 3], -0.5, 0.5);
    let bias = rng.var(&[4], -0.5, 0.5);
    check_op(
        "conv2d_k3s2 blocked",
        &mut rng,
        &[&x, &wt, &bias],
        || conv2d_k3s2(&x, &wt, &bias),
        || composed::conv2d_k3s2(&x, &wt, &bias),
        1e-4,
    );
}

#[test]
fn conv2d_silu_matches_composed_for_any_parity_and_blocks() {
    // SHAPES cover every H/W parity; the last input needs several im2col blocks.
    let mut rng = Rng::new(23);
    let mut shapes = SHAPES.to_vec();
    shapes.push((2, 1, 260, 129));
    for (b, cin, h, w) in shapes {
        let x = rng.var(&[b, cin, h, w], -2.0, 2.0);
        let wt = rng.var(&[5, cin, 3, 3], -1.0, 1.0);
        let bias = rng.var(&[5], -0.5, 0.5);
        check_op(
            &format!("conv2d_k3s2_silu x={:?}", (b, cin, h, w)),
            &mut rng,
            &[&x, &wt, &bias],
            || conv2d_k3s2_silu(&x, &wt, &bias),
            || composed::conv2d_k3s2_silu(&x, &wt, &bias),
            1e-4,
        );
    }
}

#[test]
fn depthwise_conv2d_matches_composed_for_any_parity() {
    let mut rng = Rng::new(23);
    for &(b, c, h, w) in SHAPES {
        let x = rng.var(&[b, c, h, w], -1.0, 1.0);
        let wt = rng.var(&[c, 1, 3, 3], -0.5, 0.5);
        let bias = rng.var(&[c], -0.5, 0.5);
        check_op(
            &format!("depthwise_conv2d_k3s2 x={:?}", (b, c, h, w)),
            &mut rng,
            &[&x, &wt, &bias],
            || depthwise_conv2d_k3s2(&x, &wt, &bias),
            || composed::depthwise_conv2d_k3s2(&x, &wt, &bias),
            1e-4,
        );
    }
}

#[test]
fn convs_match_candle_where_candle_is_correct() {
    let mut rng = Rng::new(24);
    let x = rng.var(&[2, 4, 10, 8], -1.0, 1.0);
    let wt = rng.var(&[5, 4, 3, 3], -0.5, 0.5);
    let bias = rng.var(&[5], -0.5, 0.5);
    check_op(
        "conv2d_k3s2 vs candle conv2d",
        &mut rng,
        &[&x, &wt, &bias],
        || conv2d_k3s2(&x, &wt, &bias),
        || {
            x.conv2d(&wt, 1, 2, 1, 1)?
                .broadcast_add(&bias.reshape((1, 5, 1, 1))?)
        },
        1e-4,
    );
    let dwt = rng.var(&[4, 1, 3, 3], -0.5, 0.5);
    let dbias = rng.var(&[4], -0.5, 0.5);
    check_op(
        "depthwise_conv2d_k3s2 vs candle conv2d",
        &mut rng,
        &[&x, &dwt, &dbias],
        || depthwise_conv2d_k3s2(&x, &dwt, &dbias),
        || {
            x.conv2d(&dwt, 1, 2, 1, 4)?
                .broadcast_add(&dbias.reshape((1, 4, 1, 1))?)
        },
        1e-4,
    );
}

#[test]
fn convs_reject_bad_arguments() {
    let dev = Device::Cpu;
    let z = |dims: &[usize]| Tensor::zeros(dims, candle_core::DType::F32, &dev).unwrap();
    assert!(conv2d_k3s2(&z(&[1, 2, 4, 4]), &z(&[3, 1, 3, 3]), &z(&[3])).is_err());
    assert!(conv2d_k3s2(&z(&[1, 2, 4, 4]), &z(&[3, 2, 5, 5]), &z(&[3])).is_err());
    assert!(conv2d_k3s2(&z(&[1, 2, 4, 4]), &z(&[3, 2, 3, 3]), &z(&[2])).is_err());
    assert!(depthwise_conv2d_k3s2(&z(&[1, 2, 4, 4]), &z(&[3, 1, 3, 3]), &z(&[3])).is_err());
    let x64 = z(&[1, 2, 4, 4]).to_dtype(candle_core::DType::F64).unwrap();
    assert!(depthwise_conv2d_k3s2(&x64, &z(&[2, 1, 3, 3]), &z(&[2])).is_err());
}

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("LCASR_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"),
    }
}

/// The reference dw_striding subsampling (§3.2) built from the fused convs, a matmul for
/// every 1x1 conv and SiLU, reproduces `subsampling_out` of the tiny model.
#[test]
fn dw_striding_subsampling_matches_fixture() {
    let dev = Device::Cpu;
    let model = candle_core::safetensors::load(fixtures_dir().join("model_tiny.safetensors"), &dev)
        .unwrap();
    let io = candle_core::safetensors::load(fixtures_dir().join("model_tiny_io.safetensors"), &dev)
        .unwrap();
    let p = |k: &str| {
        model
            .get(&format!("subsampling.{k}"))
            .unwrap_or_else(|| panic!("missing {k}"))
    };
    let input = &io["input"]; // (B, F, T)
    let want = &io["subsampling_out"];

    let x = input.transpose(1, 2).unwrap().unsqueeze(1).unwrap(); // (B, 1, T, F)
    let mut x = conv2d_k3s2(&x, p("conv.0.weight"), p("conv.0.bias"))
        .unwrap()
        .silu()
        .unwrap();
    let mut stage = 2;
    while model.contains_key(&format!("subsampling.conv.{stage}.weight")) {
        let dw = |s: &str| p(&format!("conv.{stage}.{s}"));
        let pw = |s: &str| p(&format!("conv.{}.{s}", stage + 1));
        x = depthwise_conv2d_k3s2(&x, dw("weight"), dw("bias")).unwrap();
        let (b, c, h, w) = x.dims4().unwrap();
        let wp = pw("weight")
            .reshape((1, c, c))
            .unwrap()
            .broadcast_as((b, c, c))
            .unwrap();
        x = wp
            .matmul(&x.reshape((b, c, h * w)).unwrap())
            .unwrap()
            .broadcast_add(&pw("bias").reshape((1, c, 1)).unwrap())
            .unwrap()
            .reshape((b, c, h, w))
            .unwrap()
            .silu()
            .unwrap();
        stage += 3;
    }
    let (b, c, t, f) = x.dims4().unwrap();
    let flat = x.transpose(1, 2).unwrap().reshape((b, t, c * f)).unwrap();
    let out = flat
        .broadcast_matmul(&p("out.weight").t().unwrap())
        .unwrap();
    assert_eq!(out.dims(), want.dims());
    let diff = (out - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "subsampling max abs diff {diff}");
    assert!(stage > 2, "the fixture has depthwise stages");
}
