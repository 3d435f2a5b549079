//! An experiment's data-parallel ranks as processes (`lcasr train
//! --processes`, and `--gpus N`): rank 0 runs in the launching process with
//! the run directory, ranks 1..N each in a worker process
//! (`crate::parallel::processes`) that receives a [`RankSpec`] (everything
//! rank 0 resolved: config, seed, script, device, where to resume from) and
//! writes nothing. The ranks exchange over loopback TCP
//! (`crate::parallel::tcp`, the same sums in the same order as threads, so a
//! run gives the same bits either way) or, with `--gpus`, over NCCL. Each
//! rank computes with its share of the cores, as thread ranks do
//! (`crate::parallel::threads::share_cores`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::parallel::processes::{WorkerReport, Workers};
use crate::parallel::tcp::{Rendezvous, TcpMember};
use crate::parallel::threads::{run_on_threads_with, share_cores};
use crate::parallel::{Collective, RankLeft};
use crate::run::checkpoints::CheckpointStore;
use crate::runtime::device::open_device;
use crate::script::run_api::RunOutputs;
use crate::script::{compile, CompileOptions, ScriptFailure, SessionSetup};

/// How long rank 0 waits for the workers to join the group.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the workers may take to end after rank 0 ended normally (or at
/// Ctrl-C, which every rank agreed on).
const END_GRACE: Duration = Duration::from_secs(60);
/// How long failing workers get to report after rank 0 failed.
const FAILED_GRACE: Duration = Duration::from_secs(5);

/// What a worker process needs to run rank `rank` of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RankSpec {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Where rank 0 listens (TCP), or the NCCL group's id in hex.
    pub group: Group,
    /// The entry script.
    pub script: PathBuf,
    /// Directories imports may load from.
    pub import_roots: Vec<PathBuf>,
    /// The validated config.
    pub config: Config,
    /// The run's seed.
    pub seed: u64,
    /// Where relative paths resolve.
    pub base_dir: PathBuf,
    /// Script arguments.
    pub args: BTreeMap<String, String>,
    /// The rank's device (`training.device` syntax).
    pub device: String,
    /// The run directory (read only: workers write nothing).
    pub run_dir: PathBuf,
    /// The checkpoint folder and how many checkpoints it keeps.
    pub checkpoints: (PathBuf, usize),
    /// The checkpoint to resume from.
    pub resume_from: Option<PathBuf>,
}

/// How the ranks of a process group reach each other.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Group {
    /// Through rank 0 over TCP at this address.
    Tcp(String),
    /// Over NCCL, with this group id (hex).
    Nccl(String),
}

/// Runs `setups` (rank 0 first) as one process per rank: rank 0 here, the
/// others as workers started from this executable. `devices[r]` is rank r's
/// device; with `nccl` the ranks exchange over NCCL (a build with the
/// `nccl` feature), otherwise over TCP. Failures are reported as
/// `crate::experiment`'s thread ranks report them: the first rank that
/// failed, by rank.
pub fn run_rank_processes(
    script: &std::path::Path,
    opts: &CompileOptions,
    setups: Vec<SessionSetup>,
    devices: &[String],
    nccl: bool,
) -> Result<Result<(), ScriptFailure>> {
    let world = setups.len();
    let mut setups = setups.into_iter();
    let setup0 = setups.next().context("no rank 0")?;
    let rendezvous = if nccl { None } else { Some(Rendezvous::new()?) };
    let group = match &rendezvous {
        Some(r) => Group::Tcp(r.address()?),
        None => Group::Nccl(nccl_id()?),
    };
    let mut specs = Vec::with_capacity(world - 1);
    for (i, setup) in setups.enumerate() {
        let rank = i + 1;
        let spec = RankSpec::new(
            rank,
            world,
            group.clone(),
            script,
            opts,
            setup,
            &devices[rank],
        )?;
        specs.push((rank, serde_json::to_vec(&spec)?));
    }
    let exe = std::env::current_exe().context("cannot find the lcasr executable")?;
    let threads = share_cores(world);
    if let Some(n) = threads {
        // Rank 0's share, for the pool its thread uses; a pool that some
        // earlier work already started keeps its size.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    let workers = Workers::spawn(&exe, specs, threads)?;
    let comm: Arc<dyn Collective> = match rendezvous {
        Some(r) => Arc::new(r.accept(world, JOIN_TIMEOUT, || workers.check_running())?),
        None => join_nccl(&group, 0, world, &setup0.device, || workers.check_running())?,
    };
    let watcher = workers.watch({
        let comm = Arc::clone(&comm);
        move |_| comm.abort_group()
    });
    let rank0 = run_rank(script, opts, setup0, comm)?;
    // Finished or stopped at Ctrl-C, the workers end on their own (they
    // voted to stop with rank 0); after a failure they only report.
    let grace = match &rank0 {
        Ok(Ok(())) => END_GRACE,
        Ok(Err(f)) if f.interrupted => END_GRACE,
        _ => FAILED_GRACE,
    };
    let watched = watcher.first_failure();
    let reports = watcher.finish(grace);
    let mut failures = Vec::new();
    match rank0 {
        Ok(Ok(())) => {}
        Ok(Err(f)) => failures.push((0, f)),
        Err(what) => bail!("data-parallel rank 0 of {world} panicked: {what}"),
    }
    for (rank, report) in reports {
        match report {
            WorkerReport {
                interrupted: true, ..
            } => failures.push((
                rank,
                ScriptFailure {
                    message: String::new(),
                    interrupted: true,
                },
            )),
            WorkerReport {
                message: Some(message),
                ..
            } => failures.push((
                rank,
                ScriptFailure {
                    message,
                    interrupted: false,
                },
            )),
            WorkerReport { .. } => {}
        }
    }
    let first = watched.or_else(|| first_to_fail(&failures));
    Ok(crate::experiment::first_failure(world, failures, first))
}

/// The rank whose failure is the cause, when the watcher did not see it
/// first: the first whose message is its own rather than another rank
/// leaving the group (rank 0 learns of a worker's failure through the group,
/// often before the worker's process has ended).
fn first_to_fail(failures: &[(usize, ScriptFailure)]) -> Option<usize> {
    failures
        .iter()
        .find(|(_, f)| !f.interrupted && !RankLeft::is_reported_in(&f.message))
        .or(failures.first())
        .map(|(rank, _)| *rank)
}

impl RankSpec {
    fn new(
        rank: usize,
        world: usize,
        group: Group,
        script: &std::path::Path,
        opts: &CompileOptions,
        setup: SessionSetup,
        device: &str,
    ) -> Result<Self> {
        let run = setup.run.context("a data-parallel rank without a run")?;
        Ok(Self {
            rank,
            world,
            group,
            script: script.to_path_buf(),
            import_roots: opts.import_roots.clone(),
            config: setup
                .config
                .context("a data-parallel rank without a config")?,
            seed: setup.seed,
            base_dir: setup.base_dir,
            args: setup.args,
            device: device.to_string(),
            run_dir: run.dir,
            checkpoints: (
                run.checkpoints.dir().to_path_buf(),
                run.checkpoints.keep_last(),
            ),
            resume_from: run.resume_from,
        })
    }
}

/// The hidden `lcasr rank-worker` command: reads a [`RankSpec`] from
/// `input`, runs that rank, prints its [`WorkerReport`] as one JSON line
/// and returns the exit status (0 when it finished or stopped at Ctrl-C
/// with the others, 1 when it failed).
pub fn run_worker(input: impl Read) -> i32 {
    let report = match worker(input) {
        Ok(Ok(())) => WorkerReport::default(),
        Ok(Err(f)) if f.interrupted => WorkerReport {
            interrupted: true,
            message: None,
        },
        Ok(Err(f)) => WorkerReport {
            interrupted: false,
            message: Some(f.message),
        },
        Err(e) => WorkerReport {
            interrupted: false,
            message: Some(format!("{e:#}")),
        },
    };
    let failed = report.message.is_some();
    println!(
        "{}",
        serde_json::to_string(&report).expect("a report serialises")
    );
    i32::from(failed)
}

/// Runs the rank `input` describes.
fn worker(mut input: impl Read) -> Result<Result<(), ScriptFailure>> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .context("cannot read the rank's part from standard input")?;
    let spec: RankSpec = serde_json::from_str(&text).context("a malformed rank part")?;
    let device = open_device(&spec.device)
        .with_context(|| format!("rank {}: device {}", spec.rank, spec.device))?;
    let comm: Arc<dyn Collective> = match &spec.group {
        Group::Tcp(address) => Arc::new(TcpMember::connect(address, spec.rank, spec.world)?),
        Group::Nccl(_) => join_nccl(&spec.group, spec.rank, spec.world, &device, || Ok(()))?,
    };
    let opts = CompileOptions {
        import_roots: spec.import_roots.clone(),
        max_operations: 0,
        // Workers see no Ctrl-C of their own: rank 0 decides for the group.
        interrupts: Arc::new(AtomicUsize::new(0)),
    };
    let setup = SessionSetup {
        config: Some(spec.config.clone()),
        seed: spec.seed,
        base_dir: spec.base_dir.clone(),
        run: Some(RunOutputs {
            dir: spec.run_dir.clone(),
            metrics: None,
            tensorboard: None,
            checkpoints: CheckpointStore::new(spec.checkpoints.0.clone(), spec.checkpoints.1),
            checkpoint_files: Vec::new(),
            resume_from: spec.resume_from.clone(),
            last_checkpoint_recordings: 0,
            last_checkpoint: None,
            log_calls: 0,
            comparison: None,
        }),
        args: spec.args.clone(),
        device,
    };
    run_rank(&spec.script, &opts, setup, comm)?
        .map_err(|what| anyhow!("rank {} panicked: {what}", spec.rank))
}

/// Compiles and runs the script as this process's rank of `comm`'s group,
/// on a thread of the rank runner (its stack size; a failure aborts the
/// group). `Err(message)` when the rank panicked.
fn run_rank(
    script: &std::path::Path,
    opts: &CompileOptions,
    setup: SessionSetup,
    comm: Arc<dyn Collective>,
) -> Result<std::result::Result<Result<(), ScriptFailure>, String>> {
    let setup = Mutex::new(Some(setup));
    let ran = run_on_threads_with(vec![comm], |comm| {
        let setup = setup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("the rank's setup is taken once");
        compile(script, opts).and_then(|c| c.run_in_group(setup, Some(comm)))
    })?;
    ran.results
        .into_iter()
        .next()
        .context("the rank did not run")
}

/// A fresh NCCL group id, hex-encoded for the workers.
#[cfg(feature = "nccl")]
fn nccl_id() -> Result<String> {
    crate::parallel::nccl::unique_id()
}

/// Without the `nccl` feature there is no NCCL group to make.
#[cfg(not(feature = "nccl"))]
fn nccl_id() -> Result<String> {
    bail!("--gpus needs a build with `--features nccl` (docs/gpu.md)")
}

/// Joins the NCCL group `group` as rank `rank` of `world` on `device`,
/// calling `check` while the others join (it fails when a worker ended).
#[cfg(feature = "nccl")]
fn join_nccl(
    group: &Group,
    rank: usize,
    world: usize,
    device: &candle_core::Device,
    check: impl FnMut() -> Result<()>,
) -> Result<Arc<dyn Collective>> {
    let Group::Nccl(id) = group else {
        bail!("not an NCCL group");
    };
    let comm = crate::parallel::nccl::join(id, rank, world, device, JOIN_TIMEOUT, check)?;
    Ok(Arc::new(comm))
}

/// Without the `nccl` feature there is no NCCL group to join.
#[cfg(not(feature = "nccl"))]
fn join_nccl(
    _: &Group,
    _: usize,
    _: usize,
    _: &candle_core::Device,
    _: impl FnMut() -> Result<()>,
) -> Result<Arc<dyn Collective>> {
    bail!("--gpus needs a build with `--features nccl` (docs/gpu.md)")
}
