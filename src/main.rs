//! The `lcasr` command line: parse, dispatch, print errors. No logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lcasr::config::{self, ConfigError, LoadOptions};
use lcasr::experiment::{self, Experiment, ExperimentError, Outcome};
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

#[derive(Args)]
struct EvalArgs {
    /// The checkpoint (lcasr safetensors or a reference .pt file).
    checkpoint: PathBuf,
    /// The manifest of recordings to score.
    manifest: PathBuf,
    /// Context lengths, e.g. `10s,80s,20m` or frames.
    #[arg(long, value_delimiter = ',')]
    context: Vec<String>,
}

#[derive(Args)]
struct TranscribeArgs {
    /// The checkpoint (lcasr safetensors or a reference .pt file).
    checkpoint: PathBuf,
    /// Audio files (WAV, FLAC, MP3, OGG).
    #[arg(required = true)]
    audio: Vec<PathBuf>,
}

#[derive(Args)]
struct ReproduceArgs {
    /// The run directory to reproduce.
    run: PathBuf,
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
        Command::Eval(_) => not_yet("eval", "decoding and long-form evaluation"),
        Command::Transcribe(_) => not_yet("transcribe", "decoding and long-form evaluation"),
        Command::ApiDocs => {
            print!("{}", lcasr::script::docs::api_markdown());
            ExitCode::SUCCESS
        }
        Command::Reproduce(_) => not_yet("reproduce", "run directories"),
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
    let exp = Experiment {
        script,
        config: config.to_path_buf(),
        overrides: overrides.to_vec(),
        strict,
        run_dir: run.resume.clone().or_else(|| run.run_dir.clone()),
        mode,
        command_line: std::env::args().collect(),
        import_roots: vec![PathBuf::from("scripts")],
    };
    match experiment::run(&exp) {
        Ok(Outcome::Finished { run_dir }) => {
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

fn not_yet(command: &str, part: &str) -> ExitCode {
    eprintln!("error: `lcasr {command}` is not yet implemented (it arrives with {part})");
    ExitCode::FAILURE
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
