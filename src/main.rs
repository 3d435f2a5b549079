//! The `lcasr` command line: parse, dispatch, print errors. No logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lcasr::config::{self, ConfigError, DtypeName, LoadOptions};
use lcasr::experiment::{self, Experiment, ExperimentError, Outcome};
use lcasr::infer::longform::{ContextOptions, LongformMode};
use lcasr::infer::transcribe::TranscriptFormat;
use lcasr::run::run_dir::StartMode;

/// Train and run long-context Conformer-CTC speech recognisers.
///
/// Experiments are Rhai scripts driven by a YAML config; the reference training
/// procedure is scripts/train.rhai. Run `lcasr <command> --help` for details.
#[derive(Parser)]
#[command(name = "lcasr", version, about, long_about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model with the reference procedure (scripts/train.rhai).
    Train(TrainArgs),
    /// Run any experiment script against a config.
    Run(RunArgs),
    /// Turn audio and transcripts into a feature cache and a manifest.
    Prepare(PrepareArgs),
    /// Word error rate of a checkpoint on a manifest at several context lengths.
    Eval(EvalArgs),
    /// Transcribe audio files, with word timestamps.
    Transcribe(TranscribeArgs),
    /// Draw PNG charts of a run's metrics into its plots/ folder.
    Plot(PlotArgs),
    /// Inspect configs.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Train or inspect tokenizers.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Print the Rhai scripting API reference as Markdown.
    ApiDocs,
    /// Re-run a finished run from its recorded script and config, checking hashes.
    Reproduce(ReproduceArgs),
    /// Predict the peak memory of training a config, per sequence-scheduler stage.
    Memory(MemoryArgs),
    /// One rank of a data-parallel run started with --processes or --gpus
    /// (internal: the launching process starts it and hands it its part on
    /// standard input).
    #[command(name = "rank-worker", hide = true)]
    RankWorker,
}

#[derive(Args)]
struct ConfigArgs {
    /// The YAML config file.
    config: PathBuf,
    /// Overrides of config keys, e.g. `model.n_layers=9 optimizer.args.lr=1e-3`.
    overrides: Vec<String>,
    /// Treat unknown config keys as errors instead of warnings.
    #[arg(long)]
    strict: bool,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    run: RunDirArgs,
    /// The training script (the reference procedure by default).
    #[arg(long, default_value = "scripts/train.rhai")]
    script: PathBuf,
}

#[derive(Args)]
struct RunDirArgs {
    /// Resume the run in this run directory exactly where it stopped.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["force", "run_dir"])]
    resume: Option<PathBuf>,
    /// Start a new run even if the run directory exists (its contents are replaced).
    #[arg(long)]
    force: bool,
    /// The run directory (default: the config's `checkpointing.dir`).
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// A script argument, read in the script with `arg("NAME", default)`
    /// (repeatable; recorded in the run directory).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_script_arg)]
    script_args: Vec<(String, String)>,
    /// Train data-parallel over N ranks: N copies of the script, one thread
    /// each, share every batch and sum their gradients, so the run trains as
    /// one process would (default: 1, or the recorded count with --resume;
    /// recorded for `lcasr reproduce`). Only rank 0 writes the run directory.
    /// For several GPUs see `--gpus`.
    #[arg(long, value_name = "N", value_parser = parse_ranks, conflicts_with = "gpus")]
    ranks: Option<usize>,
    /// Train data-parallel on GPUs 0..N-1 of this machine: `--ranks N` with
    /// rank r on GPU r in a process of its own, the ranks exchanging over
    /// NCCL (needs a build with `--features nccl`; docs/gpu.md). Give it
    /// again with --resume.
    #[arg(long, value_name = "N", value_parser = parse_ranks)]
    gpus: Option<usize>,
    /// Run each rank of `--ranks N` in a process of its own (rank 0 in this
    /// one, exchanging over loopback TCP) instead of a thread; the results are
    /// the same bits. Ranks compute with their share of the cores either way
    /// (RAYON_NUM_THREADS overrides). Always so with --gpus.
    #[arg(long)]
    processes: bool,
    /// Where to train: cpu, cuda or cuda:N (sets `training.device`; a GPU
    /// needs a build with `--features cuda`, see docs/gpu.md).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
}

/// `NAME=VALUE` of `--set`.
fn parse_script_arg(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

/// The N of `--ranks`: a whole number of at least 1.
fn parse_ranks(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "`{s}` is not a number of ranks: give a whole number of at least 1"
        )),
    }
}

#[derive(Args)]
struct RunArgs {
    /// The Rhai experiment script.
    script: PathBuf,
    /// The YAML config file.
    #[arg(long)]
    config: PathBuf,
    /// Overrides of config keys, e.g. `model.n_layers=9`.
    overrides: Vec<String>,
    /// Treat unknown config keys as errors instead of warnings.
    #[arg(long)]
    strict: bool,
    #[command(flatten)]
    run: RunDirArgs,
}

#[derive(Args)]
struct PrepareArgs {
    /// A folder of audio files with same-named .txt or .json transcripts, or a
    /// CSV/TSV/JSONL listing (columns audio, text).
    input: PathBuf,
    /// Where to write the feature cache and the manifest.
    #[arg(long)]
    out: PathBuf,
    /// Log-mel features instead of the reference's power-mel (new models only).
    #[arg(long)]
    log_mel: bool,
    /// Average all channels instead of taking channel 0 (the reference).
    #[arg(long)]
    mix_channels: bool,
}

/// Where the model's config and tokenizer come from when the checkpoint does
/// not hold them.
#[derive(Args)]
struct ModelArgs {
    /// A YAML file whose `model:` section describes the network (default: the
    /// config saved with the checkpoint).
    #[arg(long, value_name = "YAML")]
    config: Option<PathBuf>,
    /// The tokenizer, `.json` or SentencePiece `.model` (default: the one saved
    /// with the checkpoint).
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// The model was trained on log-mel features (`lcasr prepare --log-mel`)
    /// instead of the reference's power-mel (default: the recipe saved with the
    /// checkpoint by training, else power-mel).
    #[arg(long)]
    log_mel: bool,
    /// Where the model runs: cpu, cuda or cuda:N (a GPU needs a build with
    /// `--features cuda`).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: String,
    /// The compute dtype: float32, or bfloat16/float16 mixed precision on a
    /// GPU (as in training: attention on tensor cores, or candle-flash-attn in
    /// a `--features flash-attn` build).
    #[arg(long, value_enum, default_value_t = DtypeName::Float32)]
    dtype: DtypeName,
}

/// How much of a recording the model sees at once.
#[derive(Args)]
struct LongformArgs {
    /// Overlap of consecutive windows, as a fraction of the window in [0, 1).
    #[arg(long, default_value_t = lcasr::infer::longform::DEFAULT_OVERLAP, value_parser = parse_overlap)]
    overlap: f64,
    /// How the posteriors of overlapping windows are merged.
    #[arg(long, value_enum, default_value_t = LongformMode::AveragedMovingWindow)]
    mode: LongformMode,
}

#[derive(Args)]
struct EvalArgs {
    /// The model: a run directory (its latest checkpoint), a checkpoint
    /// directory, a reference .pt file or a .safetensors file.
    checkpoint: PathBuf,
    /// The manifest of recordings to score (written by `lcasr prepare`).
    manifest: PathBuf,
    /// Context lengths, comma-separated: durations (`10s`, `80s`, `1.5m`, `20m`,
    /// `1h`), numbers of 10 ms frames (`1024`), or `full` (the whole recording).
    #[arg(long, value_delimiter = ',', default_value = "full", value_parser = parse_context_arg)]
    context: Vec<ContextArg>,
    #[command(flatten)]
    longform: LongformArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Where to write eval.json and wer_vs_context.png (default: `eval-<name>`
    /// inside the checkpoint when it is a run directory, else in the current
    /// directory; <name> is the manifest's stem, or its folder's name for
    /// manifest.json).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct TranscribeArgs {
    /// The model: a run directory (its latest checkpoint), a checkpoint
    /// directory, a reference .pt file or a .safetensors file.
    checkpoint: PathBuf,
    /// Audio files (WAV, FLAC, MP3, Ogg Vorbis; any sample rate).
    #[arg(required = true)]
    audio: Vec<PathBuf>,
    /// The context length: a duration (`80s`, `20m`), a number of 10 ms
    /// frames, or `full` (the whole recording at once).
    #[arg(long, default_value = "80s", value_parser = parse_context_arg)]
    context: ContextArg,
    #[command(flatten)]
    longform: LongformArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// What to write: the text alone, or JSON with word timestamps, SubRip or
    /// WebVTT subtitles.
    #[arg(long, value_enum, default_value_t = TranscriptFormat::Text)]
    format: TranscriptFormat,
    /// Write each transcript to `<audio stem>.<txt|json|srt|vtt>` in this
    /// directory (default: text is printed, other formats go to the current
    /// directory).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct PlotArgs {
    /// The run directory; charts of its metrics.jsonl (loss, learning rate,
    /// chunk length, gradient norm, WER) are written to <RUN_DIR>/plots/.
    run_dir: PathBuf,
}

/// A parsed context length: a window in input frames, `None` for the whole
/// recording.
#[derive(Clone, Copy)]
struct ContextArg(Option<usize>);

fn parse_context_arg(s: &str) -> Result<ContextArg, String> {
    lcasr::infer::parse_context(s)
        .map(ContextArg)
        .map_err(|e| e.to_string())
}

fn parse_overlap(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("expected a fraction in [0, 1), got `{s}`")),
    }
}

#[derive(Args)]
struct ReproduceArgs {
    /// The run directory to reproduce.
    run: PathBuf,
    /// Where the new run goes (default: `<run>-reproduce`).
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Replace the new run directory if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct MemoryArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Bytes per activation: f32 (CPU training), or bf16 / fp16 for GPU
    /// training under autocast (`training.dtype`).
    #[arg(long, value_enum, default_value_t = ActivationPrecision::F32)]
    precision: ActivationPrecision,
    /// Output classes of the CTC head (pieces + blank); by default read from
    /// the config's `data.tokenizer`, else the reference's 4096.
    #[arg(long)]
    classes: Option<usize>,
    /// Memory available in GiB (e.g. 80 for an 80 GB GPU): each stage then
    /// says whether it fits.
    #[arg(long)]
    budget_gib: Option<f64>,
}

/// Activation element types `lcasr memory` plans for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ActivationPrecision {
    F32,
    Bf16,
    Fp16,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config and print it resolved (defaults filled, overrides applied).
    Check(ConfigArgs),
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a SentencePiece-style BPE tokenizer ([PAD]=0, [UNK]=1, [BOS]=2,
    /// NFKC + lowercasing) on transcripts from text files or manifests.
    Train(TokenizerTrainArgs),
}

#[derive(Args)]
struct TokenizerTrainArgs {
    /// Text files with one transcript per line, or manifests (.json: an
    /// `lcasr prepare` manifest or a reference audio_txt_pairs.json).
    #[arg(required = true)]
    text: Vec<PathBuf>,
    /// Number of pieces (the model gets one more class: the CTC blank).
    #[arg(long, default_value_t = 4095)]
    vocab_size: usize,
    /// Where to write the tokenizer (JSON).
    #[arg(long)]
    out: PathBuf,
}

/// Exit status for bad input (configs, arguments), as clap uses for usage errors.
const EXIT_BAD_INPUT: u8 = 2;

/// Large tensors come from huge pages and are reused across steps.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: lcasr::runtime::LargeBlockAlloc = lcasr::runtime::LargeBlockAlloc;

fn main() -> ExitCode {
    install_panic_hook();
    lcasr::runtime::tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Config(ConfigCommand::Check(args)) => config_check(&args),
        Command::Tokenizer(TokenizerCommand::Train(args)) => tokenizer_train(&args),
        Command::Train(args) => experiment(
            args.script.clone(),
            &args.config.config,
            &args.config.overrides,
            args.config.strict,
            &args.run,
        ),
        Command::Run(args) => experiment(
            args.script.clone(),
            &args.config,
            &args.overrides,
            args.strict,
            &args.run,
        ),
        Command::Prepare(args) => prepare(&args),
        Command::Eval(args) => eval(&args),
        Command::Transcribe(args) => transcribe(&args),
        Command::Plot(args) => plot(&args),
        Command::ApiDocs => {
            print!("{}", lcasr::script::docs::api_markdown());
            ExitCode::SUCCESS
        }
        Command::Reproduce(args) => reproduce(&args),
        Command::Memory(args) => memory(&args),
        Command::RankWorker => {
            let status = lcasr::rank_processes::run_worker(std::io::stdin().lock());
            ExitCode::from(status as u8)
        }
    }
}

fn memory(args: &MemoryArgs) -> ExitCode {
    use lcasr::train::memory_plan::{plan, render};

    let opts = LoadOptions {
        strict: args.config.strict,
        overrides: args.config.overrides.clone(),
    };
    let cfg = match config::load_file(&args.config.config, &opts) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            loaded.config
        }
        Err(e) => return config_error(&e),
    };
    let classes = match (args.classes, &cfg.data.tokenizer) {
        (Some(c), _) => c,
        (None, Some(path)) => match lcasr::text::tokenizer::Tokenizer::from_file(path.as_ref()) {
            Ok(tok) => tok.vocab_size() + 1,
            Err(e) => {
                eprintln!("error: data.tokenizer `{path}`: {e:#}\n  (or pass --classes N)");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        },
        (None, None) => 4096,
    };
    let bytes = match args.precision {
        ActivationPrecision::F32 => 4,
        ActivationPrecision::Bf16 | ActivationPrecision::Fp16 => 2,
    };
    let budget = match args.budget_gib {
        Some(g) if !(g.is_finite() && g > 0.0) => {
            eprintln!("error: --budget-gib must be a positive number of GiB, got {g}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
        Some(g) => Some((g * (1u64 << 30) as f64) as u64),
        None => None,
    };
    match plan(&cfg, classes, bytes) {
        Ok(plans) => {
            println!(
                "# {}: predicted peak memory of a training step ({} layers, d_model {}, {} classes, {}-byte activations, checkpoint_every_n_layers {})",
                args.config.config.display(),
                cfg.model.n_layers,
                cfg.model.d_model,
                classes,
                bytes,
                cfg.model.checkpoint_every_n_layers,
            );
            print!("{}", render(&cfg, &plans, budget));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_check(args: &ConfigArgs) -> ExitCode {
    let opts = LoadOptions {
        strict: args.strict,
        overrides: args.overrides.clone(),
    };
    match config::load_file(&args.config, &opts) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "# {}: valid. Resolved config (sha256 {}):",
                args.config.display(),
                loaded.config.canonical_hash()
            );
            print!("{}", loaded.config.to_yaml());
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
}

fn prepare(args: &PrepareArgs) -> ExitCode {
    use lcasr::audio::decode::ChannelMode;
    use lcasr::audio::features::FeatureRecipe;
    use lcasr::data::prepare::{discover, prepare, PrepareOptions};

    let (sources, mut problems) = match discover(&args.input) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let mut opts = PrepareOptions::default();
    if args.log_mel {
        opts.recipe = FeatureRecipe::LogMel;
    }
    if args.mix_channels {
        opts.load.channel = ChannelMode::Mix;
    }
    let bar = indicatif::ProgressBar::new(sources.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} recordings, {eta} left")
            .expect("valid template"),
    );
    let result = prepare(&sources, &args.out, &opts, &|done, _| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    match result {
        Ok((manifest, report)) => {
            problems.extend(report.problems);
            println!(
                "prepared {} recordings ({} computed, {} unchanged) into {}",
                manifest.recordings.len(),
                report.computed,
                report.reused,
                args.out.join("manifest.json").display()
            );
            for p in &problems {
                eprintln!("skipped {}: {}", p.path.display(), p.message);
            }
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("{} file(s) skipped", problems.len());
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn tokenizer_train(args: &TokenizerTrainArgs) -> ExitCode {
    let trained = lcasr::data::transcripts::collect(&args.text).and_then(|lines| {
        lcasr::text::tokenizer::train_and_save(lines, args.vocab_size, &args.out)
    });
    match trained {
        Ok(vocab) => {
            println!("wrote {} ({vocab} pieces)", args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn eval(args: &EvalArgs) -> ExitCode {
    use lcasr::infer::eval::{default_report_dir, evaluate, format_table, write_report};

    let contexts: Vec<ContextOptions> = args
        .context
        .iter()
        .map(|c| args.longform.options(c.0, &args.model))
        .collect();
    let result = args.model.load(&args.checkpoint).and_then(|model| {
        let report = evaluate(&model, &args.manifest, &contexts, true)?;
        print!("{}", format_table(&report));
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| default_report_dir(&args.checkpoint, &args.manifest));
        write_report(&report, &out)
    });
    match result {
        Ok([json, png, txt]) => {
            println!(
                "wrote {}, {} and {}",
                json.display(),
                png.display(),
                txt.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn transcribe(args: &TranscribeArgs) -> ExitCode {
    match transcribe_files(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Transcribes every file of `args` in turn, printing or writing each
/// transcript as soon as it is ready.
fn transcribe_files(args: &TranscribeArgs) -> anyhow::Result<()> {
    use lcasr::infer::transcribe::{output_paths, transcribe_with_progress};

    let opts = args.longform.options(args.context.0, &args.model);
    let outputs = match (&args.out, args.format) {
        (None, TranscriptFormat::Text) => None,
        (out, format) => {
            let dir = out.clone().unwrap_or_else(|| PathBuf::from("."));
            Some(output_paths(&args.audio, &dir, format.extension())?)
        }
    };
    let model = args.model.load(&args.checkpoint)?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("cannot create output directory {}: {e}", dir.display())
        })?;
    }
    let bar = indicatif::ProgressBar::new(1).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} windows of {msg}")
            .expect("valid template"),
    );
    for (i, audio) in args.audio.iter().enumerate() {
        bar.set_message(audio.display().to_string());
        let transcript = transcribe_with_progress(&model, audio, &opts, &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        let text = transcript.render(args.format);
        bar.suspend(|| match &outputs {
            Some(paths) => {
                lcasr::fsutil::write_atomic(&paths[i], text.as_bytes())?;
                println!("wrote {}", paths[i].display());
                anyhow::Ok(())
            }
            None if args.audio.len() > 1 => {
                print!("{}: {text}", audio.display());
                Ok(())
            }
            None => {
                print!("{text}");
                Ok(())
            }
        })?;
    }
    bar.finish_and_clear();
    Ok(())
}

fn plot(args: &PlotArgs) -> ExitCode {
    match lcasr::run::plot::plot_run_dir(&args.run_dir) {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl ModelArgs {
    /// Loads the model at `checkpoint` onto `--device`.
    fn load(&self, checkpoint: &std::path::Path) -> anyhow::Result<lcasr::infer::LoadedModel> {
        let device = lcasr::runtime::device::open_device(&self.device)
            .map_err(|e| anyhow::anyhow!("--device: {e:#}"))?;
        let opts = lcasr::infer::LoadOptions {
            device,
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            recipe: self
                .log_mel
                .then_some(lcasr::audio::features::FeatureRecipe::LogMel),
        };
        lcasr::infer::load_model(checkpoint, &opts)
    }
}

impl LongformArgs {
    /// The context options for a window of `window` frames, in `model`'s
    /// compute dtype.
    fn options(&self, window: Option<usize>, model: &ModelArgs) -> ContextOptions {
        ContextOptions {
            window,
            overlap: self.overlap,
            mode: self.mode,
            dtype: model.dtype,
        }
    }
}

/// Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

fn experiment(
    script: PathBuf,
    config: &std::path::Path,
    overrides: &[String],
    strict: bool,
    run: &RunDirArgs,
) -> ExitCode {
    let mode = if run.resume.is_some() {
        StartMode::Resume
    } else if run.force {
        StartMode::Force
    } else {
        StartMode::New
    };
    let mut overrides = overrides.to_vec();
    if let Some(device) = &run.device {
        overrides.push(format!("training.device={device}"));
    }
    let exp = Experiment {
        script,
        config: config.to_path_buf(),
        overrides,
        strict,
        run_dir: run.resume.clone().or_else(|| run.run_dir.clone()),
        mode,
        command_line: std::env::args().collect(),
        import_roots: vec![PathBuf::from("scripts")],
        seed: None,
        compare_with: None,
        script_args: run.script_args.iter().cloned().collect(),
        ranks: run.ranks.or(run.gpus),
        gpus: run.gpus.is_some(),
        processes: run.processes,
    };
    match experiment::run(&exp) {
        Ok(Outcome::Finished { run_dir, .. }) => {
            eprintln!("Run directory: {}", run_dir.display());
            ExitCode::SUCCESS
        }
        Ok(Outcome::Interrupted { run_dir }) => {
            let cmd: Vec<String> = std::env::args().collect();
            eprintln!(
                "Stopped by Ctrl-C. Resume with:\n  {} --resume {}",
                resume_command(&cmd),
                run_dir.display()
            );
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(ExperimentError::Config(e)) => config_error(&e),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn reproduce(args: &ReproduceArgs) -> ExitCode {
    let mode = if args.force {
        StartMode::Force
    } else {
        StartMode::New
    };
    let result = experiment::reproduce(
        &args.run,
        args.run_dir.clone(),
        mode,
        std::env::args().collect(),
        &|m| eprintln!("warning: not as recorded: {m}"),
    );
    match result {
        Ok(r) => match r.comparison {
            Some(c) => match c.first_divergence {
                None if c.compared == c.original_records() => {
                    eprintln!(
                        "Reproduced exactly: all {} records match {} (new run: {}).",
                        c.compared,
                        args.run.display(),
                        r.run_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!(
                        "The {} records logged match, but the original has {} (new run: {}).",
                        c.compared,
                        c.original_records(),
                        r.run_dir.display()
                    );
                    ExitCode::FAILURE
                }
                Some(d) => {
                    eprintln!("Not reproduced: {d} (new run: {}).", r.run_dir.display());
                    ExitCode::FAILURE
                }
            },
            None => ExitCode::from(EXIT_INTERRUPTED),
        },
        Err(ExperimentError::Config(e)) => config_error(&e),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The command line without run-directory options, for the resume hint.
fn resume_command(args: &[String]) -> String {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        match a.as_str() {
            "--resume" | "--run-dir" => skip = true,
            "--force" => {}
            _ if a.starts_with("--resume=") || a.starts_with("--run-dir=") => {}
            _ => out.push(a.clone()),
        }
    }
    out.join(" ")
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_BAD_INPUT)
}

/// Panics are bugs: report them in one line, never with a Rust backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("internal error: {msg}{place}. This is a bug in lcasr; please report it.");
    }));
}
