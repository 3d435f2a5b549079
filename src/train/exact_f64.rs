//! Serde helper that writes an `f64` as its shortest round-trip decimal string,
//! so that saved training state restores bit-exactly whatever JSON float parser
//! reads it back (serde_json's default parser can be off by one ulp).

use serde::{de::Error, Deserialize, Deserializer, Serializer};

/// Writes `v` as a decimal string (`"0.0011736481776669307"`, `"inf"`, `"NaN"`).
pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:?}"))
}

/// Reads a value written by [`serialize`] (a plain JSON number is accepted too).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Number(f64),
    }
    match Repr::deserialize(d)? {
        Repr::Text(s) => s
            .parse()
            .map_err(|_| D::Error::custom(format!("not a number: `{s}`"))),
        Repr::Number(v) => Ok(v),
    }
}
