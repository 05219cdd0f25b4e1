//! Multi-node: real Consul, real Redis, real berth processes, real clients.

use std::time::{Duration, Instant};

use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
use serde_json::json;

use crate::common::*;

fn ring(ids: &[&str]) -> Ring {
    Ring::new(ids.iter().map(|s| MemberId(s.to_string())), DEFAULT_VNODES)
}

fn pct(sorted: &[u128], q: f64) -> u128 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::test]
async fn three_nodes_serve_every_session_through_every_node_from_its_owner() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let nodes: Vec<Berth> = ["a", "b", "c"]
        .iter()
        .map(|id| Berth::start_with(&cluster_env(&consul, &redis, id), &[]))
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &["a", "b", "c"]).await;
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

#[tokio::test]
async fn sigkill_of_an_owner_fails_over_with_nothing_lost() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let mut nodes: Vec<Berth> = ["a", "b", "c"]
        .iter()
        .map(|id| Berth::start_with(&cluster_env(&consul, &redis, id), &[]))
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &["a", "b", "c"]).await;
    let ring = ring(&["a", "b", "c"]);
    // Clients on a and b; sessions owned everywhere; node c will die.
    let mut clients = Vec::new();
    for i in 0..60 {
        let edge = &nodes[i % 2];
        let mut c = Client::new_session(&edge.ws_url()).await;
        for _ in 0..3 {
            assert_eq!(c.op("incr", json!({"key":"n"})).await["ok"], true);
        }
        let owner = ring
            .owner(c.session.as_deref().unwrap())
            .unwrap()
            .to_string();
        clients.push((c, owner));
    }
    let on_c = clients.iter().filter(|(_, o)| o == "c").count();
    assert!(on_c >= 10, "enough sessions owned by the victim: {on_c}");
    let killed = Instant::now();
    nodes[2].kill9();
    let mut windows = Vec::new();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(mut c, owner)| {
            tokio::spawn(async move {
                let r = c.op("incr", json!({"key":"n"})).await;
                (r, owner, killed.elapsed().as_millis(), c)
            })
        })
        .collect();
    for t in tasks {
        let (r, owner, ms, _c) = t.await.unwrap();
        assert_eq!(r["ok"], true, "held op served after failover: {r}");
        assert_eq!(r["value"], 4, "nothing lost, nothing applied twice: {r}");
        if owner == "c" {
            windows.push(ms);
        }
    }
    windows.sort();
    eprintln!(
        "failover window over {} sessions (SIGKILL -> serving again): p50 {} ms, p99 {} ms, max {} ms",
        windows.len(),
        pct(&windows, 0.5),
        pct(&windows, 0.99),
        windows.last().unwrap()
    );
    assert!(*windows.last().unwrap() < 5_000);
    converge(&[&nodes[0], &nodes[1]], &["a", "b"]).await;
}

#[tokio::test]
async fn a_joining_node_takes_only_its_sessions_and_no_connection_closes() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let a = Berth::start_with(&cluster_env(&consul, &redis, "a"), &[]);
    let b = Berth::start_with(&cluster_env(&consul, &redis, "b"), &[]);
    converge(&[&a, &b], &["a", "b"]).await;
    let mut clients = Vec::new();
    for i in 0..60 {
        let edge = if i % 2 == 0 { &a } else { &b };
        let mut c = Client::new_session(&edge.ws_url()).await;
        c.op("incr", json!({"key":"n"})).await;
        clients.push(c);
    }
    let c = Berth::start_with(&cluster_env(&consul, &redis, "c"), &[]);
    converge(&[&a, &b, &c], &["a", "b", "c"]).await;
    let before = ring(&["a", "b"]);
    let after = ring(&["a", "b", "c"]);
    let mut moved = 0;
    for cl in &mut clients {
        let sid = cl.session.clone().unwrap();
        let (o1, o2) = (
            before.owner(&sid).unwrap().clone(),
            after.owner(&sid).unwrap().clone(),
        );
        if o1 != o2 {
            assert_eq!(o2.as_str(), "c", "a key moves only onto the new member");
            moved += 1;
        }
        let r = cl.op("incr", json!({"key":"n"})).await;
        assert_eq!(
            (r["ok"].clone(), r["value"].clone()),
            (json!(true), json!(2)),
            "{r}"
        );
    }
    eprintln!("join: {moved} of 60 sessions moved (ideal 1/3 = 20)");
    assert!(moved > 0);
    let live_c = c.cluster()["sessions_live"].as_u64().unwrap();
    assert_eq!(
        live_c, moved,
        "exactly the moved sessions live on the new node"
    );
}

#[tokio::test]
async fn drain_hands_off_and_closes_its_own_clients_with_1012() {
    let (consul, redis) = (Consul::start(), Redis::start());
    let mut nodes: Vec<Berth> = ["a", "b", "c"]
        .iter()
        .map(|id| Berth::start_with(&cluster_env(&consul, &redis, id), &[]))
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &["a", "b", "c"]).await;
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
    let (s, _) = http(nodes[2].admin, "POST", "/drain", &[]);
    assert_eq!(s, 202);
    for c in &mut on_drained {
        assert_eq!(c.recv_close().await, Some(1012));
    }
    assert!(nodes[2].wait_exit(Duration::from_secs(15)).success());
    for c in &mut kept {
        let r = c.op("incr", json!({"key":"n"})).await;
        assert_eq!(
            (r["ok"].clone(), r["value"].clone()),
            (json!(true), json!(2)),
            "{r}"
        );
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
}

#[tokio::test]
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
