//! The built-in `kv` application: one JSON object per session.
//!
//! Implements every op of protocol.md: `get`, `set`, `del`, `incr`, `append`,
//! `state`, `emit` and `echo`.

use serde_json::{Map, Value};

use crate::app::{AppError, Application, Applied, OpCtx};
use crate::protocol::ErrorCode;

/// The `kv` application.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvApp;

/// The ops `kv` knows, as metric labels.
const OPS: [&str; 8] = [
    "get", "set", "del", "incr", "append", "state", "emit", "echo",
];

fn args_obj(args: &Value) -> Result<&Map<String, Value>, AppError> {
    args.as_object()
        .ok_or_else(|| AppError::bad_args("args must be an object"))
}

fn key(args: &Value) -> Result<&str, AppError> {
    args_obj(args)?
        .get("key")
        .and_then(Value::as_str)
        .ok_or_else(|| AppError::bad_args("args.key must be a string"))
}

fn field<'a>(args: &'a Value, name: &str) -> Result<&'a Value, AppError> {
    args_obj(args)?
        .get(name)
        .ok_or_else(|| AppError::bad_args(format!("args.{name} is required")))
}

impl Application for KvApp {
    type State = Map<String, Value>;

    fn is_read_only(&self, op: &str) -> bool {
        matches!(op, "get" | "state" | "echo")
    }

    fn apply(
        &self,
        state: &mut Self::State,
        op: &str,
        args: &Value,
        ctx: &mut OpCtx<'_>,
    ) -> Result<Applied, AppError> {
        match op {
            "get" => Ok(Applied::read(
                state.get(key(args)?).cloned().unwrap_or(Value::Null),
            )),
            "set" => {
                let k = key(args)?;
                let v = field(args, "value")?.clone();
                Ok(Applied::write(
                    state.insert(k.to_owned(), v).unwrap_or(Value::Null),
                ))
            }
            "del" => {
                let removed = state.remove(key(args)?);
                Ok(Applied {
                    changed: removed.is_some(),
                    value: removed.unwrap_or(Value::Null),
                })
            }
            "incr" => {
                let k = key(args)?;
                let by = match args_obj(args)?.get("by") {
                    None | Some(Value::Null) => 1,
                    Some(v) => v
                        .as_i64()
                        .ok_or_else(|| AppError::bad_args("args.by must be an i64"))?,
                };
                let cur = match state.get(k) {
                    None => 0,
                    Some(v) => v.as_i64().ok_or_else(|| {
                        AppError::new(
                            ErrorCode::TypeMismatch,
                            format!("value at {k:?} is not an integer"),
                        )
                    })?,
                };
                let new = cur
                    .checked_add(by)
                    .ok_or_else(|| AppError::new(ErrorCode::TypeMismatch, "integer overflow"))?;
                state.insert(k.to_owned(), Value::from(new));
                Ok(Applied::write(Value::from(new)))
            }
            "append" => {
                let k = key(args)?;
                let v = field(args, "value")?.clone();
                match state.get_mut(k) {
                    None => {
                        state.insert(k.to_owned(), Value::Array(vec![v]));
                        Ok(Applied::write(Value::from(1)))
                    }
                    Some(Value::Array(list)) => {
                        list.push(v);
                        Ok(Applied::write(Value::from(list.len())))
                    }
                    Some(_) => Err(AppError::new(
                        ErrorCode::TypeMismatch,
                        format!("value at {k:?} is not a list"),
                    )),
                }
            }
            "state" => Ok(Applied::read(Value::Object(state.clone()))),
            "echo" => Ok(Applied::read(field(args, "value")?.clone())),
            "emit" => {
                let body = field(args, "body")?.clone();
                let delay = match args_obj(args)?.get("delay_ms") {
                    None | Some(Value::Null) => 0,
                    Some(v) => v
                        .as_u64()
                        .ok_or_else(|| AppError::bad_args("args.delay_ms must be a u64"))?,
                };
                let seq = ctx.emit(body, delay)?;
                Ok(Applied::write(Value::from(seq)))
            }
            other => Err(AppError::new(
                ErrorCode::UnknownOp,
                format!("unknown op {other:?}"),
            )),
        }
    }

    fn op_label(&self, op: &str) -> &'static str {
        OPS.iter().find(|o| **o == op).copied().unwrap_or("other")
    }

    fn encode_state(&self, state: &Self::State) -> Vec<u8> {
        // A Map of serde_json Values always serializes.
        serde_json::to_vec(state).unwrap_or_default()
    }

    fn decode_state(&self, bytes: &[u8]) -> Result<Self::State, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}
