//! CTC prefix beam search with optional shallow fusion of a language model.
//!
//! A hypothesis is a label prefix together with how its best alignments end:
//! in a blank, or in the prefix's last label. Each of the two is a beam entry
//! whose score is the exact log-sum over all alignments of the frames so far
//! that produce the prefix and end that way (the usual `p_b` / `p_nb` of
//! prefix search). Entries are ranked and pruned individually, as the
//! reference's simplified search does (reference §8.2). Consequences:
//! - with beam width 1 and no LM or bonus the search is exactly greedy
//!   decoding (every candidate of one entry leads to a different entry);
//! - the final ranking merges the two entries of a prefix (`p_b ⊕ p_nb`).
//!
//! LM fusion happens when a label is emitted: the prefix's score gains
//! `alpha * lm(label | prefix) + beta`.

use std::collections::HashMap;

use rayon::prelude::*;

use super::arpa::LanguageModel;

/// Options of [`beam_search`].
#[derive(Debug, Clone, PartialEq)]
pub struct BeamOptions {
    /// Number of entries kept after each frame.
    pub beam_width: usize,
    /// The blank class id (C − 1 for lcasr models).
    pub blank: u32,
    /// Subtracted from the blank's log-probability on every frame.
    pub blank_penalty: f32,
    /// LM weight (ignored without an LM).
    pub alpha: f32,
    /// Insertion bonus added for every emitted label (with or without LM).
    pub beta: f32,
    /// Expand only classes whose log-prob is at least the frame's maximum plus
    /// this (e.g. −6 nats); `None` expands every class.
    pub top_am_threshold: Option<f32>,
    /// Expand at most this many classes per frame (the most likely ones).
    pub top_k: Option<usize>,
    /// Drop entries scoring more than this below the best one.
    pub prune_less_than: Option<f32>,
}

impl Default for BeamOptions {
    /// Width 10, no penalties or bonus, threshold −6 nats, α 0.4 (the
    /// reference's value, used only when an LM is given). `blank` is 0 here:
    /// set it to the model's blank (C − 1).
    fn default() -> Self {
        Self {
            beam_width: 10,
            blank: 0,
            blank_penalty: 0.0,
            alpha: 0.4,
            beta: 0.0,
            top_am_threshold: Some(-6.0),
            top_k: None,
            prune_less_than: None,
        }
    }
}

/// One finished hypothesis.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// The label ids (no blanks).
    pub tokens: Vec<u32>,
    /// Total score: `acoustic + alpha * lm + beta * tokens.len()`.
    pub score: f32,
    /// Acoustic log-probability (with the blank penalty).
    pub acoustic: f32,
    /// Unweighted LM log-probability of `tokens` (0 without an LM).
    pub lm: f32,
}

/// A language model that gives every token probability 1 (used when none is
/// supplied).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLm;

impl LanguageModel for NoLm {
    type State = ();
    fn begin(&self) {}
    fn score(&self, _state: &(), _token: u32) -> (f32, ()) {
        (0.0, ())
    }
}

/// A node of the prefix trie.
struct Node<S> {
    parent: u32,
    token: u32,
    /// Unweighted LM log-probability of the whole prefix.
    lm: f32,
    /// `alpha * lm + beta * len`.
    bonus: f32,
    state: S,
}

/// Which prefix a candidate entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Prefix {
    Existing(u32),
    New { parent: u32, token: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    acoustic: f32,
    lm_token: f32,
}

fn log_add(a: f32, b: f32) -> f32 {
    if a == f32::NEG_INFINITY {
        return b;
    }
    if b == f32::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// Beam search over one utterance (`frames x classes` log-probabilities),
/// without a language model. Returns up to `beam_width` hypotheses, best first.
///
/// # Panics
/// If `log_probs.len() != frames * classes`, or `blank >= classes`.
pub fn beam_search(
    log_probs: &[f32],
    frames: usize,
    classes: usize,
    opts: &BeamOptions,
) -> Vec<Hypothesis> {
    beam_search_lm(log_probs, frames, classes, opts, &NoLm)
}

/// Beam search over one utterance with shallow fusion of `lm`.
///
/// # Panics
/// If `log_probs.len() != frames * classes`, or `blank >= classes`.
pub fn beam_search_lm<L: LanguageModel>(
    log_probs: &[f32],
    frames: usize,
    classes: usize,
    opts: &BeamOptions,
    lm: &L,
) -> Vec<Hypothesis> {
    assert_eq!(
        log_probs.len(),
        frames * classes,
        "beam_search: shape mismatch"
    );
    assert!(
        (opts.blank as usize) < classes,
        "beam_search: blank id out of range"
    );
    let width = opts.beam_width.max(1);
    let root_state = lm.begin();
    let mut nodes: Vec<Node<L::State>> = vec![Node {
        parent: u32::MAX,
        token: u32::MAX,
        lm: 0.0,
        bonus: 0.0,
        state: root_state,
    }];
    let mut children: HashMap<(u32, u32), u32> = HashMap::new();
    // Beam entries: (prefix node, ends in blank) -> acoustic log-prob.
    let mut beam: Vec<((u32, bool), f32)> = vec![((0, true), 0.0)];
    let mut cands: Vec<u32> = Vec::with_capacity(classes);
    let mut next = Candidates::default();
    let mut lm_cache: HashMap<(u32, u32), (f32, L::State)> = HashMap::new();

    for t in 0..frames {
        let row = &log_probs[t * classes..(t + 1) * classes];
        select_candidates(row, opts, &mut cands);
        next.clear();
        lm_cache.clear();
        for &((node, ends_blank), acoustic) in &beam {
            let last = nodes[node as usize].token;
            for &c in &cands {
                let mut am = row[c as usize];
                if c == opts.blank {
                    am -= opts.blank_penalty;
                    next.add((Prefix::Existing(node), true), acoustic + am, 0.0);
                } else if c == last && !ends_blank {
                    next.add((Prefix::Existing(node), false), acoustic + am, 0.0);
                } else {
                    let (prefix, lm_token) = match children.get(&(node, c)) {
                        Some(&child) => (Prefix::Existing(child), 0.0),
                        None => {
                            let lp = match lm_cache.get(&(node, c)) {
                                Some(&(lp, _)) => lp,
                                None => {
                                    let (lp, state) = lm.score(&nodes[node as usize].state, c);
                                    lm_cache.insert((node, c), (lp, state));
                                    lp
                                }
                            };
                            (
                                Prefix::New {
                                    parent: node,
                                    token: c,
                                },
                                lp,
                            )
                        }
                    };
                    next.add((prefix, false), acoustic + am, lm_token);
                }
            }
        }
        // Rank by total score and keep the best `width`.
        let mut ranked: Vec<((Prefix, bool), Candidate, f32)> = next
            .items
            .iter()
            .map(|&(k, cand)| {
                let total = cand.acoustic
                    + match k.0 {
                        Prefix::Existing(n) => nodes[n as usize].bonus,
                        Prefix::New { parent, .. } => {
                            nodes[parent as usize].bonus + opts.alpha * cand.lm_token + opts.beta
                        }
                    };
                (k, cand, total)
            })
            .collect();
        // Stable: equal scores keep first-seen order.
        ranked.sort_by(|a, b| b.2.total_cmp(&a.2));
        ranked.truncate(width);
        if let (Some(margin), Some(best)) = (opts.prune_less_than, ranked.first().map(|r| r.2)) {
            ranked.retain(|r| r.2 >= best - margin);
        }
        beam.clear();
        for ((prefix, ends_blank), cand, _) in ranked {
            let node = match prefix {
                Prefix::Existing(n) => n,
                Prefix::New { parent, token } => {
                    let (lp, state) = lm_cache
                        .remove(&(parent, token))
                        .expect("an LM score for every new prefix");
                    let p = &nodes[parent as usize];
                    let node = Node {
                        parent,
                        token,
                        lm: p.lm + lp,
                        bonus: p.bonus + opts.alpha * lp + opts.beta,
                        state,
                    };
                    let id = nodes.len() as u32;
                    nodes.push(node);
                    children.insert((parent, token), id);
                    id
                }
            };
            beam.push(((node, ends_blank), cand.acoustic));
        }
        if beam.is_empty() {
            break;
        }
    }
    finish(&nodes, &beam, width)
}

/// Candidate entries of the next frame in first-seen order (so that ties keep
/// beam order, then class order).
#[derive(Default)]
struct Candidates {
    index: HashMap<(Prefix, bool), usize>,
    items: Vec<((Prefix, bool), Candidate)>,
}

impl Candidates {
    fn clear(&mut self) {
        self.index.clear();
        self.items.clear();
    }

    fn add(&mut self, key: (Prefix, bool), acoustic: f32, lm_token: f32) {
        match self.index.get(&key) {
            Some(&i) => {
                let c = &mut self.items[i].1;
                c.acoustic = log_add(c.acoustic, acoustic);
            }
            None => {
                self.index.insert(key, self.items.len());
                self.items.push((key, Candidate { acoustic, lm_token }));
            }
        }
    }
}

/// The classes to expand on one frame: within the threshold of the maximum,
/// at most `top_k` of them, in class order. The argmax is always included.
fn select_candidates(row: &[f32], opts: &BeamOptions, out: &mut Vec<u32>) {
    out.clear();
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let floor = opts.top_am_threshold.map_or(f32::NEG_INFINITY, |t| max + t);
    out.extend(
        (0..row.len() as u32)
            .filter(|&c| row[c as usize] >= floor && row[c as usize] > f32::NEG_INFINITY),
    );
    if out.is_empty() {
        out.push(super::greedy::argmax(row) as u32);
    }
    if let Some(k) = opts.top_k {
        if out.len() > k.max(1) {
            out.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            out.truncate(k.max(1));
            out.sort_unstable();
        }
    }
}

fn tokens_of<S>(nodes: &[Node<S>], mut node: u32) -> Vec<u32> {
    let mut out = Vec::new();
    while node != 0 {
        let n = &nodes[node as usize];
        out.push(n.token);
        node = n.parent;
    }
    out.reverse();
    out
}

fn finish<S>(nodes: &[Node<S>], beam: &[((u32, bool), f32)], width: usize) -> Vec<Hypothesis> {
    let mut merged: HashMap<u32, f32> = HashMap::new();
    for &((node, _), acoustic) in beam {
        merged
            .entry(node)
            .and_modify(|a| *a = log_add(*a, acoustic))
            .or_insert(acoustic);
    }
    let mut hyps: Vec<(u32, Hypothesis)> = merged
        .into_iter()
        .map(|(node, acoustic)| {
            let n = &nodes[node as usize];
            (
                node,
                Hypothesis {
                    tokens: tokens_of(nodes, node),
                    score: acoustic + n.bonus,
                    acoustic,
                    lm: n.lm,
                },
            )
        })
        .collect();
    hyps.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then(a.0.cmp(&b.0)));
    hyps.truncate(width);
    hyps.into_iter().map(|(_, h)| h).collect()
}

/// Beam search over many utterances in parallel (rayon); each slice is one
/// utterance of `len / classes` frames. Returns the best hypotheses of each.
///
/// # Panics
/// As [`beam_search_lm`], or if a slice length is not a multiple of `classes`.
pub fn beam_search_batch<L: LanguageModel>(
    utterances: &[&[f32]],
    classes: usize,
    opts: &BeamOptions,
    lm: Option<&L>,
) -> Vec<Vec<Hypothesis>> {
    utterances
        .par_iter()
        .map(|u| {
            assert_eq!(
                u.len() % classes.max(1),
                0,
                "utterance not a multiple of classes"
            );
            let frames = u.len() / classes.max(1);
            match lm {
                Some(lm) => beam_search_lm(u, frames, classes, opts, lm),
                None => beam_search_lm(u, frames, classes, opts, &NoLm),
            }
        })
        .collect()
}
