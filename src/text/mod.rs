//! Text: the SentencePiece-compatible tokenizer, the English text normaliser
//! used for scoring, and word error rate.

pub mod sentencepiece_model;
pub mod tokenizer;

pub mod english_numbers;
pub mod normalize;
pub mod spelling;
pub mod wer;
