//! The typed config: every key of the reference config, round trips,
//! overrides and the messages for bad configs.

use lcasr::config::{
    load_file, load_str, Activation, Config, ConfigError, ConvType, DecayUnits, LoadOptions,
    NormKind, OptimizerName, Origin, Seed, Subsampling,
};

fn reference_path() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/reference.yaml")
}

fn reference_text() -> String {
    std::fs::read_to_string(reference_path()).unwrap()
}

fn load(text: &str) -> Result<lcasr::config::Loaded, ConfigError> {
    load_str(text, "test.yaml", &LoadOptions::default())
}

/// The single error message a bad config produces.
fn error_of(text: &str, opts: &LoadOptions) -> String {
    match load_str(text, "test.yaml", opts) {
        Ok(_) => panic!("config unexpectedly valid:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn err(text: &str) -> String {
    error_of(text, &LoadOptions::default())
}

/// The reference config with `old` replaced by `new` (which must occur once).
fn edited(old: &str, new: &str) -> String {
    let text = reference_text();
    assert_eq!(text.matches(old).count(), 1, "{old:?} must occur once");
    text.replace(old, new)
}

#[test]
fn every_seed_key_parses_to_its_typed_value() {
    let loaded = load_file(&reference_path(), &LoadOptions::default()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;
    let m = &c.model;
    assert_eq!(m.feat_in, 80);
    assert_eq!(m.n_layers, 6);
    assert_eq!(m.d_model, 768);
    assert_eq!(m.n_heads, 6);
    assert_eq!(m.head_dim, 128);
    assert_eq!(m.dropout_ff, 0.0);
    assert_eq!(m.dropout_attn, 0.0);
    assert_eq!(m.dropout_conv, 0.0);
    assert_eq!(m.subsampling_factor, 8);
    assert_eq!(m.subsampling, Subsampling::DwStriding);
    assert_eq!(m.subsampling_act, Activation::Relu);
    assert_eq!(m.subsampling_conv_channels, 256);
    assert_eq!(m.expansion_factor, 4);
    assert!(!m.self_condition_subsampling);
    assert!(!m.subsampling_norm_out);
    assert_eq!(m.conv_kernel_size, 9);
    assert_eq!(m.conv_expansion_factor, 1.0);
    assert_eq!(m.conv_type, ConvType::Standard);
    assert!(m.self_conditioning);
    assert!(!m.gated_sc);
    assert!(m.decoder_norm);
    assert!(m.use_rotary);
    assert_eq!(m.default_norm, NormKind::LayerNorm);
    assert!(!m.sandwich_norm);
    assert!(!m.bias_in_ff);
    assert_eq!(m.checkpoint_every_n_layers, 0);
    assert!(m.flash_attn);
    // Keys the seed does not show keep the reference defaults.
    assert_eq!(m.rotary_base_freq, 10000.0);
    assert!(m.legasee_double_norm);
    assert!(!m.fourier_pos_enc);

    assert_eq!(c.optimizer.name, OptimizerName::Madgrad);
    assert_eq!(c.optimizer.args.lr, Some(2.5e-3));
    // Resolved MADGRAD defaults.
    assert_eq!(c.optimizer.args.momentum, Some(0.9));
    assert_eq!(c.optimizer.args.eps, Some(1e-6));
    assert_eq!(c.optimizer.args.weight_decay, Some(0.0));
    assert_eq!(c.optimizer.args.decouple_decay, Some(false));
    assert_eq!(c.optimizer.args.betas, None);

    assert_eq!(c.scheduler.warmup_steps, 4000);
    assert_eq!(c.scheduler.decay_units, DecayUnits::Recordings);
    assert_eq!(c.audio_chunking.size, 512);
    assert_eq!(c.audio_chunking.overlap, 0);

    let s = c.sequence_scheduler.as_ref().unwrap();
    assert_eq!(s.increase_every, 5000);
    assert_eq!(s.stop_after, Some(90000));
    assert_eq!(s.start_after, 0);
    assert_eq!(s.max_sequence_length, 16384);
    assert_eq!(s.increase_by_multiplier, 2.0);
    assert_eq!(s.batch_size_multiplier, 0.5);

    assert!(c.wandb.enabled);
    assert_eq!(c.wandb.project_name, "spotify_long_context");
    assert_eq!(c.wandb.name, "multi_epoch_run_16k");
    assert_eq!(c.wandb.id, "");

    assert_eq!(
        c.checkpointing.dir,
        "/mnt/parscratch/users/acp21rjf/spotify/checkpoints/multi_epoch_run_16k"
    );
    assert_eq!(c.checkpointing.save_every_n_steps, 2000);
    assert_eq!(
        c.data.path,
        "/mnt/parscratch/users/acp21rjf/spotify/audio_txt_pairs.json"
    );

    let sa = c.spec_augment.as_ref().unwrap();
    assert_eq!(sa.n_time_masks, 2);
    assert_eq!(sa.time_mask_param, 100);
    assert_eq!(sa.n_freq_masks, 2);
    assert_eq!(sa.freq_mask_param, 27);
    assert!(sa.iid_masks);
    assert_eq!(sa.p, 0.5);
    assert!(!sa.zero_masking);

    let t = &c.training;
    assert_eq!(t.start_spec_augment_after_n_epochs, 1);
    assert_eq!(t.max_epochs, 9);
    assert_eq!(t.batch_size, 704);
    assert_eq!(t.backprop_every, 1);
    assert_eq!(t.backwards_every, 1);
    assert_eq!(t.clip_value, 0.8);
    assert_eq!(t.random_seed, Seed::Fixed(1234));
}

#[test]
fn yaml_round_trip_is_identical() {
    let c1 = load(&reference_text()).unwrap().config;
    let y1 = c1.to_yaml();
    let c2 = load(&y1).unwrap().config;
    assert_eq!(c1, c2);
    assert_eq!(y1, c2.to_yaml());
    assert_eq!(c1.canonical_hash(), c2.canonical_hash());
}

#[test]
fn round_trip_with_every_optional_section_and_non_default() {
    let text = edited("  n_layers: 6", "  n_layers: 6\n  rotary_base_freq: 1.5e6\n  fourier_pos_enc: true\n  attention_window_size_left: 64")
        + "\n  random_seed: random\n  dtype: float32\n";
    let c1 = load(&text).unwrap().config;
    assert_eq!(c1.training.random_seed, Seed::Random);
    assert_eq!(c1.model.rotary_base_freq, 1.5e6);
    let c2 = load(&c1.to_yaml()).unwrap().config;
    assert_eq!(c1, c2);
}

#[test]
fn minimal_config_gets_reference_defaults() {
    let text = "model: {}\noptimizer:\n  name: adamw\naudio_chunking:\n  size: 256\ndata:\n  path: x.json\ntraining:\n  batch_size: 4\n  backprop_every: 1\n";
    let c: Config = load(text).unwrap().config;
    assert_eq!(c.model.d_model, 768);
    assert!(!c.model.decoder_norm);
    assert!(!c.model.use_rotary);
    assert_eq!(c.model.subsampling_act, Activation::Silu);
    assert_eq!(c.optimizer.args.lr, Some(1e-3));
    assert_eq!(c.optimizer.args.weight_decay, Some(0.01));
    assert_eq!(c.optimizer.args.betas, Some((0.9, 0.999)));
    assert_eq!(c.training.clip_value, 0.8);
    assert_eq!(c.training.random_seed, Seed::Fixed(1234));
    assert!(c.sequence_scheduler.is_none());
    assert!(c.spec_augment.is_none());
    assert!(!c.wandb.enabled);
}

#[test]
fn overrides_are_typed_like_the_file() {
    let opts = LoadOptions {
        strict: false,
        overrides: vec![
            "model.n_layers=9".into(),
            "optimizer.args.lr=1e-3".into(),
            "model.use_rotary=false".into(),
            "optimizer.name=adamw".into(),
            "training.random_seed=random".into(),
            "spec_augment.p=0.25".into(),
        ],
    };
    let text = edited("    lr: 2.5e-3", "    lr: 2.5e-3");
    let c = load_str(&text, "test.yaml", &opts).unwrap().config;
    assert_eq!(c.model.n_layers, 9);
    assert_eq!(c.optimizer.args.lr, Some(1e-3));
    assert!(!c.model.use_rotary);
    assert_eq!(c.optimizer.name, OptimizerName::Adamw);
    assert_eq!(c.training.random_seed, Seed::Random);
    assert_eq!(c.spec_augment.unwrap().p, 0.25);
}

#[test]
fn bad_override_values_name_the_override() {
    let opts = LoadOptions {
        strict: false,
        overrides: vec!["model.n_layers=many".into()],
    };
    let msg = error_of(&reference_text(), &opts);
    assert_eq!(
        msg,
        "test.yaml: command-line override `model.n_layers=many`: model.n_layers: expected a whole number >= 0, found a string \"many\""
    );
    let opts = LoadOptions {
        strict: false,
        overrides: vec!["model.n_layers".into()],
    };
    assert!(error_of(&reference_text(), &opts)
        .contains("`model.n_layers` must look like key.path=value"));
    let opts = LoadOptions {
        strict: false,
        overrides: vec!["..x=1".into()],
    };
    assert!(error_of(&reference_text(), &opts).contains("must look like key.path=value"));
}

#[test]
fn override_with_unknown_key_warns_with_suggestion() {
    let opts = LoadOptions {
        strict: false,
        overrides: vec!["model.n_layer=3".into()],
    };
    let loaded = load_str(&reference_text(), "test.yaml", &opts).unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    assert_eq!(
        loaded.warnings[0].to_string(),
        "test.yaml: command-line override `model.n_layer=3`: model.n_layer: unknown key, ignored; did you mean model.n_layers?"
    );
}

#[test]
fn misspelt_key_warns_with_line_and_suggestion() {
    let text = edited("  n_layers: 6", "  n_layres: 6");
    let loaded = load(&text).unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    let w = &loaded.warnings[0];
    assert_eq!(w.key, "model.n_layres");
    assert_eq!(w.origin, Origin::File { line: 3, column: 3 });
    assert_eq!(
        w.to_string(),
        "test.yaml:3:3: model.n_layres: unknown key, ignored; did you mean model.n_layers?"
    );
}

#[test]
fn strict_turns_unknown_keys_into_errors() {
    let text = edited("  n_layers: 6", "  n_layres: 6");
    let opts = LoadOptions {
        strict: true,
        overrides: vec![],
    };
    assert_eq!(
        error_of(&text, &opts),
        "test.yaml:3:3: model.n_layres: unknown key; did you mean model.n_layers?"
    );
}

#[test]
fn unknown_section_warns() {
    let text = reference_text() + "\ntrainig:\n  x: 1\n";
    let loaded = load(&text).unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    assert!(loaded.warnings[0]
        .to_string()
        .ends_with("trainig: unknown key, ignored; did you mean training?"));
}

#[test]
fn legacy_checkpoint_keys_are_accepted_silently() {
    let text = edited(
        "  n_layers: 6",
        "  n_layers: 6\n  qk_rms_norm: false\n  shift_kvs: false\n  max_seq_len: -1\n  description: old run",
    );
    let loaded = load(&text).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

// ---- bad configs: at least 15 cases with the exact message ----

#[test]
fn bad_optimizer_name() {
    assert_eq!(
        err(&edited("  name: madgrad", "  name: adamm")),
        "test.yaml:32:9: optimizer.name: \"adamm\" is not one of adam, adamw, madgrad, mirrormadgrad (did you mean adam?)"
    );
}

#[test]
fn wrong_type_int() {
    assert_eq!(
        err(&edited("  d_model: 768", "  d_model: big")),
        "test.yaml:4:12: model.d_model: expected a whole number >= 0, found a string \"big\""
    );
}

#[test]
fn wrong_type_float() {
    assert_eq!(
        err(&edited("    lr: 2.5e-3", "    lr: fast")),
        "test.yaml:34:9: optimizer.args.lr: expected a number, found a string \"fast\""
    );
}

#[test]
fn wrong_type_bool() {
    assert_eq!(
        err(&edited("  use_rotary: true", "  use_rotary: 3")),
        "test.yaml:23:15: model.use_rotary: expected true or false, found an integer 3"
    );
}

#[test]
fn negative_size() {
    assert_eq!(
        err(&edited("  n_layers: 6", "  n_layers: -2")),
        "test.yaml:3:13: model.n_layers: must be a whole number >= 0, found -2"
    );
}

#[test]
fn fractional_integer() {
    assert_eq!(
        err(&edited("  size: 512", "  size: 512.5")),
        "test.yaml:40:9: audio_chunking.size: expected a whole number >= 0, found a number 512.5"
    );
}

#[test]
fn missing_required_section() {
    let text = reference_text().replace(
        "data:\n  path: /mnt/parscratch/users/acp21rjf/spotify/audio_txt_pairs.json # path to the json file containing the audio/text pairs creating using the preprocessing script\n",
        "",
    );
    assert_eq!(
        err(&text),
        "test.yaml:1:1: data: section `data:` is required but missing"
    );
}

#[test]
fn missing_required_key() {
    let text = edited("  batch_size: 704 # initial batch size\n", "");
    assert_eq!(
        err(&text),
        "test.yaml:73:3: training.batch_size: is required but missing"
    );
}

#[test]
fn broken_yaml() {
    let msg = err(&edited("  n_heads: 6", "  n_heads: [6"));
    assert!(
        msg.starts_with("test.yaml:6:11: not valid YAML: illegal placement of ':' indicator\n"),
        "{msg}"
    );
    assert!(msg.contains("n_heads: [6"), "{msg}");
}

#[test]
fn subsampling_factor_not_power_of_two() {
    assert_eq!(
        err(&edited("  subsampling_factor: 8", "  subsampling_factor: 6")),
        "test.yaml:10:3: model.subsampling_factor: must be a power of 2 (2, 4, 8, 16, ...), found 6"
    );
}

#[test]
fn probability_out_of_range() {
    assert_eq!(
        err(&edited("  dropout_ff: 0.0", "  dropout_ff: 1.5")),
        "test.yaml:7:3: model.dropout_ff: must be a probability in [0, 1], found 1.5"
    );
    assert_eq!(
        err(&edited("  p: 0.5", "  p: -0.1")),
        "test.yaml:69:3: spec_augment.p: must be a probability in [0, 1], found -0.1"
    );
}

#[test]
fn even_conv_kernel() {
    assert_eq!(
        err(&edited("  conv_kernel_size: 9", "  conv_kernel_size: 8")),
        "test.yaml:17:3: model.conv_kernel_size: must be odd (\"same\" padding needs (k-1)/2 on each side), found 8"
    );
}

#[test]
fn zero_batch_size() {
    assert_eq!(
        err(&edited("  batch_size: 704", "  batch_size: 0")),
        "test.yaml:75:3: training.batch_size: must be greater than 0, found 0"
    );
}

#[test]
fn backprop_every_below_backwards_every() {
    assert_eq!(
        err(&edited("  backwards_every: 1", "  backwards_every: 4")),
        "test.yaml:76:3: training.backprop_every: must be >= training.backwards_every (4), found 1"
    );
}

#[test]
fn nonzero_chunk_overlap() {
    assert_eq!(
        err(&edited("  size: 512", "  size: 512\n  overlap: 64")),
        "test.yaml:41:3: audio_chunking.overlap: only 0 is supported (the reference trains without overlap), found 64"
    );
}

#[test]
fn optimizer_arg_for_the_wrong_optimizer() {
    assert_eq!(
        err(&edited("    lr: 2.5e-3", "    lr: 2.5e-3\n    betas: [0.9, 0.98]")),
        "test.yaml:35:5: optimizer.args.betas: does not apply to madgrad; its arguments are lr, momentum, weight_decay, eps, decouple_decay"
    );
}

#[test]
fn bad_enum_value_in_model() {
    assert_eq!(
        err(&edited(
            "  default_norm: layer_norm",
            "  default_norm: batch_norm"
        )),
        "test.yaml:24:17: model.default_norm: \"batch_norm\" is not one of layer_norm, rms_norm"
    );
}

#[test]
fn bad_seed() {
    let text = reference_text() + "  random_seed: often\n";
    assert_eq!(
        err(&text),
        "test.yaml:80:16: training.random_seed: expected a whole number >= 0 or \"random\", found \"often\""
    );
}

#[test]
fn section_with_wrong_type() {
    let text = reference_text().replace(
        "data:\n  path: /mnt/parscratch/users/acp21rjf/spotify/audio_txt_pairs.json # path to the json file containing the audio/text pairs creating using the preprocessing script\n",
        "data: [1, 2]\n",
    );
    assert_eq!(
        err(&text),
        "test.yaml:60:7: data: expected a mapping of keys, found a list [...]"
    );
}

#[test]
fn top_level_not_a_mapping() {
    assert_eq!(
        err("- a\n- b\n"),
        "test.yaml:1:1: the top level must be a mapping of sections (model:, optimizer:, ...), found a list"
    );
}

#[test]
fn sequence_max_below_chunk_size() {
    assert_eq!(
        err(&edited(
            "  max_sequence_length: 16384",
            "  max_sequence_length: 256"
        )),
        "test.yaml:46:3: sequence_scheduler.max_sequence_length: must be at least audio_chunking.size (512), found 256"
    );
}

#[test]
fn several_problems_are_all_reported() {
    let text =
        edited("  n_heads: 6", "  n_heads: 0").replace("  batch_size: 704", "  batch_size: 0");
    let msg = err(&text);
    assert_eq!(msg.lines().count(), 2, "{msg}");
    assert!(msg.contains("model.n_heads: must be greater than 0"));
    assert!(msg.contains("training.batch_size: must be greater than 0"));
}

#[test]
fn missing_file_is_a_clear_error() {
    let e = load_file(
        std::path::Path::new("/nonexistent/conf.yaml"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(e
        .to_string()
        .starts_with("cannot read config file /nonexistent/conf.yaml"));
}
