//! A serde `Deserializer` over the located YAML tree.
//!
//! It types the tree into the config structs and, on the way, (a) reports
//! every mapping key that no struct field takes, with the closest known key,
//! and (b) turns every type error into a message naming the key path, the
//! origin (file line or command-line override) and what is allowed.

use std::cell::RefCell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

use super::suggest::closest;
use super::tree::{Node, Origin, Value};

/// A key present in the YAML that the config does not know.
#[derive(Clone, Debug, PartialEq)]
pub struct UnknownKey {
    /// Full dotted path of the key.
    pub path: String,
    /// Where the key was written.
    pub origin: Origin,
    /// The closest known key at the same level, when one is close enough.
    pub suggestion: Option<String>,
}

/// Keys the reference trainer accepted (they appear in configs embedded in
/// its checkpoints) but nothing reads: accepted without a warning.
const LEGACY_KEYS: &[&str] = &[
    "qk_rms_norm",
    "shift_kvs",
    "encoder_mode",
    "max_seq_len",
    "intermediate_loss_weighting",
    "description",
    "model_class",
    "vocab_size",
];

/// Collects what deserialisation noticed besides hard errors.
#[derive(Default)]
pub struct Context {
    unknown: RefCell<Vec<UnknownKey>>,
}

impl Context {
    /// The unknown keys seen so far, in document order.
    pub fn into_unknown(self) -> Vec<UnknownKey> {
        self.unknown.into_inner()
    }
}

/// A deserialisation error with its location.
#[derive(Debug, Clone, PartialEq)]
pub struct DeError {
    /// What is wrong and what is allowed.
    pub message: String,
    /// Dotted key path (empty for the document root).
    pub path: Option<String>,
    /// Where the offending value (or its enclosing mapping) was written.
    pub origin: Option<Origin>,
    missing_field: Option<String>,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string(),
            path: None,
            origin: None,
            missing_field: None,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        DeError {
            message: "is required but missing".into(),
            path: None,
            origin: None,
            missing_field: Some(field.to_string()),
        }
    }
}

impl DeError {
    fn at(message: String, path: &str, origin: &Origin) -> Self {
        DeError {
            message,
            path: Some(path.to_string()),
            origin: Some(origin.clone()),
            missing_field: None,
        }
    }

    /// Fills in the location when an inner layer did not.
    fn within(mut self, path: &str, origin: &Origin) -> Self {
        if let Some(field) = self.missing_field.take() {
            self.path = Some(join(path, &field));
            self.origin = Some(origin.clone());
        }
        if self.path.is_none() {
            self.path = Some(path.to_string());
        }
        if self.origin.is_none() {
            self.origin = Some(origin.clone());
        }
        self
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Deserialises one node of the tree.
pub struct NodeDeserializer<'a> {
    node: &'a Node,
    path: String,
    ctx: &'a Context,
}

impl<'a> NodeDeserializer<'a> {
    /// A deserializer for `node`, reached at `path`.
    pub fn new(node: &'a Node, path: String, ctx: &'a Context) -> Self {
        NodeDeserializer { node, path, ctx }
    }

    fn type_error(&self, expected: &str) -> DeError {
        DeError::at(
            format!(
                "expected {expected}, found {} {}",
                self.node.value.kind(),
                self.node.value.show()
            ),
            &self.path,
            &self.node.origin,
        )
    }

    fn int(&self, expected: &str) -> Result<i64, DeError> {
        match &self.node.value {
            Value::Int(i) => Ok(*i),
            Value::Float(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(*x as i64),
            _ => Err(self.type_error(expected)),
        }
    }

    fn unsigned(&self) -> Result<u64, DeError> {
        let i = self.int("a whole number >= 0")?;
        u64::try_from(i).map_err(|_| {
            DeError::at(
                format!("must be a whole number >= 0, found {i}"),
                &self.path,
                &self.node.origin,
            )
        })
    }

    fn wrap<T>(&self, r: Result<T, DeError>) -> Result<T, DeError> {
        r.map_err(|e| e.within(&self.path, &self.node.origin))
    }
}

macro_rules! unsigned_method {
    ($name:ident, $visit:ident, $ty:ty) => {
        fn $name<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let v = self.unsigned()?;
            let v = <$ty>::try_from(v).map_err(|_| {
                DeError::at(format!("{v} is too large"), &self.path, &self.node.origin)
            })?;
            self.wrap(visitor.$visit(v))
        }
    };
}

macro_rules! signed_method {
    ($name:ident, $visit:ident, $ty:ty) => {
        fn $name<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let v = self.int("an integer")?;
            let v = <$ty>::try_from(v).map_err(|_| {
                DeError::at(
                    format!("{v} is out of range"),
                    &self.path,
                    &self.node.origin,
                )
            })?;
            self.wrap(visitor.$visit(v))
        }
    };
}

impl<'de> Deserializer<'de> for NodeDeserializer<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::Float(x) => visitor.visit_f64(*x),
            Value::Str(s) => visitor.visit_str(s),
            Value::Seq(items) => visitor.visit_seq(Seq::new(items, &self.path, self.ctx)),
            Value::Map(entries) => visitor.visit_map(Map::new(entries, &self.path, self.ctx, None)),
        };
        self.wrap(r)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Bool(b) => self.wrap(visitor.visit_bool(*b)),
            _ => Err(self.type_error("true or false")),
        }
    }

    signed_method!(deserialize_i8, visit_i8, i8);
    signed_method!(deserialize_i16, visit_i16, i16);
    signed_method!(deserialize_i32, visit_i32, i32);
    signed_method!(deserialize_i64, visit_i64, i64);
    unsigned_method!(deserialize_u8, visit_u8, u8);
    unsigned_method!(deserialize_u16, visit_u16, u16);
    unsigned_method!(deserialize_u32, visit_u32, u32);
    unsigned_method!(deserialize_u64, visit_u64, u64);

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Int(i) => self.wrap(visitor.visit_f64(*i as f64)),
            Value::Float(x) => self.wrap(visitor.visit_f64(*x)),
            _ => Err(self.type_error("a number")),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Str(s) => self.wrap(visitor.visit_str(s)),
            // Names and ids written without quotes (`id: 1234`) are still text.
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => {
                let text = self.node.value.show();
                self.wrap(visitor.visit_str(&text))
            }
            _ => Err(self.type_error("text")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, DeError> {
        Err(self.type_error("bytes (unsupported)"))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Null => self.wrap(visitor.visit_none()),
            _ => {
                let path = self.path.clone();
                let origin = self.node.origin.clone();
                visitor
                    .visit_some(self)
                    .map_err(|e| e.within(&path, &origin))
            }
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Null => self.wrap(visitor.visit_unit()),
            _ => Err(self.type_error("nothing")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let path = self.path.clone();
        let origin = self.node.origin.clone();
        visitor
            .visit_newtype_struct(self)
            .map_err(|e| e.within(&path, &origin))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Seq(items) => {
                self.wrap(visitor.visit_seq(Seq::new(items, &self.path, self.ctx)))
            }
            _ => Err(self.type_error("a list")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Seq(items) if items.len() == len => {
                self.wrap(visitor.visit_seq(Seq::new(items, &self.path, self.ctx)))
            }
            _ => Err(self.type_error(&format!("a list of {len} values"))),
        }
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(entries) => {
                self.wrap(visitor.visit_map(Map::new(entries, &self.path, self.ctx, None)))
            }
            Value::Null => self.wrap(visitor.visit_map(Map::new(&[], &self.path, self.ctx, None))),
            _ => Err(self.type_error("a mapping")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let entries: &[(String, Origin, Node)] = match &self.node.value {
            Value::Map(entries) => entries,
            // `section:` with nothing under it is an empty section.
            Value::Null => &[],
            _ => return Err(self.type_error("a mapping of keys")),
        };
        self.wrap(visitor.visit_map(Map::new(entries, &self.path, self.ctx, Some(fields))))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let text = match &self.node.value {
            Value::Str(s) => s.clone(),
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => self.node.value.show(),
            _ => return Err(self.type_error(&format!("one of {}", variants.join(", ")))),
        };
        if !variants.contains(&text.as_str()) {
            let hint = closest(&text, variants.iter().copied())
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default();
            return Err(DeError::at(
                format!("{:?} is not one of {}{hint}", text, variants.join(", ")),
                &self.path,
                &self.node.origin,
            ));
        }
        self.wrap(visitor.visit_enum(UnitVariant(text)))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct Seq<'a> {
    items: std::slice::Iter<'a, Node>,
    index: usize,
    path: &'a str,
    ctx: &'a Context,
}

impl<'a> Seq<'a> {
    fn new(items: &'a [Node], path: &'a str, ctx: &'a Context) -> Self {
        Seq {
            items: items.iter(),
            index: 0,
            path,
            ctx,
        }
    }
}

impl<'de> SeqAccess<'de> for Seq<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        seed.deserialize(NodeDeserializer::new(node, path, self.ctx))
            .map(Some)
    }
}

struct Map<'a> {
    entries: Vec<&'a (String, Origin, Node)>,
    next: usize,
    path: &'a str,
    ctx: &'a Context,
}

impl<'a> Map<'a> {
    /// With `fields`, keys outside it are recorded as unknown and skipped.
    fn new(
        entries: &'a [(String, Origin, Node)],
        path: &'a str,
        ctx: &'a Context,
        fields: Option<&'static [&'static str]>,
    ) -> Self {
        let mut kept = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            // A later duplicate of the same key wins, as in most YAML loaders.
            if entries[i + 1..].iter().any(|(k, _, _)| *k == entry.0) {
                continue;
            }
            match fields {
                Some(fields) if !fields.contains(&entry.0.as_str()) => {
                    if !LEGACY_KEYS.contains(&entry.0.as_str()) {
                        ctx.unknown.borrow_mut().push(UnknownKey {
                            path: join(path, &entry.0),
                            origin: entry.1.clone(),
                            suggestion: closest(&entry.0, fields.iter().copied())
                                .map(|s| join(path, s)),
                        });
                    }
                }
                _ => kept.push(entry),
            }
        }
        Map {
            entries: kept,
            next: 0,
            path,
            ctx,
        }
    }
}

impl<'de> MapAccess<'de> for Map<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, _, _)) = self.entries.get(self.next) else {
            return Ok(None);
        };
        let key: de::value::StrDeserializer<DeError> = key.as_str().into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (key, _, node) = self.entries[self.next];
        self.next += 1;
        seed.deserialize(NodeDeserializer::new(node, join(self.path, key), self.ctx))
    }
}

/// An enum written as a bare string (`name: madgrad`).
struct UnitVariant(String);

impl<'de> EnumAccess<'de> for UnitVariant {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), DeError> {
        let key: de::value::StrDeserializer<DeError> = self.0.as_str().into_deserializer();
        let v = seed.deserialize(key)?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for UnitVariant {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, DeError> {
        Err(de::Error::custom("expected a plain name"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom("expected a plain name"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, DeError> {
        Err(de::Error::custom("expected a plain name"))
    }
}
