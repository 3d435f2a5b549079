//! The conv module's norm options other than BatchRenorm (`model.conv_norm`:
//! `batch_norm`, `layer_norm`, `group_norm`, `none`): each norm against a
//! plain f64 loop computation (train and eval, with padding), its gradients
//! against finite differences, BatchNorm's running-statistics update, and a
//! model with each norm: state-dict names, one training step, save and reload
//! (model file and training checkpoint), activation checkpointing, and the
//! data-parallel refusal.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{
    ctc_forward, max_abs_diff, reload_via_safetensors, to_f32_vec, train_step_batch, Batch,
};
use lcasr::config::{load_model_section, ConvNorm, LoadOptions, ModelConfig};
use lcasr::model::{
    batch_norm_silu, group_norm_silu, layer_norm_silu, BatchNormMode, BatchNormState, Encoder,
    ForwardOptions, RunningStats, BATCH_NORM_MOMENTUM, CONV_NORM_EPS,
};

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// A (B, N, C) channels-last input held as plain values.
#[derive(Clone)]
struct Input {
    b: usize,
    n: usize,
    c: usize,
    x: Vec<f64>,
}

impl Input {
    fn new(b: usize, n: usize, c: usize, seed: u64) -> Self {
        // Channel-dependent offsets and scales, so statistics differ per channel.
        let mut x = common::noise(b * n * c, seed, 1.0, 0.0);
        for (i, v) in x.iter_mut().enumerate() {
            let ch = (i % c) as f64;
            *v = *v * (0.5 + 0.25 * ch) + 0.3 * ch - 0.4;
        }
        Input { b, n, c, x }
    }

    fn at(&self, b: usize, t: usize, c: usize) -> f64 {
        self.x[(b * self.n + t) * self.c + c]
    }

    fn tensor(&self, dtype: DType) -> Tensor {
        Tensor::from_vec(self.x.clone(), (self.b, self.n, self.c), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Frames counted for item `b`.
    fn valid(&self, lengths: Option<&[usize]>, b: usize) -> usize {
        lengths.map_or(self.n, |l| l[b])
    }
}

fn tensor(v: &[f64], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// SiLU(((x - mean[c]) / sqrt(var[c] + eps)) * w + b) at every position.
fn normalise(input: &Input, mean: &[f64], var: &[f64], w: &[f64], bias: &[f64]) -> Vec<f64> {
    (0..input.x.len())
        .map(|i| {
            let c = i % input.c;
            let z = (input.x[i] - mean[c]) / (var[c] + CONV_NORM_EPS).sqrt();
            silu(z * w[c] + bias[c])
        })
        .collect()
}

/// Per-channel mean and biased variance over the counted positions, and the count.
fn channel_moments(input: &Input, lengths: Option<&[usize]>) -> (Vec<f64>, Vec<f64>, usize) {
    let mut mean = vec![0.0; input.c];
    let mut var = vec![0.0; input.c];
    let mut count = 0;
    for b in 0..input.b {
        count += input.valid(lengths, b);
    }
    for (c, m) in mean.iter_mut().enumerate() {
        for b in 0..input.b {
            for t in 0..input.valid(lengths, b) {
                *m += input.at(b, t, c);
            }
        }
        *m /= count as f64;
    }
    for (c, v) in var.iter_mut().enumerate() {
        for b in 0..input.b {
            for t in 0..input.valid(lengths, b) {
                *v += (input.at(b, t, c) - mean[c]).powi(2);
            }
        }
        *v /= count as f64;
    }
    (mean, var, count)
}

/// GroupNorm by loops: per item and group over the counted frames.
fn group_norm_loops(
    input: &Input,
    groups: usize,
    lengths: Option<&[usize]>,
    w: &[f64],
    bias: &[f64],
) -> Vec<f64> {
    let per = input.c / groups;
    let mut out = vec![0.0; input.x.len()];
    for b in 0..input.b {
        let valid = input.valid(lengths, b);
        for g in 0..groups {
            let chans = g * per..(g + 1) * per;
            let count = (valid * per) as f64;
            let mut mean = 0.0;
            for t in 0..valid {
                for c in chans.clone() {
                    mean += input.at(b, t, c);
                }
            }
            mean /= count;
            let mut var = 0.0;
            for t in 0..valid {
                for c in chans.clone() {
                    var += (input.at(b, t, c) - mean).powi(2);
                }
            }
            var /= count;
            for t in 0..input.n {
                for c in chans.clone() {
                    let z = (input.at(b, t, c) - mean) / (var + CONV_NORM_EPS).sqrt();
                    out[(b * input.n + t) * input.c + c] = silu(z * w[c] + bias[c]);
                }
            }
        }
    }
    out
}

/// LayerNorm over the channels of every position, by loops.
fn layer_norm_loops(input: &Input, w: &[f64], bias: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; input.x.len()];
    for (row, chunk) in input.x.chunks(input.c).enumerate() {
        let mean = chunk.iter().sum::<f64>() / input.c as f64;
        let var = chunk.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / input.c as f64;
        for (c, v) in chunk.iter().enumerate() {
            let z = (v - mean) / (var + CONV_NORM_EPS).sqrt();
            out[row * input.c + c] = silu(z * w[c] + bias[c]);
        }
    }
    out
}

fn assert_close(what: &str, got: &[f64], want: &[f64], atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= atol, "{what}: max |diff| {worst} > {atol}");
}

const LENGTHS: [usize; 3] = [7, 4, 6];

#[test]
fn batch_norm_matches_loops_in_train_and_eval_with_and_without_padding() {
    let input = Input::new(3, 7, 6, 1);
    let w = common::noise(6, 2, 0.5, 1.0);
    let bias = common::noise(6, 3, 0.5, 0.0);
    let (tw, tb) = (tensor(&w, DType::F32), tensor(&bias, DType::F32));
    for lengths in [None, Some(&LENGTHS[..])] {
        let (y, moments) = batch_norm_silu(
            &input.tensor(DType::F32),
            &tw,
            &tb,
            BatchNormMode::Train { lengths },
        )
        .unwrap();
        let (mean, var, count) = channel_moments(&input, lengths);
        let what = format!("train, lengths {lengths:?}");
        assert_close(
            &what,
            &values(&y),
            &normalise(&input, &mean, &var, &w, &bias),
            2e-5,
        );
        let m = moments.unwrap();
        assert_eq!(m.count, count);
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert_close(&format!("{what}: mean"), &f(&m.mean), &mean, 1e-5);
        assert_close(&format!("{what}: var"), &f(&m.var), &var, 1e-5);

        // Running statistics after this batch: PyTorch's formula with the
        // unbiased variance, from a non-trivial starting state.
        let mut state = BatchNormState {
            mean: common::noise(6, 4, 0.2, 0.0)
                .iter()
                .map(|&v| v as f32)
                .collect(),
            var: common::noise(6, 5, 0.2, 1.0)
                .iter()
                .map(|&v| v as f32)
                .collect(),
            num_batches_tracked: 41,
        };
        let before = state.clone();
        state.update(&m);
        let k = BATCH_NORM_MOMENTUM as f64;
        assert_eq!(k, 0.1f32 as f64);
        let want_mean: Vec<f64> = (0..6)
            .map(|c| (1.0 - k) * before.mean[c] as f64 + k * mean[c])
            .collect();
        let unbiased = count as f64 / (count as f64 - 1.0);
        let want_var: Vec<f64> = (0..6)
            .map(|c| (1.0 - k) * before.var[c] as f64 + k * var[c] * unbiased)
            .collect();
        assert_close(
            &format!("{what}: running_mean"),
            &f(&state.mean),
            &want_mean,
            1e-5,
        );
        assert_close(
            &format!("{what}: running_var"),
            &f(&state.var),
            &want_var,
            1e-5,
        );
        assert_eq!(state.num_batches_tracked, 42);
    }
    // Padding matters: the two statistics differ.
    assert_ne!(
        channel_moments(&input, None).0,
        channel_moments(&input, Some(&LENGTHS)).0
    );

    let rm = common::noise(6, 6, 0.3, 0.5);
    let rv = common::noise(6, 7, 0.3, 1.2);
    let rm32: Vec<f32> = rm.iter().map(|&v| v as f32).collect();
    let rv32: Vec<f32> = rv.iter().map(|&v| v as f32).collect();
    let (y, none) = batch_norm_silu(
        &input.tensor(DType::F32),
        &tw,
        &tb,
        BatchNormMode::Eval {
            running_mean: &rm32,
            running_var: &rv32,
        },
    )
    .unwrap();
    assert!(none.is_none());
    let rm: Vec<f64> = rm32.iter().map(|&v| v as f64).collect();
    let rv: Vec<f64> = rv32.iter().map(|&v| v as f64).collect();
    assert_close(
        "eval",
        &values(&y),
        &normalise(&input, &rm, &rv, &w, &bias),
        2e-5,
    );
}

#[test]
fn group_and_layer_norm_match_loops_with_and_without_padding() {
    let input = Input::new(3, 7, 6, 11);
    let w = common::noise(6, 12, 0.5, 1.0);
    let bias = common::noise(6, 13, 0.5, 0.0);
    let (tw, tb) = (tensor(&w, DType::F32), tensor(&bias, DType::F32));
    for groups in [1, 3, 6] {
        for lengths in [None, Some(&LENGTHS[..])] {
            let y = group_norm_silu(&input.tensor(DType::F32), &tw, &tb, groups, lengths).unwrap();
            assert_close(
                &format!("group_norm, {groups} groups, lengths {lengths:?}"),
                &values(&y),
                &group_norm_loops(&input, groups, lengths, &w, &bias),
                2e-5,
            );
        }
    }
    assert!(group_norm_silu(&input.tensor(DType::F32), &tw, &tb, 4, None).is_err());
    // The model's 32 groups over 64 channels.
    let wide = Input::new(2, 5, 64, 14);
    let (w64, b64) = (
        common::noise(64, 15, 0.5, 1.0),
        common::noise(64, 16, 0.5, 0.0),
    );
    let y = group_norm_silu(
        &wide.tensor(DType::F32),
        &tensor(&w64, DType::F32),
        &tensor(&b64, DType::F32),
        32,
        Some(&[5, 2]),
    )
    .unwrap();
    assert_close(
        "group_norm, 32 groups",
        &values(&y),
        &group_norm_loops(&wide, 32, Some(&[5, 2]), &w64, &b64),
        2e-5,
    );

    let y = layer_norm_silu(&input.tensor(DType::F32), &tw, &tb).unwrap();
    assert_close(
        "layer_norm",
        &values(&y),
        &layer_norm_loops(&input, &w, &bias),
        2e-5,
    );
}

/// Gradients of sum(y ⊙ r) with respect to x, weight and bias, against
/// central differences of the same function evaluated again.
fn check_gradients(
    what: &str,
    dtype: DType,
    step: f64,
    rtol: f64,
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) {
    let input = Input::new(2, 5, 6, 21);
    let w = common::noise(6, 22, 0.5, 1.0);
    let bias = common::noise(6, 23, 0.5, 0.0);
    let r = common::noise(input.x.len(), 24, 1.0, 0.0);
    let rt = Tensor::from_vec(r.clone(), (2, 5, 6), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
        let xt = Tensor::from_vec(x.to_vec(), (2, 5, 6), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let y = values(&f(&xt, &tensor(w, dtype), &tensor(b, dtype)));
        y.iter().zip(&r).map(|(a, b)| a * b).sum()
    };
    let xv = Var::from_tensor(&input.tensor(dtype)).unwrap();
    let wv = Var::from_tensor(&tensor(&w, dtype)).unwrap();
    let bv = Var::from_tensor(&tensor(&bias, dtype)).unwrap();
    let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
    let grads = (y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
    let args = [input.x.clone(), w.clone(), bias.clone()];
    for (k, (name, var)) in [("x", &xv), ("weight", &wv), ("bias", &bv)]
        .into_iter()
        .enumerate()
    {
        let got = values(grads.get(var.as_tensor()).unwrap_or_else(|| {
            panic!("{what}: no gradient reached {name}");
        }));
        let want: Vec<f64> = (0..args[k].len())
            .map(|i| {
                let at = |delta: f64| {
                    let mut a = args.clone();
                    a[k][i] += delta;
                    loss(&a[0], &a[1], &a[2])
                };
                (at(step) - at(-step)) / (2.0 * step)
            })
            .collect();
        let scale = want.iter().fold(1e-3, |m: f64, v| m.max(v.abs()));
        assert_close(&format!("{what}: d/d{name}"), &got, &want, rtol * scale);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let lengths = Some(&[5usize, 3][..]);
    check_gradients("batch_norm train", DType::F64, 1e-6, 1e-6, &|x, w, b| {
        batch_norm_silu(x, w, b, BatchNormMode::Train { lengths })
            .unwrap()
            .0
    });
    check_gradients(
        "batch_norm train, all frames",
        DType::F64,
        1e-6,
        1e-6,
        &|x, w, b| {
            batch_norm_silu(x, w, b, BatchNormMode::Train { lengths: None })
                .unwrap()
                .0
        },
    );
    let (rm, rv) = (
        [0.1f32, -0.2, 0.3, 0.0, 0.5, -0.5],
        [0.5f32, 1.0, 2.0, 1.5, 0.8, 1.1],
    );
    check_gradients("batch_norm eval", DType::F64, 1e-6, 1e-6, &|x, w, b| {
        let mode = BatchNormMode::Eval {
            running_mean: &rm,
            running_var: &rv,
        };
        batch_norm_silu(x, w, b, mode).unwrap().0
    });
    check_gradients("group_norm", DType::F64, 1e-6, 1e-6, &|x, w, b| {
        group_norm_silu(x, w, b, 3, lengths).unwrap()
    });
    check_gradients(
        "group_norm, all frames",
        DType::F64,
        1e-6,
        1e-6,
        &|x, w, b| group_norm_silu(x, w, b, 2, None).unwrap(),
    );
    // The LayerNorm kernel is f32 only: coarser step and tolerance.
    check_gradients("layer_norm", DType::F32, 1e-2, 2e-2, &|x, w, b| {
        layer_norm_silu(x, w, b).unwrap()
    });
}

fn tiny_config(norm: ConvNorm) -> ModelConfig {
    let path = common::fixture("model_tiny_config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut cfg = load_model_section(&text, &path.display().to_string()).unwrap();
    cfg.conv_norm = norm;
    cfg
}

const NEW_NORMS: [ConvNorm; 4] = [
    ConvNorm::BatchNorm,
    ConvNorm::LayerNorm,
    ConvNorm::GroupNorm,
    ConvNorm::None,
];

/// The `train_step` fixture's batch, whose lengths differ (so padding is exercised).
fn fixture_batch() -> Batch {
    let batch = train_step_batch();
    assert!(batch.lengths.iter().any(|&l| l != batch.lengths[0]));
    batch
}

/// A training forward and backward (CTC summed); the loss and the gradient
/// of every parameter as raw bits.
fn train_step(model: &Encoder, batch: &Batch) -> (f32, HashMap<String, Vec<u32>>, Vec<Tensor>) {
    let (_, loss) = ctc_forward(model, batch, 0);
    let grads = loss.backward().unwrap();
    let mut bits = HashMap::new();
    let mut tensors = Vec::new();
    for (name, var) in model.params() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        bits.insert(
            name.clone(),
            to_f32_vec(g).into_iter().map(f32::to_bits).collect(),
        );
        tensors.push(g.clone());
    }
    (loss.to_scalar::<f32>().unwrap(), bits, tensors)
}

fn eval_logits(model: &Encoder, batch: &Batch) -> Vec<f32> {
    let out = model
        .forward(
            &batch.features,
            Some(&batch.lengths),
            &ForwardOptions::default(),
        )
        .unwrap();
    to_f32_vec(&out.logits)
}

/// The suffixes of the tensors below `layers.{i}.conv.fn.batch_norm.`.
fn norm_tensors(dict: &[(String, Tensor)], layer: usize) -> Vec<(String, DType)> {
    let prefix = format!("layers.{layer}.conv.fn.batch_norm.");
    let mut names: Vec<(String, DType)> = dict
        .iter()
        .filter_map(|(k, t)| k.strip_prefix(&prefix).map(|s| (s.to_string(), t.dtype())))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    names
}

#[test]
fn models_with_each_norm_train_save_and_reload() {
    let batch = fixture_batch();
    let dir = tempfile::tempdir().unwrap();
    for norm in NEW_NORMS {
        let cfg = tiny_config(norm);
        let model = Encoder::init(&cfg, 15, 3, &Device::Cpu).unwrap();
        let dict = model.state_dict().unwrap();
        let want: Vec<(String, DType)> = match norm {
            ConvNorm::BatchNorm => vec![
                ("bias".into(), DType::F32),
                ("num_batches_tracked".into(), DType::I64),
                ("running_mean".into(), DType::F32),
                ("running_var".into(), DType::F32),
                ("weight".into(), DType::F32),
            ],
            ConvNorm::LayerNorm | ConvNorm::GroupNorm => {
                vec![("bias".into(), DType::F32), ("weight".into(), DType::F32)]
            }
            _ => vec![],
        };
        for layer in 0..cfg.n_layers as usize {
            assert_eq!(norm_tensors(&dict, layer), want, "{norm:?}, layer {layer}");
        }

        let before: Vec<Vec<f32>> = model
            .params()
            .values()
            .map(|v| to_f32_vec(v.as_tensor()))
            .collect();
        let (loss, _, grads) = train_step(&model, &batch);
        assert!(loss.is_finite() && loss > 0.0, "{norm:?}: loss {loss}");
        for (var, g) in model.params().values().zip(&grads) {
            var.set(&(var.as_tensor() - (g * 1e-2).unwrap()).unwrap())
                .unwrap();
        }
        let changed = model
            .params()
            .iter()
            .zip(&before)
            .filter(|((_, v), b)| to_f32_vec(v.as_tensor()) != **b)
            .map(|((k, _), _)| k.clone())
            .collect::<Vec<_>>();
        assert!(
            changed.len() * 10 >= before.len() * 9,
            "{norm:?}: only {} of {} parameters changed",
            changed.len(),
            before.len()
        );
        if norm != ConvNorm::None {
            assert!(changed.contains(&"layers.0.conv.fn.batch_norm.weight".to_string()));
        }
        let stats = model.running_stats();
        if norm == ConvNorm::BatchNorm {
            assert_eq!(stats.len(), cfg.n_layers as usize);
            for (prefix, s) in &stats {
                let RunningStats::Batch(s) = s else {
                    panic!("{prefix}: not BatchNorm statistics")
                };
                assert_eq!(s.num_batches_tracked, 1, "{prefix}");
                assert!(s.mean.iter().any(|&m| m != 0.0), "{prefix}: mean updated");
                assert!(s.var.iter().any(|&v| v != 1.0), "{prefix}: var updated");
            }
        } else {
            assert!(stats.is_empty(), "{norm:?} keeps no running statistics");
        }

        // The model file round trip.
        let path = dir.path().join(format!("{norm:?}.safetensors"));
        let reloaded = reload_via_safetensors(&model, &cfg, &path);
        let want_logits = eval_logits(&model, &batch);
        assert_eq!(eval_logits(&reloaded, &batch), want_logits, "{norm:?}");
        assert_eq!(reloaded.running_stats(), stats, "{norm:?}");

        // The training checkpoint round trip into a differently initialised model.
        let ckpt = dir.path().join(format!("{norm:?}-ckpt"));
        let opt = lcasr::train::optimizer::OptimizerConfig::defaults(
            lcasr::train::optimizer::OptimizerKind::Madgrad,
        )
        .build();
        let state = lcasr::train::state::TrainingState {
            counters: Default::default(),
            lr_schedule: lcasr::train::lr_schedule::CosineWarmup::new(
                1e-3,
                1e-4,
                1,
                10,
                lcasr::train::lr_schedule::DecayUnit::Steps,
            )
            .unwrap()
            .state(),
            sequence_schedule: None,
            rng: lcasr::train::rng::RunRng::new(1).state(),
            optimizer: opt.name().to_string(),
            script_state: serde_json::Value::Null,
        };
        lcasr::train::state::save_checkpoint(&ckpt, &model, opt.as_ref(), &state, &[]).unwrap();
        let resumed = Encoder::init(&cfg, 15, 99, &Device::Cpu).unwrap();
        let mut opt2 = lcasr::train::optimizer::OptimizerConfig::defaults(
            lcasr::train::optimizer::OptimizerKind::Madgrad,
        )
        .build();
        lcasr::train::state::load_checkpoint(&ckpt, &resumed, opt2.as_mut()).unwrap();
        assert_eq!(eval_logits(&resumed, &batch), want_logits, "{norm:?}");
        assert_eq!(resumed.running_stats(), stats, "{norm:?}");
    }
}

#[test]
fn batch_norm_eval_uses_the_running_statistics() {
    let batch = fixture_batch();
    let model = Encoder::init(&tiny_config(ConvNorm::BatchNorm), 15, 5, &Device::Cpu).unwrap();
    let fresh = eval_logits(&model, &batch);
    let mut stats = model.running_stats();
    for (_, s) in &mut stats {
        if let RunningStats::Batch(s) = s {
            s.mean.iter_mut().for_each(|m| *m = 0.25);
            s.var.iter_mut().for_each(|v| *v = 3.0);
        }
    }
    model.set_running_stats(&stats).unwrap();
    assert_ne!(eval_logits(&model, &batch), fresh);
    // Statistics of another kind are refused.
    let renorm = Encoder::init(&tiny_config(ConvNorm::BatchRenorm), 15, 5, &Device::Cpu).unwrap();
    assert!(model.set_running_stats(&renorm.running_stats()).is_err());
}

#[test]
fn checkpointed_batch_norm_blocks_give_the_plain_gradients_and_update_once() {
    let batch = fixture_batch();
    let run = |every: u64| {
        let mut cfg = tiny_config(ConvNorm::BatchNorm);
        cfg.checkpoint_every_n_layers = every;
        let model = Encoder::init(&cfg, 15, 8, &Device::Cpu).unwrap();
        let (loss, grads, _) = train_step(&model, &batch);
        (loss.to_bits(), grads, model.running_stats())
    };
    let plain = run(0);
    let checkpointed = run(1);
    assert_eq!(plain.0, checkpointed.0, "loss");
    assert_eq!(plain.1.len(), checkpointed.1.len());
    for (name, g) in &plain.1 {
        let other = &checkpointed.1[name];
        let diff = max_abs_diff(
            &g.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>(),
            &other.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>(),
        );
        assert!(g == other, "gradient of {name} differs by up to {diff}");
    }
    assert_eq!(plain.2, checkpointed.2, "running statistics");
    for (prefix, s) in &checkpointed.2 {
        let RunningStats::Batch(s) = s else {
            panic!("{prefix}: not BatchNorm statistics")
        };
        assert_eq!(s.num_batches_tracked, 1, "{prefix}: updated once");
    }
}

#[test]
fn group_norm_needs_a_width_divisible_by_32() {
    let mut cfg = tiny_config(ConvNorm::GroupNorm);
    cfg.d_model = 48;
    cfg.n_heads = 2;
    cfg.head_dim = 24;
    let err = Encoder::init(&cfg, 15, 1, &Device::Cpu)
        .err()
        .expect("48 channels cannot form 32 groups")
        .to_string();
    assert!(err.contains("group_norm") && err.contains("48"), "{err}");
}

#[test]
fn data_parallel_training_refuses_unsynchronised_norms() {
    let yaml = "model:\n  n_layers: 1\n  d_model: 64\n  n_heads: 2\n  head_dim: 32\n\
                optimizer:\n  name: madgrad\n  args:\n    lr: 3e-3\n\
                scheduler:\n  warmup_steps: 3\n\
                audio_chunking:\n  size: 1000\n\
                checkpointing:\n  dir: /nonexistent/run\n\
                data:\n  path: /nonexistent/manifest.json\n  tokenizer: /nonexistent/tok.json\n\
                training:\n  max_epochs: 1\n  batch_size: 2\n  backprop_every: 1\n  clip_value: 0.8\n  random_seed: 7\n";
    // The accepted norms get past the check and fail later, on the missing data.
    for (norm, refused) in [
        ("batch_norm", true),
        ("group_norm", false),
        ("layer_norm", false),
    ] {
        let opts = LoadOptions {
            strict: false,
            overrides: vec![format!("model.conv_norm={norm}")],
        };
        let cfg = lcasr::config::load_str(yaml, "test.yaml", &opts)
            .unwrap()
            .config;
        let err = lcasr::parallel::train_data_parallel(
            &cfg,
            &lcasr::parallel::DataParallelOptions::new(2),
        )
        .err()
        .expect("refused")
        .to_string();
        assert_eq!(err.contains("model.conv_norm"), refused, "{norm}: {err}");
        assert_eq!(err.contains(norm), refused, "{norm}: {err}");
    }
}
