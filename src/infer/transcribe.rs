//! `lcasr transcribe`: an audio file (any supported format) → features →
//! long-form posteriors → greedy CTC → text, with word timestamps from the
//! CTC alignment, written as JSON, SubRip or WebVTT.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use super::load::LoadedModel;
use super::longform::{log_probs_with_progress, ContextOptions};
use crate::audio::decode::{load_16k, LoadOptions};
use crate::audio::features::{features_with, SAMPLE_RATE};
use crate::decode::align::{cues, to_srt, to_vtt, word_timestamps, CueOptions, WordTiming};
use crate::decode::greedy::greedy_with_frames;
use crate::text::tokenizer::Tokenizer;

/// The transcript of one audio file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Transcript {
    /// The audio file.
    pub audio: PathBuf,
    /// Its duration in seconds.
    pub duration: f64,
    /// The decoded text.
    pub text: String,
    /// Every word with its start and end in seconds, in order.
    pub words: Vec<WordTiming>,
}

impl Transcript {
    /// JSON: `{"audio", "duration", "text", "words": [{"word", "start", "end"}]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a transcript always serialises")
    }

    /// SubRip subtitles (words grouped into cues with the default [`CueOptions`]).
    pub fn to_srt(&self) -> String {
        to_srt(&cues(&self.words, &CueOptions::default()))
    }

    /// WebVTT subtitles (words grouped into cues with the default [`CueOptions`]).
    pub fn to_vtt(&self) -> String {
        to_vtt(&cues(&self.words, &CueOptions::default()))
    }
}

/// The ways a transcript can be written out (see [`Transcript::render`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TranscriptFormat {
    /// The text alone, one line.
    Text,
    /// JSON: the text and every word with its start and end in seconds.
    Json,
    /// SubRip subtitles.
    Srt,
    /// WebVTT subtitles.
    Vtt,
}

impl TranscriptFormat {
    /// The file extension of the format (`txt` for text).
    pub fn extension(self) -> &'static str {
        match self {
            Self::Text => "txt",
            Self::Json => "json",
            Self::Srt => "srt",
            Self::Vtt => "vtt",
        }
    }
}

impl Transcript {
    /// The transcript in `format`, ending in a newline: the text,
    /// [`Transcript::to_json`], [`Transcript::to_srt`] or [`Transcript::to_vtt`].
    pub fn render(&self, format: TranscriptFormat) -> String {
        let mut out = match format {
            TranscriptFormat::Text => self.text.clone(),
            TranscriptFormat::Json => self.to_json(),
            TranscriptFormat::Srt => self.to_srt(),
            TranscriptFormat::Vtt => self.to_vtt(),
        };
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

/// Where the transcripts of `audio` go: `<file stem>.<extension>` each, in
/// `out_dir`. Two inputs with the same stem would overwrite each other's
/// transcript, which is an error naming both.
pub fn output_paths(audio: &[PathBuf], out_dir: &Path, extension: &str) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = Vec::with_capacity(audio.len());
    for file in audio {
        let mut name = file
            .file_stem()
            .ok_or_else(|| anyhow!("{}: not a file name", file.display()))?
            .to_os_string();
        name.push(".");
        name.push(extension);
        let path = out_dir.join(name);
        if let Some(i) = paths.iter().position(|p| *p == path) {
            bail!(
                "{} and {} would both be written to {}: transcribe them into different --out \
                 directories",
                audio[i].display(),
                file.display(),
                path.display()
            );
        }
        paths.push(path);
    }
    Ok(paths)
}

/// Transcribes `audio` at the context of `opts`.
pub fn transcribe(model: &LoadedModel, audio: &Path, opts: &ContextOptions) -> Result<Transcript> {
    transcribe_with_progress(model, audio, opts, &|_, _| {})
}

/// [`transcribe`], calling `progress(windows_done, windows_total)` as the
/// model works through the recording.
pub fn transcribe_with_progress(
    model: &LoadedModel,
    audio: &Path,
    opts: &ContextOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<Transcript> {
    let tokenizer = model.require_tokenizer()?;
    let samples = load_16k(audio, &LoadOptions::default())?;
    let features = features_with(&samples, model.recipe)?.squeeze(0)?;
    let lp = log_probs_with_progress(&model.encoder, &features, opts, progress)
        .with_context(|| format!("cannot transcribe {}", audio.display()))?;
    let (frames, classes) = lp.dims2()?;
    let aligned = greedy_with_frames(
        &lp.flatten_all()?.to_vec1::<f32>()?,
        frames,
        classes,
        model.blank(),
    );
    let ids: Vec<u32> = aligned.iter().map(|t| t.id).collect();
    let surfaces = piece_surfaces(tokenizer);
    let words = word_timestamps(
        &aligned,
        |id| surfaces.get(id as usize).and_then(|s| s.as_deref()),
        model.frame_seconds(),
        frames,
    );
    Ok(Transcript {
        audio: audio.to_path_buf(),
        duration: samples.len() as f64 / SAMPLE_RATE as f64,
        text: tokenizer.decode(&ids),
        words,
    })
}

/// What each id contributes to a word: word-initial pieces as they are
/// (their `▁` starts a word), other pieces as decoded text; `None` for
/// control pieces, which decode to nothing.
fn piece_surfaces(tokenizer: &Tokenizer) -> Vec<Option<String>> {
    (0..tokenizer.vocab_size() as u32)
        .map(|id| {
            let piece = tokenizer.id_to_piece(id)?;
            if piece.starts_with(crate::decode::align::WORD_MARKER) {
                return Some(piece.to_string());
            }
            let text = tokenizer.decode(&[id]);
            (!text.is_empty()).then_some(text)
        })
        .collect()
}
