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
    /// The session's user (`cx.user()`: the subject of the credential it
    /// was created with), or null.
    Whoami,
    /// Send `n` messages `count {i}` (i = `from`..`from + n`) to `to`; the
    /// last one asks for a report.
    Tell {
        to: String,
        from: u64,
        n: u64,
    },
}

/// What probes send each other.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Msg {
    /// The `i`th message of a sender; `report`: answer with a tally.
    Count { i: u64, report: bool },
    /// A tally's answer: messages counted from this sender, the last `i`,
    /// and how many arrived out of order or twice.
    Tally {
        total: u64,
        last: u64,
        disorder: u64,
    },
    /// To a session (from a backend, tests/it/api.rs): add `by` to its
    /// count and tell its client.
    Add { by: i64 },
}

/// `tally/KEY`: counts the messages of each sender, checking their order.
struct Tally;

#[derive(Clone, Default, Serialize, Deserialize)]
struct TallyState {
    /// Per sender: messages counted, last `i`, out-of-order or repeated ones.
    by: std::collections::BTreeMap<String, (u64, u64, u64)>,
}

impl berth::Entity for Tally {
    type State = TallyState;
    type Message = Msg;

    async fn on_message(
        &self,
        cx: &mut Cx<TallyState>,
        from: berth::Sender,
        msg: Msg,
    ) -> Result<(), AppError> {
        let Msg::Count { i, report } = msg else {
            return Err(AppError::bad_args("a tally takes count messages"));
        };
        let row = cx.state_mut().by.entry(from.to_string()).or_default();
        if i != row.1 + 1 {
            row.2 += 1;
        }
        row.0 += 1;
        row.1 = i;
        let (total, last, disorder) = *row;
        if report {
            if let berth::Sender::Actor(to) = &from {
                cx.send(
                    to,
                    &Msg::Tally {
                        total,
                        last,
                        disorder,
                    },
                )?;
            }
        }
        Ok(())
    }
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
    type Message = Msg;

    async fn on_message(
        &self,
        cx: &mut Cx<State>,
        from: berth::Sender,
        msg: Msg,
    ) -> Result<(), AppError> {
        match msg {
            Msg::Tally {
                total,
                last,
                disorder,
            } => {
                cx.emit(json!({"from": from.to_string(), "total": total, "last": last, "disorder": disorder}))?;
                Ok(())
            }
            Msg::Add { by } => {
                cx.state_mut().count += by;
                let count = cx.state().count;
                cx.emit(json!({"from": from.to_string(), "added": by, "count": count}))?;
                Ok(())
            }
            Msg::Count { .. } => Err(AppError::bad_args("a probe session takes tallies")),
        }
    }

    async fn on_undeliverable(
        &self,
        cx: &mut Cx<State>,
        bounce: berth::Bounce,
    ) -> Result<(), AppError> {
        cx.emit(json!({"bounced": bounce.to.to_string(), "why": format!("{:?}", bounce.why)}))?;
        Ok(())
    }
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
            Op::Whoami => Ok(json!(cx.user())),
            Op::Tell { to, from, n } => {
                let to: berth::Address = to
                    .parse()
                    .map_err(|e: berth::AddressError| AppError::bad_args(e.to_string()))?;
                for i in from..from + n {
                    let report = i + 1 == from + n;
                    cx.send(&to, &Msg::Count { i, report })?;
                }
                Ok(json!(n))
            }
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
        _ => Server::new(Probe).entity("tally", Tally).main(),
    }
}
