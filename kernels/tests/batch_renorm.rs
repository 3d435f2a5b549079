//! BatchRenorm + SiLU custom op against its composition of differentiable candle ops
//! (`composed::batch_renorm_silu`, r and d detached), in training mode (with and without a lengths mask) and eval mode.

mod ops_support;

use candle_core::{Device, Tensor, Var};
use lcasr_kernels::batch_renorm::{batch_renorm_silu, RenormMode};
use lcasr_kernels::composed;
use ops_support::{assert_close, check_op, Rng};

struct Case {
    x: Var,
    w: Var,
    b: Var,
    rm: Vec<f32>,
    rs: Vec<f32>,
}

fn case(rng: &mut Rng, bsz: usize, t: usize, c: usize) -> Case {
    Case {
        x: rng.var(&[bsz, t, c], -2.0, 3.0),
        w: rng.var(&[c], 0.5, 1.5),
        b: rng.var(&[c], -0.5, 0.5),
        rm: (0..c).map(|_| rng.uniform(-0.5, 1.0)).collect(),
        rs: (0..c).map(|_| rng.uniform(0.2, 2.5)).collect(),
    }
}

fn check_train(
    seed: u64,
    bsz: usize,
    t: usize,
    c: usize,
    rmax: f32,
    dmax: f32,
    lengths: Option<&[usize]>,
) {
    let mut rng = Rng::new(seed);
    let k = case(&mut rng, bsz, t, c);
    let eps = 1e-3;
    let mode = RenormMode::Train {
        running_mean: &k.rm,
        running_std: &k.rs,
        rmax,
        dmax,
        eps,
        lengths,
    };
    let (_, stats) = batch_renorm_silu(&k.x, &k.w, &k.b, mode).unwrap();
    let (_, want) = composed::batch_renorm_silu(&k.x, &k.w, &k.b, mode).unwrap();
    let want = want.expect("training mode returns statistics");
    let stats = stats.expect("training mode returns statistics");
    let t1 = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
    assert_close("batch mean", &t1(&stats.mean), &t1(&want.mean), 1e-5);
    assert_close("batch std", &t1(&stats.std), &t1(&want.std), 1e-5);
    check_op(
        &format!(
            "batch_renorm train b={bsz} t={t} c={c} rmax={rmax} dmax={dmax} lengths={lengths:?}"
        ),
        &mut rng,
        &[&k.x, &k.w, &k.b],
        || batch_renorm_silu(&k.x, &k.w, &k.b, mode).map(|(y, _)| y),
        || composed::batch_renorm_silu(&k.x, &k.w, &k.b, mode).map(|(y, _)| y),
        1e-4,
    );
}

#[test]
fn train_plain_batch_norm() {
    check_train(7, 2, 13, 8, 1.0, 0.0, None);
    check_train(8, 1, 1, 3, 1.0, 0.0, None);
}

#[test]
fn train_with_active_clamps() {
    check_train(9, 3, 21, 17, 1.3, 0.4, None);
    check_train(10, 2, 70, 64, 3.0, 5.0, None);
}

#[test]
fn train_with_lengths_mask() {
    check_train(11, 3, 19, 12, 1.5, 0.5, Some(&[19, 7, 1]));
    check_train(12, 2, 130, 40, 1.0, 0.0, Some(&[0, 100]));
}

#[test]
fn eval_uses_running_statistics() {
    let mut rng = Rng::new(13);
    let k = case(&mut rng, 2, 29, 24);
    let mode = RenormMode::Eval {
        running_mean: &k.rm,
        running_std: &k.rs,
    };
    assert!(batch_renorm_silu(&k.x, &k.w, &k.b, mode)
        .unwrap()
        .1
        .is_none());
    check_op(
        "batch_renorm eval",
        &mut rng,
        &[&k.x, &k.w, &k.b],
        || batch_renorm_silu(&k.x, &k.w, &k.b, mode).map(|(y, _)| y),
        || composed::batch_renorm_silu(&k.x, &k.w, &k.b, mode).map(|(y, _)| y),
        1e-4,
    );
}

#[test]
fn rejects_bad_arguments() {
    let mut rng = Rng::new(14);
    let k = case(&mut rng, 2, 5, 4);
    let train = |lengths| RenormMode::Train {
        running_mean: &k.rm,
        running_std: &k.rs,
        rmax: 1.0,
        dmax: 0.0,
        eps: 1e-3,
        lengths,
    };
    assert!(batch_renorm_silu(&k.x, &k.w, &k.b, train(Some(&[0, 0]))).is_err());
    assert!(batch_renorm_silu(&k.x, &k.w, &k.b, train(Some(&[6, 1]))).is_err());
    assert!(batch_renorm_silu(&k.x, &k.w, &k.b, train(Some(&[5]))).is_err());
    let x64 = k.x.to_dtype(candle_core::DType::F64).unwrap();
    assert!(batch_renorm_silu(&x64, &k.w, &k.b, train(None)).is_err());
    let short = [0.0f32; 3];
    let bad = RenormMode::Eval {
        running_mean: &short,
        running_std: &k.rs,
    };
    assert!(batch_renorm_silu(&k.x, &k.w, &k.b, bad).is_err());
}
