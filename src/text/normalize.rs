//! The English text normaliser used on both sides of WER scoring
//! (reference §9.4). It reproduces the behaviour of Whisper's
//! `EnglishTextNormalizer`, in this order:
//! 1. lowercase;
//! 2. remove `[…]`, `<…>` and `(…)` spans;
//! 3. remove the fillers hmm, mm, mhm, mmm, uh, um (whole words);
//! 4. delete whitespace before an apostrophe;
//! 5. expand contractions and abbreviated titles (see [`REPLACEMENTS`]);
//! 6. remove commas between digits, and periods not followed by a digit;
//! 7. NFKD, then drop non-spacing marks (diacritics), map œ æ ø ß ð þ đ ł to
//!    letters, and turn other marks, symbols and punctuation into spaces —
//!    except `. % $ ¢ € £`;
//! 8. number words to digits ([`super::english_numbers`]);
//! 9. British to American spellings ([`super::spelling`]);
//! 10. drop `. $ ¢ € £` not followed by a digit and `%` not preceded by one;
//!     collapse whitespace.
//!
//! The result is also trimmed (scoring splits on whitespace, so this never
//! changes a WER).

use std::sync::OnceLock;

use regex::Regex;

use super::english_numbers::EnglishNumberNormalizer;
use super::spelling::standardize_spellings;

/// Contractions and titles, applied in this order as whole-word regex
/// replacements (the order matters: "won't" before "n't", "'s been" before "'s").
pub const REPLACEMENTS: &[(&str, &str)] = &[
    // Common contractions.
    (r"\bwon't\b", "will not"),
    (r"\bcan't\b", "can not"),
    (r"\blet's\b", "let us"),
    (r"\bain't\b", "aint"),
    (r"\by'all\b", "you all"),
    (r"\bwanna\b", "want to"),
    (r"\bgotta\b", "got to"),
    (r"\bgonna\b", "going to"),
    (r"\bi'ma\b", "i am going to"),
    (r"\bimma\b", "i am going to"),
    (r"\bwoulda\b", "would have"),
    (r"\bcoulda\b", "could have"),
    (r"\bshoulda\b", "should have"),
    (r"\bma'am\b", "madam"),
    // Titles and abbreviations before names.
    (r"\bmr\b", "mister "),
    (r"\bmrs\b", "missus "),
    (r"\bst\b", "saint "),
    (r"\bdr\b", "doctor "),
    (r"\bprof\b", "professor "),
    (r"\bcapt\b", "captain "),
    (r"\bgov\b", "governor "),
    (r"\bald\b", "alderman "),
    (r"\bgen\b", "general "),
    (r"\bsen\b", "senator "),
    (r"\brep\b", "representative "),
    (r"\bpres\b", "president "),
    (r"\brev\b", "reverend "),
    (r"\bhon\b", "honorable "),
    (r"\basst\b", "assistant "),
    (r"\bassoc\b", "associate "),
    (r"\blt\b", "lieutenant "),
    (r"\bcol\b", "colonel "),
    (r"\bjr\b", "junior "),
    (r"\bsr\b", "senior "),
    (r"\besq\b", "esquire "),
    // Perfect tenses.
    (r"'d been\b", " had been"),
    (r"'s been\b", " has been"),
    (r"'d gone\b", " had gone"),
    (r"'s gone\b", " has gone"),
    (r"'d done\b", " had done"),
    (r"'s got\b", " has got"),
    // General contractions.
    (r"n't\b", " not"),
    (r"'re\b", " are"),
    (r"'s\b", " is"),
    (r"'d\b", " would"),
    (r"'ll\b", " will"),
    (r"'t\b", " not"),
    (r"'ve\b", " have"),
    (r"'m\b", " am"),
];

/// Symbols kept by step 7 (they may attach to numbers).
const KEEP: &[char] = &['.', '%', '$', '¢', '€', '£'];

/// Letters that NFKD does not decompose, spelled in ASCII.
fn extra_diacritic(c: char) -> Option<&'static str> {
    Some(match c {
        'œ' => "oe",
        'Œ' => "OE",
        'ø' => "o",
        'Ø' => "O",
        'æ' => "ae",
        'Æ' => "AE",
        'ß' => "ss",
        'ẞ' => "SS",
        'đ' | 'ð' => "d",
        'Đ' | 'Ð' => "D",
        'þ' => "th",
        'Þ' => "th",
        'ł' => "l",
        'Ł' => "L",
        _ => return None,
    })
}

/// The compiled normaliser.
pub struct EnglishTextNormalizer {
    brackets: Regex,
    parens: Regex,
    fillers: Regex,
    space_apostrophe: Regex,
    replacements: Vec<(Regex, &'static str)>,
    digit_comma: Regex,
    period: Regex,
    nonspacing_mark: Regex,
    mark_symbol_punct: Regex,
    stray_currency: Regex,
    stray_percent: Regex,
    spaces: Regex,
    numbers: &'static EnglishNumberNormalizer,
}

impl EnglishTextNormalizer {
    /// Compile the patterns.
    pub fn new() -> Self {
        let re = |p: &str| Regex::new(p).expect("valid built-in pattern");
        Self {
            brackets: re(r"[<\[][^>\]]*[>\]]"),
            parens: re(r"\(([^)]+?)\)"),
            fillers: re(r"\b(hmm|mm|mhm|mmm|uh|um)\b"),
            space_apostrophe: re(r"\s+'"),
            replacements: REPLACEMENTS.iter().map(|&(p, r)| (re(p), r)).collect(),
            digit_comma: re(r"(\d),(\d)"),
            period: re(r"\.([^0-9]|$)"),
            nonspacing_mark: re(r"^\p{Mn}$"),
            mark_symbol_punct: re(r"^[\p{M}\p{S}\p{P}]$"),
            stray_currency: re(r"[.$¢€£]([^0-9])"),
            stray_percent: re(r"([^0-9])%"),
            spaces: re(r"\s+"),
            numbers: EnglishNumberNormalizer::shared(),
        }
    }

    /// The shared instance.
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<EnglishTextNormalizer> = OnceLock::new();
        SHARED.get_or_init(Self::new)
    }

    /// Step 7: NFKD, drop diacritics, symbols and punctuation to spaces
    /// (except [`KEEP`]).
    fn remove_symbols_and_diacritics(&self, s: &str) -> String {
        let mut decomposed = tokenizers::NormalizedString::from(s);
        decomposed.nfkd();
        let mut out = String::with_capacity(s.len());
        let mut buf = [0u8; 4];
        for c in decomposed.get().chars() {
            if KEEP.contains(&c) {
                out.push(c);
            } else if let Some(r) = extra_diacritic(c) {
                out.push_str(r);
            } else if c.is_ascii() && !c.is_ascii_punctuation() {
                out.push(c);
            } else {
                let cs: &str = c.encode_utf8(&mut buf);
                if self.nonspacing_mark.is_match(cs) {
                    continue;
                }
                out.push(if self.mark_symbol_punct.is_match(cs) {
                    ' '
                } else {
                    c
                });
            }
        }
        out
    }

    /// Normalise one text.
    pub fn normalize(&self, text: &str) -> String {
        let s = text.to_lowercase();
        let s = self.brackets.replace_all(&s, "");
        let s = self.parens.replace_all(&s, "");
        let s = self.fillers.replace_all(&s, "");
        let mut s = self.space_apostrophe.replace_all(&s, "'").into_owned();
        for (pattern, replacement) in &self.replacements {
            if let std::borrow::Cow::Owned(r) = pattern.replace_all(&s, *replacement) {
                s = r;
            }
        }
        let s = self.digit_comma.replace_all(&s, "${1}${2}");
        let s = self.period.replace_all(&s, " ${1}");
        let s = self.remove_symbols_and_diacritics(&s);
        let s = self.numbers.normalize(&s);
        let s = standardize_spellings(&s);
        let s = self.stray_currency.replace_all(&s, " ${1}");
        let s = self.stray_percent.replace_all(&s, "${1} ");
        self.spaces.replace_all(&s, " ").trim().to_string()
    }
}

impl Default for EnglishTextNormalizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Normalise `text` with the shared [`EnglishTextNormalizer`].
pub fn normalize_english(text: &str) -> String {
    EnglishTextNormalizer::shared().normalize(text)
}
