//! `metrics.jsonl`: one JSON object per line, per step or event.
//!
//! Each record is written with a single `write` of the whole line and flushed,
//! so a killed process leaves at most one partial last line; readers skip it,
//! and a resumed run cuts the file back to its checkpoint before appending.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// Appends records to a metrics file.
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens `path` for appending, creating it if missing.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        Ok(MetricsWriter {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one record (a JSON object) as one line.
    pub fn write(&mut self, record: &Value) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .with_context(|| format!("cannot write to {}", self.path.display()))
    }
}

/// The complete records of a metrics file, in order. A partial last line (a
/// process killed mid-write) is ignored; a malformed line elsewhere is an
/// error naming its line number.
pub fn read_metrics(path: &Path) -> anyhow::Result<Vec<Value>> {
    let file =
        File::open(path).with_context(|| format!("cannot open metrics file {}", path.display()))?;
    let mut records = Vec::new();
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut number = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        number += 1;
        if !line.ends_with('\n') {
            break; // the partial line of an interrupted write
        }
        let record = serde_json::from_str(line.trim_end())
            .with_context(|| format!("{}:{number}: not a JSON record", path.display()))?;
        records.push(record);
    }
    Ok(records)
}

/// Rewrites the file keeping the leading records for which `keep` holds (up
/// to the first that fails), atomically; returns how many were kept. Used on
/// resume to drop what was logged after the checkpoint being resumed.
pub fn truncate_metrics(path: &Path, keep: impl Fn(&Value) -> bool) -> anyhow::Result<usize> {
    let records = read_metrics(path)?;
    let kept: Vec<&Value> = records.iter().take_while(|r| keep(r)).collect();
    let mut text = Vec::new();
    for r in &kept {
        serde_json::to_writer(&mut text, r)?;
        text.push(b'\n');
    }
    crate::fsutil::write_atomic(path, &text)
        .with_context(|| format!("cannot replace metrics file {}", path.display()))?;
    Ok(kept.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn temp_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lcasr-metrics-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("metrics.jsonl")
    }

    #[test]
    fn append_read_and_partial_last_line() {
        let path = temp_file("a");
        let mut w = MetricsWriter::open(&path).unwrap();
        for step in 0..5 {
            w.write(&json!({"step": step, "loss": 1.0 / (step + 1) as f64}))
                .unwrap();
        }
        drop(w);
        // A process killed mid-write leaves a partial line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"step\": 5, \"lo").unwrap();
        let records = read_metrics(&path).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[4]["step"], 4);
        // Resume from the checkpoint at step 3: later records are dropped.
        let kept = truncate_metrics(&path, |r| r["step"].as_u64().unwrap() < 3).unwrap();
        assert_eq!(kept, 3);
        let mut w = MetricsWriter::open(&path).unwrap();
        w.write(&json!({"step": 3})).unwrap();
        let steps: Vec<u64> = read_metrics(&path)
            .unwrap()
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, vec![0, 1, 2, 3]);
    }

    #[test]
    fn malformed_middle_line_is_an_error_with_its_line() {
        let path = temp_file("b");
        std::fs::write(&path, "{\"step\":0}\nnot json\n{\"step\":2}\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.ends_with("metrics.jsonl:2: not a JSON record"), "{err}");
    }
}
