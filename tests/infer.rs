//! Inference end to end: loading models from checkpoint directories, run
//! directories, reference `.pt` files and bare safetensors; long-form
//! posteriors; `evaluate` on a prepared manifest; `transcribe` with word
//! timestamps and subtitle output.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use lcasr::config::{load_model_section, DtypeName, ModelConfig};
use lcasr::data::prepare::{discover, prepare};
use lcasr::infer::eval::{evaluate, format_context, format_table, parse_context};
use lcasr::infer::load::{load_model, LoadOptions, LoadedModel, TOKENIZER_FILE};
use lcasr::infer::longform::{log_probs, ContextOptions, LongformMode};
use lcasr::infer::transcribe::transcribe;
use lcasr::model::Encoder;
use lcasr::text::normalize::normalize_english;
use lcasr::text::tokenizer::{train_bpe, Tokenizer};
use lcasr::train::lr_schedule::{CosineWarmup, DecayUnit};
use lcasr::train::optimizer::{OptimizerConfig, OptimizerKind};
use lcasr::train::rng::RunRng;
use lcasr::train::state::{save_checkpoint, TrainingCounters, TrainingState, MODEL_FILE};

/// Transcripts of the synthetic recordings (also the tokenizer's training text).
const TEXTS: [&str; 2] = [
    "Hello there, the cat sat on the mat.",
    "It's 5 o'clock and the dogs are barking at the postman",
];

fn tiny_config() -> ModelConfig {
    let path = common::fixture("model_tiny_config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    load_model_section(&text, &path.display().to_string()).unwrap()
}

fn tokenizer() -> Tokenizer {
    train_bpe(TEXTS.iter().map(|t| t.to_string()), 40).unwrap()
}

/// A freshly initialised tiny model sized for `tok`, with the subsampling
/// biases zeroed: at initialisation they dominate every frame, so the model
/// emits one class everywhere; without them its output follows the input and
/// decoding has tokens and word boundaries to work with.
fn tiny_model(tok: &Tokenizer, seed: u64) -> Encoder {
    let cfg = tiny_config();
    let init = Encoder::init(&cfg, tok.vocab_size(), seed, &Device::Cpu).unwrap();
    let tensors = init
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            if k.starts_with("subsampling.conv.") && k.ends_with(".bias") {
                let zero = t.zeros_like().unwrap();
                (k, zero)
            } else {
                (k, t)
            }
        })
        .collect();
    Encoder::from_state_dict(&cfg, tensors, &Device::Cpu).unwrap()
}

/// A training state at step 0 for the optimizer named `optimizer`.
fn state_for(optimizer: &str) -> TrainingState {
    TrainingState {
        counters: TrainingCounters::default(),
        lr_schedule: CosineWarmup::new(3e-3, 1e-4, 2, 10, DecayUnit::Steps)
            .unwrap()
            .state(),
        sequence_schedule: None,
        rng: RunRng::new(1).state(),
        optimizer: optimizer.to_string(),
        script_state: serde_json::Value::Null,
    }
}

/// Saves `model` as a trainer checkpoint in `dir`, with the run config and the
/// tokenizer when given.
fn save(dir: &Path, model: &Encoder, with_config: bool, tok: Option<&Tokenizer>) {
    let opt = OptimizerConfig::defaults(OptimizerKind::Madgrad).build();
    let state = state_for(opt.name());
    let config = std::fs::read(common::fixture("model_tiny_config.yaml")).unwrap();
    let tok_json = tok.map(|t| {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(TOKENIZER_FILE);
        t.save_json(&path).unwrap();
        std::fs::read(&path).unwrap()
    });
    let mut extra: Vec<(&str, &[u8])> = Vec::new();
    if with_config {
        extra.push(("config.yaml", &config));
    }
    if let Some(bytes) = &tok_json {
        extra.push((TOKENIZER_FILE, bytes));
    }
    save_checkpoint(dir, model, opt.as_ref(), &state, &extra).unwrap();
}

/// Every tensor of the model's state dict as f32 values, by name.
fn weights(model: &Encoder) -> Vec<(String, Vec<f32>)> {
    model
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, common::to_f32_vec(&t)))
        .collect()
}

fn error_of(result: anyhow::Result<LoadedModel>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// A 16 kHz mono 16-bit WAV of `seconds` of a chirp with a little noise.
fn write_wav(path: &Path, seconds: f64, seed: u64) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    let noise =
        RunRng::new(seed)
            .stream("noise")
            .uniform_vec((seconds * 16_000.0) as usize, -0.05, 0.05);
    for (i, n) in noise.iter().enumerate() {
        let t = i as f64 / 16_000.0;
        let f = 200.0 + 300.0 * t + 50.0 * seed as f64;
        let x = 0.4 * (2.0 * std::f64::consts::PI * f * t).sin() + *n as f64;
        w.write_sample((x * 32767.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

/// The synthetic corpus: one WAV + transcript per text; returns the manifest.
fn prepared_corpus(root: &Path) -> PathBuf {
    let audio = root.join("audio");
    std::fs::create_dir_all(&audio).unwrap();
    for (i, text) in TEXTS.iter().enumerate() {
        write_wav(&audio.join(format!("utt{i}.wav")), 2.0 + i as f64, i as u64);
        std::fs::write(audio.join(format!("utt{i}.txt")), text).unwrap();
    }
    let (sources, problems) = discover(&audio).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let out = root.join("prepared");
    let (_, report) = prepare(&sources, &out, &Default::default(), &|_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    out.join("manifest.json")
}

/// A model with config and tokenizer saved in a checkpoint directory, loaded back.
fn loaded_model(root: &Path, seed: u64) -> LoadedModel {
    let tok = tokenizer();
    let ckpt = root.join("ckpt");
    save(&ckpt, &tiny_model(&tok, seed), true, Some(&tok));
    load_model(&ckpt, &LoadOptions::default()).unwrap()
}

#[test]
fn checkpoint_directory_loads_weights_config_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let model = tiny_model(&tok, 3);
    let ckpt = tmp.path().join("ckpt");
    save(&ckpt, &model, true, Some(&tok));

    let loaded = load_model(&ckpt, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.encoder.classes(), tok.vocab_size() + 1);
    assert_eq!(loaded.blank() as usize, tok.vocab_size());
    assert_eq!(loaded.config, tiny_config());
    assert_eq!(loaded.source, ckpt.join(MODEL_FILE));
    assert_eq!(weights(&loaded.encoder), weights(&model));
    let loaded_tok = loaded.require_tokenizer().unwrap();
    assert_eq!(loaded_tok.vocab_size(), tok.vocab_size());
    assert_eq!(
        loaded_tok.encode(TEXTS[0]).unwrap(),
        tok.encode(TEXTS[0]).unwrap()
    );
    assert!((loaded.frame_seconds() - 0.08).abs() < 1e-12);

    // The weights file of a checkpoint stands for the whole checkpoint.
    let via_file = load_model(&ckpt.join(MODEL_FILE), &LoadOptions::default()).unwrap();
    assert!(via_file.tokenizer.is_some());
    assert_eq!(weights(&via_file.encoder), weights(&model));
}

#[test]
fn checkpoint_with_a_sentencepiece_tokenizer_loads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let sp = common::fixture("tokenizer.model");
    let tok = Tokenizer::from_sentencepiece(&sp).unwrap();
    let model = tiny_model(&tok, 6);
    let opt = OptimizerConfig::defaults(OptimizerKind::Madgrad).build();
    let ckpt = tmp.path().join("ckpt");
    let config = std::fs::read(common::fixture("model_tiny_config.yaml")).unwrap();
    let bytes = std::fs::read(&sp).unwrap();
    let extra: [(&str, &[u8]); 2] = [("config.yaml", &config), ("tokenizer.model", &bytes)];
    save_checkpoint(&ckpt, &model, opt.as_ref(), &state_for(opt.name()), &extra).unwrap();
    let loaded = load_model(&ckpt, &LoadOptions::default()).unwrap();
    let got = loaded.require_tokenizer().unwrap();
    assert_eq!(got.vocab_size(), tok.vocab_size());
    assert_eq!(got.encode(TEXTS[1]).unwrap(), tok.encode(TEXTS[1]).unwrap());
}

#[test]
fn run_directory_follows_checkpoints_latest() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let run = tmp.path().join("run");
    let checkpoints = run.join("checkpoints");
    let old = tiny_model(&tok, 1);
    let new = tiny_model(&tok, 2);
    // The config sits in the run directory, the tokenizer in the checkpoint.
    save(&checkpoints.join("step_000000001"), &old, false, Some(&tok));
    save(&checkpoints.join("step_000000002"), &new, false, Some(&tok));
    std::fs::copy(
        common::fixture("model_tiny_config.yaml"),
        run.join("config.yaml"),
    )
    .unwrap();

    let err = error_of(load_model(&run, &LoadOptions::default()));
    assert!(err.contains("checkpoints/latest"), "{err}");

    std::fs::write(checkpoints.join("latest"), "step_000000002\n").unwrap();
    let loaded = load_model(&run, &LoadOptions::default()).unwrap();
    assert_eq!(
        loaded.source,
        checkpoints.join("step_000000002").join(MODEL_FILE)
    );
    assert_eq!(weights(&loaded.encoder), weights(&new));
    assert_ne!(weights(&loaded.encoder), weights(&old));
    assert!(loaded.tokenizer.is_some());

    std::fs::write(checkpoints.join("latest"), "step_000000009\n").unwrap();
    let err = error_of(load_model(&run, &LoadOptions::default()));
    assert!(err.contains("step_000000009"), "{err}");
}

#[test]
fn bare_safetensors_needs_a_config_and_tokenizer_must_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let model = tiny_model(&tok, 5);
    let ckpt = tmp.path().join("ckpt");
    save(&ckpt, &model, false, None);
    let bare_dir = tmp.path().join("bare");
    std::fs::create_dir_all(&bare_dir).unwrap();
    let bare = bare_dir.join("weights.safetensors");
    std::fs::copy(ckpt.join(MODEL_FILE), &bare).unwrap();

    // A checkpoint without config, and a bare file: the config must be given.
    for path in [&ckpt, &bare] {
        let err = error_of(load_model(path, &LoadOptions::default()));
        assert!(err.contains("--config"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    let tok_path = tmp.path().join("tok.json");
    tok.save_json(&tok_path).unwrap();
    let opts = LoadOptions {
        config: Some(common::fixture("model_tiny_config.yaml")),
        ..Default::default()
    };
    let loaded = load_model(&bare, &opts).unwrap();
    assert_eq!(weights(&loaded.encoder), weights(&model));
    assert!(loaded.tokenizer.is_none());
    let err = loaded.require_tokenizer().unwrap_err().to_string();
    assert!(err.contains("--tokenizer"), "{err}");

    let with_tok = LoadOptions {
        tokenizer: Some(tok_path),
        ..opts.clone()
    };
    assert!(load_model(&bare, &with_tok).unwrap().tokenizer.is_some());

    // A tokenizer of another size does not fit the CTC head.
    let other = train_bpe(TEXTS.iter().map(|t| t.to_string()), 30).unwrap();
    assert_ne!(other.vocab_size(), tok.vocab_size());
    let other_path = tmp.path().join("other.json");
    other.save_json(&other_path).unwrap();
    let err = error_of(load_model(
        &bare,
        &LoadOptions {
            tokenizer: Some(other_path),
            ..opts.clone()
        },
    ));
    assert!(err.contains("classes"), "{err}");

    // A YAML file without a model section is refused, not read as defaults.
    let no_model = tmp.path().join("no_model.yaml");
    std::fs::write(&no_model, "training:\n  max_epochs: 1\n").unwrap();
    let err = error_of(load_model(
        &bare,
        &LoadOptions {
            config: Some(no_model),
            ..Default::default()
        },
    ));
    assert!(err.contains("model:"), "{err}");
}

#[test]
fn damaged_weights_and_unknown_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let ckpt = tmp.path().join("ckpt");
    save(&ckpt, &tiny_model(&tok, 4), true, Some(&tok));
    let weights_file = ckpt.join(MODEL_FILE);
    let mut bytes = std::fs::read(&weights_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&weights_file, &bytes).unwrap();
    let err = error_of(load_model(&ckpt, &LoadOptions::default()));
    assert!(err.contains("corrupted"), "{err}");

    let missing = tmp.path().join("nothing-here");
    let err = error_of(load_model(&missing, &LoadOptions::default()));
    assert!(err.contains("does not exist"), "{err}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = error_of(load_model(&empty, &LoadOptions::default()));
    assert!(err.contains(MODEL_FILE), "{err}");

    let text = tmp.path().join("model.txt");
    std::fs::write(&text, "not a model").unwrap();
    let err = error_of(load_model(&text, &LoadOptions::default()));
    assert!(err.contains("unknown model file type"), "{err}");
}

#[test]
fn reference_pt_loads_with_its_config_and_matches_reference_outputs() {
    let path = common::fixture("model_tiny.pt");
    if !path.exists() {
        eprintln!("no model_tiny.pt fixture; skipping");
        return;
    }
    let loaded = load_model(&path, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.config, tiny_config());
    assert!(loaded.tokenizer.is_none());
    let io = common::load_tensors("model_tiny_io.safetensors");
    let want = &io["eq.log_probs"];
    assert_eq!(loaded.encoder.classes(), want.dim(2).unwrap());
    // Item 0 of an equal-length batch runs unmasked, as one recording does.
    let features = io["eq.input"].get(0).unwrap();
    let got = log_probs(&loaded.encoder, &features, &ContextOptions::default()).unwrap();
    let want = want.get(0).unwrap();
    assert_eq!(got.dims(), want.dims());
    let d = common::max_abs_diff(&common::to_f32_vec(&got), &common::to_f32_vec(&want));
    assert!(d <= 2e-4, "max |diff| {d}");
}

/// (80, T) features for the tests of the long-form merging.
fn random_features(frames: usize, seed: u64) -> Tensor {
    let v = RunRng::new(seed)
        .stream("features")
        .normal_vec(80 * frames, 0.0, 1.0);
    Tensor::from_vec(v, (80, frames), &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

#[test]
fn long_windows_equal_the_whole_recording() {
    let tok = tokenizer();
    let model = tiny_model(&tok, 7);
    let features = random_features(300, 1);
    let whole = log_probs(&model, &features, &ContextOptions::default()).unwrap();
    assert_eq!(whole.dims(), &[38, tok.vocab_size() + 1]);
    for window in [300, 301, 10_000] {
        for mode in [LongformMode::AveragedMovingWindow, LongformMode::Buffered] {
            let opts = ContextOptions {
                window: Some(window),
                mode,
                ..Default::default()
            };
            let got = log_probs(&model, &features, &opts).unwrap();
            assert_eq!(rows(&got), rows(&whole), "window {window} {mode:?}");
        }
    }
}

#[test]
fn half_precision_inference_on_the_cpu_is_refused() {
    let tok = tokenizer();
    let model = tiny_model(&tok, 8);
    let features = random_features(100, 3);
    let opts = ContextOptions {
        dtype: DtypeName::Bfloat16,
        ..Default::default()
    };
    let err = log_probs(&model, &features, &opts).unwrap_err().to_string();
    assert!(err.contains("needs a GPU"), "{err}");
}

#[test]
fn non_overlapping_windows_are_separate_forward_passes() {
    let tok = tokenizer();
    let model = tiny_model(&tok, 8);
    let features = random_features(300, 2);
    let opts = ContextOptions {
        window: Some(96),
        overlap: 0.0,
        mode: LongformMode::AveragedMovingWindow,
        dtype: DtypeName::Float32,
    };
    let got = rows(&log_probs(&model, &features, &opts).unwrap());
    // Windows [0,96) [96,192) [192,288) [288,300), each run on its own.
    let mut want = Vec::new();
    for (start, len) in [(0, 96), (96, 96), (192, 96), (288, 12)] {
        let part = features.narrow(1, start, len).unwrap();
        want.extend(rows(
            &log_probs(&model, &part, &ContextOptions::default()).unwrap(),
        ));
    }
    assert_eq!(got.len(), want.len());
    let d = common::max_abs_diff(&got.concat(), &want.concat());
    assert!(d < 1e-5, "max |diff| {d}");
    let whole = rows(&log_probs(&model, &features, &ContextOptions::default()).unwrap());
    assert!(
        common::max_abs_diff(&got.concat(), &whole.concat()) > 1e-3,
        "windowing must limit the context"
    );
}

#[test]
fn overlapping_windows_give_distributions_for_every_frame() {
    let tok = tokenizer();
    let model = tiny_model(&tok, 9);
    let features = random_features(400, 3);
    let whole = log_probs(&model, &features, &ContextOptions::default()).unwrap();
    for mode in [LongformMode::AveragedMovingWindow, LongformMode::Buffered] {
        let opts = ContextOptions {
            window: Some(64),
            mode,
            ..Default::default()
        };
        let got = log_probs(&model, &features, &opts).unwrap();
        assert_eq!(got.dims(), whole.dims(), "{mode:?}");
        let total: Vec<f32> = got
            .exp()
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            total.iter().all(|s| (s - 1.0).abs() < 1e-4),
            "{mode:?}: {total:?}"
        );
    }
}

#[test]
fn bad_long_form_requests_are_refused() {
    let tok = tokenizer();
    let model = tiny_model(&tok, 10);
    let features = random_features(100, 4);
    let err =
        |opts: ContextOptions, f: &Tensor| log_probs(&model, f, &opts).unwrap_err().to_string();
    assert!(err(ContextOptions::with_window(Some(0)), &features).contains("at least 1"));
    let e = err(
        ContextOptions {
            window: Some(50),
            overlap: 1.0,
            ..Default::default()
        },
        &features,
    );
    assert!(e.contains("overlap"), "{e}");
    let e = err(
        ContextOptions::default(),
        &random_features(100, 4).narrow(0, 0, 40).unwrap(),
    );
    assert!(e.contains("40 mel bins"), "{e}");
}

#[test]
fn context_lengths_parse_and_print() {
    let ok = [
        ("10s", Some(1000)),
        ("80s", Some(8000)),
        ("20m", Some(120_000)),
        ("20min", Some(120_000)),
        ("1h", Some(360_000)),
        ("1.5s", Some(150)),
        (" 10S ", Some(1000)),
        ("1024", Some(1024)),
        ("full", None),
        ("FULL", None),
    ];
    for (text, want) in ok {
        assert_eq!(parse_context(text).unwrap(), want, "{text}");
    }
    for bad in [
        "", "abc", "0", "0s", "-5s", "10x", "1e400s", "0.001s", "1.5",
    ] {
        assert!(parse_context(bad).is_err(), "`{bad}` should be refused");
    }
    assert_eq!(format_context(Some(1024)), "10.24 s");
    assert_eq!(format_context(Some(1000)), "10 s");
    assert_eq!(format_context(Some(360_000)), "3600 s");
    assert_eq!(format_context(None), "full");

    assert_eq!(
        "averaged_moving_window".parse::<LongformMode>().unwrap(),
        LongformMode::AveragedMovingWindow
    );
    assert_eq!(
        "buffered".parse::<LongformMode>().unwrap(),
        LongformMode::Buffered
    );
    assert!("windowed_attention".parse::<LongformMode>().is_err());
}

#[test]
fn evaluate_scores_a_prepared_manifest_at_several_contexts() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = prepared_corpus(tmp.path());
    let model = loaded_model(tmp.path(), 11);
    let contexts = [
        ContextOptions::with_window(Some(64)),
        ContextOptions {
            window: Some(96),
            mode: LongformMode::Buffered,
            ..Default::default()
        },
        ContextOptions::with_window(None),
    ];
    let report = evaluate(&model, &manifest, &contexts, false).unwrap();
    assert_eq!(report.per_context.len(), contexts.len());
    let want_ref_words: usize = TEXTS
        .iter()
        .map(|t| normalize_english(t).split_whitespace().count())
        .sum();
    for (ctx, result) in contexts.iter().zip(&report.per_context) {
        assert_eq!(result.context_frames, ctx.window);
        assert_eq!(result.mode, ctx.mode);
        assert_eq!(result.ref_words, want_ref_words);
        assert_eq!(result.utterances.len(), TEXTS.len());
        let errors = result.substitutions + result.insertions + result.deletions;
        assert!(result.wer.is_finite() && result.wer >= 0.0);
        assert!((result.wer - errors as f64 / want_ref_words as f64).abs() < 1e-12);
        let mut sums = [0usize; 4];
        for (u, text) in result.utterances.iter().zip(TEXTS) {
            assert_eq!(u.reference, normalize_english(text));
            let hyp_words = u.hypothesis.split_whitespace().count();
            assert_eq!(hyp_words + u.deletions, u.ref_words + u.insertions);
            assert!(u.substitutions + u.deletions <= u.ref_words);
            let utt_errors = u.substitutions + u.insertions + u.deletions;
            assert_eq!(u.wer, Some(utt_errors as f64 / u.ref_words as f64));
            for (s, v) in
                sums.iter_mut()
                    .zip([u.substitutions, u.insertions, u.deletions, u.ref_words])
            {
                *s += v;
            }
        }
        assert_eq!(
            sums,
            [
                result.substitutions,
                result.insertions,
                result.deletions,
                result.ref_words
            ]
        );
    }
    assert!(
        report
            .per_context
            .iter()
            .all(|c| c.utterances.iter().any(|u| !u.hypothesis.is_empty())),
        "the test model should emit words"
    );
    let ids: Vec<&str> = report.per_context[0]
        .utterances
        .iter()
        .map(|u| u.id.as_str())
        .collect();
    assert_eq!(ids, ["utt0", "utt1"]);

    let table = format_table(&report);
    assert_eq!(table.lines().count(), 1 + contexts.len(), "{table}");
    assert!(
        table.contains("0.64 s") && table.contains("full"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["per_context"][0]["context_frames"], 64);
    assert_eq!(json["per_context"][1]["mode"], "buffered");
    assert_eq!(json["per_context"][1]["dtype"], "float32");
    assert!(json["per_context"][2]["context_frames"].is_null());
    assert_eq!(
        json["per_context"][1]["utterances"][1]["ref_words"],
        normalize_english(TEXTS[1]).split_whitespace().count()
    );

    // No tokenizer, no evaluation.
    let bare = LoadedModel {
        tokenizer: None,
        ..model
    };
    let err = evaluate(&bare, &manifest, &contexts, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--tokenizer"), "{err}");
}

#[test]
fn transcribe_gives_text_and_ordered_word_times() {
    let tmp = tempfile::tempdir().unwrap();
    let model = loaded_model(tmp.path(), 12);
    let audio = tmp.path().join("speech.wav");
    write_wav(&audio, 3.0, 5);
    for opts in [
        ContextOptions::default(),
        ContextOptions::with_window(Some(80)),
    ] {
        let t = transcribe(&model, &audio, &opts).unwrap();
        assert!((t.duration - 3.0).abs() < 1e-9);
        assert!(!t.words.is_empty(), "the test model should emit tokens");
        let squeeze = |s: &str| s.split_whitespace().collect::<String>();
        let joined: String = t.words.iter().map(|w| squeeze(&w.word)).collect();
        assert_eq!(joined, squeeze(&t.text));
        for w in &t.words {
            assert!(w.start < w.end, "{w:?}");
            assert!(w.end <= t.duration + model.frame_seconds(), "{w:?}");
        }
        for pair in t.words.windows(2) {
            assert!(pair[0].end <= pair[1].start, "{pair:?}");
        }
        let json: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        assert_eq!(json["words"].as_array().unwrap().len(), t.words.len());
        assert_eq!(json["text"], t.text.as_str());
        let srt = t.to_srt();
        assert!(srt.starts_with("1\n00:00:0"), "{srt}");
        assert!(srt.contains(" --> "));
        assert!(t.to_vtt().starts_with("WEBVTT\n\n00:00:0"));
    }
    let err = transcribe(
        &model,
        &tmp.path().join("missing.wav"),
        &ContextOptions::default(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("missing.wav"));
}
