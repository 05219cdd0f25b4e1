//! Messages between actors against real processes: the probe application
//! (`tests/apps/probe.rs`) sends `count` messages from a session to a
//! `tally` entity, which checks their order and reports back; Redis is real,
//! and the node is SIGKILLed in the middle of the traffic.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::app::probe_schema;
use crate::common::*;

/// Sends op `id` and reads until its result; events read meanwhile are
/// kept in `events` (by seq, so a replay is not counted twice).
async fn op(
    c: &mut Client,
    id: u64,
    name: &str,
    args: Value,
    events: &mut BTreeMap<u64, Value>,
) -> Value {
    c.send(json!({"type":"op","id":id,"op":name,"args":args}))
        .await;
    loop {
        let v = c.recv_json().await;
        match v["type"].as_str() {
            Some("event") => {
                events.insert(v["seq"].as_u64().unwrap(), v["body"].clone());
            }
            Some("result") if v["id"] == id => return v,
            _ => panic!("unexpected frame {v}"),
        }
    }
}

/// The tally's reports among `events`: (total, last, disorder).
fn reports(events: &BTreeMap<u64, Value>) -> Vec<(u64, u64, u64)> {
    events
        .values()
        .map(|b| {
            (
                b["total"].as_u64().unwrap(),
                b["last"].as_u64().unwrap(),
                b["disorder"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The reports of 10 ops of 50 messages each, every message once, in order.
fn want() -> Vec<(u64, u64, u64)> {
    (1..=10).map(|k| (k * 50, k * 50, 0)).collect()
}

/// Reads events until `done` holds for the collected ones, within 20 s.
async fn events_until(
    c: &mut Client,
    events: &mut BTreeMap<u64, Value>,
    done: impl Fn(&BTreeMap<u64, Value>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done(events) {
        let v = tokio::time::timeout_at(deadline, c.recv_json())
            .await
            .unwrap_or_else(|_| panic!("events so far: {events:?}"));
        if v["type"] == "event" {
            events.insert(v["seq"].as_u64().unwrap(), v["body"].clone());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_an_entity_arrive_once_in_order_across_a_sigkill_of_their_node() {
    let redis = Redis::start();
    let mut node = probe_schema(&redis, "2", &[]);
    let mut c = Client::new_session(&node.ws_url()).await;
    let (session, token) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    let mut events = BTreeMap::new();
    // 10 ops of 50 messages each; each op's last message asks for a report.
    let tell = |k: u64| json!({"to": "tally/t", "from": k * 50 + 1, "n": 50});
    for k in 0..5 {
        let r = op(&mut c, k + 1, "tell", tell(k), &mut events).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    // Killed while the last op's messages are committed and on their way.
    node.kill9();
    let node = probe_schema(&redis, "2", &[]);
    let (mut c, w) = Client::resume(&node.ws_url(), &session, &token, 0).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["last_op"], 5, "{w}");
    for k in 5..10 {
        let r = op(&mut c, k + 1, "tell", tell(k), &mut events).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let got = tokio::time::timeout(
        std::time::Duration::from_secs(8),
        events_until(&mut c, &mut events, |e| {
            e.values().any(|b| b["last"] == 500)
        }),
    )
    .await;
    if got.is_err() {
        panic!("no final report; events {events:?}\nlog:\n{}", node.log());
    }
    // Every report once: the tally saw each message exactly once, in order.
    let reports = reports(&events);
    assert_eq!(reports, want(), "reports in order, one per op, no disorder");
    assert_eq!(
        reports.iter().map(|r| r.0).max(),
        Some(500),
        "500 messages counted, none twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_an_ended_session_comes_back_and_a_full_queue_refuses_the_send() {
    let redis = Redis::start();
    let node = probe_schema(&redis, "2", &[("BERTH__LIMITS__MAX_OUTGOING", "10")]);
    let mut c = Client::new_session(&node.ws_url()).await;
    let mut events = BTreeMap::new();

    // A session that ended: its `bye` deleted it.
    let mut gone = Client::new_session(&node.ws_url()).await;
    let gone_id = gone.session.clone().unwrap();
    let r = op(&mut gone, 1, "add", json!({"by": 1}), &mut BTreeMap::new()).await;
    assert_eq!(r["ok"], true, "{r}");
    gone.send(json!({"type": "bye"})).await;
    assert_eq!(gone.recv_close().await, Some(1000));

    let r = op(
        &mut c,
        1,
        "tell",
        json!({"to": gone_id, "from": 1, "n": 2}),
        &mut events,
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    events_until(&mut c, &mut events, |e| e.len() >= 2).await;
    for b in events.values() {
        assert_eq!(b["bounced"], gone_id.as_str(), "{b}");
        assert_eq!(b["why"], "Gone", "{b}");
    }

    // An entity kind nobody registered comes back too.
    let r = op(
        &mut c,
        2,
        "tell",
        json!({"to": "nosuch/x", "from": 1, "n": 1}),
        &mut events,
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    events_until(&mut c, &mut events, |e| e.len() >= 3).await;
    assert_eq!(events.values().last().unwrap()["why"], "UnknownKind");

    // More than limits.max_outgoing in one handler: the send fails, the
    // handler returns the error, nothing is committed.
    let r = op(
        &mut c,
        3,
        "tell",
        json!({"to": "tally/q", "from": 1, "n": 11}),
        &mut events,
    )
    .await;
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    let g = op(&mut c, 4, "get", Value::Null, &mut events).await;
    assert_eq!(r["version"], g["version"], "nothing committed: {r} {g}");
    // A bad address is the handler's own bad_args.
    let r = op(
        &mut c,
        4,
        "tell",
        json!({"to": "Not An Address", "from": 1, "n": 1}),
        &mut events,
    )
    .await;
    assert_eq!(r["error"]["code"], "bad_args", "{r}");
}

/// Runs op `id` until it is applied: `unavailable` (an owner moving or
/// dead) is retried with the same id, on a new connection when the old one
/// closed. Answers the client to go on with.
async fn op_applied(
    mut c: Client,
    url: &str,
    creds: &(String, String),
    id: u64,
    args: Value,
    events: &mut BTreeMap<u64, Value>,
) -> Client {
    for _ in 0..60 {
        let sent = c
            .ws_send(json!({"type":"op","id":id,"op":"tell","args":args}))
            .await;
        if sent {
            loop {
                match c.recv().await {
                    Got::Json(v) if v["type"] == "event" => {
                        events.insert(v["seq"].as_u64().unwrap(), v["body"].clone());
                    }
                    Got::Json(v) if v["type"] == "result" && v["id"] == id => {
                        if v["ok"] == true {
                            return c;
                        }
                        assert_eq!(v["error"]["code"], "unavailable", "{v}");
                        break;
                    }
                    Got::Json(_) => {}
                    _ => break, // closed: resume below
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let (c2, w) = Client::resume(url, &creds.0, &creds.1, 0).await;
        if w["type"] == "welcome" {
            c = c2;
        }
    }
    panic!("op {id} of {} never applied", creds.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_across_nodes_arrive_once_in_order_when_the_receivers_and_the_senders_owner_are_killed(
) {
    use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
    let consul = Consul::start();
    let redis = Redis::start();
    let mut nodes: Vec<Berth> = ["a", "b", "c"]
        .iter()
        .map(|id| {
            let mut env = cluster_env(&consul, &redis, id);
            env.push(("BERTH__CLUSTER__TTL_MS".into(), "1000".into()));
            crate::app::probe(&env)
        })
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &["a", "b", "c"]).await;
    let ring = Ring::new(
        ["a", "b", "c"].iter().map(|m| MemberId(m.to_string())),
        DEFAULT_VNODES,
    );
    let owner = |key: &str| ring.owner(key).unwrap().as_str().to_owned();
    // A tally owned by b (killed first) and one owned by a (never killed).
    let on = |node: &str| {
        (0..1000)
            .map(|i| format!("tally/k{i}"))
            .find(|k| owner(k) == node)
            .unwrap()
    };
    let (t_b, t_a) = (on("b"), on("a"));
    // S1 owned by a, sending to b's tally; S2 owned by c (killed second),
    // sending to a's tally. Both clients connect through a.
    let url = nodes[0].ws_url();
    let (mut s1, mut s2) = (None, None);
    for _ in 0..200 {
        let c = Client::new_session(&url).await;
        let id = c.session.clone().unwrap();
        match owner(&id).as_str() {
            "a" if s1.is_none() => s1 = Some(c),
            "c" if s2.is_none() => s2 = Some(c),
            _ => {}
        }
        if s1.is_some() && s2.is_some() {
            break;
        }
    }
    let (mut c1, mut c2) = (s1.unwrap(), s2.unwrap());
    let creds1 = (c1.session.clone().unwrap(), c1.token.clone().unwrap());
    let creds2 = (c2.session.clone().unwrap(), c2.token.clone().unwrap());
    let (mut ev1, mut ev2) = (BTreeMap::new(), BTreeMap::new());
    let tell = |to: &str, k: u64| json!({"to": to, "from": k * 50 + 1, "n": 50});
    for k in 0..10u64 {
        if k == 3 {
            nodes[1].kill9(); // the receiver's owner of S1's messages
            converge(&[&nodes[0], &nodes[2]], &["a", "c"]).await;
        }
        if k == 6 {
            nodes[2].kill9(); // S2's owner, the sender
            converge(&[&nodes[0]], &["a"]).await;
        }
        c1 = op_applied(c1, &url, &creds1, k + 1, tell(&t_b, k), &mut ev1).await;
        c2 = op_applied(c2, &url, &creds2, k + 1, tell(&t_a, k), &mut ev2).await;
    }
    for (c, ev, creds) in [(&mut c1, &mut ev1, &creds1), (&mut c2, &mut ev2, &creds2)] {
        let done = |e: &BTreeMap<u64, Value>| e.values().any(|b| b["last"] == 500);
        if !done(ev) {
            // Reports still on their way: read them (on a fresh connection,
            // which replays every unacknowledged one).
            let (mut fresh, w) = Client::resume(&url, &creds.0, &creds.1, 0).await;
            assert_eq!(w["type"], "welcome", "{w}");
            events_until(&mut fresh, ev, done).await;
            *c = fresh;
        }
        assert_eq!(
            reports(ev),
            want(),
            "{}: every message once, in order",
            creds.0
        );
    }
}
