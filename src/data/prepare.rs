//! `lcasr prepare`: audio + transcripts → a feature cache (one fp16
//! safetensors file per recording) and a manifest.
//!
//! Inputs: a directory of audio files with same-named transcripts (`.txt`
//! plain text, or `.json`: `{"text", "words": [{"word","start","end"}]}` or a
//! Google STT transcript as in the reference corpus), or a CSV/TSV/JSONL
//! listing (`audio`/`path`, `text`, optional `words`). Files are processed in
//! parallel; one bad file is reported and skipped, never fatal; a file whose
//! audio content and feature recipe are unchanged is not recomputed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use super::manifest::{parse_google_transcript, Manifest, Recording, Word};
use crate::audio::decode::{load_16k, LoadOptions};
use crate::audio::features::{features_with, FeatureRecipe, SAMPLE_RATE};

/// Audio file extensions picked up from a directory.
const AUDIO_EXTENSIONS: &[&str] = &["wav", "flac", "mp3", "ogg"];

/// One recording to prepare.
#[derive(Clone, Debug)]
pub struct Source {
    /// Unique id (the file stem, or the listing's id).
    pub id: String,
    /// The audio file.
    pub audio: PathBuf,
    /// Plain transcript.
    pub text: Option<String>,
    /// Time-aligned words.
    pub words: Option<Vec<Word>>,
}

/// A file that could not be used, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// The offending file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// What `prepare` did.
#[derive(Debug, Default)]
pub struct PrepareReport {
    /// Recordings whose features were computed now.
    pub computed: usize,
    /// Recordings whose cached features were still valid.
    pub reused: usize,
    /// Files skipped, with the reason.
    pub problems: Vec<Problem>,
}

/// How to prepare.
#[derive(Clone, Debug, Default)]
pub struct PrepareOptions {
    /// Feature recipe (the reference's power-mel by default).
    pub recipe: FeatureRecipe,
    /// Decoding options (channel selection, resampler).
    pub load: LoadOptions,
}

/// Finds the recordings of `input` (a directory or a listing file); files
/// that cannot be paired with a transcript become problems.
pub fn discover(input: &Path) -> Result<(Vec<Source>, Vec<Problem>)> {
    if input.is_dir() {
        discover_dir(input)
    } else {
        let ext = extension(input);
        match ext.as_str() {
            "csv" | "tsv" => discover_table(input, if ext == "csv" { ',' } else { '\t' }),
            "jsonl" => discover_jsonl(input),
            _ => bail!(
                "{}: expected a directory or a .csv/.tsv/.jsonl listing",
                input.display()
            ),
        }
    }
}

fn extension(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

fn discover_dir(dir: &Path) -> Result<(Vec<Source>, Vec<Problem>)> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && AUDIO_EXTENSIONS.contains(&extension(p).as_str()))
        .collect();
    entries.sort();
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    for audio in entries {
        let id = audio
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let txt = audio.with_extension("txt");
        let json = audio.with_extension("json");
        let transcript = if json.exists() {
            read_json_transcript(&json).map(|(text, words)| (text, Some(words)))
        } else if txt.exists() {
            std::fs::read_to_string(&txt)
                .map(|t| (Some(t.trim().to_string()), None))
                .with_context(|| format!("cannot read {}", txt.display()))
        } else {
            Err(anyhow!(
                "no transcript (expected {} or {})",
                txt.file_name().unwrap_or_default().to_string_lossy(),
                json.file_name().unwrap_or_default().to_string_lossy()
            ))
        };
        match transcript {
            Ok((text, words)) => sources.push(Source {
                id,
                audio,
                text,
                words,
            }),
            Err(e) => problems.push(Problem {
                path: audio,
                message: format!("{e:#}"),
            }),
        }
    }
    Ok((sources, problems))
}

#[derive(Deserialize)]
struct JsonTranscript {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    words: Option<Vec<Word>>,
}

/// Our `{"text", "words"}` JSON, or a Google STT transcript.
fn read_json_transcript(path: &Path) -> Result<(Option<String>, Vec<Word>)> {
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Ok(JsonTranscript {
        text,
        words: Some(words),
    }) = serde_json::from_str::<JsonTranscript>(&raw)
    {
        return Ok((text, words));
    }
    let words = parse_google_transcript(&raw).with_context(|| format!("in {}", path.display()))?;
    Ok((None, words))
}

fn discover_table(path: &Path, sep: char) -> Result<(Vec<Source>, Vec<Problem>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines
        .next()
        .ok_or_else(|| anyhow!("{}: empty listing", path.display()))?;
    let columns: Vec<String> = header.split(sep).map(|c| c.trim().to_lowercase()).collect();
    let col = |names: &[&str]| columns.iter().position(|c| names.contains(&c.as_str()));
    let audio_col = col(&["audio", "path", "file"]).ok_or_else(|| {
        anyhow!(
            "{}: the header needs an `audio` (or `path`) column",
            path.display()
        )
    })?;
    let text_col = col(&["text", "transcript", "sentence"]);
    let base = path.parent().unwrap_or(Path::new("."));
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in lines {
        let fields: Vec<&str> = line.split(sep).collect();
        let Some(audio) = fields.get(audio_col).map(|f| base.join(f.trim())) else {
            problems.push(Problem {
                path: path.to_path_buf(),
                message: format!("line {}: no audio column", i + 1),
            });
            continue;
        };
        let text = text_col
            .and_then(|c| fields.get(c))
            .map(|t| t.trim().trim_matches('"').to_string());
        sources.push(Source {
            id: stem_id(&audio),
            audio,
            text,
            words: None,
        });
    }
    Ok((sources, problems))
}

#[derive(Deserialize)]
struct JsonlEntry {
    #[serde(alias = "path")]
    audio: PathBuf,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    words: Option<Vec<Word>>,
}

fn discover_jsonl(path: &Path) -> Result<(Vec<Source>, Vec<Problem>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str::<JsonlEntry>(line) {
            Ok(e) => {
                let audio = base.join(&e.audio);
                sources.push(Source {
                    id: e.id.unwrap_or_else(|| stem_id(&audio)),
                    audio,
                    text: e.text,
                    words: e.words,
                })
            }
            Err(e) => problems.push(Problem {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            }),
        }
    }
    Ok((sources, problems))
}

fn stem_id(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Computes (or reuses) the features of every source into `out/features/`,
/// writes `out/manifest.json`, and reports. `progress(done, total)` is called
/// as recordings finish.
pub fn prepare(
    sources: &[Source],
    out: &Path,
    opts: &PrepareOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<(Manifest, PrepareReport)> {
    let feature_dir = out.join("features");
    std::fs::create_dir_all(&feature_dir)
        .with_context(|| format!("cannot create {}", feature_dir.display()))?;
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for s in sources {
        if let Some(first) = seen.insert(&s.id, &s.audio) {
            bail!(
                "two recordings share the id `{}`: {} and {}",
                s.id,
                first.display(),
                s.audio.display()
            );
        }
    }
    let done = AtomicUsize::new(0);
    let results: Vec<Result<(Recording, bool), Problem>> = sources
        .par_iter()
        .map(|s| {
            let r = prepare_one(s, &feature_dir, opts).map_err(|e| Problem {
                path: s.audio.clone(),
                message: format!("{e:#}"),
            });
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, sources.len());
            r
        })
        .collect();
    let mut report = PrepareReport::default();
    let mut recordings = Vec::new();
    for r in results {
        match r {
            Ok((rec, reused)) => {
                if reused {
                    report.reused += 1;
                } else {
                    report.computed += 1;
                }
                recordings.push(rec);
            }
            Err(p) => report.problems.push(p),
        }
    }
    let manifest = Manifest { recordings };
    manifest.save(out.join("manifest.json"))?;
    Ok((manifest, report))
}

/// Metadata keys of a cached feature file.
const META_SOURCE: &str = "source_sha256";
const META_RECIPE: &str = "recipe";
const META_SAMPLES: &str = "samples_16k";

fn prepare_one(s: &Source, feature_dir: &Path, opts: &PrepareOptions) -> Result<(Recording, bool)> {
    if s.text.as_deref().is_none_or(|t| t.trim().is_empty())
        && s.words.as_ref().is_none_or(|w| w.is_empty())
    {
        bail!("the transcript is empty");
    }
    let bytes =
        std::fs::read(&s.audio).with_context(|| format!("cannot read {}", s.audio.display()))?;
    let hash = crate::hash::sha256_hex(&bytes);
    let recipe = opts.recipe.name();
    let file = feature_dir.join(format!("{}.safetensors", s.id));
    let relative = PathBuf::from("features").join(format!("{}.safetensors", s.id));
    let recording = |samples: usize| Recording {
        id: s.id.clone(),
        features: relative.clone(),
        duration: samples as f64 / SAMPLE_RATE as f64,
        words: s.words.clone(),
        text: s.text.clone(),
    };
    if let Some(samples) = cached_samples(&file, &hash, recipe) {
        return Ok((recording(samples), true));
    }
    let samples = load_16k(&s.audio, &opts.load)?;
    let feats = features_with(&samples, opts.recipe)?
        .squeeze(0)?
        .to_dtype(DType::F16)?;
    let metadata: HashMap<String, String> = [
        (META_SOURCE.to_string(), hash),
        (META_RECIPE.to_string(), recipe.to_string()),
        (META_SAMPLES.to_string(), samples.len().to_string()),
    ]
    .into();
    let data = safetensors::serialize([("features", &feats)], Some(metadata))?;
    crate::fsutil::write_atomic(&file, &data)?;
    Ok((recording(samples.len()), false))
}

/// The sample count recorded in a valid cached feature file made from the
/// same audio with the same recipe.
fn cached_samples(file: &Path, hash: &str, recipe: &str) -> Option<usize> {
    let bytes = std::fs::read(file).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let meta = meta.metadata().as_ref()?;
    (meta.get(META_SOURCE)? == hash && meta.get(META_RECIPE)? == recipe)
        .then(|| meta.get(META_SAMPLES)?.parse().ok())
        .flatten()
}

/// Reads a cached feature file (ours or a reference `.spec.pt`) as (80, T) f32.
pub fn load_features(path: &Path) -> Result<Tensor> {
    Ok(super::dataset::read_whole_features(path)?.0)
}

/// The recipe `prepare` recorded in the metadata of a safetensors feature
/// cache, if any.
pub fn cache_recipe(bytes: &[u8]) -> Option<FeatureRecipe> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    FeatureRecipe::from_name(meta.metadata().as_ref()?.get(META_RECIPE)?)
}
