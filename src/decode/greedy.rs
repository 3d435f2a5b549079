//! Greedy (best-path) CTC decoding: argmax per frame, collapse repeats, drop
//! the blank (reference §8.1).

use rayon::prelude::*;

/// One emitted token of a greedy CTC path, with the frames it spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlignedToken {
    /// The class id (never the blank).
    pub id: u32,
    /// First frame of the run of identical argmaxes that emitted the token.
    pub start_frame: usize,
    /// One past the last frame of that run.
    pub end_frame: usize,
}

/// Index of the largest value of `row`; the first one wins ties and NaN never wins.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best
}

/// Greedy CTC decoding of one utterance.
///
/// `log_probs` is row-major `frames x classes` (log-probabilities or any
/// monotone score). Returns the token ids after collapsing repeats and
/// dropping `blank`.
///
/// # Panics
/// If `log_probs.len() != frames * classes` (a caller bug, not user input).
pub fn greedy(log_probs: &[f32], frames: usize, classes: usize, blank: u32) -> Vec<u32> {
    greedy_with_frames(log_probs, frames, classes, blank)
        .into_iter()
        .map(|t| t.id)
        .collect()
}

/// Greedy CTC decoding that also reports, for every emitted token, the run of
/// frames where it was the argmax (for timestamps).
///
/// # Panics
/// If `log_probs.len() != frames * classes`.
pub fn greedy_with_frames(
    log_probs: &[f32],
    frames: usize,
    classes: usize,
    blank: u32,
) -> Vec<AlignedToken> {
    assert_eq!(
        log_probs.len(),
        frames * classes,
        "greedy: log_probs holds {} values, expected frames {frames} x classes {classes}",
        log_probs.len()
    );
    let mut out: Vec<AlignedToken> = Vec::new();
    let mut previous: Option<u32> = None;
    for t in 0..frames {
        let id = argmax(&log_probs[t * classes..(t + 1) * classes]) as u32;
        if Some(id) == previous {
            if id != blank {
                if let Some(last) = out.last_mut() {
                    last.end_frame = t + 1;
                }
            }
            continue;
        }
        previous = Some(id);
        if id != blank {
            out.push(AlignedToken {
                id,
                start_frame: t,
                end_frame: t + 1,
            });
        }
    }
    out
}

/// Greedy decoding of many utterances in parallel (rayon). Each slice holds
/// one utterance, `frames x classes` row-major with `frames = len / classes`.
///
/// # Panics
/// If a slice length is not a multiple of `classes`.
pub fn greedy_batch(utterances: &[&[f32]], classes: usize, blank: u32) -> Vec<Vec<u32>> {
    utterances
        .par_iter()
        .map(|u| {
            assert_eq!(
                u.len() % classes.max(1),
                0,
                "utterance not a multiple of classes"
            );
            greedy(u, u.len() / classes.max(1), classes, blank)
        })
        .collect()
}
