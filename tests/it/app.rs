//! The application API against real processes: `tests/apps/probe.rs` (an
//! application built on the berth library) run as a node, real Redis, real
//! Consul, real WebSockets.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
use serde_json::{json, Value};

use crate::common::*;

/// The probe application's binary (built by `scripts/test.sh`).
pub(crate) fn probe_bin() -> PathBuf {
    example_bin("probe")
}

pub(crate) fn probe(env: &[(String, String)]) -> Berth {
    Berth::start_bin(&probe_bin(), env, &[])
}

pub(crate) fn probe_schema(redis: &Redis, schema: &str, extra: &[(&str, &str)]) -> Berth {
    let mut env = env_with(redis, extra);
    env.push(("PROBE_SCHEMA".into(), schema.into()));
    probe(&env)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Sends op `id` and answers the next frame, which must be its result (no
/// event may come first).
async fn op_only(c: &mut Client, id: u64, name: &str, args: Value) -> Value {
    c.send(json!({"type":"op","id":id,"op":name,"args":args}))
        .await;
    let v = c.recv_json().await;
    assert_eq!(v["type"], "result", "only the result of op {id}: {v}");
    assert_eq!(v["id"], id, "{v}");
    v
}

/// Receives frames until the next event; results seen meanwhile are returned too.
async fn next_event(c: &mut Client) -> (Value, Vec<Value>) {
    let mut results = Vec::new();
    loop {
        let v = c.recv_json().await;
        if v["type"] == "event" {
            return (v, results);
        }
        results.push(v);
    }
}

/// A one-shot HTTP server on loopback: answers every request with `body`,
/// recording each request's `Idempotency-Key`.
fn http_server(body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let keys = Arc::new(Mutex::new(Vec::new()));
    let k = keys.clone();
    std::thread::spawn(move || {
        // Bounded: the tests make a handful of requests.
        for stream in l.incoming().take(16) {
            let Ok(mut s) = stream else { return };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            if let Some(key) = req
                .lines()
                .find_map(|l| l.strip_prefix("Idempotency-Key: "))
            {
                k.lock().unwrap().push(key.trim().to_owned());
            }
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_handler_awaits_an_outside_service_and_commits_what_it_got() {
    let redis = Redis::start();
    let node = probe_schema(&redis, "2", &[]);
    let (addr, keys) = http_server("hello from outside");
    let mut c = Client::new_session(&node.ws_url()).await;
    let session = c.session.clone().unwrap();
    let r = op_only(&mut c, 1, "fetch", json!({"addr": addr, "path": "/x"})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["value"]["body"], "hello from outside");
    let key = format!("{session}:op:1");
    assert_eq!(r["value"]["key"], key.as_str());
    assert_eq!(
        *keys.lock().unwrap(),
        vec![key],
        "the outside service saw the op's idempotency key"
    );
    assert_eq!(r["version"], 1, "the fetched body was committed");
    // An outside service that is down: the handler answers `unavailable`, not applied.
    let down = free_port();
    let r = op_only(
        &mut c,
        2,
        "fetch",
        json!({"addr": format!("127.0.0.1:{down}"), "path": "/"}),
    )
    .await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    assert_eq!(r["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_fails_panics_or_overruns_commits_nothing_and_the_session_goes_on() {
    let redis = Redis::start();
    let extra = [("BERTH__SESSION__HANDLER_TIMEOUT_MS", "300")];
    let mut node = probe_schema(&redis, "2", &extra);
    let mut c = Client::new_session(&node.ws_url()).await;
    let (session, token) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    let r = op_only(&mut c, 1, "add", json!({"by": 5})).await;
    assert_eq!(
        (r["value"].clone(), r["version"].clone()),
        (json!(5), json!(1))
    );

    // An error after changing the state and emitting an event.
    let r = op_only(&mut c, 2, "fail_after_write", Value::Null).await;
    assert_eq!(r["error"]["code"], "type_mismatch", "{r}");
    assert_eq!(r["version"], 1);
    assert_eq!(op_only(&mut c, 3, "get", Value::Null).await["value"], 5);

    // A panic after changing the state: `internal`, the node and the session live on.
    let r = op_only(&mut c, 4, "panic_after_write", Value::Null).await;
    assert_eq!(r["error"]["code"], "internal", "{r}");
    assert_eq!(op_only(&mut c, 5, "get", Value::Null).await["value"], 5);
    let mut other = Client::new_session(&node.ws_url()).await;
    assert_eq!(
        op_only(&mut other, 1, "add", json!({"by": 1})).await["value"],
        1,
        "another session on the node is unharmed"
    );

    // A handler past its deadline: `unavailable`, nothing committed.
    let r = op_only(&mut c, 6, "slow_add", json!({"ms": 2000})).await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    assert_eq!(op_only(&mut c, 7, "get", Value::Null).await["value"], 5);

    // Typed ops: serde's message for bad arguments, unknown names as before.
    let r = op_only(&mut c, 8, "add", json!({"by": "x"})).await;
    assert_eq!(r["error"]["code"], "bad_args", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid type"),
        "serde's message: {r}"
    );
    let r = op_only(&mut c, 9, "no_such_op", json!({})).await;
    assert_eq!(r["error"]["code"], "unknown_op", "{r}");

    let r = op_only(&mut c, 10, "add", json!({"by": 1})).await;
    assert_eq!(
        (r["value"].clone(), r["version"].clone()),
        (json!(6), json!(2))
    );

    // What the store holds is exactly the committed ops.
    node.kill9();
    let node = probe_schema(&redis, "2", &extra);
    let (mut c, w) = Client::resume(&node.ws_url(), &session, &token, 0).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["version"], 2, "{w}");
    // op_only proves no event came before the answer: the failed handler's
    // event was never committed, so it is not replayed either.
    assert_eq!(op_only(&mut c, 11, "get", Value::Null).await["value"], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_that_arrive_while_a_handler_waits_run_after_it_in_order_and_other_sessions_go_on() {
    let redis = Redis::start();
    // One worker: both sessions live on the same arbiter.
    let node = probe_schema(&redis, "2", &[("BERTH__SERVER__WORKERS", "1")]);
    let mut a = Client::new_session(&node.ws_url()).await;
    let mut b = Client::new_session(&node.ws_url()).await;
    a.send(json!({"type":"op","id":1,"op":"slow_add","args":{"ms":1500}}))
        .await;
    a.send(json!({"type":"op","id":2,"op":"add","args":{"by":10}}))
        .await;
    a.send(json!({"type":"op","id":3,"op":"get"})).await;
    // While a's handler waits, b is served (same worker).
    let rb = op_only(&mut b, 1, "add", json!({"by": 1})).await;
    assert_eq!(rb["value"], 1);
    let first = tokio::time::timeout(Duration::from_millis(50), a.recv()).await;
    assert!(
        first.is_err(),
        "b was answered while a's slow handler still waited: {first:?}"
    );
    let got: Vec<Value> = [
        a.recv_json().await,
        a.recv_json().await,
        a.recv_json().await,
    ]
    .into();
    let ids: Vec<u64> = got.iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3], "{got:?}");
    let values: Vec<Value> = got.iter().map(|v| v["value"].clone()).collect();
    assert_eq!(
        values,
        vec![json!(1), json!(11), json!(11)],
        "applied after it, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_after_their_time_once_each_and_cancelled_ones_never() {
    let redis = Redis::start();
    let node = probe_schema(&redis, "2", &[]);
    let mut c = Client::new_session(&node.ws_url()).await;
    let session = c.session.clone().unwrap();
    let t0 = now_ms();
    assert_eq!(
        op_only(&mut c, 1, "timer", json!({"name":"a","ms":300})).await["ok"],
        true
    );
    assert_eq!(
        op_only(&mut c, 2, "timer", json!({"name":"b","ms":700})).await["ok"],
        true
    );
    assert_eq!(
        op_only(&mut c, 3, "timer", json!({"name":"x","ms":400})).await["ok"],
        true
    );
    // Moving a timer replaces its setting: "b" fires once, at the later time.
    assert_eq!(
        op_only(&mut c, 4, "timer", json!({"name":"b","ms":900})).await["ok"],
        true
    );
    assert_eq!(
        op_only(&mut c, 5, "cancel", json!({"name":"x"})).await["value"],
        true
    );
    let (ea, _) = next_event(&mut c).await;
    assert_eq!(ea["body"]["timer"], "a", "{ea}");
    assert!(
        ea["body"]["at"].as_u64().unwrap() >= t0 + 300,
        "never before its time: {ea}"
    );
    let (eb, _) = next_event(&mut c).await;
    assert_eq!(eb["body"]["timer"], "b", "{eb}");
    assert!(
        eb["body"]["at"].as_u64().unwrap() >= t0 + 900,
        "never before its time: {eb}"
    );
    c.send(json!({"type":"ack","seq": eb["seq"]})).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let fired = op_only(&mut c, 6, "fired", Value::Null).await;
    let names: Vec<&str> = fired["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f[0].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["a", "b"],
        "each once, the cancelled one never: {fired}"
    );
    let key = fired["value"][0][2].as_str().unwrap();
    assert!(
        key.starts_with(&format!("{session}:timer:a:")),
        "a firing's idempotency key names the session, the timer and its due time: {key}"
    );
    assert_eq!(node.metric("berth_timers_fired_total"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_wakes_its_passivated_session() {
    let redis = Redis::start();
    let node = probe_schema(&redis, "2", &[("BERTH__SESSION__DETACH_TIMEOUT_S", "1")]);
    let mut c = Client::new_session(&node.ws_url()).await;
    let (session, token) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    let t0 = now_ms();
    op_only(&mut c, 1, "timer", json!({"name":"later","ms":3000})).await;
    drop(c);
    eventually("the session passivated", || {
        node.log().contains("passivated")
    })
    .await;
    assert_eq!(node.metric("berth_timers_fired_total"), 0.0, "not yet due");
    eventually("the timer fired on the passivated session", || {
        node.metric("berth_timers_fired_total") == 1.0
    })
    .await;
    assert!(node.metric("berth_timer_wakeups_total") >= 1.0);
    // The event it emitted waits for the client; the firing is in the state.
    let (mut c, w) = Client::resume(&node.ws_url(), &session, &token, 0).await;
    assert_eq!(w["type"], "welcome", "{w}");
    let (e, _) = next_event(&mut c).await;
    assert_eq!(e["body"]["timer"], "later");
    assert!(e["body"]["at"].as_u64().unwrap() >= t0 + 3000, "{e}");
    let fired = op_only(&mut c, 2, "fired", Value::Null).await;
    assert_eq!(fired["value"].as_array().unwrap().len(), 1, "{fired}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_survive_sigkill_of_their_owner_and_fire_once_on_the_new_one() {
    let consul = Consul::start();
    let redis = Redis::start();
    let mut nodes: Vec<Berth> = ["a", "b", "c"]
        .iter()
        .map(|id| {
            let mut env = cluster_env(&consul, &redis, id);
            env.push(("BERTH__CLUSTER__TTL_MS".into(), "1000".into()));
            probe(&env)
        })
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &["a", "b", "c"]).await;
    let ring = Ring::new(
        ["a", "b", "c"].iter().map(|m| MemberId(m.to_string())),
        DEFAULT_VNODES,
    );
    // Sessions until a few are owned by c, each with a timer 4 s out.
    let mut on_c = Vec::new();
    let mut others = Vec::new();
    let t0 = now_ms();
    for i in 0..40 {
        if on_c.len() >= 4 && others.len() >= 4 {
            break;
        }
        let mut c = Client::new_session(&nodes[i % 2].ws_url()).await;
        let id = c.session.clone().unwrap();
        let r = op_only(&mut c, 1, "timer", json!({"name":"t","ms":4000})).await;
        assert_eq!(r["ok"], true, "{r}");
        let creds = (id.clone(), c.token.clone().unwrap());
        if ring.owner(&id).unwrap().as_str() == "c" {
            on_c.push(creds);
        } else {
            others.push(creds);
        }
    }
    assert!(
        on_c.len() >= 2,
        "sessions owned by the victim: {}",
        on_c.len()
    );
    nodes[2].kill9();
    converge(&[&nodes[0], &nodes[1]], &["a", "b"]).await;
    // Past the due time and the failover window, every timer fired exactly once.
    let wait = (t0 + 4000 + 3000).saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let mut seen = HashSet::new();
    for (id, token) in on_c.iter().chain(&others) {
        let (mut c, w) = Client::resume(&nodes[0].ws_url(), id, token, 0).await;
        assert_eq!(w["type"], "welcome", "{w}");
        // The firing's event is replayed first (nothing was acknowledged).
        let fired = c.op_with_id(2, "fired", Value::Null).await;
        let list = fired["value"].as_array().unwrap();
        assert_eq!(list.len(), 1, "session {id}: fired once: {fired}");
        assert!(
            list[0][1].as_u64().unwrap() >= t0 + 4000,
            "never early: {fired}"
        );
        seen.insert(id.clone());
    }
    assert_eq!(seen.len(), on_c.len() + others.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_2_migrates_version_1s_state_and_refuses_version_3s() {
    let redis = Redis::start();
    // Version 1 writes a session.
    let mut v1 = probe_schema(&redis, "1", &[]);
    let mut c = Client::new_session(&v1.ws_url()).await;
    let (old, old_token) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    assert_eq!(
        op_only(&mut c, 1, "add", json!({"by": 7})).await["value"],
        7
    );
    drop(c);
    v1.kill9();
    // Version 3 writes another.
    let mut v3 = probe_schema(&redis, "3", &[]);
    let mut c = Client::new_session(&v3.ws_url()).await;
    let (new, new_token) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    assert_eq!(
        op_only(&mut c, 1, "add", json!({"by": 5})).await["value"],
        5
    );
    drop(c);
    v3.kill9();
    let key = format!("berth:{{{new}}}:ck");
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();

    // Version 2 reads version 1's state through its migration...
    let v2 = probe_schema(&redis, "2", &[]);
    let (mut c, w) = Client::resume(&v2.ws_url(), &old, &old_token, 0).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(op_only(&mut c, 2, "get", Value::Null).await["value"], 7);
    assert_eq!(
        op_only(&mut c, 3, "add", json!({"by": 1})).await["value"],
        8
    );
    // ...and refuses version 3's, leaving it untouched.
    let (mut c, e) = Client::resume(&v2.ws_url(), &new, &new_token, 0).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "internal", "{e}");
    assert_eq!(c.recv_close().await, Some(1011));
    // The refusal says why (the log is read by a thread of the test's own:
    // wait for it rather than assume it caught up with the client).
    v2.wait_log("newer than this build's 2");
    let after: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(after, stored, "the newer checkpoint is left as it was");
}
