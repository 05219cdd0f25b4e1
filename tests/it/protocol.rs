//! Every row of protocol.md against the real binary with a real Redis.

use serde_json::{json, Value};

use crate::common::*;

fn err_code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

#[tokio::test]
async fn welcome_and_every_kv_op() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let mut c = Client::connect(&node.ws_url()).await;
    let w = c.hello(None, None, 0).await;
    assert_eq!(w["type"], "welcome");
    assert_eq!(
        w["session"].as_str().unwrap().len(),
        22,
        "128-bit id, URL-safe base64"
    );
    assert!(w["token"].as_str().unwrap().len() >= 22);
    assert_eq!(
        (
            w["resumed"].clone(),
            w["version"].clone(),
            w["last_op"].clone()
        ),
        (json!(false), json!(0), json!(0))
    );
    assert_eq!(w["node"], node.node);

    let r = c.op("get", json!({"key":"a"})).await;
    assert_eq!(
        (r["ok"].clone(), r["value"].clone(), r["version"].clone()),
        (json!(true), Value::Null, json!(0))
    );
    assert_eq!(
        c.op("set", json!({"key":"a","value":"x"})).await["value"],
        Value::Null
    );
    let r = c.op("set", json!({"key":"a","value":{"n":[1]}})).await;
    assert_eq!(
        (r["value"].clone(), r["version"].clone()),
        (json!("x"), json!(2))
    );
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
    assert_eq!(c.op("incr", json!({"key":"n","by":41})).await["value"], 42);
    assert_eq!(c.op("incr", json!({"key":"n","by":-2})).await["value"], 40);
    assert_eq!(
        c.op("append", json!({"key":"l","value":1})).await["value"],
        1
    );
    assert_eq!(
        c.op("append", json!({"key":"l","value":"two"})).await["value"],
        2
    );
    assert_eq!(c.op("del", json!({"key":"n"})).await["value"], 40);
    assert_eq!(c.op("del", json!({"key":"n"})).await["value"], Value::Null);
    assert_eq!(
        c.op("echo", json!({"value":[1,{"b":2}]})).await["value"],
        json!([1,{"b":2}])
    );
    let st = c.op("state", json!({})).await;
    assert_eq!(st["value"], json!({"a":{"n":[1]},"l":[1,"two"]}));
    assert_eq!(st["version"], 8);

    assert_eq!(
        err_code(&c.op("incr", json!({"key":"a"})).await),
        "type_mismatch"
    );
    assert_eq!(
        err_code(&c.op("append", json!({"key":"a","value":1})).await),
        "type_mismatch"
    );
    assert_eq!(err_code(&c.op("teleport", json!({})).await), "unknown_op");
    assert_eq!(err_code(&c.op("set", json!({"value":1})).await), "bad_args");
    assert_eq!(
        err_code(&c.op("incr", json!({"key":"z","by":"many"})).await),
        "bad_args"
    );
    assert_eq!(err_code(&c.op("get", json!("key")).await), "bad_args");
    let r = c.op("get", json!({"key":"l"})).await;
    assert_eq!(r["value"], json!([1, "two"]), "failed ops changed nothing");
    assert_eq!(r["version"], 8);
}

#[tokio::test]
async fn state_limit_answers_too_large_and_keeps_state() {
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(&redis, &[("BERTH__LIMITS__MAX_STATE_BYTES", "100")]),
        &[],
    );
    let mut c = Client::new_session(&node.ws_url()).await;
    assert!(c.op("set", json!({"key":"a","value":"small"})).await["ok"]
        .as_bool()
        .unwrap());
    let r = c
        .op("set", json!({"key":"b","value":"x".repeat(200)}))
        .await;
    assert_eq!(err_code(&r), "too_large");
    assert_eq!(
        c.op("state", json!({})).await["value"],
        json!({"a":"small"})
    );
}

#[tokio::test]
async fn events_are_sequenced_replayed_until_acked() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let mut c = Client::new_session(&node.ws_url()).await;
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());

    // emit now: the result, then the event (in either order).
    c.send(json!({"type":"op","id":1,"op":"emit","args":{"body":{"hello":1}}}))
        .await;
    let got = c.recv_event_and_result().await;
    assert_eq!(got[0], json!({"type":"event","seq":1,"body":{"hello":1}}));
    assert_eq!(
        (got[1]["type"].clone(), got[1]["value"].clone()),
        (json!("result"), json!(1))
    );

    // A delayed event arrives later, in order.
    let t0 = std::time::Instant::now();
    assert_eq!(
        c.op_with_id(2, "emit", json!({"body":"later","delay_ms":300}))
            .await["value"],
        2
    );
    let e = c.recv_json().await;
    assert_eq!(e, json!({"type":"event","seq":2,"body":"later"}));
    assert!(t0.elapsed().as_millis() >= 250, "delay_ms is honoured");
    c.send(json!({"type":"op","id":3,"op":"emit","args":{"body":"third"}}))
        .await;
    let [event, result] = c.recv_event_and_result().await;
    assert_eq!(
        (event["seq"].clone(), result["value"].clone()),
        (json!(3), json!(3))
    );

    // Reconnect having received up to 1: 2 and 3 are replayed after welcome.
    drop(c);
    let (mut c, w) = Client::resume(&node.ws_url(), &sid, &tok, 1).await;
    assert_eq!(
        (w["resumed"].clone(), w["last_op"].clone()),
        (json!(true), json!(3))
    );
    assert_eq!(
        c.recv_json().await,
        json!({"type":"event","seq":2,"body":"later"})
    );
    assert_eq!(
        c.recv_json().await,
        json!({"type":"event","seq":3,"body":"third"})
    );
    // Acknowledge everything: nothing is replayed again, even with ack 0.
    c.send(json!({"type":"ack","seq":3})).await;
    assert_eq!(
        c.op_with_id(4, "echo", json!({"value":0})).await["ok"],
        true
    );
    drop(c);
    let (mut c, _) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
    c.send(json!({"type":"op","id":5,"op":"echo","args":{"value":"x"}}))
        .await;
    let first = c.recv_json().await;
    assert_eq!(
        (first["type"].clone(), first["id"].clone()),
        (json!("result"), json!(5)),
        "acked events were not replayed: {first}"
    );
    // Sequences keep counting after acks.
    c.send(json!({"type":"op","id":6,"op":"emit","args":{"body":4}}))
        .await;
    let got = c.recv_event_and_result().await;
    assert_eq!(got[0]["seq"], 4);
}

#[tokio::test]
async fn retried_op_ids_are_not_applied_twice() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let mut c = Client::new_session(&node.ws_url()).await;
    let first = c.op_with_id(5, "incr", json!({"key":"c"})).await;
    assert_eq!(first["value"], 1);
    let again = c.op_with_id(5, "incr", json!({"key":"c"})).await;
    assert_eq!(
        (
            again["ok"].clone(),
            again["value"].clone(),
            again["version"].clone()
        ),
        (json!(true), json!(1), first["version"].clone())
    );
    assert_eq!(
        c.op_with_id(6, "incr", json!({"key":"c"})).await["value"],
        2
    );
    let older = c.op_with_id(5, "incr", json!({"key":"c"})).await;
    assert_eq!(
        (older["ok"].clone(), older["duplicate"].clone()),
        (json!(true), json!(true))
    );
    // After a reconnect too.
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    drop(c);
    let (mut c, w) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["last_op"], 6);
    assert_eq!(
        c.op_with_id(6, "incr", json!({"key":"c"})).await["value"],
        2
    );
    assert_eq!(c.op_with_id(7, "get", json!({"key":"c"})).await["value"], 2);
}

#[tokio::test]
async fn newer_connection_takes_over_with_4000() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let mut a = Client::new_session(&node.ws_url()).await;
    a.op("set", json!({"key":"k","value":1})).await;
    let (sid, tok) = (a.session.clone().unwrap(), a.token.clone().unwrap());
    let (mut b, w) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["resumed"], true);
    assert_eq!(a.recv_close().await, Some(4000));
    b.set_next_id(2);
    assert_eq!(b.op("get", json!({"key":"k"})).await["value"], 1);
}

#[tokio::test]
async fn bad_token_unknown_session_and_malformed_id() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let a = Client::new_session(&node.ws_url()).await;
    let sid = a.session.clone().unwrap();

    let (mut c, w) = Client::resume(&node.ws_url(), &sid, "wrong-token", 0).await;
    assert_eq!(
        (w["type"].clone(), w["code"].clone()),
        (json!("error"), json!("bad_token"))
    );
    assert_eq!(c.recv_close().await, Some(1008));

    let mut c = Client::connect(&node.ws_url()).await;
    c.send(json!({"type":"hello","session":sid})).await;
    assert_eq!(
        c.recv_json().await["code"],
        "bad_token",
        "a missing token is a bad token"
    );
    assert_eq!(c.recv_close().await, Some(1008));

    let unknown = "AAAAAAAAAAAAAAAAAAAAAA";
    let (mut c, w) = Client::resume(&node.ws_url(), unknown, "t", 0).await;
    assert_eq!(w["code"], "session_not_found");
    assert_eq!(c.recv_close().await, Some(4004));

    let (mut c, w) = Client::resume(&node.ws_url(), "../../etc/passwd", "t", 0).await;
    assert_eq!(w["code"], "session_not_found");
    assert_eq!(c.recv_close().await, Some(4004));
}

#[tokio::test]
async fn frames_before_hello_and_malformed_frames_keep_the_connection() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let mut c = Client::connect(&node.ws_url()).await;
    c.send(json!({"type":"op","id":1,"op":"get","args":{"key":"a"}}))
        .await;
    assert_eq!(c.recv_json().await["code"], "hello_required");
    c.send(json!({"type":"ack","seq":1})).await;
    assert_eq!(c.recv_json().await["code"], "hello_required");
    c.send_text("{not json").await;
    assert_eq!(c.recv_json().await["code"], "bad_frame");
    assert_eq!(c.hello(None, None, 0).await["type"], "welcome");
    for bad in [
        "",
        "[]",
        "42",
        r#"{"type":"launch"}"#,
        r#"{"type":"op","id":"x","op":"get"}"#,
        r#"{"type":"op","id":-1,"op":"get"}"#,
    ] {
        c.send_text(bad).await;
        let e = c.recv_json().await;
        assert_eq!(
            (e["type"].clone(), e["code"].clone()),
            (json!("error"), json!("bad_frame")),
            "{bad:?}"
        );
    }
    c.ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        1u8, 2, 3,
    ]))
    .await
    .unwrap();
    assert_eq!(c.recv_json().await["code"], "bad_frame");
    c.send(json!({"type":"hello","session":null})).await;
    assert_eq!(
        c.recv_json().await["code"],
        "bad_frame",
        "a second hello is refused"
    );
    assert_eq!(
        c.op("incr", json!({"key":"n"})).await["value"],
        1,
        "connection still usable"
    );
}

use futures_util::SinkExt;

#[tokio::test]
async fn oversized_frame_closes_1009_and_loses_nothing() {
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(&redis, &[("BERTH__SERVER__MAX_FRAME_BYTES", "4096")]),
        &[],
    );
    let mut c = Client::new_session(&node.ws_url()).await;
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
    let big = json!({"type":"op","id":2,"op":"set","args":{"key":"b","value":"x".repeat(5000)}});
    c.send(big).await;
    assert_eq!(c.recv_close().await, Some(1009));
    let (mut c2, w) = Client::resume(
        &node.ws_url(),
        c.session.as_deref().unwrap(),
        c.token.as_deref().unwrap(),
        0,
    )
    .await;
    assert_eq!(w["last_op"], 1);
    assert_eq!(c2.op("state", json!({})).await["value"], json!({"n":1}));
}

#[tokio::test]
async fn bye_deletes_the_session() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let mut c = Client::new_session(&node.ws_url()).await;
    c.op("set", json!({"key":"a","value":1})).await;
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    c.send(json!({"type":"bye"})).await;
    assert_eq!(c.recv_close().await, Some(1000));
    let (mut c, w) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["code"], "session_not_found");
    assert_eq!(c.recv_close().await, Some(4004));
    let mut conn = redis.conn();
    let ck: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("berth:{{{sid}}}:ck"))
        .query(&mut conn)
        .unwrap();
    assert!(ck.is_none(), "checkpoint deleted from Redis");
}

#[tokio::test]
async fn flood_is_rate_limited_and_limited_ops_are_not_applied() {
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(
            &redis,
            &[
                ("BERTH__LIMITS__FRAMES_PER_SEC", "5"),
                ("BERTH__LIMITS__FRAMES_BURST", "10"),
            ],
        ),
        &[],
    );
    let mut c = Client::new_session(&node.ws_url()).await;
    for id in 1..=40u64 {
        c.send(json!({"type":"op","id":id,"op":"incr","args":{"key":"n"}}))
            .await;
    }
    let (mut ok, mut limited) = (0, 0);
    for id in 1..=40u64 {
        let r = c.recv_json().await;
        assert_eq!(r["id"], id);
        match r["ok"].as_bool().unwrap() {
            true => ok += 1,
            false => {
                assert_eq!(err_code(&r), "rate_limited");
                limited += 1;
            }
        }
    }
    assert!(ok >= 9 && limited > 20, "ok {ok}, limited {limited}");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let st = c.op_with_id(41, "get", json!({"key":"n"})).await;
    assert_eq!(st["value"], ok, "only answered ops were applied");
}

#[tokio::test]
async fn origin_allow_list() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(&redis, &[("BERTH__SERVER__ORIGINS", "https://app.example")]),
        &[],
    );
    for (origin, allowed) in [
        ("https://evil.example", false),
        ("https://app.example", true),
    ] {
        let mut req = node.ws_url().into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut c = Client::from_ws(ws);
        if allowed {
            assert_eq!(c.hello(None, None, 0).await["type"], "welcome");
        } else {
            assert_eq!(c.recv_json().await["code"], "bad_origin");
            assert_eq!(c.recv_close().await, Some(1008));
        }
    }
    // Native apps send no Origin.
    let mut c = Client::connect(&node.ws_url()).await;
    assert_eq!(c.hello(None, None, 0).await["type"], "welcome");
}

#[tokio::test]
async fn silent_connections_are_dropped_after_two_ping_intervals() {
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(&redis, &[("BERTH__SERVER__PING_INTERVAL_MS", "200")]),
        &[],
    );
    // A client that reads (and so answers pings) stays.
    let mut alive = Client::new_session(&node.ws_url()).await;
    let mut silent = Client::new_session(&node.ws_url()).await;
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(alive.op("echo", json!({"value":1})).await["ok"], true);
    }
    // The silent one never read, so never answered a ping: it was dropped.
    match silent.recv().await {
        Got::Ended | Got::Close(..) => {}
        Got::Json(v) => panic!("silent connection still open: {v}"),
    }
}

#[tokio::test]
async fn connection_limit_answers_1013() {
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(&redis, &[("BERTH__SERVER__MAX_CONNECTIONS", "1")]),
        &[],
    );
    let mut first = Client::new_session(&node.ws_url()).await;
    let mut second = Client::connect(&node.ws_url()).await;
    assert_eq!(second.recv_json().await["code"], "unavailable");
    assert_eq!(second.recv_close().await, Some(1013));
    assert_eq!(first.op("echo", json!({"value":1})).await["ok"], true);
}

#[tokio::test]
async fn embedded_default_serves_the_protocol() {
    let node = Berth::start_memory();
    assert!(
        node.log().contains("NOT durable") || {
            node.wait_log("NOT durable");
            true
        }
    );
    let mut c = Client::new_session(&node.ws_url()).await;
    assert_eq!(c.op("incr", json!({"key":"n","by":2})).await["value"], 2);
    c.send(json!({"type":"op","id":2,"op":"emit","args":{"body":"e"}}))
        .await;
    let got = c.recv_event_and_result().await;
    assert_eq!(got[0]["seq"], 1);
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    drop(c);
    let (mut c, w) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
    assert_eq!(
        (
            w["resumed"].clone(),
            w["version"].clone(),
            w["last_op"].clone()
        ),
        (json!(true), json!(2), json!(2))
    );
    assert_eq!(c.recv_json().await["seq"], 1, "unacked event replayed");
    c.send(json!({"type":"bye"})).await;
    assert_eq!(c.recv_close().await, Some(1000));
}

#[tokio::test]
async fn demo_page_and_admin_endpoints() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let (status, resp) = http(node.public, "GET", "/", &[]);
    assert_eq!(status, 200);
    let lower = resp.to_lowercase();
    assert!(
        lower.contains("cache-control: public, max-age=300"),
        "{resp}"
    );
    assert!(lower.contains("content-type: text/html"));
    assert!(resp.contains("/ws"), "the page opens the WebSocket");
    let etag = resp
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .starts_with("etag:")
                .then(|| l[5..].trim().to_owned())
        })
        .expect("etag");
    let (status, _) = http(node.public, "GET", "/", &[("If-None-Match", &etag)]);
    assert_eq!(status, 304);
    assert!(
        resp.contains("from '/berth.js'"),
        "the page runs on the JS client"
    );
    // The JavaScript client, served by every node.
    let (status, js) = http(node.public, "GET", "/berth.js", &[]);
    assert_eq!(status, 200);
    let lower = js.to_lowercase();
    assert!(lower.contains("content-type: text/javascript"), "{lower}");
    assert!(lower.contains("etag:"));
    assert!(js.contains("export class BerthClient"));

    assert_eq!(node.admin_get("/health/live").0, 200);
    let mut c = Client::new_session(&node.ws_url()).await;
    c.op("incr", json!({"key":"n"})).await;
    eventually("ready", || node.admin_get("/health/ready").0 == 200).await;
    let (_, m) = node.admin_get("/metrics");
    for name in [
        "berth_ops_total",
        "berth_op_duration_seconds",
        "berth_sessions_live",
        "berth_connections",
        "berth_checkpoint_batch_size",
        "berth_checkpoint_batch_seconds",
        "berth_store_up",
    ] {
        assert!(m.contains(name), "metrics lack {name}");
    }
    let (s, body) = node.admin_get("/cluster");
    assert_eq!(s, 200);
    let body: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["node"], node.node);
    assert_eq!(body["sessions_live"], 1);
    assert_eq!(body["store"]["durable"], true);
    // The public port does not serve the admin routes.
    assert_eq!(http(node.public, "GET", "/metrics", &[]).0, 404);
}

#[tokio::test]
async fn ping_is_answered_with_pong_before_and_after_hello_and_carries_its_id() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let mut c = Client::connect(&node.ws_url()).await;
    // Before hello: the connection is alive, no session needed.
    c.send(json!({"type":"ping"})).await;
    assert_eq!(c.recv_json().await, json!({"type":"pong"}));
    c.send(json!({"type":"ping","id":41})).await;
    assert_eq!(c.recv_json().await, json!({"type":"pong","id":41}));
    let w = c.hello(None, None, 0).await;
    assert_eq!(w["type"], "welcome", "{w}");
    // After hello, between ops: a pong, and the session is untouched.
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
    c.send(json!({"type":"ping","id":42})).await;
    assert_eq!(c.recv_json().await, json!({"type":"pong","id":42}));
    let r = c.op("incr", json!({"key":"n"})).await;
    assert_eq!(
        (r["value"].clone(), r["version"].clone()),
        (json!(2), json!(2))
    );
    // A ping with a bad id is a bad frame, and the connection goes on.
    c.send(json!({"type":"ping","id":"x"})).await;
    let e = c.recv_json().await;
    assert_eq!(
        (e["type"].clone(), e["code"].clone()),
        (json!("error"), json!("bad_frame"))
    );
    c.send(json!({"type":"ping"})).await;
    assert_eq!(c.recv_json().await, json!({"type":"pong"}));
}

#[tokio::test]
async fn pings_count_against_the_frame_rate_limit() {
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(
            &redis,
            &[
                ("BERTH__LIMITS__FRAMES_PER_SEC", "5"),
                ("BERTH__LIMITS__FRAMES_BURST", "10"),
            ],
        ),
        &[],
    );
    let mut c = Client::connect(&node.ws_url()).await;
    for id in 1..=40u64 {
        c.send(json!({"type":"ping","id":id})).await;
    }
    // Close to the burst answered, the rest not, and the client told so once.
    let (mut pongs, mut limited) = (0, 0);
    loop {
        let got = tokio::time::timeout(std::time::Duration::from_millis(500), c.recv()).await;
        let Ok(Got::Json(v)) = got else { break };
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") if v["code"] == "rate_limited" => limited += 1,
            _ => panic!("unexpected {v}"),
        }
    }
    assert!((10..=15).contains(&pongs), "pongs {pongs}");
    assert_eq!(limited, 1, "told once a second at most");
}

/// Frames sent right behind a `hello`, before its `welcome`, are handled in
/// the order they were sent once the hello has attached (the edge reads the
/// socket while the attach runs, so it notices a client that goes away);
/// a `ping` among them is answered at once.
#[tokio::test]
async fn frames_pipelined_behind_hello_are_answered_in_order_after_welcome() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let mut c = Client::connect(&node.ws_url()).await;
    c.send(json!({"type":"hello","ack":0})).await;
    c.send(json!({"type":"op","id":1,"op":"incr","args":{"key":"n"}}))
        .await;
    c.send(json!({"type":"ping","id":7})).await;
    c.send(json!({"type":"hello","ack":0})).await;
    c.send(json!({"type":"op","id":2,"op":"incr","args":{"key":"n"}}))
        .await;
    // The pong may come before the welcome (a ping is answered even while
    // the hello attaches); everything else comes after it, results in op
    // order.
    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(c.recv_json().await);
    }
    let at = |t: &str| frames.iter().position(|f| f["type"] == t).unwrap();
    let welcome = at("welcome");
    let results: Vec<_> = frames
        .iter()
        .enumerate()
        .filter(|(_, f)| f["type"] == "result")
        .map(|(i, f)| (i, f["id"].clone(), f["value"].clone()))
        .collect();
    assert_eq!(
        results
            .iter()
            .map(|(_, id, v)| (id.clone(), v.clone()))
            .collect::<Vec<_>>(),
        [(json!(1), json!(1)), (json!(2), json!(2))],
        "{frames:?}"
    );
    assert!(results.iter().all(|(i, _, _)| *i > welcome), "{frames:?}");
    assert_eq!(frames[at("pong")], json!({"type":"pong","id":7}));
    let e = &frames[at("error")];
    assert!(at("error") > welcome, "{frames:?}");
    assert_eq!(
        (e["type"].clone(), e["code"].clone()),
        (json!("error"), json!("bad_frame")),
        "a second hello: {e}"
    );
}
