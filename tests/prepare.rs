//! `lcasr prepare` on a folder with good files and three bad ones: it finishes,
//! names each problem, exits non-zero, caches fp16 features equal to the
//! reference recipe, and skips unchanged files on a second run.

use std::path::{Path, PathBuf};
use std::process::Command;

use lcasr::audio::decode::{load_16k, LoadOptions};
use lcasr::audio::features::features;
use lcasr::data::manifest::Manifest;
use lcasr::data::prepare::load_features;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lcasr-prepare-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_wav(path: &Path, seconds: f32, freq: f32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    let n = (seconds * 16000.0) as usize;
    for i in 0..n {
        let t = i as f32 / 16000.0;
        let x = 0.3 * (2.0 * std::f32::consts::PI * freq * t).sin() + 0.05 * (t * 977.0).sin();
        w.write_sample((x * 32767.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

fn corpus(dir: &Path) {
    write_wav(&dir.join("a.wav"), 1.5, 440.0);
    std::fs::write(dir.join("a.txt"), "hello world\n").unwrap();
    write_wav(&dir.join("b.wav"), 2.25, 880.0);
    std::fs::write(
        dir.join("b.json"),
        r#"{"text": "two words", "words": [{"word": "two", "start": 0.1, "end": 0.5}, {"word": "words", "start": 0.7, "end": 1.2}]}"#,
    )
    .unwrap();
    std::fs::write(dir.join("corrupt.wav"), b"RIFF\x10\x00\x00\x00WAVEgarbage").unwrap();
    std::fs::write(dir.join("corrupt.txt"), "never read").unwrap();
    write_wav(&dir.join("empty.wav"), 0.0, 440.0);
    std::fs::write(dir.join("empty.txt"), "nothing").unwrap();
    write_wav(&dir.join("untranscribed.wav"), 1.0, 300.0);
}

#[test]
fn prepare_reports_bad_files_and_caches_features() {
    let input = temp_dir("in");
    let out = temp_dir("out");
    corpus(&input);
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_lcasr"))
            .args([
                "prepare",
                input.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let first = run();
    let stdout = String::from_utf8_lossy(&first.stdout);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("prepared 2 recordings (2 computed, 0 unchanged)"),
        "{stdout}"
    );
    for name in ["corrupt.wav", "empty.wav", "untranscribed.wav"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("skipped ") && l.contains(name)),
            "{name} not reported: {stderr}"
        );
    }
    assert!(stderr.contains("untranscribed.wav: no transcript (expected untranscribed.txt"));
    assert!(stderr.contains("3 file(s) skipped"), "{stderr}");

    let manifest = Manifest::load(out.join("manifest.json")).unwrap();
    let ids: Vec<&str> = manifest.recordings.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    let b = &manifest.recordings[1];
    assert_eq!(b.duration, 2.25);
    assert_eq!(b.words.as_ref().unwrap()[1].word, "words");
    assert_eq!(manifest.recordings[0].text.as_deref(), Some("hello world"));

    // The cached features are the reference recipe, stored as fp16.
    let cached = load_features(&out.join(&b.features)).unwrap();
    let samples = load_16k(&input.join("b.wav"), &LoadOptions::default()).unwrap();
    let direct = features(&samples).unwrap().squeeze(0).unwrap();
    assert_eq!(cached.dims(), direct.dims());
    assert_eq!(cached.dim(1).unwrap(), 36_000 / 160 + 1);
    let diff = (cached - direct)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-2, "fp16 cache differs by {diff}");

    // A second run reuses both; a changed file is recomputed.
    let second = run();
    assert!(String::from_utf8_lossy(&second.stdout)
        .contains("prepared 2 recordings (0 computed, 2 unchanged)"));
    write_wav(&input.join("a.wav"), 1.0, 500.0);
    let third = run();
    assert!(String::from_utf8_lossy(&third.stdout)
        .contains("prepared 2 recordings (1 computed, 1 unchanged)"));
}

#[test]
fn listings_are_read() {
    let dir = temp_dir("listing");
    write_wav(&dir.join("x.wav"), 1.0, 440.0);
    std::fs::write(
        dir.join("list.tsv"),
        "audio\ttext\nx.wav\tsome words\nmissing.wav\tgone\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("list.jsonl"),
        "{\"audio\": \"x.wav\", \"text\": \"some words\"}\nnot json\n",
    )
    .unwrap();
    let (sources, problems) = lcasr::data::prepare::discover(&dir.join("list.tsv")).unwrap();
    assert_eq!(sources.len(), 2);
    assert!(problems.is_empty());
    assert_eq!(sources[0].text.as_deref(), Some("some words"));
    let (sources, problems) = lcasr::data::prepare::discover(&dir.join("list.jsonl")).unwrap();
    assert_eq!(sources.len(), 1);
    assert_eq!(problems.len(), 1);
    assert!(problems[0].message.starts_with("line 2:"));
    let out = temp_dir("listing-out");
    let (manifest, report) = lcasr::data::prepare::prepare(
        &lcasr::data::prepare::discover(&dir.join("list.tsv"))
            .unwrap()
            .0,
        &out,
        &Default::default(),
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(manifest.recordings.len(), 1);
    assert_eq!(report.problems.len(), 1);
    assert!(report.problems[0].path.ends_with("missing.wav"));
}
