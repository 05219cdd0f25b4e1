//! Decoding a client's `op`/`args` into an application's typed op with serde.
//!
//! The op type is an externally tagged enum: `name` is the variant, `args` its
//! content. Which names exist is read from the enum itself (serde hands every
//! enum's variant list to `deserialize_enum`), so an unknown name answers
//! `unknown_op` without looking at the text of an error.

use serde::de::{self, DeserializeOwned, Visitor};
use serde_json::{Map, Value};

use crate::app::AppError;
use crate::protocol::ErrorCode;

/// The variant names of the enum `T`, or `None` if `T` is not an enum.
pub fn names<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    let mut found = None;
    let _ = T::deserialize(Introspect { found: &mut found });
    found
}

/// Decodes op `name` with `args` into `T` (see the module docs).
pub fn decode<T: DeserializeOwned>(name: &str, args: Value) -> Result<T, AppError> {
    if let Some(names) = names::<T>() {
        if !names.contains(&name) {
            return Err(AppError::new(
                ErrorCode::UnknownOp,
                format!("unknown op {name:?}"),
            ));
        }
    }
    let empty_object = args.as_object().is_some_and(Map::is_empty);
    let tagged = |args| Value::Object(Map::from_iter([(name.to_owned(), args)]));
    match serde_json::from_value(tagged(args)) {
        Ok(op) => Ok(op),
        // `{}` for an op without arguments (a unit variant) is accepted too.
        Err(_) if empty_object => serde_json::from_value(tagged(Value::Null))
            .map_err(|e| AppError::bad_args(e.to_string())),
        Err(e) => Err(AppError::bad_args(e.to_string())),
    }
}

/// A deserializer that only records the variant list an enum asks for.
struct Introspect<'a> {
    found: &'a mut Option<&'static [&'static str]>,
}

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("introspection")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> de::Deserializer<'de> for Introspect<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        *self.found = Some(variants);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Op {
        Get { key: String },
        Ping,
        Add(i64),
    }

    #[test]
    fn names_come_from_the_enum() {
        assert_eq!(names::<Op>(), Some(&["get", "ping", "add"][..]));
        assert_eq!(names::<String>(), None);
    }

    #[test]
    fn decodes_known_ops_and_sorts_errors_by_kind() {
        assert_eq!(
            decode::<Op>("get", json!({"key": "a"})).unwrap(),
            Op::Get { key: "a".into() }
        );
        assert_eq!(decode::<Op>("ping", Value::Null).unwrap(), Op::Ping);
        assert_eq!(decode::<Op>("ping", json!({})).unwrap(), Op::Ping);
        assert_eq!(decode::<Op>("add", json!(2)).unwrap(), Op::Add(2));
        assert_eq!(
            decode::<Op>("nope", json!({})).unwrap_err().code,
            ErrorCode::UnknownOp
        );
        let e = decode::<Op>("get", json!({"key": 1})).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArgs);
        assert!(e.message.contains("invalid type"), "{}", e.message);
        assert_eq!(
            decode::<Op>("get", Value::Null).unwrap_err().code,
            ErrorCode::BadArgs
        );
    }
}
