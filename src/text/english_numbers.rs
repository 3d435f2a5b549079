//! Spelled-out English numbers to digits: the number stage of the English
//! scoring normaliser (reference §9.4, step 8).
//!
//! Behaviour, word by word (input is lowercase, split on whitespace):
//! - cardinals combine into one number: "two hundred and five" → `205`,
//!   "one thousand two hundred" → `1200`, "twenty one" → `21`;
//! - runs that do not form one number are concatenated digit-wise, which
//!   gives years and digit strings: "nineteen ninety" → `1990`,
//!   "one two three" → `123`, "o" / "oh" / "zero" → `0`;
//! - "double"/"triple" repeat the next digit; "point" starts a decimal
//!   ("one point five" → `1.5`, "one point five million" → `1500000`);
//!   "<number> and a half" → `<number>.5`;
//! - ordinals and plurals keep a suffix: "twenty first" → `21st`,
//!   "sixties" → `60s`, "hundredth" → `100th`;
//! - "minus"/"negative"/"plus"/"positive" before a number prefix `-`/`+`;
//!   "dollars", "euros", "pounds", "cents" after a number prefix `$ € £ ¢`,
//!   and "$2 and ¢7" becomes `$2.07`; "percent"/"per cent" append `%`;
//! - digits already in the text are kept (an integral value loses leading
//!   zeros and a ".0" tail: "007" → `7`), and a lone `1`/`1s` is written
//!   back as "one"/"ones".
//!
//! Integers are exact up to `u128`; a value that would overflow is emitted
//! as it stands and the count restarts.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use regex::{Captures, Regex};

const ONES: [&str; 19] = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 8] = [
    "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];
const MULTIPLIERS: [(&str, u32); 12] = [
    ("hundred", 2),
    ("thousand", 3),
    ("million", 6),
    ("billion", 9),
    ("trillion", 12),
    ("quadrillion", 15),
    ("quintillion", 18),
    ("sextillion", 21),
    ("septillion", 24),
    ("octillion", 27),
    ("nonillion", 30),
    ("decillion", 33),
];
const ZEROS: [&str; 3] = ["o", "oh", "zero"];
const PRECEDING: [(&str, &str); 4] = [
    ("minus", "-"),
    ("negative", "-"),
    ("plus", "+"),
    ("positive", "+"),
];
const FOLLOWING: [(&str, &str); 8] = [
    ("pound", "£"),
    ("pounds", "£"),
    ("euro", "€"),
    ("euros", "€"),
    ("dollar", "$"),
    ("dollars", "$"),
    ("cent", "¢"),
    ("cents", "¢"),
];
const SPECIALS: [&str; 4] = ["and", "double", "triple", "point"];
const PREFIX_CHARS: [char; 6] = ['-', '+', '$', '€', '£', '¢'];

/// A number being built: an exact integer or a digit string.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(u128),
    Digits(String),
}

impl Value {
    fn text(&self) -> String {
        match self {
            Value::Int(n) => n.to_string(),
            Value::Digits(s) => s.clone(),
        }
    }
}

/// `value or ""`: a missing value, an integer 0 and an empty string all
/// count as empty.
fn text_or_empty(v: &Option<Value>) -> String {
    match v {
        None | Some(Value::Int(0)) => String::new(),
        Some(v) => v.text(),
    }
}

/// `^[0-9]+(\.[0-9]+)?$`
fn is_number(s: &str) -> bool {
    let (int, frac) = match s.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

/// An exact decimal `num / 10^scale`.
#[derive(Debug, Clone, Copy)]
struct Decimal {
    num: u128,
    scale: u32,
}

impl Decimal {
    /// Parse `digits[.digits]` (either side may be empty, not both).
    fn parse(s: &str) -> Option<Self> {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut num: u128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            num = num.checked_mul(10)?.checked_add(u128::from(b - b'0'))?;
        }
        Some(Self {
            num,
            scale: frac.len() as u32,
        })
    }

    fn of(v: &Value) -> Option<Self> {
        match v {
            Value::Int(n) => Some(Self { num: *n, scale: 0 }),
            Value::Digits(s) => Self::parse(s),
        }
    }

    /// The integer value, if it is one.
    fn integer(self) -> Option<u128> {
        let den = 10u128.checked_pow(self.scale)?;
        self.num.is_multiple_of(den).then_some(self.num / den)
    }

    /// `self * m` when the product is an integer.
    fn times(self, m: u128) -> Option<u128> {
        let den = 10u128.checked_pow(self.scale)?;
        let p = self.num.checked_mul(m)?;
        p.is_multiple_of(den).then_some(p / den)
    }
}

/// The number-word tables and the pre/post-processing patterns.
pub struct EnglishNumberNormalizer {
    ones: HashMap<String, u128>,
    ones_suffixed: HashMap<String, (u128, &'static str)>,
    tens: HashMap<String, u128>,
    tens_suffixed: HashMap<String, (u128, &'static str)>,
    multipliers: HashMap<String, u128>,
    multipliers_suffixed: HashMap<String, (u128, &'static str)>,
    words: HashSet<String>,
    half: Regex,
    letter_digit: Regex,
    digit_letter: Regex,
    digit_suffix: Regex,
    cents_combine: Regex,
    cents_only: Regex,
    one: Regex,
}

struct Builder<'a> {
    prefix: Option<String>,
    value: Option<Value>,
    out: Vec<String>,
    n: &'a EnglishNumberNormalizer,
}

impl Builder<'_> {
    /// Emit `result` with any pending prefix; clears the value and prefix.
    fn emit(&mut self, result: String) {
        let r = match self.prefix.take() {
            Some(p) => p + result.as_str(),
            None => result,
        };
        self.value = None;
        self.out.push(r);
    }

    fn emit_value(&mut self) {
        if let Some(v) = self.value.take() {
            self.emit(v.text());
        }
    }

    /// Combine a ones digit (1–19) into the value (not emitted).
    fn combine_ones(&self, ones: u128, prev: Option<&str>) -> Value {
        let prev_is_ones = prev.is_some_and(|p| self.n.ones.contains_key(p));
        let prev_is_tens = prev.is_some_and(|p| self.n.tens.contains_key(p));
        match &self.value {
            None => Value::Int(ones),
            Some(Value::Int(v)) if !prev_is_ones => {
                let unit = if ones < 10 { 10 } else { 100 };
                match v.checked_add(ones) {
                    Some(sum) if v % unit == 0 => Value::Int(sum),
                    _ => Value::Digits(format!("{v}{ones}")),
                }
            }
            Some(v) => {
                let s = v.text();
                if prev_is_tens && ones < 10 && s.ends_with('0') {
                    Value::Digits(format!("{}{ones}", &s[..s.len() - 1]))
                } else {
                    Value::Digits(format!("{s}{ones}"))
                }
            }
        }
    }

    fn combine_tens(&self, tens: u128) -> Value {
        match &self.value {
            None => Value::Int(tens),
            Some(Value::Digits(s)) => Value::Digits(format!("{s}{tens}")),
            Some(Value::Int(v)) if v % 100 == 0 => Value::Int(v + tens),
            Some(Value::Int(v)) => Value::Digits(format!("{v}{tens}")),
        }
    }
}

impl EnglishNumberNormalizer {
    /// Build the tables.
    pub fn new() -> Self {
        let ones: HashMap<String, u128> = ONES
            .iter()
            .zip(1u128..)
            .map(|(w, v)| (w.to_string(), v))
            .collect();
        let mut ones_suffixed: HashMap<String, (u128, &'static str)> = HashMap::new();
        for (w, &v) in &ones {
            let plural = if w == "six" {
                "sixes".to_string()
            } else {
                format!("{w}s")
            };
            ones_suffixed.insert(plural, (v, "s"));
            let (ordinal, suffix) = match w.as_str() {
                "one" => ("first".to_string(), "st"),
                "two" => ("second".to_string(), "nd"),
                "three" => ("third".to_string(), "rd"),
                "five" => ("fifth".to_string(), "th"),
                "eight" => ("eighth".to_string(), "th"),
                "nine" => ("ninth".to_string(), "th"),
                "twelve" => ("twelfth".to_string(), "th"),
                _ => (format!("{w}th"), "th"),
            };
            ones_suffixed.insert(ordinal, (v, suffix));
        }
        let tens: HashMap<String, u128> = TENS
            .iter()
            .zip((20u128..).step_by(10))
            .map(|(w, v)| (w.to_string(), v))
            .collect();
        let mut tens_suffixed = HashMap::new();
        for (w, &v) in &tens {
            let stem = &w[..w.len() - 1];
            tens_suffixed.insert(format!("{stem}ies"), (v, "s"));
            tens_suffixed.insert(format!("{stem}ieth"), (v, "th"));
        }
        let multipliers: HashMap<String, u128> = MULTIPLIERS
            .iter()
            .map(|&(w, e)| (w.to_string(), 10u128.pow(e)))
            .collect();
        let mut multipliers_suffixed = HashMap::new();
        for (w, &v) in &multipliers {
            multipliers_suffixed.insert(format!("{w}s"), (v, "s"));
            multipliers_suffixed.insert(format!("{w}th"), (v, "th"));
        }
        let mut words: HashSet<String> = HashSet::new();
        words.extend(ZEROS.iter().map(|s| s.to_string()));
        words.extend(ones.keys().cloned());
        words.extend(ones_suffixed.keys().cloned());
        words.extend(tens.keys().cloned());
        words.extend(tens_suffixed.keys().cloned());
        words.extend(multipliers.keys().cloned());
        words.extend(multipliers_suffixed.keys().cloned());
        words.extend(PRECEDING.iter().map(|p| p.0.to_string()));
        words.extend(FOLLOWING.iter().map(|p| p.0.to_string()));
        words.extend(["per", "percent"].map(String::from));
        words.extend(SPECIALS.iter().map(|s| s.to_string()));
        let re = |p: &str| Regex::new(p).expect("valid built-in pattern");
        Self {
            ones,
            ones_suffixed,
            tens,
            tens_suffixed,
            multipliers,
            multipliers_suffixed,
            words,
            half: re(r"\band\s+a\s+half\b"),
            letter_digit: re(r"([a-z])([0-9])"),
            digit_letter: re(r"([0-9])([a-z])"),
            digit_suffix: re(r"([0-9])\s+(st|nd|rd|th|s)\b"),
            cents_combine: re(r"([€£$])([0-9]+) (?:and )?¢([0-9]{1,2})\b"),
            cents_only: re(r"[€£$]0.([0-9]{1,2})\b"),
            one: re(r"\b1(s?)\b"),
        }
    }

    /// The shared instance.
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<EnglishNumberNormalizer> = OnceLock::new();
        SHARED.get_or_init(Self::new)
    }

    fn is_decimal_word(&self, w: &str) -> bool {
        self.ones.contains_key(w) || self.tens.contains_key(w) || ZEROS.contains(&w)
    }

    /// "X and a half" → "X point five" when X ends in a number word; a space
    /// at every letter/digit boundary, except before st/nd/rd/th/s.
    fn preprocess(&self, s: &str) -> String {
        let segments: Vec<&str> = self.half.split(s).collect();
        let mut parts: Vec<&str> = Vec::new();
        for (i, seg) in segments.iter().enumerate() {
            if seg.trim().is_empty() {
                continue;
            }
            parts.push(seg);
            if i + 1 < segments.len() {
                let last = seg.split_whitespace().last().unwrap_or("");
                if self.is_decimal_word(last) || self.multipliers.contains_key(last) {
                    parts.push("point five");
                } else {
                    parts.push("and a half");
                }
            }
        }
        let s = parts.join(" ");
        let s = self.letter_digit.replace_all(&s, "${1} ${2}");
        let s = self.digit_letter.replace_all(&s, "${1} ${2}");
        self.digit_suffix.replace_all(&s, "${1}${2}").into_owned()
    }

    /// Currency cents, and "1"/"1s" back to "one"/"ones".
    fn postprocess(&self, s: &str) -> String {
        let s = self
            .cents_combine
            .replace_all(s, |c: &Captures| match c[3].parse::<u32>() {
                Ok(cents) => format!("{}{}.{cents:02}", &c[1], &c[2]),
                Err(_) => c[0].to_string(),
            });
        let s = self
            .cents_only
            .replace_all(&s, |c: &Captures| match c[1].parse::<u32>() {
                Ok(cents) => format!("¢{cents}"),
                Err(_) => c[0].to_string(),
            });
        self.one.replace_all(&s, "one${1}").into_owned()
    }

    /// Convert the number words of `s` (lowercase) to digits.
    pub fn normalize(&self, s: &str) -> String {
        let pre = self.preprocess(s);
        let words: Vec<&str> = pre.split_whitespace().collect();
        let joined = self.process_words(&words).join(" ");
        self.postprocess(&joined)
    }

    fn process_words(&self, words: &[&str]) -> Vec<String> {
        let mut b = Builder {
            prefix: None,
            value: None,
            out: Vec::with_capacity(words.len()),
            n: self,
        };
        let mut skip = false;
        for i in 0..words.len() {
            if skip {
                skip = false;
                continue;
            }
            let prev = i.checked_sub(1).map(|j| words[j]);
            let cur = words[i];
            let next = words.get(i + 1).copied();
            let next_is_numeric = next.is_some_and(is_number);
            let next_is_word = next.is_some_and(|w| self.words.contains(w));
            let first = cur.chars().next().unwrap_or(' ');
            let has_prefix = PREFIX_CHARS.contains(&first);
            let bare = if has_prefix {
                &cur[first.len_utf8()..]
            } else {
                cur
            };

            if is_number(bare) {
                if let Some(v) = &b.value {
                    if let Value::Digits(s) = v {
                        if s.ends_with('.') {
                            b.value = Some(Value::Digits(format!("{s}{cur}")));
                            continue;
                        }
                    }
                    b.emit_value();
                }
                if has_prefix {
                    b.prefix = Some(first.to_string());
                }
                b.value = Some(match Decimal::parse(bare).and_then(Decimal::integer) {
                    Some(n) => Value::Int(n),
                    None => Value::Digits(bare.to_string()),
                });
            } else if !self.words.contains(cur) {
                b.emit_value();
                b.emit(cur.to_string());
            } else if ZEROS.contains(&cur) {
                b.value = Some(Value::Digits(text_or_empty(&b.value) + "0"));
            } else if let Some(&ones) = self.ones.get(cur) {
                b.value = Some(b.combine_ones(ones, prev));
            } else if let Some(&(ones, suffix)) = self.ones_suffixed.get(cur) {
                let v = b.combine_ones(ones, prev);
                b.value = None;
                b.emit(v.text() + suffix);
            } else if let Some(&tens) = self.tens.get(cur) {
                b.value = Some(b.combine_tens(tens));
            } else if let Some(&(tens, suffix)) = self.tens_suffixed.get(cur) {
                let v = b.combine_tens(tens);
                b.value = None;
                b.emit(v.text() + suffix);
            } else if let Some(&m) = self.multipliers.get(cur) {
                self.apply_multiplier(&mut b, m, None);
            } else if let Some(&(m, suffix)) = self.multipliers_suffixed.get(cur) {
                self.apply_multiplier(&mut b, m, Some(suffix));
            } else if let Some(&(_, sym)) = PRECEDING.iter().find(|p| p.0 == cur) {
                b.emit_value();
                if next_is_word || next_is_numeric {
                    b.prefix = Some(sym.to_string());
                } else {
                    b.emit(cur.to_string());
                }
            } else if let Some(&(_, sym)) = FOLLOWING.iter().find(|p| p.0 == cur) {
                if b.value.is_some() {
                    b.prefix = Some(sym.to_string());
                    b.emit_value();
                } else {
                    b.emit(cur.to_string());
                }
            } else if cur == "per" || cur == "percent" {
                match b.value.take() {
                    Some(v) if cur == "percent" => b.emit(v.text() + "%"),
                    Some(v) if next == Some("cent") => {
                        b.emit(v.text() + "%");
                        skip = true;
                    }
                    Some(v) => {
                        b.emit(v.text());
                        b.emit(cur.to_string());
                    }
                    None => b.emit(cur.to_string()),
                }
            } else if !next_is_word && !next_is_numeric {
                // "and", "double", "triple", "point" not followed by a number.
                b.emit_value();
                b.emit(cur.to_string());
            } else if cur == "and" {
                if !prev.is_some_and(|p| self.multipliers.contains_key(p)) {
                    b.emit_value();
                    b.emit(cur.to_string());
                }
            } else if cur == "double" || cur == "triple" {
                let next = next.unwrap_or("");
                if self.ones.contains_key(next) || ZEROS.contains(&next) {
                    let repeats = if cur == "double" { 2 } else { 3 };
                    let digit = self.ones.get(next).copied().unwrap_or(0).to_string();
                    b.value = Some(Value::Digits(
                        text_or_empty(&b.value) + digit.repeat(repeats).as_str(),
                    ));
                    skip = true;
                } else {
                    b.emit_value();
                    b.emit(cur.to_string());
                }
            } else if cur == "point"
                && (next.is_some_and(|w| self.is_decimal_word(w)) || next_is_numeric)
            {
                b.value = Some(Value::Digits(text_or_empty(&b.value) + "."));
            }
            // Otherwise "point" before a non-decimal number word is dropped.
        }
        b.emit_value();
        b.out
    }

    fn apply_multiplier(&self, b: &mut Builder<'_>, m: u128, suffix: Option<&str>) {
        let restart = |b: &mut Builder<'_>| {
            b.emit_value();
            match suffix {
                None => b.value = Some(Value::Int(m)),
                Some(sfx) => b.emit(format!("{m}{sfx}")),
            }
        };
        let finish = |b: &mut Builder<'_>, n: u128| match suffix {
            None => b.value = Some(Value::Int(n)),
            Some(sfx) => b.emit(format!("{n}{sfx}")),
        };
        match b.value.clone() {
            None => finish(b, m),
            Some(Value::Int(v)) if suffix.is_some() || v != 0 => {
                let before = v / 1000 * 1000;
                match (v % 1000)
                    .checked_mul(m)
                    .and_then(|r| r.checked_add(before))
                {
                    Some(c) => finish(b, c),
                    None => restart(b),
                }
            }
            Some(v) => match Decimal::of(&v).and_then(|d| d.times(m)) {
                Some(p) => finish(b, p),
                None => restart(b),
            },
        }
    }
}

impl Default for EnglishNumberNormalizer {
    fn default() -> Self {
        Self::new()
    }
}
