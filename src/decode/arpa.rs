//! ARPA back-off n-gram language models over token ids.
//!
//! The file's words are mapped to ids by a caller-supplied closure (for
//! example SentencePiece piece -> id). `<s>`, `</s>` and `<unk>` are handled
//! internally. Probabilities are stored as natural logs (the file's log10
//! values times ln 10).

use std::collections::HashMap;
use std::path::Path;

/// Internal id of `<s>`.
pub const BOS: u32 = u32::MAX - 1;
/// Internal id of `</s>`.
pub const EOS: u32 = u32::MAX - 2;
/// Internal id of `<unk>`.
pub const UNK: u32 = u32::MAX;

/// Log-probability (natural log) used for a token with no unigram when the
/// model has no `<unk>` entry either (log10 = -100, as the common toolkits do).
pub const MISSING_UNIGRAM: f32 = -100.0 * std::f32::consts::LN_10;

/// An error while reading an ARPA file.
#[derive(Debug, thiserror::Error)]
pub enum ArpaError {
    /// The file could not be read.
    #[error("cannot read ARPA file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The text is not a valid ARPA model.
    #[error("ARPA line {line}: {message}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Something that scores token sequences left to right (shallow fusion).
pub trait LanguageModel: Sync {
    /// The context carried between tokens.
    type State: Clone + Eq + std::hash::Hash + Send + Sync;
    /// The state before the first token.
    fn begin(&self) -> Self::State;
    /// Natural-log probability of `token` after `state`, and the new state.
    fn score(&self, state: &Self::State, token: u32) -> (f32, Self::State);
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    logprob: f32,
    backoff: f32,
}

/// A back-off n-gram model read from an ARPA file.
#[derive(Debug, Clone)]
pub struct ArpaLm {
    order: usize,
    /// `grams[n-1]` maps an n-token sequence to its entry.
    grams: Vec<HashMap<Vec<u32>, Entry>>,
    unk_logprob: f32,
    skipped: usize,
}

fn parse_err(line: usize, message: impl Into<String>) -> ArpaError {
    ArpaError::Parse {
        line,
        message: message.into(),
    }
}

impl ArpaLm {
    /// Read an ARPA file; `word_id` maps a word to a token id, or `None` to
    /// skip every n-gram containing that word.
    pub fn from_file(
        path: impl AsRef<Path>,
        word_id: impl Fn(&str) -> Option<u32>,
    ) -> Result<Self, ArpaError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ArpaError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, word_id)
    }

    /// Parse ARPA text; see [`ArpaLm::from_file`].
    pub fn parse(text: &str, word_id: impl Fn(&str) -> Option<u32>) -> Result<Self, ArpaError> {
        let map_word = |w: &str| match w {
            "<s>" => Some(BOS),
            "</s>" => Some(EOS),
            "<unk>" | "<UNK>" => Some(UNK),
            _ => word_id(w),
        };
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
        // Header.
        let mut counts: Vec<usize> = Vec::new();
        let mut seen_data = false;
        let mut pending: Option<(usize, &str)> = None;
        for (no, line) in lines.by_ref() {
            if line.is_empty() {
                continue;
            }
            if !seen_data {
                if line == "\\data\\" {
                    seen_data = true;
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("ngram ") {
                let (n, c) = rest.split_once('=').ok_or_else(|| {
                    parse_err(no, format!("expected 'ngram N=count', got '{line}'"))
                })?;
                let n: usize = n
                    .trim()
                    .parse()
                    .map_err(|_| parse_err(no, format!("bad n-gram order in '{line}'")))?;
                let c: usize = c
                    .trim()
                    .parse()
                    .map_err(|_| parse_err(no, format!("bad n-gram count in '{line}'")))?;
                if n != counts.len() + 1 {
                    return Err(parse_err(
                        no,
                        format!("expected 'ngram {}=', got '{line}'", counts.len() + 1),
                    ));
                }
                counts.push(c);
            } else {
                pending = Some((no, line));
                break;
            }
        }
        if !seen_data {
            return Err(parse_err(
                text.lines().count().max(1),
                "no '\\data\\' header found",
            ));
        }
        if counts.is_empty() {
            return Err(parse_err(
                pending.map_or(1, |p| p.0),
                "the header lists no 'ngram N=count' lines",
            ));
        }
        let order = counts.len();
        let mut grams: Vec<HashMap<Vec<u32>, Entry>> = vec![HashMap::new(); order];
        let mut skipped = 0usize;
        let mut current: Option<usize> = None;
        let mut read_in_section = 0usize;
        let mut section_line = 0usize;
        let mut ended = false;
        let check_section = |current: Option<usize>, read: usize, line: usize| {
            if let Some(n) = current {
                if read != counts[n - 1] {
                    return Err(parse_err(
                        line,
                        format!(
                            "the header announces {} {n}-grams but the section holds {read}",
                            counts[n - 1]
                        ),
                    ));
                }
            }
            Ok(())
        };
        let rest = pending.into_iter().chain(lines);
        for (no, line) in rest {
            if line.is_empty() {
                continue;
            }
            if line == "\\end\\" {
                check_section(current, read_in_section, section_line)?;
                ended = true;
                break;
            }
            if let Some(n) = line
                .strip_prefix('\\')
                .and_then(|l| l.strip_suffix("-grams:"))
            {
                check_section(current, read_in_section, section_line)?;
                let n: usize = n
                    .parse()
                    .map_err(|_| parse_err(no, format!("bad section header '{line}'")))?;
                if n == 0 || n > order {
                    return Err(parse_err(
                        no,
                        format!("section {n}-grams but the header has order {order}"),
                    ));
                }
                current = Some(n);
                read_in_section = 0;
                section_line = no;
                continue;
            }
            let n = current
                .ok_or_else(|| parse_err(no, format!("n-gram line outside a section: '{line}'")))?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() != n + 1 && fields.len() != n + 2 {
                return Err(parse_err(
                    no,
                    format!(
                        "a {n}-gram line needs {} or {} fields, found {}",
                        n + 1,
                        n + 2,
                        fields.len()
                    ),
                ));
            }
            let number = |s: &str| {
                s.parse::<f32>()
                    .map_err(|_| parse_err(no, format!("'{s}' is not a number")))
            };
            let logprob = number(fields[0])?;
            let backoff = if fields.len() == n + 2 {
                number(fields[n + 1])?
            } else {
                0.0
            };
            read_in_section += 1;
            section_line = no;
            let ids: Option<Vec<u32>> = fields[1..=n].iter().map(|w| map_word(w)).collect();
            match ids {
                Some(ids) => {
                    grams[n - 1].insert(
                        ids,
                        Entry {
                            logprob: logprob * std::f32::consts::LN_10,
                            backoff: backoff * std::f32::consts::LN_10,
                        },
                    );
                }
                None => skipped += 1,
            }
        }
        if !ended {
            return Err(parse_err(text.lines().count(), "missing '\\end\\'"));
        }
        let unk_logprob = grams[0]
            .get(&vec![UNK])
            .map_or(MISSING_UNIGRAM, |e| e.logprob);
        Ok(Self {
            order,
            grams,
            unk_logprob,
            skipped,
        })
    }

    /// The model order (largest n).
    pub fn order(&self) -> usize {
        self.order
    }

    /// How many n-grams were skipped because `word_id` returned `None`.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Natural-log probability of `token` after `context` (oldest first),
    /// with back-off.
    pub fn log_prob(&self, context: &[u32], token: u32) -> f32 {
        let keep = context.len().min(self.order - 1);
        let mut context = &context[context.len() - keep..];
        let mut backoff = 0.0f32;
        loop {
            let mut key = Vec::with_capacity(context.len() + 1);
            key.extend_from_slice(context);
            key.push(token);
            if let Some(e) = self.grams[context.len()].get(&key) {
                return backoff + e.logprob;
            }
            if context.is_empty() {
                return backoff + self.unk_logprob;
            }
            if let Some(e) = self.grams[context.len() - 1].get(context) {
                backoff += e.backoff;
            }
            context = &context[1..];
        }
    }

    /// The longest suffix of `history` that can still condition a later
    /// token (it exists as an n-gram of order < `order`).
    fn reduce(&self, history: &[u32]) -> Vec<u32> {
        let keep = history.len().min(self.order - 1);
        let mut h = &history[history.len() - keep..];
        while !h.is_empty() && !self.grams[h.len() - 1].contains_key(h) {
            h = &h[1..];
        }
        h.to_vec()
    }

    /// Natural-log probability of ending the sentence after `state`.
    pub fn end_score(&self, state: &[u32]) -> f32 {
        self.log_prob(state, EOS)
    }
}

impl LanguageModel for ArpaLm {
    type State = Vec<u32>;

    fn begin(&self) -> Vec<u32> {
        self.reduce(&[BOS])
    }

    fn score(&self, state: &Vec<u32>, token: u32) -> (f32, Vec<u32>) {
        let lp = self.log_prob(state, token);
        let mut h = state.clone();
        h.push(token);
        (lp, self.reduce(&h))
    }
}
