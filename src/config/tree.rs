//! A YAML document as a tree of values that remember where they came from.
//!
//! The typed config is deserialised from this tree (see [`super::de`]) rather
//! than straight from text, so that every error can name the file, line and key
//! path, unknown keys can be reported as warnings, and `key.path=value`
//! command-line overrides can be spliced in before typing.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Where a value of the tree came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A position in the config file (1-based line and column).
    File {
        /// Line, 1-based.
        line: u64,
        /// Column, 1-based.
        column: u64,
    },
    /// A `key.path=value` argument given on the command line.
    Override(String),
    /// Not written anywhere: a default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { line, column } => write!(f, "{line}:{column}"),
            Origin::Override(arg) => write!(f, "override `{arg}`"),
            Origin::Default => write!(f, "default"),
        }
    }
}

/// One value of the tree with its origin.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where it was written.
    pub origin: Origin,
}

/// A YAML value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `~`, `null` or an empty value.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order: (key, key origin, value).
    Map(Vec<(String, Origin, Node)>),
}

impl Value {
    /// A short name of the value's kind for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The value as it would be written in YAML, for messages.
    pub fn show(&self) -> String {
        match self {
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(x) => x.to_string(),
            Value::Str(s) => format!("{s:?}"),
            Value::Seq(_) => "[...]".into(),
            Value::Map(_) => "{...}".into(),
        }
    }
}

impl Node {
    /// The node reached by following `path` (keys separated by dots), if any.
    #[cfg(test)]
    pub fn get(&self, path: &str) -> Option<&Node> {
        if path.is_empty() {
            return Some(self);
        }
        let (head, rest) = path.split_once('.').unwrap_or((path, ""));
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .rev()
                .find(|(k, _, _)| k == head)
                .and_then(|(_, _, v)| v.get(rest)),
            _ => None,
        }
    }

    /// Where the key at the end of `path` was written: the closest ancestor
    /// that exists when the key itself does not.
    pub fn origin_of(&self, path: &str) -> Origin {
        let mut node = self;
        let mut origin = self.origin.clone();
        for key in path.split('.').filter(|k| !k.is_empty()) {
            let Value::Map(entries) = &node.value else {
                break;
            };
            match entries.iter().rev().find(|(k, _, _)| k == key) {
                Some((_, key_origin, child)) => {
                    origin = key_origin.clone();
                    node = child;
                }
                None => break,
            }
        }
        origin
    }

    /// Sets the value at `path`, creating (or replacing non-mapping values by)
    /// mappings along the way. Used for command-line overrides.
    pub fn set(&mut self, path: &[&str], value: Node) {
        let Some((head, rest)) = path.split_first() else {
            *self = value;
            return;
        };
        if !matches!(self.value, Value::Map(_)) {
            self.value = Value::Map(Vec::new());
            self.origin = value.origin.clone();
        }
        let Value::Map(entries) = &mut self.value else {
            unreachable!("just made a map")
        };
        let idx = match entries.iter().rposition(|(k, _, _)| k == head) {
            Some(i) => i,
            None => {
                entries.push((
                    head.to_string(),
                    value.origin.clone(),
                    Node {
                        value: Value::Null,
                        origin: value.origin.clone(),
                    },
                ));
                entries.len() - 1
            }
        };
        entries[idx].1 = value.origin.clone();
        entries[idx].2.set(rest, value);
    }
}

/// Parses YAML text into a tree. The error is serde-saphyr's, which carries
/// the line, the column and a snippet of the offending text.
pub fn parse(text: &str) -> Result<Node, serde_saphyr::Error> {
    if text.trim().is_empty() {
        return Ok(Node {
            value: Value::Null,
            origin: Origin::File { line: 1, column: 1 },
        });
    }
    let spanned: Spanned<SpannedValue> = serde_saphyr::from_str(text)?;
    Ok(to_node(spanned))
}

/// Parses one override value (the text after `=`) as a YAML scalar or flow
/// collection; text that is not valid YAML is taken as a plain string.
pub fn parse_override_value(text: &str, origin: Origin) -> Node {
    let value = match parse(text) {
        Ok(node) => retag(node, &origin).value,
        Err(_) => Value::Str(text.to_string()),
    };
    Node { value, origin }
}

/// A tree from JSON (every value's origin is [`Origin::Default`]).
pub fn from_json(value: &serde_json::Value) -> Node {
    use serde_json::Value as J;
    let value = match value {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::Str(s.clone()),
        J::Array(items) => Value::Seq(items.iter().map(from_json).collect()),
        J::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| (k.clone(), Origin::Default, from_json(v)))
                .collect(),
        ),
    };
    Node {
        value,
        origin: Origin::Default,
    }
}

fn retag(node: Node, origin: &Origin) -> Node {
    let value = match node.value {
        Value::Seq(items) => Value::Seq(items.into_iter().map(|n| retag(n, origin)).collect()),
        Value::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, _, v)| (k, origin.clone(), retag(v, origin)))
                .collect(),
        ),
        other => other,
    };
    Node {
        value,
        origin: origin.clone(),
    }
}

fn origin(loc: &serde_saphyr::Location) -> Origin {
    if loc.line() == 0 {
        Origin::Default
    } else {
        Origin::File {
            line: loc.line(),
            column: loc.column(),
        }
    }
}

fn to_node(spanned: Spanned<SpannedValue>) -> Node {
    let origin = origin(&spanned.referenced);
    let value = match spanned.value {
        SpannedValue::Null => Value::Null,
        SpannedValue::Bool(b) => Value::Bool(b),
        SpannedValue::Int(i) => Value::Int(i),
        SpannedValue::Float(x) => Value::Float(x),
        SpannedValue::Str(s) => Value::Str(s),
        SpannedValue::Seq(items) => Value::Seq(items.into_iter().map(to_node).collect()),
        SpannedValue::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let key_origin = self::origin(&k.referenced);
                    (k.value.0, key_origin, to_node(v))
                })
                .collect(),
        ),
    };
    Node { value, origin }
}

/// The raw shape serde-saphyr produces; converted to [`Value`] right away.
enum SpannedValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<SpannedValue>>),
    Map(Vec<(Spanned<Key>, Spanned<SpannedValue>)>),
}

/// A mapping key, stringified whatever its YAML type.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for SpannedValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SpannedValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<SpannedValue, E> {
                Ok(SpannedValue::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<SpannedValue, E> {
                Ok(SpannedValue::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<SpannedValue, D::Error> {
                SpannedValue::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<SpannedValue, E> {
                Ok(SpannedValue::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SpannedValue, E> {
                Ok(SpannedValue::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SpannedValue, E> {
                i64::try_from(v)
                    .map(SpannedValue::Int)
                    .map_err(|_| E::custom(format!("integer {v} is too large")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SpannedValue, E> {
                Ok(SpannedValue::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SpannedValue, E> {
                Ok(SpannedValue::Str(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<SpannedValue, E> {
                Ok(SpannedValue::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SpannedValue, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(SpannedValue::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SpannedValue, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<Key>>()? {
                    let value = map.next_value()?;
                    entries.push((key, value));
                }
                Ok(SpannedValue::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_lines_and_types() {
        let text = "a:\n  b: 3\n  c: 2.5e-3\n  d: 'x'\n  e: true\nf: [1, 2]\n";
        let root = parse(text).unwrap();
        assert_eq!(root.get("a.b").unwrap().value, Value::Int(3));
        assert_eq!(root.get("a.c").unwrap().value, Value::Float(2.5e-3));
        assert_eq!(root.get("a.d").unwrap().value, Value::Str("x".into()));
        assert_eq!(root.get("a.e").unwrap().value, Value::Bool(true));
        assert_eq!(root.origin_of("a.c"), Origin::File { line: 3, column: 3 });
        assert_eq!(root.origin_of("a.zzz"), Origin::File { line: 1, column: 1 });
    }

    #[test]
    fn set_creates_and_replaces() {
        let mut root = parse("a:\n  b: 3\n").unwrap();
        let o = Origin::Override("a.b=4".into());
        root.set(&["a", "b"], parse_override_value("4", o.clone()));
        root.set(&["x", "y"], parse_override_value("hello", o.clone()));
        assert_eq!(root.get("a.b").unwrap().value, Value::Int(4));
        assert_eq!(root.get("x.y").unwrap().value, Value::Str("hello".into()));
        assert_eq!(root.origin_of("x.y"), o);
    }
}
