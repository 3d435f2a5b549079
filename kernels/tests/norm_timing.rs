//! Timings of the fused ops (forward + backward); run with
//! `cargo test --release -p lcasr-kernels --test norm_timing -- --ignored --nocapture`.

mod ops_support;

use std::time::Instant;

use candle_core::{Result, Tensor, Var};
use lcasr_kernels::batch_renorm::{batch_renorm_silu, RenormMode};
use lcasr_kernels::conv2d::{conv2d_k3s2, depthwise_conv2d_k3s2};
use lcasr_kernels::depthwise_conv::depthwise_conv1d;
use lcasr_kernels::glu::glu;
use lcasr_kernels::norm::layer_norm;
use ops_support::Rng;

/// Median wall time in ms of `f` over `reps` runs after one warm-up.
fn time(what: &str, reps: usize, mut f: impl FnMut() -> Result<()>) {
    f().unwrap();
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    println!("{what}: median {:.2} ms (min {:.2})", ms[reps / 2], ms[0]);
}

/// Forward, then backward of `out.sum_all()` (the probe only fixes the output shape:
/// multiplying by it inside the graph costs candle more than the fused ops themselves).
fn fwd_bwd(out: Tensor, probe: &Tensor) -> Result<()> {
    assert_eq!(out.dims(), probe.dims());
    out.sum_all()?.backward().map(|_| ())
}

#[test]
#[ignore = "timing, run explicitly"]
fn timing_norm_glu() {
    let mut rng = Rng::new(99);
    println!("rayon threads: {}", rayon::current_num_threads());
    let x = rng.var(&[4096, 256], -1.0, 1.0);
    let probe = rng.tensor(&[4096, 256], -1.0, 1.0);
    time(
        "baseline: (x * 1).sum_all().backward() (4096, 256)",
        21,
        || fwd_bwd(x.affine(1.0, 0.0)?, &probe),
    );
    for rows in [4096, 8192] {
        let x = rng.var(&[rows, 256], -1.0, 1.0);
        let w = rng.var(&[256], 0.5, 1.5);
        let b = rng.var(&[256], -0.5, 0.5);
        let probe = rng.tensor(&[rows, 256], -1.0, 1.0);
        time(&format!("layer_norm ({rows}, 256) fwd"), 21, || {
            layer_norm(&x, &w, &b, 1e-5).map(|_| ())
        });
        time(&format!("layer_norm ({rows}, 256) fwd+bwd"), 21, || {
            fwd_bwd(layer_norm(&x, &w, &b, 1e-5)?, &probe)
        });
    }

    let x = rng.var(&[2, 2048, 512], -1.0, 1.0);
    let probe = rng.tensor(&[2, 2048, 256], -1.0, 1.0);
    time("glu (2, 2048, 512) fwd+bwd", 21, || {
        fwd_bwd(glu(&x)?, &probe)
    });
}

#[test]
#[ignore = "timing, run explicitly"]
fn timing_conv_module() {
    let mut rng = Rng::new(98);

    for (b, t) in [(1, 4096), (2, 2048)] {
        let x = rng.var(&[b, t, 256], -1.0, 1.0);
        let w = rng.var(&[256, 9], -0.5, 0.5);
        let bias = rng.var(&[256], -0.5, 0.5);
        let probe = rng.tensor(&[b, t, 256], -1.0, 1.0);
        time(
            &format!("depthwise_conv1d ({b}, {t}, 256) k9 fwd+bwd"),
            21,
            || fwd_bwd(depthwise_conv1d(&x, &w, &bias)?, &probe),
        );
        let rm = vec![0.1f32; 256];
        let rs = vec![0.9f32; 256];
        let mode = RenormMode::Train {
            running_mean: &rm,
            running_std: &rs,
            rmax: 2.0,
            dmax: 1.0,
            eps: 1e-3,
            lengths: Some(&vec![t - 7; b]),
        };
        time(
            &format!("batch_renorm_silu train ({b}, {t}, 256) fwd+bwd"),
            21,
            || {
                fwd_bwd(
                    batch_renorm_silu(&x, &w.narrow(1, 0, 1)?.squeeze(1)?, &bias, mode)?.0,
                    &probe,
                )
            },
        );
    }

    let x = rng.var(&[1, 256, 1024, 40], -1.0, 1.0);
    let w = rng.var(&[256, 1, 3, 3], -0.5, 0.5);
    let bias = rng.var(&[256], -0.5, 0.5);
    let probe = rng.tensor(&[1, 256, 512, 20], -1.0, 1.0);
    time(
        "depthwise_conv2d_k3s2 (1, 256, 1024, 40) fwd+bwd",
        7,
        || fwd_bwd(depthwise_conv2d_k3s2(&x, &w, &bias)?, &probe),
    );
}

#[test]
#[ignore = "timing, run explicitly"]
fn timing_subsampling() {
    subsampling_stack(&mut Rng::new(97), 2, 16384, 80, 256);
}

/// The dw_striding 8x stack: conv 1->C, silu, 2x [depthwise, pointwise (matmul), silu].
fn subsampling_stack(rng: &mut Rng, b: usize, t: usize, f: usize, c: usize) {
    let input = rng.tensor(&[b, 1, t, f], -1.0, 1.0);
    let w0 = rng.var(&[c, 1, 3, 3], -0.3, 0.3);
    let b0 = rng.var(&[c], -0.1, 0.1);
    let stages: Vec<[Var; 4]> = (0..2)
        .map(|_| {
            [
                rng.var(&[c, 1, 3, 3], -0.3, 0.3),
                rng.var(&[c], -0.1, 0.1),
                rng.var(&[c, c], -0.06, 0.06),
                rng.var(&[c], -0.1, 0.1),
            ]
        })
        .collect();
    let forward = || -> Result<Tensor> {
        let mut x = conv2d_k3s2(&input, &w0, &b0)?.silu()?;
        for [dw, db, pw, pb] in &stages {
            x = depthwise_conv2d_k3s2(&x, dw, db)?;
            let (b, c, h, w) = x.dims4()?;
            x = pw
                .broadcast_left(b)?
                .matmul(&x.reshape((b, c, h * w))?)?
                .broadcast_add(&pb.reshape((1, c, 1))?)?
                .reshape((b, c, h, w))?
                .silu()?;
        }
        Ok(x)
    };
    let probe = rng.tensor(forward().unwrap().dims(), -1.0, 1.0);
    let label = format!("subsampling stack ({b}, 1, {t}, {f}) C={c}");
    time(&format!("{label} fwd"), 3, || forward().map(|_| ()));
    time(&format!("{label} fwd+bwd"), 3, || {
        fwd_bwd(forward()?, &probe)
    });
    // The first conv alone, forward and backward (weight gradients only).
    let probe0 = rng.tensor(&[b, c, (t - 1) / 2 + 1, (f - 1) / 2 + 1], -1.0, 1.0);
    time("  conv2d_k3s2 stage 1 fwd+bwd", 3, || {
        fwd_bwd(conv2d_k3s2(&input, &w0, &b0)?, &probe0)
    });
}
