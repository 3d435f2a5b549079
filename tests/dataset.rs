//! The data pipeline end to end on the bundled demo corpus: MP3 decoding,
//! `prepare`, a tokenizer trained on the transcripts, and chunks read back
//! (directly and through the prefetch thread) with the right features and
//! targets. Also the reference's torch `.spec.pt` feature files (fixtures
//! written by `tests/fixtures/torch_spec/make_spec_pt.py`), and untimed
//! recordings longer than a chunk, trained as one chunk at full length.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use lcasr::audio::features::N_MELS;
use lcasr::data::chunking::Chunk;
use lcasr::data::dataset::{Dataset, TrainChunk};
use lcasr::data::prepare::{discover, load_features, prepare};
use lcasr::script::{compile, CompileOptions, SessionSetup};
use lcasr::text::tokenizer::{train_bpe, Tokenizer};

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

// ------------------------------------------------- torch `.spec.pt` files

/// A fixture written by `tests/fixtures/torch_spec/make_spec_pt.py`.
fn spec_fixture(name: &str) -> PathBuf {
    common::repo().join("tests/fixtures/torch_spec").join(name)
}

/// The value every features fixture holds at (mel bin, frame).
fn known(bin: usize, frame: usize) -> f32 {
    (((37 * bin + 11 * frame) % 101) as f32 - 50.0) / 8.0
}

/// The feature fixtures: (file, frames).
const SPEC_FILES: [(&str, usize); 3] = [
    ("f16.spec.pt", 40),
    ("bf16_strided.spec.pt", 24),
    ("f32.spec.pt", 6),
];

const WORDS: [&str; 3] = ["alpha", "beta", "gamma"];

/// A tokenizer knowing the words of these tests.
fn small_tokenizer() -> Arc<Tokenizer> {
    let texts = ["alpha beta gamma", "the whole long transcript", "short one"];
    Arc::new(train_bpe(texts.iter().map(|t| t.to_string()), 40).unwrap())
}

/// Checks a loaded chunk of one recording against the known values: frames
/// `start..start + valid` in place, zeros after.
fn assert_known_features(got: &TrainChunk, slot: usize, start: usize, valid: usize, what: &str) {
    let (_, bins, width) = got.features.dims3().unwrap();
    assert_eq!(bins, N_MELS, "{what}");
    let rows = common::to_f32_vec(&got.features.get(slot).unwrap());
    for bin in 0..N_MELS {
        for t in 0..width {
            let want = if t < valid {
                known(bin, start + t)
            } else {
                0.0
            };
            assert_eq!(rows[bin * width + t], want, "{what}: bin {bin} frame {t}");
        }
    }
}

#[test]
fn reference_index_of_spec_pt_files_streams_chunks() {
    let tok = small_tokenizer();
    for (name, frames) in SPEC_FILES {
        let dir = tempfile::tempdir().unwrap();
        // Three words at 10 %, 50 % and 90 % of the recording.
        let secs = frames as f64 / 100.0;
        let words: Vec<serde_json::Value> = WORDS
            .iter()
            .zip([0.1, 0.5, 0.9])
            .map(|(w, at)| {
                serde_json::json!({"word": w, "startTime": format!("{:.3}s", at * secs),
                    "endTime": format!("{:.3}s", at * secs + 0.005)})
            })
            .collect();
        let transcript = serde_json::json!({"results": [{"alternatives": [{"words": words}]}]});
        std::fs::write(dir.path().join("ep.json"), transcript.to_string()).unwrap();
        let index = serde_json::json!({"show/ep": {
            "audio": spec_fixture(name), "txt": "ep.json", "duration": secs}});
        let path = dir.path().join("audio_txt_pairs.json");
        std::fs::write(&path, index.to_string()).unwrap();

        let data = Arc::new(Dataset::open(&path, tok.clone()).unwrap());
        assert_eq!(data.frames(), &[frames], "{name}");
        let chunks = data.plan(&[0], 16).unwrap();
        let direct: Vec<TrainChunk> = chunks.iter().map(|c| data.load(&[0], c).unwrap()).collect();
        let prefetched: Vec<TrainChunk> = data
            .prefetch(vec![0], chunks.clone(), 2)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(direct.len(), chunks.len(), "{name}");
        let mut seen = Vec::new();
        for ((c, a), b) in chunks.iter().zip(&direct).zip(&prefetched) {
            let item = &c.items[0];
            assert_eq!(a.features.dims3().unwrap(), (1, N_MELS, c.width));
            assert_known_features(a, 0, c.start, item.valid, name);
            assert_eq!(
                common::to_f32_vec(&a.features),
                common::to_f32_vec(&b.features)
            );
            assert_eq!((a.start, &a.lengths), (c.start, &vec![item.valid]));
            assert_eq!(a.targets, b.targets);
            assert_eq!(a.targets[0], tok.encode(&item.words.join(" ")).unwrap());
            seen.extend(item.words.iter().cloned());
        }
        assert_eq!(seen, WORDS, "{name}");
        // Evaluation reads the whole file at once, through the same view.
        let whole = load_features(&spec_fixture(name)).unwrap();
        assert_eq!(whole.dims2().unwrap(), (N_MELS, frames), "{name}");
        let values = common::to_f32_vec(&whole);
        for bin in 0..N_MELS {
            for t in 0..frames {
                assert_eq!(
                    values[bin * frames + t],
                    known(bin, t),
                    "{name}: {bin}, {t}"
                );
            }
        }
    }
}

/// The transcript of a test recording.
enum Transcript<'a> {
    /// Timed words, word `i` at 0.05 + 0.15·i seconds.
    Words(&'a [&'a str]),
    /// Untimed text.
    Text(&'a str),
}

/// Writes our manifest with `recordings` (id, features file, transcript)
/// into `dir`.
fn write_manifest(dir: &Path, recordings: &[(&str, &str, Transcript)]) -> PathBuf {
    let recs: Vec<serde_json::Value> = recordings
        .iter()
        .map(|(id, file, transcript)| {
            let mut rec = serde_json::json!({"id": id, "features": spec_fixture(file),
                "duration": 1.0});
            match transcript {
                Transcript::Words(words) => {
                    let ws: Vec<serde_json::Value> = words
                        .iter()
                        .enumerate()
                        .map(|(i, w)| {
                            let start = 0.05 + 0.15 * i as f64;
                            serde_json::json!({"word": w, "start": start, "end": start + 0.001})
                        })
                        .collect();
                    rec["words"] = ws.into();
                }
                Transcript::Text(text) => rec["text"] = (*text).into(),
            }
            rec
        })
        .collect();
    let path = dir.join("manifest.json");
    let manifest = serde_json::json!({"version": 1, "recordings": recs});
    std::fs::write(&path, manifest.to_string()).unwrap();
    path
}

/// A timed recording (40 frames), an untimed one longer than a 16-frame
/// chunk (24 frames) and a short untimed one (6 frames).
fn mixed_manifest(dir: &Path) -> PathBuf {
    write_manifest(
        dir,
        &[
            ("timed", "f16.spec.pt", Transcript::Words(&WORDS)),
            (
                "long",
                "bf16_strided.spec.pt",
                Transcript::Text("the whole long transcript"),
            ),
            ("short", "f32.spec.pt", Transcript::Text("short one")),
        ],
    )
}

#[test]
fn long_untimed_recording_loads_as_one_full_length_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer();
    let data = Arc::new(Dataset::open(&mixed_manifest(dir.path()), tok.clone()).unwrap());
    assert_eq!(data.frames(), &[40, 24, 6]);
    let batch = vec![2, 0, 1];
    let chunks = data.plan(&batch, 16).unwrap();
    let layout: Vec<(usize, usize, Vec<usize>)> = chunks
        .iter()
        .map(|c: &Chunk| {
            let items = c.items.iter().map(|it| it.recording).collect();
            (c.start, c.width, items)
        })
        .collect();
    // Windows over "short" and "timed" (one word in each), then "long".
    assert_eq!(
        layout,
        vec![
            (0, 16, vec![0, 1]),
            (16, 16, vec![1]),
            (32, 8, vec![1]),
            (0, 24, vec![2])
        ]
    );
    let loaded: Vec<TrainChunk> = data
        .prefetch(batch.clone(), chunks.clone(), 2)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let long = &loaded[3];
    assert_eq!(long.features.dims3().unwrap(), (1, N_MELS, 24));
    assert_eq!(
        (long.start, &long.lengths, &long.recordings),
        (0, &vec![24], &vec![1])
    );
    assert_known_features(long, 0, 0, 24, "long");
    assert_eq!(
        long.targets[0],
        tok.encode("the whole long transcript").unwrap()
    );
    assert_eq!(
        long.features.to_vec3::<f32>().unwrap(),
        data.load(&batch, &chunks[3])
            .unwrap()
            .features
            .to_vec3::<f32>()
            .unwrap()
    );
    // The short one's whole text is in the first window, once.
    let first = &loaded[0];
    assert_eq!(
        (&first.recordings, &first.lengths),
        (&vec![2, 0], &vec![6, 16])
    );
    assert_known_features(first, 0, 0, 6, "short");
    assert_known_features(first, 1, 0, 16, "timed");
    assert_eq!(first.targets[0], tok.encode("short one").unwrap());
    let words: Vec<Vec<u32>> = loaded[..3]
        .iter()
        .map(|c| c.targets.last().unwrap().clone())
        .collect();
    let want: Vec<Vec<u32>> = WORDS.iter().map(|w| tok.encode(w).unwrap()).collect();
    assert_eq!(words, want);
}

#[test]
fn script_chunks_hand_out_the_full_length_chunk_last_and_resume_by_index() {
    let dir = tempfile::tempdir().unwrap();
    mixed_manifest(dir.path());
    let texts = ["alpha beta gamma", "the whole long transcript", "short one"];
    lcasr::text::tokenizer::train_and_save(
        texts.iter().map(|t| t.to_string()).collect(),
        40,
        &dir.path().join("tok.json"),
    )
    .unwrap();
    let script = dir.path().join("main.rhai");
    std::fs::write(
        &script,
        r#"
        let data = dataset("manifest.json", tokenizer("tok.json"));
        let batch = data.next_batch(3);
        let seen = [];
        // Stopped after two chunks, the batch goes on with the third.
        for chunk in data.chunks(batch, 16) {
            seen.push(`${chunk.index}:${chunk.features.shape[2]}x${chunk.size}:${chunk.is_last}`);
            if seen.len() == 2 { break; }
        }
        if data.next_batch(3).indices != batch.indices { throw "not the same batch"; }
        let chunks = data.chunks(batch, 16);
        if chunks.len() != 4 { throw `${chunks.len()} chunks`; }
        for chunk in chunks {
            seen.push(`${chunk.index}:${chunk.features.shape[2]}x${chunk.size}:${chunk.is_last}`);
        }
        let want = ["0:16x2:false", "1:16x1:false", "2:8x1:false", "3:24x1:true"];
        if `${seen}` != `${want}` { throw `chunks ${seen}`; }
        data.finish(batch);
        if data.next_batch(3) != () { throw "the epoch should be done"; }
        "#,
    )
    .unwrap();
    let compiled = compile(
        &script,
        &CompileOptions {
            import_roots: vec![],
            max_operations: 0,
            interrupts: Arc::new(AtomicUsize::new(0)),
        },
    )
    .map_err(|f| f.message)
    .unwrap();
    compiled
        .run(SessionSetup {
            config: None,
            seed: 3,
            base_dir: dir.path().to_path_buf(),
            run: None,
            args: Default::default(),
            device: candle_core::Device::Cpu,
        })
        .map_err(|f| f.message)
        .unwrap();
}

#[test]
fn bad_spec_pt_files_are_named_and_explained() {
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.spec.pt");
    let bytes = std::fs::read(spec_fixture("f16.spec.pt")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let cases = [
        ("dict.pt", "holds a dict"),
        ("rows40.spec.pt", "40 rows, expected 80"),
        (
            "rank4.spec.pt",
            "shape (1, 80, T) or (80, T), found [1, 1, 80, 2]",
        ),
        ("int64.spec.pt", "float16, bfloat16 or float32, found I64"),
        ("legacy.spec.pt", "legacy (pre-1.6) format"),
        ("deflated.spec.pt", "compressed with"),
        ("short.spec.pt", "holds 160 bytes, the pickle declares 320"),
        (
            "overrun.spec.pt",
            "strides (3, 1) and offset 0 reaches element 238 of a storage of 160 elements",
        ),
        (truncated.to_str().unwrap(), "not a torch zip file"),
    ];
    for (file, why) in cases {
        let path = write_manifest(dir.path(), &[("x", file, Transcript::Text("hi"))]);
        let err = Dataset::open(&path, small_tokenizer()).err().expect(file);
        let msg = format!("{err:#}");
        assert!(msg.contains(file) && msg.contains(why), "{file}: {msg}");
    }
}
