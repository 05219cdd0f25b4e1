//! The operator dashboard on the admin listener: `GET /` (one
//! self-contained page, `static/dashboard.html`: no external asset, the
//! admin port may have no internet) and `GET /dashboard.json`, what the
//! page polls.
//!
//! A browser can rarely reach the other members' admin ports, so this node
//! gathers the whole cluster: its membership view and ring shares, and
//! every member's [`sample::Sample`] asked over the peer links it already
//! has (`PeerReq::Sample`; a member that does not answer within
//! [`SAMPLE_TIMEOUT`] is listed without one). Samples carry cumulative
//! counters and histogram buckets; the page computes ops/s and percentiles
//! from successive polls.
//!
//! # Layout
//! - here: the two routes, and the sampler the router answers peers with.
//! - [`prom`]: reading this node's Prometheus text back.
//! - [`sample`]: one node's sample.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{http::header, web, HttpResponse};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};

use crate::node::Node;
use crate::route::Sampler;

pub mod prom;
pub mod sample;

/// The page.
const PAGE: &str = include_str!("../../static/dashboard.html");

/// How long `/dashboard.json` waits for a member's sample (the page polls
/// every 2 s; a dead member must not hold the others' rows back).
pub const SAMPLE_TIMEOUT: Duration = Duration::from_millis(800);

/// What answers the other members' `PeerReq::Sample` (and this node's own
/// row): the node's sample made from its own `/metrics` text. Holds the node
/// weakly (the node holds the router, which holds this).
pub fn sampler(node: &web::Data<Node>, prom: PrometheusHandle) -> Sampler {
    let node = std::sync::Arc::downgrade(&node.clone().into_inner());
    Box::new(move || match node.upgrade() {
        Some(n) => serde_json::to_string(&sample::take(&n, &prom.render())).unwrap_or_default(),
        None => String::new(),
    })
}

/// `GET /`: the page (never cached: it is small, and a stale one after an
/// upgrade would misread a newer JSON).
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(PAGE)
}

/// `GET /dashboard.json`: this node's view of the cluster with every
/// member's sample.
pub async fn json(node: web::Data<Node>) -> HttpResponse {
    let router = &node.router;
    // Snapshots (Arcs): nothing is locked while members are asked.
    let view = router.view();
    let ring = router.ring();
    let shares = ring.shares(20_000);
    let timeout = SAMPLE_TIMEOUT.min(Duration::from_millis(node.cfg.cluster.peer_timeout_ms));
    let samples = futures_util::future::join_all(
        view.members
            .iter()
            .map(|m| router.member_sample(&m.id, timeout)),
    )
    .await;
    let members: Vec<Value> = view
        .members
        .iter()
        .zip(samples)
        .map(|(m, sample)| {
            let (sample, error) = match sample {
                Ok(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(v) => (v, None),
                    Err(_) => (Value::Null, Some("unreadable sample")),
                },
                Err(why) => (Value::Null, Some(why)),
            };
            json!({
                "id": m.id,
                "self": m.id.as_str() == node.node_id,
                "peer": m.peer,
                "public": m.public,
                "version": m.version,
                "ring_share": shares.get(&m.id).copied().unwrap_or(0.0),
                "sample": sample,
                "error": error,
            })
        })
        .collect();
    // This node's own sample when it is not in its view (leaving,
    // isolated, not registered yet): the page shows it apart.
    let this = match members.iter().any(|m| m["self"] == true) {
        true => Value::Null,
        false => router
            .member_sample(
                &berth_cluster::ring::MemberId(node.node_id.clone()),
                timeout,
            )
            .await
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null),
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({
            "node": node.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "at_ms": now_ms,
            "mode": if router.clustered() { "cluster" } else { "single" },
            "ring": { "vnodes": ring.vnodes(), "members": ring.len() },
            "this": this,
            "members": members,
            "drain_needs_token": node.cfg.admin.drain_token.is_some(),
        }))
}
