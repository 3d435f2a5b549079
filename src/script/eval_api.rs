//! Decoding and scoring in scripts: greedy CTC decoding of a forward pass,
//! English text normalisation and corpus word error rate.

use candle_core::{DType, D};
use rhai::plugin::*;
use rhai::{Array, Dynamic, Map};

use super::errors::{script_error, IntoScript, ScriptResult};
use super::model_api::Output;
use crate::decode::greedy::greedy;
use crate::text::normalize::normalize_english;
use crate::text::wer::CorpusWer;

fn strings(values: &Array, what: &str) -> ScriptResult<Vec<String>> {
    values
        .iter()
        .map(|v| {
            v.clone()
                .into_immutable_string()
                .map(|s| s.to_string())
                .map_err(|t| script_error(format!("{what} must be an array of strings, found {t}")))
        })
        .collect()
}

/// Evaluation functions.
#[export_module]
pub mod eval_module {
    use super::*;

    /// Greedy CTC decoding of every item of a forward pass: the token ids of
    /// the best path with repeats merged and blanks (the last class) removed.
    #[rhai_fn(return_raw)]
    pub fn greedy_decode(out: Output) -> Result<Array, Box<EvalAltResult>> {
        let (b, n, c) = out.logits.dims3().script()?;
        let logits = out.logits.to_dtype(DType::F32).script()?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).script()?;
        let values = lp.flatten_all().script()?.to_vec1::<f32>().script()?;
        let blank = (c - 1) as u32;
        Ok((0..b)
            .map(|i| {
                let frames = out.lengths[i].min(n);
                let row = &values[i * n * c..(i * n + frames) * c];
                let ids = greedy(row, frames, c, blank);
                Dynamic::from_array(
                    ids.into_iter()
                        .map(|v| Dynamic::from_int(v as i64))
                        .collect(),
                )
            })
            .collect())
    }

    /// The text normalised as the paper scored it (Whisper-style English:
    /// lowercase, numbers, spellings, punctuation and fillers).
    pub fn normalize(text: &str) -> String {
        normalize_english(text)
    }

    /// Corpus word error rate of reference and hypothesis texts (both
    /// normalised first): `#{ wer, substitutions, deletions, insertions,
    /// words, utterances }`; `wer` is `()` without reference words.
    #[rhai_fn(return_raw)]
    pub fn wer(references: Array, hypotheses: Array) -> Result<Map, Box<EvalAltResult>> {
        let refs = strings(&references, "wer(): the references")?;
        let hyps = strings(&hypotheses, "wer(): the hypotheses")?;
        if refs.len() != hyps.len() {
            return Err(script_error(format!(
                "wer(): {} references but {} hypotheses",
                refs.len(),
                hyps.len()
            )));
        }
        let mut corpus = CorpusWer::default();
        for (r, h) in refs.iter().zip(&hyps) {
            corpus.add(&normalize_english(r), &normalize_english(h));
        }
        let c = corpus.counts;
        let mut m = Map::new();
        m.insert(
            "wer".into(),
            corpus.wer().map_or(Dynamic::UNIT, Dynamic::from_float),
        );
        m.insert("substitutions".into(), (c.substitutions as i64).into());
        m.insert("deletions".into(), (c.deletions as i64).into());
        m.insert("insertions".into(), (c.insertions as i64).into());
        m.insert("words".into(), (c.reference_words() as i64).into());
        m.insert("utterances".into(), (corpus.utterances as i64).into());
        Ok(m)
    }
}
