//! Every fused op on a CUDA device against the same op on the CPU: outputs
//! and the gradients of every input. Built only with the `cuda` feature and
//! run on a machine with a GPU (`benches/gpu/run.sh`). On the GPU an op runs
//! its `.cu` kernel where it has one (attention, the convolutions,
//! BatchRenorm, GLU, the norms, softmax) and its composition of candle ops
//! (`lcasr_kernels::composed`) elsewhere.
#![cfg(feature = "cuda")]

mod ops_support;

use std::rc::Rc;

use candle_core::{DType, Device, Result, Tensor, Var};
use lcasr_kernels::activation::{gelu_tanh, silu};
#[cfg(feature = "flash-attn")]
use lcasr_kernels::attention::attention_flash;
use lcasr_kernels::attention::{
    attention, attention_chunked, attention_tensor_cores, AttentionOptions,
};
use lcasr_kernels::batch_renorm::{
    batch_renorm_silu, with_stats_reducer, RenormMode, StatsReducer,
};
use lcasr_kernels::conv2d::{conv2d_k3s2, conv2d_k3s2_silu, depthwise_conv2d_k3s2};
use lcasr_kernels::ctc::ctc_loss;
use lcasr_kernels::depthwise_conv::depthwise_conv1d;
use lcasr_kernels::glu::glu;
use lcasr_kernels::norm::{layer_norm, rms_norm};
use lcasr_kernels::rotary::{inv_freq, rotary_tables};
use lcasr_kernels::softmax::{linear_softmax, softmax_last_dim};
use ops_support::{assert_close, Rng};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA GPU: run this test through benches/gpu/run.sh")
}

/// The half types the kernels take, each with the tolerance of its checks
/// against f32 on the same rounded inputs: a few ulps of the type, relative
/// to the largest value.
const HALF_TYPES: [(DType, f32); 2] = [(DType::BF16, 3e-2), (DType::F16, 1e-2)];

/// Runs `op` on `inputs` on the CPU and on a copy on the GPU; the outputs and
/// the gradients of `(out * probe).sum()` for every input must agree.
fn parity(
    what: &str,
    rng: &mut Rng,
    inputs: &[Tensor],
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    let dev = gpu();
    let run = |device: &Device| -> (Tensor, Vec<Var>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(device).unwrap()).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        (op(&tensors).unwrap(), vars)
    };
    let (cpu_out, cpu_vars) = run(&Device::Cpu);
    let (gpu_out, gpu_vars) = run(&dev);
    assert!(
        gpu_out.device().is_cuda(),
        "{what}: the result left the GPU"
    );
    let gpu_out_host = gpu_out.to_device(&Device::Cpu).unwrap();
    assert_close(&format!("{what} forward"), &gpu_out_host, &cpu_out, tol);
    let probe = rng.tensor(cpu_out.dims(), -1.0, 1.0);
    let cpu_grads = (&cpu_out * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gpu_probe = probe.to_device(&dev).unwrap();
    let gpu_grads = (&gpu_out * &gpu_probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, (c, g)) in cpu_vars.iter().zip(&gpu_vars).enumerate() {
        let want = cpu_grads.get(c.as_tensor()).expect("CPU gradient");
        let got = gpu_grads
            .get(g.as_tensor())
            .expect("GPU gradient")
            .to_device(&Device::Cpu)
            .unwrap();
        assert_close(&format!("{what} gradient of input {i}"), &got, want, tol);
    }
}

#[test]
fn norms_and_activations() {
    let mut rng = Rng::new(1);
    let x = rng.tensor(&[3, 17, 96], -2.0, 2.0);
    let w = rng.tensor(&[96], 0.5, 1.5);
    let b = rng.tensor(&[96], -0.5, 0.5);
    parity(
        "layer_norm",
        &mut rng,
        &[x.clone(), w.clone(), b],
        |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
        1e-4,
    );
    parity(
        "rms_norm",
        &mut rng,
        &[x.clone(), w],
        |t| rms_norm(&t[0], &t[1], 1e-5),
        1e-4,
    );
    parity(
        "glu",
        &mut rng,
        std::slice::from_ref(&x),
        |t| glu(&t[0]),
        1e-5,
    );
    parity(
        "silu",
        &mut rng,
        std::slice::from_ref(&x),
        |t| silu(&t[0]),
        1e-5,
    );
    parity(
        "gelu_tanh",
        &mut rng,
        std::slice::from_ref(&x),
        |t| gelu_tanh(&t[0]),
        1e-5,
    );
    parity(
        "softmax",
        &mut rng,
        std::slice::from_ref(&x),
        |t| softmax_last_dim(&t[0]),
        1e-5,
    );
    let head_w = rng.tensor(&[33, 96], -0.2, 0.2);
    let head_b = rng.tensor(&[33], -0.2, 0.2);
    parity(
        "linear_softmax",
        &mut rng,
        &[x, head_w, head_b],
        |t| linear_softmax(&t[0], &t[1], &t[2]),
        1e-4,
    );
}

#[test]
fn convolutions() {
    let mut rng = Rng::new(2);
    // Short and long sequences (the weight gradient's partial sums cover
    // 1 to 6 rows each), kernel widths 9 and 31.
    for (dims, k) in [([2, 37, 24], 9), ([2, 700, 40], 31), ([1, 1500, 16], 9)] {
        let x = rng.tensor(&dims, -1.0, 1.0);
        let w = rng.tensor(&[dims[2], k], -0.5, 0.5);
        let b = rng.tensor(&[dims[2]], -0.5, 0.5);
        parity(
            &format!("depthwise_conv1d {dims:?} k {k}"),
            &mut rng,
            &[x, w, b],
            |t| depthwise_conv1d(&t[0], &t[1], &t[2]),
            1e-4,
        );
    }
    // Odd and even heights and widths; 1 and 3 input channels run the CUDA
    // kernel, 6 the composition.
    for dims in [
        [2, 1, 25, 20],
        [1, 3, 16, 11],
        [2, 6, 9, 8],
        [1, 1, 301, 80],
    ] {
        let x = rng.tensor(&dims, -1.0, 1.0);
        let w = rng.tensor(&[8, dims[1], 3, 3], -0.5, 0.5);
        let b = rng.tensor(&[8], -0.5, 0.5);
        parity(
            &format!("conv2d_k3s2 {dims:?}"),
            &mut rng,
            &[x.clone(), w.clone(), b.clone()],
            |t| conv2d_k3s2(&t[0], &t[1], &t[2]),
            1e-4,
        );
        parity(
            &format!("conv2d_k3s2_silu {dims:?}"),
            &mut rng,
            &[x, w, b],
            |t| conv2d_k3s2_silu(&t[0], &t[1], &t[2]),
            1e-4,
        );
    }
    for dims in [[2, 8, 13, 10], [1, 4, 301, 40], [3, 2, 6, 7]] {
        let x = rng.tensor(&dims, -1.0, 1.0);
        let w = rng.tensor(&[dims[1], 1, 3, 3], -0.5, 0.5);
        let b = rng.tensor(&[dims[1]], -0.5, 0.5);
        parity(
            &format!("depthwise_conv2d_k3s2 {dims:?}"),
            &mut rng,
            &[x, w, b],
            |t| depthwise_conv2d_k3s2(&t[0], &t[1], &t[2]),
            1e-4,
        );
    }
}

/// `op` with bf16 or f16 activations: the CUDA kernels read and write them
/// as such and compute in f32. The CPU reference computes in f32 on the same
/// rounded inputs and rounds its output once.
fn in_half(t: &[Tensor], dtype: DType, op: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    let rounded: Vec<Tensor> = t.iter().map(|x| x.to_dtype(dtype)).collect::<Result<_>>()?;
    let y = if t[0].device().is_cpu() {
        let f32s: Vec<Tensor> = rounded
            .iter()
            .map(|x| x.to_dtype(DType::F32))
            .collect::<Result<_>>()?;
        op(&f32s)?.to_dtype(dtype)?
    } else {
        let y = op(&rounded)?;
        assert_eq!(y.dtype(), dtype, "the op changed the dtype");
        y
    };
    y.to_dtype(DType::F32)
}

/// [`in_half`] for a convolution of (x, weight, bias).
fn half_conv(
    t: &[Tensor],
    dtype: DType,
    conv: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    in_half(t, dtype, |x| conv(&x[0], &x[1], &x[2]))
}

#[test]
fn glu_and_norms_in_half_precision() {
    let mut rng = Rng::new(7);
    for (dtype, tol) in HALF_TYPES {
        // Rows shorter and longer than a block, more rows than the
        // backward's 512 blocks.
        for dims in [[3, 7, 10], [2, 300, 512]] {
            let x = rng.tensor(&dims, -3.0, 3.0);
            parity(
                &format!("{dtype:?} glu {dims:?}"),
                &mut rng,
                std::slice::from_ref(&x),
                |t| in_half(t, dtype, |x| glu(&x[0])),
                tol,
            );
            let d = dims[2];
            let w = rng.tensor(&[d], 0.5, 1.5);
            let b = rng.tensor(&[d], -0.5, 0.5);
            parity(
                &format!("{dtype:?} layer_norm {dims:?}"),
                &mut rng,
                &[x.clone(), w.clone(), b],
                |t| in_half(t, dtype, |x| layer_norm(&x[0], &x[1], &x[2], 1e-5)),
                tol,
            );
            parity(
                &format!("{dtype:?} rms_norm {dims:?}"),
                &mut rng,
                &[x, w],
                |t| in_half(t, dtype, |x| rms_norm(&x[0], &x[1], 1e-5)),
                tol,
            );
        }
    }
}

#[test]
fn softmax_in_half_precision() {
    let mut rng = Rng::new(12);
    for (dtype, tol) in HALF_TYPES {
        // A row shorter than a block and a vocabulary-sized one.
        for dims in [[3, 7, 10], [2, 5, 4097]] {
            let x = rng.tensor(&dims, -8.0, 8.0);
            parity(
                &format!("{dtype:?} softmax {dims:?}"),
                &mut rng,
                std::slice::from_ref(&x),
                |t| in_half(t, dtype, |x| softmax_last_dim(&x[0])),
                tol,
            );
        }
        let x = rng.tensor(&[2, 9, 64], -1.0, 1.0);
        let w = rng.tensor(&[4097, 64], -0.2, 0.2);
        let b = rng.tensor(&[4097], -0.2, 0.2);
        parity(
            &format!("{dtype:?} linear_softmax"),
            &mut rng,
            &[x, w, b],
            |t| in_half(t, dtype, |x| linear_softmax(&x[0], &x[1], &x[2])),
            tol,
        );
    }
}

#[test]
fn convolutions_in_half_precision() {
    let mut rng = Rng::new(6);
    for (dtype, tol) in HALF_TYPES {
        for (dims, k) in [([2, 37, 24], 9), ([1, 700, 40], 31)] {
            let x = rng.tensor(&dims, -1.0, 1.0);
            let w = rng.tensor(&[dims[2], k], -0.5, 0.5);
            let b = rng.tensor(&[dims[2]], -0.5, 0.5);
            parity(
                &format!("{dtype:?} depthwise_conv1d {dims:?} k {k}"),
                &mut rng,
                &[x, w, b],
                |t| half_conv(t, dtype, depthwise_conv1d),
                tol,
            );
        }
        for dims in [[2, 1, 25, 20], [1, 3, 301, 80]] {
            let x = rng.tensor(&dims, -1.0, 1.0);
            let w = rng.tensor(&[8, dims[1], 3, 3], -0.5, 0.5);
            let b = rng.tensor(&[8], -0.5, 0.5);
            parity(
                &format!("{dtype:?} conv2d_k3s2 {dims:?}"),
                &mut rng,
                &[x.clone(), w.clone(), b.clone()],
                |t| half_conv(t, dtype, conv2d_k3s2),
                tol,
            );
            parity(
                &format!("{dtype:?} conv2d_k3s2_silu {dims:?}"),
                &mut rng,
                &[x, w, b],
                |t| half_conv(t, dtype, conv2d_k3s2_silu),
                tol,
            );
        }
        for dims in [[2, 8, 13, 10], [1, 4, 301, 40]] {
            let x = rng.tensor(&dims, -1.0, 1.0);
            let w = rng.tensor(&[dims[1], 1, 3, 3], -0.5, 0.5);
            let b = rng.tensor(&[dims[1]], -0.5, 0.5);
            parity(
                &format!("{dtype:?} depthwise_conv2d_k3s2 {dims:?}"),
                &mut rng,
                &[x, w, b],
                |t| half_conv(t, dtype, depthwise_conv2d_k3s2),
                tol,
            );
        }
    }
}

#[test]
fn batch_renorm_train_and_eval() {
    let mut rng = Rng::new(3);
    // Several rows per partial sum, more channels than threads per block,
    // padded and unpadded batches.
    for (dims, lengths) in [
        ([3, 19, 12], Some(vec![19, 7, 1])),
        ([2, 700, 300], Some(vec![700, 411])),
        ([4, 33, 8], None),
    ] {
        let c = dims[2];
        let x = rng.tensor(&dims, -2.0, 3.0);
        let w = rng.tensor(&[c], 0.5, 1.5);
        let b = rng.tensor(&[c], -0.5, 0.5);
        let rm: Vec<f32> = (0..c).map(|_| rng.uniform(-0.5, 1.0)).collect();
        let rs: Vec<f32> = (0..c).map(|_| rng.uniform(0.2, 2.5)).collect();
        let train = RenormMode::Train {
            running_mean: &rm,
            running_std: &rs,
            rmax: 1.5,
            dmax: 0.5,
            eps: 1e-3,
            lengths: lengths.as_deref(),
        };
        parity(
            &format!("batch_renorm train {dims:?}"),
            &mut rng,
            &[x.clone(), w.clone(), b.clone()],
            |t| batch_renorm_silu(&t[0], &t[1], &t[2], train).map(|(y, _)| y),
            1e-4,
        );
        let stats = |device: &Device| {
            let on = |t: &Tensor| t.to_device(device).unwrap();
            batch_renorm_silu(&on(&x), &on(&w), &on(&b), train)
                .unwrap()
                .1
                .expect("training mode returns batch statistics")
        };
        let (cpu, gpu) = (stats(&Device::Cpu), stats(&gpu()));
        for (name, want, got) in [("mean", &cpu.mean, &gpu.mean), ("std", &cpu.std, &gpu.std)] {
            for (i, (a, g)) in want.iter().zip(got).enumerate() {
                assert!(
                    (a - g).abs() <= 1e-5 * a.abs().max(1.0),
                    "batch {name}[{i}]: {g} vs {a}"
                );
            }
        }
        let eval = RenormMode::Eval {
            running_mean: &rm,
            running_std: &rs,
        };
        parity(
            &format!("batch_renorm eval {dims:?}"),
            &mut rng,
            &[x, w, b],
            |t| batch_renorm_silu(&t[0], &t[1], &t[2], eval).map(|(y, _)| y),
            1e-4,
        );
    }
}

/// Statistics summed over two ranks that hold the same batch: the sums
/// double, so the statistics and gradients equal one rank's, while every
/// synchronised exchange of the op runs.
struct TwoIdenticalRanks;

impl StatsReducer for TwoIdenticalRanks {
    fn sum(&self, values: &mut [f64]) -> Result<()> {
        values.iter_mut().for_each(|v| *v *= 2.0);
        Ok(())
    }
}

/// BatchRenorm with synchronised statistics (data parallel, `--gpus N`), in
/// f32 and in half precision (converted around the f32 kernels), on the GPU
/// against the CPU kernel.
#[test]
fn batch_renorm_synchronised_and_half() {
    let mut rng = Rng::new(13);
    let (dims, lengths) = ([3, 50, 40], vec![50, 21, 3]);
    let c = dims[2];
    let x = rng.tensor(&dims, -2.0, 3.0);
    let w = rng.tensor(&[c], 0.5, 1.5);
    let b = rng.tensor(&[c], -0.5, 0.5);
    let rm: Vec<f32> = (0..c).map(|_| rng.uniform(-0.5, 1.0)).collect();
    let rs: Vec<f32> = (0..c).map(|_| rng.uniform(0.2, 2.5)).collect();
    let train = RenormMode::Train {
        running_mean: &rm,
        running_std: &rs,
        rmax: 1.5,
        dmax: 0.5,
        eps: 1e-3,
        lengths: Some(&lengths),
    };
    let inputs = [x, w, b];
    with_stats_reducer(Rc::new(TwoIdenticalRanks), || {
        parity(
            "batch_renorm synchronised",
            &mut rng,
            &inputs,
            |t| batch_renorm_silu(&t[0], &t[1], &t[2], train).map(|(y, _)| y),
            1e-4,
        );
        // Half precision with synchronised statistics: converted around
        // the f32 kernels (without a reducer it runs the composition).
        for (dtype, tol) in HALF_TYPES {
            parity(
                &format!("{dtype:?} batch_renorm synchronised"),
                &mut rng,
                &inputs,
                |t| {
                    in_half(t, dtype, |x| {
                        batch_renorm_silu(&x[0], &x[1], &x[2], train).map(|(y, _)| y)
                    })
                },
                tol,
            );
        }
    });
}

/// Attention of `h` heads of `dh` with rotary tables, item lengths, a local
/// window (left, right) and dropout (p, seed), each as the case gives.
fn attention_opts<'a>(
    (h, dh): (usize, usize),
    (cos, sin): (&'a [f32], &'a [f32]),
    lengths: &'a [usize],
    window: Option<(usize, usize)>,
    dropout: Option<(f32, u64)>,
) -> AttentionOptions<'a> {
    AttentionOptions {
        n_heads: h,
        head_dim: dh,
        rotary: Some((cos, sin)),
        lengths: Some(lengths),
        window_left: window.map(|w| w.0),
        window_right: window.map(|w| w.1),
        dropout,
        ..Default::default()
    }
}

#[test]
fn attention_with_rotary_padding_windows_and_dropout() {
    let mut rng = Rng::new(4);
    // Head dimensions for each of the CUDA kernel's lane widths (one to four
    // values per lane, the last lanes idle at 40), sequences of one to seven
    // 32-key tiles, windows that cross tiles.
    for (b, n, h, dh, lengths) in [
        (2, 45, 3, 16, vec![45, 30]),
        (2, 200, 2, 40, vec![200, 133]),
        (1, 97, 2, 64, vec![97]),
        (2, 150, 1, 128, vec![71, 150]),
    ] {
        let qkv = rng.tensor(&[b, n, 3 * h * dh], -1.5, 1.5);
        let (cos, sin) = rotary_tables(&inv_freq(10_000.0, dh), n, 1.0);
        for (name, window, dropout) in [
            ("attention", None, None),
            ("attention window 5/3", Some((5, 3)), None),
            ("attention window 40/0", Some((40, 0)), None),
            ("attention dropout", None, Some((0.1f32, 77u64))),
            (
                "attention window 33/70 dropout",
                Some((33, 70)),
                Some((0.3f32, 5u64)),
            ),
        ] {
            let opts = attention_opts((h, dh), (&cos, &sin), &lengths, window, dropout);
            parity(
                &format!("{name} (B {b}, N {n}, H {h}, Dh {dh})"),
                &mut rng,
                std::slice::from_ref(&qkv),
                |t| attention(&t[0], &opts),
                1e-4,
            );
            // Chunked attention (`LCASR_ATTENTION_CHUNK`) on the GPU, its
            // dropout mask made by a CUDA kernel, against the CPU kernel.
            parity(
                &format!("chunked {name} (B {b}, N {n}, H {h}, Dh {dh})"),
                &mut rng,
                std::slice::from_ref(&qkv),
                |t| {
                    if t[0].device().is_cuda() {
                        attention_chunked(&t[0], &opts, 64)
                    } else {
                        attention(&t[0], &opts)
                    }
                },
                1e-4,
            );
        }
    }
}

/// Attention on tensor cores (`LCASR_ATTENTION_TC`), bf16 and f16, against
/// the CPU kernel in f32 on the same rounded inputs: every head dim the
/// kernels take, padding, windows across tiles, dropout.
#[test]
fn attention_on_tensor_cores() {
    let mut rng = Rng::new(11);
    for (dtype, tol) in HALF_TYPES {
        for (b, n, h, dh, lengths) in [
            (2, 70, 2, 32, vec![70, 41]),
            (1, 200, 2, 64, vec![187]),
            (2, 90, 2, 96, vec![90, 33]),
            (1, 130, 3, 128, vec![130]),
        ] {
            let qkv = rng.tensor(&[b, n, 3 * h * dh], -1.5, 1.5);
            let (cos, sin) = rotary_tables(&inv_freq(10_000.0, dh), n, 1.0);
            for (name, window, dropout) in [
                ("attention", None, None),
                ("attention window 17/5", Some((17, 5)), None),
                (
                    "attention window 40/0 dropout",
                    Some((40, 0)),
                    Some((0.2f32, 9u64)),
                ),
            ] {
                let opts = attention_opts((h, dh), (&cos, &sin), &lengths, window, dropout);
                parity(
                    &format!("{dtype:?} tensor-core {name} (B {b}, N {n}, H {h}, Dh {dh})"),
                    &mut rng,
                    std::slice::from_ref(&qkv),
                    |t| {
                        in_half(t, dtype, |x| {
                            if x[0].device().is_cuda() {
                                attention_tensor_cores(&x[0], &opts)
                            } else {
                                attention(&x[0], &opts)
                            }
                        })
                    },
                    tol,
                );
            }
        }
    }
}

/// The forward of inference on candle-flash-attn (feature `flash-attn`),
/// bf16 and f16, against the CPU kernel in f32 on the same rounded inputs:
/// head dims 32 and 128 (the kernels `benches/gpu/build.sh` compiles), full
/// batches (the crate's batched call) and padded ones (packed variable-length
/// sequences), windows. [`attention`] of a forward-only call must take this
/// path: its result equals [`attention_flash`]'s.
#[cfg(feature = "flash-attn")]
#[test]
fn attention_forward_on_flash_attn() {
    let mut rng = Rng::new(12);
    let dev = gpu();
    for (dtype, tol) in HALF_TYPES {
        for (b, n, h, dh, lengths) in [
            (2, 70, 2, 32, vec![70, 70]),
            (3, 150, 2, 32, vec![150, 41, 97]),
            (1, 300, 3, 128, vec![300]),
            (2, 130, 2, 128, vec![57, 130]),
        ] {
            let qkv = rng.tensor(&[b, n, 3 * h * dh], -1.5, 1.5);
            let (cos, sin) = rotary_tables(&inv_freq(10_000.0, dh), n, 1.0);
            for (name, window) in [
                ("attention", None),
                ("attention window 17/5", Some((17, 5))),
                ("attention window 40/0", Some((40, 0))),
                ("attention window 500/500", Some((500, 500))),
            ] {
                let what = format!("{dtype:?} flash {name} (B {b}, N {n}, H {h}, Dh {dh})");
                let opts = AttentionOptions {
                    forward_only: true,
                    ..attention_opts((h, dh), (&cos, &sin), &lengths, window, None)
                };
                let rounded = qkv.to_dtype(dtype).unwrap();
                let want = attention(&rounded.to_dtype(DType::F32).unwrap(), &opts)
                    .and_then(|y| y.to_dtype(dtype)?.to_dtype(DType::F32))
                    .unwrap();
                let on_gpu = rounded.to_device(&dev).unwrap();
                let got = attention_flash(&on_gpu, &opts).unwrap();
                assert_eq!(got.dtype(), dtype, "{what}: the dtype changed");
                let host = |t: Tensor| {
                    t.to_dtype(DType::F32)
                        .and_then(|t| t.to_device(&Device::Cpu))
                        .unwrap()
                };
                let got = host(got);
                assert_close(&what, &got, &want, tol);
                let routed = host(attention(&on_gpu, &opts).unwrap());
                let values = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).unwrap();
                assert!(
                    values(&routed) == values(&got),
                    "{what}: attention() did not take flash attention"
                );
            }
        }
    }
}

/// One hour of audio at the reference's d768 (45,000 frames after 8x
/// subsampling, 6 heads of 128) and a d256 batch (8 x 512 frames, 8 heads
/// of 32), bf16: flash attention's forward against the tensor-core kernel's
/// on the same input (outputs within bf16 tolerance), and both timed
/// (printed, not asserted; BENCHMARKS.md records them).
#[cfg(feature = "flash-attn")]
#[test]
fn flash_attn_forward_against_tensor_cores_at_length() {
    let dev = gpu();
    let mut rng = Rng::new(13);
    for (b, n, h, dh) in [(1, 45_000, 6, 128), (8, 512, 8, 32)] {
        let (cos, sin) = rotary_tables(&inv_freq(10_000.0, dh), n, 1.0);
        let qkv = rng
            .tensor(&[b, n, 3 * h * dh], -1.5, 1.5)
            .to_dtype(DType::BF16)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        let opts = AttentionOptions {
            n_heads: h,
            head_dim: dh,
            rotary: Some((&cos[..], &sin[..])),
            forward_only: true,
            ..Default::default()
        };
        let time = |op: &dyn Fn() -> Result<Tensor>| -> (Tensor, f64) {
            let mut best = f64::INFINITY;
            let mut out = op().unwrap();
            for _ in 0..5 {
                dev.synchronize().unwrap();
                let t0 = std::time::Instant::now();
                out = op().unwrap();
                dev.synchronize().unwrap();
                best = best.min(t0.elapsed().as_secs_f64());
            }
            (out, best)
        };
        let (flash, t_flash) = time(&|| attention_flash(&qkv, &opts));
        let (tc, t_tc) = time(&|| attention_tensor_cores(&qkv, &opts));
        let f32_host = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
        let what = format!("flash vs tensor cores (B {b}, N {n}, H {h}, Dh {dh})");
        assert_close(
            &what,
            &f32_host(&flash).unwrap(),
            &f32_host(&tc).unwrap(),
            3e-2,
        );
        println!(
            "timing (printed, not asserted) {what}: forward flash {:.2} ms, tensor cores {:.2} ms ({:.2}x)",
            t_flash * 1e3,
            t_tc * 1e3,
            t_tc / t_flash
        );
    }
}

/// A sequence whose (H, N, N) scores alone would take 64 GiB: the CUDA
/// attention must keep memory linear in N. Spot rows of the output are
/// checked against a direct computation on the host.
#[test]
fn attention_memory_is_linear_in_length() {
    let (n, h, dh) = (65_536, 4, 64);
    let mut rng = Rng::new(9);
    let qkv = rng.tensor(&[1, n, 3 * h * dh], -1.0, 1.0);
    let dev = gpu();
    let var = Var::from_tensor(&qkv.to_device(&dev).unwrap()).unwrap();
    let opts = AttentionOptions {
        n_heads: h,
        head_dim: dh,
        ..Default::default()
    };
    let out = attention(var.as_tensor(), &opts).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();
    let grad = grads.get(var.as_tensor()).expect("a gradient");
    let grad_sum: f32 = grad.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(
        grad_sum.is_finite() && grad_sum > 0.0,
        "gradient sum {grad_sum}"
    );
    let x: Vec<f32> = qkv.flatten_all().unwrap().to_vec1().unwrap();
    let got: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    let at = |t: usize, hd: usize, d: usize, part: usize| {
        f64::from(x[(t * h * dh + hd * dh + d) * 3 + part])
    };
    for i in [0, 31_337, n - 1] {
        for hd in 0..h {
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    (0..dh)
                        .map(|d| at(i, hd, d, 0) * at(j, hd, d, 1))
                        .sum::<f64>()
                        / (dh as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..dh {
                let want = (0..n).map(|j| weights[j] * at(j, hd, d, 2)).sum::<f64>() / total;
                let g = f64::from(got[i * h * dh + hd * dh + d]);
                assert!(
                    (g - want).abs() < 1e-4,
                    "row {i} head {hd} dim {d}: {g} vs {want}"
                );
            }
        }
    }
}

#[test]
fn ctc() {
    let mut rng = Rng::new(5);
    let logits = rng.tensor(&[2, 30, 11], -2.0, 2.0);
    let targets = vec![vec![1, 2, 2, 5], vec![3, 4]];
    parity(
        "ctc_loss",
        &mut rng,
        &[logits],
        |t| ctc_loss(&t[0], &targets, &[30, 21], 10, false),
        1e-4,
    );
    // The CUDA kernels: many stored alpha segments, repeats and labels at
    // several positions, a blank that is not the last class, an empty target,
    // an item with no frames, and one too short for its target (zero_infinity).
    let (t, c) = (400, 50);
    let logits = rng.tensor(&[5, t, c], -3.0, 3.0);
    let long: Vec<u32> = (0..90).map(|i| [1, 1, 7, 3, 7, 49][i % 6]).collect();
    let targets = vec![long, vec![], vec![5, 6], vec![4; 30], vec![2, 2]];
    let lengths = [400, 17, 0, 29, 333];
    parity(
        "ctc_loss, CUDA kernel cases",
        &mut rng,
        &[logits],
        |x| ctc_loss(&x[0], &targets, &lengths, 0, true),
        1e-4,
    );
}

/// `LCASR_KERNEL_PROFILE`'s report names the kernels launched since the last
/// one, with their calls, and is empty of them afterwards.
#[test]
fn kernel_profile_reports_launches() {
    use lcasr_kernels::kernel_profile::{set_enabled, take_report};
    let x = Tensor::ones((4, 6), DType::F32, &gpu()).unwrap();
    set_enabled(true);
    take_report().unwrap();
    glu(&x).unwrap();
    glu(&x).unwrap();
    let report = take_report().unwrap().expect("profiling is on");
    set_enabled(false);
    let line = report
        .lines()
        .find(|l| l.contains("glu"))
        .unwrap_or_else(|| panic!("no GLU kernel in the report:\n{report}"));
    assert!(line.contains(" 2 x "), "two launches expected: {line}");
    assert!(report.starts_with("lcasr kernels:"), "{report}");
    let after = take_report().unwrap();
    assert!(after.is_none(), "launches reported twice: {after:?}");
}
