//! Reader for SentencePiece `.model` files (a `ModelProto` protobuf).
//!
//! Only the fields the tokenizer needs are decoded: the pieces with their
//! scores and types, the model type, and the normaliser's precompiled
//! character map and whitespace flags. Unknown fields are skipped, as the
//! protobuf wire format allows.

use std::path::Path;

/// Why a `.model` file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ModelProtoError {
    /// The file could not be read.
    #[error("cannot read SentencePiece model {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The bytes are not a valid `ModelProto`.
    #[error("malformed SentencePiece model: {0}")]
    Malformed(&'static str),
}

/// The role of a piece in the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary subword.
    Normal,
    /// The unknown-symbol piece.
    Unknown,
    /// A control symbol (`[PAD]`, `[BOS]`, ...): never produced from text, decodes to nothing.
    Control,
    /// A user-defined symbol, matched verbatim.
    UserDefined,
    /// A piece reserved but unused.
    Unused,
    /// A byte-fallback piece `<0xNN>`.
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece text (`▁` marks a preceding space).
    pub piece: String,
    /// Its score (for BPE, higher merges first).
    pub score: f32,
    /// Its role.
    pub kind: PieceType,
}

/// The algorithm the model was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// Unigram language model.
    Unigram,
    /// Byte-pair encoding.
    Bpe,
    /// Whitespace-delimited words.
    Word,
    /// Single characters.
    Char,
}

/// The parts of a SentencePiece model the tokenizer uses.
#[derive(Debug, Clone)]
pub struct ModelProto {
    /// The vocabulary, in id order.
    pub pieces: Vec<Piece>,
    /// The training algorithm.
    pub model_type: ModelType,
    /// Name of the normalisation rule (e.g. `nmt_nfkc_cf`).
    pub normalizer_name: String,
    /// The compiled normalisation rules (may be empty for the identity rule).
    pub precompiled_charsmap: Vec<u8>,
    /// Whether a space is prepended to the input.
    pub add_dummy_prefix: bool,
    /// Whether leading, trailing and repeated whitespace is removed.
    pub remove_extra_whitespaces: bool,
}

/// A cursor over protobuf wire-format bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// The value of one field.
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Other,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, ModelProtoError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or(ModelProtoError::Malformed("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ModelProtoError::Malformed("varint too long"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelProtoError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(ModelProtoError::Malformed("field runs past the end"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next (field number, value), or `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, ModelProtoError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Other
            }
            2 => {
                let n = usize::try_from(self.varint()?)
                    .map_err(|_| ModelProtoError::Malformed("length too large"))?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => return Err(ModelProtoError::Malformed("unsupported wire type")),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn parse_piece(bytes: &[u8]) -> Result<Piece, ModelProtoError> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => {
                piece.piece = String::from_utf8(b.to_vec())
                    .map_err(|_| ModelProtoError::Malformed("piece is not UTF-8"))?;
            }
            (2, Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Value::Varint(v)) => piece.kind = PieceType::from_proto(v),
            _ => {}
        }
    }
    Ok(piece)
}

impl ModelProto {
    /// Decodes a serialised `ModelProto`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelProtoError> {
        let mut model = ModelProto {
            pieces: Vec::new(),
            model_type: ModelType::Unigram,
            normalizer_name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
        };
        let mut r = Reader::new(bytes);
        while let Some((field, value)) = r.field()? {
            match (field, value) {
                (1, Value::Bytes(b)) => model.pieces.push(parse_piece(b)?),
                (2, Value::Bytes(b)) => {
                    let mut t = Reader::new(b);
                    while let Some((f, v)) = t.field()? {
                        if let (3, Value::Varint(kind)) = (f, v) {
                            model.model_type = match kind {
                                2 => ModelType::Bpe,
                                3 => ModelType::Word,
                                4 => ModelType::Char,
                                _ => ModelType::Unigram,
                            };
                        }
                    }
                }
                (3, Value::Bytes(b)) => {
                    let mut n = Reader::new(b);
                    while let Some((f, v)) = n.field()? {
                        match (f, v) {
                            (1, Value::Bytes(s)) => {
                                model.normalizer_name = String::from_utf8_lossy(s).into_owned()
                            }
                            (2, Value::Bytes(s)) => model.precompiled_charsmap = s.to_vec(),
                            (3, Value::Varint(x)) => model.add_dummy_prefix = x != 0,
                            (4, Value::Varint(x)) => model.remove_extra_whitespaces = x != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err(ModelProtoError::Malformed("no pieces"));
        }
        Ok(model)
    }

    /// Reads and decodes a `.model` file.
    pub fn from_file(path: &Path) -> Result<Self, ModelProtoError> {
        let bytes = std::fs::read(path).map_err(|source| ModelProtoError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }
}
