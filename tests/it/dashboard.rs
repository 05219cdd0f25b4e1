//! The operator dashboard (`GET /` on the admin port) as an operator sees it
//! in an incident: headless Chromium on one node's admin page, a three-node
//! cluster (real Consul, real Redis) under a bounded load of WebSocket
//! clients, one member SIGKILLed (its row goes from ok to gone within the
//! TTL), then the drain button: refused without the token, accepted with
//! it.
//!
//! `BERTH_DASHBOARD_SCREENSHOT=docs/img/dashboard.png` also writes the
//! screenshot docs/operations.md shows (taken after the kill, under load).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
use serde_json::{json, Value};

use crate::browser::{Browser, Tab};
use crate::common::*;

const DRAIN_TOKEN: &str = "dashboard-test-drain-token";
const TTL_MS: u64 = 1000;

/// One client's bounded load: `incr` ops one at a time, a little apart,
/// until `stop` (or its connection ends, or 50,000 ops).
async fn load(mut c: Client, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    for id in 1..=50_000u64 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let op = json!({"type":"op","id":id,"op":"incr","args":{"key":"n"}});
        if !c.ws_send(op).await {
            return;
        }
        loop {
            match c.recv().await {
                Got::Json(v) if v["type"] == "result" => break,
                Got::Json(_) => continue,
                _ => return,
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// `col`'s `data-value` in each member row, by node id (null when empty).
async fn column(b: &mut Browser, tab: &Tab, col: &str) -> Vec<(String, Value)> {
    let js = format!(
        "[...document.querySelectorAll('#members tbody tr')].map(r => {{ \
           const c = r.querySelector('[data-col={col}]'); \
           const v = c && c.dataset.value; \
           return [r.dataset.node, v === undefined ? null : Number(v)]; }})"
    );
    serde_json::from_value(b.eval(tab, &js).await).unwrap()
}

/// The `data-health` of `node`'s row (null without one).
fn health_of(node: &str) -> String {
    format!("(document.querySelector('#members tr[data-node=\"{node}\"]') || {{dataset: {{}}}}).dataset.health")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_loaded_cluster_a_killed_member_leaving_and_drains_its_node() {
    let consul = Consul::start();
    let redis = Redis::start();
    let ids = ["a", "b", "c"];
    let mut nodes: Vec<Berth> = ids
        .iter()
        .map(|id| {
            let mut env = cluster_env(&consul, &redis, id);
            env.extend([
                ("BERTH__CLUSTER__TTL_MS".to_string(), TTL_MS.to_string()),
                ("BERTH__ADMIN__DRAIN_TOKEN".into(), DRAIN_TOKEN.into()),
            ]);
            Berth::start_with(&env, &[])
        })
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &ids).await;

    // Clients on a and b (c is killed later); their sessions spread over the
    // ring (cluster_env), with at least one owned by c so that its row has
    // checkpoints to show.
    let ring = Ring::new(ids.iter().map(|m| MemberId(m.to_string())), DEFAULT_VNODES);
    let mut clients = Vec::new();
    for i in 0..40 {
        let c = Client::new_session(&nodes[i % 2].ws_url()).await;
        let on_c = |c: &Client| ring.owner(c.session.as_deref().unwrap()).unwrap().as_str() == "c";
        let enough = clients.len() >= 8 && clients.iter().any(on_c);
        clients.push(c);
        if enough {
            break;
        }
    }
    assert!(
        clients
            .iter()
            .any(|c| ring.owner(c.session.as_deref().unwrap()).unwrap().as_str() == "c"),
        "no session owned by c in 40"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(load(c, stop.clone(), done.clone())))
        .collect();

    let mut b = Browser::start().await;
    let tab = b
        .open(&format!("http://{}/?poll_ms=500", nodes[0].admin))
        .await;
    b.wait(
        &tab,
        "document.querySelectorAll('#members tbody tr[data-health=ok]').length === 3",
        "three healthy members",
    )
    .await;
    // Under load: ops/s and latency on the edges (a and b), checkpoint
    // batches on every owner, sessions everywhere.
    for node in ["a", "b"] {
        let row = format!("document.querySelector('#members tr[data-node=\"{node}\"]')");
        b.wait(
            &tab,
            &format!(
                "Number({row}.querySelector('[data-col=ops]').dataset.value) > 0 && \
                 {row}.querySelector('[data-col=p99]').dataset.value !== undefined && \
                 {row}.querySelector('[data-col=p50]').textContent.endsWith('s')"
            ),
            &format!("ops/s and p50/p99 of {node}"),
        )
        .await;
    }
    b.wait(
        &tab,
        "[...document.querySelectorAll('#members tbody tr')].every(r => \
           Number(r.querySelector('[data-col=ckpt_batch]').dataset.value) >= 1 && \
           Number(r.querySelector('[data-col=ckpt_p99]').dataset.value) > 0 && \
           Number(r.querySelector('[data-col=sessions]').dataset.value) > 0)",
        "checkpoint batches and sessions on every member",
    )
    .await;
    let shares = column(&mut b, &tab, "ring_share").await;
    let total: f64 = shares.iter().map(|(_, v)| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 0.01, "ring shares {shares:?}");
    for (node, share) in &shares {
        let share = share.as_f64().unwrap();
        assert!((0.25..0.42).contains(&share), "{node}'s share {share}");
    }
    let text = b.eval(&tab, "document.body.innerText").await;
    let text = text.as_str().unwrap();
    for want in [
        "no problems seen",
        "registered",
        "redis",
        "this node",
        "Drain this node",
    ] {
        assert!(text.contains(want), "{want:?} not on the page:\n{text}");
    }
    let conns = b
        .eval(
            &tab,
            "Number(document.getElementById('t-connections').textContent.replace(/,/g, ''))",
        )
        .await;
    assert!(conns.as_f64().unwrap() >= 8.0, "connections tile: {conns}");

    // c dies: its row stops being healthy at once and leaves within the TTL
    // (plus a blocking query and a poll).
    let killed = Instant::now();
    nodes[2].kill9();
    b.wait(&tab, &format!("{} !== 'ok'", health_of("c")), "c not ok")
        .await;
    let not_ok_after = killed.elapsed();
    b.wait(&tab, &format!("{} === 'left'", health_of("c")), "c left")
        .await;
    let left_after = killed.elapsed();
    assert!(
        left_after < Duration::from_millis(TTL_MS * 5),
        "c shown as left {left_after:?} after the kill"
    );
    b.wait(
        &tab,
        "[...document.querySelectorAll('#problems li')].some(l => l.textContent.startsWith('c left the cluster'))",
        "the problem listed",
    )
    .await;
    // The survivors take the whole ring and keep serving.
    b.wait(
        &tab,
        "document.querySelectorAll('#members tbody tr[data-health=ok]').length === 2",
        "a and b healthy",
    )
    .await;
    let shares = column(&mut b, &tab, "ring_share").await;
    let live: f64 = shares
        .iter()
        .filter(|(n, _)| n != "c")
        .map(|(_, v)| v.as_f64().unwrap())
        .sum();
    assert!(
        (live - 1.0).abs() < 0.01,
        "ring shares after the kill {shares:?}"
    );
    // The screenshot of docs/operations.md: the incident as the page shows
    // it, with a few seconds of history (the 5-minute ops/s lines).
    b.wait(
        &tab,
        "window.dashboard.polls >= 12 && \
         document.querySelectorAll('#members [data-col=spark] polyline').length === 2",
        "the ops/s lines",
    )
    .await;
    let png = b.screenshot(&tab, 1280, 440).await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    if let Ok(path) = std::env::var("BERTH_DASHBOARD_SCREENSHOT") {
        std::fs::write(&path, &png).unwrap();
    }

    let before = done.load(Ordering::Relaxed);
    eventually("ops after the kill", || {
        done.load(Ordering::Relaxed) > before + 50
    })
    .await;
    eprintln!("dashboard: c not ok after {not_ok_after:?}, left after {left_after:?}");

    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }

    // The drain button, guarded as POST /drain is: a wrong token is refused
    // and the node goes on; the right one drains it.
    let drain = |token: &str| {
        format!(
            "document.getElementById('drain-token').value = {}; \
             document.getElementById('drain-result').removeAttribute('data-status'); \
             document.getElementById('drain-button').click(); \
             document.getElementById('drain-confirm').click(); true",
            serde_json::to_string(token).unwrap()
        )
    };
    b.wait(
        &tab,
        "!document.getElementById('drain-token').hidden",
        "the token field (admin.drain_token is set)",
    )
    .await;
    b.eval(&tab, &drain("not-the-token")).await;
    b.wait(
        &tab,
        "document.getElementById('drain-result').dataset.status === '403'",
        "the drain refused",
    )
    .await;
    assert_eq!(nodes[0].admin_get("/health/ready").0, 200);
    b.eval(&tab, &drain(DRAIN_TOKEN)).await;
    b.wait(
        &tab,
        "document.getElementById('drain-result').dataset.status === '202'",
        "the drain accepted",
    )
    .await;
    assert!(nodes[0].wait_exit(Duration::from_secs(15)).success());
    b.wait(
        &tab,
        "document.getElementById('status').textContent.startsWith('this node does not answer')",
        "the page saying its node is gone",
    )
    .await;
}

/// Regression: `POST /drain` is a "simple" request a page of any origin may
/// send without a preflight, and a node without `admin.drain_token` accepts
/// every loopback caller, so any site the operator visited could drain a
/// local node. A request carrying another `Origin` is refused.
#[tokio::test]
async fn a_drain_sent_by_a_page_of_another_origin_is_refused() {
    let node = Berth::start_memory();
    let evil = http(
        node.admin,
        "POST",
        "/drain",
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(evil.0, 403, "{}", evil.1);
    assert!(evil.1.contains("another origin"), "{}", evil.1);
    assert_eq!(node.admin_get("/health/ready").0, 200);
    let same = http(
        node.admin,
        "POST",
        "/drain",
        &[("Origin", &format!("http://{}", node.admin))],
    );
    assert_eq!(same.0, 202, "{}", same.1);
}
