//! Word error rate: counts, corpus aggregation, edge cases, report.

use lcasr::text::wer::{align, corpus_wer, count_text_errors, CorpusWer, EditOp, ErrorCounts};

fn counts(h: usize, s: usize, d: usize, i: usize) -> ErrorCounts {
    ErrorCounts {
        hits: h,
        substitutions: s,
        deletions: d,
        insertions: i,
    }
}

#[test]
fn identical_strings_have_no_errors() {
    let c = count_text_errors("the cat sat", "the  cat\tsat");
    assert_eq!(c, counts(3, 0, 0, 0));
    assert_eq!(c.wer(), Some(0.0));
}

#[test]
fn substitution_deletion_insertion() {
    assert_eq!(
        count_text_errors("the cat sat", "the bat sat"),
        counts(2, 1, 0, 0)
    );
    assert_eq!(
        count_text_errors("the cat sat down", "the sat down"),
        counts(3, 0, 1, 0)
    );
    assert_eq!(
        count_text_errors("the cat sat", "the big cat sat"),
        counts(3, 0, 0, 1)
    );
    let c = count_text_errors("a b c d e", "a x c e f g");
    assert_eq!(c.errors(), 4); // b->x, d deleted, f and g inserted
    assert_eq!(c.reference_words(), 5);
    assert!((c.wer().unwrap() - 0.8).abs() < 1e-12);
}

#[test]
fn empty_reference_and_hypothesis() {
    let c = count_text_errors("", "some words here");
    assert_eq!(c, counts(0, 0, 0, 3));
    assert_eq!(c.wer(), None, "undefined without reference words");
    let c = count_text_errors("some words here", "");
    assert_eq!(c, counts(0, 0, 3, 0));
    assert_eq!(c.wer(), Some(1.0));
    assert_eq!(count_text_errors("", ""), counts(0, 0, 0, 0));
}

#[test]
fn unicode_words_compare_exactly() {
    assert_eq!(
        count_text_errors("café über 日本", "café uber 日本"),
        counts(2, 1, 0, 0)
    );
}

#[test]
fn corpus_wer_is_a_ratio_of_sums_not_a_mean() {
    // Utterance 1: 1 error / 1 word (100 %); utterance 2: 0 errors / 9 words.
    let pairs = [
        ("a", "b"),
        (
            "one two three four five six seven eight nine",
            "one two three four five six seven eight nine",
        ),
    ];
    let wer = corpus_wer(pairs).unwrap();
    assert!(
        (wer - 0.1).abs() < 1e-12,
        "got {wer}, a mean would give 0.5"
    );
    // Empty references contribute insertions to the numerator.
    let mut c = CorpusWer::default();
    c.add("a b", "a b");
    c.add("", "x y");
    assert!((c.wer().unwrap() - 1.0).abs() < 1e-12);
    assert_eq!(c.utterances, 2);
    assert_eq!(corpus_wer([("", "x")]), None);
}

#[test]
fn alignment_matches_counts_and_reports() {
    let refs = ["the cat sat on the mat", "a b c d e", "", "x y z"];
    let hyps = ["the bat sat the mat today", "a x c e f g", "p q", ""];
    for (r, h) in refs.iter().zip(hyps) {
        let a = align(r, h);
        assert_eq!(a.counts, count_text_errors(r, h), "{r:?} vs {h:?}");
        let n_ref = a
            .ops
            .iter()
            .filter(|o| !matches!(o, EditOp::Insertion(_)))
            .count();
        assert_eq!(n_ref, r.split_whitespace().count());
    }
    let a = align("the cat sat on the mat", "the bat sat the mat today");
    assert_eq!(
        a.report(),
        "REF: the cat sat on the mat *****\nHYP: the bat sat ** the mat today\n         S       D          I\n"
    );
}
