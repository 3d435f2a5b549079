//! Audio decoding and resampling properties: WAV sample formats read back
//! exactly, errors name the file, and resampling keeps a tone's frequency and
//! amplitude.

use std::path::Path;

use lcasr::audio::decode::{load_16k, load_audio, AudioError, ChannelMode, LoadOptions};
use lcasr::audio::resample::{resample, Resampler};

/// A deterministic test signal in [-0.9, 0.9] for channel `c`.
fn signal(frames: usize, c: usize) -> Vec<f64> {
    (0..frames)
        .map(|i| {
            let x = i as f64;
            0.6 * (0.05 * x + c as f64).sin() + 0.3 * (0.31 * x * (c + 1) as f64).cos()
        })
        .collect()
}

/// Writes `channels` channels of [`signal`] with `bits`/`float`; returns the
/// values a reader must see per channel.
fn write_wav(path: &Path, bits: u16, float: bool, channels: u16, frames: usize) -> Vec<Vec<f32>> {
    let spec = hound::WavSpec {
        channels,
        sample_rate: 22_050,
        bits_per_sample: bits,
        sample_format: if float {
            hound::SampleFormat::Float
        } else {
            hound::SampleFormat::Int
        },
    };
    let data: Vec<Vec<f64>> = (0..channels as usize).map(|c| signal(frames, c)).collect();
    let full_scale = 2f64.powi(bits as i32 - 1);
    let mut expected = vec![Vec::with_capacity(frames); channels as usize];
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..frames {
        for (c, ch) in data.iter().enumerate() {
            if float {
                let v = ch[i] as f32;
                w.write_sample(v).unwrap();
                expected[c].push(v);
            } else {
                let q = (ch[i] * (full_scale - 1.0)).round() as i32;
                if bits == 8 {
                    w.write_sample(q as i8).unwrap();
                } else {
                    w.write_sample(q).unwrap();
                }
                expected[c].push((q as f64 / full_scale) as f32);
            }
        }
    }
    w.finalize().unwrap();
    expected
}

#[test]
fn wav_formats_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let frames = 1234;
    for (bits, float) in [
        (8, false),
        (16, false),
        (24, false),
        (32, false),
        (32, true),
    ] {
        for channels in [1u16, 2] {
            let path = dir.path().join(format!("t{bits}{float}{channels}.wav"));
            let expected = write_wav(&path, bits, float, channels, frames);
            let audio = load_audio(&path, &LoadOptions::default()).unwrap();
            assert_eq!(audio.sample_rate, 22_050);
            assert_eq!(
                audio.samples, expected[0],
                "{bits} bit float={float} ch={channels}"
            );

            let mix = LoadOptions {
                channel: ChannelMode::Mix,
                ..Default::default()
            };
            let mixed = load_audio(&path, &mix).unwrap().samples;
            for i in 0..frames {
                let mean = expected.iter().map(|c| c[i]).sum::<f32>() / channels as f32;
                assert!((mixed[i] - mean).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn symphonia_path_matches_hound() {
    // A WAV without the .wav extension is probed and decoded by symphonia.
    let dir = tempfile::tempdir().unwrap();
    for bits in [16, 24] {
        let path = dir.path().join(format!("stereo{bits}.audio"));
        let expected = write_wav(&path, bits, false, 2, 3000);
        let audio = load_audio(&path, &LoadOptions::default()).unwrap();
        assert_eq!(audio.sample_rate, 22_050);
        assert_eq!(audio.samples, expected[0], "{bits} bit via symphonia");
        let resampled = load_16k(&path, &LoadOptions::default()).unwrap();
        assert_eq!(
            resampled.len(),
            (3000u64 * 16_000).div_ceil(22_050) as usize
        );
    }
}

fn assert_names_file(err: &AudioError, path: &Path) {
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LoadOptions::default();

    let missing = dir.path().join("missing.wav");
    let err = load_audio(&missing, &opts).unwrap_err();
    assert!(matches!(err, AudioError::NotFound { .. }), "{err:?}");
    assert_names_file(&err, &missing);

    let empty = dir.path().join("empty.flac");
    std::fs::write(&empty, b"").unwrap();
    let err = load_16k(&empty, &opts).unwrap_err();
    assert!(matches!(err, AudioError::Empty { .. }), "{err:?}");
    assert_names_file(&err, &empty);

    // A valid header with no samples is empty too.
    let no_samples = dir.path().join("no_samples.wav");
    write_wav(&no_samples, 16, false, 1, 0);
    let err = load_audio(&no_samples, &opts).unwrap_err();
    assert!(matches!(err, AudioError::Empty { .. }), "{err:?}");

    let garbage = dir.path().join("garbage.wav");
    std::fs::write(&garbage, b"this is not a RIFF file at all").unwrap();
    let err = load_audio(&garbage, &opts).unwrap_err();
    assert!(matches!(err, AudioError::Corrupt { .. }), "{err:?}");
    assert_names_file(&err, &garbage);

    // A WAV cut in the middle of its data chunk is truncated.
    let full = dir.path().join("full.wav");
    write_wav(&full, 16, false, 2, 1000);
    let bytes = std::fs::read(&full).unwrap();
    let truncated = dir.path().join("truncated.wav");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2 + 1]).unwrap();
    let err = load_audio(&truncated, &opts).unwrap_err();
    assert!(matches!(err, AudioError::Corrupt { .. }), "{err:?}");
    assert_names_file(&err, &truncated);

    let unknown = dir.path().join("noise.ogg");
    std::fs::write(&unknown, vec![0x5a; 4096]).unwrap();
    let err = load_audio(&unknown, &opts).unwrap_err();
    assert!(
        matches!(
            err,
            AudioError::Unsupported { .. } | AudioError::Corrupt { .. }
        ),
        "{err:?}"
    );
    assert_names_file(&err, &unknown);
}

/// Least-squares amplitude of a tone of `freq` Hz in `x` (phase-free).
fn tone_amplitude(x: &[f32], freq: f64, rate: f64) -> f64 {
    let (mut s, mut c) = (0.0, 0.0);
    for (i, &v) in x.iter().enumerate() {
        let w = 2.0 * std::f64::consts::PI * freq * i as f64 / rate;
        s += v as f64 * w.sin();
        c += v as f64 * w.cos();
    }
    2.0 * (s * s + c * c).sqrt() / x.len() as f64
}

#[test]
fn resampling_keeps_tone_frequency_and_amplitude() {
    for from in [44_100u32, 48_000] {
        let secs = 0.5;
        let n = (from as f64 * secs) as usize;
        let x: Vec<f32> = (0..n)
            .map(|i| {
                (0.7 * (2.0 * std::f64::consts::PI * 1000.0 * i as f64 / from as f64).sin()) as f32
            })
            .collect();
        for kind in [Resampler::Reference, Resampler::Fast] {
            let y = resample(&x, from, 16_000, kind);
            let expected = (n as u64 * 16_000).div_ceil(from as u64) as usize;
            assert!(
                y.len().abs_diff(expected) <= 1,
                "{kind:?} {from}: {} vs {expected}",
                y.len()
            );
            if kind == Resampler::Reference {
                assert_eq!(y.len(), expected);
            }
            // Skip the edges, where the filter sees the zero extension.
            let body = &y[200..y.len() - 200];
            let amp = tone_amplitude(body, 1000.0, 16_000.0);
            assert!((amp - 0.7).abs() < 5e-3, "{kind:?} {from}: amplitude {amp}");
            // Nothing else: a detuned tone finds (almost) no energy.
            let off = tone_amplitude(body, 1100.0, 16_000.0);
            assert!(off < 2e-2, "{kind:?} {from}: leak {off}");
            let residual: f64 =
                body.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / body.len() as f64;
            assert!(
                (residual - 0.7 * 0.7 / 2.0).abs() < 5e-3,
                "{kind:?} {from}: power {residual}"
            );
        }
    }
    let x = vec![0.25f32; 100];
    assert_eq!(resample(&x, 16_000, 16_000, Resampler::Reference), x);
    assert_eq!(resample(&x, 16_000, 16_000, Resampler::Fast), x);
}

#[test]
fn tones_above_the_new_nyquist_are_removed() {
    let from = 48_000u32;
    let x: Vec<f32> = (0..24_000)
        .map(|i| {
            (0.5 * (2.0 * std::f64::consts::PI * 10_000.0 * i as f64 / from as f64).sin()) as f32
        })
        .collect();
    let input_rms = 0.5 / 2f64.sqrt();
    // The reference's short Hann-windowed sinc has a modest stopband; rubato's is deep.
    for (kind, min_db) in [(Resampler::Reference, 40.0), (Resampler::Fast, 80.0)] {
        let y = resample(&x, from, 16_000, kind);
        let body = &y[200..y.len() - 200];
        let rms =
            (body.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / body.len() as f64).sqrt();
        let attenuation = 20.0 * (input_rms / rms).log10();
        assert!(
            attenuation > min_db,
            "{kind:?}: 10 kHz only {attenuation:.1} dB down"
        );
    }
}

/// A split of the bundled demo corpus.
fn demo_dir(split: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/demo")
        .join(split)
}

/// The duration and word intervals (in 16 kHz samples) of a demo recording's JSON.
fn demo_timings(audio: &Path) -> (f64, Vec<(usize, usize)>) {
    let json = audio.with_extension("json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let to_samples = |t: &serde_json::Value| (t.as_f64().unwrap() * 16_000.0).round() as usize;
    let words = meta["words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (to_samples(&w["start"]), to_samples(&w["end"])))
        .collect();
    (meta["duration"].as_f64().unwrap(), words)
}

/// Where decoded speech starts relative to the generator's timings, in
/// samples: the median over words of the first sample louder than 256/32768
/// (searched from 60 ms before `start`, never before the previous word's end)
/// minus `start + 80`. The generator cuts every word clip 5 ms (80 samples)
/// before its first sample louder than 32/32768, so for correctly aligned
/// audio this is within a few milliseconds (-5 to +1 ms on the bundled
/// files), while a decoder that kept the MP3 encoder delay (1105 samples
/// here) or trimmed too much would be off by about that much.
fn median_onset_error(x: &[f32], words: &[(usize, usize)]) -> i64 {
    const LOUD: f32 = 256.0 / 32768.0;
    let mut errors = Vec::with_capacity(words.len());
    let mut prev_end = 0;
    for &(start, end) in words {
        let from = start.saturating_sub(960).max(prev_end);
        if let Some(i) = (from..end.min(x.len())).find(|&i| x[i].abs() > LOUD) {
            errors.push(i as i64 - (start as i64 + 80));
        }
        prev_end = end;
    }
    assert!(
        errors.len() * 10 >= words.len() * 9,
        "most words should be audible"
    );
    errors.sort_unstable();
    errors[errors.len() / 2]
}

/// Every demo recording (MP3 in train, Ogg Vorbis in heldout) decodes to
/// 16 kHz mono audio as long as its JSON says (±50 ms), with the encoder
/// delay removed: speech starts where the word timings say, within 30 ms.
#[test]
fn demo_mp3_and_ogg_decode_to_16k_mono_aligned_with_their_timings() {
    let mono = LoadOptions {
        channel: ChannelMode::Mix,
        ..Default::default()
    };
    for (split, ext, min_files) in [("train", "mp3", 50), ("heldout", "ogg", 4)] {
        let mut files: Vec<_> = std::fs::read_dir(demo_dir(split))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect();
        files.sort();
        assert!(
            files.len() >= min_files,
            "{split}: {} .{ext} files",
            files.len()
        );
        for path in &files {
            let audio = load_audio(path, &LoadOptions::default()).unwrap();
            assert_eq!(audio.sample_rate, 16_000, "{}", path.display());
            if path == &files[0] {
                // Mono: averaging the channels gives channel 0 back.
                assert_eq!(load_audio(path, &mono).unwrap().samples, audio.samples);
            }
            let (duration, words) = demo_timings(path);
            let decoded = audio.samples.len() as f64 / 16_000.0;
            assert!(
                (decoded - duration).abs() <= 0.05,
                "{}: decoded {decoded} s, JSON {duration} s",
                path.display()
            );
            let error = median_onset_error(&audio.samples, &words);
            assert!(
                error.abs() <= 480,
                "{}: speech starts {} ms off its word timings",
                path.display(),
                error as f64 / 16.0
            );
        }
    }
}

/// `prepare` on the held-out split reads its Ogg Vorbis files with their
/// JSON timings: nothing is skipped and the durations match.
#[test]
fn prepare_reads_the_ogg_heldout_split() {
    use lcasr::data::prepare::{discover, load_features, prepare};
    let (sources, problems) = discover(&demo_dir("heldout")).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(sources.len() >= 4);
    assert!(sources
        .iter()
        .all(|s| s.audio.extension().is_some_and(|e| e == "ogg")));
    let out = tempfile::tempdir().unwrap();
    let (manifest, report) =
        prepare(&sources, out.path(), &Default::default(), &|_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.computed, sources.len());
    for (rec, src) in manifest.recordings.iter().zip(&sources) {
        let (duration, words) = demo_timings(&src.audio);
        assert!((rec.duration - duration).abs() <= 0.05, "{}", rec.id);
        assert_eq!(
            rec.words.as_ref().map(Vec::len),
            Some(words.len()),
            "{}",
            rec.id
        );
        let features = load_features(&out.path().join(&rec.features)).unwrap();
        let frames = *features.dims().last().unwrap() as f64;
        assert!(
            (frames - duration * 100.0).abs() <= 2.0,
            "{}: {frames} frames",
            rec.id
        );
    }
}
