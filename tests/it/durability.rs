//! What survives: a killed node, a Redis outage, a stale activation.

use std::sync::atomic::Ordering;
use std::time::Duration;

use berth_actors::ids::SessionId;
use berth_actors::store::redis::{RedisStore, RedisStoreConfig};
use berth_actors::store::{CheckpointStore, StoreError};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn kill_9_then_resume_on_a_new_node_keeps_everything_acknowledged() {
    let redis = Redis::start();
    let mut a = Berth::start_redis(&redis.url());
    let mut c = Client::new_session(&a.ws_url()).await;
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    c.op("set", json!({"key":"name","value":"berth"})).await;
    for _ in 0..5 {
        c.op("incr", json!({"key":"n"})).await;
    }
    // Two events, one received and one scheduled for later, none acknowledged.
    c.op_with_id(7, "emit", json!({"body":"now"})).await;
    let last = c
        .op_with_id(8, "emit", json!({"body":"later","delay_ms":200}))
        .await;
    assert_eq!(last["version"], 8);
    a.kill9();

    let b = Berth::start_redis(&redis.url());
    let (mut c, w) = Client::resume(&b.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["resumed"], true);
    assert_eq!(w["version"], 8, "{w}");
    assert_eq!(w["last_op"], 8);
    assert_eq!(w["node"], b.node);
    assert_eq!(
        c.recv_json().await,
        json!({"type":"event","seq":1,"body":"now"})
    );
    assert_eq!(
        c.recv_json().await,
        json!({"type":"event","seq":2,"body":"later"})
    );
    // The retried last op is still deduplicated on the new node, with its result.
    let retry = c
        .op_with_id(8, "emit", json!({"body":"later","delay_ms":200}))
        .await;
    assert_eq!(
        (retry["value"].clone(), retry["duplicate"].clone()),
        (json!(2), json!(true))
    );
    c.set_next_id(9);
    assert_eq!(
        c.op("state", json!({})).await["value"],
        json!({"name":"berth","n":5})
    );
}

#[tokio::test]
async fn redis_outage_answers_unavailable_and_loses_nothing() {
    let mut redis = Redis::start_persistent();
    let node = Berth::start_redis(&redis.url());
    let mut c = Client::new_session(&node.ws_url()).await;
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    assert_eq!(
        c.op_with_id(1, "incr", json!({"key":"n"})).await["value"],
        1
    );
    eventually("ready", || node.admin_get("/health/ready").0 == 200).await;

    redis.stop();
    let r = c.op_with_id(2, "incr", json!({"key":"n"})).await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    eventually("not ready while Redis is down", || {
        let (s, body) = node.admin_get("/health/ready");
        s == 503 && body.contains("store unreachable")
    })
    .await;
    // Reads still answer from memory.
    assert_eq!(c.op_with_id(3, "get", json!({"key":"n"})).await["value"], 1);

    redis.restart();
    eventually("ready again", || node.admin_get("/health/ready").0 == 200).await;
    // The same id, retried, is applied exactly once.
    let r = c.op_until_ok(4, "incr", json!({"key":"n"}), 21).await;
    assert_eq!(r["value"], 2, "{r}");
    drop(c);
    drop(node);

    // Everything acknowledged is in Redis: a fresh node reads it back.
    let fresh = Berth::start_redis(&redis.url());
    let (mut c, w) = Client::resume(&fresh.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["last_op"], 4);
    c.set_next_id(5);
    assert_eq!(c.op("get", json!({"key":"n"})).await["value"], 2);
}

/// A resuming `hello` waits for the store (retried for `cluster.hold_ms`);
/// its client gives up and closes the socket. The edge stops with it: the
/// session is not activated for nobody once Redis is back, so a late attach
/// can never take the session from the client's next connection (4000).
#[tokio::test]
async fn a_hello_whose_client_left_is_not_attached_later() {
    let mut redis = Redis::start_persistent();
    let env = env_with(&redis, &[("BERTH__CLUSTER__HOLD_MS", "20000")]);
    let node = Berth::start_with(&env, &[]);
    let mut c = Client::new_session(&node.ws_url()).await;
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
    drop(c);
    drop(node);
    // A fresh node: the session is only in Redis.
    let node = Berth::start_with(&env, &[]);
    eventually("ready", || node.admin_get("/health/ready").0 == 200).await;

    redis.stop();
    let mut gone = Client::connect(&node.ws_url()).await;
    gone.send(json!({"type":"hello","session":sid,"token":tok,"ack":0}))
        .await;
    // The attach is being retried (each try fails to load from Redis)...
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ...and a `ping` is answered meanwhile.
    gone.send(json!({"type":"ping","id":5})).await;
    assert_eq!(gone.recv_json().await, json!({"type":"pong","id":5}));
    // ...when the client goes away.
    drop(gone);
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    eventually("ready again", || node.admin_get("/health/ready").0 == 200).await;
    // Far more than the 50 ms between tries, far less than the hold time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        node.metric("berth_activations_total"),
        0.0,
        "the abandoned hello went on and activated the session"
    );
    assert_eq!(node.metric("berth_sessions_live"), 0.0);

    // The client's next connection resumes, and keeps the session.
    let (mut c, w) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["last_op"], 1, "{w}");
    c.set_next_id(2);
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 2);
    assert_eq!(node.metric("berth_activations_total"), 1.0);
}

/// A checkpoint the primary applied but no replica confirmed (`WAIT`) is
/// answered `unavailable`: the node cannot know whether it landed. Its actor
/// re-activates itself from the store before it writes again, so a write
/// that did land is never undone by the next one (nor can a late write of
/// the old epoch land after it: the reload took a new epoch).
#[tokio::test]
async fn a_checkpoint_of_unknown_outcome_is_never_undone_by_the_next_write() {
    let primary = Redis::start();
    let mut replica = Redis::start_replica_of(&primary);
    let env = env_with(
        &primary,
        &[
            ("BERTH__STORE__WAIT_REPLICAS", "1"),
            // WAIT gets half of it: room for a replica on a loaded machine.
            ("BERTH__STORE__OP_TIMEOUT_MS", "2000"),
        ],
    );
    let node = Berth::start_with(&env, &[]);
    let mut c = Client::new_session(&node.ws_url()).await;
    // With the replica there (retried: under load even its WAIT may fall
    // short, which is this test's subject, answered `unavailable`).
    let r = c.op_until_ok(1, "incr", json!({"key":"n"}), 20).await;
    assert_eq!(r["value"], 1, "{r}");

    replica.stop();
    let r = c.op_with_id(2, "incr", json!({"key":"n"})).await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    eventually("the actor re-activated itself from the store", || {
        node.metric("berth_reloads_total") >= 1.0
    })
    .await;
    replica.restart();
    primary.wait_replicas_online(1);

    // The client moves on with a new op: it builds on op 2, which the
    // primary holds (while the replica was away, any attempt may land on
    // the primary only: retried with the same id, it is answered once).
    let r = c.op_until_ok(3, "incr", json!({"key":"n"}), 31).await;
    assert_eq!(
        r["value"], 3,
        "op 2 reached the primary: the next write must build on it, not undo it: {r}"
    );
    assert_eq!(c.op_with_id(4, "get", json!({"key":"n"})).await["value"], 3);
}

/// A doubtful actor (its checkpoint's outcome unknown, Redis down) whose
/// session another activation took meanwhile does not take it back by
/// reloading: it reads the epoch first, stops as superseded, and the client
/// resumes on the newer activation with nothing lost or applied twice.
#[tokio::test]
async fn a_doubtful_actor_never_reloads_over_a_newer_activation() {
    let mut redis = Redis::start_persistent();
    let node = Berth::start_redis(&redis.url());
    let mut c = Client::new_session(&node.ws_url()).await;
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    assert_eq!(
        c.op_with_id(1, "incr", json!({"key":"n"})).await["value"],
        1
    );
    redis.stop();
    let r = c.op_with_id(2, "incr", json!({"key":"n"})).await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    // Its reloads fail meanwhile; their backoff grows.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    // Another activation takes the session (as a handoff that raced the
    // failed write would): its epoch is newer than the actor's.
    let key = format!("berth:{{{sid}}}:ep");
    let newer: u64 = ::redis::cmd("INCR")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    // The client retries: the actor checks the epoch, finds the newer one
    // and stops (1012); it neither takes the epoch back nor serves.
    let r = c.op_with_id(2, "incr", json!({"key":"n"})).await;
    assert_ne!(r["ok"], true, "the stale actor served: {r}");
    node.wait_log("a newer activation owns this session");
    let stored: u64 = ::redis::cmd("GET")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(stored, newer, "the stale actor did not take an epoch");
    // The client resumes: a new activation, op 2 applied once.
    let (mut c, w) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["last_op"], 1, "{w}");
    let r = c.op_until_ok(2, "incr", json!({"key":"n"}), 21).await;
    assert_eq!(r["value"], 2, "{r}");
}

#[tokio::test]
async fn node_starts_while_redis_is_down_and_recovers() {
    let mut redis = Redis::start();
    let url = redis.url();
    redis.stop();
    let node = Berth::start_redis(&url);
    eventually("not ready", || node.admin_get("/health/ready").0 == 503).await;
    let mut c = Client::connect(&node.ws_url()).await;
    let w = c.hello(None, None, 0).await;
    assert_eq!(w["code"], "unavailable", "{w}");
    assert_eq!(c.recv_close().await, Some(1013));
    redis.restart();
    eventually("ready", || node.admin_get("/health/ready").0 == 200).await;
    let mut c = Client::new_session(&node.ws_url()).await;
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
}

fn store_config(redis: &Redis) -> RedisStoreConfig {
    RedisStoreConfig {
        url: redis.url(),
        key_prefix: "berth".into(),
        session_ttl: Duration::from_secs(60),
        op_timeout: Duration::from_secs(2),
        batch_max: 16,
        batch_delay: Duration::ZERO,
        max_inflight: 2,
        wait_replicas: 0,
    }
}

fn store(redis: &Redis) -> RedisStore {
    RedisStore::new(store_config(redis)).unwrap()
}

#[tokio::test]
async fn redis_refuses_writes_with_an_older_epoch() {
    let redis = Redis::start();
    let s = store(&redis);
    let id = SessionId::random();
    assert_eq!(
        s.activate(&id).await.unwrap(),
        None,
        "unknown session takes no epoch"
    );
    let e1 = s.create(&id).await.unwrap();
    s.save(&id, e1, b"v1".to_vec()).await.unwrap();
    let a = s.activate(&id).await.unwrap().unwrap();
    assert!(a.epoch > e1);
    assert_eq!(a.checkpoint, b"v1");
    match s.save(&id, e1, b"stale".to_vec()).await {
        Err(StoreError::Fenced { stored, ours }) => assert_eq!((stored, ours), (a.epoch, e1)),
        other => panic!("stale write accepted: {other:?}"),
    }
    s.save(&id, a.epoch, b"v2".to_vec()).await.unwrap();
    assert!(matches!(
        s.delete(&id, e1).await,
        Err(StoreError::Fenced { .. })
    ));
    // Keys carry the session's hash tag (Redis Cluster: one slot per session).
    let mut conn = redis.conn();
    let v: Vec<u8> = redis::cmd("GET")
        .arg(format!("berth:{{{id}}}:ck"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(v, b"v2");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("berth:{{{id}}}:ep"))
        .query(&mut conn)
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 60_000,
        "epoch expires with the session: {ttl}"
    );
    // Delete leaves a tombstone epoch: the deleting writer cannot resurrect it.
    s.delete(&id, a.epoch).await.unwrap();
    assert_eq!(s.activate(&id).await.unwrap(), None);
    assert!(matches!(
        s.save(&id, a.epoch, b"zombie".to_vec()).await,
        Err(StoreError::Fenced { .. })
    ));
}

#[tokio::test]
async fn a_save_after_redis_forgot_its_scripts_reloads_them_and_succeeds() {
    // Redis forgets scripts on restart (and on SCRIPT FLUSH): the batch's
    // NOSCRIPT answer (by its error kind, not its text) makes the store load
    // the script and send the batch again, once.
    let redis = Redis::start();
    let s = store(&redis);
    let id = SessionId::random();
    let e = s.create(&id).await.unwrap();
    s.save(&id, e, b"v1".to_vec()).await.unwrap();
    let mut conn = redis.conn();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
    s.save(&id, e, b"v2".to_vec())
        .await
        .expect("the first save after SCRIPT FLUSH succeeds");
    let v: Vec<u8> = redis::cmd("GET")
        .arg(format!("berth:{{{id}}}:ck"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(v, b"v2");
}

#[tokio::test]
async fn concurrent_saves_are_group_committed() {
    let redis = Redis::start();
    let s = RedisStore::new(RedisStoreConfig {
        batch_delay: Duration::from_millis(2),
        ..store_config(&redis)
    })
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..200 {
        let id = SessionId::random();
        let e = s.create(&id).await.unwrap();
        ids.push((id, e));
    }
    let saves = ids
        .iter()
        .map(|(id, e)| s.save(id, *e, id.as_str().as_bytes().to_vec()));
    for r in futures_util::future::join_all(saves).await {
        r.unwrap();
    }
    let stats = s.batch_stats();
    let (batches, writes) = (
        stats.batches.load(Ordering::Relaxed),
        stats.writes.load(Ordering::Relaxed),
    );
    assert_eq!(writes, 200);
    assert!(
        batches <= 40,
        "200 concurrent writes went out in {batches} pipelines"
    );
    for (id, _) in &ids {
        let a = s.activate(id).await.unwrap().unwrap();
        assert_eq!(a.checkpoint, id.as_str().as_bytes());
    }
}

#[tokio::test]
async fn a_superseded_actor_stops_at_its_next_write_and_closes_1012() {
    // Two nodes on one Redis both activate the same session (as two nodes that
    // disagree about membership would): only the newer activation's writes land.
    let redis = Redis::start();
    let a = Berth::start_redis(&redis.url());
    let b = Berth::start_redis(&redis.url());
    let mut on_a = Client::new_session(&a.ws_url()).await;
    let (sid, tok) = (on_a.session.clone().unwrap(), on_a.token.clone().unwrap());
    assert_eq!(
        on_a.op_with_id(1, "incr", json!({"key":"n"})).await["value"],
        1
    );

    let (mut on_b, w) = Client::resume(&b.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["last_op"], 1);
    assert_eq!(
        on_b.op_with_id(2, "incr", json!({"key":"n","by":10})).await["value"],
        11
    );

    // Node A's actor still thinks it owns the session: its write is fenced.
    let r = on_a
        .op_with_id(2, "incr", json!({"key":"n","by":100}))
        .await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    assert_eq!(on_a.recv_close().await, Some(1012));
    assert_eq!(
        on_b.op_with_id(3, "get", json!({"key":"n"})).await["value"],
        11
    );
    drop(on_b);

    let c = Berth::start_redis(&redis.url());
    let (mut check, _) = Client::resume(&c.ws_url(), &sid, &tok, 0).await;
    assert_eq!(
        check.op_with_id(4, "get", json!({"key":"n"})).await["value"],
        11,
        "the fenced write never landed"
    );
}

#[tokio::test]
async fn unreadable_checkpoint_answers_internal_and_1011() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let c = Client::new_session(&node.ws_url()).await;
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    drop(c);
    drop(node);
    // A checkpoint from a future format (99), then plain garbage.
    let mut conn = redis.conn();
    let key = format!("berth:{{{sid}}}:ck");
    for bytes in [vec![99u8, 1, 2, 3], b"garbage".to_vec()] {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(bytes)
            .query(&mut conn)
            .unwrap();
        let node = Berth::start_redis(&redis.url());
        let (mut c, w) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
        assert_eq!(w["code"], "internal", "{w}");
        assert_eq!(c.recv_close().await, Some(1011));
        node.wait_log("stored checkpoint is unreadable");
    }
}

#[tokio::test]
async fn idle_sessions_expire_from_the_store() {
    let redis = Redis::start();
    let mut env = base_env();
    env.push(("BERTH__STORE__REDIS_URL".into(), redis.url()));
    env.push(("BERTH__STORE__SESSION_TTL_S".into(), "2".into()));
    env.push(("BERTH__SESSION__DETACH_TIMEOUT_S".into(), "1".into()));
    let node = Berth::start_with(&env, &[]);
    let mut c = Client::new_session(&node.ws_url()).await;
    c.op("set", json!({"key":"a","value":1})).await;
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    drop(c);
    let mut conn = redis.conn();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("berth:{{{sid}}}:ck"))
        .query(&mut conn)
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 2_000,
        "checkpoint carries the session TTL: {ttl}"
    );
    // Passivated after 1 s (the final checkpoint refreshes the TTL), expired 2 s later.
    tokio::time::sleep(Duration::from_millis(3_600)).await;
    let (mut c, w) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["code"], "session_not_found", "{w}");
    assert_eq!(c.recv_close().await, Some(4004));
}

#[tokio::test]
async fn a_full_outbox_refuses_emit_until_acked() {
    let redis = Redis::start();
    let mut env = base_env();
    env.push(("BERTH__STORE__REDIS_URL".into(), redis.url()));
    env.push(("BERTH__LIMITS__OUTBOX_MAX".into(), "2".into()));
    let node = Berth::start_with(&env, &[]);
    let mut c = Client::new_session(&node.ws_url()).await;
    for id in 1..=2u64 {
        c.send(json!({"type":"op","id":id,"op":"emit","args":{"body":id}}))
            .await;
        let [event, _] = c.recv_event_and_result().await;
        assert_eq!(event["seq"], id);
    }
    let r = c.op_with_id(3, "emit", json!({"body":3})).await;
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    c.send(json!({"type":"ack","seq":2})).await;
    c.send(json!({"type":"op","id":3,"op":"emit","args":{"body":3}}))
        .await;
    let [event, result] = c.recv_event_and_result().await;
    assert_eq!(
        (event["seq"].clone(), result["value"].clone()),
        (json!(3), json!(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_and_nothing_acknowledged_is_lost() {
    let mut set = SentinelSet::start();
    let mut env = base_env();
    env.push(("BERTH__STORE__REDIS_URL".into(), set.url()));
    env.push(("BERTH__STORE__WAIT_REPLICAS".into(), "1".into()));
    let node = Berth::start_with(&env, &[]);
    eventually("ready through sentinel", || {
        node.admin_get("/health/ready").0 == 200
    })
    .await;
    let mut c = Client::new_session(&node.ws_url()).await;
    for i in 1..=10u64 {
        assert_eq!(
            c.op_with_id(i, "incr", json!({"key":"n"})).await["value"],
            i
        );
    }
    // The primary dies; Sentinel promotes a replica; berth must follow it.
    set.primary.stop();
    let started = std::time::Instant::now();
    let mut r = c.op_with_id(11, "incr", json!({"key":"n"})).await;
    while r["ok"] != true {
        assert_eq!(r["error"]["code"], "unavailable", "{r}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "berth never followed the promoted primary"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        r = c.op_with_id(11, "incr", json!({"key":"n"})).await;
    }
    eprintln!(
        "served again {:?} after the primary was killed",
        started.elapsed()
    );
    assert_eq!(
        r["value"], 11,
        "every acknowledged incr survived the failover: {r}"
    );
    node.wait_log("redis primary (from sentinel)");
    // A fresh node reads the same state from the new primary.
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    drop(c);
    drop(node);
    let fresh = Berth::start_with(&env, &[]);
    eventually("fresh node ready", || {
        fresh.admin_get("/health/ready").0 == 200
    })
    .await;
    let (mut c, w) = Client::resume(&fresh.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["last_op"], 11, "{w}");
    assert_eq!(
        c.op_with_id(12, "get", json!({"key":"n"})).await["value"],
        11
    );
}

/// Regression (found by the container suite's partition phase): an actor that
/// outlived a partition while another node took its session over served its
/// stale memory to the next client that attached to it.
#[tokio::test]
async fn a_stale_actor_left_behind_never_serves_old_state() {
    let redis = Redis::start();
    let mut env = base_env();
    env.push(("BERTH__STORE__REDIS_URL".into(), redis.url()));
    env.push(("BERTH__CLUSTER__TTL_MS".into(), "200".into())); // the lease
    let a = Berth::start_with(&env, &[]);
    let b = Berth::start_with(&env, &[]);
    let mut on_a = Client::new_session(&a.ws_url()).await;
    let (sid, tok) = (on_a.session.clone().unwrap(), on_a.token.clone().unwrap());
    assert_eq!(
        on_a.op_with_id(1, "incr", json!({"key":"n"})).await["value"],
        1
    );
    drop(on_a); // the actor stays live on A (detached)
                // B takes the session over and writes.
    let (mut on_b, _) = Client::resume(&b.ws_url(), &sid, &tok, 0).await;
    assert_eq!(
        on_b.op_with_id(2, "incr", json!({"key":"n","by":10})).await["value"],
        11
    );
    drop(on_b);
    tokio::time::sleep(Duration::from_millis(300)).await; // past the lease
                                                          // Back on A: the live but stale actor must not answer.
    let (mut again, w) = Client::resume(&a.ws_url(), &sid, &tok, 0).await;
    assert_eq!(
        w["last_op"], 2,
        "welcome from fresh state, not the stale actor: {w}"
    );
    assert_eq!(
        again.op_with_id(3, "get", json!({"key":"n"})).await["value"],
        11
    );
    a.wait_log("a newer activation exists");
}
