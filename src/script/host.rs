//! The script engine: registration of every API module, limits, the sandbox
//! (confined imports, no `eval`), Ctrl-C handling, and running a script to
//! completion with errors formatted for the user.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rhai::{exported_module, Dynamic, Engine, Scope, AST};

use super::data_api::{Batch, Chunk, Chunks, Dataset, Tokenizer};
use super::errors::{format_error, is_interrupt, INTERRUPTED};
use super::model_api::{Model, Output};
use super::resolver::{ConfinedResolver, Sources};
use super::run_api::Progress;
use super::session::{self, SessionSetup};
use super::tensor_api::Tensor;
use super::train_api::{LrSchedule, Optimizer, SequenceSchedule, Targets};
use crate::parallel::sync_norm::synchronised_switched;
use crate::parallel::Collective;

/// Limits that catch runaway scripts (recursion, huge literals) without
/// bounding how long a training loop may run.
fn set_limits(engine: &mut Engine, max_operations: u64) {
    engine.set_max_call_levels(128);
    engine.set_max_expr_depths(128, 64);
    engine.set_max_string_size(16 << 20);
    engine.set_max_array_size(10_000_000);
    engine.set_max_map_size(1_000_000);
    engine.set_max_modules(64);
    engine.set_max_operations(max_operations);
}

/// Registers the script types and every API module on `engine`.
pub fn register_api(engine: &mut Engine) {
    register_type_names(engine);
    for module in api_modules() {
        engine.register_global_module(module.1.into());
    }
}

/// Registers the script types under their script names.
pub fn register_type_names(engine: &mut Engine) {
    engine
        .register_type_with_name::<Tensor>("Tensor")
        .register_type_with_name::<Model>("Model")
        .register_type_with_name::<Output>("Output")
        .register_type_with_name::<crate::model::Hidden>("Hidden")
        .register_type_with_name::<Optimizer>("Optimizer")
        .register_type_with_name::<LrSchedule>("LrSchedule")
        .register_type_with_name::<SequenceSchedule>("SequenceSchedule")
        .register_type_with_name::<Targets>("Targets")
        .register_type_with_name::<Tokenizer>("Tokenizer")
        .register_type_with_name::<Dataset>("Dataset")
        .register_type_with_name::<Batch>("Batch")
        .register_type_with_name::<Chunks>("Chunks")
        .register_type_with_name::<Chunk>("Chunk")
        .register_type_with_name::<Progress>("Progress")
        .register_iterator_result::<Chunks, Chunk>();
}

/// The API modules with their names, in documentation order.
pub fn api_modules() -> Vec<(&'static str, rhai::Module)> {
    vec![
        (
            "Tensors",
            exported_module!(super::tensor_api::tensor_module),
        ),
        ("Models", exported_module!(super::model_api::model_module)),
        ("Training", exported_module!(super::train_api::train_module)),
        ("Data", exported_module!(super::data_api::data_module)),
        ("Runs", exported_module!(super::run_api::run_module)),
        ("Evaluation", exported_module!(super::eval_api::eval_module)),
    ]
}

/// A compiled experiment script, with every file it imports.
pub struct Compiled {
    engine: Engine,
    ast: AST,
    /// The entry script's name as the user gave it.
    pub name: String,
    /// Every script file loaded: name → text (the entry script under `name`).
    pub sources: BTreeMap<String, String>,
    interrupts: Arc<AtomicUsize>,
}

/// A script that failed, with its message formatted for the terminal.
#[derive(Debug)]
pub struct ScriptFailure {
    /// The formatted error (file, line, column, source line, call chain).
    pub message: String,
    /// True when the run was stopped by Ctrl-C.
    pub interrupted: bool,
}

impl std::fmt::Display for ScriptFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ScriptFailure {}

/// How to compile a script.
pub struct CompileOptions {
    /// Directories imports may load from (the script's own directory is
    /// always allowed).
    pub import_roots: Vec<PathBuf>,
    /// Operation limit (0: unlimited, the default for experiments).
    pub max_operations: u64,
    /// Ctrl-C presses, shared with the signal handler.
    pub interrupts: Arc<AtomicUsize>,
}

/// Reads and compiles `path` with all its imports (resolved now, so a
/// missing or escaping import fails before anything runs).
pub fn compile(path: &Path, opts: &CompileOptions) -> Result<Compiled, ScriptFailure> {
    let name = path.display().to_string();
    let fail = |message: String| ScriptFailure {
        message,
        interrupted: false,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(format!("error: cannot read script {name}: {e}")))?;
    let sources: Sources = Arc::new(Mutex::new(BTreeMap::new()));
    let mut roots = vec![path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()];
    roots.extend(opts.import_roots.iter().cloned());
    let mut engine = Engine::new();
    engine.set_module_resolver(ConfinedResolver::new(&roots, Arc::clone(&sources)));
    engine.disable_symbol("eval");
    engine.set_fail_on_invalid_map_property(true);
    set_limits(&mut engine, opts.max_operations);
    // Only the lead rank of a data-parallel run prints.
    engine.on_print(|text| {
        if session::is_lead() {
            println!("{text}")
        }
    });
    engine.on_debug(|text, source, pos| {
        tracing::debug!("{}:{pos}: {text}", source.unwrap_or("script"));
    });
    let counter = Arc::clone(&opts.interrupts);
    engine.on_progress(move |_| {
        let n = counter.load(Ordering::SeqCst);
        // One Ctrl-C stops a tracked training run at its next step boundary
        // (see run_api::step_boundary); a second one, or the first in a
        // script without checkpoints, stops at once.
        if n >= 2 || (n == 1 && !session::has_tracked()) {
            Some(Dynamic::from(INTERRUPTED))
        } else {
            None
        }
    });
    register_api(&mut engine);
    let compiled = engine.compile_into_self_contained(&Scope::new(), &text);
    let mut all_sources = sources.lock().unwrap_or_else(|e| e.into_inner()).clone();
    all_sources.insert(name.clone(), text);
    let mut ast = compiled.map_err(|err| fail(format_error(&err, &name, &all_sources)))?;
    ast.set_source(name.clone());
    Ok(Compiled {
        engine,
        ast,
        name,
        sources: all_sources,
        interrupts: Arc::clone(&opts.interrupts),
    })
}

impl Compiled {
    /// Runs the script in a fresh session.
    pub fn run(&self, setup: SessionSetup) -> Result<(), ScriptFailure> {
        self.run_in_group(setup, None)
    }

    /// Runs the script in a fresh session on this thread as one rank of the
    /// data-parallel group `comm` (`None`: a single process). The rank's
    /// BatchRenorm statistics are synchronised over the group for the whole
    /// run; only rank 0 writes the run directory and prints.
    pub fn run_in_group(
        &self,
        setup: SessionSetup,
        comm: Option<Arc<dyn Collective>>,
    ) -> Result<(), ScriptFailure> {
        let session = session::install(setup, Arc::clone(&self.interrupts));
        let ran = match comm {
            None => self.engine.run_ast(&self.ast),
            Some(comm) => session::join_group(Arc::clone(&comm)).and_then(|contributes| {
                synchronised_switched(&comm, contributes, || self.engine.run_ast(&self.ast))
            }),
        };
        let result = ran.map_err(|err| {
            let interrupted = is_interrupt(&err);
            let mut message = format_error(&err, &self.name, &self.sources);
            if !interrupted {
                if let Some(dir) = super::run_api::save_after_error() {
                    message.push_str(&format!(
                        "the state after the last optimizer step was saved to {}: fix the cause \
                         and continue with --resume\n",
                        dir.display()
                    ));
                }
            }
            ScriptFailure {
                message,
                interrupted,
            }
        });
        if session::is_lead() {
            for name in session.unread_args() {
                eprintln!(
                    "warning: the script never read the argument `{name}` (--set {name}=...)"
                );
            }
        }
        result
    }
}
