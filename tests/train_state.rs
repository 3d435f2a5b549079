//! Training-state checkpoints: a run interrupted by save → fresh process-like
//! rebuild → load continues bit-identically, and broken or mismatched
//! checkpoints are refused with errors that say what is wrong.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lcasr::config::{load_model_section, ModelConfig};
use lcasr::model::{Encoder, ForwardOptions};
use lcasr::train::clip::clip_grad_norm;
use lcasr::train::lr_schedule::{CosineWarmup, DecayUnit};
use lcasr::train::optimizer::{
    collect_params, DecayGroups, Optimizer, OptimizerConfig, OptimizerKind, Param,
};
use lcasr::train::rng::RunRng;
use lcasr::train::state::{
    load_checkpoint, save_checkpoint, TrainingCounters, TrainingState, MODEL_FILE,
};

const VOCAB: usize = 15;
const BATCH: usize = 2;
const FRAMES: usize = 200;
const STEPS: u64 = 6;
const MASTER_SEED: u64 = 2024;

fn tiny_config() -> ModelConfig {
    let path = common::fixture("model_tiny_config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    load_model_section(&text, &path.display().to_string()).unwrap()
}

/// A scratch directory unique to one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lcasr-train-state-{test}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Everything a run mutates.
struct Run {
    model: Encoder,
    params: Vec<Param>,
    opt: Box<dyn Optimizer>,
    lr: CosineWarmup,
    rng: RunRng,
    recordings: u64,
    feat_in: usize,
    targets: Vec<Vec<u32>>,
}

fn schedule() -> CosineWarmup {
    CosineWarmup::new(3e-3, 1e-4, 2, STEPS, DecayUnit::Steps).unwrap()
}

/// Fixed random label sequences (never the blank id `VOCAB`).
fn fixed_targets() -> Vec<Vec<u32>> {
    let mut rng = RunRng::new(7);
    let s = rng.stream("targets");
    (0..BATCH)
        .map(|_| (0..5).map(|_| s.below(VOCAB) as u32).collect())
        .collect()
}

impl Run {
    fn new(cfg: &ModelConfig, init_seed: u64) -> Self {
        let model = Encoder::init(cfg, VOCAB, init_seed, &Device::Cpu).unwrap();
        let params = collect_params(
            model.params().iter().map(|(k, v)| (k.clone(), v.clone())),
            DecayGroups::Conventional,
        );
        Run {
            model,
            params,
            opt: OptimizerConfig::defaults(OptimizerKind::Madgrad).build(),
            lr: schedule(),
            rng: RunRng::new(MASTER_SEED),
            recordings: 0,
            feat_in: cfg.feat_in as usize,
            targets: fixed_targets(),
        }
    }

    /// One optimizer step on a batch drawn from the run's "data" stream;
    /// returns the loss.
    fn step(&mut self) -> f32 {
        let n = BATCH * self.feat_in * FRAMES;
        let x = self.rng.stream("data").uniform_vec(n, -1.0, 1.0);
        let x = Tensor::from_vec(x, (BATCH, self.feat_in, FRAMES), &Device::Cpu).unwrap();
        self.recordings += BATCH as u64;
        self.lr.start_batch(self.recordings);
        let out = self
            .model
            .forward(
                &x,
                Some(&[FRAMES, FRAMES * 4 / 5]),
                &ForwardOptions {
                    train: true,
                    dropout_seed: self.opt.steps(),
                    ..Default::default()
                },
            )
            .unwrap();
        let loss = lcasr_kernels::ctc::ctc_loss(
            &out.logits,
            &self.targets,
            &out.lengths,
            VOCAB as u32,
            false,
        )
        .unwrap()
        .sum_all()
        .unwrap();
        let mut grads = loss.backward().unwrap();
        clip_grad_norm(&self.params, &mut grads, 0.8).unwrap();
        self.opt.step(&self.params, &grads, self.lr.lr()).unwrap();
        self.lr.after_optimizer_step();
        self.lr.end_batch(self.recordings);
        loss.to_scalar::<f32>().unwrap()
    }

    fn state(&self) -> TrainingState {
        TrainingState {
            counters: TrainingCounters {
                optimizer_steps: self.opt.steps(),
                recordings_seen: self.recordings,
                epoch: 0,
                position_in_epoch: self.recordings,
            },
            lr_schedule: self.lr.state(),
            sequence_schedule: None,
            rng: self.rng.state(),
            optimizer: self.opt.name().to_string(),
            script_state: serde_json::json!({ "recordings": self.recordings }),
        }
    }

    fn save(&self, dir: &Path) {
        save_checkpoint(dir, &self.model, self.opt.as_ref(), &self.state(), &[]).unwrap();
    }

    /// Loads `dir` into this run's model and optimizer and adopts its counters.
    fn resume(&mut self, dir: &Path) {
        let state = load_checkpoint(dir, &self.model, self.opt.as_mut()).unwrap();
        self.lr.load_state(state.lr_schedule).unwrap();
        self.rng = RunRng::from_state(&state.rng).unwrap();
        self.recordings = state.counters.recordings_seen;
        assert_eq!(state.counters.optimizer_steps, self.opt.steps());
        assert_eq!(
            state.script_state,
            serde_json::json!({ "recordings": self.recordings })
        );
    }

    /// Every parameter and buffer as raw bits, by name.
    fn bits(&self) -> Vec<(String, Vec<u32>)> {
        self.model
            .state_dict()
            .unwrap()
            .into_iter()
            .map(|(name, t)| {
                let bits = match t.dtype() {
                    candle_core::DType::I64 => {
                        let v = t.to_scalar::<i64>().unwrap() as u64;
                        vec![v as u32, (v >> 32) as u32]
                    }
                    _ => common::to_f32_vec(&t)
                        .into_iter()
                        .map(f32::to_bits)
                        .collect(),
                };
                (name, bits)
            })
            .collect()
    }
}

#[test]
fn save_load_continue_is_bit_identical() {
    let cfg = tiny_config();
    let dir = scratch("resume");
    let ckpt = dir.join("ckpt");

    let mut straight = Run::new(&cfg, 11);
    let straight_losses: Vec<f32> = (0..STEPS).map(|_| straight.step()).collect();
    assert!(straight_losses.iter().all(|l| l.is_finite()));

    let mut first = Run::new(&cfg, 11);
    let half = STEPS / 2;
    for _ in 0..half {
        first.step();
    }
    // Saving twice exercises replacing an existing checkpoint.
    first.save(&ckpt);
    first.save(&ckpt);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("ckpt")]);
    drop(first);

    let mut resumed = Run::new(&cfg, 999);
    assert_ne!(resumed.bits(), straight.bits());
    resumed.resume(&ckpt);
    let resumed_losses: Vec<f32> = (half..STEPS).map(|_| resumed.step()).collect();

    let want: Vec<u32> = straight_losses[half as usize..]
        .iter()
        .map(|l| l.to_bits())
        .collect();
    let got: Vec<u32> = resumed_losses.iter().map(|l| l.to_bits()).collect();
    assert_eq!(got, want, "losses of the resumed steps differ");
    assert_eq!(resumed.opt.steps(), straight.opt.steps());
    assert_eq!(resumed.lr.state(), straight.lr.state());
    assert_eq!(resumed.rng.state(), straight.rng.state());
    let (a, b) = (straight.bits(), resumed.bits());
    assert_eq!(a.len(), b.len());
    let renorm_buffers = a.iter().filter(|(n, _)| n.contains("running_")).count();
    assert!(
        renorm_buffers > 0,
        "the tiny model should have BatchRenorm buffers"
    );
    for ((name, x), (name_b, y)) in a.iter().zip(&b) {
        assert_eq!(name, name_b);
        assert!(x == y, "`{name}` differs after resuming");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_model_file_is_detected() {
    let cfg = tiny_config();
    let dir = scratch("truncated");
    let ckpt = dir.join("ckpt");
    let run = Run::new(&cfg, 3);
    run.save(&ckpt);
    let path = ckpt.join(MODEL_FILE);
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);

    let mut other = Run::new(&cfg, 4);
    let before = other.bits();
    let err = load_checkpoint(&ckpt, &other.model, other.opt.as_mut()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(MODEL_FILE), "{msg}");
    assert!(msg.contains("corrupted or truncated"), "{msg}");
    assert!(other.bits() == before, "a failed load changed the model");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn model_with_another_config_is_refused() {
    let cfg = tiny_config();
    let dir = scratch("config");
    let ckpt = dir.join("ckpt");
    let run = Run::new(&cfg, 3);
    run.save(&ckpt);

    let mut smaller = cfg.clone();
    smaller.n_layers = cfg.n_layers - 1;
    let mut other = Run::new(&smaller, 3);
    let err = load_checkpoint(&ckpt, &other.model, other.opt.as_mut()).unwrap_err();
    let msg = format!("{err:#}");
    let present: Vec<String> = other
        .model
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let missing: Vec<String> = run
        .model
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !present.contains(n))
        .collect();
    assert!(!missing.is_empty());
    for name in &missing {
        assert!(
            msg.contains(&format!("`{name}`")),
            "{name} not named in: {msg}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn madgrad_state_is_refused_by_adam() {
    let cfg = tiny_config();
    let dir = scratch("optimizer");
    let ckpt = dir.join("ckpt");
    let mut run = Run::new(&cfg, 3);
    run.step();
    run.save(&ckpt);

    let other = Run::new(&cfg, 3);
    let mut adam = OptimizerConfig::defaults(OptimizerKind::Adam).build();
    let err = load_checkpoint(&ckpt, &other.model, adam.as_mut()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("madgrad") && msg.contains("adam"), "{msg}");
    assert_eq!(adam.steps(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
