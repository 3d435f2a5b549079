//! The module resolver of experiment scripts: `import "helpers" as h;` loads
//! `helpers.rhai` from the importing script's directory, and only files inside
//! the allowed roots (the experiment's directory and the project's `scripts/`)
//! can be imported. Rhai's default resolver happily loads `/abs/path` and
//! `../../x`, so this one canonicalises every path and checks it. Every file
//! loaded is recorded (path and text) for the run directory and for error
//! messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rhai::module_resolvers::ModuleResolver;
use rhai::{Engine, EvalAltResult, Module, Position, Scope, Shared};

/// Script files loaded so far: display name → source text.
pub type Sources = Arc<Mutex<BTreeMap<String, String>>>;

/// Resolves imports inside a set of allowed directories.
pub struct ConfinedResolver {
    roots: Vec<PathBuf>,
    sources: Sources,
}

impl ConfinedResolver {
    /// A resolver that allows files under `roots` (canonicalised; roots that
    /// do not exist are dropped) and records loaded files in `sources`.
    pub fn new(roots: &[PathBuf], sources: Sources) -> Self {
        let roots = roots.iter().filter_map(|r| r.canonicalize().ok()).collect();
        ConfinedResolver { roots, sources }
    }

    /// The canonical file an import names, if it is allowed.
    fn locate(&self, source: Option<&str>, path: &str) -> Result<PathBuf, String> {
        let base = source
            .map(Path::new)
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .or_else(|| self.roots.first().cloned())
            .unwrap_or_else(|| PathBuf::from("."));
        let mut file = base.join(path);
        if file.extension().is_none() {
            file.set_extension("rhai");
        }
        let canonical = file
            .canonicalize()
            .map_err(|e| format!("cannot open `{}`: {e}", file.display()))?;
        if self.roots.iter().any(|r| canonical.starts_with(r)) {
            Ok(canonical)
        } else {
            Err(format!(
                "import `{path}` escapes the experiment directory: scripts may only import files \
                 under {}",
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))
        }
    }
}

/// An error about import `path` at `pos`; `inner` is where inside the
/// imported file it happened (or `pos` again).
fn module_error(path: &str, message: String, inner: Position, pos: Position) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorInModule(
        path.to_string(),
        Box::new(EvalAltResult::ErrorRuntime(message.into(), inner)),
        pos,
    ))
}

impl ModuleResolver for ConfinedResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Shared<Module>, Box<EvalAltResult>> {
        let file = self
            .locate(source, path)
            .map_err(|m| module_error(path, m, pos, pos))?;
        let name = file.display().to_string();
        let text = std::fs::read_to_string(&file)
            .map_err(|e| module_error(path, format!("cannot read `{name}`: {e}"), pos, pos))?;
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), text.clone());
        let mut ast = engine.compile(&text).map_err(|e| {
            let p = e.position();
            module_error(
                path,
                format!("syntax error in `{name}`: {}", e.err_type()),
                p,
                pos,
            )
        })?;
        ast.set_source(name);
        let module = Module::eval_ast_as_new(Scope::new(), &ast, engine)?;
        Ok(module.into())
    }
}
