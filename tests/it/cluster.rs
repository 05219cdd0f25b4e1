//! Multi-node: real Consul, real Redis, real berth processes, real clients.

use std::time::{Duration, Instant};

use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
use serde_json::{json, Value};

use crate::common::*;

/// Nodes a, b and c on one Consul and one Redis, once they all see each other.
async fn three_nodes(consul: &Consul, redis: &Redis) -> Vec<Berth> {
    let nodes: Vec<Berth> = ["a", "b", "c"]
        .iter()
        .map(|id| Berth::start_with(&cluster_env(consul, redis, id), &[]))
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &["a", "b", "c"]).await;
    nodes
}

/// Nodes a and b with a static member list (no Consul), with `extra` settings.
fn static_pair(redis: &Redis, extra: &[(&str, &str)]) -> (Berth, Berth) {
    static_pair_with(redis, extra, &[], &[])
}

/// As [`static_pair`], with settings for `a` alone and for `b` alone too.
fn static_pair_with(
    redis: &Redis,
    extra: &[(&str, &str)],
    only_a: &[(String, String)],
    only_b: &[(String, String)],
) -> (Berth, Berth) {
    let (pa, pb) = (free_port(), free_port());
    let members = format!("a=127.0.0.1:{pa},b=127.0.0.1:{pb}");
    let env = |id: &str, port: u16, only: &[(String, String)]| {
        let mut env = base_env();
        env.extend([
            ("BERTH__STORE__REDIS_URL".to_string(), redis.url()),
            ("BERTH__CLUSTER__NODE_ID".into(), id.into()),
            ("BERTH__CLUSTER__MEMBERS".into(), members.clone()),
            (
                "BERTH__CLUSTER__PEER_LISTEN".into(),
                format!("127.0.0.1:{port}"),
            ),
            ("BERTH__CLUSTER__SECRET".into(), SECRET.into()),
        ]);
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env.extend(only.iter().cloned());
        env
    };
    (
        Berth::start_with(&env("a", pa, only_a), &[]),
        Berth::start_with(&env("b", pb, only_b), &[]),
    )
}

fn ring(ids: &[&str]) -> Ring {
    Ring::new(ids.iter().map(|s| MemberId(s.to_string())), DEFAULT_VNODES)
}

/// Drives `clients` with `incr` ops, one at a time each, until `stop` is set;
/// answers each client with the number of acknowledged increments and the
/// longest time any op waited.
async fn traffic(
    clients: Vec<Client>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(Client, u64, Duration)> {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut acked = 0;
                let mut worst = Duration::ZERO;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = c.op("incr", json!({"key":"n"})).await;
                    worst = worst.max(t.elapsed());
                    assert_eq!(r["ok"], true, "every op is answered ok under traffic: {r}");
                    acked += 1;
                    assert_eq!(
                        r["value"], acked,
                        "nothing lost, nothing applied twice: {r}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (c, acked, worst)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

fn pct(sorted: &[u128], q: f64) -> u128 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_serve_every_session_through_every_node_from_its_owner() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let nodes = three_nodes(&consul, &redis).await;
    let ring = ring(&["a", "b", "c"]);
    let mut owners = std::collections::BTreeMap::new();
    for i in 0..30u64 {
        let mut c = Client::new_session(&nodes[0].ws_url()).await;
        let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
        let owner = ring.owner(&sid).unwrap().to_string();
        *owners.entry(owner.clone()).or_insert(0) += 1;
        assert_eq!(c.op("set", json!({"key":"i","value":i})).await["ok"], true);
        drop(c);
        // Through each node in turn: the session answers from its owner.
        let mut next = 2;
        for n in &nodes {
            let (mut c, w) = Client::resume(&n.ws_url(), &sid, &tok, 0).await;
            assert_eq!(
                w["node"],
                owner.as_str(),
                "welcome comes from the ring's owner: {w}"
            );
            c.set_next_id(next);
            let r = c.op("incr", json!({"key":"n"})).await;
            assert_eq!(r["ok"], true, "{r}");
            next += 1;
        }
        let (mut c, _) = Client::resume(&nodes[1].ws_url(), &sid, &tok, 0).await;
        c.set_next_id(next);
        assert_eq!(
            c.op("state", json!({})).await["value"],
            json!({"i": i, "n": 3})
        );
    }
    assert_eq!(
        owners.len(),
        3,
        "sessions spread over all members: {owners:?}"
    );
    let forwarded: u64 = nodes
        .iter()
        .map(|n| n.cluster()["members"].as_array().unwrap().len() as u64)
        .sum();
    assert_eq!(forwarded, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_owner_under_traffic_fails_over_with_nothing_lost() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let mut nodes = three_nodes(&consul, &redis).await;
    let ring = ring(&["a", "b", "c"]);
    // Clients on a and b; sessions owned everywhere; node c will die.
    let mut clients = Vec::new();
    let mut owned_by_c = std::collections::HashSet::new();
    // More sessions for a measurement run: BERTH_IT_FAILOVER_SESSIONS=600.
    let sessions: usize = std::env::var("BERTH_IT_FAILOVER_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    for i in 0..sessions {
        let c = Client::new_session(&nodes[i % 2].ws_url()).await;
        if ring.owner(c.session.as_deref().unwrap()).unwrap().as_str() == "c" {
            owned_by_c.insert(c.session.clone().unwrap());
        }
        clients.push(c);
    }
    assert!(
        owned_by_c.len() >= 10,
        "enough sessions owned by the victim: {}",
        owned_by_c.len()
    );
    let stop = stop_flag();
    let running = tokio::spawn(traffic(clients, stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[2].kill9();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = running.await.unwrap();
    let mut windows: Vec<u128> = results
        .iter()
        .filter(|(c, _, _)| owned_by_c.contains(c.session.as_deref().unwrap()))
        .map(|(_, _, worst)| worst.as_millis())
        .collect();
    windows.sort();
    eprintln!(
        "failover under traffic over {} sessions (longest op wait, SIGKILL at TTL 1 s): p50 {} ms, p99 {} ms, max {} ms",
        windows.len(),
        pct(&windows, 0.5),
        pct(&windows, 0.99),
        windows.last().unwrap()
    );
    assert!(
        *windows.last().unwrap() < 5_000,
        "held ops were served within the hold time"
    );
    converge(&[&nodes[0], &nodes[1]], &["a", "b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_under_traffic_takes_only_its_sessions_and_no_connection_closes() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let a = Berth::start_with(&cluster_env(&consul, &redis, "a"), &[]);
    let b = Berth::start_with(&cluster_env(&consul, &redis, "b"), &[]);
    converge(&[&a, &b], &["a", "b"]).await;
    let mut clients = Vec::new();
    for i in 0..60 {
        let edge = if i % 2 == 0 { &a } else { &b };
        clients.push(Client::new_session(&edge.ws_url()).await);
    }
    let stop = stop_flag();
    let running = tokio::spawn(traffic(clients, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = Berth::start_with(&cluster_env(&consul, &redis, "c"), &[]);
    converge(&[&a, &b, &c], &["a", "b", "c"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = running.await.unwrap();
    let before = ring(&["a", "b"]);
    let after = ring(&["a", "b", "c"]);
    let mut moved = 0u64;
    let mut worst = Duration::ZERO;
    for (cl, acked, w) in results {
        assert!(acked > 5, "traffic flowed: {acked}");
        worst = worst.max(w);
        let sid = cl.session.clone().unwrap();
        let (o1, o2) = (
            before.owner(&sid).unwrap().clone(),
            after.owner(&sid).unwrap().clone(),
        );
        if o1 != o2 {
            assert_eq!(o2.as_str(), "c", "a key moves only onto the new member");
            moved += 1;
        }
    }
    eprintln!(
        "join under traffic: {moved} of 60 sessions moved (ideal 1/3 = 20); slowest op {worst:?}"
    );
    assert!(moved > 0);
    assert_eq!(
        c.cluster()["sessions_live"].as_u64().unwrap(),
        moved,
        "exactly the moved sessions live on the new node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_traffic_hands_off_and_closes_its_own_clients_with_1012() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let mut nodes = three_nodes(&consul, &redis).await;
    let mut kept = Vec::new();
    let mut on_drained = Vec::new();
    for i in 0..45 {
        let edge = &nodes[i % 3];
        let mut c = Client::new_session(&edge.ws_url()).await;
        c.op("incr", json!({"key":"n"})).await;
        if i % 3 == 2 {
            on_drained.push(c);
        } else {
            kept.push(c);
        }
    }
    for c in &mut kept {
        // traffic() counts from zero: start the counters over.
        c.op("set", json!({"key":"n","value":0})).await;
    }
    let stop = stop_flag();
    let running = tokio::spawn(traffic(kept, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _) = http(nodes[2].admin, "POST", "/drain", &[]);
    assert_eq!(s, 202);
    for c in &mut on_drained {
        assert_eq!(c.recv_close().await, Some(1012));
    }
    assert!(nodes[2].wait_exit(Duration::from_secs(15)).success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = running.await.unwrap();
    let worst = results.iter().map(|r| r.2).max().unwrap();
    eprintln!(
        "drain under traffic: {} sessions kept their connections; slowest op {worst:?}",
        results.len()
    );
    if std::env::var("BERTH_IT_LOGS").is_ok() {
        for n in &nodes {
            eprintln!("==== {}\n{}", n.node, n.log());
        }
    }
    for c in &on_drained {
        let (mut r, w) = Client::resume(
            &nodes[0].ws_url(),
            c.session.as_deref().unwrap(),
            c.token.as_deref().unwrap(),
            0,
        )
        .await;
        assert_eq!(w["last_op"], 1, "{w}");
        r.set_next_id(2);
        assert_eq!(r.op("incr", json!({"key":"n"})).await["value"], 2);
    }
    converge(&[&nodes[0], &nodes[1]], &["a", "b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_secret_cannot_reach_its_peers() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let a = Berth::start_with(&cluster_env(&consul, &redis, "a"), &[]);
    let mut env = cluster_env(&consul, &redis, "b");
    env.retain(|(k, _)| k != "BERTH__CLUSTER__SECRET");
    env.push((
        "BERTH__CLUSTER__SECRET".into(),
        "a-different-secret-0123456789".into(),
    ));
    env.push(("BERTH__CLUSTER__HOLD_MS".into(), "500".into()));
    let b = Berth::start_with(&env, &[]);
    converge(&[&a, &b], &["a", "b"]).await;
    // A session that a owns, asked for through b: b cannot prove itself to a.
    let ring = ring(&["a", "b"]);
    let mut refused = 0;
    for _ in 0..10 {
        let mut c = Client::connect(&b.ws_url()).await;
        let w = c.hello(None, None, 0).await;
        if w["type"] == "error" {
            assert_eq!(w["code"], "unavailable");
            assert_eq!(c.recv_close().await, Some(1013));
            refused += 1;
        } else {
            assert_eq!(
                ring.owner(w["session"].as_str().unwrap()).unwrap().as_str(),
                "b"
            );
        }
    }
    assert!(refused > 0, "some new sessions belonged to a");
    a.wait_log("peer refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_consul_leader_does_not_stop_sessions_and_membership_resumes() {
    let mut consul = Consul::start_three();
    let redis = Redis::start();
    let leader_port = consul[0].leader().unwrap();
    let leader = consul
        .iter()
        .position(|c| c.server_port == leader_port)
        .expect("leader among the three");
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let agent = |i: usize| &consul[followers[i % 2]];
    let a = Berth::start_with(&cluster_env(agent(0), &redis, "a"), &[]);
    let b = Berth::start_with(&cluster_env(agent(1), &redis, "b"), &[]);
    converge(&[&a, &b], &["a", "b"]).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(Client::new_session(&[&a, &b][i % 2].ws_url()).await);
    }
    let stop = stop_flag();
    let running = tokio::spawn(traffic(clients, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    consul[leader].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A new leader among the two left; membership changes flow again.
    let (f0, f1) = (followers[0], followers[1]);
    eventually("a new consul leader", || {
        consul[f0].leader().is_some_and(|l| l != leader_port)
    })
    .await;
    let c = Berth::start_with(&cluster_env(&consul[f1], &redis, "c"), &[]);
    converge(&[&a, &b, &c], &["a", "b", "c"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = running.await.unwrap();
    let worst = results.iter().map(|r| r.2).max().unwrap();
    eprintln!(
        "consul leader loss: {} sessions served throughout; slowest op {worst:?}",
        results.len()
    );
    for (_, acked, _) in &results {
        assert!(*acked > 10, "sessions kept being served: {acked}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_list_forms_a_cluster_and_new_sessions_live_where_created() {
    let redis = Redis::start();
    let (a, b) = static_pair(&redis, &[]);
    assert_eq!(a.members(), vec!["a", "b"]);
    let ring = ring(&["a", "b"]);
    // The default (`cluster.new_sessions_local`): a new session gets an id
    // the node its client connected to owns, so it lives there; a resume
    // through the other node still reaches it.
    for i in 0..10 {
        let (edge, other, id) = if i % 2 == 0 {
            (&a, &b, "a")
        } else {
            (&b, &a, "b")
        };
        let mut c = Client::new_session(&edge.ws_url()).await;
        c.op("incr", json!({"key":"n"})).await;
        let sid = c.session.clone().unwrap();
        assert_eq!(
            ring.owner(&sid).unwrap().as_str(),
            id,
            "a new session is owned by the node it was created through"
        );
        let (mut r, w) =
            Client::resume(&other.ws_url(), &sid, c.token.as_deref().unwrap(), 0).await;
        assert_eq!(w["node"], id);
        r.set_next_id(2);
        assert_eq!(r.op("incr", json!({"key":"n"})).await["value"], 2);
    }
    // Only the resumes through the other node took a peer hop: one attach
    // and one op each.
    let forwarded = |n: &Berth| n.metric("berth_forwarded_ops_total");
    assert_eq!(forwarded(&a) + forwarded(&b), 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_the_owner_and_arrive_once_in_order_through_the_edge() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let mut nodes = three_nodes(&consul, &redis).await;
    let ring = ring(&["a", "b", "c"]);
    // A session owned by c, used through a.
    let mut c = loop {
        let c = Client::new_session(&nodes[0].ws_url()).await;
        if ring.owner(c.session.as_deref().unwrap()).unwrap().as_str() == "c" {
            break c;
        }
    };
    c.send(json!({"type":"op","id":1,"op":"emit","args":{"body":"now"}}))
        .await;
    let [e1, r1] = c.recv_event_and_result().await;
    assert_eq!(
        (e1["seq"].clone(), r1["ok"].clone()),
        (json!(1), json!(true))
    );
    // Scheduled on c, due after c is dead.
    let r = c
        .op_with_id(2, "emit", json!({"body":"later","delay_ms":1500}))
        .await;
    assert_eq!(r["value"], 2);
    nodes[2].kill9();
    // It arrives through a once the new owner has the session: exactly once, in order.
    let e2 = c.recv_json().await;
    assert_eq!(e2, json!({"type":"event","seq":2,"body":"later"}));
    c.send(json!({"type":"op","id":3,"op":"emit","args":{"body":"after"}}))
        .await;
    let [e3, r3] = c.recv_event_and_result().await;
    assert_eq!(
        (e3["seq"].clone(), r3["value"].clone()),
        (json!(3), json!(3)),
        "no replayed duplicate of seq 1 or 2 came first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_outage_keeps_serving_on_the_last_view_and_readiness_says_so() {
    let (mut consul, redis) = (Consul::start(), Redis::start());
    let mut env_a = cluster_env(&consul, &redis, "a");
    env_a.push(("BERTH__CLUSTER__CONSUL_GRACE_MS".into(), "500".into()));
    let a = Berth::start_with(&env_a, &[]);
    let b = Berth::start_with(&cluster_env(&consul, &redis, "b"), &[]);
    converge(&[&a, &b], &["a", "b"]).await;
    eventually("ready", || a.admin_get("/health/ready").0 == 200).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(Client::new_session(&[&a, &b][i % 2].ws_url()).await);
    }
    consul.kill();
    eventually("readiness reports the membership failure", || {
        let (s, body) = a.admin_get("/health/ready");
        s == 503 && body.contains("membership failing")
    })
    .await;
    assert_eq!(a.members(), vec!["a", "b"], "last known view kept");
    // Past several TTLs without a pass, nobody isolates: each peer still
    // holds the other (src/isolation.rs).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in [&a, &b] {
        assert_eq!(n.metric("berth_isolated"), 0.0, "{}", n.log());
        assert!(!n.log().contains("isolated: no consul check pass"));
    }
    for c in &mut clients {
        let r = c.op("incr", json!({"key":"n"})).await;
        assert_eq!(r["value"], 1, "still served, forwarding included: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consul_outage_and_a_dead_node_isolate_nobody_else() {
    // A silent peer decides nothing on its own (src/isolation.rs): with
    // Consul down for everyone, a node killed must not make the survivors
    // close their clients (which would be a whole-cluster outage).
    let (mut consul, redis) = (Consul::start(), Redis::start());
    let mut nodes = three_nodes(&consul, &redis).await;
    // Clients on a and b of sessions that a or b owns (cluster_env spreads
    // new sessions over the ring: those c owns are not kept).
    let ring = ring(&["a", "b", "c"]);
    let mut clients = Vec::new();
    for i in 0..40 {
        if clients.len() == 8 {
            break;
        }
        let mut c = Client::new_session(&nodes[i % 2].ws_url()).await;
        assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
        if ring.owner(c.session.as_deref().unwrap()).unwrap().as_str() != "c" {
            clients.push(c);
        }
    }
    assert_eq!(clients.len(), 8);
    consul.kill();
    nodes[2].kill9();
    // Well past the TTL (1 s) and the isolation check's period.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for n in &nodes[..2] {
        assert_eq!(n.metric("berth_isolated"), 0.0, "{}", n.log());
    }
    // Sessions of a and b are served, through either node.
    for c in &mut clients {
        let r = c.op("incr", json!({"key":"n"})).await;
        assert_eq!(r["value"], 2, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_that_times_out_and_is_sent_again_never_closes_its_client_with_4000() {
    // Path B of the 4000 defect (hardening issue): a resume through a node
    // that is not the owner, while the owner is frozen (SIGSTOP) past the
    // attach deadline, so the edge sends the attach again; when the owner
    // wakes it runs every attempt it had queued. The client must get its
    // welcome and keep its session, never 4000.
    let redis = Redis::start();
    // attach deadline = peer_timeout + 2 x store.op_timeout (500) = 1.3 s
    let (a, b) = static_pair(&redis, &[("BERTH__CLUSTER__PEER_TIMEOUT_MS", "300")]);
    for round in 0..3 {
        let mut c = Client::new_session(&a.ws_url()).await; // lives on a
        assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
        let (sid, token) = (c.session.clone().unwrap(), c.token.clone().unwrap());
        drop(c);
        a.signal("STOP");
        let resume = tokio::spawn({
            let url = b.ws_url();
            async move { Client::resume(&url, &sid, &token, 0).await }
        });
        // Past one attach deadline and into the second attempt.
        tokio::time::sleep(Duration::from_millis(1900 + 200 * round)).await;
        a.signal("CONT");
        let (mut r, w) = resume.await.unwrap();
        assert_eq!(w["type"], "welcome", "round {round}: {w}");
        assert_eq!(w["node"], "a");
        r.set_next_id(2);
        for i in 2..=20 {
            let got = r.op("incr", json!({"key":"n"})).await;
            assert_eq!(got["value"], i, "round {round}: {got}");
        }
        // Nothing closes it afterwards either (a late attempt's proxy).
        let quiet = tokio::time::timeout(Duration::from_millis(700), r.recv()).await;
        assert!(
            quiet.is_err(),
            "round {round}: the connection was told {:?}",
            quiet.ok().map(|g| format!("{g:?}"))
        );
    }
    // The attach timed out at least once: the test exercised the retry.
    b.wait_log("peer did not answer");
}

/// `cluster.tls` settings for a node with a certificate of `ca`: as files in
/// `dir` when `files`, else as base64 (both ways an operator can give them).
fn peer_tls_env(
    ca: &berth_cluster::tls::dev::DevCa,
    trust: &berth_cluster::tls::dev::DevCa,
    dir: &std::path::Path,
    name: &str,
    files: bool,
) -> Vec<(String, String)> {
    use base64::Engine;
    let n = ca.issue(&[berth_cluster::tls::DEFAULT_SERVER_NAME]);
    let inputs = [
        ("CA", trust.ca_pem()),
        ("CERT", n.cert_pem),
        ("KEY", n.key_pem),
    ];
    inputs
        .into_iter()
        .map(|(what, pem)| {
            if files {
                let path = dir.join(format!("{name}-{what}.pem"));
                std::fs::write(&path, pem).unwrap();
                (
                    format!("BERTH__CLUSTER__TLS__{what}_FILE"),
                    path.display().to_string(),
                )
            } else {
                (
                    format!("BERTH__CLUSTER__TLS__{what}_BASE64"),
                    base64::engine::general_purpose::STANDARD.encode(pem),
                )
            }
        })
        .collect()
}

/// Sessions created through `owner` and used through `edge` (one peer hop
/// each): how many of `n` answered, and the answers of those that did not.
async fn ops_through_the_other_node(owner: &Berth, edge: &Berth, n: usize) -> (usize, Vec<Value>) {
    let (mut ok, mut refused) = (0, Vec::new());
    for _ in 0..n {
        let mut c = Client::new_session(&owner.ws_url()).await;
        c.op("incr", json!({"key":"n"})).await;
        let sid = c.session.clone().unwrap();
        let mut r = Client::connect(&edge.ws_url()).await;
        let w = r.hello(Some(&sid), c.token.as_deref(), 0).await;
        if w["type"] != "welcome" {
            refused.push(w);
            continue;
        }
        r.set_next_id(2);
        let v = r.op("incr", json!({"key":"n"})).await;
        if v["value"] == 2 {
            ok += 1;
        } else {
            refused.push(v);
        }
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_links_over_tls_carry_sessions_and_refuse_a_certificate_of_another_ca() {
    let redis = Redis::start();
    let dir = std::env::temp_dir().join(format!("berth-it-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = berth_cluster::tls::dev::DevCa::new("cluster CA");

    // a with PEM files, b with base64: every op through the other node works.
    let (a, b) = static_pair_with(
        &redis,
        &[],
        &peer_tls_env(&ca, &ca, &dir, "a", true),
        &peer_tls_env(&ca, &ca, &dir, "b", false),
    );
    a.wait_log("peer links: TLS 1.3");
    let (ok, refused) = ops_through_the_other_node(&a, &b, 5).await;
    assert_eq!((ok, refused), (5, vec![]), "every op crossed a TLS link");
    assert!(a.metric("berth_forwarded_ops_total") + b.metric("berth_forwarded_ops_total") >= 5.0);
    assert_eq!(a.metric("berth_peer_auth_failures_total"), 0.0);
    drop((a, b));

    // b's certificate comes from another CA (b trusts the cluster CA, so only
    // a's check of its client certificate can stop it): a refuses every link
    // from b, counts it, and b's clients get a retryable `unavailable`.
    let other = berth_cluster::tls::dev::DevCa::new("another CA");
    let (a, b) = static_pair_with(
        &redis,
        &[("BERTH__CLUSTER__HOLD_MS", "500")],
        &peer_tls_env(&ca, &ca, &dir, "a2", true),
        &peer_tls_env(&other, &ca, &dir, "b2", true),
    );
    let (ok, refused) = ops_through_the_other_node(&a, &b, 3).await;
    assert_eq!(ok, 0, "no session crossed to a from a node of another CA");
    for r in &refused {
        assert!(
            r["code"] == "unavailable" || r["error"] == "unavailable",
            "{r}"
        );
    }
    a.wait_log("peer refused");
    let (_, metrics) = a.admin_get("/metrics");
    assert!(
        metric_labeled(&metrics, "berth_peer_auth_failures_total", "reason=\"tls\"") > 0.0,
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_vnodes_count_is_refused_at_the_handshake() {
    // Without the check, a and b would each place sessions on their own ring
    // and take them from each other in turn; with it, the mismatch is an
    // error both logs name, and no session crosses.
    let redis = Redis::start();
    let (a, b) = static_pair_with(
        &redis,
        &[("BERTH__CLUSTER__HOLD_MS", "500")],
        &[],
        &[("BERTH__CLUSTER__VNODES".into(), "1024".into())],
    );
    // Sessions a created, resumed through b: where b's own ring (1024
    // virtual nodes) names a, b must reach a, and cannot.
    let b_ring = Ring::new(["a", "b"].map(MemberId::new), 1024);
    let mut crossed = 0;
    while crossed < 3 {
        let mut c = Client::new_session(&a.ws_url()).await;
        c.op("incr", json!({"key":"n"})).await;
        let sid = c.session.clone().unwrap();
        if b_ring.owner(&sid).unwrap().as_str() != "a" {
            continue; // b would serve it itself (fenced writes keep it safe)
        }
        crossed += 1;
        let mut r = Client::connect(&b.ws_url()).await;
        let w = r.hello(Some(&sid), c.token.as_deref(), 0).await;
        assert_eq!(w["code"], "unavailable", "{w}");
    }
    b.wait_log("cluster.vnodes");
    a.wait_log("cluster.vnodes");
    let (_, metrics) = a.admin_get("/metrics");
    assert!(
        metric_labeled(
            &metrics,
            "berth_peer_auth_failures_total",
            "reason=\"contract\""
        ) > 0.0,
        "{metrics}"
    );
}

/// A TCP forwarder on 127.0.0.1 to `target` that the test can cut: while
/// cut, every forwarded connection is dropped and new ones are closed at
/// once (the node behind it cannot reach `target`). Stops on drop.
struct Forwarder {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: std::net::SocketAddr) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = tokio::sync::watch::Sender::new(false);
        let rx = cut.subscribe();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if *rx.borrow() {
                    continue; // dropped: closed at once
                }
                let mut cut = rx.clone();
                conns.spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Forwarder { addr, cut, task }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.set_cut(true);
        self.task.abort();
    }
}

/// What a writing client saw before its connection closed.
struct Wrote {
    client: Client,
    /// Increments acknowledged (each answered with the count so far).
    acked: u64,
    /// The close code, if the connection closed.
    closed: Option<Option<u16>>,
}

/// Sends `incr` ops one at a time, checking each answer against the count of
/// acknowledged ones, until the connection closes or `stop` is set.
async fn write_until_closed(
    mut client: Client,
    mut acked: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Wrote {
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Wrote {
                client,
                acked,
                closed: None,
            };
        }
        client
            .send(json!({"type":"op","id":acked + 1,"op":"incr","args":{"key":"n"}}))
            .await;
        loop {
            match client.recv().await {
                Got::Json(v) if v["type"] == "result" => {
                    assert_eq!(v["ok"], true, "{v}");
                    assert_eq!(v["value"], acked + 1, "nothing lost, nothing twice: {v}");
                    acked += 1;
                    break;
                }
                Got::Json(_) => continue,
                Got::Close(code, _) => {
                    return Wrote {
                        client,
                        acked,
                        closed: Some(code),
                    }
                }
                Got::Ended => {
                    return Wrote {
                        client,
                        acked,
                        closed: Some(None),
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_consul_isolates_itself_sends_its_clients_away_and_rejoins() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let to_consul = Forwarder::start(([127, 0, 0, 1], consul.http).into()).await;
    let mut env_c = cluster_env(&consul, &redis, "c");
    for (k, v) in env_c.iter_mut() {
        if k == "BERTH__CLUSTER__CONSUL_ADDR" {
            *v = format!("http://{}", to_consul.addr);
        }
    }
    let a = Berth::start_with(&cluster_env(&consul, &redis, "a"), &[]);
    let b = Berth::start_with(&cluster_env(&consul, &redis, "b"), &[]);
    let c = Berth::start_with(&env_c, &[]);
    converge(&[&a, &b, &c], &["a", "b", "c"]).await;
    eventually("c ready", || c.admin_get("/health/ready").0 == 200).await;
    let ring = ring(&["a", "b", "c"]);
    // Clients of c: three whose sessions c owns, two owned by a or b (ops
    // over a peer link); and two clients of a whose sessions c owns.
    let (mut of_c_owned, mut of_c_routed, mut of_a_owned_by_c) =
        (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..200 {
        if of_c_owned.len() >= 3 && of_c_routed.len() >= 2 && of_a_owned_by_c.len() >= 2 {
            break;
        }
        let mut cl = Client::new_session(&c.ws_url()).await;
        let owner = ring
            .owner(cl.session.as_deref().unwrap())
            .unwrap()
            .to_string();
        assert_eq!(cl.op("incr", json!({"key":"n"})).await["value"], 1);
        if owner == "c" && of_c_owned.len() < 3 {
            of_c_owned.push(cl);
        } else if owner != "c" && of_c_routed.len() < 2 {
            of_c_routed.push(cl);
        } else if owner == "c" && of_a_owned_by_c.len() < 2 {
            let (sid, tok) = (cl.session.clone().unwrap(), cl.token.clone().unwrap());
            drop(cl);
            let (mut r, w) = Client::resume(&a.ws_url(), &sid, &tok, 0).await;
            assert_eq!(w["node"], "c", "{w}");
            r.set_next_id(2);
            of_a_owned_by_c.push(r);
        }
    }
    assert_eq!(
        (of_c_owned.len(), of_c_routed.len(), of_a_owned_by_c.len()),
        (3, 2, 2)
    );
    let stop = stop_flag();
    let start = |clients: Vec<Client>| {
        clients
            .into_iter()
            .map(|cl| tokio::spawn(write_until_closed(cl, 1, stop.clone())))
            .collect::<Vec<_>>()
    };
    let (own, routed, roaming) = (
        start(of_c_owned),
        start(of_c_routed),
        start(of_a_owned_by_c),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fenced_before: f64 = [&a, &b, &c]
        .iter()
        .map(|n| n.metric("berth_fenced_writes_total"))
        .sum();

    // Cut c off from Consul (its peers still reach it, and it them).
    let cut_at = Instant::now();
    to_consul.set_cut(true);
    // Every client of c is closed with 1012 within a few TTLs (here 1 s).
    let mut resumed = Vec::new();
    for t in own.into_iter().chain(routed) {
        let w = tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("c's clients are sent away within a few TTLs")
            .unwrap();
        assert_eq!(
            w.closed,
            Some(Some(1012)),
            "closed with 1012 (resume elsewhere)"
        );
        resumed.push(w);
    }
    eprintln!(
        "isolation: c's clients closed {:?} after the cut",
        cut_at.elapsed()
    );
    c.wait_log("isolated: no consul check pass");
    assert_eq!(c.metric("berth_isolated"), 1.0);
    let (status, body) = c.admin_get("/health/ready");
    assert!(
        status == 503 && body.contains("isolated"),
        "{status} {body}"
    );
    assert_eq!(
        upgrade_status(&c.ws_url()).await,
        503,
        "an upgrade at c is refused"
    );
    converge(&[&a, &b], &["a", "b"]).await;

    // Each resumes on another node with every acknowledged op, and goes on.
    for w in &mut resumed {
        let (sid, tok) = (
            w.client.session.clone().unwrap(),
            w.client.token.clone().unwrap(),
        );
        let (mut r, welcome) = Client::resume(&a.ws_url(), &sid, &tok, 0).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_ne!(welcome["node"], "c", "{welcome}");
        // The op in flight when the connection closed, if any, is sent again
        // with its id: answered once, whether or not c had applied it.
        r.set_next_id(w.acked + 1);
        let got = r.op("incr", json!({"key":"n"})).await;
        assert_eq!(
            got["value"],
            w.acked + 1,
            "every acknowledged op is there, once: {got}"
        );
    }
    // The clients of a whose sessions c owned were re-routed without a close.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in roaming {
        let mut w = t.await.unwrap();
        assert_eq!(w.closed, None, "a's clients were never closed");
        let got = w
            .client
            .op_with_id(w.acked + 1, "incr", json!({"key":"n"}))
            .await;
        assert_eq!(got["value"], w.acked + 1, "{got}");
    }
    let fenced: f64 = [&a, &b, &c]
        .iter()
        .map(|n| n.metric("berth_fenced_writes_total"))
        .sum();
    eprintln!(
        "isolation: {} checkpoint writes of c fenced off",
        fenced - fenced_before
    );

    // Consul reachable again: c rejoins.
    to_consul.set_cut(false);
    converge(&[&a, &b, &c], &["a", "b", "c"]).await;
    eventually("c ready again", || c.admin_get("/health/ready").0 == 200).await;
    c.wait_log("no longer isolated");
    assert_eq!(c.metric("berth_isolated"), 0.0);
    let mut again = Client::new_session(&c.ws_url()).await;
    assert_eq!(again.op("incr", json!({"key":"n"})).await["value"], 1);
}
