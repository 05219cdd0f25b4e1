//! `probe`: the application the integration tests run (tests/it/app.rs), a
//! berth node like the `berth` binary but with handlers that wait on I/O,
//! fail, panic, overrun their deadline, set timers and migrate their state.
//!
//! `PROBE_SCHEMA` picks the state's schema version: `1` (state `{n}`, ops
//! `add` and `get` only), `2` (the default: `{count, fired, fetched}`,
//! migrating version 1's `n` into `count`), or `3` (version 2's state
//! claiming version 3, to be refused by version 2).

use std::time::Duration;

use berth::{AppError, Cx, ErrorCode, MigrateError, Server, Session};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Version 1 of the application.
struct ProbeV1;

#[derive(Clone, Default, Serialize, Deserialize)]
struct StateV1 {
    n: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum OpV1 {
    Add { by: i64 },
    Get,
}

impl Session for ProbeV1 {
    type State = StateV1;
    type Op = OpV1;
    type Message = berth::NoMessages;

    async fn on_op(&self, cx: &mut Cx<StateV1>, op: OpV1) -> Result<Value, AppError> {
        match op {
            OpV1::Add { by } => {
                cx.state_mut().n += by;
                Ok(json!(cx.state().n))
            }
            OpV1::Get => Ok(json!(cx.state().n)),
        }
    }
}

/// Version 2: the full probe.
struct Probe;

#[derive(Clone, Default, Serialize, Deserialize)]
struct State {
    count: i64,
    /// Timer firings: name, the time it fired, the idempotency key.
    fired: Vec<(String, u64, String)>,
    /// What `fetch` got.
    fetched: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Add {
        by: i64,
    },
    Get,
    /// GET `http://{addr}{path}` (a server the test runs), keep the body.
    Fetch {
        addr: String,
        path: String,
    },
    /// Wait `ms`, then add 1.
    SlowAdd {
        ms: u64,
    },
    /// Change the state, then fail.
    FailAfterWrite,
    /// Change the state, then panic.
    PanicAfterWrite,
    /// Set timer `name` to fire `ms` from now.
    Timer {
        name: String,
        ms: u64,
    },
    /// Cancel timer `name`.
    Cancel {
        name: String,
    },
    /// The timer firings so far.
    Fired,
}

impl Probe {
    async fn fetch(addr: &str, path: &str, key: &str) -> Result<String, AppError> {
        let down = |e: std::io::Error| AppError::unavailable(format!("fetch {addr}: {e}"));
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(down)?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nIdempotency-Key: {key}\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(down)?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.map_err(down)?;
        Ok(resp
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_owned()))
    }
}

impl Session for Probe {
    type State = State;
    type Op = Op;
    type Message = berth::NoMessages;
    const STATE_VERSION: u32 = 2;

    async fn on_op(&self, cx: &mut Cx<State>, op: Op) -> Result<Value, AppError> {
        match op {
            Op::Add { by } => {
                cx.state_mut().count += by;
                Ok(json!(cx.state().count))
            }
            Op::Get => Ok(json!(cx.state().count)),
            Op::Fetch { addr, path } => {
                let key = cx.idempotency_key();
                let body = Self::fetch(&addr, &path, &key).await?;
                cx.state_mut().fetched = Some(body.clone());
                Ok(json!({ "body": body, "key": key }))
            }
            Op::SlowAdd { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                cx.state_mut().count += 1;
                Ok(json!(cx.state().count))
            }
            Op::FailAfterWrite => {
                cx.state_mut().count += 1000;
                cx.emit(json!("never delivered"))?;
                Err(AppError::new(
                    ErrorCode::TypeMismatch,
                    "refused after writing",
                ))
            }
            Op::PanicAfterWrite => {
                cx.state_mut().count += 1000;
                panic!("probe: a handler panicked on purpose");
            }
            Op::Timer { name, ms } => {
                cx.set_timer_in(&name, Duration::from_millis(ms))?;
                Ok(Value::Null)
            }
            Op::Cancel { name } => Ok(json!(cx.cancel_timer(&name))),
            Op::Fired => Ok(json!(cx.state().fired)),
        }
    }

    async fn on_timer(&self, cx: &mut Cx<State>, name: &str) -> Result<(), AppError> {
        let (now, key) = (cx.now_ms(), cx.idempotency_key());
        cx.state_mut()
            .fired
            .push((name.to_owned(), now, key.clone()));
        cx.emit(json!({ "timer": name, "at": now, "key": key }))?;
        Ok(())
    }

    fn migrate(&self, from: u32, old: Value) -> Result<State, MigrateError> {
        match from {
            1 => {
                let n = old["n"].as_i64().ok_or("version 1 state without n")?;
                Ok(State {
                    count: n,
                    ..State::default()
                })
            }
            _ => Err(format!("no migration from version {from}").into()),
        }
    }
}

/// Version 3: version 2's state under a newer schema number.
struct ProbeV3;

impl Session for ProbeV3 {
    type State = State;
    type Op = Op;
    type Message = berth::NoMessages;
    const STATE_VERSION: u32 = 3;

    async fn on_op(&self, cx: &mut Cx<State>, op: Op) -> Result<Value, AppError> {
        Probe.on_op(cx, op).await
    }
}

fn main() {
    match std::env::var("PROBE_SCHEMA").as_deref() {
        Ok("1") => Server::new(ProbeV1).main(),
        Ok("3") => Server::new(ProbeV3).main(),
        _ => Server::new(Probe).main(),
    }
}
