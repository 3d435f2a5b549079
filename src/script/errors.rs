//! Turning host errors into script errors, and script errors into the
//! message a user reads: file, line, column, the offending source line and the
//! chain of calls, never a Rust backtrace.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rhai::{EvalAltResult, Position};

/// A script-level error raised by a host function (Rhai fills in the call
/// site's position).
pub type ScriptError = Box<EvalAltResult>;

/// Result of a host function.
pub type ScriptResult<T> = Result<T, ScriptError>;

/// A runtime error with `message`.
pub fn script_error(message: impl Into<String>) -> ScriptError {
    Box::new(EvalAltResult::ErrorRuntime(
        message.into().into(),
        Position::NONE,
    ))
}

/// The text of a candle error without the backtrace candle captures when
/// `RUST_BACKTRACE` is set.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        other => other.to_string(),
    }
}

/// A candle error as a script error.
pub fn from_candle(e: candle_core::Error) -> ScriptError {
    script_error(candle_message(&e))
}

/// An anyhow error (with its causes joined by `: `) as a script error.
pub fn from_anyhow(e: anyhow::Error) -> ScriptError {
    let mut text = String::new();
    for (i, cause) in e.chain().enumerate() {
        let part = match cause.downcast_ref::<candle_core::Error>() {
            Some(c) => candle_message(c),
            None => cause.to_string(),
        };
        if i > 0 {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    script_error(text)
}

/// Extension to convert any host result into a script result.
pub trait IntoScript<T> {
    /// The result as a [`ScriptResult`].
    fn script(self) -> ScriptResult<T>;
}

impl<T> IntoScript<T> for candle_core::Result<T> {
    fn script(self) -> ScriptResult<T> {
        self.map_err(from_candle)
    }
}

impl<T> IntoScript<T> for anyhow::Result<T> {
    fn script(self) -> ScriptResult<T> {
        self.map_err(from_anyhow)
    }
}

/// The token carried by the termination error of an interrupted run.
pub const INTERRUPTED: &str = "interrupted";

/// True when `err` (or an error it wraps) is the termination of a run
/// stopped by Ctrl-C.
pub fn is_interrupt(err: &EvalAltResult) -> bool {
    match err {
        EvalAltResult::ErrorTerminated(token, _) => token.to_string() == INTERRUPTED,
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _)
        | EvalAltResult::ErrorInModule(_, inner, _) => is_interrupt(inner),
        _ => false,
    }
}

/// Formats a script error for the terminal: the innermost message, the
/// place it happened with the source line and a caret, then each enclosing
/// call. `sources` maps a source name (as given to the AST) to its text;
/// `main` names the entry script.
pub fn format_error(err: &EvalAltResult, main: &str, sources: &BTreeMap<String, String>) -> String {
    // Walk the chain outermost → innermost, remembering each call site.
    let mut frames: Vec<(String, Position, String)> = Vec::new();
    let mut current = err;
    let mut source = main.to_string();
    loop {
        match current {
            EvalAltResult::ErrorInFunctionCall(name, src, inner, pos) => {
                let label = if name.starts_with("anon$") {
                    "a closure".to_string()
                } else {
                    format!("function `{name}`")
                };
                frames.push((source.clone(), *pos, format!("in a call to {label}")));
                if !src.is_empty() {
                    source = src.clone();
                }
                current = inner;
            }
            EvalAltResult::ErrorInModule(name, inner, pos) => {
                frames.push((source.clone(), *pos, format!("in module `{name}`")));
                source = name.clone();
                current = inner;
            }
            _ => break,
        }
    }
    let message = innermost_message(current);
    let mut out = format!("error: {message}\n");
    out.push_str(&location(&source, current.position(), sources));
    for (src, pos, what) in frames.iter().rev() {
        let _ = writeln!(out, "  {what}, called at {}", place(src, *pos));
    }
    out
}

/// The message of an error without Rhai's trailing position.
fn innermost_message(err: &EvalAltResult) -> String {
    match err {
        EvalAltResult::ErrorRuntime(value, _) => {
            let text = value.to_string();
            format!("runtime error: {text}")
        }
        EvalAltResult::ErrorTerminated(..) => "the run was stopped (Ctrl-C)".to_string(),
        EvalAltResult::ErrorTooManyOperations(..) => {
            "too many operations: the script ran past its operation limit (an endless loop?)"
                .to_string()
        }
        other => {
            let mut text = other.to_string();
            let pos = other.position();
            if !pos.is_none() {
                let suffix = format!(" ({pos})");
                if let Some(stripped) = text.strip_suffix(&suffix) {
                    text = stripped.to_string();
                }
            }
            text
        }
    }
}

/// `file:line:column`.
fn place(source: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{source}:{l}:{c}"),
        (Some(l), None) => format!("{source}:{l}"),
        _ => source.to_string(),
    }
}

/// ` --> file:line:col` with the source line and a caret under the column.
fn location(source: &str, pos: Position, sources: &BTreeMap<String, String>) -> String {
    let mut out = format!("  --> {}\n", place(source, pos));
    let Some(line_no) = pos.line() else {
        return out;
    };
    let Some(line) = sources
        .get(source)
        .and_then(|text| text.lines().nth(line_no - 1))
    else {
        return out;
    };
    let gutter = line_no.to_string().len();
    let _ = writeln!(out, "{:gutter$} |", "");
    let _ = writeln!(out, "{line_no} | {line}");
    if let Some(col) = pos.position() {
        let _ = writeln!(out, "{:gutter$} | {:>col$}", "", "^");
    }
    out
}
