//! The list of training recordings: feature cache path, duration and
//! transcript (word timings or plain text) of each.
//!
//! Two file formats are read by [`Manifest::load`]:
//! - our own manifest: `{"version": 1, "recordings": [ {"id", "features",
//!   "duration", "words"?, "text"?}, ... ]}`, written by [`Manifest::save`];
//! - the reference's `audio_txt_pairs.json` index: an object mapping each
//!   recording id to `{"audio": path, "txt": path, "duration": seconds}`,
//!   where `txt` is a Google-STT JSON transcript (see [`parse_google_transcript`]).
//!
//! Relative paths inside either file are resolved against the directory that
//! holds the file; [`Manifest::save`] writes paths as they are stored.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The manifest format version written by [`Manifest::save`].
pub const MANIFEST_VERSION: u64 = 1;

/// One transcribed word with its time span in seconds from the recording start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Word {
    /// The word as transcribed (original case and punctuation).
    pub word: String,
    /// Start time in seconds.
    pub start: f64,
    /// End time in seconds.
    pub end: f64,
}

/// One recording of the training set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recording {
    /// Unique id.
    pub id: String,
    /// The feature cache file of this recording.
    pub features: PathBuf,
    /// Duration in seconds (used to sort recordings into batches).
    pub duration: f64,
    /// Time-aligned words, when the transcript has timings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub words: Option<Vec<Word>>,
    /// Plain transcript, for recordings without word timings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// The recordings of a data set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifest {
    /// All recordings, in file order (reference indices: sorted by id).
    pub recordings: Vec<Recording>,
}

/// The on-disk shape of our own manifest.
#[derive(Serialize)]
struct ManifestFile<'a> {
    version: u64,
    recordings: &'a [Recording],
}

impl Manifest {
    /// Reads a manifest in our own format or a reference `audio_txt_pairs.json`
    /// index (whose transcripts are read too). Errors name the file and entry.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read manifest {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let base = path.parent().unwrap_or_else(|| Path::new(""));
        let manifest = if is_own_format(&value) {
            load_own(&value, base)
        } else {
            load_reference_pairs(&value, base)
        }
        .with_context(|| format!("in manifest {}", path.display()))?;
        Ok(manifest)
    }

    /// Writes the manifest in our own format, atomically (temporary file in the
    /// same directory, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        for (i, rec) in self.recordings.iter().enumerate() {
            validate(rec).with_context(|| format!("recording #{i} ('{}')", rec.id))?;
        }
        let json = serde_json::to_string_pretty(&ManifestFile {
            version: MANIFEST_VERSION,
            recordings: &self.recordings,
        })?;
        crate::fsutil::write_atomic(path, json.as_bytes())
            .with_context(|| format!("cannot save manifest {}", path.display()))?;
        Ok(())
    }
}

/// True for `{"version": <number>, "recordings": [...]}`.
fn is_own_format(value: &Value) -> bool {
    value.get("version").is_some_and(Value::is_u64)
        && value.get("recordings").is_some_and(Value::is_array)
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn load_own(value: &Value, base: &Path) -> Result<Manifest> {
    let version = value["version"].as_u64().unwrap_or(0);
    if version != MANIFEST_VERSION {
        bail!(
            "unsupported manifest version {version} (this build reads version {MANIFEST_VERSION})"
        );
    }
    let entries = value["recordings"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut recordings = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let id = entry.get("id").and_then(Value::as_str).unwrap_or("?");
        let mut rec: Recording = serde_json::from_value(entry.clone())
            .with_context(|| format!("recording #{i} ('{id}')"))?;
        validate(&rec).with_context(|| format!("recording #{i} ('{id}')"))?;
        rec.features = resolve(base, &rec.features);
        recordings.push(rec);
    }
    Ok(Manifest { recordings })
}

fn load_reference_pairs(value: &Value, base: &Path) -> Result<Manifest> {
    let map = value.as_object().ok_or_else(|| {
        anyhow!(
            "expected our manifest ({{\"version\":1,\"recordings\":[...]}}) or a reference \
             index (an object mapping ids to {{\"audio\",\"txt\",\"duration\"}})"
        )
    })?;
    let mut recordings = Vec::with_capacity(map.len());
    for (id, entry) in map {
        let rec = reference_entry(id, entry, base).with_context(|| format!("recording '{id}'"))?;
        recordings.push(rec);
    }
    Ok(Manifest { recordings })
}

fn reference_entry(id: &str, entry: &Value, base: &Path) -> Result<Recording> {
    let field = |name: &str| {
        entry
            .get(name)
            .ok_or_else(|| anyhow!("missing field '{name}'"))
    };
    let audio = field("audio")?
        .as_str()
        .ok_or_else(|| anyhow!("field 'audio' is not a string"))?;
    let txt = field("txt")?
        .as_str()
        .ok_or_else(|| anyhow!("field 'txt' is not a string"))?;
    let duration = field("duration")?
        .as_f64()
        .ok_or_else(|| anyhow!("field 'duration' is not a number"))?;
    let txt_path = resolve(base, Path::new(txt));
    let transcript = fs::read_to_string(&txt_path)
        .with_context(|| format!("cannot read transcript {}", txt_path.display()))?;
    let words = parse_google_transcript(&transcript)
        .with_context(|| format!("in transcript {}", txt_path.display()))?;
    let rec = Recording {
        id: id.to_string(),
        features: resolve(base, Path::new(audio)),
        duration,
        words: Some(words),
        text: None,
    };
    validate(&rec)?;
    Ok(rec)
}

/// Checks the numbers of one recording: finite non-negative duration, word
/// times finite, non-negative and not ending before they start.
fn validate(rec: &Recording) -> Result<()> {
    if !rec.duration.is_finite() || rec.duration < 0.0 {
        bail!("invalid duration {}", rec.duration);
    }
    for (i, w) in rec.words.iter().flatten().enumerate() {
        check_span(w).with_context(|| format!("word #{i} ('{}')", w.word))?;
    }
    Ok(())
}

fn check_span(w: &Word) -> Result<()> {
    if !w.start.is_finite() || !w.end.is_finite() || w.start < 0.0 {
        bail!("invalid times {}..{}", w.start, w.end);
    }
    if w.end < w.start {
        bail!("ends ({}s) before it starts ({}s)", w.end, w.start);
    }
    Ok(())
}

/// Parses a Google-STT JSON transcript: the words of
/// `results[-1].alternatives[0].words`, each
/// `{"startTime": "12.300s", "endTime": "12.700s", "word": "Hello,"}`.
pub fn parse_google_transcript(json: &str) -> Result<Vec<Word>> {
    let value: Value = serde_json::from_str(json).context("transcript is not valid JSON")?;
    let results = value
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("transcript has no 'results' list"))?;
    let last = results
        .last()
        .ok_or_else(|| anyhow!("transcript 'results' list is empty"))?;
    let words = last
        .get("alternatives")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .ok_or_else(|| anyhow!("last result has no 'alternatives'"))?
        .get("words")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("first alternative of the last result has no 'words' list"))?;
    words
        .iter()
        .enumerate()
        .map(|(i, w)| parse_word(w).with_context(|| format!("word #{i}")))
        .collect()
}

fn parse_word(w: &Value) -> Result<Word> {
    let word = w
        .get("word")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("missing string field 'word'"))?;
    let time = |name: &str| -> Result<f64> {
        let s = w
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("'{word}': missing string field '{name}'"))?;
        parse_seconds(s).ok_or_else(|| anyhow!("'{word}': unparsable {name} '{s}'"))
    };
    let out = Word {
        word: word.to_string(),
        start: time("startTime")?,
        end: time("endTime")?,
    };
    check_span(&out).with_context(|| format!("'{word}'"))?;
    Ok(out)
}

/// `"12.300s"` → 12.3; `None` without the trailing `s` or with a bad number.
fn parse_seconds(s: &str) -> Option<f64> {
    s.strip_suffix('s')?.parse().ok()
}
