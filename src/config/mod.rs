//! Typed, validated configuration.
//!
//! A config is read from YAML (the reference trainer's format, every key of
//! `configs/reference.yaml`), patched with `key.path=value` command-line
//! overrides, typed into [`Config`], filled with defaults and checked. Every
//! problem is reported with the file, line, column and key path; unknown keys
//! are warnings (with the closest known key) unless `strict` is set.

mod de;
mod schema;
pub mod suggest;
mod tree;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use de::UnknownKey;
pub use schema::*;
pub use suggest::{closest, edit_distance};
pub use tree::Origin;
pub use validate::Problem;

/// How to load a config.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Unknown keys are errors instead of warnings.
    pub strict: bool,
    /// `key.path=value` overrides, applied in order after the file is read.
    pub overrides: Vec<String>,
}

/// A successfully loaded config and what was noticed on the way.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The resolved config (defaults filled in, overrides applied).
    pub config: Config,
    /// Non-fatal findings (unknown keys), to show to the user.
    pub warnings: Vec<Diagnostic>,
}

/// One finding, located in a file or a command-line override.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    /// The config file's name as given.
    pub file: String,
    /// Where in it (or which override).
    pub origin: Origin,
    /// Dotted key path (empty for the whole document).
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { line, column } => write!(f, "{}:{line}:{column}: ", self.file)?,
            Origin::Override(arg) => write!(f, "{}: command-line override `{arg}`: ", self.file)?,
            Origin::Default => write!(f, "{}: ", self.file)?,
        }
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The text is not valid YAML.
    Syntax {
        /// The file's name as given, with the line and column when known.
        file: String,
        /// The parser's message, with line, column and a snippet.
        message: String,
    },
    /// A command-line override is malformed.
    Override {
        /// The argument as given.
        arg: String,
    },
    /// The YAML is valid but the config is not: wrong types, missing or
    /// unknown (with `strict`) keys, invalid values.
    Invalid(Vec<Diagnostic>),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Io { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            ConfigError::Syntax { file, message } => {
                write!(f, "{file}: not valid YAML: {}", message.trim_end())
            }
            ConfigError::Override { arg } => write!(
                f,
                "command-line override `{arg}` must look like key.path=value (e.g. model.n_layers=9)"
            ),
            ConfigError::Invalid(diags) => {
                let lines: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
                f.write_str(&lines.join("\n"))
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads, overrides, types, resolves and checks the config file at `path`.
pub fn load_file(path: &Path, opts: &LoadOptions) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(&text, &path.display().to_string(), opts)
}

/// As [`load_file`], for YAML text; `file` names it in messages.
pub fn load_str(text: &str, file: &str, opts: &LoadOptions) -> Result<Loaded, ConfigError> {
    let mut root = tree::parse(text).map_err(|e| syntax_error(file, &e))?;
    let diag = |origin: Origin, key: &str, message: String| Diagnostic {
        file: file.to_string(),
        origin,
        key: key.to_string(),
        message,
    };
    if !matches!(root.value, tree::Value::Map(_) | tree::Value::Null) {
        return Err(ConfigError::Invalid(vec![diag(
            root.origin.clone(),
            "",
            format!(
                "the top level must be a mapping of sections (model:, optimizer:, ...), found {}",
                root.value.kind()
            ),
        )]));
    }
    for arg in &opts.overrides {
        let (key, value) = parse_override(arg)?;
        let parts: Vec<&str> = key.split('.').collect();
        root.set(
            &parts,
            tree::parse_override_value(value, Origin::Override(arg.clone())),
        );
    }

    let ctx = de::Context::default();
    let typed = Config::deserialize(de::NodeDeserializer::new(&root, String::new(), &ctx));
    let unknown = ctx.into_unknown();
    let mut config = typed.map_err(|e| {
        let origin = e.origin.clone().unwrap_or(Origin::Default);
        let key = e.path.clone().unwrap_or_default();
        let message = if e.message == "is required but missing" && !key.contains('.') {
            format!("section `{key}:` is required but missing")
        } else {
            e.message.clone()
        };
        ConfigError::Invalid(vec![diag(origin, &key, message)])
    })?;

    let unknown: Vec<Diagnostic> = unknown
        .into_iter()
        .map(|u| {
            let hint = match &u.suggestion {
                Some(s) => format!("; did you mean {s}?"),
                None => String::new(),
            };
            let what = if opts.strict {
                "unknown key"
            } else {
                "unknown key, ignored"
            };
            diag(u.origin, &u.path, format!("{what}{hint}"))
        })
        .collect();

    validate::resolve(&mut config);
    let mut errors: Vec<Diagnostic> = validate::check(&config)
        .into_iter()
        .map(|p| diag(root.origin_of(&p.path), &p.path, p.message))
        .collect();
    let warnings = if opts.strict {
        errors.splice(0..0, unknown);
        Vec::new()
    } else {
        unknown
    };
    if !errors.is_empty() {
        return Err(ConfigError::Invalid(errors));
    }
    Ok(Loaded { config, warnings })
}

/// A YAML syntax error as `file:line:column: not valid YAML: what`, followed
/// by the parser's snippet of the offending text.
fn syntax_error(file: &str, e: &serde_saphyr::Error) -> ConfigError {
    let short = e.without_snippet().to_string();
    let short = short.trim_start_matches("error: ");
    let (place, what) = match e.location() {
        Some(loc) if loc.line() > 0 => {
            let prefix = format!("line {} column {}: ", loc.line(), loc.column());
            let suffix = format!(" at line {}, column {}", loc.line(), loc.column());
            (
                format!("{file}:{}:{}", loc.line(), loc.column()),
                short
                    .trim_start_matches(&prefix)
                    .trim_end_matches(&suffix)
                    .to_string(),
            )
        }
        _ => (file.to_string(), short.to_string()),
    };
    let full = e.to_string();
    let snippet = full.split_once('\n').map(|(_, rest)| rest).unwrap_or("");
    ConfigError::Syntax {
        file: place,
        message: format!("{what}\n{snippet}"),
    }
}

/// Types only the `model:` section of a YAML document (e.g. a model card or
/// a fixture config whose other sections are not training settings).
pub fn load_model_section(text: &str, file: &str) -> Result<ModelConfig, ConfigError> {
    let root = tree::parse(text).map_err(|e| syntax_error(file, &e))?;
    let empty = tree::Node {
        value: tree::Value::Null,
        origin: root.origin.clone(),
    };
    let node = match &root.value {
        tree::Value::Map(entries) => entries
            .iter()
            .rev()
            .find(|(k, _, _)| k == "model")
            .map(|(_, _, v)| v)
            .unwrap_or(&empty),
        _ => &empty,
    };
    let ctx = de::Context::default();
    ModelConfig::deserialize(de::NodeDeserializer::new(node, "model".into(), &ctx))
        .map_err(|e| located(file, e))
}

/// Types a `model:` section given as JSON (e.g. walked out of a reference
/// checkpoint's pickled config); `file` names its source in messages.
pub fn model_config_from_json(
    value: &serde_json::Value,
    file: &str,
) -> Result<ModelConfig, ConfigError> {
    let node = tree::from_json(value);
    let ctx = de::Context::default();
    ModelConfig::deserialize(de::NodeDeserializer::new(&node, "model".into(), &ctx))
        .map_err(|e| located(file, e))
}

fn located(file: &str, e: de::DeError) -> ConfigError {
    ConfigError::Invalid(vec![Diagnostic {
        file: file.to_string(),
        origin: e.origin.clone().unwrap_or(Origin::Default),
        key: e.path.clone().unwrap_or_default(),
        message: e.message.clone(),
    }])
}

/// Splits `key.path=value`, checking the key's shape.
fn parse_override(arg: &str) -> Result<(&str, &str), ConfigError> {
    let bad = || ConfigError::Override {
        arg: arg.to_string(),
    };
    let (key, value) = arg.split_once('=').ok_or_else(bad)?;
    let key = key.trim();
    let well_formed = !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if !well_formed {
        return Err(bad());
    }
    Ok((key, value.trim()))
}

impl Config {
    /// The config as YAML; reading it back gives an equal config.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("a config always serialises")
    }

    /// SHA-256 of the canonical JSON form (all defaults filled, fixed key
    /// order): configs that mean the same hash the same.
    pub fn canonical_hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("a config always serialises");
        crate::hash::sha256_hex(&json)
    }

    /// Total number of output classes of the CTC head for a tokenizer with
    /// `vocab_size` pieces: the pieces plus the blank (the last class).
    pub fn num_classes(vocab_size: usize) -> usize {
        vocab_size + 1
    }
}
