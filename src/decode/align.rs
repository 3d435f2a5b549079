//! Word timestamps from a greedy CTC alignment, and subtitle/JSON writers.
//!
//! A word starts at a SentencePiece piece beginning with `▁` (U+2581). A
//! word's start is the first frame of its first token. CTC emits a word's
//! tokens as spikes a frame or two long, so the last token's frames end
//! before the word's sound does: a word's end is placed in the middle of the
//! blank run between its last token and the next word's first token (for
//! the last word, the end of the recording), at most
//! [`MAX_END_EXTENSION_SECONDS`] past its last token. Frames count the
//! output frame duration (0.08 s for 8x subsampling of 10 ms features).
//!
//! The end rule was chosen on the demo corpus's training recordings (ends
//! within 100 ms: 66 % with the rule, 54 % at the last token's frame, for
//! the SpecAugment-trained demo model) and then measured on held-out voices
//! (BENCHMARKS.md).

use serde::Serialize;

use super::greedy::AlignedToken;

/// The SentencePiece word-boundary marker.
pub const WORD_MARKER: char = '\u{2581}';

/// Output frame duration of an 8x subsampling model on 10 ms features.
pub const FRAME_SECONDS_8X: f64 = 0.08;

/// One word with its time span in seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WordTiming {
    /// The word's text (pieces joined, marker removed).
    pub word: String,
    /// Start time in seconds.
    pub start: f64,
    /// End time in seconds.
    pub end: f64,
}

/// Longest extension of a word's end past its last token, in seconds.
pub const MAX_END_EXTENSION_SECONDS: f64 = 0.32;

/// Group aligned tokens of a recording of `total_frames` output frames into
/// words. `piece` maps a token id to its piece, or `None` for ids to skip
/// (control pieces such as `[PAD]`, `[BOS]`).
pub fn word_timestamps<'a>(
    tokens: &[AlignedToken],
    piece: impl Fn(u32) -> Option<&'a str>,
    frame_seconds: f64,
    total_frames: usize,
) -> Vec<WordTiming> {
    // (text, first frame, one past the last token frame) of each word.
    let mut spans: Vec<(String, usize, usize)> = Vec::new();
    let mut current: Option<(String, usize, usize)> = None;
    let mut flush = |current: &mut Option<(String, usize, usize)>| {
        if let Some(span) = current.take() {
            if !span.0.is_empty() {
                spans.push(span);
            }
        }
    };
    for t in tokens {
        let Some(p) = piece(t.id) else { continue };
        if let Some(rest) = p.strip_prefix(WORD_MARKER) {
            flush(&mut current);
            current = Some((
                rest.replace(WORD_MARKER, " ").trim().to_string(),
                t.start_frame,
                t.end_frame,
            ));
        } else {
            match current.as_mut() {
                Some((word, _, e)) => {
                    word.push_str(p);
                    *e = t.end_frame;
                }
                None => current = Some((p.to_string(), t.start_frame, t.end_frame)),
            }
        }
    }
    flush(&mut current);
    let next_starts: Vec<usize> = spans
        .iter()
        .skip(1)
        .map(|w| w.1)
        .chain([total_frames])
        .collect();
    spans
        .into_iter()
        .zip(next_starts)
        .map(|((word, s, e), next)| {
            let gap = next.saturating_sub(e) as f64 * frame_seconds;
            let end = e as f64 * frame_seconds + (gap / 2.0).min(MAX_END_EXTENSION_SECONDS);
            WordTiming {
                word,
                start: to_millis(s as f64 * frame_seconds),
                end: to_millis(end),
            }
        })
        .collect()
}

/// Round to the millisecond (keeps JSON free of float noise).
fn to_millis(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// How words are grouped into subtitle cues.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CueOptions {
    /// Most words in one cue.
    pub max_words: usize,
    /// Longest cue, in seconds (a single longer word still gets a cue).
    pub max_duration: f64,
    /// A silence longer than this (seconds) between words starts a new cue.
    pub max_gap: f64,
}

impl Default for CueOptions {
    /// 12 words, 6 s, 1.5 s gap.
    fn default() -> Self {
        Self {
            max_words: 12,
            max_duration: 6.0,
            max_gap: 1.5,
        }
    }
}

/// One subtitle cue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cue {
    /// Start time in seconds.
    pub start: f64,
    /// End time in seconds.
    pub end: f64,
    /// The cue's words joined by spaces.
    pub text: String,
}

/// Group words into cues.
pub fn cues(words: &[WordTiming], opts: &CueOptions) -> Vec<Cue> {
    let mut out: Vec<Cue> = Vec::new();
    let mut n_words = 0usize;
    for w in words {
        let start_new = match out.last() {
            None => true,
            Some(c) => {
                n_words >= opts.max_words.max(1)
                    || w.end - c.start > opts.max_duration
                    || w.start - c.end > opts.max_gap
            }
        };
        if start_new {
            out.push(Cue {
                start: w.start,
                end: w.end,
                text: w.word.clone(),
            });
            n_words = 1;
        } else if let Some(c) = out.last_mut() {
            c.text.push(' ');
            c.text.push_str(&w.word);
            c.end = c.end.max(w.end);
            n_words += 1;
        }
    }
    out
}

/// `HH:MM:SS<sep>mmm`, rounded to the millisecond (negative times clamp to 0).
fn timestamp(seconds: f64, sep: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    let (h, rem) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rem) = (rem / 60_000, rem % 60_000);
    let (s, ms) = (rem / 1000, rem % 1000);
    format!("{h:02}:{m:02}:{s:02}{sep}{ms:03}")
}

/// SubRip (SRT) text: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`.
pub fn to_srt(cues: &[Cue]) -> String {
    let mut out = String::new();
    for (i, c) in cues.iter().enumerate() {
        out.push_str(&format!(
            "{}\n{} --> {}\n{}\n\n",
            i + 1,
            timestamp(c.start, ','),
            timestamp(c.end, ','),
            c.text
        ));
    }
    out
}

/// WebVTT text: a `WEBVTT` header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues.
pub fn to_vtt(cues: &[Cue]) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for c in cues {
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            timestamp(c.start, '.'),
            timestamp(c.end, '.'),
            c.text
        ));
    }
    out
}

#[derive(Serialize)]
struct Transcript<'a> {
    text: String,
    words: &'a [WordTiming],
}

/// JSON: `{"text": "...", "words": [{"word", "start", "end"}, ...]}`.
pub fn to_json(words: &[WordTiming]) -> String {
    let text = words
        .iter()
        .map(|w| w.word.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    serde_json::to_string_pretty(&Transcript { text, words }).unwrap_or_else(|_| String::from("{}"))
}
