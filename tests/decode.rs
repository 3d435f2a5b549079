//! CTC decoding, n-gram LM, long-form window merging and timestamps.

use lcasr::decode::align::{
    cues, to_json, to_srt, to_vtt, word_timestamps, CueOptions, WordTiming,
};
use lcasr::decode::arpa::{ArpaLm, LanguageModel, BOS};
use lcasr::decode::beam::{beam_search, beam_search_batch, beam_search_lm, BeamOptions, NoLm};
use lcasr::decode::greedy::{greedy, greedy_batch, greedy_with_frames, AlignedToken};
use lcasr::decode::window::{
    buffered_windows, window_starts, BufferedMerger, Placement, WindowAverager, WindowError,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Row-major log-probabilities from rows of probabilities.
fn log_rows(rows: &[&[f32]]) -> Vec<f32> {
    rows.iter().flat_map(|r| r.iter().map(|p| p.ln())).collect()
}

/// Random log-softmax posteriors, `frames x classes`.
fn random_log_probs(
    rng: &mut ChaCha8Rng,
    frames: usize,
    classes: usize,
    sharpness: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(frames * classes);
    for _ in 0..frames {
        let logits: Vec<f32> = (0..classes)
            .map(|_| rng.random_range(-1.0f32..1.0) * sharpness)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        out.extend(logits.iter().map(|l| l - lse));
    }
    out
}

#[test]
fn greedy_collapses_repeats_and_drops_blank() {
    // Classes 0..=2 and blank 3; argmax path 0 0 3 0 1 1 3 3 2.
    let path = [0usize, 0, 3, 0, 1, 1, 3, 3, 2];
    let rows: Vec<Vec<f32>> = path
        .iter()
        .map(|&k| (0..4).map(|c| if c == k { 0.7 } else { 0.1 }).collect())
        .collect();
    let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
    let lp = log_rows(&refs);
    assert_eq!(greedy(&lp, 9, 4, 3), vec![0, 0, 1, 2]);
    let tokens = greedy_with_frames(&lp, 9, 4, 3);
    let spans: Vec<(u32, usize, usize)> = tokens
        .iter()
        .map(|t| (t.id, t.start_frame, t.end_frame))
        .collect();
    assert_eq!(spans, vec![(0, 0, 2), (0, 3, 4), (1, 4, 6), (2, 8, 9)]);
    let batch = greedy_batch(&[&lp, &lp[..4 * 4]], 4, 3);
    assert_eq!(batch, vec![vec![0, 0, 1, 2], vec![0, 0]]);
}

#[test]
fn beam_sums_alignments_where_greedy_does_not() {
    // Two frames, p(a) = 0.4, p(blank) = 0.6: the best path is blank blank
    // (0.36) but "a" has total probability 0.64.
    let lp = log_rows(&[&[0.4, 0.6], &[0.4, 0.6]]);
    assert_eq!(greedy(&lp, 2, 2, 1), Vec::<u32>::new());
    let opts = BeamOptions {
        beam_width: 4,
        blank: 1,
        top_am_threshold: None,
        ..BeamOptions::default()
    };
    let hyps = beam_search(&lp, 2, 2, &opts);
    assert_eq!(hyps[0].tokens, vec![0]);
    assert!(
        (hyps[0].acoustic - 0.64f32.ln()).abs() < 1e-5,
        "{}",
        hyps[0].acoustic
    );
    assert_eq!(hyps[1].tokens, Vec::<u32>::new());
    assert!((hyps[1].acoustic - 0.36f32.ln()).abs() < 1e-5);
}

#[test]
fn beam_width_one_equals_greedy() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for case in 0..300 {
        let frames = rng.random_range(0..40);
        let classes = rng.random_range(2..9);
        let sharpness = [0.5f32, 2.0, 6.0][case % 3];
        let lp = random_log_probs(&mut rng, frames, classes, sharpness);
        let blank = (classes - 1) as u32;
        let expected = greedy(&lp, frames, classes, blank);
        for threshold in [None, Some(-6.0), Some(-0.5)] {
            let opts = BeamOptions {
                beam_width: 1,
                blank,
                top_am_threshold: threshold,
                beta: 0.0,
                ..BeamOptions::default()
            };
            let hyps = beam_search(&lp, frames, classes, &opts);
            assert_eq!(hyps.len(), 1);
            assert_eq!(
                hyps[0].tokens, expected,
                "case {case}, threshold {threshold:?}"
            );
        }
        // Expanding only the top class keeps a single path at any width.
        let top1 = BeamOptions {
            beam_width: 8,
            blank,
            top_k: Some(1),
            ..BeamOptions::default()
        };
        assert_eq!(beam_search(&lp, frames, classes, &top1)[0].tokens, expected);
    }
}

/// Every label sequence's total probability, by enumerating all paths.
fn brute_force(lp: &[f32], frames: usize, classes: usize, blank: u32) -> Vec<(Vec<u32>, f64)> {
    let mut totals: std::collections::HashMap<Vec<u32>, f64> = Default::default();
    for code in 0..classes.pow(frames as u32) {
        let (mut c, mut logp, mut path) = (code, 0.0f64, Vec::new());
        for t in 0..frames {
            let k = c % classes;
            c /= classes;
            logp += lp[t * classes + k] as f64;
            path.push(k as u32);
        }
        let mut labels: Vec<u32> = Vec::new();
        let mut prev = None;
        for &k in &path {
            if Some(k) != prev && k != blank {
                labels.push(k);
            }
            prev = Some(k);
        }
        *totals.entry(labels).or_default() += logp.exp();
    }
    let mut v: Vec<_> = totals.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

#[test]
fn exhaustive_beam_matches_brute_force_prefix_probabilities() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for case in 0..60 {
        let (frames, classes) = (rng.random_range(1..6), rng.random_range(2..4));
        let lp = random_log_probs(&mut rng, frames, classes, 2.0);
        let blank = (classes - 1) as u32;
        let opts = BeamOptions {
            beam_width: 10_000,
            blank,
            top_am_threshold: None,
            ..BeamOptions::default()
        };
        let hyps = beam_search(&lp, frames, classes, &opts);
        let truth = brute_force(&lp, frames, classes, blank);
        assert_eq!(hyps.len(), truth.len(), "case {case}");
        for h in &hyps {
            let p = truth
                .iter()
                .find(|t| t.0 == h.tokens)
                .expect("a reachable sequence")
                .1;
            assert!(
                (h.acoustic as f64 - p.ln()).abs() < 1e-4,
                "case {case}: {:?}",
                h.tokens
            );
        }
        assert!((hyps[0].acoustic as f64 - truth[0].1.ln()).abs() < 1e-4);
        let batch = beam_search_batch::<NoLm>(&[&lp], classes, &opts, None);
        assert_eq!(batch[0], hyps);
    }
}

const ARPA: &str = "
\\data\\
ngram 1=4
ngram 2=1

\\1-grams:
-99 <s> -0.3
-2.0 x
-0.1 y
-1.0 </s>

\\2-grams:
-0.05 <s> y

\\end\\
";

fn word_id(w: &str) -> Option<u32> {
    match w {
        "x" => Some(0),
        "y" => Some(1),
        _ => None,
    }
}

#[test]
fn arpa_back_off_and_natural_logs() {
    let lm = ArpaLm::parse(ARPA, word_id).unwrap();
    assert_eq!(lm.order(), 2);
    let ln10 = std::f32::consts::LN_10;
    assert!((lm.log_prob(&[BOS], 1) - (-0.05 * ln10)).abs() < 1e-5);
    // "<s> x" is absent: back-off weight of <s> plus the unigram.
    assert!((lm.log_prob(&[BOS], 0) - (-2.3 * ln10)).abs() < 1e-5);
    // After "x" (no back-off weight listed: 0) the unigram is used.
    let (lp, state) = lm.score(&lm.begin(), 0);
    assert!((lp - (-2.3 * ln10)).abs() < 1e-5);
    assert!((lm.score(&state, 1).0 - (-0.1 * ln10)).abs() < 1e-5);
}

#[test]
fn arpa_errors_name_the_line() {
    let bad_number = ARPA.replace("-2.0 x", "-2.o x");
    let e = ArpaLm::parse(&bad_number, word_id).unwrap_err().to_string();
    assert!(e.contains("line 8") && e.contains("-2.o"), "{e}");
    let bad_count = ARPA.replace("ngram 1=4", "ngram 1=5");
    let e = ArpaLm::parse(&bad_count, word_id).unwrap_err().to_string();
    assert!(e.contains("announces 5 1-grams"), "{e}");
    let e = ArpaLm::parse("hello", word_id).unwrap_err().to_string();
    assert!(e.contains("\\data\\"), "{e}");
    let e = ArpaLm::parse(&ARPA.replace("\\end\\", ""), word_id)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\\end\\"), "{e}");
}

#[test]
fn lm_fusion_changes_the_result() {
    // One frame: x 0.55, y 0.40, blank 0.05. Acoustics prefer x, the LM y.
    let lp = log_rows(&[&[0.55, 0.40, 0.05]]);
    let lm = ArpaLm::parse(ARPA, word_id).unwrap();
    let opts = BeamOptions {
        beam_width: 4,
        blank: 2,
        alpha: 0.5,
        top_am_threshold: None,
        ..BeamOptions::default()
    };
    assert_eq!(beam_search(&lp, 1, 3, &opts)[0].tokens, vec![0]);
    let fused = beam_search_lm(&lp, 1, 3, &opts, &lm);
    assert_eq!(fused[0].tokens, vec![1]);
    let ln10 = std::f32::consts::LN_10;
    assert!((fused[0].lm - (-0.05 * ln10)).abs() < 1e-5);
    assert!((fused[0].score - (0.40f32.ln() + 0.5 * fused[0].lm)).abs() < 1e-5);
    // With alpha 0 the LM has no effect.
    let off = BeamOptions { alpha: 0.0, ..opts };
    assert_eq!(beam_search_lm(&lp, 1, 3, &off, &lm)[0].tokens, vec![0]);
}

#[test]
fn window_starts_follow_the_reference_rule() {
    assert_eq!(
        window_starts(100, 40, 20).unwrap(),
        vec![(0, 40), (20, 60), (40, 80), (60, 100), (80, 100)]
    );
    // No truncated window: the last full window ends the recording.
    assert_eq!(window_starts(80, 40, 0).unwrap(), vec![(0, 40), (40, 80)]);
    // Only the first truncated window is processed.
    assert_eq!(
        window_starts(50, 40, 32).unwrap(),
        vec![(0, 40), (8, 48), (16, 50)]
    );
    // seq_len > T: a single window, overlap ignored; seq_len == T is not.
    assert_eq!(window_starts(30, 40, 32).unwrap(), vec![(0, 30)]);
    assert_eq!(window_starts(40, 40, 32).unwrap(), vec![(0, 40), (8, 40)]);
    assert_eq!(window_starts(0, 40, 32).unwrap(), vec![]);
    assert_eq!(
        window_starts(100, 40, 40),
        Err(WindowError::OverlapTooLarge {
            overlap: 40,
            seq_len: 40
        })
    );
}

/// The output frames `[s/8, s/8 + ceil(len/8))` of a full-context posterior.
fn window_slice(full: &[f32], classes: usize, start: usize, end: usize) -> &[f32] {
    let first = start / 8;
    let n = (end - start).div_ceil(8);
    &full[first * classes..(first + n) * classes]
}

#[test]
fn averaging_slices_of_one_posterior_gives_it_back() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let classes = 5;
    for case in 0..120 {
        let seq_len = 8 * rng.random_range(1..12);
        let overlap = 8 * rng.random_range(0..seq_len / 8);
        let total: usize = rng.random_range(1..400);
        let full_frames = total.div_ceil(8);
        let full = random_log_probs(&mut rng, full_frames, classes, 3.0);
        for placement in [
            Placement::Reference,
            Placement::StartFrame { subsampling: 8 },
        ] {
            let mut avg = WindowAverager::new(classes, total, seq_len, overlap, placement).unwrap();
            for (s, e) in window_starts(total, seq_len, overlap).unwrap() {
                avg.add(s, e - s, window_slice(&full, classes, s, e))
                    .unwrap();
            }
            let merged = avg.finish();
            assert_eq!(
                merged.len(),
                full.len(),
                "case {case} {placement:?} T {total} L {seq_len} O {overlap}"
            );
            let diff = merged
                .iter()
                .zip(&full)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-5, "case {case} {placement:?}: max diff {diff}");
        }
    }
}

#[test]
fn averaging_averages_probabilities_and_drops_unwritten_frames() {
    let classes = 2;
    let a = log_rows(&[&[0.2, 0.8], &[0.6, 0.4]]);
    let b = log_rows(&[&[0.4, 0.6], &[0.9, 0.1]]);
    // Start-frame placement: a at output 0..2, b at 1..3 → frame 1 averaged.
    let mut avg =
        WindowAverager::new(classes, 24, 16, 8, Placement::StartFrame { subsampling: 8 }).unwrap();
    avg.add(0, 16, &a).unwrap();
    avg.add(8, 16, &b).unwrap();
    let got: Vec<f32> = avg.finish().iter().map(|l| l.exp()).collect();
    let want = [0.2, 0.8, 0.5, 0.5, 0.9, 0.1];
    assert!(
        got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6),
        "{got:?}"
    );
    // A gap: frames 2..4 are never written and are dropped.
    let mut avg = WindowAverager::new(
        classes,
        100,
        16,
        0,
        Placement::StartFrame { subsampling: 8 },
    )
    .unwrap();
    avg.add(0, 16, &a).unwrap();
    avg.add(32, 16, &b).unwrap();
    assert_eq!(avg.finish().len(), 4 * classes);
    // Reference placement of a tail whose ratio is not 8: seq 16, overlap 8,
    // T 17 → windows [0,16), [8,17); the tail (9 frames → 2 outputs, ratio
    // 4.5) moves back trunc(8 / 4.5) = 1 frame, as the reference does.
    let mut avg = WindowAverager::new(classes, 17, 16, 8, Placement::Reference).unwrap();
    avg.add(0, 16, &a).unwrap();
    avg.add(8, 9, &b).unwrap();
    assert_eq!(avg.finish().len(), 3 * classes);
    assert!(WindowAverager::new(3, 17, 16, 8, Placement::Reference)
        .unwrap()
        .add(0, 16, &a)
        .is_err());
}

#[test]
fn buffered_windows_keep_centres_once() {
    let windows = buffered_windows(100, 40, 20).unwrap();
    let spans: Vec<_> = windows.iter().map(|w| (w.buffer, w.chunk)).collect();
    assert_eq!(
        spans,
        vec![
            ((0, 40), (0, 20)),
            ((10, 50), (20, 40)),
            ((30, 70), (40, 60)),
            ((50, 90), (60, 80)),
            ((60, 100), (80, 100)),
        ]
    );
    assert_eq!(buffered_windows(30, 40, 20).unwrap().len(), 1);
    // Slices of a full posterior, kept and concatenated, give it back.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let classes = 3;
    for &(total, seq_len, overlap) in &[
        (160usize, 64usize, 32usize),
        (256, 64, 16),
        (64, 128, 32),
        (200, 48, 32),
    ] {
        let full = random_log_probs(&mut rng, total.div_ceil(8), classes, 2.0);
        let mut merger = BufferedMerger::new(classes);
        for w in buffered_windows(total, seq_len, overlap).unwrap() {
            merger
                .add(&w, window_slice(&full, classes, w.buffer.0, w.buffer.1))
                .unwrap();
        }
        assert_eq!(merger.finish(), full, "T {total} L {seq_len} O {overlap}");
    }
}

#[test]
fn word_timestamps_from_alignment() {
    let pieces = ["\u{2581}hel", "lo", "\u{2581}world", ",", "[PAD]"];
    let piece = |id: u32| {
        let p = pieces[id as usize];
        (!p.starts_with('[')).then_some(p)
    };
    let tok = |id, s, e| AlignedToken {
        id,
        start_frame: s,
        end_frame: e,
    };
    let tokens = [
        tok(0, 2, 3),
        tok(1, 5, 6),
        tok(4, 6, 7),
        tok(2, 10, 12),
        tok(3, 12, 13),
    ];
    // "hello" ends at frame 6 (the [PAD] after it is skipped), 4 blank
    // frames before "world,": its end moves 2 frames on. "world," ends 2
    // frames before the recording does: 1 frame on.
    let words = word_timestamps(&tokens, piece, 0.08, 15);
    assert_eq!(
        words,
        vec![
            WordTiming {
                word: "hello".into(),
                start: 0.16,
                end: 0.64
            },
            WordTiming {
                word: "world,".into(),
                start: 0.8,
                end: 1.12
            },
        ]
    );
    // A long silence after the last word: the end moves at most 0.32 s.
    let last = word_timestamps(&tokens, piece, 0.08, 100);
    assert_eq!(last[1].end, 1.36);
    // Words back to back: the end stays at the last token.
    let tight = [tok(0, 2, 3), tok(2, 3, 5)];
    let tight = word_timestamps(&tight, piece, 0.08, 5);
    assert_eq!((tight[0].end, tight[1].end), (0.24, 0.4));
    let json: serde_json::Value = serde_json::from_str(&to_json(&words)).unwrap();
    assert_eq!(json["text"], "hello world,");
    assert_eq!(json["words"][1]["start"], 0.8);
}

#[test]
fn srt_and_vtt_formatting() {
    let w = |word: &str, start, end| WordTiming {
        word: word.into(),
        start,
        end,
    };
    let words = [
        w("hello", 0.16, 0.48),
        w("world", 0.8, 1.04),
        w("later", 3725.5, 3726.0),
    ];
    let c = cues(&words, &CueOptions::default());
    assert_eq!(c.len(), 2, "the long gap starts a new cue");
    assert_eq!(
        to_srt(&c),
        "1\n00:00:00,160 --> 00:00:01,040\nhello world\n\n2\n01:02:05,500 --> 01:02:06,000\nlater\n\n"
    );
    assert_eq!(
        to_vtt(&c),
        "WEBVTT\n\n00:00:00.160 --> 00:00:01.040\nhello world\n\n01:02:05.500 --> 01:02:06.000\nlater\n\n"
    );
    let one_each = cues(
        &words,
        &CueOptions {
            max_words: 1,
            ..CueOptions::default()
        },
    );
    assert_eq!(one_each.len(), 3);
}
