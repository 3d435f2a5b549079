//! The data pipeline end to end on the bundled demo corpus: MP3 decoding,
//! `prepare`, a tokenizer trained on the transcripts, and chunks read back
//! (directly and through the prefetch thread) with the right features and
//! targets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lcasr::data::dataset::Dataset;
use lcasr::data::prepare::{discover, load_features, prepare};
use lcasr::text::tokenizer::train_bpe;

fn demo(split: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/demo")
        .join(split)
}

#[test]
fn demo_heldout_split_prepares_and_streams_chunks() {
    let out = std::env::temp_dir().join(format!("lcasr-dataset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (sources, problems) = discover(&demo("heldout")).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(sources.len() >= 2);
    let (manifest, report) = prepare(&sources, &out, &Default::default(), &|_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(manifest.recordings.len(), sources.len());

    let transcripts = std::fs::read_to_string(demo("train").join("transcripts.txt")).unwrap();
    let tokenizer = Arc::new(train_bpe(transcripts.lines().map(str::to_string), 128).unwrap());
    let data = Arc::new(Dataset::open(&out.join("manifest.json"), tokenizer.clone()).unwrap());

    // Durations from the decoded MP3 match the generator's JSON.
    for (rec, src) in manifest.recordings.iter().zip(&sources) {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.audio.with_extension("json")).unwrap(),
        )
        .unwrap();
        let want = json["duration"].as_f64().unwrap();
        assert!(
            (rec.duration - want).abs() < 1e-3,
            "{}: {} vs {want}",
            rec.id,
            rec.duration
        );
    }

    let batch: Vec<usize> = (0..manifest.recordings.len()).collect();
    let chunks = data.plan(&batch, 1000).unwrap();
    let direct: Vec<_> = chunks
        .iter()
        .map(|c| data.load(&batch, c).unwrap())
        .collect();
    let prefetched: Vec<_> = data
        .prefetch(batch.clone(), chunks.clone(), 2)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(direct.len(), prefetched.len());

    let mut words_seen = vec![0usize; manifest.recordings.len()];
    for ((chunk, a), b) in chunks.iter().zip(&direct).zip(&prefetched) {
        assert_eq!(a.targets, b.targets);
        assert_eq!(a.lengths, b.lengths);
        let fa: Vec<f32> = a.features.flatten_all().unwrap().to_vec1().unwrap();
        let fb: Vec<f32> = b.features.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(fa, fb);
        for (slot, item) in chunk.items.iter().enumerate() {
            let rec = &manifest.recordings[a.recordings[slot]];
            let full = load_features(&out.join(&rec.features)).unwrap();
            let want = full.narrow(1, chunk.start, item.valid).unwrap();
            let got = a
                .features
                .get(slot)
                .unwrap()
                .narrow(1, 0, item.valid)
                .unwrap();
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            assert_eq!(
                a.targets[slot],
                tokenizer.encode(&item.words.join(" ")).unwrap()
            );
            words_seen[a.recordings[slot]] += item.words.len();
        }
    }
    for (rec, seen) in manifest.recordings.iter().zip(words_seen) {
        assert_eq!(seen, rec.words.as_ref().unwrap().len(), "{}", rec.id);
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn missing_feature_file_is_named() {
    let dir = std::env::temp_dir().join(format!("lcasr-dataset-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        r#"{"version": 1, "recordings": [{"id": "x", "features": "features/x.safetensors", "duration": 1.0, "text": "hi"}]}"#,
    )
    .unwrap();
    let tok = Arc::new(train_bpe(["hello there".to_string()].into_iter(), 16).unwrap());
    let err = Dataset::open(&dir.join("manifest.json"), tok)
        .err()
        .expect("must fail");
    assert!(
        format!("{err:#}").contains("features/x.safetensors"),
        "{err:#}"
    );
}
