//! `lcasr transcribe`: an audio file (any supported format) → features →
//! long-form posteriors → greedy CTC → text, with word timestamps from the
//! CTC alignment, written as JSON, SubRip or WebVTT.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
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
