//! The backend API (`api.listen`) against real processes: the probe
//! application (`tests/apps/probe.rs`: a session's `add` message adds to its
//! count and tells its client; the `tally` entity refuses it), real Redis,
//! Consul and SIGKILL for the cluster case, and schemathesis against the
//! OpenAPI document the node serves.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::app::probe;
use crate::common::*;

/// The bearer key the tests' nodes accept.
const KEY: &str = "test-api-key-0123456789";

/// A node's environment plus the API on a free loopback port; answers it
/// and the API's base URL.
fn with_api(
    mut env: Vec<(String, String)>,
    extra: &[(&str, &str)],
) -> (Vec<(String, String)>, String) {
    let port = free_port();
    env.push(("BERTH__API__LISTEN".into(), format!("127.0.0.1:{port}")));
    env.push(("BERTH__API__KEYS".into(), KEY.into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    (env, format!("http://127.0.0.1:{port}"))
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// POSTs `body` (JSON) to `url` with the key and `idem` as Idempotency-Key.
async fn post(url: &str, idem: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let mut req = http()
        .post(url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    answer(req).await
}

async fn answer(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let r = req.send().await.expect("the API answers");
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get(url: &str) -> (StatusCode, Value) {
    answer(http().get(url).bearer_auth(KEY)).await
}

/// Reads the client's frames until `get`'s result, keeping the backend
/// messages' events; answers the count and those events.
async fn count(c: &mut Client, id: u64) -> (i64, Vec<Value>) {
    c.send(json!({"type":"op","id":id,"op":"get","args":null}))
        .await;
    let mut events = Vec::new();
    loop {
        let v = c.recv_json().await;
        if v["type"] == "event" {
            events.push(v["body"].clone());
        } else if v["type"] == "result" && v["id"] == id {
            return (v["value"].as_i64().unwrap(), events);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_api_applies_a_key_once_answers_every_error_and_ends_a_session_with_4004() {
    let redis = Redis::start();
    let (env, api) = with_api(
        env_with(&redis, &[]),
        &[("BERTH__LIMITS__MAX_MESSAGE_BYTES", "1024")],
    );
    let node = probe(&env);
    let mut c = Client::new_session(&node.ws_url()).await;
    let sid = c.session.clone().unwrap();
    let r = c.op("add", json!({"by": 1})).await;
    assert_eq!(r["value"], 1, "{r}");
    let to_session = format!("{api}/v1/sessions/{sid}/messages");
    let add = json!({"add": {"by": 10}});

    // The same key twice: applied once; another key: applied again.
    for _ in 0..2 {
        let (s, b) = post(&to_session, Some("order-1:paid"), &add).await;
        assert_eq!((s, &b), (StatusCode::OK, &json!({"delivered": true})));
    }
    let (n, events) = count(&mut c, 100).await;
    assert_eq!(n, 11, "one key, applied once: {events:?}");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["from"], "backend(order-1:paid)");
    let (s, _) = post(&to_session, Some("order-2:paid"), &add).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(count(&mut c, 101).await.0, 21);

    // Keys: none, a wrong one, and the public port does not serve the API.
    let no_key = http()
        .post(&to_session)
        .header("Idempotency-Key", "k")
        .json(&add);
    let (s, b) = answer(no_key).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(b["error"]["code"], "unauthorized", "{b}");
    let wrong = http()
        .post(&to_session)
        .bearer_auth("not-the-key-0123456789")
        .header("Idempotency-Key", "k")
        .json(&add)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    let public = format!("http://{}/v1/sessions/{sid}", node.public);
    let r = http().get(&public).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the public port has no API"
    );
    let r = http()
        .post(format!("{public}/messages"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "k")
        .json(&add)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the public port has no API"
    );

    // 400s, 413, 415.
    let (s, b) = post(&to_session, None, &add).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_idempotency_key"))
    );
    let (s, _) = post(&to_session, Some("has space"), &add).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let bad_json = http()
        .post(&to_session)
        .bearer_auth(KEY)
        .header("Idempotency-Key", "k")
        .header("content-type", "application/json")
        .body("{not json");
    let (s, b) = answer(bad_json).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_json"))
    );
    let text = http()
        .post(&to_session)
        .bearer_auth(KEY)
        .header("Idempotency-Key", "k")
        .header("content-type", "text/plain")
        .body(add.to_string());
    assert_eq!(answer(text).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = json!({"add": {"by": 1}, "pad": "x".repeat(2000)});
    let (s, b) = post(&to_session, Some("big"), &big).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large"))
    );
    let (s, b) = post(
        &format!("{api}/v1/sessions/not-an-id/messages"),
        Some("k"),
        &add,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_address"))
    );

    // 404s: a session that never existed, an entity kind nobody registered.
    let unknown = "AAAAAAAAAAAAAAAAAAAAAA";
    let (s, b) = post(
        &format!("{api}/v1/sessions/{unknown}/messages"),
        Some("k"),
        &add,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("session_not_found")),
        "{b}"
    );
    let (s, b) = post(
        &format!("{api}/v1/entities/nosuch/x/messages"),
        Some("k"),
        &add,
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_kind")),
        "{b}"
    );

    // An entity: made by its first message; a message its handler refuses is 409.
    let tally = format!("{api}/v1/entities/tally/t1");
    let (s, _) = post(
        &format!("{tally}/messages"),
        Some("c1"),
        &json!({"count": {"i": 1, "report": false}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = post(&format!("{tally}/messages"), Some("a1"), &add).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("bad_args")),
        "{b}"
    );

    // Status.
    let (s, st) = get(&format!("{api}/v1/sessions/{sid}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (st["exists"].as_bool(), st["live"].as_bool()),
        (Some(true), Some(true)),
        "{st}"
    );
    assert_eq!(st["version"], 3, "one op and two messages: {st}");
    assert_eq!(st["owner"].as_str(), Some(node.node.as_str()), "{st}");
    let (_, st) = get(&tally).await;
    assert_eq!(st["exists"], true, "{st}");
    let (_, st) = get(&format!("{api}/v1/sessions/{unknown}")).await;
    assert_eq!(
        (st["exists"].as_bool(), st["live"].as_bool()),
        (Some(false), Some(false)),
        "{st}"
    );
    assert_eq!(st["version"], Value::Null, "{st}");

    // A user nobody is: no session to deliver to.
    let (s, b) = post(&format!("{api}/v1/users/alice/messages"), Some("u1"), &add).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["delivered"], json!([]), "{b}");

    // DELETE: the client is closed with 4004, the state is gone.
    let r = http()
        .delete(format!("{api}/v1/sessions/{sid}"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(c.recv_close().await, Some(4004));
    let r = http()
        .delete(format!("{api}/v1/sessions/{sid}"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "ended already");
    let (s, _) = post(&to_session, Some("after-end"), &add).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, st) = get(&format!("{api}/v1/sessions/{sid}")).await;
    assert_eq!(st["exists"], false, "{st}");
    let (c2, w) = Client::resume(&node.ws_url(), &sid, c.token.as_deref().unwrap(), 0).await;
    drop(c2);
    assert_eq!(w["code"], "session_not_found", "{w}");

    // Metrics, by route and status.
    let text = node.admin_get("/metrics").1;
    assert!(
        metric_labeled(&text, "berth_api_requests_total", "status=\"401\"") >= 2.0,
        "{text}"
    );
    assert!(
        text.contains("berth_api_request_duration_seconds"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_applied_once_when_the_receivers_owner_is_killed_in_between() {
    use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
    let consul = Consul::start();
    let redis = Redis::start();
    let mut apis = Vec::new();
    let mut nodes: Vec<Berth> = ["a", "b", "c"]
        .iter()
        .map(|id| {
            let mut env = cluster_env(&consul, &redis, id);
            env.push(("BERTH__CLUSTER__TTL_MS".into(), "1000".into()));
            let (env, api) = with_api(env, &[]);
            apis.push(api);
            probe(&env)
        })
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &["a", "b", "c"]).await;
    let ring = Ring::new(
        ["a", "b", "c"].iter().map(|m| MemberId(m.to_string())),
        DEFAULT_VNODES,
    );
    // A session owned by b, its client on a; the API asked on c.
    let url = nodes[0].ws_url();
    let mut c = loop {
        let c = Client::new_session(&url).await;
        if ring.owner(c.session.as_deref().unwrap()).unwrap().as_str() == "b" {
            break c;
        }
    };
    let (sid, token) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    let r = c.op("add", json!({"by": 1})).await;
    assert_eq!(r["value"], 1, "{r}");
    let to = format!("{}/v1/sessions/{sid}/messages", apis[2]);
    let add = json!({"add": {"by": 10}});
    let (s, b) = post(&to, Some("k-before"), &add).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // b dies with the message applied; the same key again, while b is
    // still on the ring and after: 503s until the session is activated
    // on its new owner, then 200 without applying it again. A new key sent
    // in the middle of the failover is applied once too.
    nodes[1].kill9();
    let send_until_ok = |key: &'static str| {
        let to = to.clone();
        let add = add.clone();
        async move {
            for _ in 0..40 {
                let (s, b) = post(&to, Some(key), &add).await;
                match s {
                    StatusCode::OK => return,
                    StatusCode::SERVICE_UNAVAILABLE => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    other => panic!("{key}: {other} {b}"),
                }
            }
            panic!("{key} never delivered");
        }
    };
    send_until_ok("k-during").await;
    send_until_ok("k-before").await;
    converge(&[&nodes[0], &nodes[2]], &["a", "c"]).await;
    send_until_ok("k-before").await;
    send_until_ok("k-during").await;

    drop(c);
    let mut c = loop {
        let (c2, w) = Client::resume(&url, &sid, &token, 0).await;
        if w["type"] == "welcome" {
            break c2;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (n, events) = count(&mut c, 100).await;
    assert_eq!(n, 21, "1 + 10 per key, each key once: {events:?}");
    let (_, st) = get(&format!("{}/v1/sessions/{sid}", apis[0])).await;
    assert_ne!(st["owner"], "b", "{st}");
    assert_eq!(st["live"], true, "{st}");
}

/// Where schemathesis is: `$SCHEMATHESIS`, the venv scripts/install-deps.sh
/// makes, or `PATH`.
fn schemathesis() -> PathBuf {
    if let Some(p) = std::env::var_os("SCHEMATHESIS") {
        return PathBuf::from(p);
    }
    let venv =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/schemathesis/bin/schemathesis");
    if venv.exists() {
        return venv;
    }
    let found = std::process::Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "schemathesis is missing: run scripts/install-deps.sh (it installs the pinned \
         version into .tools/schemathesis), or set SCHEMATHESIS to its path"
    );
    PathBuf::from("schemathesis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure_against_the_openapi_document() {
    let bin = schemathesis();
    let redis = Redis::start();
    let (env, api) = with_api(env_with(&redis, &[]), &[]);
    let node = Berth::start_with(&env, &[]);
    let dir = std::env::temp_dir().join(format!("berth-schemathesis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .current_dir(&dir)
            .args([
                "run",
                &format!("{api}/v1/openapi.json"),
                "--header",
                &format!("Authorization: Bearer {KEY}"),
                "--checks",
                "all",
                "--max-examples",
                "40",
                "--seed",
                "1",
                "--generation-database",
                "none",
                "--phases",
                "examples,coverage,fuzzing",
            ])
            .env("NO_COLOR", "1")
            .output()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{text}\nnode log:\n{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_a_user_reaches_each_of_their_live_sessions_once_on_every_node() {
    use crate::auth::{claims, hello, hs, with_auth};
    use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
    let consul = Consul::start();
    let redis = Redis::start();
    let ids = ["a", "b", "c"];
    let mut apis = Vec::new();
    let nodes: Vec<Berth> = ids
        .iter()
        .map(|id| {
            let (env, api) = with_api(with_auth(cluster_env(&consul, &redis, id), &[]), &[]);
            apis.push(api);
            probe(&env)
        })
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &ids).await;
    let ring = Ring::new(ids.iter().map(|m| MemberId(m.to_string())), DEFAULT_VNODES);
    // alice: sessions until one is owned by a and one by b (so the API,
    // asked on c, must find them on two other members; every one of them
    // stays live, its client attached or not); bob: one session.
    let (alice, bob) = (hs(&claims("alice")), hs(&claims("bob")));
    let mut sessions: Vec<(String, Client)> = Vec::new();
    for i in 0..60 {
        let (c, w) = hello(&nodes[i % 3].ws_url(), None, None, Some(&alice)).await;
        assert_eq!(w["type"], "welcome", "{w}");
        let owner = ring.owner(c.session.as_deref().unwrap()).unwrap();
        sessions.push((owner.as_str().to_owned(), c));
        let has = |o: &str| sessions.iter().any(|(x, _)| x == o);
        if has("a") && has("b") {
            break;
        }
    }
    let (mut b_client, w) = hello(&nodes[0].ws_url(), None, None, Some(&bob)).await;
    assert_eq!(w["type"], "welcome", "{w}");

    let to = format!("{}/v1/users/alice/messages", apis[2]);
    let add = json!({"add": {"by": 10}});
    for _ in 0..2 {
        let (s, body) = post(&to, Some("to-alice-1"), &add).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let mut want: Vec<String> = sessions
            .iter()
            .map(|(_, c)| c.session.clone().unwrap())
            .collect();
        want.sort();
        assert_eq!(body["delivered"], json!(want), "{body}");
    }
    // Each of alice's sessions applied the key once; bob's none.
    for (owner, c) in sessions.iter_mut() {
        let (n, _) = count(c, 100).await;
        assert_eq!(n, 10, "alice's session owned by {owner}");
    }
    assert_eq!(count(&mut b_client, 100).await.0, 0, "bob's session");
    // A user with no live session: delivered to nobody, not an error.
    let (s, body) = post(
        &format!("{}/v1/users/carol/messages", apis[0]),
        Some("k"),
        &add,
    )
    .await;
    assert_eq!(
        (s, &body["delivered"]),
        (StatusCode::OK, &json!([])),
        "{body}"
    );
}
