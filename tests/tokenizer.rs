//! The SentencePiece-compatible tokenizer against SentencePiece's own output
//! (fixtures g and j, reference-spec §2.4), JSON round trips, and training.

mod common;

use lcasr::text::tokenizer::{train_bpe, Tokenizer};
use serde_json::Value;

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn small() -> (Tokenizer, Value) {
    let tk = Tokenizer::from_file(&common::fixture("tokenizer.model")).unwrap();
    (tk, common::load_json("tokenizer.json"))
}

fn reference() -> (Tokenizer, Value) {
    let fx = common::load_json("reference_tokenizer.json");
    let model = fx["model"].as_str().unwrap_or("reference_tokenizer.model");
    let tk = Tokenizer::from_sentencepiece(&common::fixture(model)).unwrap();
    (tk, fx)
}

/// Checks every encode and decode case of the small model's fixture.
fn check_small_cases(tk: &Tokenizer, fx: &Value) {
    for case in fx["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tk.encode(text).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "encode {text:?}");
        let pieces: Vec<&str> = ids.iter().map(|&i| tk.id_to_piece(i).unwrap()).collect();
        let want: Vec<&str> = case["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(pieces, want, "pieces of {text:?}");
        assert_eq!(
            tk.decode(&ids),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
    for case in fx["decode"].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        assert_eq!(
            tk.decode(&ids),
            case["text"].as_str().unwrap(),
            "decode {ids:?}"
        );
    }
}

#[test]
fn small_model_matches_sentencepiece() {
    let (tk, fx) = small();
    let pieces = fx["pieces"].as_array().unwrap();
    assert_eq!(tk.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tk.vocab_size(), pieces.len());
    for (id, piece) in pieces.iter().enumerate() {
        assert_eq!(tk.id_to_piece(id as u32), piece.as_str(), "piece {id}");
    }
    assert_eq!(tk.id_to_piece(tk.vocab_size() as u32), None);
    assert_eq!(tk.blank_id() as usize, tk.vocab_size());
    check_small_cases(&tk, &fx);
}

#[test]
fn reference_model_matches_sentencepiece() {
    let (tk, fx) = reference();
    assert_eq!(tk.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tk.blank_id() as usize, tk.vocab_size());
    let lowercase = fx["lowercased_before_encoding"].as_bool().unwrap_or(false);
    let cases = fx["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let input = if lowercase {
            text.to_lowercase()
        } else {
            text.to_string()
        };
        let ids = tk.encode(&input).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "encode {text:?}");
        assert_eq!(
            tk.decode(&ids),
            case["decoded"].as_str().unwrap(),
            "decode {text:?}"
        );
    }
}

#[test]
fn reference_model_spec_vector() {
    let (tk, _) = reference();
    let ids = tk.encode("hello world, this is a test. I'm OK").unwrap();
    assert_eq!(
        ids,
        [1939, 607, 4042, 95, 65, 5, 1413, 4039, 6, 4040, 4033, 266]
    );
    let pieces: Vec<&str> = ids.iter().map(|&i| tk.id_to_piece(i).unwrap()).collect();
    assert_eq!(
        pieces,
        [
            "▁hello", "▁world", ",", "▁this", "▁is", "▁a", "▁test", ".", "▁i", "'", "m", "▁ok"
        ]
    );
    assert_eq!(tk.decode(&ids), "hello world, this is a test. i'm ok");
    assert_eq!(tk.id_to_piece(0), Some("[PAD]"));
    assert_eq!(tk.id_to_piece(1), Some("[UNK]"));
    assert_eq!(tk.id_to_piece(2), Some("[BOS]"));
    // Control pieces never come from text; the blank is not a piece.
    assert_ne!(tk.encode("[PAD]").unwrap(), [0]);
    assert_eq!(tk.decode(&[tk.blank_id(), 1939]), "hello");
}

#[test]
fn json_round_trip_keeps_behaviour() {
    let dir = tempfile::tempdir().unwrap();
    let (tk, fx) = small();
    let path = dir.path().join("small.json");
    tk.save_json(&path).unwrap();
    let loaded = Tokenizer::from_file(&path).unwrap();
    assert_eq!(loaded.vocab_size(), tk.vocab_size());
    check_small_cases(&loaded, &fx);

    let (tk, fx) = reference();
    let path = dir.path().join("reference.json");
    tk.save_json(&path).unwrap();
    let loaded = Tokenizer::from_json(&path).unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap().to_lowercase();
        let ids = loaded.encode(&text).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "encode {text:?} after JSON");
        assert_eq!(loaded.decode(&ids), case["decoded"].as_str().unwrap());
    }
}

#[test]
fn trained_tokenizer_round_trips_its_text() {
    let text = std::fs::read_to_string(common::fixture("tokenizer_train_text.txt")).unwrap();
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let vocab = 120;
    let tk = train_bpe(lines.clone().into_iter(), vocab).unwrap();
    assert!(tk.vocab_size() <= vocab && tk.vocab_size() > 3);
    assert_eq!(
        [0, 1, 2].map(|i| tk.id_to_piece(i).unwrap()),
        ["[PAD]", "[UNK]", "[BOS]"]
    );
    let mut merged = 0;
    for line in &lines {
        let ids = tk.encode(line).unwrap();
        assert!(
            ids.iter().all(|&i| i > 2),
            "no control or unknown ids in {line:?}"
        );
        merged += ids
            .iter()
            .filter(|&&i| tk.id_to_piece(i).unwrap().chars().count() > 1)
            .count();
        let want = line
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        assert_eq!(tk.decode(&ids), want);
    }
    assert!(merged > 0, "training learned merges");
    // Unseen characters become the unknown id, consecutive ones fused.
    let ids = tk.encode("the €€ river").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 1);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trained.json");
    tk.save_json(&path).unwrap();
    let loaded = Tokenizer::from_json(&path).unwrap();
    for line in &lines {
        assert_eq!(loaded.encode(line).unwrap(), tk.encode(line).unwrap());
    }
    assert_eq!(loaded.decode(&[0, 2]), "");
}
