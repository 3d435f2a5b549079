//! The checkpoint store: retention, the `latest` pointer, falling back past
//! damaged checkpoints with a warning, extra files and temporary leftovers.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use lcasr::config::load_model_section;
use lcasr::model::Encoder;
use lcasr::run::checkpoints::{CheckpointStore, LATEST_FILE};
use lcasr::train::lr_schedule::{CosineWarmup, DecayUnit};
use lcasr::train::optimizer::{Optimizer, OptimizerConfig, OptimizerKind};
use lcasr::train::rng::RunRng;
use lcasr::train::state::{
    load_checkpoint, read_checkpoint_file, save_checkpoint, verify_checkpoint, TrainingCounters,
    TrainingState, MODEL_FILE, STATE_FILE,
};
use serde_json::json;

const VOCAB: usize = 15;

/// A tiny model and a MADGRAD optimizer.
fn tiny(seed: u64) -> (Encoder, Box<dyn Optimizer>) {
    let path = common::fixture("model_tiny_config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = load_model_section(&text, &path.display().to_string()).unwrap();
    let model = Encoder::init(&cfg, VOCAB, seed, &Device::Cpu).unwrap();
    let opt = OptimizerConfig::defaults(OptimizerKind::Madgrad).build();
    (model, opt)
}

/// Name of the parameter the tests overwrite to tell checkpoints apart.
fn marked_param(model: &Encoder) -> String {
    model.params().keys().next().unwrap().clone()
}

/// Fills the marked parameter with `value`.
fn mark(model: &Encoder, value: f32) {
    let var = &model.params()[&marked_param(model)];
    let t = Tensor::full(value, var.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(var.dtype())
        .unwrap();
    var.set(&t).unwrap();
}

/// The values of the marked parameter.
fn marked_values(model: &Encoder) -> Vec<f32> {
    common::to_f32_vec(model.params()[&marked_param(model)].as_tensor())
}

/// A training state for `step`, whose script state also records the step.
fn state_at(step: u64, opt: &dyn Optimizer) -> TrainingState {
    TrainingState {
        counters: TrainingCounters {
            optimizer_steps: step,
            recordings_seen: step * 4,
            ..Default::default()
        },
        lr_schedule: CosineWarmup::new(1e-3, 1e-5, 2, 100, DecayUnit::Steps)
            .unwrap()
            .state(),
        sequence_schedule: None,
        rng: RunRng::new(5).state(),
        optimizer: opt.name().to_string(),
        script_state: json!({ "step": step, "note": "script counters" }),
    }
}

/// Saves checkpoints for `steps`, the model marked with each step's value.
fn save_steps(store: &CheckpointStore, model: &Encoder, opt: &dyn Optimizer, steps: &[u64]) {
    for &step in steps {
        mark(model, step as f32);
        store
            .save(step, model, opt, &state_at(step, opt), &[])
            .unwrap();
    }
}

fn steps_of(store: &CheckpointStore) -> Vec<u64> {
    store.list().unwrap().into_iter().map(|(s, _)| s).collect()
}

/// Flips every bit of one byte in the middle of `path`.
fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// A writer appending to a shared buffer, for capturing log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Runs `f` with log output captured; returns its result and the log.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    (out, captured.text())
}

fn store_in(tmp: &tempfile::TempDir, keep_last: usize) -> CheckpointStore {
    CheckpointStore::new(tmp.path().join("checkpoints"), keep_last)
}

#[test]
fn retention_keeps_exactly_the_newest_k() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, 3);
    let (model, opt) = tiny(1);
    save_steps(&store, &model, opt.as_ref(), &[10, 20, 30, 40, 50, 60]);
    assert_eq!(steps_of(&store), vec![40, 50, 60]);
    assert_eq!(
        common::entry_names(store.dir()),
        vec![
            LATEST_FILE.to_string(),
            "step_000000040".into(),
            "step_000000050".into(),
            "step_000000060".into()
        ]
    );
    let latest = std::fs::read_to_string(store.dir().join(LATEST_FILE)).unwrap();
    assert_eq!(latest.trim(), "step_000000060");
    assert_eq!(store.latest_valid().unwrap(), Some(store.path_for(60)));

    let all = CheckpointStore::new(tmp.path().join("all"), 0);
    save_steps(&all, &model, opt.as_ref(), &[1, 2, 3, 4, 5]);
    assert_eq!(steps_of(&all), vec![1, 2, 3, 4, 5]);
}

#[test]
fn retention_never_removes_the_checkpoint_just_written() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, 2);
    let (model, opt) = tiny(1);
    save_steps(&store, &model, opt.as_ref(), &[10, 20, 30]);
    // An older step than any kept one (a run resumed from further back).
    save_steps(&store, &model, opt.as_ref(), &[5]);
    assert_eq!(steps_of(&store), vec![5, 30]);
    assert_eq!(store.latest_valid().unwrap(), Some(store.path_for(5)));
}

#[test]
fn saving_a_step_again_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, 0);
    let (model, opt) = tiny(1);
    mark(&model, 1.5);
    store
        .save(7, &model, opt.as_ref(), &state_at(7, opt.as_ref()), &[])
        .unwrap();
    mark(&model, -2.5);
    let path = store
        .save(7, &model, opt.as_ref(), &state_at(7, opt.as_ref()), &[])
        .unwrap();
    assert_eq!(path, store.path_for(7));
    assert_eq!(
        common::entry_names(store.dir()),
        vec![LATEST_FILE, "step_000000007"]
    );

    let (fresh, mut fresh_opt) = tiny(2);
    let (loaded, state) = store
        .load_latest(&fresh, fresh_opt.as_mut())
        .unwrap()
        .unwrap();
    assert_eq!(loaded, path);
    assert_eq!(state.counters.optimizer_steps, 7);
    assert!(marked_values(&fresh).iter().all(|&v| v == -2.5));
}

#[test]
fn corrupted_model_of_the_newest_falls_back_to_the_previous_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, 0);
    let (model, opt) = tiny(1);
    save_steps(&store, &model, opt.as_ref(), &[1, 2, 3]);
    flip_byte(&store.path_for(3).join(MODEL_FILE));

    let (picked, logs) = with_logs(|| store.latest_valid().unwrap());
    assert_eq!(picked, Some(store.path_for(2)));
    assert!(logs.contains("WARN"), "{logs}");
    assert!(logs.contains("step_000000003"), "{logs}");
    assert!(logs.contains(MODEL_FILE), "{logs}");
    assert!(logs.contains("corrupted or truncated"), "{logs}");
    assert!(!logs.contains("step_000000002"), "{logs}");

    let (fresh, mut fresh_opt) = tiny(9);
    let (path, state) = store
        .load_latest(&fresh, fresh_opt.as_mut())
        .unwrap()
        .unwrap();
    assert_eq!(path, store.path_for(2));
    assert_eq!(state, state_at(2, opt.as_ref()));
    assert!(marked_values(&fresh).iter().all(|&v| v == 2.0));
}

#[test]
fn truncated_state_json_falls_back_to_the_previous() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, 0);
    let (model, opt) = tiny(1);
    save_steps(&store, &model, opt.as_ref(), &[4, 8]);
    let state_path = store.path_for(8).join(STATE_FILE);
    let len = std::fs::metadata(&state_path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state_path)
        .unwrap()
        .set_len(len / 3)
        .unwrap();

    let err = verify_checkpoint(&store.path_for(8)).unwrap_err();
    assert!(format!("{err:#}").contains(STATE_FILE), "{err:#}");
    let (picked, logs) = with_logs(|| store.latest_valid().unwrap());
    assert_eq!(picked, Some(store.path_for(4)));
    assert!(logs.contains("step_000000008"), "{logs}");
    assert!(logs.contains("not a valid training state"), "{logs}");
}

#[test]
fn no_intact_checkpoint_gives_none() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, 0);
    let (model, mut opt) = tiny(1);
    assert_eq!(store.list().unwrap(), vec![]);
    assert_eq!(store.latest_valid().unwrap(), None);
    assert!(store.load_latest(&model, opt.as_mut()).unwrap().is_none());

    save_steps(&store, &model, opt.as_ref(), &[1]);
    std::fs::remove_file(store.path_for(1).join(MODEL_FILE)).unwrap();
    let (picked, logs) = with_logs(|| store.latest_valid().unwrap());
    assert_eq!(picked, None);
    assert!(logs.contains("no intact checkpoint"), "{logs}");
}

#[test]
fn missing_or_garbled_latest_falls_back_to_the_highest_step() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, 0);
    let (model, opt) = tiny(1);
    save_steps(&store, &model, opt.as_ref(), &[3, 6, 9]);
    let latest = store.dir().join(LATEST_FILE);

    // A pointer left behind by a crash between a checkpoint and its pointer
    // update is honoured: that checkpoint is complete.
    std::fs::write(&latest, "step_000000006\n").unwrap();
    assert_eq!(store.latest_valid().unwrap(), Some(store.path_for(6)));

    std::fs::write(&latest, "garbage\u{0}").unwrap();
    let (picked, logs) = with_logs(|| store.latest_valid().unwrap());
    assert_eq!(picked, Some(store.path_for(9)));
    assert!(logs.contains("does not name a checkpoint"), "{logs}");

    std::fs::write(&latest, "step_000000042").unwrap();
    let (picked, logs) = with_logs(|| store.latest_valid().unwrap());
    assert_eq!(picked, Some(store.path_for(9)));
    assert!(logs.contains("step 42"), "{logs}");

    std::fs::remove_file(&latest).unwrap();
    assert_eq!(store.latest_valid().unwrap(), Some(store.path_for(9)));
}

#[test]
fn temporary_leftovers_are_ignored_and_can_be_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, 2);
    let (model, opt) = tiny(1);
    save_steps(&store, &model, opt.as_ref(), &[1, 2]);
    // What a process killed while writing step 3 (or while retiring step 0)
    // leaves behind.
    let partial = store.dir().join(".tmp-step_000000003-99999");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join(MODEL_FILE), b"half a file").unwrap();
    let retired = store.dir().join(".old-step_000000000-99999");
    std::fs::create_dir(&retired).unwrap();
    std::fs::write(store.dir().join("latest.tmp-99999"), b"step_000000003").unwrap();
    std::fs::create_dir(store.dir().join("step_notanumber")).unwrap();

    assert_eq!(steps_of(&store), vec![1, 2]);
    assert_eq!(store.latest_valid().unwrap(), Some(store.path_for(2)));
    save_steps(&store, &model, opt.as_ref(), &[3]);
    assert_eq!(steps_of(&store), vec![2, 3]);

    assert_eq!(store.remove_leftovers().unwrap(), 3);
    assert_eq!(
        common::entry_names(store.dir()),
        vec![
            LATEST_FILE,
            "step_000000002",
            "step_000000003",
            "step_notanumber"
        ]
    );
}

#[test]
fn extra_files_round_trip_and_are_hash_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, 0);
    let (model, opt) = tiny(1);
    let config = b"model:\n  n_layers: 2\n".as_slice();
    let tokenizer = br#"{"vocab": ["a", "b"]}"#.as_slice();
    let extra = [("config.yaml", config), ("tokenizer.json", tokenizer)];
    save_steps(&store, &model, opt.as_ref(), &[1]);
    let path = store
        .save(2, &model, opt.as_ref(), &state_at(2, opt.as_ref()), &extra)
        .unwrap();
    assert_eq!(std::fs::read(path.join("config.yaml")).unwrap(), config);
    assert_eq!(read_checkpoint_file(&path, "config.yaml").unwrap(), config);
    assert_eq!(
        read_checkpoint_file(&path, "tokenizer.json").unwrap(),
        tokenizer
    );
    verify_checkpoint(&path).unwrap();
    let state_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join(STATE_FILE)).unwrap()).unwrap();
    assert_eq!(
        state_json["sha256"]["config.yaml"],
        json!(lcasr::hash::sha256_hex(config))
    );

    std::fs::write(path.join("config.yaml"), b"model:\n  n_layers: 3\n").unwrap();
    for err in [
        verify_checkpoint(&path).unwrap_err(),
        read_checkpoint_file(&path, "config.yaml").unwrap_err(),
        {
            let (fresh, mut fresh_opt) = tiny(2);
            load_checkpoint(&path, &fresh, fresh_opt.as_mut()).unwrap_err()
        },
    ] {
        let msg = format!("{err:#}");
        assert!(msg.contains("config.yaml"), "{msg}");
        assert!(msg.contains("corrupted or truncated"), "{msg}");
    }
    assert_eq!(store.latest_valid().unwrap(), Some(store.path_for(1)));
}

#[test]
fn bad_extra_file_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, opt) = tiny(1);
    let state = state_at(1, opt.as_ref());
    let dir = tmp.path().join("ckpt");
    for (extra, wanted) in [
        (vec![("../escape.txt", b"x".as_slice())], "plain file name"),
        (vec![("sub/file.txt", b"x".as_slice())], "plain file name"),
        (vec![(".hidden", b"x".as_slice())], "plain file name"),
        (vec![(MODEL_FILE, b"x".as_slice())], "clashes"),
        (vec![(STATE_FILE, b"x".as_slice())], "clashes"),
        (
            vec![("a.txt", b"x".as_slice()), ("a.txt", b"y".as_slice())],
            "twice",
        ),
    ] {
        let err = save_checkpoint(&dir, &model, opt.as_ref(), &state, &extra).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(extra[0].0) && msg.contains(wanted), "{msg}");
    }
    assert!(!dir.exists());
    assert_eq!(common::entry_names(tmp.path()), Vec::<String>::new());
}

#[test]
fn state_json_without_script_state_loads_as_null() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let (model, mut opt) = tiny(1);
    let state = state_at(3, opt.as_ref());
    save_checkpoint(&dir, &model, opt.as_ref(), &state, &[]).unwrap();
    let path = dir.join(STATE_FILE);
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(file["training"]["script_state"], state.script_state);
    file["training"]
        .as_object_mut()
        .unwrap()
        .remove("script_state");
    std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();

    verify_checkpoint(&dir).unwrap();
    let loaded = load_checkpoint(&dir, &model, opt.as_mut()).unwrap();
    assert_eq!(loaded.script_state, serde_json::Value::Null);
    assert_eq!(loaded.counters, state.counters);
}

/// Paths the store hands out sit inside its directory.
#[test]
fn checkpoint_paths_are_zero_padded_inside_the_store() {
    let store = CheckpointStore::new(PathBuf::from("/runs/a/checkpoints"), 4);
    assert_eq!(
        store.path_for(1234),
        PathBuf::from("/runs/a/checkpoints/step_000001234")
    );
    assert_eq!(store.keep_last(), 4);
}
