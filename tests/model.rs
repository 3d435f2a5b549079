//! The encoder against the reference: eval outputs, train-mode outputs,
//! BatchRenorm buffer updates and the gradient of every parameter
//! (fixtures `model_tiny*` and `train_step*`; shapes come from the files).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{load_tensors, max_abs_diff, to_f32_vec};
use lcasr::config::{load_model_section, ModelConfig};
use lcasr::model::{Encoder, ForwardOptions};
use lcasr::train::clip::clip_grad_norm;
use lcasr::train::loss::{backward_loss, ctc, logged_loss, Reduction};
use lcasr::train::optimizer::{collect_params, DecayGroups, OptimizerConfig, OptimizerKind};

fn tiny_config() -> ModelConfig {
    let path = common::fixture("model_tiny_config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    load_model_section(&text, &path.display().to_string()).unwrap()
}

fn tiny_model() -> Encoder {
    Encoder::from_state_dict(
        &tiny_config(),
        load_tensors("model_tiny.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor, atol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let d = max_abs_diff(&to_f32_vec(got), &to_f32_vec(want));
    assert!(d <= atol, "{name}: max |diff| {d} > {atol}");
}

#[test]
fn eval_outputs_match_reference() {
    let io = load_tensors("model_tiny_io.safetensors");
    let model = tiny_model();
    let opts = ForwardOptions {
        keep_layer_outputs: true,
        keep_interim_logits: true,
        ..Default::default()
    };
    let lens = common::to_usize_vec(&io["input_lengths"]);
    let out = model.forward(&io["input"], Some(&lens), &opts).unwrap();
    assert_eq!(out.lengths, common::to_usize_vec(&io["output_lengths"]));
    assert_close("logits", &out.logits, &io["logits"], 2e-4);
    assert_close(
        "log_probs",
        &out.log_probs().unwrap(),
        &io["log_probs"],
        2e-4,
    );
    for (i, t) in out.layer_outputs.iter().enumerate() {
        assert_close(
            &format!("layer_out.{i}"),
            t,
            &io[&format!("layer_out.{i}")],
            2e-4,
        );
    }
    let fixture_interim = io
        .keys()
        .filter(|k| k.starts_with("interim_logits."))
        .count();
    assert!(
        out.interim_logits.len() >= fixture_interim,
        "asked for interim logits, got {} for {fixture_interim} fixtures",
        out.interim_logits.len()
    );
    for i in 0..fixture_interim {
        assert_close(
            &format!("interim_logits.{i}"),
            &out.interim_logits[i],
            &io[&format!("interim_logits.{i}")],
            2e-4,
        );
    }
}

#[test]
fn equal_lengths_batch_uses_no_masks() {
    let io = load_tensors("model_tiny_io.safetensors");
    let model = tiny_model();
    let lens = common::to_usize_vec(&io["eq.input_lengths"]);
    let out = model
        .forward(&io["eq.input"], Some(&lens), &ForwardOptions::default())
        .unwrap();
    assert_eq!(out.lengths, common::to_usize_vec(&io["eq.output_lengths"]));
    assert_close(
        "eq.log_probs",
        &out.log_probs().unwrap(),
        &io["eq.log_probs"],
        2e-4,
    );
}

#[test]
fn parameter_names_and_count_match_the_state_dict() {
    let sd = load_tensors("model_tiny.safetensors");
    let model = tiny_model();
    let exported: HashMap<String, Tensor> = model.state_dict().unwrap().into_iter().collect();
    let mut want: Vec<&String> = sd.keys().collect();
    want.sort();
    let mut got: Vec<&String> = exported.keys().collect();
    got.sort();
    assert_eq!(got, want);
    for (k, t) in &sd {
        assert_eq!(
            to_f32_vec(&exported[k]),
            to_f32_vec(t),
            "{k} round-trips unchanged"
        );
    }
}

#[test]
fn mismatched_checkpoint_lists_every_problem() {
    let mut sd = load_tensors("model_tiny.safetensors");
    sd.remove("decoder.reprojection.bias");
    sd.insert(
        "layers.0.attend.fn.out_proj.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    sd.insert(
        "layers.9.bogus".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = Encoder::from_state_dict(&tiny_config(), sd, &Device::Cpu)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("3 problems"), "{err}");
    assert!(
        err.contains("missing tensor `decoder.reprojection.bias`"),
        "{err}"
    );
    assert!(
        err.contains("tensor `layers.0.attend.fn.out_proj.weight` has shape [3, 3]"),
        "{err}"
    );
    assert!(err.contains("unexpected tensor `layers.9.bogus`"), "{err}");
}

/// One whole reference training step: forward in training mode (BatchRenorm
/// statistics over all frames, as the reference), summed CTC, the reference's
/// loss scaling, backward, global-norm clipping, one MADGRAD step.
#[test]
fn training_step_matches_reference_through_the_madgrad_update() {
    let ts = load_tensors("train_step.safetensors");
    let model = tiny_model();
    let lens = common::to_usize_vec(&ts["input_lengths"]);
    let opts = ForwardOptions {
        train: true,
        compat_renorm_padding: true,
        ..Default::default()
    };
    let out = model.forward(&ts["input"], Some(&lens), &opts).unwrap();
    assert_eq!(out.lengths, common::to_usize_vec(&ts["output_lengths"]));
    assert_close(
        "log_probs",
        &out.log_probs().unwrap(),
        &ts["log_probs"],
        2e-4,
    );

    let target_lengths = common::to_usize_vec(&ts["target_lengths"]);
    let targets_flat = ts["targets"].to_dtype(DType::I64).unwrap();
    let targets: Vec<Vec<u32>> = (0..target_lengths.len())
        .map(|b| {
            let row = targets_flat.get(b).unwrap().to_vec1::<i64>().unwrap();
            row[..target_lengths[b]].iter().map(|&v| v as u32).collect()
        })
        .collect();
    let blank = (model.classes() - 1) as u32;
    let loss_sum = ctc(
        &out.logits,
        &targets,
        &out.lengths,
        blank,
        Reduction::Sum,
        false,
    )
    .unwrap();
    let want_sum = ts["loss_sum"].to_scalar::<f32>().unwrap();
    let got_sum = loss_sum.to_scalar::<f32>().unwrap();
    assert!(
        ((got_sum - want_sum) / want_sum).abs() < 1e-5,
        "loss_sum {got_sum} vs {want_sum}"
    );
    let chunk = ts["chunk_size_nominal"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let batch = ts["batch_size_nominal"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let loss = backward_loss(&loss_sum, chunk as usize, batch as usize, 1, false).unwrap();
    let want_backward = ts["loss_backward"].to_scalar::<f32>().unwrap();
    let got_backward = loss.to_scalar::<f32>().unwrap();
    assert!(
        ((got_backward - want_backward) / want_backward).abs() < 1e-5,
        "loss_backward {got_backward} vs {want_backward}"
    );
    let frames: usize = lens.iter().sum();
    let want_logged = ts["loss_logged"].to_scalar::<f32>().unwrap() as f64;
    let got_logged = logged_loss(got_sum as f64, frames);
    assert!(
        ((got_logged - want_logged) / want_logged).abs() < 1e-5,
        "loss_logged {got_logged} vs {want_logged}"
    );
    let grads = loss.backward().unwrap();

    // Largest gradient entry over all tensors, for the absolute part of the tolerance.
    let largest = ts
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .flat_map(|(_, t)| to_f32_vec(t))
        .fold(0f32, |m, v| m.max(v.abs()));
    let mut checked = 0;
    for (name, var) in model.params() {
        let want = &ts[&format!("grad.{name}")];
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let w = to_f32_vec(want);
        let max_g = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(&to_f32_vec(got), &w);
        let tol = if name.ends_with("depthwise_conv.bias") {
            // Analytically zero (a bias right before batch statistics); the
            // reference holds rounding noise there.
            2e-4
        } else {
            1e-4 * max_g + 1e-6 * largest
        };
        assert!(
            d <= tol,
            "grad of {name}: max |diff| {d} > {tol} (max |g| {max_g})"
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        ts.keys().filter(|k| k.starts_with("grad.")).count()
    );

    // Global-norm clipping at 0.8 and one MADGRAD step at the fixture's LR.
    let params = collect_params(
        model.params().iter().map(|(k, v)| (k.clone(), v.clone())),
        DecayGroups::Conventional,
    );
    let mut grads = grads;
    let total = clip_grad_norm(&params, &mut grads, 0.8).unwrap();
    let want_total = ts["grad_total_norm"].to_scalar::<f32>().unwrap() as f64;
    assert!(
        ((total - want_total) / want_total).abs() < 1e-4,
        "grad norm {total} vs {want_total}"
    );
    let lr = ts["lr"].to_scalar::<f32>().unwrap() as f64;
    let mut opt = OptimizerConfig::defaults(OptimizerKind::Madgrad).build();
    opt.step(&params, &grads, lr).unwrap();

    // BatchRenorm buffers were updated by the forward exactly as the reference.
    let sd: HashMap<String, Tensor> = model.state_dict().unwrap().into_iter().collect();
    for (k, t) in &sd {
        if k.contains("running_") {
            assert_close(k, t, &ts[&format!("after.{k}")], 1e-6);
        }
        let is_param = model.params().contains_key(k);
        if is_param && !k.ends_with("depthwise_conv.bias") {
            // The update of the analytically-zero-gradient biases amplifies
            // rounding noise (fixture README); every other parameter matches.
            assert_close(&format!("after.{k}"), t, &ts[&format!("after.{k}")], 1e-5);
        }
        if k.ends_with("num_batches_tracked") {
            assert_eq!(
                t.to_scalar::<i64>().unwrap(),
                ts[&format!("after.{k}")].to_scalar::<i64>().unwrap(),
                "{k}"
            );
        }
    }
}

#[test]
fn fresh_model_is_deterministic_and_trains_every_parameter() {
    let cfg = tiny_config();
    let a = Encoder::init(&cfg, 15, 7, &Device::Cpu).unwrap();
    let b = Encoder::init(&cfg, 15, 7, &Device::Cpu).unwrap();
    assert_eq!(a.num_parameters(), b.num_parameters());
    for ((ka, va), (_, vb)) in a.params().iter().zip(b.params()) {
        assert_eq!(
            to_f32_vec(va.as_tensor()),
            to_f32_vec(vb.as_tensor()),
            "{ka}"
        );
    }
    // Same parameter count as the reference's tiny model.
    let reference: usize = load_tensors("model_tiny.safetensors")
        .iter()
        .filter(|(k, _)| {
            !k.contains("running_") && !k.contains("num_batches") && !k.starts_with("rotary")
        })
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(a.num_parameters(), reference);

    let x: Vec<f32> = (0..2 * 80 * 64)
        .map(|i| ((i * 7919) % 997) as f32 / 499.0 - 1.0)
        .collect();
    let x = Tensor::from_vec(x, (2, 80, 64), &Device::Cpu).unwrap();
    let out = a
        .forward(
            &x,
            Some(&[64, 40]),
            &ForwardOptions {
                train: true,
                ..Default::default()
            },
        )
        .unwrap();
    let loss = out.log_probs().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in a.params() {
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "no gradient for {name}"
        );
    }
}

#[test]
fn reference_pt_checkpoint_loads_with_its_config() {
    let path = common::fixture("model_tiny.pt");
    if !path.exists() {
        eprintln!("no model_tiny.pt fixture; skipping");
        return;
    }
    let ckpt = lcasr::model::load_reference_pt(&path, &Device::Cpu).unwrap();
    let sd = load_tensors("model_tiny.safetensors");
    assert_eq!(ckpt.tensors.len(), sd.len());
    for (k, t) in &sd {
        assert_eq!(to_f32_vec(&ckpt.tensors[k]), to_f32_vec(t), "{k}");
    }
    assert_eq!(ckpt.model_config.as_ref(), Some(&tiny_config()));
    assert!(ckpt.podcast_step.is_some());
    let model =
        Encoder::from_state_dict(&ckpt.model_config.unwrap(), ckpt.tensors, &Device::Cpu).unwrap();
    let io = load_tensors("model_tiny_io.safetensors");
    let lens = common::to_usize_vec(&io["input_lengths"]);
    let out = model
        .forward(&io["input"], Some(&lens), &ForwardOptions::default())
        .unwrap();
    assert_close(
        "log_probs",
        &out.log_probs().unwrap(),
        &io["log_probs"],
        2e-4,
    );
}

/// Loss and every parameter gradient of one training step on a padded batch,
/// computed in `dtype` (f32 when `None`).
fn training_step_in(
    model: &Encoder,
    x: &Tensor,
    dtype: Option<DType>,
) -> (f32, Vec<(String, Tensor)>) {
    let out = model
        .forward(
            x,
            Some(&[600, 410]),
            &ForwardOptions {
                train: true,
                dropout_seed: 11,
                compute_dtype: dtype,
                ..Default::default()
            },
        )
        .unwrap();
    let targets = vec![vec![1, 4, 4, 9, 2, 7], vec![3, 5, 8]];
    let loss = ctc(
        &out.logits,
        &targets,
        &out.lengths,
        15,
        Reduction::Sum,
        false,
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let grads = model
        .params()
        .iter()
        .map(|(name, var)| (name.clone(), grads.get(var.as_tensor()).unwrap().clone()))
        .collect();
    (loss.to_scalar::<f32>().unwrap(), grads)
}

/// [`training_step_in`] in f32.
fn training_step(model: &Encoder, x: &Tensor) -> (f32, Vec<(String, Tensor)>) {
    training_step_in(model, x, None)
}

/// The regularised model and padded batch of the training-step comparisons.
fn step_model_and_batch() -> (Encoder, Tensor) {
    let cfg = ModelConfig {
        dropout_ff: 0.1,
        dropout_attn: 0.1,
        dropout_conv: 0.1,
        checkpoint_every_n_layers: 2,
        ..tiny_config()
    };
    let model = Encoder::init(&cfg, 15, 3, &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..2 * 80 * 600)
        .map(|i| ((i * 7919) % 997) as f32 / 499.0 - 1.0)
        .collect();
    (
        model,
        Tensor::from_vec(x, (2, 80, 600), &Device::Cpu).unwrap(),
    )
}

#[test]
fn composed_ops_train_like_the_fused_kernels() {
    // The path a GPU takes today (every fused op as its composition of candle
    // ops), run on the CPU: a training step with padding, dropout, rotary,
    // BatchRenorm, self-conditioning and a checkpointed block gives the loss
    // and gradients of the fused kernels.
    let (model, x) = step_model_and_batch();
    let (fused_loss, fused) = training_step(&model, &x);
    let (composed_loss, composed) = lcasr_kernels::with_composed_ops(|| training_step(&model, &x));
    assert!(
        ((fused_loss - composed_loss) / fused_loss).abs() < 1e-5,
        "loss {fused_loss} vs {composed_loss}"
    );
    for ((name, f), (_, c)) in fused.iter().zip(&composed) {
        let scale = to_f32_vec(f).iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(&to_f32_vec(f), &to_f32_vec(c));
        // Gradients of order 1 to 100 agree to ~1e-5; the floor of 10 covers
        // the depthwise bias, whose gradient BatchRenorm cancels to ~1e-5.
        assert!(
            d <= 2e-5 * scale.max(10.0),
            "{name}: max |diff| {d} against max |grad| {scale}"
        );
    }
}

#[test]
fn mixed_precision_steps_track_the_f32_step() {
    // bf16 and f16 compute with f32 parameters (the GPU's `training.dtype`),
    // run on the CPU through the ops' compositions: the loss and the
    // gradients, which arrive in f32, follow the f32 step to the narrow
    // types' precision.
    let (model, x) = step_model_and_batch();
    let (loss32, grads32) = training_step(&model, &x);
    for (dtype, tol) in [(DType::BF16, 0.05f32), (DType::F16, 0.01)] {
        let (loss, grads) = training_step_in(&model, &x, Some(dtype));
        assert!(
            ((loss - loss32) / loss32).abs() < tol / 5.0,
            "{dtype:?}: loss {loss} vs {loss32}"
        );
        let (mut dot, mut n32, mut n) = (0f64, 0f64, 0f64);
        for ((name, g32), (_, g)) in grads32.iter().zip(&grads) {
            assert_eq!(g.dtype(), DType::F32, "{name}: gradient dtype");
            let (a, b) = (to_f32_vec(g32), to_f32_vec(g));
            for (u, v) in a.iter().zip(&b) {
                dot += (*u as f64) * (*v as f64);
                n32 += (*u as f64).powi(2);
                n += (*v as f64).powi(2);
            }
            let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let d = max_abs_diff(&a, &b);
            assert!(
                d <= tol * scale.max(10.0),
                "{dtype:?} {name}: max |diff| {d} against max |grad| {scale}"
            );
        }
        let cosine = dot / (n32.sqrt() * n.sqrt());
        assert!(cosine > 0.999, "{dtype:?}: gradient cosine {cosine}");
    }
}
