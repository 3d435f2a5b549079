//! Cutting one batch of recordings into fixed-length chunks with their words
//! (spec §5.3, with the fixes of §10.1 and §10.2).
//!
//! Chunks are the windows `[i, i + S)` for `i = 0, S, 2S, …` below the longest
//! recording. In each chunk the active recordings are those not yet finished
//! (`start < len`); a recording ending exactly on a boundary is not active in
//! the next chunk. Each word goes to the chunk holding its midpoint, so no word
//! is lost or duplicated at a boundary (a midpoint past the recording's end
//! goes to its last chunk). A chunk in which no active recording has any text
//! is skipped, and skipping never shifts the windows of later chunks.
//!
//! Recordings without word timings (`None`) are never split. One that fits
//! in a single chunk (`len <= S`) takes part in the windows like any other,
//! and its whole transcript belongs to its first (only) window
//! ([`ChunkItem::whole_transcript`]). A longer one is taken out of the shared
//! windows and becomes a chunk of its own at full length (start 0, width =
//! its length, one item carrying its whole transcript); these chunks come
//! after the windowed chunks, in batch order. The windows are then laid over
//! the remaining recordings only.

use anyhow::{bail, Result};

use crate::audio::features::N_MELS;
use crate::data::manifest::Word;

/// Feature frames per second (10 ms hop).
pub const FRAMES_PER_SECOND: f64 = 100.0;

/// One recording's part of a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkItem {
    /// Index of the recording within the batch.
    pub recording: usize,
    /// Valid frames of this recording in the chunk: `min(width, len - start)`.
    pub valid: usize,
    /// The words whose midpoints fall in this chunk, in transcript order.
    pub words: Vec<String>,
    /// True when the recording has no word timings and this chunk carries
    /// its whole transcript; `words` is then empty.
    pub whole_transcript: bool,
}

/// One chunk of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// First frame of the window.
    pub start: usize,
    /// Width of the window in frames: `S`, or less for the last window; the
    /// recording's full length for an untimed recording longer than `S`.
    pub width: usize,
    /// The active recordings, in batch order.
    pub items: Vec<ChunkItem>,
}

/// The chunk index holding a word's midpoint in a recording of `len` frames
/// (`len > 0`), clamped to the recording's last chunk.
fn word_chunk(w: &Word, len: usize, chunk: usize) -> usize {
    let mid = ((w.start + w.end) / 2.0 * FRAMES_PER_SECOND).floor();
    // `as` saturates: negative and NaN midpoints land in frame 0.
    let frame = (mid as usize).min(len - 1);
    frame / chunk
}

/// The kept chunks of a batch with recording `lengths` in frames, their
/// `words` (`None`: no timings) and chunk length `chunk` in frames: the
/// windowed chunks first, then one full-length chunk per untimed recording
/// longer than `chunk`, in batch order.
pub fn chunk_batch(
    lengths: &[usize],
    words: &[Option<Vec<Word>>],
    chunk: usize,
) -> Result<Vec<Chunk>> {
    if chunk == 0 {
        bail!("chunk length must be at least one frame");
    }
    if lengths.len() != words.len() {
        bail!(
            "batch has {} lengths but {} transcripts",
            lengths.len(),
            words.len()
        );
    }
    // Untimed recordings longer than a chunk are trained alone, unsplit.
    let alone: Vec<bool> = lengths
        .iter()
        .zip(words)
        .map(|(&len, ws)| ws.is_none() && len > chunk)
        .collect();
    let windowed = |b: usize| !alone[b];
    let max_len = (0..lengths.len())
        .filter(|&b| windowed(b))
        .map(|b| lengths[b])
        .max()
        .unwrap_or(0);
    let n_chunks = max_len.div_ceil(chunk);
    // per_chunk[c][b]: the words of recording b assigned to chunk c.
    let mut per_chunk: Vec<Vec<Vec<String>>> = vec![vec![Vec::new(); lengths.len()]; n_chunks];
    for (b, (&len, ws)) in lengths.iter().zip(words).enumerate() {
        match ws {
            Some(ws) if !ws.is_empty() => {
                if len == 0 {
                    bail!("recording {b} has words but no frames");
                }
                for w in ws {
                    per_chunk[word_chunk(w, len, chunk)][b].push(w.word.clone());
                }
            }
            None if len == 0 => bail!("recording {b} has a transcript but no frames"),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (c, chunk_words) in per_chunk.into_iter().enumerate() {
        let start = c * chunk;
        let width = chunk.min(max_len - start);
        let mut has_text = false;
        let items: Vec<ChunkItem> = chunk_words
            .into_iter()
            .enumerate()
            .filter(|&(b, _)| windowed(b) && start < lengths[b])
            .map(|(b, ws)| {
                let whole_transcript = words[b].is_none();
                has_text |= whole_transcript || !ws.is_empty();
                ChunkItem {
                    recording: b,
                    valid: width.min(lengths[b] - start),
                    words: ws,
                    whole_transcript,
                }
            })
            .collect();
        if has_text {
            out.push(Chunk {
                start,
                width,
                items,
            });
        }
    }
    out.extend((0..lengths.len()).filter(|&b| alone[b]).map(|b| Chunk {
        start: 0,
        width: lengths[b],
        items: vec![ChunkItem {
            recording: b,
            valid: lengths[b],
            words: Vec::new(),
            whole_transcript: true,
        }],
    }));
    Ok(out)
}

/// The `(N_MELS, width)` row-major window of one recording's `(N_MELS, frames)`
/// features starting at frame `start`, zero beyond the recording's end.
pub fn slice_features(
    features: &[f32],
    frames: usize,
    start: usize,
    width: usize,
) -> Result<Vec<f32>> {
    if features.len() != N_MELS * frames {
        bail!(
            "features have {} values, expected {N_MELS} x {frames}",
            features.len()
        );
    }
    let mut out = vec![0.0f32; N_MELS * width];
    let end = frames.min(start.saturating_add(width));
    if start < end {
        let n = end - start;
        for (row, dst) in features
            .chunks_exact(frames)
            .zip(out.chunks_exact_mut(width))
        {
            dst[..n].copy_from_slice(&row[start..end]);
        }
    }
    Ok(out)
}
