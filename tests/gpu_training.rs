//! The training step's own arithmetic on a CUDA device against the CPU: every
//! optimizer's device update (tensor ops on the GPU) against its host kernel,
//! optimizer state held on the GPU through a checkpoint and back, and the
//! gradient norm and finiteness check. Built only with `--features cuda`;
//! `benches/gpu/run.sh` runs it on the GPU machine (part 1).
#![cfg(feature = "cuda")]

mod common;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use lcasr::train::clip::{grad_total_norm, grads_are_finite};
use lcasr::train::optimizer::{Optimizer, OptimizerConfig, Param};
use serde_json::{json, Value};

/// Shapes of the test parameters: a matrix, a vector with a length no block
/// size divides, a rank-3 kernel.
const SHAPES: [&[usize]; 3] = [&[64, 33], &[257], &[5, 7, 3]];

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (run this test on a GPU machine)")
}

/// Deterministic values in [-1, 1), every seventh exactly 0 so that the
/// zero-denominator guards run.
fn values(seed: u64, n: usize) -> Vec<f32> {
    common::noise(n, seed, 1.0, 0.0)
        .iter()
        .enumerate()
        .map(|(i, &v)| if i % 7 == 3 { 0.0 } else { v as f32 })
        .collect()
}

fn params_on(device: &Device) -> Vec<Param> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let n = shape.iter().product();
            let t = Tensor::from_vec(values(i as u64, n), *shape, device).unwrap();
            Param::new(format!("layer{i}.weight"), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// The gradients of step `k`, on the parameters' device.
fn grads(params: &[Param], k: usize) -> GradStore {
    let mut store = GradStore::default();
    for (i, p) in params.iter().enumerate() {
        let n = p.var.elem_count();
        let g = Tensor::from_vec(
            values(100 + 10 * k as u64 + i as u64, n),
            p.var.shape(),
            p.var.device(),
        )
        .unwrap()
        .affine(0.1 * (k + 1) as f64, 0.0)
        .unwrap();
        store.insert(p.var.as_tensor(), g);
    }
    store
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: GPU {g} vs CPU {w}"
        );
    }
}

fn cases() -> Vec<(&'static str, Value)> {
    vec![
        ("madgrad", json!({})),
        ("madgrad", json!({"weight_decay": 0.1})),
        (
            "madgrad",
            json!({"weight_decay": 0.1, "decouple_decay": true}),
        ),
        ("madgrad", json!({"momentum": 0.0, "eps": 0.0})),
        ("mirrormadgrad", json!({})),
        (
            "mirrormadgrad",
            json!({"weight_decay": 0.1, "decouple_decay": true}),
        ),
        ("mirrormadgrad", json!({"weight_decay": 0.1})),
        ("adam", json!({"weight_decay": 0.1})),
        ("adamw", json!({})),
    ]
}

fn run(opt: &mut dyn Optimizer, params: &[Param], steps: std::ops::Range<usize>) {
    for k in steps {
        opt.step(params, &grads(params, k), 0.01 * (k + 1) as f64)
            .unwrap();
    }
}

#[test]
fn optimizers_on_the_gpu_match_their_host_kernels() {
    let gpu = gpu();
    for (name, args) in cases() {
        let cfg = OptimizerConfig::from_args(name, &args).unwrap();
        let (cpu_params, gpu_params) = (params_on(&Device::Cpu), params_on(&gpu));
        let (mut on_cpu, mut on_gpu) = (cfg.build(), cfg.build());
        run(on_cpu.as_mut(), &cpu_params, 0..5);
        run(on_gpu.as_mut(), &gpu_params, 0..5);
        for (c, g) in cpu_params.iter().zip(&gpu_params) {
            assert!(
                g.var.device().same_device(&gpu),
                "{name}: moved off the GPU"
            );
            let what = format!("{name} {args} {}", c.name);
            assert_close(
                &what,
                &host(g.var.as_tensor()),
                &host(c.var.as_tensor()),
                1e-5,
            );
        }
        let cpu_state: HashMap<String, Tensor> = on_cpu.state_tensors().into_iter().collect();
        let gpu_state = on_gpu.state_tensors();
        assert_eq!(gpu_state.len(), cpu_state.len(), "{name}");
        for (key, t) in &gpu_state {
            assert!(
                t.device().same_device(&gpu),
                "{name}: state {key} is not on the GPU"
            );
            let what = format!("{name} {args} state {key}");
            assert_close(&what, &host(t), &host(&cpu_state[key]), 1e-5);
        }
    }
}

#[test]
fn gpu_optimizer_state_resumes_bit_identically() {
    let gpu = gpu();
    for (name, args) in cases() {
        let cfg = OptimizerConfig::from_args(name, &args).unwrap();
        let straight = params_on(&gpu);
        let mut opt = cfg.build();
        run(opt.as_mut(), &straight, 0..4);

        let params = params_on(&gpu);
        let mut opt = cfg.build();
        run(opt.as_mut(), &params, 0..2);
        // As a checkpoint: serialised from the GPU, read back on the CPU.
        let state = opt.state_tensors();
        let bytes =
            safetensors::serialize(state.iter().map(|(k, t)| (k.as_str(), t)), None).unwrap();
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let scalars = opt.state_scalars();
        let mut resumed = cfg.build();
        resumed.load_state(&loaded, &scalars).unwrap();
        run(resumed.as_mut(), &params, 2..4);
        for (a, b) in straight.iter().zip(&params) {
            let same = host(a.var.as_tensor())
                .iter()
                .zip(host(b.var.as_tensor()))
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name} {args}: resuming changed {}", a.name);
        }
    }
}

#[test]
fn gradient_norm_and_finiteness_on_the_gpu() {
    let gpu = gpu();
    let (cpu_params, gpu_params) = (params_on(&Device::Cpu), params_on(&gpu));
    let (cpu_grads, gpu_grads) = (grads(&cpu_params, 3), grads(&gpu_params, 3));
    let want = grad_total_norm(&cpu_params, &cpu_grads).unwrap();
    let got = grad_total_norm(&gpu_params, &gpu_grads).unwrap();
    assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    assert!(grads_are_finite(&gpu_params, &gpu_grads).unwrap());
    for bad in [f32::NAN, f32::INFINITY] {
        let mut store = grads(&gpu_params, 3);
        let p = &gpu_params[1];
        let mut g = host(store.get(p.var.as_tensor()).unwrap());
        g[200] = bad;
        store.insert(p.var.as_tensor(), Tensor::from_vec(g, 257, &gpu).unwrap());
        assert!(!grads_are_finite(&gpu_params, &store).unwrap(), "{bad}");
        assert!(
            !grad_total_norm(&gpu_params, &store).unwrap().is_finite(),
            "{bad}"
        );
    }
}
