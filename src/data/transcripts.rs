//! Collecting transcripts for tokenizer training: from plain text files (one
//! transcript per line) or from manifests (their texts, or their words joined).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::manifest::Manifest;

/// Every non-empty transcript of `files`. A `.json` file is read as a
/// manifest (ours or the reference's pair index); anything else as text.
pub fn collect(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for file in files {
        if is_json(file) {
            let manifest = Manifest::load(file)?;
            for rec in &manifest.recordings {
                let text = match (&rec.text, &rec.words) {
                    (Some(t), _) => t.clone(),
                    (None, Some(words)) => words
                        .iter()
                        .map(|w| w.word.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                    (None, None) => String::new(),
                };
                push(&mut out, &text);
            }
        } else {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read transcripts from {}", file.display()))?;
            for line in text.lines() {
                push(&mut out, line);
            }
        }
    }
    if out.is_empty() {
        bail!("no transcripts found in the given files");
    }
    Ok(out)
}

fn is_json(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

fn push(out: &mut Vec<String>, text: &str) {
    let text = text.trim();
    if !text.is_empty() {
        out.push(text.to_string());
    }
}
