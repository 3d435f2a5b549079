//! Text: the SentencePiece-compatible tokenizer, the English text normaliser
//! used for scoring, and word error rate.
