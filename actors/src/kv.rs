//! The built-in `kv` application: one JSON object per session, written on the
//! public application API ([`crate::app::Session`]) like any other.
//!
//! Implements every op of protocol.md: `get`, `set`, `del`, `incr`, `append`,
//! `state`, `emit` and `echo`, with protocol.md's error messages (it decodes
//! its ops by hand for that; a new application lets serde do it).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::app::{AppError, Cx, ErrorCode, Session};

/// The `kv` application.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvApp;

/// A session's state: one JSON object.
pub type KvState = Map<String, Value>;

/// The ops of `kv`. The serde derive gives the op names (metric labels);
/// [`KvApp::decode_op`] decodes them with protocol.md's messages.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvOp {
    /// The value at `key`, or null.
    Get {
        /// Key.
        key: String,
    },
    /// Sets `key`; answers the previous value.
    Set {
        /// Key.
        key: String,
        /// New value.
        value: Value,
    },
    /// Removes `key`; answers the removed value.
    Del {
        /// Key.
        key: String,
    },
    /// Adds `by` to the integer at `key`.
    Incr {
        /// Key.
        key: String,
        /// Increment.
        by: i64,
    },
    /// Appends to the list at `key`.
    Append {
        /// Key.
        key: String,
        /// Value appended.
        value: Value,
    },
    /// The whole object.
    State,
    /// Schedules an event to this session.
    Emit {
        /// Event body.
        body: Value,
        /// Delay in ms.
        delay_ms: u64,
    },
    /// Answers `value`.
    Echo {
        /// Value.
        value: Value,
    },
}

fn args_obj(args: &Value) -> Result<&Map<String, Value>, AppError> {
    args.as_object()
        .ok_or_else(|| AppError::bad_args("args must be an object"))
}

/// Takes `args.key` out of the args (no copy).
fn key(args: &mut Value) -> Result<String, AppError> {
    args_obj(args)?;
    match args.get_mut("key") {
        Some(Value::String(k)) => Ok(std::mem::take(k)),
        _ => Err(AppError::bad_args("args.key must be a string")),
    }
}

fn field(args: &mut Value, name: &str) -> Result<Value, AppError> {
    args_obj(args)?;
    args.get_mut(name)
        .map(Value::take)
        .ok_or_else(|| AppError::bad_args(format!("args.{name} is required")))
}

fn optional<T>(
    args: &Value,
    name: &str,
    get: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Result<Option<T>, AppError> {
    match args_obj(args)?.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v)
            .map(Some)
            .ok_or_else(|| AppError::bad_args(format!("args.{name} must be {what}"))),
    }
}

impl Session for KvApp {
    type State = KvState;
    type Op = KvOp;
    type Message = crate::app::NoMessages;

    fn decode_op(&self, name: &str, mut args: Value) -> Result<KvOp, AppError> {
        Ok(match name {
            "get" => KvOp::Get {
                key: key(&mut args)?,
            },
            "set" => KvOp::Set {
                key: key(&mut args)?,
                value: field(&mut args, "value")?,
            },
            "del" => KvOp::Del {
                key: key(&mut args)?,
            },
            "incr" => KvOp::Incr {
                key: key(&mut args)?,
                by: optional(&args, "by", Value::as_i64, "an i64")?.unwrap_or(1),
            },
            "append" => KvOp::Append {
                key: key(&mut args)?,
                value: field(&mut args, "value")?,
            },
            "state" => KvOp::State,
            "echo" => KvOp::Echo {
                value: field(&mut args, "value")?,
            },
            "emit" => KvOp::Emit {
                body: field(&mut args, "body")?,
                delay_ms: optional(&args, "delay_ms", Value::as_u64, "a u64")?.unwrap_or(0),
            },
            other => {
                return Err(AppError::new(
                    ErrorCode::UnknownOp,
                    format!("unknown op {other:?}"),
                ))
            }
        })
    }

    async fn on_op(&self, cx: &mut Cx<KvState>, op: KvOp) -> Result<Value, AppError> {
        match op {
            KvOp::Get { key } => Ok(cx.state().get(&key).cloned().unwrap_or(Value::Null)),
            KvOp::Set { key, value } => {
                Ok(cx.state_mut().insert(key, value).unwrap_or(Value::Null))
            }
            KvOp::Del { key } => {
                if !cx.state().contains_key(&key) {
                    return Ok(Value::Null); // nothing removed: not a write
                }
                Ok(cx.state_mut().remove(&key).unwrap_or(Value::Null))
            }
            KvOp::Incr { key, by } => {
                let cur = match cx.state().get(&key) {
                    None => 0,
                    Some(v) => v.as_i64().ok_or_else(|| {
                        AppError::new(
                            ErrorCode::TypeMismatch,
                            format!("value at {key:?} is not an integer"),
                        )
                    })?,
                };
                let new = cur
                    .checked_add(by)
                    .ok_or_else(|| AppError::new(ErrorCode::TypeMismatch, "integer overflow"))?;
                cx.state_mut().insert(key, Value::from(new));
                Ok(Value::from(new))
            }
            KvOp::Append { key, value } => match cx.state().get(&key) {
                None => {
                    cx.state_mut().insert(key, Value::Array(vec![value]));
                    Ok(Value::from(1))
                }
                Some(Value::Array(_)) => match cx.state_mut().get_mut(&key) {
                    Some(Value::Array(list)) => {
                        list.push(value);
                        Ok(Value::from(list.len()))
                    }
                    _ => Err(AppError::new(ErrorCode::Internal, "list vanished")),
                },
                Some(_) => Err(AppError::new(
                    ErrorCode::TypeMismatch,
                    format!("value at {key:?} is not a list"),
                )),
            },
            KvOp::State => Ok(Value::Object(cx.state().clone())),
            KvOp::Echo { value } => Ok(value),
            KvOp::Emit { body, delay_ms } => {
                let seq = cx.emit_in(body, Duration::from_millis(delay_ms))?;
                Ok(Value::from(seq))
            }
        }
    }
}
