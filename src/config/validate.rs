//! Value and cross-field checks on a typed config, and the filling-in of
//! defaults that depend on other keys (optimizer arguments).

use super::schema::{Config, ConvType, OptimizerName};

/// One problem found in a config: the key path and what is wrong with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// Dotted key path.
    pub path: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

struct Checker(Vec<Problem>);

impl Checker {
    fn fail(&mut self, path: &str, message: String) {
        self.0.push(Problem {
            path: path.into(),
            message,
        });
    }

    fn positive(&mut self, path: &str, v: u64) {
        if v == 0 {
            self.fail(path, "must be greater than 0, found 0".into());
        }
    }

    fn probability(&mut self, path: &str, v: f64) {
        if !(0.0..=1.0).contains(&v) {
            self.fail(path, format!("must be a probability in [0, 1], found {v}"));
        }
    }

    fn positive_f(&mut self, path: &str, v: f64) {
        if !(v.is_finite() && v > 0.0) {
            self.fail(path, format!("must be a number greater than 0, found {v}"));
        }
    }

    fn non_negative_f(&mut self, path: &str, v: f64) {
        if !(v.is_finite() && v >= 0.0) {
            self.fail(path, format!("must be a number >= 0, found {v}"));
        }
    }
}

/// The optimizer arguments that apply to each optimizer, with their defaults
/// (those of the reference's MADGRAD implementations and of torch's Adam/AdamW).
fn optimizer_defaults(name: OptimizerName) -> (&'static [&'static str], f64, f64, f64) {
    // (allowed args, lr, eps, weight_decay)
    match name {
        OptimizerName::Madgrad => (
            &["lr", "momentum", "weight_decay", "eps", "decouple_decay"],
            1e-2,
            1e-6,
            0.0,
        ),
        OptimizerName::Mirrormadgrad => (
            &["lr", "momentum", "weight_decay", "eps", "decouple_decay"],
            1e-2,
            0.0,
            0.0,
        ),
        OptimizerName::Adam => (
            &["lr", "betas", "eps", "weight_decay", "amsgrad"],
            1e-3,
            1e-8,
            0.0,
        ),
        OptimizerName::Adamw => (
            &["lr", "betas", "eps", "weight_decay", "amsgrad"],
            1e-3,
            1e-8,
            1e-2,
        ),
    }
}

/// Fills in the defaults that depend on other keys. Idempotent: resolving a
/// resolved config changes nothing.
pub fn resolve(cfg: &mut Config) {
    let name = cfg.optimizer.name;
    let (allowed, lr, eps, wd) = optimizer_defaults(name);
    let args = &mut cfg.optimizer.args;
    args.lr.get_or_insert(lr);
    args.eps.get_or_insert(eps);
    args.weight_decay.get_or_insert(wd);
    if allowed.contains(&"momentum") {
        args.momentum.get_or_insert(0.9);
        args.decouple_decay.get_or_insert(false);
    } else {
        args.betas.get_or_insert((0.9, 0.999));
        args.amsgrad.get_or_insert(false);
    }
}

/// Every value and cross-field problem of a (resolved) config.
pub fn check(cfg: &Config) -> Vec<Problem> {
    let mut c = Checker(Vec::new());
    let m = &cfg.model;
    c.positive("model.feat_in", m.feat_in);
    c.positive("model.n_layers", m.n_layers);
    c.positive("model.d_model", m.d_model);
    c.positive("model.n_heads", m.n_heads);
    c.positive("model.head_dim", m.head_dim);
    c.positive("model.expansion_factor", m.expansion_factor);
    c.probability("model.dropout_ff", m.dropout_ff);
    c.probability("model.dropout_attn", m.dropout_attn);
    c.probability("model.dropout_conv", m.dropout_conv);
    if m.subsampling_factor < 2 || !m.subsampling_factor.is_power_of_two() {
        c.fail(
            "model.subsampling_factor",
            format!(
                "must be a power of 2 (2, 4, 8, 16, ...), found {}",
                m.subsampling_factor
            ),
        );
    }
    if m.subsampling_conv_channels == 0 || m.subsampling_conv_channels < -1 {
        c.fail(
            "model.subsampling_conv_channels",
            format!(
                "must be greater than 0, or -1 for d_model, found {}",
                m.subsampling_conv_channels
            ),
        );
    }
    if m.conv_type == ConvType::Standard && m.conv_kernel_size.is_multiple_of(2) {
        c.fail(
            "model.conv_kernel_size",
            format!(
                "must be odd (\"same\" padding needs (k-1)/2 on each side), found {}",
                m.conv_kernel_size
            ),
        );
    }
    c.positive_f("model.conv_expansion_factor", m.conv_expansion_factor);
    if m.use_rotary && !m.head_dim.is_multiple_of(2) {
        c.fail(
            "model.head_dim",
            format!(
                "must be even when use_rotary is true (rotary pairs dimensions), found {}",
                m.head_dim
            ),
        );
    }
    if m.fourier_pos_enc && !m.d_model.is_multiple_of(2) {
        c.fail(
            "model.d_model",
            format!(
                "must be even when fourier_pos_enc is true, found {}",
                m.d_model
            ),
        );
    }
    c.positive_f("model.rotary_base_freq", m.rotary_base_freq);
    c.positive_f(
        "model.rotary_interpolation_factor",
        m.rotary_interpolation_factor,
    );
    for (key, v) in [
        ("model.attention_window_size", m.attention_window_size),
        (
            "model.attention_window_size_left",
            m.attention_window_size_left,
        ),
        (
            "model.attention_window_size_right",
            m.attention_window_size_right,
        ),
    ] {
        if v < -1 {
            c.fail(key, format!("must be -1 (unbounded) or >= 0, found {v}"));
        }
    }

    let args = &cfg.optimizer.args;
    let name = cfg.optimizer.name;
    let (allowed, ..) = optimizer_defaults(name);
    for (key, present) in [
        ("momentum", args.momentum.is_some()),
        ("decouple_decay", args.decouple_decay.is_some()),
        ("betas", args.betas.is_some()),
        ("amsgrad", args.amsgrad.is_some()),
    ] {
        if present && !allowed.contains(&key) {
            c.fail(
                &format!("optimizer.args.{key}"),
                format!(
                    "does not apply to {name}; its arguments are {}",
                    allowed.join(", ")
                ),
            );
        }
    }
    if let Some(lr) = args.lr {
        c.non_negative_f("optimizer.args.lr", lr);
    }
    if let Some(eps) = args.eps {
        c.non_negative_f("optimizer.args.eps", eps);
    }
    if let Some(wd) = args.weight_decay {
        c.non_negative_f("optimizer.args.weight_decay", wd);
    }
    if let Some(mom) = args.momentum {
        if !(0.0..1.0).contains(&mom) {
            c.fail(
                "optimizer.args.momentum",
                format!("must be in [0, 1), found {mom}"),
            );
        }
    }
    if let Some((b1, b2)) = args.betas {
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            c.fail(
                "optimizer.args.betas",
                format!("both betas must be in [0, 1), found [{b1}, {b2}]"),
            );
        }
    }
    if args.amsgrad == Some(true) {
        c.fail(
            "optimizer.args.amsgrad",
            "AMSGrad is not supported; set it to false or remove it".into(),
        );
    }

    c.positive("audio_chunking.size", cfg.audio_chunking.size);
    if cfg.audio_chunking.overlap != 0 {
        c.fail(
            "audio_chunking.overlap",
            format!(
                "only 0 is supported (the reference trains without overlap), found {}",
                cfg.audio_chunking.overlap
            ),
        );
    }

    if let Some(s) = &cfg.sequence_scheduler {
        if s.increase_every == 0 || s.increase_every < -1 {
            c.fail(
                "sequence_scheduler.increase_every",
                format!(
                    "must be greater than 0, or -1 to disable, found {}",
                    s.increase_every
                ),
            );
        }
        if s.max_sequence_length < cfg.audio_chunking.size {
            c.fail(
                "sequence_scheduler.max_sequence_length",
                format!(
                    "must be at least audio_chunking.size ({}), found {}",
                    cfg.audio_chunking.size, s.max_sequence_length
                ),
            );
        }
        c.positive_f(
            "sequence_scheduler.increase_by_multiplier",
            s.increase_by_multiplier,
        );
        c.positive_f(
            "sequence_scheduler.batch_size_multiplier",
            s.batch_size_multiplier,
        );
    }

    if let Some(s) = &cfg.spec_augment {
        c.probability("spec_augment.p", s.p);
        if s.min_p != -1.0 {
            c.probability("spec_augment.min_p", s.min_p);
        }
        if s.time_mask_param < -1 {
            c.fail(
                "spec_augment.time_mask_param",
                format!(
                    "must be >= 0, or -1 to derive it from min_p, found {}",
                    s.time_mask_param
                ),
            );
        }
        if s.time_mask_param == -1 && s.min_p == -1.0 && s.n_time_masks > 0 {
            c.fail(
                "spec_augment.time_mask_param",
                "is -1 (derive from min_p) but spec_augment.min_p is not set".into(),
            );
        }
        if s.freq_mask_param < 0 {
            c.fail(
                "spec_augment.freq_mask_param",
                format!("must be >= 0, found {}", s.freq_mask_param),
            );
        }
    }

    let t = &cfg.training;
    c.positive("training.batch_size", t.batch_size);
    c.positive("training.backprop_every", t.backprop_every);
    c.positive("training.backwards_every", t.backwards_every);
    c.positive("training.max_epochs", t.max_epochs);
    if t.backprop_every < t.backwards_every {
        c.fail(
            "training.backprop_every",
            format!(
                "must be >= training.backwards_every ({}), found {}",
                t.backwards_every, t.backprop_every
            ),
        );
    }
    if t.start_spec_augment_after_n_epochs < -1 {
        c.fail(
            "training.start_spec_augment_after_n_epochs",
            format!(
                "must be -1 (off) or an epoch >= 0, found {}",
                t.start_spec_augment_after_n_epochs
            ),
        );
    }
    if t.max_cache_length != 0 {
        c.fail(
            "training.max_cache_length",
            format!(
                "only 0 is supported (cache carry-over between chunks was removed from the reference), found {}",
                t.max_cache_length
            ),
        );
    }
    if let Err(e) = crate::runtime::device::DeviceName::parse(&t.device) {
        c.fail("training.device", e.to_string());
    }
    if !t.clip_value.is_finite() {
        c.fail(
            "training.clip_value",
            format!("must be a finite number, found {}", t.clip_value),
        );
    }
    if cfg.data.path.trim().is_empty() {
        c.fail("data.path", "must not be empty".into());
    }
    c.0
}
