//! The run in scripts: the config, metrics logging (JSONL and TensorBoard),
//! progress bars, seeded random numbers, checkpoints and exact resume, and the
//! Ctrl-C step boundary.
//!
//! In a data-parallel run only rank 0 writes the run directory (metrics,
//! TensorBoard, checkpoints) and shows progress; the other ranks keep the
//! same bookkeeping silently, so every rank's script takes the same path.
//! The ranks agree at each step boundary whether Ctrl-C was pressed, so all
//! of them stop at the same one.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rhai::plugin::*;
use rhai::{Dynamic, Map, Position};
use serde_json::{json, Value};

use super::data_api::{DataPosition, Dataset};
use super::errors::{script_error, IntoScript, ScriptResult, INTERRUPTED};
use super::model_api::Model;
use super::session;
use super::train_api::{LrSchedule, Optimizer, SequenceSchedule};
use crate::audio::features::FeatureRecipe;
use crate::infer::load::FEATURES_FILE;
use crate::run::checkpoints::CheckpointStore;
use crate::run::metrics::{truncate_metrics, MetricsWriter};
use crate::run::tensorboard::EventWriter;
use crate::train::lr_schedule::{CosineWarmup, DecayUnit};
use crate::train::rng::RunRng;
use crate::train::state::{TrainingCounters, TrainingState};

/// The run directory's writers and checkpoint bookkeeping.
pub struct RunOutputs {
    /// The run directory.
    pub dir: PathBuf,
    /// metrics.jsonl (`None` on the ranks of a data-parallel run but rank 0).
    pub metrics: Option<MetricsWriter>,
    /// TensorBoard scalars (`None` on the ranks of a data-parallel run but rank 0).
    pub tensorboard: Option<EventWriter>,
    /// The checkpoints.
    pub checkpoints: CheckpointStore,
    /// Small files stored with every checkpoint (the config, the tokenizer).
    pub checkpoint_files: Vec<(String, Vec<u8>)>,
    /// The checkpoint to resume from, when resuming.
    pub resume_from: Option<PathBuf>,
    /// Recordings done at the last checkpoint.
    pub last_checkpoint_recordings: u64,
    /// The last checkpoint written or restored.
    pub last_checkpoint: Option<PathBuf>,
    /// Log calls so far (the step of records when no optimizer is tracked).
    pub log_calls: u64,
    /// Another run's records to compare each logged record with.
    pub comparison: Option<Arc<Mutex<Comparison>>>,
}

/// A record-by-record comparison of a run's metrics with another run's.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    original: Vec<Value>,
    /// Records compared so far.
    pub compared: usize,
    /// The first record that differed, described.
    pub first_divergence: Option<String>,
}

impl Comparison {
    /// A comparison against `original`'s records.
    pub fn new(original: Vec<Value>) -> Self {
        Comparison {
            original,
            compared: 0,
            first_divergence: None,
        }
    }

    /// Records of the original run.
    pub fn original_records(&self) -> usize {
        self.original.len()
    }

    /// Compares the next record; describes the first divergence.
    fn check(&mut self, record: &Value) {
        // Compare what the files hold: the record as written and read back
        // (JSON number parsing may round differently from the f64 in memory).
        let record = &serde_json::to_string(record)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .unwrap_or_else(|| record.clone());
        let index = self.compared;
        self.compared += 1;
        if self.first_divergence.is_some() {
            return;
        }
        let step = record.get("step").cloned().unwrap_or(Value::Null);
        let text = match self.original.get(index) {
            None => format!(
                "record {} (step {step}) is past the original's end",
                index + 1
            ),
            Some(want) if want == record => return,
            Some(want) => {
                let keys: Vec<String> = record
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, v)| want.get(k.as_str()) != Some(v))
                    .map(|(k, v)| {
                        format!(
                            "{k}: original {}, now {v}",
                            want.get(k.as_str()).unwrap_or(&Value::Null)
                        )
                    })
                    .collect();
                format!(
                    "record {} (step {step}) differs: {}",
                    index + 1,
                    keys.join("; ")
                )
            }
        };
        eprintln!("reproduce: first divergence: {text}");
        self.first_divergence = Some(text);
    }
}

/// The objects a checkpoint saves and a resume restores.
#[derive(Clone)]
pub struct Tracked {
    model: Model,
    opt: Optimizer,
    lr: Option<LrSchedule>,
    seq: Option<SequenceSchedule>,
    data: Option<Dataset>,
    state: Map,
}

const TRACKED_KEYS: [&str; 6] = ["model", "optimizer", "lr", "seq", "data", "state"];

fn tracked_from(map: &Map, what: &str) -> ScriptResult<Tracked> {
    for k in map.keys() {
        if !TRACKED_KEYS.contains(&k.as_str()) {
            return Err(script_error(format!(
                "{what}: unknown key `{k}` (known: {})",
                TRACKED_KEYS.join(", ")
            )));
        }
    }
    fn get<T: Clone + 'static>(
        map: &Map,
        key: &str,
        what: &str,
        ty: &str,
    ) -> ScriptResult<Option<T>> {
        match map.get(key) {
            None => Ok(None),
            Some(v) if v.is_unit() => Ok(None),
            Some(v) => v.clone().try_cast::<T>().map(Some).ok_or_else(|| {
                script_error(format!(
                    "{what}: `{key}` must be a {ty}, got {}",
                    v.type_name()
                ))
            }),
        }
    }
    let model: Model = get(map, "model", what, "Model")?
        .ok_or_else(|| script_error(format!("{what}: the map needs `model`")))?;
    let opt: Optimizer = get(map, "optimizer", what, "Optimizer")?
        .ok_or_else(|| script_error(format!("{what}: the map needs `optimizer`")))?;
    if !opt.lock().model.same(&model) {
        return Err(script_error(format!(
            "{what}: the optimizer belongs to another model"
        )));
    }
    Ok(Tracked {
        model,
        opt,
        lr: get(map, "lr", what, "LrSchedule")?,
        seq: get(map, "seq", what, "SequenceSchedule")?,
        data: get(map, "data", what, "Dataset")?,
        state: get(map, "state", what, "map")?.unwrap_or_default(),
    })
}

/// Saves a checkpoint of `t`; returns its directory.
fn save(t: &Tracked) -> ScriptResult<PathBuf> {
    let pos = t
        .data
        .as_ref()
        .map(|d| d.lock().pos.clone())
        .unwrap_or_default();
    save_at(t, pos)
}

/// Saves a checkpoint of `t` with the data position `pos`.
fn save_at(t: &Tracked, pos: DataPosition) -> ScriptResult<PathBuf> {
    let user: Value = rhai::serde::from_dynamic(&Dynamic::from_map(t.state.clone()))?;
    let lr_state = match &t.lr {
        Some(lr) => lr.lock().state(),
        None => CosineWarmup::new(0.0, 0.0, 0, 0, DecayUnit::Recordings)
            .script()?
            .state(),
    };
    let lead = session::is_lead();
    session::with(|s| {
        let rng = s.rng.state();
        let run = s
            .run
            .as_mut()
            .ok_or_else(|| script_error("checkpoint(): this run has no run directory"))?;
        let inner = t.opt.lock();
        if !lead {
            // Rank 0 writes the checkpoint; this rank keeps the bookkeeping.
            let dir = run.checkpoints.path_for(inner.opt.steps());
            run.last_checkpoint_recordings = pos.recordings_seen;
            run.last_checkpoint = Some(dir.clone());
            return Ok(dir);
        }
        let state = TrainingState {
            counters: TrainingCounters {
                optimizer_steps: inner.opt.steps(),
                recordings_seen: pos.recordings_seen,
                epoch: pos.epoch,
                position_in_epoch: pos.seen.len() as u64,
            },
            lr_schedule: lr_state,
            sequence_schedule: t.seq.as_ref().map(|s| s.lock().state()),
            rng,
            optimizer: inner.opt.name().to_string(),
            script_state: json!({ "data": pos, "user": user }),
        };
        let extra: Vec<(&str, &[u8])> = run
            .checkpoint_files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        let dir = run
            .checkpoints
            .save(
                inner.opt.steps(),
                t.model.encoder(),
                inner.opt.as_ref(),
                &state,
                &extra,
            )
            .script()?;
        run.last_checkpoint_recordings = pos.recordings_seen;
        run.last_checkpoint = Some(dir.clone());
        Ok(dir)
    })
}

/// Restores `t` from the checkpoint being resumed; returns the script's saved
/// state map.
fn load(t: &Tracked, from: &std::path::Path) -> ScriptResult<Map> {
    let state = {
        let mut inner = t.opt.lock();
        crate::train::state::load_checkpoint(from, t.model.encoder(), inner.opt.as_mut())
            .script()?
    };
    if let Some(lr) = &t.lr {
        lr.lock().load_state(state.lr_schedule.clone()).script()?;
    }
    match (&t.seq, &state.sequence_schedule) {
        (Some(seq), Some(s)) => seq.lock().load_state(s.clone()).script()?,
        (Some(_), None) => {
            return Err(script_error(
                "restore(): the checkpoint has no sequence schedule but the script passes `seq`",
            ))
        }
        _ => {}
    }
    let saved_pos = state
        .script_state
        .get("data")
        .cloned()
        .unwrap_or(Value::Null);
    if let Some(data) = &t.data {
        let pos: DataPosition = serde_json::from_value(saved_pos).map_err(|e| {
            script_error(format!(
                "restore(): bad data position in the checkpoint: {e}"
            ))
        })?;
        data.lock().pos = pos;
    }
    let user = state
        .script_state
        .get("user")
        .cloned()
        .unwrap_or(Value::Null);
    let user: Dynamic = rhai::serde::to_dynamic(&user)?;
    let steps = state.counters.optimizer_steps;
    let lead = session::is_lead();
    session::with(|s| {
        s.rng = RunRng::from_state(&state.rng).script()?;
        if let Some(run) = s.run.as_mut() {
            run.last_checkpoint_recordings = state.counters.recordings_seen;
            run.last_checkpoint = Some(from.to_path_buf());
            let path = run.dir.join("metrics.jsonl");
            if lead && path.exists() {
                // Records past the checkpoint are re-logged by the resumed run.
                truncate_metrics(&path, |r| {
                    r.get("step")
                        .and_then(Value::as_u64)
                        .is_none_or(|st| st <= steps)
                })
                .script()?;
                // The file was replaced: write to the new one.
                run.metrics = Some(MetricsWriter::open(&path).script()?);
            }
        }
        Ok(())
    })?;
    if lead {
        tracing::info!("resumed from {} (step {steps})", from.display());
    }
    Ok(user.try_cast::<Map>().unwrap_or_default())
}

/// The termination error of a run stopped by Ctrl-C.
fn interrupted() -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorTerminated(
        INTERRUPTED.into(),
        Position::NONE,
    ))
}

/// Records the feature recipe of a dataset the script opened (`source`, its
/// path) with the run's checkpoints, so inference computes the same
/// features. Every dataset of a run must have the same recipe.
pub fn record_feature_recipe(recipe: FeatureRecipe, source: &str) -> ScriptResult<()> {
    session::with(|s| {
        let Some(run) = s.run.as_mut() else {
            return Ok(());
        };
        let contents = json!({ "recipe": recipe.name() }).to_string().into_bytes();
        match run
            .checkpoint_files
            .iter()
            .find(|(n, _)| n == FEATURES_FILE)
        {
            None => run
                .checkpoint_files
                .push((FEATURES_FILE.to_string(), contents)),
            Some((_, existing)) if *existing == contents => {}
            Some((_, existing)) => {
                let earlier = serde_json::from_slice::<Value>(existing)
                    .ok()
                    .and_then(|v| v["recipe"].as_str().map(String::from))
                    .unwrap_or_default();
                return Err(script_error(format!(
                    "dataset `{source}` has {} features but the run's first dataset has \
                     {earlier}: prepare both the same way (`lcasr prepare` with or without \
                     --log-mel)",
                    recipe.name()
                )));
            }
        }
        Ok(())
    })
}

/// Called after every optimizer step: the state is intact again, and the
/// tracked dataset's position is remembered for a save after an error.
pub fn after_step() -> ScriptResult<()> {
    let data = session::with(|s| {
        s.since_step = false;
        Ok(s.tracked.as_ref().and_then(|t| t.data.clone()))
    })?;
    let pos = data.map(|d| d.lock().pos.clone());
    session::with(|s| {
        s.step_position = pos;
        Ok(())
    })
}

/// After a script error: when the tracked objects are intact (nothing but
/// bookkeeping happened since the last optimizer step and no gradients are
/// pending), saves them as they were after that step and returns the
/// checkpoint; otherwise (or without a run directory, or on a data-parallel
/// rank other than 0) returns None.
pub fn save_after_error() -> Option<PathBuf> {
    if !session::is_lead() {
        return None;
    }
    let (tracked, intact, pos) = session::with(|s| {
        let intact = !s.since_step && s.grads.get_ids().next().is_none() && s.run.is_some();
        Ok((s.tracked.clone(), intact, s.step_position.clone()))
    })
    .ok()?;
    let t = tracked?;
    if !intact {
        return None;
    }
    let pos = match (pos, &t.data) {
        (Some(p), _) => p,
        (None, Some(d)) => d.lock().pos.clone(),
        (None, None) => DataPosition::default(),
    };
    match save_at(&t, pos) {
        Ok(dir) => Some(dir),
        Err(e) => {
            tracing::warn!("could not save a checkpoint after the error: {e}");
            None
        }
    }
}

/// Called between optimizer steps (before the next chunk or batch is
/// handed out): after Ctrl-C, saves the tracked objects and stops the run.
/// The ranks of a data-parallel run decide together (any rank that saw
/// Ctrl-C stops them all, none while any holds gradients).
pub fn step_boundary() -> ScriptResult<()> {
    let comm = session::comm();
    if comm.is_none() && session::interrupts() == 0 {
        return Ok(());
    }
    let (tracked, pending) =
        session::with(|s| Ok((s.tracked.clone(), s.grads.get_ids().next().is_some())))?;
    let pending = match comm {
        None => pending,
        Some(comm) => {
            let mut votes = [
                f64::from(u8::from(session::interrupts() > 0)),
                f64::from(u8::from(pending)),
            ];
            comm.all_reduce_sum_f64(&mut votes)
                .map_err(|e| script_error(format!("cannot agree on Ctrl-C: {e:#}")))?;
            if votes[0] == 0.0 {
                return Ok(());
            }
            votes[1] > 0.0
        }
    };
    let Some(t) = tracked else {
        return Err(interrupted());
    };
    if pending {
        // Inside a gradient-accumulation group: stop at the group's end.
        return Ok(());
    }
    let dir = save(&t)?;
    if session::is_lead() {
        tracing::warn!("stopped by Ctrl-C; checkpoint saved to {}", dir.display());
    }
    Err(interrupted())
}

thread_local! {
    /// When the thread's first script call to `clock()` happened.
    static START: Instant = Instant::now();
}

/// A progress bar in a script.
#[derive(Clone)]
pub struct Progress(Arc<Mutex<ProgressInner>>);

struct ProgressInner {
    bar: ProgressBar,
    plain: bool,
    total: u64,
    last_line: Option<Instant>,
}

fn to_json(value: &Dynamic) -> ScriptResult<Value> {
    rhai::serde::from_dynamic(value)
}

/// Run functions.
#[export_module]
pub mod run_module {
    use super::*;

    /// The run's validated config as a map (every default filled in).
    /// Reading a key that does not exist is an error.
    #[rhai_fn(return_raw)]
    pub fn config() -> Result<Map, Box<EvalAltResult>> {
        let cfg = session::with(|s| {
            s.config
                .clone()
                .ok_or_else(|| script_error("config(): this run has no config (pass --config)"))
        })?;
        let d = rhai::serde::to_dynamic(&cfg)?;
        d.try_cast::<Map>()
            .ok_or_else(|| script_error("the config is not a map"))
    }

    /// The run directory, or `()` when the run records none.
    #[rhai_fn(return_raw)]
    pub fn run_dir() -> Result<Dynamic, Box<EvalAltResult>> {
        session::with(|s| {
            Ok(s.run
                .as_ref()
                .map_or(Dynamic::UNIT, |r| r.dir.display().to_string().into()))
        })
    }

    /// True when this run resumes a stopped one (`--resume`).
    #[rhai_fn(return_raw)]
    pub fn resuming() -> Result<bool, Box<EvalAltResult>> {
        session::with(|s| Ok(s.run.as_ref().is_some_and(|r| r.resume_from.is_some())))
    }

    /// Names the objects checkpoints save: `#{ model, optimizer, lr, seq,
    /// data, state }` (`lr`, `seq`, `data`, `state` optional; `state` is a map
    /// of the script's own values). When resuming, restores them all from the
    /// checkpoint (weights, optimizer, schedules, data position, random
    /// streams) and returns the saved `state`; otherwise returns `()`.
    #[rhai_fn(return_raw)]
    pub fn restore(objects: Map) -> Result<Dynamic, Box<EvalAltResult>> {
        let t = tracked_from(&objects, "restore()")?;
        let from = session::with(|s| {
            s.tracked = Some(t.clone());
            Ok(s.run.as_ref().and_then(|r| r.resume_from.clone()))
        })?;
        match from {
            None => Ok(Dynamic::UNIT),
            Some(dir) => Ok(Dynamic::from_map(load(&t, &dir)?)),
        }
    }

    /// Names the objects (and the script's `state` map) that Ctrl-C saves,
    /// without writing a checkpoint: call it whenever `state` changes.
    #[rhai_fn(return_raw)]
    pub fn track(objects: Map) -> Result<(), Box<EvalAltResult>> {
        let t = tracked_from(&objects, "track()")?;
        session::with(|s| {
            s.tracked = Some(t);
            Ok(())
        })
    }

    /// Saves a checkpoint of `#{ model, optimizer, lr, seq, data, state }`
    /// into the run directory (atomically; older ones beyond the kept number
    /// are removed) and returns its path.
    #[rhai_fn(return_raw)]
    pub fn checkpoint(objects: Map) -> Result<String, Box<EvalAltResult>> {
        let t = tracked_from(&objects, "checkpoint()")?;
        session::with(|s| {
            s.tracked = Some(t.clone());
            Ok(())
        })?;
        save(&t).map(|p| p.display().to_string())
    }

    /// Recordings finished since the last checkpoint (or the run's start).
    #[rhai_fn(return_raw)]
    pub fn recordings_since_checkpoint(data: Dataset) -> Result<i64, Box<EvalAltResult>> {
        let seen = data.lock().pos.recordings_seen;
        session::with(|s| {
            let last = s.run.as_ref().map_or(0, |r| r.last_checkpoint_recordings);
            Ok(seen.saturating_sub(last) as i64)
        })
    }

    /// Appends a record to metrics.jsonl and its numbers to TensorBoard. The
    /// record gets `step` (optimizer steps of the tracked optimizer) unless it
    /// has one. In a data-parallel run only rank 0 writes.
    #[rhai_fn(return_raw)]
    pub fn log(record: Map) -> Result<(), Box<EvalAltResult>> {
        let mut value = to_json(&Dynamic::from_map(record))?;
        if !session::is_lead() {
            return Ok(());
        }
        let steps = session::with(|s| Ok(s.tracked.as_ref().map(|t| t.opt.lock().opt.steps())))?;
        session::with(|s| {
            let Some(run) = s.run.as_mut() else {
                tracing::info!("{value}");
                return Ok(());
            };
            run.log_calls += 1;
            let obj = value
                .as_object_mut()
                .expect("a map serialises to an object");
            let step = match obj.get("step").and_then(Value::as_i64) {
                Some(st) => st,
                None => {
                    let st = steps.unwrap_or(run.log_calls) as i64;
                    obj.insert("step".into(), json!(st));
                    st
                }
            };
            let prefix = obj
                .get("split")
                .and_then(Value::as_str)
                .map(|e| format!("{e}/"));
            for (k, v) in obj.iter() {
                if k == "step" {
                    continue;
                }
                if let Some(x) = v.as_f64() {
                    let tag = match &prefix {
                        Some(p) => format!("{p}{k}"),
                        None => k.clone(),
                    };
                    if let Some(tb) = run.tensorboard.as_mut() {
                        tb.scalar(&tag, step, x as f32).map_err(|e| {
                            script_error(format!("cannot write TensorBoard events: {e}"))
                        })?;
                    }
                }
            }
            if let Some(m) = run.metrics.as_mut() {
                m.write(&value).script()?;
            }
            if let Some(c) = &run.comparison {
                c.lock().unwrap_or_else(|e| e.into_inner()).check(&value);
            }
            Ok(())
        })
    }

    /// A uniform random float in [0, 1) from the run's seeded `script` stream.
    #[rhai_fn(return_raw)]
    pub fn random() -> Result<f64, Box<EvalAltResult>> {
        session::with(|s| {
            s.since_step = true;
            Ok(s.rng.stream("script").uniform())
        })
    }

    /// The script argument `name` (`--set name=value` on the command line),
    /// or `default` when it was not given. The value is read as the type of
    /// `default` (int, float, bool or string).
    #[rhai_fn(name = "arg", return_raw)]
    pub fn arg_or(name: &str, default: Dynamic) -> Result<Dynamic, Box<EvalAltResult>> {
        let given = session::with(|s| {
            s.args_read.insert(name.to_string());
            Ok(s.args.get(name).cloned())
        })?;
        let Some(text) = given else {
            return Ok(default);
        };
        let bad = |ty: &str| {
            script_error(format!(
                "argument `{name}`: `{text}` is not {ty} (--set {name}=...)"
            ))
        };
        if default.is_int() {
            text.parse::<i64>()
                .map(Dynamic::from_int)
                .map_err(|_| bad("an int"))
        } else if default.is_float() {
            text.parse::<f64>()
                .map(Dynamic::from_float)
                .map_err(|_| bad("a number"))
        } else if default.is_bool() {
            text.parse::<bool>()
                .map(Dynamic::from_bool)
                .map_err(|_| bad("true or false"))
        } else {
            Ok(text.into())
        }
    }

    /// The script argument `name` as a string; an error naming the missing
    /// `--set name=...` when it was not given.
    #[rhai_fn(name = "arg", return_raw)]
    pub fn arg_required(name: &str) -> Result<String, Box<EvalAltResult>> {
        session::with(|s| {
            s.args_read.insert(name.to_string());
            s.args.get(name).cloned().ok_or_else(|| {
                script_error(format!(
                    "this script needs the argument `{name}`: pass --set {name}=VALUE"
                ))
            })
        })
    }

    /// The run's master seed.
    #[rhai_fn(return_raw)]
    pub fn seed() -> Result<i64, Box<EvalAltResult>> {
        session::with(|s| Ok(s.rng.master_seed() as i64))
    }

    /// True once Ctrl-C was pressed (scripts without checkpoints can stop
    /// cleanly by checking it).
    pub fn interrupted() -> bool {
        session::interrupts() > 0
    }

    /// A progress bar over `total` units named `unit` (e.g. "recordings").
    /// On a terminal it draws in place; otherwise its messages are printed
    /// as plain lines at most every 10 seconds. In a data-parallel run only
    /// rank 0 shows it.
    pub fn progress(total: i64, unit: &str) -> Progress {
        let total = total.max(0) as u64;
        let lead = session::is_lead();
        let plain = lead && !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = if plain || !lead {
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden())
        } else {
            ProgressBar::new(total)
        };
        let template = format!(
            "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} (eta {{eta}}) {{msg}}"
        );
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress(Arc::new(Mutex::new(ProgressInner {
            bar,
            plain,
            total,
            last_line: None,
        })))
    }

    /// Moves the bar to `position`.
    pub fn set(p: &mut Progress, position: i64) {
        p.0.lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar
            .set_position(position.max(0) as u64);
    }

    /// Sets the text after the bar.
    pub fn message(p: &mut Progress, text: &str) {
        let mut inner = p.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.bar.set_message(text.to_string());
        if inner.plain {
            let due = inner
                .last_line
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
            if due {
                inner.last_line = Some(Instant::now());
                eprintln!("[{}/{}] {text}", inner.bar.position(), inner.total);
            }
        }
    }

    /// Finishes the bar, leaving it on screen.
    pub fn finish(p: &mut Progress) {
        p.0.lock().unwrap_or_else(|e| e.into_inner()).bar.finish();
    }

    /// Wall-clock seconds since the thread's first `clock()` call: for
    /// messages such as throughput, never for anything that must reproduce.
    pub fn clock() -> f64 {
        START.with(|s| s.elapsed().as_secs_f64())
    }

    /// The device models are built and run on: `cpu` or `cuda:N`
    /// (`training.device`, `--device`).
    pub fn device() -> String {
        let dev = session::device();
        match dev.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
            candle_core::DeviceLocation::Cpu => "cpu".into(),
        }
    }

    /// Peak memory in bytes since the process started or since the last
    /// `reset_peak_memory()`: on a CUDA device the most GPU memory tensors
    /// held at once, on the CPU the process's peak resident memory (Linux;
    /// `()` elsewhere). In a data-parallel CPU run the ranks share one
    /// process and one peak.
    pub fn peak_memory() -> Dynamic {
        let dev = session::device();
        let bytes = if dev.is_cpu() {
            crate::runtime::peak::peak()
        } else {
            crate::runtime::peak::device_peak(&dev)
        };
        bytes.map_or(Dynamic::UNIT, |b| Dynamic::from(b as i64))
    }

    /// Starts a new `peak_memory()` from the memory in use now; false where
    /// the system does not allow it.
    pub fn reset_peak_memory() -> bool {
        let dev = session::device();
        if dev.is_cpu() {
            crate::runtime::peak::reset_peak()
        } else {
            crate::runtime::peak::reset_device_peak(&dev)
        }
    }

    /// Bytes as text: `1.25 GiB`, or MiB below one GiB.
    #[rhai_fn(name = "fmt_bytes")]
    pub fn fmt_bytes(bytes: i64) -> String {
        crate::model::memory::format_bytes(bytes.max(0) as u64)
    }

    /// `x` with `decimals` digits after the point (e.g. for messages).
    pub fn fmt(x: f64, decimals: i64) -> String {
        format!("{x:.*}", decimals.clamp(0, 17) as usize)
    }

    /// An int as a string (so `fmt` works on counts too).
    #[rhai_fn(name = "fmt")]
    pub fn fmt_int(x: i64, _decimals: i64) -> String {
        x.to_string()
    }

    /// Prints a line above the progress bars (in a data-parallel run, on rank 0 only).
    pub fn say(text: &str) {
        if session::is_lead() {
            eprintln!("{text}");
        }
    }

    /// Ctrl-C presses so far.
    #[rhai_fn(name = "interrupt_count")]
    pub fn interrupt_count() -> i64 {
        session::interrupts() as i64
    }
}
