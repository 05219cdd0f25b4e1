//! What one anonymous client can make a node do: bounded. A flood of
//! anonymous hellos, a connection flood from one address, a checkpoint
//! inflated with unacknowledged events. Real berth, real Redis.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::*;

fn redis_keys(redis: &Redis) -> u64 {
    redis::cmd("DBSIZE").query(&mut redis.conn()).unwrap()
}

/// `hello{session:null}` on a new connection: `Some(session)` when
/// welcomed, `None` when refused with `unavailable` and 1013.
async fn anonymous_hello(url: &str) -> (Client, Option<String>) {
    let mut c = Client::connect(url).await;
    let w = c.hello(None, None, 0).await;
    if w["type"] == "welcome" {
        let sid = w["session"].as_str().map(str::to_owned);
        return (c, sid);
    }
    assert_eq!(w["code"], "unavailable", "{w}");
    assert_eq!(c.recv_close().await, Some(1013));
    (c, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_anonymous_hellos_leaves_at_most_the_cap_live_and_no_redis_keys() {
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(
            &redis,
            &[
                ("BERTH__LIMITS__MAX_LIVE_SESSIONS", "100"),
                ("BERTH__SESSION__UNWRITTEN_DETACH_TIMEOUT_S", "1"),
                ("BERTH__LIMITS__CONNECTIONS_PER_SEC_PER_SOURCE", "0"),
            ],
        ),
        &[],
    );
    let url = node.ws_url();
    // 150 clients that stay connected: the first 100 get a session, the
    // rest are refused with `unavailable` and 1013.
    let mut held = Vec::new();
    let mut welcomed = 0;
    for _ in 0..150 {
        let (c, sid) = anonymous_hello(&url).await;
        if sid.is_some() {
            welcomed += 1;
            held.push(c);
        }
    }
    assert_eq!(welcomed, 100, "exactly the cap");
    assert_eq!(node.metric("berth_sessions_live"), 100.0);
    assert_eq!(
        redis_keys(&redis),
        0,
        "a session that never wrote is not in Redis"
    );
    drop(held);

    // 2000 more hellos, 50 at a time, each closing at once: never more than
    // the cap live, no Redis key, and sessions that never wrote go soon.
    let mut refused = 0;
    for _ in 0..40 {
        let batch = (0..50).map(|_| anonymous_hello(&url));
        for (c, sid) in futures_util::future::join_all(batch).await {
            refused += usize::from(sid.is_none());
            drop(c);
        }
        assert!(node.metric("berth_sessions_live") <= 100.0);
    }
    eprintln!("2000 hellos: {refused} refused at the cap");
    assert_eq!(redis_keys(&redis), 0);
    eventually("unwritten sessions passivate after 1 s", || {
        node.metric("berth_sessions_live") == 0.0
    })
    .await;

    // A session that writes is in the store (two keys) and resumable.
    let (mut c, sid) = anonymous_hello(&url).await;
    let sid = sid.expect("room again");
    let token = c.token.clone().unwrap();
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
    assert_eq!(redis_keys(&redis), 2);
    drop(c);
    let (mut r, w) = Client::resume(&url, &sid, &token, 0).await;
    assert_eq!(w["resumed"], true, "{w}");
    r.set_next_id(2);
    assert_eq!(r.op("incr", json!({"key":"n"})).await["value"], 2);
}

/// An upgrade request to `url` with an optional `X-Forwarded-For`: its HTTP
/// status (101 when upgraded) and `Retry-After`.
async fn upgrade(url: &str, forwarded_for: Option<&str>) -> (u16, Option<String>) {
    let mut req = url.into_client_request().unwrap();
    if let Some(f) = forwarded_for {
        req.headers_mut()
            .insert("x-forwarded-for", f.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        // Dropped at once: the next attempt is not slowed by a close handshake.
        Ok((_ws, resp)) => (resp.status().as_u16(), None),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

#[tokio::test]
async fn one_source_opening_connections_too_fast_is_refused_with_429() {
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(
            &redis,
            &[
                ("BERTH__LIMITS__CONNECTIONS_PER_SEC_PER_SOURCE", "1"),
                ("BERTH__LIMITS__CONNECTIONS_BURST_PER_SOURCE", "5"),
                ("BERTH__SERVER__TRUSTED_PROXIES", "127.0.0.1"),
            ],
        ),
        &[],
    );
    let url = node.ws_url();
    // One source (the proxy names it): its burst of 5, then 429.
    let mut statuses = Vec::new();
    for _ in 0..15 {
        statuses.push(upgrade(&url, Some("198.51.100.7")).await);
    }
    let ok = statuses.iter().filter(|(s, _)| *s == 101).count();
    let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert!(
        // the burst, plus one per second the loop took (a loaded machine is slow)
        (5..=9).contains(&ok),
        "burst 5 (+ refill at 1/s): {statuses:?}"
    );
    assert_eq!(ok + refused.len(), 15, "{statuses:?}");
    assert!(
        refused.iter().all(|(_, r)| r.as_deref() == Some("1")),
        "{refused:?}"
    );
    // Other sources behind the same proxy are not affected...
    for i in 0..10 {
        let (s, _) = upgrade(&url, Some(&format!("203.0.113.{i}"))).await;
        assert_eq!(s, 101, "source {i}");
    }
    // ...and a client cannot dodge the limit by naming a source itself: the
    // proxy's own entry (the rightmost) is what counts.
    let mut dodged = 0;
    for i in 0..10 {
        let (s, _) = upgrade(&url, Some(&format!("192.0.2.{i}, 198.51.100.7"))).await;
        dodged += usize::from(s == 101);
    }
    assert!(dodged <= 4, "only the refill gets through: {dodged}");
    assert!(node.metric("berth_connections_refused_total") >= 10.0);
    // The node still serves.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut c = Client::new_session(&url).await;
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
}

#[tokio::test]
async fn unacknowledged_events_cannot_grow_a_checkpoint_past_its_bound() {
    let redis = Redis::start();
    let node = Berth::start_with(
        &env_with(&redis, &[("BERTH__LIMITS__MAX_CHECKPOINT_BYTES", "300000")]),
        &[],
    );
    let mut c = Client::new_session(&node.ws_url()).await;
    let big = "x".repeat(60_000);
    let mut accepted = 0;
    let refused = loop {
        let r = c
            .op("emit", json!({"body": big, "delay_ms": 3_600_000}))
            .await;
        if r["ok"] != true {
            break r;
        }
        accepted += 1;
        assert!(accepted < 10, "never refused");
    };
    assert_eq!(refused["error"]["code"], "too_large", "{refused}");
    assert_eq!(accepted, 4, "4 x 60 KB fit in 300 KB");
    // The stored checkpoint respects the bound.
    let sid = c.session.clone().unwrap();
    let len: u64 = redis::cmd("STRLEN")
        .arg(format!("berth:{{{sid}}}:ck"))
        .query(&mut redis.conn())
        .unwrap();
    assert!(len <= 300_000 && len > 240_000, "{len}");
    // The session goes on: a small write still works.
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
}
