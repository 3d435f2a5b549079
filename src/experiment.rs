//! Running an experiment script against a config: load and validate the
//! config, compile the script with its imports, set up (or reopen) the run
//! directory with everything needed to reproduce the run, install the Ctrl-C
//! handler, and run the script.
//!
//! With several ranks (`--ranks N`) the script runs data-parallel: N copies,
//! one thread each with its own session, joined by an in-process
//! [`Collective`] (`crate::parallel`), or one process each
//! (`--processes`, `crate::rank_processes`, exchanging over TCP). A GPU build
//! maps `--gpus N` onto the processes, with rank r on GPU r and NCCL as the
//! collective.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;

use crate::config::{self, Config, LoadOptions, Seed};
use crate::hash::sha256_hex;
use crate::parallel::driver::refuse_unsynchronised_norm;
use crate::parallel::threads::{in_own_pool, run_on_threads_with, share_cores};
use crate::parallel::{Collective, InProcessGroup};
use crate::rank_processes::run_rank_processes;
use crate::run::metrics::{read_metrics, MetricsWriter};
use crate::run::run_dir::{
    compare_records, git_commit, now_utc, ResumeRecord, RunDir, RunRecord, StartMode,
};
use crate::run::tensorboard::EventWriter;
use crate::runtime::device::open_device;
pub use crate::script::run_api::Comparison;
use crate::script::run_api::RunOutputs;
use crate::script::{compile, CompileOptions, ScriptFailure, SessionSetup};

/// What to run.
pub struct Experiment {
    /// The entry script.
    pub script: PathBuf,
    /// The YAML config.
    pub config: PathBuf,
    /// `key.path=value` overrides.
    pub overrides: Vec<String>,
    /// Unknown config keys are errors.
    pub strict: bool,
    /// The run directory (default: the config's `checkpointing.dir`).
    pub run_dir: Option<PathBuf>,
    /// New, forced or resumed run.
    pub mode: StartMode,
    /// The command line, recorded in the run directory.
    pub command_line: Vec<String>,
    /// Extra directories scripts may import from (the entry script's own
    /// directory is always allowed).
    pub import_roots: Vec<PathBuf>,
    /// The run's seed, overriding the config's (`lcasr reproduce` uses the
    /// recorded one).
    pub seed: Option<u64>,
    /// Another run's metrics.jsonl to compare every logged record with.
    pub compare_with: Option<PathBuf>,
    /// Script arguments (`--set name=value`), read with `arg()`.
    pub script_args: BTreeMap<String, String>,
    /// Data-parallel ranks, at least 1; `None`: 1 for a new run,
    /// the recorded count when resuming.
    pub ranks: Option<usize>,
    /// Rank `r` trains on GPU `r`, each rank in its own process, and the
    /// ranks exchange over NCCL (`--gpus N`; a build with the `nccl`
    /// feature) instead of running as CPU threads on `training.device`.
    pub gpus: bool,
    /// Each rank runs in its own process (rank 0 in this one) instead of a
    /// thread, exchanging over loopback TCP (`--processes`; always with
    /// `gpus`). Ranks compute with their share of the cores either way, and
    /// the results are the same bits.
    pub processes: bool,
}

/// How an experiment ended.
#[derive(Debug)]
pub enum Outcome {
    /// The script ran to its end.
    Finished {
        /// The run directory.
        run_dir: PathBuf,
        /// How the logged records compared with `compare_with`'s.
        comparison: Option<Comparison>,
    },
    /// Ctrl-C stopped it; a checkpoint was saved when the script tracks one.
    Interrupted {
        /// The run directory.
        run_dir: PathBuf,
    },
}

/// Why an experiment could not run or failed.
#[derive(Debug)]
pub enum ExperimentError {
    /// The config is invalid (exit status 2).
    Config(config::ConfigError),
    /// The script failed: the message is formatted with file and line.
    Script(String),
    /// Anything else (files, run directory).
    Other(anyhow::Error),
}

impl std::fmt::Display for ExperimentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExperimentError::Config(e) => write!(f, "error: {e}"),
            ExperimentError::Script(m) => f.write_str(m.trim_end()),
            ExperimentError::Other(e) => write!(f, "error: {e:#}"),
        }
    }
}

impl From<anyhow::Error> for ExperimentError {
    fn from(e: anyhow::Error) -> Self {
        ExperimentError::Other(e)
    }
}

/// The seed a run uses: the config's, or one from the clock (recorded in
/// the run directory, so the run can still be reproduced).
fn resolve_seed(cfg: &Config) -> u64 {
    match cfg.training.random_seed {
        Seed::Fixed(v) => v,
        Seed::Random => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}

fn file_hash(path: &Path) -> Option<String> {
    std::fs::read(path).ok().map(|b| sha256_hex(&b))
}

/// Installs the Ctrl-C handler (once per process) and returns the counter it
/// increments.
fn interrupt_counter() -> Arc<AtomicUsize> {
    static COUNTER: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();
    Arc::clone(COUNTER.get_or_init(|| {
        let counter = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&counter);
        let installed = ctrlc::set_handler(move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 1 {
                eprintln!(
                    "\nCtrl-C: stopping at the next step boundary and saving a checkpoint \
                     (press Ctrl-C again to stop at once)."
                );
            } else {
                eprintln!("\nCtrl-C again: stopping now.");
            }
        });
        if let Err(e) = installed {
            tracing::warn!("cannot install the Ctrl-C handler: {e}");
        }
        counter
    }))
}

/// Runs an experiment to its end (or until Ctrl-C).
pub fn run(exp: &Experiment) -> Result<Outcome, ExperimentError> {
    let loaded = config::load_file(
        &exp.config,
        &LoadOptions {
            strict: exp.strict,
            overrides: exp.overrides.clone(),
        },
    )
    .map_err(ExperimentError::Config)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let cfg = loaded.config;
    if exp.ranks == Some(0) {
        return Err(anyhow!("--ranks must be at least 1").into());
    }
    if exp.ranks.is_some_and(|n| n > 1) {
        refuse_unsynchronised_norm(&cfg)?;
    }
    // Opened before anything is written, so a missing GPU costs no run directory.
    let ranks = exp.ranks.unwrap_or(1);
    let devices = rank_devices(&cfg.training.device, ranks, exp.gpus)?;
    let interrupts = interrupt_counter();
    let compile_opts = CompileOptions {
        import_roots: exp.import_roots.clone(),
        max_operations: 0,
        interrupts: Arc::clone(&interrupts),
    };
    let compiled =
        compile(&exp.script, &compile_opts).map_err(|f| ExperimentError::Script(f.message))?;

    let root = exp
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cfg.checkpointing.dir));
    let dir = RunDir::start(&root, exp.mode)?;
    let yaml = cfg.to_yaml();
    let tokenizer = cfg.data.tokenizer.as_ref().map(PathBuf::from);
    let scripts = script_names(&compiled.name, &compiled.sources);
    let mut record = RunRecord {
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git_commit(Path::new(".")),
        command_line: exp.command_line.clone(),
        started_at: now_utc(),
        seed: exp.seed.unwrap_or_else(|| resolve_seed(&cfg)),
        config_sha256: cfg.canonical_hash(),
        scripts: scripts
            .iter()
            .map(|(name, text)| (name.clone(), sha256_hex(text.as_bytes())))
            .collect(),
        tokenizer_sha256: tokenizer.as_deref().and_then(file_hash),
        data_manifest_sha256: file_hash(Path::new(&cfg.data.path)),
        entry_script: scripts
            .iter()
            .map(|(name, _)| name.clone())
            .find(|name| Path::new(&compiled.name).file_name() == Some(name.as_ref())),
        script_args: exp.script_args.clone(),
        ranks: exp.ranks.unwrap_or(1),
        resumes: Vec::new(),
    };
    let store = dir.checkpoints(cfg.checkpointing.keep_last as usize);
    let resume_from = if exp.mode == StartMode::Resume {
        let recorded = dir.read_record()?;
        record.ranks = exp.ranks.unwrap_or(recorded.ranks);
        if record.ranks > 1 {
            refuse_unsynchronised_norm(&cfg)?;
        }
        for mismatch in compare_records(&recorded, &record) {
            eprintln!("warning: resuming with a change: {mismatch}");
        }
        record.seed = recorded.seed;
        let from = store.latest_valid()?.ok_or_else(|| {
            anyhow!(
                "{} has no valid checkpoint to resume from; start it again with --force",
                root.display()
            )
        })?;
        dir.append_resume(ResumeRecord {
            at: now_utc(),
            command_line: exp.command_line.clone(),
            from_checkpoint: from.display().to_string(),
        })?;
        eprintln!("Resuming {} from {}", root.display(), from.display());
        Some(from)
    } else {
        dir.write_config(&yaml)?;
        for (name, text) in &scripts {
            dir.write_script(name, text)?;
        }
        dir.write_record(&record)?;
        None
    };

    let mut checkpoint_files = vec![("config.yaml".to_string(), yaml.into_bytes())];
    if let Some(tok) = &tokenizer {
        let bytes = std::fs::read(tok)
            .with_context(|| format!("cannot read the tokenizer {}", tok.display()))?;
        let name = match tok.extension().and_then(|e| e.to_str()) {
            Some("model") => "tokenizer.model",
            _ => "tokenizer.json",
        };
        checkpoint_files.push((name.to_string(), bytes));
    }
    let outputs = RunOutputs {
        dir: dir.root().to_path_buf(),
        metrics: Some(MetricsWriter::open(&dir.metrics_path())?),
        tensorboard: Some(
            EventWriter::create(&dir.tensorboard_dir())
                .with_context(|| format!("cannot create {}", dir.tensorboard_dir().display()))?,
        ),
        checkpoints: store,
        checkpoint_files,
        resume_from,
        last_checkpoint_recordings: 0,
        last_checkpoint: None,
        log_calls: 0,
        comparison: match &exp.compare_with {
            None => None,
            Some(path) => Some(Arc::new(Mutex::new(Comparison::new(read_metrics(path)?)))),
        },
    };
    let comparison = outputs.comparison.clone();
    // The other ranks keep rank 0's bookkeeping but write nothing.
    let silent_outputs = |outputs: &RunOutputs| RunOutputs {
        dir: outputs.dir.clone(),
        metrics: None,
        tensorboard: None,
        checkpoints: outputs.checkpoints.clone(),
        checkpoint_files: Vec::new(),
        resume_from: outputs.resume_from.clone(),
        last_checkpoint_recordings: 0,
        last_checkpoint: None,
        log_calls: 0,
        comparison: None,
    };
    let others: Vec<RunOutputs> = (1..record.ranks)
        .map(|_| silent_outputs(&outputs))
        .collect();
    // No maintained Rust client for W&B exists: the TensorBoard events carry
    // the same scalars, and wandb imports them (said once the run ends).
    let wandb_hint = cfg.wandb.enabled.then(|| {
        let project = if cfg.wandb.project_name.is_empty() {
            String::new()
        } else {
            format!(" --project {}", cfg.wandb.project_name)
        };
        format!(
            "wandb.use is set: the metrics are in TensorBoard events; upload them with\n  \
             wandb sync --sync-tensorboard{project} {}",
            dir.tensorboard_dir().display()
        )
    });
    let setups: Vec<SessionSetup> = std::iter::once(outputs)
        .chain(others)
        .zip(devices.iter().cycle())
        .map(|(run, device)| SessionSetup {
            seed: record.seed,
            config: Some(cfg.clone()),
            base_dir: PathBuf::from("."),
            run: Some(run),
            args: exp.script_args.clone(),
            device: device.clone(),
        })
        .collect();
    let run_dir = dir.root().to_path_buf();
    // `--gpus` always runs ranks as processes: one GPU still runs NCCL.
    let result = if exp.gpus || (exp.processes && setups.len() > 1) {
        drop(compiled);
        let names: Vec<String> = (0..setups.len())
            .map(|r| {
                if exp.gpus {
                    format!("cuda:{r}")
                } else {
                    cfg.training.device.clone()
                }
            })
            .collect();
        run_rank_processes(&exp.script, &compile_opts, setups, &names, exp.gpus)?
    } else if setups.len() == 1 {
        let setup = setups.into_iter().next().expect("one rank");
        compiled.run(setup)
    } else {
        drop(compiled);
        let comms = InProcessGroup::with_ranks(setups.len())?
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Collective>)
            .collect();
        run_ranks(&exp.script, &compile_opts, setups, comms)?
    };
    if let (Some(hint), true) = (
        &wandb_hint,
        result.as_ref().map_or_else(|f| f.interrupted, |_| true),
    ) {
        eprintln!("{hint}");
    }
    match result {
        Ok(()) => Ok(Outcome::Finished {
            run_dir,
            comparison: comparison.map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        }),
        Err(f) if f.interrupted => Ok(Outcome::Interrupted { run_dir }),
        Err(f) => Err(ExperimentError::Script(f.message)),
    }
}

/// Runs the script as one rank per setup (rank 0 first), each on its own
/// thread with its own compiled copy and session, joined by an in-process
/// group. Every rank makes the same collective calls; the first rank that
/// fails ends the run (the others then fail with "rank r left"), and its
/// failure is the one reported. A run every rank stopped by Ctrl-C, or whose
/// first failure was Ctrl-C, is interrupted.
fn run_ranks(
    script: &Path,
    opts: &CompileOptions,
    setups: Vec<SessionSetup>,
    comms: Vec<Arc<dyn Collective>>,
) -> Result<Result<(), ScriptFailure>> {
    let world = setups.len();
    // Each rank's thread takes its own setup, and computes in a pool of its
    // own with its share of the cores.
    let setups: Vec<Mutex<Option<SessionSetup>>> =
        setups.into_iter().map(|s| Mutex::new(Some(s))).collect();
    let threads = share_cores(world);
    let ran = run_on_threads_with(comms, |comm| {
        let setup = setups[comm.rank()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("each rank's setup is taken once");
        in_own_pool(threads, || {
            compile(script, opts).and_then(|c| c.run_in_group(setup, Some(comm)))
        })
    })?;
    let mut failures = Vec::new();
    for (rank, outcome) in ran.results.into_iter().enumerate() {
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(f)) => failures.push((rank, f)),
            Err(what) => bail!("data-parallel rank {rank} of {world} panicked: {what}"),
        }
    }
    Ok(first_failure(world, failures, ran.first_failure))
}

/// The outcome of a data-parallel run from its ranks' `failures`: the
/// failure of rank `first` (the first that failed; the others usually failed
/// because it left), else the first listed, else success. An interrupted
/// run stays interrupted; other failures name their rank.
pub(crate) fn first_failure(
    world: usize,
    mut failures: Vec<(usize, ScriptFailure)>,
    first: Option<usize>,
) -> Result<(), ScriptFailure> {
    let index = first.and_then(|r| failures.iter().position(|(rank, _)| *rank == r));
    let Some(index) = index.or((!failures.is_empty()).then_some(0)) else {
        return Ok(());
    };
    let (rank, failure) = failures.swap_remove(index);
    if failure.interrupted {
        return Err(failure);
    }
    Err(ScriptFailure {
        message: format!(
            "data-parallel rank {rank} of {world} failed:\n{}",
            failure.message
        ),
        interrupted: false,
    })
}

/// The devices this process opens for a run of `ranks` ranks: with `gpus`,
/// GPU 0 for rank 0 (each worker process opens its own GPU; the machine must
/// have one per rank); otherwise `training.device` (`configured`) for every
/// rank, which must be the CPU when there are several (CPU threads or
/// processes).
fn rank_devices(configured: &str, ranks: usize, gpus: bool) -> Result<Vec<Device>> {
    if !gpus {
        let device = open_device(configured).map_err(|e| anyhow!("training.device: {e:#}"))?;
        if !device.is_cpu() && ranks > 1 {
            bail!(
                "--ranks runs data-parallel ranks on the CPU (threads, or processes with \
                 --processes); to train on several GPUs use --gpus N (a build with \
                 `--features nccl`, docs/gpu.md)"
            );
        }
        return Ok(vec![device]);
    }
    if !cfg!(feature = "nccl") {
        bail!(
            "--gpus needs a build with `--features nccl` (docs/gpu.md); this build trains on \
             one device (--device) or on CPU threads (--ranks)"
        );
    }
    // Each rank's process opens its own GPU; here only GPU 0 (rank 0's),
    // after checking that every rank has one.
    let count = crate::runtime::device::cuda_device_count()?;
    if count < ranks {
        bail!("--gpus {ranks}: this machine has {count} GPU(s)");
    }
    let device = open_device("cuda:0").map_err(|e| anyhow!("--gpus {ranks}: GPU 0: {e:#}"))?;
    Ok(vec![device])
}

/// The scripts of a run under the names they get in `scripts/` of the run
/// directory: the entry script by its file name, imported files by their
/// path relative to the entry script's directory (or their file name).
fn script_names(
    main: &str,
    sources: &std::collections::BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let main_path = Path::new(main);
    let base = main_path
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .unwrap_or_else(|| PathBuf::from("."));
    sources
        .iter()
        .map(|(name, text)| {
            let p = Path::new(name);
            let rel = if name == main {
                PathBuf::from(p.file_name().unwrap_or(p.as_os_str()))
            } else {
                p.strip_prefix(&base)
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|_| PathBuf::from(p.file_name().unwrap_or(p.as_os_str())))
            };
            (rel.display().to_string(), text.clone())
        })
        .collect()
}

/// What `lcasr reproduce` found.
#[derive(Debug)]
pub struct Reproduction {
    /// Differences between the recorded hashes and the files now (config,
    /// scripts, tokenizer, data), stated before running.
    pub mismatches: Vec<String>,
    /// The new run directory.
    pub run_dir: PathBuf,
    /// How its records compared with the original's (None if stopped by Ctrl-C).
    pub comparison: Option<Comparison>,
}

/// Re-runs the run in `original` from its recorded scripts, config and seed
/// into `into` (default: `<original>-reproduce`), stating first where the
/// recorded hashes no longer match the files, and comparing every logged
/// record with the original's as it goes.
pub fn reproduce(
    original: &Path,
    into: Option<PathBuf>,
    mode: StartMode,
    command_line: Vec<String>,
    on_mismatch: &dyn Fn(&str),
) -> Result<Reproduction, ExperimentError> {
    let dir = RunDir::open(original)?;
    let recorded = dir.read_record()?;
    let entry = recorded.entry_script.clone().ok_or_else(|| {
        anyhow!(
            "{}: manifest.json does not name the entry script (recorded by an older lcasr)",
            original.display()
        )
    })?;
    let config_path = dir.config_path();
    let cfg = config::load_file(&config_path, &LoadOptions::default())
        .map_err(ExperimentError::Config)?
        .config;
    let scripts_dir = dir.scripts_dir();
    let mut scripts = std::collections::BTreeMap::new();
    for name in recorded.scripts.keys() {
        if let Some(h) = file_hash(&scripts_dir.join(name)) {
            scripts.insert(name.clone(), h);
        }
    }
    let current = RunRecord {
        config_sha256: cfg.canonical_hash(),
        scripts,
        tokenizer_sha256: cfg
            .data
            .tokenizer
            .as_deref()
            .map(Path::new)
            .and_then(file_hash),
        data_manifest_sha256: file_hash(Path::new(&cfg.data.path)),
        ..recorded.clone()
    };
    let mismatches = compare_records(&recorded, &current);
    for m in &mismatches {
        on_mismatch(m);
    }
    let run_dir = into.unwrap_or_else(|| {
        let mut name = original.as_os_str().to_os_string();
        name.push("-reproduce");
        PathBuf::from(name)
    });
    let exp = Experiment {
        script: scripts_dir.join(&entry),
        config: config_path,
        overrides: Vec::new(),
        strict: false,
        run_dir: Some(run_dir.clone()),
        mode,
        command_line,
        import_roots: vec![scripts_dir],
        seed: Some(recorded.seed),
        compare_with: Some(dir.metrics_path()),
        script_args: recorded.script_args.clone(),
        ranks: Some(recorded.ranks),
        gpus: false,
        processes: false,
    };
    let comparison = match run(&exp)? {
        Outcome::Finished { comparison, .. } => comparison,
        Outcome::Interrupted { .. } => None,
    };
    Ok(Reproduction {
        mismatches,
        run_dir,
        comparison,
    })
}
