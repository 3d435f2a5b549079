//! Optimizers against the reference fixture (`optimizers.safetensors` +
//! `optimizers.json`, every case), the hand vectors of reference-spec §6.3,
//! bit-identical save → load → continue, the config builder's errors, the
//! weight-decay rule, and gradient clipping against `train_step.safetensors`.
//! The update cases run on both update paths: the host kernels and the tensor
//! ops that GPUs run (`UpdatePath::TensorOps`, here on the CPU).

mod common;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use lcasr::train::clip::{
    clip_coefficient, clip_grad_norm, grad_total_norm, grads_are_finite, GradAccumulator,
};
use lcasr::train::optimizer::{
    collect_params, decays_by_default, DecayGroups, Optimizer, OptimizerConfig, Param, UpdatePath,
};
use serde_json::{json, Value};

/// The fixture's initial parameters `p0..pN` (all decayed, as a plain torch param list).
fn fixture_params(tensors: &HashMap<String, Tensor>, n: usize) -> Vec<Param> {
    (0..n)
        .map(|j| Param {
            name: format!("p{j}"),
            var: Var::from_tensor(&tensors[&format!("init.p{j}")]).unwrap(),
            weight_decay: true,
            lr_scale: 1.0,
        })
        .collect()
}

fn step_grads(tensors: &HashMap<String, Tensor>, params: &[Param], k: usize) -> GradStore {
    let mut grads = GradStore::default();
    for p in params {
        let g = tensors[&format!("grads.{}", p.name)].get(k).unwrap();
        grads.insert(p.var.as_tensor(), g);
    }
    grads
}

/// Both update paths.
const PATHS: [UpdatePath; 2] = [UpdatePath::ByDevice, UpdatePath::TensorOps];

fn fixture_setup() -> (HashMap<String, Tensor>, Value, Vec<f64>, usize) {
    let tensors = common::load_tensors("optimizers.safetensors");
    let spec = common::load_json("optimizers.json");
    let lrs: Vec<f64> = spec["lrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let n = spec["num_params"].as_u64().unwrap() as usize;
    assert_eq!(spec["steps"].as_u64().unwrap() as usize, lrs.len());
    (tensors, spec, lrs, n)
}

#[test]
fn every_fixture_case_matches_the_reference() {
    let (tensors, spec, lrs, n) = fixture_setup();
    let cases = spec["cases"].as_object().unwrap();
    assert!(!cases.is_empty());
    for ((case, def), path) in cases.iter().flat_map(|c| PATHS.map(|p| (c, p))) {
        let mut cfg = OptimizerConfig::from_args(def["optimizer"].as_str().unwrap(), &def["args"])
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        cfg.update = path;
        let mut opt = cfg.build();
        let params = fixture_params(&tensors, n);
        for (k, &lr) in lrs.iter().enumerate() {
            opt.step(&params, &step_grads(&tensors, &params, k), lr)
                .unwrap();
            for p in &params {
                let want =
                    common::to_f32_vec(&tensors[&format!("{case}.{}", p.name)].get(k).unwrap());
                let got = common::to_f32_vec(p.var.as_tensor());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                        "{case} ({path:?}) step {k} {}[{i}]: {g} vs {w}",
                        p.name
                    );
                }
            }
        }
        assert_eq!(opt.steps(), lrs.len() as u64);
    }
}

/// Saves after `split` steps (through a safetensors file and JSON text), loads
/// into fresh variables and a fresh optimizer, and finishes the run there.
/// The optimizer after the restart runs on `resumed_path`.
fn run_with_restart(
    cfg: &OptimizerConfig,
    tensors: &HashMap<String, Tensor>,
    n: usize,
    lrs: &[f64],
    split: usize,
    resumed_path: UpdatePath,
) -> Vec<Vec<f32>> {
    let params = fixture_params(tensors, n);
    let mut opt = cfg.build();
    for (k, &lr) in lrs.iter().enumerate().take(split) {
        opt.step(&params, &step_grads(tensors, &params, k), lr)
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    candle_core::safetensors::save(&state, &path).unwrap();
    let scalars = serde_json::to_string(&opt.state_scalars()).unwrap();
    let values: Vec<Tensor> = params
        .iter()
        .map(|p| p.var.as_tensor().copy().unwrap())
        .collect();
    drop((opt, params));

    let params: Vec<Param> = values
        .iter()
        .enumerate()
        .map(|(j, t)| Param {
            name: format!("p{j}"),
            var: Var::from_tensor(t).unwrap(),
            weight_decay: true,
            lr_scale: 1.0,
        })
        .collect();
    let mut opt = OptimizerConfig {
        update: resumed_path,
        ..cfg.clone()
    }
    .build();
    let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    opt.load_state(&loaded, &serde_json::from_str(&scalars).unwrap())
        .unwrap();
    for (k, &lr) in lrs.iter().enumerate().skip(split) {
        opt.step(&params, &step_grads(tensors, &params, k), lr)
            .unwrap();
    }
    params
        .iter()
        .map(|p| common::to_f32_vec(p.var.as_tensor()))
        .collect()
}

#[test]
fn save_load_continue_is_bit_identical() {
    let (tensors, spec, lrs, n) = fixture_setup();
    for (case, def) in spec["cases"].as_object().unwrap() {
        for path in PATHS {
            let mut cfg =
                OptimizerConfig::from_args(def["optimizer"].as_str().unwrap(), &def["args"])
                    .unwrap();
            cfg.update = path;
            let straight = run_with_restart(&cfg, &tensors, n, &lrs, lrs.len(), path);
            for split in [1, 3] {
                let resumed = run_with_restart(&cfg, &tensors, n, &lrs, split, path);
                for (a, b) in straight.iter().zip(&resumed) {
                    let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{case} ({path:?}): resuming after {split} steps changed the result"
                    );
                }
            }
        }
    }
}

/// A run saved on one update path resumes on the other (a CPU checkpoint
/// continued on a GPU and back): the state moves with it, and the result stays
/// within float rounding of the straight run.
#[test]
fn state_moves_between_update_paths() {
    let (tensors, spec, lrs, n) = fixture_setup();
    for (case, def) in spec["cases"].as_object().unwrap() {
        let cfg =
            OptimizerConfig::from_args(def["optimizer"].as_str().unwrap(), &def["args"]).unwrap();
        let straight = run_with_restart(&cfg, &tensors, n, &lrs, lrs.len(), UpdatePath::ByDevice);
        for [first, then] in [PATHS, [PATHS[1], PATHS[0]]] {
            let cfg = OptimizerConfig {
                update: first,
                ..cfg.clone()
            };
            let resumed = run_with_restart(&cfg, &tensors, n, &lrs, 2, then);
            for (a, b) in straight.iter().zip(&resumed) {
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-6 + 1e-6 * x.abs(),
                        "{case}: {first:?} then {then:?}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn loading_another_optimizers_state_fails() {
    let (tensors, _, lrs, n) = fixture_setup();
    let params = fixture_params(&tensors, n);
    let mut adam = OptimizerConfig::from_args("adam", &Value::Null)
        .unwrap()
        .build();
    adam.step(&params, &step_grads(&tensors, &params, 0), lrs[0])
        .unwrap();
    let state: HashMap<String, Tensor> = adam.state_tensors().into_iter().collect();
    let mut madgrad = OptimizerConfig::from_args("madgrad", &Value::Null)
        .unwrap()
        .build();
    let err = madgrad
        .load_state(&state, &adam.state_scalars())
        .unwrap_err();
    assert!(err.to_string().contains("adam"), "{err}");
}

/// An optimizer over one parameter `w` = [1, -2].
fn one_param(
    name: &str,
    args: &Value,
    path: UpdatePath,
    weight_decay: bool,
) -> (Box<dyn Optimizer>, Var, [Param; 1]) {
    let mut cfg = OptimizerConfig::from_args(name, args).unwrap();
    cfg.update = path;
    let var = Var::from_slice(&[1.0f32, -2.0], 2, &Device::Cpu).unwrap();
    let param = Param {
        name: "w".into(),
        var: var.clone(),
        weight_decay,
        lr_scale: 1.0,
    };
    (cfg.build(), var, [param])
}

#[test]
fn hand_vectors_of_the_spec() {
    let grads = [[0.5f32, 0.1], [-0.3, 0.2], [0.2, -0.4]];
    let cases: [(&str, Value, [[f64; 2]; 3]); 6] = [
        (
            "madgrad",
            json!({}),
            [
                [0.9963157, -2.0021546],
                [0.9961976, -2.0063241],
                [0.9940141, -2.0036376],
            ],
        ),
        (
            "madgrad",
            json!({"weight_decay": 0.1}),
            [
                [0.9960849, -1.9978454],
                [0.9945089, -1.9959128],
                [0.9903876, -1.990167],
            ],
        ),
        (
            "madgrad",
            json!({"weight_decay": 0.1, "decouple_decay": true}),
            [
                [0.9953156, -2.0001545],
                [0.9943021, -2.0025234],
                [0.9913138, -1.9982142],
            ],
        ),
        (
            "madgrad",
            json!({"momentum": 0.0}),
            [
                [0.9631575, -2.0215454],
                [0.9951347, -2.0438485],
                [0.9743633, -1.9794586],
            ],
        ),
        (
            "mirrormadgrad",
            json!({}),
            [
                [0.9992063, -2.0004642],
                [0.9990791, -2.0015798],
                [0.9985114, -2.0015948],
            ],
        ),
        (
            "mirrormadgrad",
            json!({"weight_decay": 0.1, "decouple_decay": true}),
            [
                [0.9991063, -2.0002642],
                [0.99879, -2.0009995],
                [0.9979525, -2.0004714],
            ],
        ),
    ];
    for ((name, args, want), path) in cases.iter().flat_map(|c| PATHS.map(|p| (c, p))) {
        let (mut opt, var, params) = one_param(name, args, path, true);
        for (g, w) in grads.iter().zip(want) {
            let mut store = GradStore::default();
            store.insert(var.as_tensor(), Tensor::new(g, &Device::Cpu).unwrap());
            opt.step(&params, &store, 0.01).unwrap();
            let got = var.as_tensor().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(w) {
                assert!(
                    (*a as f64 - b).abs() <= 2e-6,
                    "{name} {args} ({path:?}): {got:?} vs {w:?}"
                );
            }
        }
    }
}

#[test]
fn parameters_without_gradient_are_left_alone() {
    let a = Var::from_slice(&[1.0f32, 2.0], 2, &Device::Cpu).unwrap();
    let b = Var::from_slice(&[3.0f32], 1, &Device::Cpu).unwrap();
    let params = collect_params(
        [("b".to_string(), b.clone()), ("a".to_string(), a.clone())],
        DecayGroups::Conventional,
    );
    assert_eq!(params[0].name, "a");
    let mut store = GradStore::default();
    store.insert(
        a.as_tensor(),
        Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap(),
    );
    for name in ["madgrad", "mirrormadgrad", "adam", "adamw"] {
        let mut opt = OptimizerConfig::from_args(name, &Value::Null)
            .unwrap()
            .build();
        opt.step(&params, &store, 0.1).unwrap();
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), [3.0], "{name}");
        assert!(
            opt.state_tensors().iter().all(|(k, _)| k.starts_with("a.")),
            "{name}"
        );
    }
}

#[test]
fn builder_rejects_bad_configs() {
    let err = |name: &str, args: Value| {
        OptimizerConfig::from_args(name, &args)
            .unwrap_err()
            .to_string()
    };
    assert!(err("sgd", json!({})).contains("unknown optimizer `sgd`"));
    assert!(err("madgrad", json!({"betas": [0.9, 0.99]})).contains("betas"));
    assert!(err("adam", json!({"momentum": 0.9})).contains("momentum"));
    assert!(err("adam", json!({"amsgrad": true})).contains("amsgrad"));
    assert!(err("madgrad", json!({"lr": "fast"})).contains("lr"));
    assert!(err("madgrad", json!({"momentum": 1.5})).contains("momentum"));
    let cfg = OptimizerConfig::from_args("MADGRAD", &json!({"lr": 3e-3})).unwrap();
    assert_eq!((cfg.lr, cfg.momentum, cfg.eps), (3e-3, 0.9, 1e-6));
    let cfg = OptimizerConfig::from_args("mirrormadgrad", &Value::Null).unwrap();
    assert_eq!(cfg.eps, 0.0);
    let cfg = OptimizerConfig::from_args("adamw", &json!({"betas": [0.8, 0.9]})).unwrap();
    assert_eq!((cfg.betas, cfg.weight_decay), ((0.8, 0.9), 0.01));
}

#[test]
fn weight_decay_grouping_rule() {
    assert!(decays_by_default("layers.0.ff1.fn.fn.fc1.weight", 2));
    assert!(decays_by_default("subsampling.conv.0.weight", 4));
    assert!(decays_by_default(
        "layers.0.conv.fn.depthwise_conv.weight",
        3
    ));
    assert!(!decays_by_default("layers.0.ff1.fn.fn.fc1.bias", 1));
    assert!(!decays_by_default("layers.0.attend.norm.weight", 1));
    assert!(!decays_by_default("layers.0.conv.fn.batch_norm.weight", 1));
    assert!(!decays_by_default("embedding.weight", 2));
    assert!(!decays_by_default("fourier_pos_enc.w_r", 2));
    assert!(!decays_by_default("rotary_pos_emb.inv_freq", 1));
}

fn two_param_case() -> (Vec<Param>, GradStore) {
    let a = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let b = Var::zeros((1, 1), DType::F32, &Device::Cpu).unwrap();
    let params = collect_params(
        [("a".to_string(), a.clone()), ("b".to_string(), b.clone())],
        DecayGroups::All,
    );
    let mut grads = GradStore::default();
    grads.insert(
        a.as_tensor(),
        Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap(),
    );
    grads.insert(
        b.as_tensor(),
        Tensor::new(&[[12.0f32]], &Device::Cpu).unwrap(),
    );
    (params, grads)
}

#[test]
fn clip_by_global_norm_hand_case() {
    let (params, mut grads) = two_param_case();
    let total = clip_grad_norm(&params, &mut grads, 6.5).unwrap();
    assert!((total - 13.0).abs() < 1e-12);
    let coef = 6.5 / (13.0 + 1e-6);
    let a = grads
        .get(params[0].var.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((a[0] - (3.0 * coef) as f32).abs() < 1e-6 && (a[1] - (4.0 * coef) as f32).abs() < 1e-6);
    assert!((grad_total_norm(&params, &grads).unwrap() - 6.5).abs() < 1e-5);
    // Below the threshold nothing changes.
    let (params, mut grads) = two_param_case();
    assert_eq!(clip_grad_norm(&params, &mut grads, 100.0).unwrap(), 13.0);
    assert_eq!(
        grads
            .get(params[1].var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        [12.0]
    );
}

#[test]
fn clip_matches_the_train_step_fixture() {
    let tensors = common::load_tensors("train_step.safetensors");
    let spec = common::load_json("train_step.json");
    let mut params = Vec::new();
    let mut grads = GradStore::default();
    for (name, g) in tensors.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let var = Var::zeros(g.shape(), DType::F32, &Device::Cpu).unwrap();
        grads.insert(var.as_tensor(), g.clone());
        params.push((name["grad.".len()..].to_string(), var));
    }
    assert!(!params.is_empty());
    let params = collect_params(params, DecayGroups::Conventional);
    let want_norm = tensors["grad_total_norm"].to_scalar::<f32>().unwrap() as f64;
    let want_coef = tensors["clip_coef"].to_scalar::<f32>().unwrap() as f64;
    let max_norm = spec["clip_value"].as_f64().unwrap();
    let total = clip_grad_norm(&params, &mut grads, max_norm).unwrap();
    assert!(
        (total - want_norm).abs() <= 1e-5 * want_norm,
        "{total} vs {want_norm}"
    );
    let coef = clip_coefficient(total, max_norm);
    assert!(
        (coef - want_coef).abs() <= 1e-5 * want_coef,
        "{coef} vs {want_coef}"
    );
    let after = grad_total_norm(&params, &grads).unwrap();
    assert!(
        (after - max_norm.min(total)).abs() <= 1e-5 * max_norm,
        "{after}"
    );
    assert!(grads_are_finite(&params, &grads).unwrap());
}

#[test]
fn finiteness_check_and_accumulation() {
    let (params, grads) = two_param_case();
    assert!(grads_are_finite(&params, &grads).unwrap());
    let mut bad = GradStore::default();
    bad.insert(
        params[1].var.as_tensor(),
        Tensor::new(&[[f32::NAN]], &Device::Cpu).unwrap(),
    );
    assert!(!grads_are_finite(&params, &bad).unwrap());

    let mut acc = GradAccumulator::new();
    acc.add(&params, &grads).unwrap();
    acc.add(&params, &grads).unwrap();
    assert_eq!(acc.count(), 2);
    let sum = acc.take();
    assert_eq!(acc.count(), 0);
    let a = sum
        .get(params[0].var.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, [6.0, 8.0]);
    assert!((grad_total_norm(&params, &sum).unwrap() - 26.0).abs() < 1e-9);

    // A non-finite chunk is skipped; what was accumulated before survives.
    let mut acc = GradAccumulator::new();
    assert!(acc.add_if_finite(&params, &grads).unwrap());
    assert!(!acc.add_if_finite(&params, &bad).unwrap());
    assert_eq!(acc.count(), 1);
    let kept = acc.take();
    assert!(grads_are_finite(&params, &kept).unwrap());
    assert_eq!(
        kept.get(params[0].var.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        [3.0, 4.0]
    );
}

/// A parameter group with its own learning rate (`lr_scale`) is updated
/// exactly as if that parameter alone were stepped at the scaled LR, for every
/// optimizer; Adam leaves a group at scale 0 untouched (frozen).
#[test]
fn per_group_learning_rates() {
    let grads_of = |k: usize| -> Vec<f32> { vec![0.3 - 0.1 * k as f32, -0.2 + 0.05 * k as f32] };
    for name in ["madgrad", "mirrormadgrad", "adam", "adamw"] {
        for scale in [0.25f64, 0.0] {
            let cfg = OptimizerConfig::from_args(name, &json!({})).unwrap();
            // Two groups in one optimizer.
            let a = Var::from_slice(&[1.0f32, -2.0], 2, &Device::Cpu).unwrap();
            let b = Var::from_slice(&[0.5f32, 0.7], 2, &Device::Cpu).unwrap();
            let mut pb = Param::new("b", b.clone());
            pb.lr_scale = scale;
            let both = [Param::new("a", a.clone()), pb];
            // The scaled parameter alone, at the scaled LR.
            let solo = Var::from_slice(&[0.5f32, 0.7], 2, &Device::Cpu).unwrap();
            let solo_params = [Param::new("b", solo.clone())];
            let mut opt = cfg.build();
            let mut opt_solo = cfg.build();
            for k in 0..4 {
                let g = Tensor::new(grads_of(k).as_slice(), &Device::Cpu).unwrap();
                let mut store = GradStore::default();
                store.insert(a.as_tensor(), g.clone());
                store.insert(b.as_tensor(), g.clone());
                opt.step(&both, &store, 0.01).unwrap();
                let mut solo_store = GradStore::default();
                solo_store.insert(solo.as_tensor(), g);
                opt_solo
                    .step(&solo_params, &solo_store, 0.01 * scale)
                    .unwrap();
            }
            let got = b.as_tensor().to_vec1::<f32>().unwrap();
            let want = solo.as_tensor().to_vec1::<f32>().unwrap();
            assert_eq!(got, want, "{name} at scale {scale}");
            if scale == 0.0 && name.starts_with("adam") {
                assert_eq!(got, vec![0.5, 0.7], "{name}: a zero-LR group stays frozen");
            }
            assert_ne!(
                a.as_tensor().to_vec1::<f32>().unwrap(),
                vec![1.0, -2.0],
                "{name}: the unscaled group moved"
            );
        }
    }
}

/// MirrorMADGRAD's default eps is 0: an element whose gradient has always been
/// zero has a zero denominator, and must stay put (not become NaN) on both paths.
#[test]
fn zero_gradient_elements_stay_put_without_eps() {
    for (name, path) in ["mirrormadgrad", "madgrad"]
        .into_iter()
        .flat_map(|n| PATHS.map(|p| (n, p)))
    {
        let (mut opt, var, params) = one_param(name, &json!({"eps": 0.0}), path, false);
        for _ in 0..3 {
            let mut store = GradStore::default();
            let g = Tensor::new(&[0.0f32, 0.5], &Device::Cpu).unwrap();
            store.insert(var.as_tensor(), g);
            opt.step(&params, &store, 0.01).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(got[0], 1.0, "{name} ({path:?}): {got:?}");
        assert!(
            got[1].is_finite() && got[1] != -2.0,
            "{name} ({path:?}): {got:?}"
        );
    }
}
