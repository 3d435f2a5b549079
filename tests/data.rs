//! Data pipeline: manifests (own format and the reference index with Google
//! transcripts), epoch batching and chunking with word timings.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use lcasr::audio::features::N_MELS;
use lcasr::data::batching::{epoch_batches, epoch_seed, EpochCursor, SORT_GROUP};
use lcasr::data::chunking::{chunk_batch, slice_features, FRAMES_PER_SECOND};
use lcasr::data::manifest::{parse_google_transcript, Manifest, Recording, Word};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------- manifest

fn google(words: &[(&str, &str, &str)]) -> String {
    let ws: Vec<serde_json::Value> = words
        .iter()
        .map(|(w, s, e)| serde_json::json!({"startTime": s, "endTime": e, "word": w, "speakerTag": 1}))
        .collect();
    serde_json::json!({"results": [
        {"alternatives": [{"transcript": "ignored", "words": []}]},
        {"alternatives": [{"words": ws}, {"words": []}]}
    ]})
    .to_string()
}

#[test]
fn google_transcript_uses_last_result_first_alternative() {
    let words = parse_google_transcript(&google(&[
        ("Hello,", "12.300s", "12.700s"),
        ("you", "13s", "13.5s"),
    ]))
    .unwrap();
    assert_eq!(
        words,
        vec![
            Word {
                word: "Hello,".into(),
                start: 12.3,
                end: 12.7
            },
            Word {
                word: "you".into(),
                start: 13.0,
                end: 13.5
            },
        ]
    );
}

#[test]
fn google_transcript_errors_are_precise() {
    let err =
        parse_google_transcript(&google(&[("a", "1s", "2s"), ("bad", "1.5x", "2s")])).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("word #1") && msg.contains("1.5x"), "{msg}");
    let err = parse_google_transcript(r#"{"results": []}"#).unwrap_err();
    assert!(format!("{err:#}").contains("empty"), "{err:#}");
    let err = parse_google_transcript(&google(&[("late", "3s", "2s")])).unwrap_err();
    assert!(format!("{err:#}").contains("late"), "{err:#}");
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

#[test]
fn reference_pairs_index_loads_with_transcripts() {
    let dir = tempfile::tempdir().unwrap();
    let t1 = write(dir.path(), "a.json", &google(&[("Hi", "0.100s", "0.400s")]));
    write(
        dir.path(),
        "b.json",
        &google(&[("x", "1s", "1.2s"), ("y", "2s", "2.5s")]),
    );
    let index = serde_json::json!({
        "show/ep1": {"audio": "/data/a.spec.pt", "txt": t1, "duration": 12.5},
        "show/ep2": {"audio": "b.spec.pt", "txt": "b.json", "duration": 3},
    });
    let path = write(dir.path(), "audio_txt_pairs.json", &index.to_string());
    let m = Manifest::load(&path).unwrap();
    assert_eq!(m.recordings.len(), 2);
    let a = m.recordings.iter().find(|r| r.id == "show/ep1").unwrap();
    assert_eq!(a.features, Path::new("/data/a.spec.pt"));
    assert_eq!(a.duration, 12.5);
    assert_eq!(a.words.as_ref().unwrap()[0].word, "Hi");
    assert!(a.text.is_none());
    let b = m.recordings.iter().find(|r| r.id == "show/ep2").unwrap();
    assert_eq!(b.features, dir.path().join("b.spec.pt"));
    assert_eq!(b.duration, 3.0);
    assert_eq!(b.words.as_ref().unwrap().len(), 2);
}

#[test]
fn bad_reference_entries_name_file_and_entry() {
    let dir = tempfile::tempdir().unwrap();
    let index = serde_json::json!({"ep9": {"audio": "a.spec.pt", "duration": 1.0}});
    let path = write(dir.path(), "pairs.json", &index.to_string());
    let msg = format!("{:#}", Manifest::load(&path).unwrap_err());
    assert!(
        msg.contains("pairs.json") && msg.contains("ep9") && msg.contains("'txt'"),
        "{msg}"
    );

    write(dir.path(), "t.json", &google(&[("w", "abc", "1s")]));
    let index = serde_json::json!({"ep7": {"audio": "a", "txt": "t.json", "duration": 1.0}});
    let path = write(dir.path(), "pairs2.json", &index.to_string());
    let msg = format!("{:#}", Manifest::load(&path).unwrap_err());
    assert!(
        msg.contains("pairs2.json")
            && msg.contains("ep7")
            && msg.contains("t.json")
            && msg.contains("abc"),
        "{msg}"
    );

    let path = write(dir.path(), "broken.json", "{not json");
    let msg = format!("{:#}", Manifest::load(&path).unwrap_err());
    assert!(msg.contains("broken.json"), "{msg}");

    let msg = format!(
        "{:#}",
        Manifest::load(dir.path().join("missing.json")).unwrap_err()
    );
    assert!(msg.contains("missing.json"), "{msg}");
}

#[test]
fn own_manifest_round_trips_and_reports_bad_entries() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest {
        recordings: vec![
            Recording {
                id: "r1".into(),
                features: dir.path().join("r1.feat"),
                duration: 61.25,
                words: Some(vec![Word {
                    word: "one".into(),
                    start: 0.5,
                    end: 0.75,
                }]),
                text: None,
            },
            Recording {
                id: "r2".into(),
                features: "/abs/r2.feat".into(),
                duration: 2.0,
                words: None,
                text: Some("just text".into()),
            },
        ],
    };
    let path = dir.path().join("manifest.json");
    m.save(&path).unwrap();
    assert_eq!(Manifest::load(&path).unwrap(), m);
    // No temporary file is left behind.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    let bad = serde_json::json!({"version": 1, "recordings": [
        {"id": "ok", "features": "f", "duration": 1.0},
        {"id": "nodur", "features": "f"},
    ]});
    let path = write(dir.path(), "bad.json", &bad.to_string());
    let msg = format!("{:#}", Manifest::load(&path).unwrap_err());
    assert!(
        msg.contains("bad.json") && msg.contains("nodur") && msg.contains("duration"),
        "{msg}"
    );

    let bad = serde_json::json!({"version": 7, "recordings": []});
    let path = write(dir.path(), "v7.json", &bad.to_string());
    let msg = format!("{:#}", Manifest::load(&path).unwrap_err());
    assert!(
        msg.contains("v7.json") && msg.contains("version 7"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- batching

fn random_recs(n: usize, seed: u64) -> Vec<(String, f64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Durations on a coarse grid so there are many ties.
    (0..n)
        .map(|i| (format!("rec{i:05}"), rng.random_range(0..500) as f64 * 0.5))
        .collect()
}

fn sorted_positions(recs: &[(String, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..recs.len()).collect();
    order.sort_by(|&a, &b| {
        recs[a]
            .1
            .total_cmp(&recs[b].1)
            .then(recs[a].0.cmp(&recs[b].0))
    });
    let mut pos = vec![0; recs.len()];
    for (p, &i) in order.iter().enumerate() {
        pos[i] = p;
    }
    pos
}

#[test]
fn epoch_batches_cover_every_recording_once_with_short_batch_last() {
    let recs = random_recs(4567, 1);
    let bs = 64;
    let batches = epoch_batches(&recs, 42, bs);
    let mut seen = HashSet::new();
    for b in &batches {
        for &i in b {
            assert!(seen.insert(i), "recording {i} appears twice");
        }
    }
    assert_eq!(seen.len(), recs.len());
    let (last, full) = batches.split_last().unwrap();
    assert!(full.iter().all(|b| b.len() == bs));
    assert_eq!(last.len(), recs.len() % bs);

    // Length-homogeneous: each batch comes from one stretch of at most
    // SORT_GROUP consecutive recordings of the sorted order (64 does not
    // divide SORT_GROUP, so this checks that batches never straddle groups).
    let pos = sorted_positions(&recs);
    for b in &batches {
        let lo = b.iter().map(|&i| pos[i]).min().unwrap();
        let hi = b.iter().map(|&i| pos[i]).max().unwrap();
        assert!(
            hi - lo < SORT_GROUP,
            "batch spans sorted positions {lo}..={hi}"
        );
    }
}

#[test]
fn epoch_batches_are_deterministic_and_seed_dependent() {
    let recs = random_recs(3000, 2);
    let a = epoch_batches(&recs, 7, 16);
    assert_eq!(a, epoch_batches(&recs, 7, 16));
    assert_ne!(a, epoch_batches(&recs, 8, 16));
    assert_ne!(epoch_seed(7, 0), epoch_seed(7, 1));
    assert_ne!(epoch_seed(7, 0), epoch_seed(8, 0));
    // Exact batches: no short batch at all.
    let exact = epoch_batches(&recs, 7, 100);
    assert_eq!(exact.len(), 30);
    assert!(exact.iter().all(|b| b.len() == 100));
}

#[test]
fn epoch_batches_are_stable_under_input_order_with_ties() {
    // All durations equal: the order is decided by id alone, not input order.
    let recs: Vec<(String, f64)> = (0..50).map(|i| (format!("id{i:02}"), 3.0)).collect();
    let mut rev = recs.clone();
    rev.reverse();
    let ids = |rs: &[(String, f64)], bs: Vec<Vec<usize>>| -> Vec<Vec<String>> {
        bs.into_iter()
            .map(|b| b.into_iter().map(|i| rs[i].0.clone()).collect())
            .collect()
    };
    assert_eq!(
        ids(&recs, epoch_batches(&recs, 5, 8)),
        ids(&rev, epoch_batches(&rev, 5, 8))
    );
}

#[test]
fn cursor_resumes_inside_an_epoch() {
    let recs = random_recs(100, 3);
    let batches = epoch_batches(&recs, epoch_seed(1, 0), 30);
    assert_eq!(batches.len(), 4);
    let mut c = EpochCursor::default();
    c.advance(batches.len());
    c.advance(batches.len());
    let json = serde_json::to_string(&c).unwrap();
    let back: EpochCursor = serde_json::from_str(&json).unwrap();
    assert_eq!(back.remaining(&batches), &batches[2..]);
    c.advance(batches.len());
    c.advance(batches.len());
    assert_eq!(
        c,
        EpochCursor {
            epoch: 1,
            batch_index: 0
        }
    );
}

// ---------------------------------------------------------------- chunking

fn midpoint_frame(w: &Word) -> usize {
    ((w.start + w.end) / 2.0 * FRAMES_PER_SECOND).floor() as usize
}

/// A random batch: timed recordings with sparse words, and about one in four
/// untimed, half of those short enough for one chunk.
fn random_case(rng: &mut ChaCha8Rng) -> (Vec<usize>, Vec<Option<Vec<Word>>>, usize) {
    let chunk = rng.random_range(1..400);
    let b = rng.random_range(1..6);
    let mut lengths = Vec::new();
    let mut words = Vec::new();
    for _ in 0..b {
        let untimed = rng.random_bool(0.25);
        // Sometimes an exact multiple of the chunk length.
        let len = if untimed && rng.random_bool(0.5) {
            rng.random_range(1..=chunk)
        } else if rng.random_bool(0.3) {
            chunk * rng.random_range(1..6)
        } else {
            rng.random_range(1..2000)
        };
        lengths.push(len);
        if untimed {
            words.push(None);
            continue;
        }
        let mut ws = Vec::new();
        let mut t = 0.0f64;
        // Sparse words, so some chunks hold none and are skipped.
        let secs = len as f64 / FRAMES_PER_SECOND;
        loop {
            t += rng.random_range(0.0..4.0);
            let end = t + rng.random_range(0.0..0.8);
            if end > secs {
                break;
            }
            ws.push(Word {
                word: format!("w{}", ws.len()),
                start: t,
                end,
            });
            t = end;
        }
        words.push(Some(ws));
    }
    (lengths, words, chunk)
}

#[test]
fn chunking_properties_over_random_batches() {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let mut skipped_total = 0;
    let (mut short_untimed, mut long_untimed) = (0, 0);
    for case in 0..400 {
        let (lengths, words, s) = random_case(&mut rng);
        let chunks = chunk_batch(&lengths, &words, s).unwrap();
        // Untimed recordings longer than a chunk are trained alone.
        let alone: Vec<usize> = (0..lengths.len())
            .filter(|&b| words[b].is_none() && lengths[b] > s)
            .collect();
        let windowed: Vec<usize> = (0..lengths.len()).filter(|b| !alone.contains(b)).collect();
        short_untimed += windowed.iter().filter(|&&b| words[b].is_none()).count();
        long_untimed += alone.len();
        let max_len = windowed.iter().map(|&b| lengths[b]).max().unwrap_or(0);
        // The full-length chunks come last, one per such recording, in order.
        let (grid, tail) = chunks.split_at(chunks.len() - alone.len());
        for (c, &b) in tail.iter().zip(&alone) {
            assert_eq!((c.start, c.width), (0, lengths[b]), "case {case}");
            assert_eq!(c.items.len(), 1, "case {case}");
            let it = &c.items[0];
            assert_eq!((it.recording, it.valid), (b, lengths[b]), "case {case}");
            assert!(it.whole_transcript && it.words.is_empty(), "case {case}");
        }
        let mut assigned: Vec<Vec<(usize, String)>> = vec![Vec::new(); lengths.len()];
        let mut whole = vec![0usize; lengths.len()];
        let mut valid_sum = vec![0usize; lengths.len()];
        let mut kept = HashSet::new();
        for c in grid {
            let (start, width, items) = (c.start, c.width, &c.items);
            // Windows never shift: starts on the grid, widths from the grid.
            assert_eq!(start % s, 0, "case {case}");
            assert_eq!(width, s.min(max_len - start), "case {case}");
            kept.insert(start);
            let active: Vec<usize> = windowed
                .iter()
                .copied()
                .filter(|&b| start < lengths[b])
                .collect();
            assert_eq!(
                items.iter().map(|it| it.recording).collect::<Vec<_>>(),
                active,
                "case {case}"
            );
            assert!(
                items
                    .iter()
                    .any(|it| it.whole_transcript || !it.words.is_empty()),
                "case {case}: empty chunk kept"
            );
            for it in items {
                assert!(it.valid > 0, "case {case}: zero-length item");
                assert_eq!(it.valid, width.min(lengths[it.recording] - start));
                assert_eq!(it.whole_transcript, words[it.recording].is_none());
                if it.whole_transcript {
                    assert!(it.words.is_empty(), "case {case}");
                    // A short untimed recording's text is in its only window.
                    assert_eq!((start, it.valid), (0, lengths[it.recording]));
                    whole[it.recording] += 1;
                }
                valid_sum[it.recording] += it.valid;
                for w in &it.words {
                    assigned[it.recording].push((start, w.clone()));
                }
            }
        }
        // Valid lengths over kept + skipped windows add up to each length.
        for &b in &windowed {
            let len = lengths[b];
            let skipped: usize = (0..max_len)
                .step_by(s)
                .filter(|st| !kept.contains(st) && *st < len)
                .map(|st| s.min(len - st))
                .sum();
            skipped_total += usize::from(skipped > 0);
            assert_eq!(valid_sum[b] + skipped, len, "case {case} recording {b}");
        }
        // Every untimed transcript exactly once; every word exactly once, in
        // the chunk holding its midpoint.
        for (b, ws) in words.iter().enumerate() {
            let Some(ws) = ws else {
                let n = whole[b] + usize::from(alone.contains(&b));
                assert_eq!(n, 1, "case {case}: untimed recording {b}");
                continue;
            };
            assert_eq!(whole[b], 0, "case {case}");
            assert_eq!(assigned[b].len(), ws.len(), "case {case}");
            for ((start, name), w) in assigned[b].iter().zip(ws) {
                assert_eq!(name, &w.word);
                let m = midpoint_frame(w).min(lengths[b] - 1);
                assert!(
                    *start <= m && m < start + s,
                    "case {case}: {name} mid {m} in {start}"
                );
            }
        }
    }
    assert!(
        skipped_total > 20,
        "the random cases rarely skip chunks ({skipped_total})"
    );
    assert!(
        short_untimed > 20 && long_untimed > 20,
        "too few untimed recordings ({short_untimed} short, {long_untimed} long)"
    );
}

#[test]
fn boundary_cases_of_chunking() {
    let w = |word: &str, start: f64, end: f64| Word {
        word: word.into(),
        start,
        end,
    };
    // Recording 0 ends exactly on a boundary (100 frames): not active in
    // chunk 2. The straddling word "c" (0.9..1.3 s, midpoint 1.1 s) goes to
    // chunk 2 only; chunk 3 has no words and is skipped.
    let lengths = [100, 250];
    let words = vec![
        Some(vec![w("a", 0.1, 0.2), w("b", 0.45, 0.6)]),
        Some(vec![w("c", 0.9, 1.3), w("d", 2.2, 2.4)]),
    ];
    let chunks = chunk_batch(&lengths, &words, 50).unwrap();
    let starts: Vec<usize> = chunks.iter().map(|c| c.start).collect();
    assert_eq!(starts, vec![0, 50, 100, 200]);
    assert_eq!(chunks[1].items[0].words, vec!["b"]);
    assert_eq!(chunks[2].items.len(), 1);
    assert_eq!(chunks[2].items[0].recording, 1);
    assert_eq!(chunks[2].items[0].words, vec!["c"]);
    assert_eq!((chunks[3].width, chunks[3].items[0].valid), (50, 50));

    // Untimed transcripts: in the first window when short enough.
    let chunks = chunk_batch(&[30, 80], &[None, Some(vec![])], 50).unwrap();
    assert_eq!(chunks.len(), 1);
    assert!(chunks[0].items[0].whole_transcript && !chunks[0].items[1].whole_transcript);
    // Longer ones (130 and 60 frames) are chunks of their own at full length,
    // after the windows, which cover only the others (at most 70 frames).
    let lengths = [130, 70, 50, 60];
    let words = vec![None, Some(vec![w("e", 0.6, 0.7)]), None, None];
    let chunks = chunk_batch(&lengths, &words, 50).unwrap();
    let shape: Vec<(usize, usize, Vec<usize>)> = chunks
        .iter()
        .map(|c| {
            let items = c.items.iter().map(|it| it.recording).collect();
            (c.start, c.width, items)
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            (0, 50, vec![1, 2]),
            (50, 20, vec![1]),
            (0, 130, vec![0]),
            (0, 60, vec![3])
        ]
    );
    assert!(chunks[0].items[1].whole_transcript && chunks[0].items[1].valid == 50);
    assert_eq!(chunks[1].items[0].words, vec!["e"]);
    assert!(chunks[2].items[0].whole_transcript && chunks[2].items[0].valid == 130);
    // Only long untimed recordings: no windows at all.
    let chunks = chunk_batch(&[60, 51], &[None, None], 50).unwrap();
    assert_eq!(
        chunks.iter().map(|c| c.width).collect::<Vec<_>>(),
        vec![60, 51]
    );
    let msg = format!("{:#}", chunk_batch(&[0], &[None], 50).unwrap_err());
    assert!(msg.contains("no frames"), "{msg}");
    assert!(chunk_batch(&[10], &[None], 0).is_err());
    assert!(chunk_batch(&[10, 20], &[None], 50).is_err());
}

#[test]
fn slice_features_pads_beyond_the_end() {
    let frames = 7;
    let feats: Vec<f32> = (0..N_MELS * frames).map(|i| i as f32).collect();
    let out = slice_features(&feats, frames, 4, 5).unwrap();
    assert_eq!(out.len(), N_MELS * 5);
    for m in 0..N_MELS {
        let row = &out[m * 5..(m + 1) * 5];
        let base = (m * frames) as f32;
        assert_eq!(row, &[base + 4.0, base + 5.0, base + 6.0, 0.0, 0.0]);
    }
    assert!(slice_features(&feats, frames, 10, 3)
        .unwrap()
        .iter()
        .all(|&x| x == 0.0));
    assert!(slice_features(&feats, frames + 1, 0, 3).is_err());
}
