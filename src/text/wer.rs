//! Word error rate: Levenshtein alignment of whitespace-separated words
//! (substitution, deletion and insertion each cost 1), per-utterance counts,
//! and corpus WER = Σ errors / Σ reference words (reference §9.4), not a
//! mean of per-utterance rates.
//!
//! Conventions:
//! - words are compared exactly (Unicode strings, no further normalisation);
//! - an empty reference counts every hypothesis word as an insertion;
//! - a WER is undefined (`None`) when its reference word count is 0, for one
//!   utterance or for the whole corpus, even if there are insertions;
//! - among equally short alignments the one preferring hits/substitutions,
//!   then deletions, then insertions (walking back from the end) is reported,
//!   so the split of S/D/I is deterministic; the total never depends on it.
//!
//! Counting needs memory linear in the hypothesis length; the alignment
//! report ([`align`]) keeps one byte per word pair.

use std::fmt::Write as _;

/// Edit counts of one or more utterances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// Reference words matched exactly.
    pub hits: usize,
    /// Reference words replaced by another word.
    pub substitutions: usize,
    /// Reference words missing from the hypothesis.
    pub deletions: usize,
    /// Hypothesis words with no reference word.
    pub insertions: usize,
}

impl ErrorCounts {
    /// S + D + I.
    pub fn errors(&self) -> usize {
        self.substitutions + self.deletions + self.insertions
    }

    /// Number of reference words (H + S + D).
    pub fn reference_words(&self) -> usize {
        self.hits + self.substitutions + self.deletions
    }

    /// Errors / reference words; `None` when there are no reference words.
    pub fn wer(&self) -> Option<f64> {
        let n = self.reference_words();
        (n > 0).then(|| self.errors() as f64 / n as f64)
    }
}

impl std::ops::Add for ErrorCounts {
    type Output = ErrorCounts;
    fn add(self, o: ErrorCounts) -> ErrorCounts {
        ErrorCounts {
            hits: self.hits + o.hits,
            substitutions: self.substitutions + o.substitutions,
            deletions: self.deletions + o.deletions,
            insertions: self.insertions + o.insertions,
        }
    }
}

impl std::ops::AddAssign for ErrorCounts {
    fn add_assign(&mut self, o: ErrorCounts) {
        *self = *self + o;
    }
}

/// One step of an alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditOp {
    /// Reference word `i` equals hypothesis word `j`.
    Hit(usize, usize),
    /// Reference word `i` replaced by hypothesis word `j`.
    Substitution(usize, usize),
    /// Reference word `i` missing.
    Deletion(usize),
    /// Hypothesis word `j` extra.
    Insertion(usize),
}

const DIAG: u8 = 0;
const DEL: u8 = 1;
const INS: u8 = 2;

/// Choose the predecessor of cell (i, j) from the costs of the diagonal, up
/// (deletion) and left (insertion) cells; ties prefer diagonal, then deletion.
fn choose(diag: usize, up: usize, left: usize) -> (usize, u8) {
    let mut best = (diag, DIAG);
    if up + 1 < best.0 {
        best = (up + 1, DEL);
    }
    if left + 1 < best.0 {
        best = (left + 1, INS);
    }
    best
}

/// Edit counts of one utterance (`reference`/`hypothesis` already split into
/// words). Memory is linear in the hypothesis length.
pub fn count_errors<S: AsRef<str>>(reference: &[S], hypothesis: &[S]) -> ErrorCounts {
    let m = hypothesis.len();
    // Each cell: (cost, counts along the chosen path).
    let mut row: Vec<(usize, ErrorCounts)> = (0..=m)
        .map(|j| {
            (
                j,
                ErrorCounts {
                    insertions: j,
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut next = row.clone();
    for r in reference {
        let r = r.as_ref();
        next[0] = (
            row[0].0 + 1,
            ErrorCounts {
                deletions: row[0].1.deletions + 1,
                ..row[0].1
            },
        );
        for j in 1..=m {
            let same = r == hypothesis[j - 1].as_ref();
            let diag = row[j - 1].0 + usize::from(!same);
            let (cost, op) = choose(diag, row[j].0, next[j - 1].0);
            let mut counts = match op {
                DIAG => row[j - 1].1,
                DEL => row[j].1,
                _ => next[j - 1].1,
            };
            match op {
                DIAG if same => counts.hits += 1,
                DIAG => counts.substitutions += 1,
                DEL => counts.deletions += 1,
                _ => counts.insertions += 1,
            }
            next[j] = (cost, counts);
        }
        std::mem::swap(&mut row, &mut next);
    }
    row[m].1
}

/// Split both texts on whitespace and count edits.
pub fn count_text_errors(reference: &str, hypothesis: &str) -> ErrorCounts {
    let r: Vec<&str> = reference.split_whitespace().collect();
    let h: Vec<&str> = hypothesis.split_whitespace().collect();
    count_errors(&r, &h)
}

/// A full word alignment of one utterance.
#[derive(Debug, Clone, PartialEq)]
pub struct Alignment {
    /// Reference words.
    pub reference: Vec<String>,
    /// Hypothesis words.
    pub hypothesis: Vec<String>,
    /// Edit operations in order.
    pub ops: Vec<EditOp>,
    /// Their counts.
    pub counts: ErrorCounts,
}

/// Align two texts (split on whitespace). Uses one byte per word pair.
pub fn align(reference: &str, hypothesis: &str) -> Alignment {
    let r: Vec<String> = reference.split_whitespace().map(str::to_string).collect();
    let h: Vec<String> = hypothesis.split_whitespace().map(str::to_string).collect();
    let (n, m) = (r.len(), h.len());
    let w = m + 1;
    let mut back = vec![INS; (n + 1) * w];
    let mut row: Vec<usize> = (0..=m).collect();
    let mut next = vec![0usize; m + 1];
    for i in 1..=n {
        next[0] = i;
        back[i * w] = DEL;
        for j in 1..=m {
            let diag = row[j - 1] + usize::from(r[i - 1] != h[j - 1]);
            let (cost, op) = choose(diag, row[j], next[j - 1]);
            next[j] = cost;
            back[i * w + j] = op;
        }
        std::mem::swap(&mut row, &mut next);
    }
    let mut ops = Vec::with_capacity(n.max(m));
    let mut counts = ErrorCounts::default();
    let (mut i, mut j) = (n, m);
    while i > 0 || j > 0 {
        match back[i * w + j] {
            DIAG if i > 0 && j > 0 => {
                i -= 1;
                j -= 1;
                if r[i] == h[j] {
                    counts.hits += 1;
                    ops.push(EditOp::Hit(i, j));
                } else {
                    counts.substitutions += 1;
                    ops.push(EditOp::Substitution(i, j));
                }
            }
            DEL if i > 0 => {
                i -= 1;
                counts.deletions += 1;
                ops.push(EditOp::Deletion(i));
            }
            _ => {
                j -= 1;
                counts.insertions += 1;
                ops.push(EditOp::Insertion(j));
            }
        }
    }
    ops.reverse();
    Alignment {
        reference: r,
        hypothesis: h,
        ops,
        counts,
    }
}

impl Alignment {
    /// A three-line report: `REF:` and `HYP:` columns padded to equal width
    /// (`*` fills a missing word) and a marker line with `S`, `D` or `I`
    /// under each error.
    pub fn report(&self) -> String {
        let (mut ref_line, mut hyp_line, mut marks) = (
            String::from("REF:"),
            String::from("HYP:"),
            String::from("    "),
        );
        for op in &self.ops {
            let (r, h, mark) = match *op {
                EditOp::Hit(i, j) => (self.reference[i].as_str(), self.hypothesis[j].as_str(), ' '),
                EditOp::Substitution(i, j) => {
                    (self.reference[i].as_str(), self.hypothesis[j].as_str(), 'S')
                }
                EditOp::Deletion(i) => (self.reference[i].as_str(), "", 'D'),
                EditOp::Insertion(j) => ("", self.hypothesis[j].as_str(), 'I'),
            };
            let width = r.chars().count().max(h.chars().count());
            let fill = |s: &str| {
                if s.is_empty() {
                    "*".repeat(width)
                } else {
                    s.to_string()
                }
            };
            let _ = write!(ref_line, " {:<width$}", fill(r));
            let _ = write!(hyp_line, " {:<width$}", fill(h));
            let _ = write!(marks, " {:<width$}", mark);
        }
        format!(
            "{}\n{}\n{}\n",
            ref_line.trim_end(),
            hyp_line.trim_end(),
            marks.trim_end()
        )
    }
}

/// Accumulates counts over a corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CorpusWer {
    /// Summed counts.
    pub counts: ErrorCounts,
    /// Number of utterances added.
    pub utterances: usize,
}

impl CorpusWer {
    /// Add one utterance's texts (split on whitespace); returns its counts.
    pub fn add(&mut self, reference: &str, hypothesis: &str) -> ErrorCounts {
        let c = count_text_errors(reference, hypothesis);
        self.counts += c;
        self.utterances += 1;
        c
    }

    /// Σ errors / Σ reference words; `None` if the corpus has no reference words.
    pub fn wer(&self) -> Option<f64> {
        self.counts.wer()
    }
}

/// Corpus WER of `(reference, hypothesis)` pairs: Σ errors / Σ reference
/// words; `None` if there are no reference words at all.
pub fn corpus_wer<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<f64> {
    let mut c = CorpusWer::default();
    for (r, h) in pairs {
        c.add(r, h);
    }
    c.wer()
}
