//! Trainable rotary frequencies (`model.learned_rotary`): the forward equals
//! the fixed-table forward for the same frequencies, the frequencies' gradient
//! matches finite differences and survives activation checkpointing, and the
//! parameter trains, saves and reloads under its reference name.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{max_abs_diff, reload_via_safetensors, to_f32_vec, train_step_batch};
use lcasr::config::{load_model_section, ConvNorm, ModelConfig};
use lcasr::model::{Encoder, ForwardOptions};

const NAME: &str = "rotary_pos_emb.inv_freq";

fn tiny_config(learned: bool) -> ModelConfig {
    let path = common::fixture("model_tiny_config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut cfg = load_model_section(&text, &path.display().to_string()).unwrap();
    assert!(cfg.use_rotary);
    cfg.learned_rotary = learned;
    cfg
}

/// Features and (unequal) lengths of the `train_step` fixture.
fn fixture_batch() -> (Tensor, Vec<usize>) {
    let batch = train_step_batch();
    (batch.features, batch.lengths)
}

fn logits(model: &Encoder, x: &Tensor, lengths: &[usize], train: bool) -> Tensor {
    let opts = ForwardOptions {
        train,
        ..Default::default()
    };
    model.forward(x, Some(lengths), &opts).unwrap().logits
}

/// A learned-rotary model whose frequencies are moved off their initial
/// values (so that nothing depends on the config's base).
fn learned_model(cfg: &ModelConfig, seed: u64) -> Encoder {
    let model = Encoder::init(cfg, 15, seed, &Device::Cpu).unwrap();
    let var = &model.params()[NAME];
    let moved: Vec<f32> = to_f32_vec(var.as_tensor())
        .iter()
        .enumerate()
        .map(|(i, f)| f * (1.0 + 0.1 * ((i % 3) as f32 - 1.0)))
        .collect();
    var.set(&Tensor::from_vec(moved, var.shape(), &Device::Cpu).unwrap())
        .unwrap();
    model
}

/// The fixed-table model with the same parameters and frequencies.
fn fixed_twin(learned: &Encoder) -> Encoder {
    let dict: HashMap<String, Tensor> = learned.state_dict().unwrap().into_iter().collect();
    let fixed = Encoder::from_state_dict(&tiny_config(false), dict, &Device::Cpu).unwrap();
    assert!(!fixed.params().contains_key(NAME));
    fixed
}

#[test]
fn learned_frequencies_are_a_parameter_and_the_forward_equals_the_fixed_tables() {
    let (x, lengths) = fixture_batch();
    let learned = learned_model(&tiny_config(true), 4);
    let fresh = Encoder::init(&tiny_config(true), 15, 4, &Device::Cpu).unwrap();
    let fixed_fresh = Encoder::init(&tiny_config(false), 15, 4, &Device::Cpu).unwrap();
    // Initialised from the config's base, like the fixed buffer.
    let sd: HashMap<String, Tensor> = fixed_fresh.state_dict().unwrap().into_iter().collect();
    assert_eq!(
        to_f32_vec(fresh.params()[NAME].as_tensor()),
        to_f32_vec(&sd[NAME])
    );
    assert_eq!(fresh.num_parameters(), fixed_fresh.num_parameters() + 16);

    let fixed = fixed_twin(&learned);
    for train in [false, true] {
        let a = to_f32_vec(&logits(&learned, &x, &lengths, train));
        let b = to_f32_vec(&logits(&fixed, &x, &lengths, train));
        let d = max_abs_diff(&a, &b);
        assert!(d <= 1e-5, "train {train}: max |diff| {d}");
    }
    // The frequencies matter: the fresh ones give other logits.
    let c = to_f32_vec(&logits(&fresh, &x, &lengths, false));
    let a = to_f32_vec(&logits(&learned, &x, &lengths, false));
    assert!(max_abs_diff(&a, &c) > 1e-4);
}

/// Fixed weights in [-1, 1] for `n` logits.
fn weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1009) as f32 / 504.5 - 1.0)
        .collect()
}

/// sum(logits ⊙ r) of a training forward, r = [`weights`].
fn weighted_loss(model: &Encoder, x: &Tensor, lengths: &[usize]) -> Tensor {
    let l = logits(model, x, lengths, true);
    let r = Tensor::from_vec(weights(l.elem_count()), l.dims(), &Device::Cpu).unwrap();
    (l * r).unwrap().sum_all().unwrap()
}

/// The value of [`weighted_loss`], summed in f64 (less rounding noise for
/// finite differences).
fn weighted_loss_f64(model: &Encoder, x: &Tensor, lengths: &[usize]) -> f64 {
    let l = to_f32_vec(&logits(model, x, lengths, true));
    l.iter()
        .zip(weights(l.len()))
        .map(|(&a, b)| a as f64 * b as f64)
        .sum()
}

#[test]
fn frequency_gradient_matches_finite_differences() {
    let (x, lengths) = fixture_batch();
    // LayerNorm in the conv module: no running statistics change between the
    // evaluations of the loss.
    let mut cfg = tiny_config(true);
    cfg.conv_norm = ConvNorm::LayerNorm;
    let model = learned_model(&cfg, 6);
    let var = model.params()[NAME].clone();
    let grads = weighted_loss(&model, &x, &lengths).backward().unwrap();
    let got = to_f32_vec(grads.get(var.as_tensor()).expect("a gradient for inv_freq"));
    let base = to_f32_vec(var.as_tensor());
    // The loss at base + t·direction.
    let loss_at = |direction: &[f32], t: f32| {
        let v: Vec<f32> = base.iter().zip(direction).map(|(b, d)| b + t * d).collect();
        var.set(&Tensor::from_vec(v, base.len(), &Device::Cpu).unwrap())
            .unwrap();
        weighted_loss_f64(&model, &x, &lengths)
    };
    let step = 3e-3f32;
    let derivative = |direction: &[f32]| {
        ((loss_at(direction, step) - loss_at(direction, -step)) / (2.0 * step as f64)) as f32
    };
    let want: Vec<f32> = (0..base.len())
        .map(|i| {
            let mut unit = vec![0f32; base.len()];
            unit[i] = 1.0;
            derivative(&unit)
        })
        .collect();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        scale > 1e-2,
        "the loss depends on the frequencies: {want:?}"
    );
    // f32 forwards: rounding noise and the step's truncation error reach
    // about 1e-2 of the largest component (measured 0.9e-2).
    let d = max_abs_diff(&got, &want);
    assert!(
        d <= 3e-2 * scale,
        "max |diff| {d} (scale {scale}):\n got {got:?}\nwant {want:?}"
    );
    // Along the gradient the derivative is its norm: one estimate with the
    // signal of every component (measured within 0.1%).
    let norm = got.iter().map(|g| g * g).sum::<f32>().sqrt();
    let unit: Vec<f32> = got.iter().map(|g| g / norm).collect();
    let along = derivative(&unit);
    assert!(
        (along - norm).abs() <= 1e-2 * norm,
        "derivative along the gradient {along}, gradient norm {norm}"
    );
}

#[test]
fn checkpointed_blocks_pass_on_the_frequency_gradient() {
    let (x, lengths) = fixture_batch();
    let grads = |every: u64| {
        let mut cfg = tiny_config(true);
        cfg.checkpoint_every_n_layers = every;
        let model = learned_model(&cfg, 9);
        let g = weighted_loss(&model, &x, &lengths).backward().unwrap();
        model
            .params()
            .iter()
            .map(|(k, v)| {
                let t = g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {k}"));
                (k.clone(), to_f32_vec(t))
            })
            .collect::<Vec<_>>()
    };
    let plain = grads(0);
    for every in [1, 2] {
        for ((name, want), (_, got)) in plain.iter().zip(grads(every)) {
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let d = max_abs_diff(&got, want);
            assert!(
                d <= 1e-5 * scale,
                "n = {every}, {name}: max |diff| {d} (scale {scale})"
            );
        }
    }
}

#[test]
fn learned_frequencies_train_save_and_reload() {
    let (x, lengths) = fixture_batch();
    let cfg = tiny_config(true);
    let model = learned_model(&cfg, 2);
    let var = model.params()[NAME].clone();
    let before = to_f32_vec(var.as_tensor());
    let g = weighted_loss(&model, &x, &lengths).backward().unwrap();
    let step = (g.get(var.as_tensor()).unwrap() * 1e-3).unwrap();
    var.set(&(var.as_tensor() - step).unwrap()).unwrap();
    assert_ne!(
        to_f32_vec(var.as_tensor()),
        before,
        "the frequencies trained"
    );

    assert!(model.state_dict().unwrap().iter().any(|(n, _)| n == NAME));
    let dir = tempfile::tempdir().unwrap();
    let reloaded = reload_via_safetensors(&model, &cfg, &dir.path().join("model.safetensors"));
    assert_eq!(
        to_f32_vec(reloaded.params()[NAME].as_tensor()),
        to_f32_vec(var.as_tensor())
    );
    assert_eq!(
        to_f32_vec(&logits(&reloaded, &x, &lengths, false)),
        to_f32_vec(&logits(&model, &x, &lengths, false))
    );
}
