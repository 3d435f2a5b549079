//! A fresh model: the reference's parameter counts and initial distributions
//! (PyTorch defaults: U(±1/√fan_in) for linear and convolution weights and
//! biases, norms at 1 and 0, BatchRenorm buffers at 0 and 1).

use candle_core::Device;
use lcasr::config::ModelConfig;
use lcasr::model::Encoder;

fn values(model: &Encoder, name: &str) -> Vec<f32> {
    model.params()[name]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Parameter counts of the reference's models (reference-spec §4, verified there
/// by instantiating the reference), all with the 4095-piece tokenizer.
#[test]
fn parameter_counts_match_the_reference() {
    let cases = [
        (6, 256, 8, 32, 11_979_008usize),
        (12, 256, 8, 32, 21_061_376),
    ];
    for (layers, d, heads, head_dim, want) in cases {
        let cfg = ModelConfig {
            n_layers: layers,
            d_model: d,
            n_heads: heads,
            head_dim,
            use_rotary: true,
            decoder_norm: true,
            ..ModelConfig::default()
        };
        let model = Encoder::init(&cfg, 4095, 0, &Device::Cpu).unwrap();
        assert_eq!(model.num_parameters(), want, "{layers}L {d}D {heads}H");
    }
}

#[test]
fn initial_distributions_follow_pytorch_defaults() {
    let cfg = ModelConfig {
        n_layers: 2,
        d_model: 128,
        n_heads: 4,
        head_dim: 32,
        subsampling_conv_channels: 64,
        use_rotary: true,
        decoder_norm: true,
        fourier_pos_enc: true,
        ..ModelConfig::default()
    };
    let model = Encoder::init(&cfg, 255, 3, &Device::Cpu).unwrap();
    // (name, fan_in) of uniform-initialised tensors.
    let uniform = [
        ("layers.0.ff1.fn.fn.fc1.weight", 128usize),
        ("layers.0.ff1.fn.fn.fc2.weight", 512),
        ("layers.1.attend.fn.qkv_proj.weight", 128),
        ("layers.1.conv.fn.pointwise_conv1.weight", 128),
        ("layers.1.conv.fn.pointwise_conv1.bias", 128),
        ("layers.1.conv.fn.depthwise_conv.weight", 9),
        ("subsampling.conv.0.weight", 9),
        ("subsampling.conv.3.weight", 64),
        ("decoder.ff.weight", 128),
        ("decoder.reprojection.weight", 256),
    ];
    for (name, fan_in) in uniform {
        let v = values(&model, name);
        let bound = 1.0 / (fan_in as f32).sqrt();
        assert!(
            v.iter().all(|x| x.abs() <= bound),
            "{name} outside ±{bound}"
        );
        let n = v.len() as f32;
        let mean = v.iter().sum::<f32>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
        let want_std = bound / 3f32.sqrt();
        assert!(
            mean.abs() < 4.0 * want_std / n.sqrt() + 1e-6,
            "{name} mean {mean}"
        );
        assert!(
            (std - want_std).abs() < 0.1 * want_std,
            "{name} std {std}, expected {want_std}"
        );
    }
    for name in [
        "layers.0.norm_out.weight",
        "layers.1.conv.fn.batch_norm.weight",
    ] {
        assert!(values(&model, name).iter().all(|&x| x == 1.0), "{name}");
    }
    for name in ["layers.0.norm_out.bias", "layers.1.conv.fn.batch_norm.bias"] {
        assert!(values(&model, name).iter().all(|&x| x == 0.0), "{name}");
    }
    let w = values(&model, "fourier_pos_enc.w_r");
    let n = w.len() as f32;
    let mean = w.iter().sum::<f32>() / n;
    let std = (w.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
    assert!(
        mean.abs() < 0.4 && (std - 1.0).abs() < 0.35,
        "N(0,1): {mean} {std}"
    );
    for (_, state) in model.renorm_states() {
        assert!(state.mean.iter().all(|&x| x == 0.0));
        assert!(state.std.iter().all(|&x| x == 1.0));
        assert_eq!(state.num_batches_tracked, 0);
    }
    // Different seeds, different weights; the same seed, the same weights.
    let again = Encoder::init(&cfg, 255, 3, &Device::Cpu).unwrap();
    let other = Encoder::init(&cfg, 255, 4, &Device::Cpu).unwrap();
    let name = "decoder.ff.weight";
    assert_eq!(values(&model, name), values(&again, name));
    assert_ne!(values(&model, name), values(&other, name));
}
