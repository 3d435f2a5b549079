//! What driving training from Rhai costs: one epoch of the demo corpus with the
//! demo model (4 blocks, d_model 144, chunks of 1024 frames, batch 4), once
//! through scripts/train.rhai (`lcasr train`'s path, with logging, progress and
//! a final checkpoint) and once as the same procedure in direct library calls
//! (lcasr::train::direct). Both end with bit-identical weights (see
//! tests/train_script.rs), so the time difference per optimizer step is the
//! script host's overhead. Run: `cargo bench --bench script_overhead`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use lcasr::config::{self, LoadOptions};
use lcasr::data::prepare::{discover, prepare};
use lcasr::experiment::{self, Experiment};
use lcasr::run::run_dir::StartMode;

/// Rounds per variant; the best is reported.
const ROUNDS: usize = 3;

/// Large tensors come from huge pages and are reused across steps.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: lcasr::runtime::LargeBlockAlloc = lcasr::runtime::LargeBlockAlloc;

fn main() {
    lcasr::runtime::tune_allocator();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(&repo).unwrap();
    let tmp = std::env::temp_dir().join(format!("lcasr-bench-script-{}", std::process::id()));
    let (sources, _) = discover(&repo.join("data/demo/train")).unwrap();
    let (manifest, _) =
        prepare(&sources, &tmp.join("data"), &Default::default(), &|_, _| {}).unwrap();
    let texts: Vec<String> = manifest
        .recordings
        .iter()
        .map(|r| {
            let words = r.words.as_deref().unwrap_or_default();
            words
                .iter()
                .map(|w| w.word.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let tok = tmp.join("tokenizer.json");
    lcasr::text::tokenizer::train_and_save(texts, 64, &tok).unwrap();
    let config = write_config(&tmp, &repo.join("configs/demo.yaml"), &tok);
    let cfg = config::load_file(&config, &LoadOptions::default())
        .unwrap()
        .config;

    let mut direct_best = f64::INFINITY;
    let mut steps = 0;
    for _ in 0..ROUNDS {
        let run = lcasr::train::direct::train(&cfg).unwrap();
        steps = run.steps;
        direct_best = direct_best.min(run.elapsed.as_secs_f64());
    }
    let mut script_best = f64::INFINITY;
    for round in 0..ROUNDS {
        let exp = Experiment {
            script: repo.join("scripts/train.rhai"),
            config: config.clone(),
            overrides: Vec::new(),
            strict: false,
            run_dir: Some(tmp.join(format!("run{round}"))),
            mode: StartMode::New,
            command_line: vec!["bench".into()],
            import_roots: vec![repo.join("scripts")],
            seed: None,
            compare_with: None,
            script_args: Default::default(),
            ranks: None,
            gpus: false,
            processes: false,
        };
        let start = Instant::now();
        experiment::run(&exp).unwrap_or_else(|e| panic!("{e}"));
        script_best = script_best.min(start.elapsed().as_secs_f64());
    }
    let per_step_direct = direct_best / steps as f64 * 1e3;
    let per_step_script = script_best / steps as f64 * 1e3;
    println!(
        "one epoch, {steps} optimizer steps: direct calls {direct_best:.2} s ({per_step_direct:.1} ms/step), \
         train.rhai {script_best:.2} s ({per_step_script:.1} ms/step, setup and final checkpoint included)"
    );
    println!(
        "script overhead: {:.2} ms/step = {:.2}% of a step",
        per_step_script - per_step_direct,
        (per_step_script / per_step_direct - 1.0) * 100.0
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The demo config for one epoch at a fixed chunk length, without
/// SpecAugment or held-out scoring, reading the data prepared in `tmp`.
fn write_config(tmp: &Path, demo: &Path, tok: &Path) -> PathBuf {
    let overrides = vec![
        "training.max_epochs=1".to_string(),
        format!("data.path={}", tmp.join("data/manifest.json").display()),
        format!("data.tokenizer={}", tok.display()),
        "checkpointing.save_every_n_steps=1000000".to_string(),
    ];
    let loaded = config::load_file(
        demo,
        &LoadOptions {
            strict: false,
            overrides,
        },
    )
    .unwrap();
    let mut cfg = loaded.config;
    cfg.sequence_scheduler = None;
    cfg.spec_augment = None;
    cfg.data.eval_path = None;
    let path = tmp.join("config.yaml");
    std::fs::write(&path, cfg.to_yaml()).unwrap();
    path
}
