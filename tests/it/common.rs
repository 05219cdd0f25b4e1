//! Real processes for the integration tests — `redis-server`, Sentinels,
//! Consul agents and berth nodes on free loopback ports, each killed when its
//! guard drops — from `berth-testkit`, and what only these tests know: how
//! to start this package's `berth` binary ([`StartBerth`]), async waits, and
//! a WebSocket client of the protocol (tokio-tungstenite).

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

// Not every suite uses every one (tests/deploy includes this file too).
#[allow(unused_imports)]
pub use berth_testkit::{
    base_env, cluster_env, env_with, free_port, http, metric_labeled, metric_sum, Berth, Consul,
    Redis, SentinelSet, SECRET, WAIT,
};

/// This package's `berth` binary, built by cargo for these tests.
pub fn berth_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_berth"))
}

/// The binary of this package's example `name` (built by `scripts/test.sh`
/// with `cargo build --example NAME`: `cargo test --all-targets` builds
/// examples only as test harnesses, not as the programs).
pub fn example_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("examples").join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --example {name}` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Starting this package's `berth` binary ([`Berth::start_bin`] starts any
/// node binary given its path).
pub trait StartBerth {
    /// `berth` with exactly `env` as its `BERTH*` environment, and `args`.
    fn start_with(env: &[(String, String)], args: &[&str]) -> Berth;
    /// A node with the in-memory store.
    fn start_memory() -> Berth;
    /// A node with Redis at `url`.
    fn start_redis(url: &str) -> Berth;
}

impl StartBerth for Berth {
    fn start_with(env: &[(String, String)], args: &[&str]) -> Berth {
        Berth::start_bin(berth_bin(), env, args)
    }

    fn start_memory() -> Berth {
        Self::start_with(&base_env(), &[])
    }

    fn start_redis(url: &str) -> Berth {
        let mut env = base_env();
        env.push(("BERTH__STORE__REDIS_URL".into(), url.into()));
        Self::start_with(&env, &[])
    }
}

/// The HTTP status a WebSocket upgrade at `url` gets (101 when it upgrades;
/// 0 when nothing answers within [`WAIT`]).
pub async fn upgrade_status(url: &str) -> u16 {
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await {
        Ok(Ok((_, resp))) => resp.status().as_u16(),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => resp.status().as_u16(),
        Ok(Err(_)) | Err(_) => 0,
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A protocol client for tests: raw frames in, JSON values out.
pub struct Client {
    pub ws: Ws,
    pub session: Option<String>,
    pub token: Option<String>,
    next_id: u64,
}

/// What `Client::recv` saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    Json(Value),
    Close(Option<u16>, String),
    Ended,
}

impl Got {
    pub fn json(self) -> Value {
        match self {
            Got::Json(v) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }
}

impl Client {
    /// Wraps an already connected stream.
    pub fn from_ws(ws: Ws) -> Client {
        Client {
            ws,
            session: None,
            token: None,
            next_id: 1,
        }
    }

    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timeout")
            .expect("connect");
        Client {
            ws,
            session: None,
            token: None,
            next_id: 1,
        }
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s.to_owned())).await.unwrap();
    }

    /// Sends a frame; answers whether the connection took it.
    pub async fn ws_send(&mut self, v: Value) -> bool {
        self.ws.send(Message::text(v.to_string())).await.is_ok()
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Next text or close frame (pings are answered by tungstenite).
    pub async fn recv(&mut self) -> Got {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("recv timeout");
            match m {
                None | Some(Err(_)) => return Got::Ended,
                Some(Ok(Message::Text(t))) => return Got::Json(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(f))) => {
                    let f: Option<CloseFrame> = f;
                    return Got::Close(
                        f.as_ref().map(|f| u16::from(f.code)),
                        f.map(|f| f.reason.to_string()).unwrap_or_default(),
                    );
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        self.recv().await.json()
    }

    /// Waits for a close frame, skipping other frames; its code.
    pub async fn recv_close(&mut self) -> Option<u16> {
        loop {
            match self.recv().await {
                Got::Close(code, _) => return code,
                Got::Ended => return None,
                Got::Json(_) => continue,
            }
        }
    }

    /// `hello`; returns the welcome and remembers session and token.
    pub async fn hello(&mut self, session: Option<&str>, token: Option<&str>, ack: u64) -> Value {
        self.send(json!({"type":"hello","session":session,"token":token,"ack":ack}))
            .await;
        let w = self.recv_json().await;
        if w["type"] == "welcome" {
            self.session = w["session"].as_str().map(str::to_owned);
            self.token = w["token"].as_str().map(str::to_owned);
            self.next_id = w["last_op"].as_u64().unwrap() + 1;
        }
        w
    }

    /// A new session.
    pub async fn new_session(url: &str) -> Client {
        let mut c = Client::connect(url).await;
        let w = c.hello(None, None, 0).await;
        assert_eq!(w["type"], "welcome", "{w}");
        c
    }

    /// Resume `other`'s session on a new connection.
    pub async fn resume(url: &str, session: &str, token: &str, ack: u64) -> (Client, Value) {
        let mut c = Client::connect(url).await;
        let w = c.hello(Some(session), Some(token), ack).await;
        (c, w)
    }

    /// Sends an op with the next id and returns its `result` (events in between are skipped).
    pub async fn op(&mut self, name: &str, args: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.op_with_id(id, name, args).await
    }

    pub async fn op_with_id(&mut self, id: u64, name: &str, args: Value) -> Value {
        self.send(json!({"type":"op","id":id,"op":name,"args":args}))
            .await;
        loop {
            let v = self.recv_json().await;
            if v["type"] == "result" {
                assert_eq!(v["id"], id, "results come in op order: {v}");
                return v;
            }
        }
    }

    /// Op `id`, sent again with the same id every 100 ms (up to `tries`
    /// times) while it is answered with an error (`unavailable` while the
    /// store comes back): the answer that was not an error, or the last one.
    pub async fn op_until_ok(&mut self, id: u64, name: &str, args: Value, tries: u32) -> Value {
        let mut r = self.op_with_id(id, name, args.clone()).await;
        for _ in 1..tries {
            if r["ok"] == true {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            r = self.op_with_id(id, name, args.clone()).await;
        }
        r
    }

    /// After an immediate `emit`: its event and its result, which may arrive in
    /// either order, as `[event, result]`.
    pub async fn recv_event_and_result(&mut self) -> [Value; 2] {
        let mut got = [self.recv_json().await, self.recv_json().await];
        got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
        got
    }

    pub fn set_next_id(&mut self, id: u64) {
        self.next_id = id;
    }
}

/// Polls `f` until it is true.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Waits until every node sees exactly `ids` as members.
pub async fn converge(nodes: &[&Berth], ids: &[&str]) {
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(&format!("members {want:?}"), || {
        nodes.iter().all(|n| n.members() == want)
    })
    .await;
}
