//! Parity of the spectrogram features with the reference (fixture a and
//! reference-spec §12), through the whole load path: decode, channel 0,
//! reference resampler, power-mel, per-bin normalisation.

mod common;

use lcasr::audio::decode::{load_16k, load_audio, LoadOptions};
use lcasr::audio::features::{
    features, features_with, mel_spectrogram, normalize_per_bin, FeatureRecipe, N_MELS,
};
use lcasr::audio::resample::{resample, Resampler};

/// (bins, frames) of a (1, 80, T) fixture tensor.
fn bins_frames(t: &candle_core::Tensor) -> (usize, usize) {
    let dims = t.dims();
    assert_eq!(dims.len(), 3, "expected (1, F, T), got {dims:?}");
    (dims[1], dims[2])
}

/// Raw power-mel check: per bin, |diff| <= 1e-4 * max(bin) + 1e-7.
fn assert_mel_close(got: &[f32], want: &candle_core::Tensor, what: &str) {
    let (bins, frames) = bins_frames(want);
    let want = common::to_f32_vec(want);
    assert_eq!(got.len(), want.len(), "{what}: size");
    assert_eq!(bins, N_MELS);
    for m in 0..bins {
        let row = &want[m * frames..(m + 1) * frames];
        let peak = row.iter().fold(0f32, |a, &v| a.max(v.abs()));
        for t in 0..frames {
            let (g, w) = (got[m * frames + t], row[t]);
            assert!(
                (g - w).abs() <= 1e-4 * peak + 1e-7,
                "{what}: mel[{m}, {t}] = {g}, reference {w} (bin max {peak})"
            );
        }
    }
}

/// Normalised features check: |diff| <= 1e-3.
fn assert_features_close(got: &[f32], want: &candle_core::Tensor, what: &str) {
    let want = common::to_f32_vec(want);
    let diff = common::max_abs_diff(got, &want);
    assert!(diff <= 1e-3, "{what}: max |diff| {diff}");
}

#[test]
fn signal_mel_and_features_match_reference() {
    let fx = common::load_tensors("features.safetensors");
    let signal = common::to_f32_vec(&fx["signal"]);
    let (mel, frames) = mel_spectrogram(&signal);
    assert_eq!(frames, bins_frames(&fx["mel_raw"]).1);
    assert_eq!(frames, signal.len() / 160 + 1);
    assert_mel_close(&mel, &fx["mel_raw"], "signal");

    let mut normalised = mel.clone();
    normalize_per_bin(&mut normalised, frames);
    assert_features_close(&normalised, &fx["features"], "signal");

    let tensor = features(&signal).unwrap();
    assert_eq!(tensor.dims(), fx["features"].dims());
    assert_features_close(&common::to_f32_vec(&tensor), &fx["features"], "tensor");

    // The fp16 storage copy stays within the documented round-trip error.
    let fp16 = common::to_f32_vec(&fx["features_fp16_roundtrip"]);
    assert!(common::max_abs_diff(&normalised, &fp16) <= 5e-3);
}

#[test]
fn wav16_decodes_and_matches_reference() {
    let fx = common::load_tensors("features.safetensors");
    let path = common::fixture("features_signal.wav");
    let audio = load_audio(&path, &LoadOptions::default()).unwrap();
    assert_eq!(audio.sample_rate, 16_000);
    let decoded = common::to_f32_vec(&fx["wav16.decoded"]);
    assert_eq!(audio.samples, decoded, "int16/32768 decoding is exact");

    let samples = load_16k(&path, &LoadOptions::default()).unwrap();
    assert_eq!(samples, decoded, "16 kHz input is not resampled");
    let (mel, _) = mel_spectrogram(&samples);
    assert_mel_close(&mel, &fx["wav16.mel_raw"], "wav16");
    let feats = common::to_f32_vec(&features(&samples).unwrap());
    assert_features_close(&feats, &fx["wav16.features"], "wav16");
}

#[test]
fn wav44k_left_channel_resampled_matches_reference() {
    let fx = common::load_tensors("features.safetensors");
    let path = common::fixture("features_signal_44k_stereo.wav");
    let audio = load_audio(&path, &LoadOptions::default()).unwrap();
    let want = common::to_f32_vec(&fx["wav44k.resampled_16k"]);

    let samples = load_16k(&path, &LoadOptions::default()).unwrap();
    assert_eq!(samples.len(), want.len());
    let diff = common::max_abs_diff(&samples, &want);
    assert!(diff <= 1e-5, "resampler max |diff| {diff}");
    assert_eq!(
        samples,
        resample(
            &audio.samples,
            audio.sample_rate,
            16_000,
            Resampler::Reference
        )
    );

    let (mel, _) = mel_spectrogram(&samples);
    assert_mel_close(&mel, &fx["wav44k.mel_raw"], "wav44k");
    let feats = common::to_f32_vec(&features(&samples).unwrap());
    assert_features_close(&feats, &fx["wav44k.features"], "wav44k");
}

#[test]
fn spec_spot_values_on_the_spec_signal() {
    // reference-spec §12: the signal synthesised in float32 arithmetic.
    let signal: Vec<f32> = (0..32_000)
        .map(|n| {
            let t = n as f32 / 16_000.0;
            let tau = 2.0 * std::f32::consts::PI;
            0.5 * (tau * 440.0 * t).sin()
                + 0.25 * (tau * 1234.5 * t).sin()
                + 0.1 * (tau * 3000.0 * t * (1.0 + t / 4.0)).sin()
        })
        .collect();
    let (mel, frames) = mel_spectrogram(&signal);
    assert_eq!(frames, 201);
    let at = |v: &[f32], m: usize, t: usize| v[m * frames + t];
    for (m, t, want) in [(10, 50, 1.335493e-2f32), (40, 100, 1.261918e-5)] {
        let raw = at(&mel, m, t);
        assert!(
            ((raw - want) / want).abs() < 1e-3,
            "raw [{m}, {t}] = {raw}, spec {want}"
        );
    }
    let mut norm = mel.clone();
    normalize_per_bin(&mut norm, frames);
    for (m, t, want) in [
        (0, 0, 10.502182),
        (5, 50, -0.100739),
        (10, 50, -0.100405),
        (40, 100, -0.099917),
        (79, 199, -0.055561),
        (20, 0, 9.210057),
        (20, 200, 10.637566),
    ] {
        let got = at(&norm, m, t);
        assert!((got - want).abs() < 1e-3, "[{m}, {t}] = {got}, spec {want}");
    }
}

#[test]
fn log_mel_recipe_is_normalised_log_of_power_mel() {
    let fx = common::load_tensors("features.safetensors");
    let signal = common::to_f32_vec(&fx["signal"]);
    let (mel, frames) = mel_spectrogram(&signal);
    let mut want: Vec<f32> = mel.iter().map(|v| (v + 1e-6).ln()).collect();
    normalize_per_bin(&mut want, frames);
    let got = features_with(&signal, FeatureRecipe::LogMel).unwrap();
    let got = common::to_f32_vec(&got);
    assert!(common::max_abs_diff(&got, &want) < 1e-5);
    // Each bin has zero mean and unit unbiased variance.
    for row in got.chunks(frames) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / frames as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (frames - 1) as f64;
        assert!(
            mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
            "{mean} {var}"
        );
    }
}

/// One hour of 16 kHz audio through the full feature recipe. Run with
/// `cargo test --release --test features -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_one_hour_features() {
    let n = 3600 * 16_000;
    let signal: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 0.0123).sin() * 0.3 + ((i * 7919) % 1000) as f32 * 1e-4)
        .collect();
    let start = std::time::Instant::now();
    let t = features(&signal).unwrap();
    let elapsed = start.elapsed();
    println!(
        "features for 1 h of audio ({} frames, {} threads): {:.3} s",
        t.dims()[2],
        rayon::current_num_threads(),
        elapsed.as_secs_f64()
    );
    let start = std::time::Instant::now();
    let x: Vec<f32> = (0..900 * 44_100)
        .map(|i| (i as f32 * 0.031).sin() * 0.5)
        .collect();
    let y = resample(&x, 44_100, 16_000, Resampler::Reference);
    println!(
        "reference resampler 44.1k->16k, 15 min: {:.3} s ({} samples)",
        start.elapsed().as_secs_f64(),
        y.len()
    );
}
