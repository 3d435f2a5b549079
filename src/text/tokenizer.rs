//! The SentencePiece-compatible BPE tokenizer (reference-spec §2.4).
//!
//! A SentencePiece BPE `.model` is turned into a `tokenizers` BPE at load:
//! the vocabulary is the piece list, and every split of a piece into two
//! pieces becomes a merge ranked by the merged piece's score. The text goes
//! through the model's compiled normalisation rules, whitespace clean-up
//! (trim, collapse runs of spaces) and `▁`-prefixing per word, exactly like
//! SentencePiece. Decoding follows SentencePiece too: control pieces vanish,
//! the unknown piece reads ` ⁇ `, and the space of the first word is dropped.
//!
//! Ids are the CTC targets; the model has `vocab_size() + 1` output classes
//! and the blank is [`Tokenizer::blank_id`] = `vocab_size()`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tokenizers::models::bpe::{BpeTrainer, Vocab, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Nmt, Precompiled, Replace, Sequence, Strip, NFKC};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{
    AddedToken, Model, NormalizerWrapper, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer,
};

use super::sentencepiece_model::{ModelProto, ModelType, PieceType};

/// The word-boundary marker SentencePiece prepends to words.
const SPACE_MARK: char = '▁';
/// What the unknown piece decodes to (SentencePiece's default surface).
const UNK_SURFACE: &str = " \u{2047} ";
/// Padding piece (id 0 in the reference's models).
pub const PAD_PIECE: &str = "[PAD]";
/// Unknown piece (id 1).
pub const UNK_PIECE: &str = "[UNK]";
/// Beginning-of-sentence piece (id 2); never added to targets.
pub const BOS_PIECE: &str = "[BOS]";

/// How a vocabulary entry behaves when decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Normal,
    Unknown,
    Control,
}

/// A SentencePiece-compatible BPE tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pieces: Vec<String>,
    roles: Vec<Role>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

/// Converts a `tokenizers` error (a boxed `dyn Error` that is not `Sync`) into anyhow.
fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// The whitespace clean-up SentencePiece applies after its character rules.
fn whitespace_cleanup() -> Result<Vec<NormalizerWrapper>> {
    Ok(vec![
        Replace::new(ReplacePattern::Regex(" {2,}".into()), " ")
            .map_err(tk_err)?
            .into(),
        Strip::new(true, true).into(),
    ])
}

impl Tokenizer {
    /// Loads a SentencePiece BPE `.model` file.
    pub fn from_sentencepiece(path: &Path) -> Result<Self> {
        let proto = ModelProto::from_file(path)?;
        Self::from_model_proto(&proto)
            .with_context(|| format!("cannot use SentencePiece model {}", path.display()))
    }

    /// Loads a tokenizer by file type: `.json` is `tokenizers` JSON, anything
    /// else a SentencePiece `.model`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            Self::from_json(path)
        } else {
            Self::from_sentencepiece(path)
        }
    }

    /// Builds the tokenizer from a decoded SentencePiece model.
    pub fn from_model_proto(proto: &ModelProto) -> Result<Self> {
        if proto.model_type != ModelType::Bpe {
            bail!(
                "only BPE SentencePiece models are supported, this one is {:?}",
                proto.model_type
            );
        }
        if !proto.remove_extra_whitespaces || !proto.add_dummy_prefix {
            bail!("models without whitespace clean-up or the dummy prefix are not supported");
        }
        let vocab: Vocab = proto
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.piece.clone(), i as u32))
            .collect();
        let unk = proto
            .pieces
            .iter()
            .find(|p| p.kind == PieceType::Unknown)
            .context("the model has no unknown piece")?;

        // Every split of a mergeable piece into two known pieces is a merge,
        // ranked by the merged piece's score, ties by the parts' ids.
        let mut ranked: Vec<(f32, u32, u32, String, String)> = Vec::new();
        for p in proto.pieces.iter().filter(|p| p.kind == PieceType::Normal) {
            for (cut, _) in p.piece.char_indices().skip(1) {
                let (left, right) = p.piece.split_at(cut);
                if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                    ranked.push((p.score, l, r, left.to_string(), right.to_string()));
                }
            }
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let merges = ranked.into_iter().map(|(_, _, _, l, r)| (l, r)).collect();

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk.piece.clone())
            .fuse_unk(true)
            .build()
            .map_err(tk_err)?;
        let mut normalizers = Vec::new();
        if !proto.precompiled_charsmap.is_empty() {
            let charsmap = Precompiled::from(&proto.precompiled_charsmap)
                .map_err(|e| anyhow::anyhow!("bad normalisation rules: {e}"))?;
            normalizers.push(charsmap.into());
        }
        normalizers.extend(whitespace_cleanup()?);

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_normalizer(Some(Sequence::new(normalizers)))
            .map_err(tk_err)?;
        inner.with_pre_tokenizer(Some(Metaspace::new(
            SPACE_MARK,
            PrependScheme::Always,
            true,
        )));
        // Record the control pieces as special tokens so the JSON form keeps them.
        let specials: Vec<AddedToken> = proto
            .pieces
            .iter()
            .filter(|p| matches!(p.kind, PieceType::Control | PieceType::Unknown))
            .map(|p| AddedToken::from(p.piece.clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(tk_err)?;
        Self::from_inner(inner)
    }

    /// Wraps a `tokenizers` BPE tokenizer: its special tokens are the control
    /// pieces, its model's unknown token the unknown piece.
    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        let tokenizers::ModelWrapper::BPE(bpe) = inner.get_model() else {
            bail!("the tokenizer's model is not BPE");
        };
        let vocab = bpe.get_vocab();
        let size = vocab.len();
        let mut pieces = vec![String::new(); size];
        for (piece, id) in vocab {
            let slot = pieces
                .get_mut(id as usize)
                .context("the vocabulary's ids are not contiguous")?;
            *slot = piece;
        }
        let unk = bpe.get_unk_token().clone();
        let control: Vec<String> = inner
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        let roles = pieces
            .iter()
            .map(|p| {
                if unk.as_deref() == Some(p.as_str()) {
                    Role::Unknown
                } else if control.contains(p) {
                    Role::Control
                } else {
                    Role::Normal
                }
            })
            .collect();
        Ok(Self {
            inner,
            pieces,
            roles,
        })
    }

    /// Reads a tokenizer saved with [`Tokenizer::save_json`] (`tokenizers` JSON).
    pub fn from_json(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(tk_err)
            .with_context(|| format!("cannot read tokenizer {}", path.display()))?;
        Self::from_inner(inner)
    }

    /// Writes the tokenizer as `tokenizers` JSON.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, true)
            .map_err(tk_err)
            .with_context(|| format!("cannot write tokenizer {}", path.display()))
    }

    /// Number of pieces (ids `0..vocab_size`). The CTC model has one more class.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The CTC blank id: `vocab_size()`.
    pub fn blank_id(&self) -> u32 {
        self.pieces.len() as u32
    }

    /// The piece of an id, or `None` outside the vocabulary.
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// Encodes text to piece ids, as SentencePiece's `encode` (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // Run normaliser, pre-tokenizer and model directly: control pieces are
        // never matched in the text, unlike `tokenizers`' special tokens.
        let mut pre = PreTokenizedString::from(text);
        if let Some(normalizer) = self.inner.get_normalizer() {
            pre.normalize(|s| tokenizers::Normalizer::normalize(normalizer, s))
                .map_err(tk_err)?;
        }
        if let Some(pre_tokenizer) = self.inner.get_pre_tokenizer() {
            pre_tokenizer.pre_tokenize(&mut pre).map_err(tk_err)?;
        }
        let model = self.inner.get_model();
        let mut ids = Vec::new();
        for (word, _, _) in pre.get_splits(OffsetReferential::Normalized, OffsetType::None) {
            ids.extend(model.tokenize(word).map_err(tk_err)?.iter().map(|t| t.id));
        }
        Ok(ids)
    }

    /// Decodes ids to text, as SentencePiece's `decode`. Ids outside the
    /// vocabulary (e.g. the CTC blank) are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::new();
        for &id in ids {
            let (Some(piece), Some(role)) =
                (self.pieces.get(id as usize), self.roles.get(id as usize))
            else {
                continue;
            };
            match role {
                Role::Control => {}
                Role::Unknown => text.push_str(UNK_SURFACE),
                Role::Normal => {
                    // The space SentencePiece added before the first word is dropped.
                    let piece = if text.is_empty() {
                        piece.strip_prefix(SPACE_MARK).unwrap_or(piece)
                    } else {
                        piece
                    };
                    text.extend(piece.chars().map(|c| if c == SPACE_MARK { ' ' } else { c }));
                }
            }
        }
        text
    }
}

/// Trains a BPE tokenizer with the reference's options: NFKC and lower
/// case, whitespace clean-up, `[PAD]` = 0, `[UNK]` = 1, `[BOS]` = 2, no EOS,
/// and `vocab_size` pieces in all (fewer if the text has too few pairs).
pub fn train_bpe(texts: impl Iterator<Item = String>, vocab_size: usize) -> Result<Tokenizer> {
    let specials: Vec<AddedToken> = [PAD_PIECE, UNK_PIECE, BOS_PIECE]
        .into_iter()
        .map(|p| AddedToken::from(p, true))
        .collect();
    if vocab_size <= specials.len() {
        bail!("vocab_size must be larger than {}", specials.len());
    }
    let bpe = BPE::builder()
        .unk_token(UNK_PIECE.to_string())
        .fuse_unk(true)
        .build()
        .map_err(tk_err)?;
    let mut normalizers: Vec<NormalizerWrapper> = vec![Nmt.into(), NFKC.into(), Lowercase.into()];
    normalizers.extend(whitespace_cleanup()?);
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner
        .with_normalizer(Some(Sequence::new(normalizers)))
        .map_err(tk_err)?;
    inner.with_pre_tokenizer(Some(Metaspace::new(
        SPACE_MARK,
        PrependScheme::Always,
        true,
    )));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(specials)
        .build()
        .into();
    let texts: Vec<String> = texts.collect();
    inner
        .train(&mut trainer, texts.into_iter())
        .map_err(tk_err)
        .context("BPE training failed")?;
    Tokenizer::from_inner(inner)
}

/// Trains a BPE tokenizer on `transcripts` and saves it as JSON at `out`;
/// returns its vocabulary size.
pub fn train_and_save(transcripts: Vec<String>, vocab_size: usize, out: &Path) -> Result<usize> {
    if transcripts.is_empty() {
        bail!("no transcripts to train on");
    }
    let tokenizer = train_bpe(transcripts.into_iter(), vocab_size)?;
    tokenizer
        .save_json(out)
        .with_context(|| format!("cannot write tokenizer to {}", out.display()))?;
    Ok(tokenizer.vocab_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_tokenizer_has_reference_specials() {
        let text = ["the cat sat on the mat", "The Hat and the Bat!"]
            .map(String::from)
            .into_iter();
        let tk = train_bpe(text, 40).unwrap();
        assert_eq!(tk.id_to_piece(0), Some(PAD_PIECE));
        assert_eq!(tk.id_to_piece(1), Some(UNK_PIECE));
        assert_eq!(tk.id_to_piece(2), Some(BOS_PIECE));
        assert_eq!(tk.blank_id() as usize, tk.vocab_size());
        let ids = tk.encode("The  cat").unwrap();
        assert_eq!(tk.decode(&ids), "the cat");
        assert_eq!(tk.decode(&[0, 2]), "");
    }
}
