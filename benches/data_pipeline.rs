//! Data-pipeline throughput: reference features for one hour of audio, and
//! the dataset streaming chunks of the demo corpus (prepared into a temporary
//! directory). Run: `cargo bench --bench data_pipeline` (or `cargo test
//! --bench data_pipeline` for the test profile).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lcasr::audio::features::features;
use lcasr::data::dataset::Dataset;
use lcasr::data::prepare::{discover, prepare};
use lcasr::text::tokenizer::train_bpe;

/// Large tensors come from huge pages and are reused across steps.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: lcasr::runtime::LargeBlockAlloc = lcasr::runtime::LargeBlockAlloc;

fn main() {
    lcasr::runtime::tune_allocator();
    // One hour of 16 kHz audio: two tones and a chirp.
    let n = 3600 * 16_000;
    let samples: Vec<f32> = (0..n)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            0.4 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()
                + 0.1 * (2.0 * std::f32::consts::PI * (300.0 + (t % 7.0) * 200.0) * t).sin()
        })
        .collect();
    let start = Instant::now();
    let f = features(&samples).unwrap();
    println!(
        "features: 1 h of audio ({} frames) in {:.2} s",
        f.dim(2).unwrap(),
        start.elapsed().as_secs_f64()
    );

    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo/train");
    let out = std::env::temp_dir().join(format!("lcasr-bench-data-{}", std::process::id()));
    let (sources, _) = discover(&corpus).unwrap();
    let start = Instant::now();
    let (manifest, _) = prepare(&sources, &out, &Default::default(), &|_, _| {}).unwrap();
    let audio: f64 = manifest.recordings.iter().map(|r| r.duration).sum();
    println!(
        "prepare: {:.0} s of demo audio (MP3) in {:.2} s",
        audio,
        start.elapsed().as_secs_f64()
    );
    let text = std::fs::read_to_string(corpus.join("transcripts.txt")).unwrap();
    let tok = Arc::new(train_bpe(text.lines().map(str::to_string), 256).unwrap());
    let data = Arc::new(Dataset::open(&out.join("manifest.json"), tok).unwrap());
    let batch: Vec<usize> = (0..manifest.recordings.len()).collect();
    for chunk in [512, 2048] {
        let plan = data.plan(&batch, chunk).unwrap();
        let start = Instant::now();
        let mut frames = 0usize;
        for c in data.prefetch(batch.clone(), plan.clone(), 2) {
            frames += c.unwrap().lengths.iter().sum::<usize>();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "dataset: chunk {chunk}: {} chunks, {:.0} s of audio in {:.3} s ({:.0}x real time)",
            plan.len(),
            frames as f64 / 100.0,
            secs,
            frames as f64 / 100.0 / secs
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}
