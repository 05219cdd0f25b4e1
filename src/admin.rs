//! The operator endpoint (`admin.listen`, loopback by default): health,
//! Prometheus metrics, the cluster view, drain, and the dashboard
//! (`src/dashboard`).

use std::sync::atomic::Ordering;

use actix_web::{web, HttpRequest, HttpResponse};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::node::Node;

/// Registers the admin routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health/live", web::get().to(live))
        .route("/health/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics_text))
        .route("/cluster", web::get().to(cluster))
        .route("/drain", web::post().to(drain))
        .route("/", web::get().to(crate::dashboard::page))
        .route("/dashboard.json", web::get().to(crate::dashboard::json));
}

async fn live(node: web::Data<Node>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "live": true,
        "node": node.node_id,
        "uptime_s": node.started.elapsed().as_secs(),
    }))
}

async fn ready(node: web::Data<Node>) -> HttpResponse {
    let why = node.not_ready_reasons();
    let body = json!({ "ready": why.is_empty(), "node": node.node_id, "reasons": why });
    if why.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics_text(prom: web::Data<PrometheusHandle>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(prom.render())
}

async fn cluster(node: web::Data<Node>) -> HttpResponse {
    let router = &node.router;
    let view = router.view();
    let ring = router.ring();
    let shares = ring.shares(20_000);
    let timeout = std::time::Duration::from_millis(500);
    let counts = futures_util::future::join_all(
        view.members
            .iter()
            .map(|m| router.member_sessions(&m.id, timeout)),
    )
    .await;
    let members: Vec<_> = view
        .members
        .iter()
        .zip(counts)
        .map(|(m, sessions)| {
            json!({
                "id": m.id,
                "self": m.id.as_str() == node.node_id,
                "peer": m.peer,
                "public": m.public,
                "version": m.version,
                "ring_share": shares.get(&m.id).copied().unwrap_or(0.0),
                "sessions": sessions,
            })
        })
        .collect();
    let store = node.host.store();
    let health = node.membership.health();
    HttpResponse::Ok().json(json!({
        "node": node.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "mode": if router.clustered() { "cluster" } else { "single" },
        "members": members,
        "ring": { "vnodes": ring.vnodes(), "members": ring.len() },
        "membership": {
            "source": format!("{:?}", view.source),
            "registered": health.registered,
            "last_error": health.last_error,
        },
        "sessions_live": node.host.live_sessions(),
        "sessions_for_other_edges": router.proxied(),
        "connections": node.connections.load(Ordering::Relaxed),
        "connections_routed_elsewhere": router.forwarded_conns(),
        "handoffs_in_flight": router.handoffs_in_flight(),
        "store": { "kind": store.describe(), "durable": store.is_durable() },
        "stopping": node.is_stopping(),
        "process": process_memory(),
    }))
}

/// Resident memory of this process, from `/proc/self/status` (Linux).
fn process_memory() -> serde_json::Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    json!({ "rss_bytes": kb("VmRSS:"), "peak_rss_bytes": kb("VmHWM:") })
}

/// `POST /drain`: with `admin.drain_token`, only a request that presents it
/// (`Authorization: Bearer …`, compared in constant time); without one, only
/// a caller on loopback. Anyone else on the admin network gets 403 and the
/// node goes on serving. A browser's request from another origin is refused
/// too: a page the operator visits elsewhere could otherwise drain a node
/// from the operator's loopback (a cross-origin POST without a body needs
/// no preflight); the dashboard's own button is same-origin.
async fn drain(req: HttpRequest, node: web::Data<Node>) -> HttpResponse {
    if !same_origin(&req) {
        tracing::warn!(peer = ?req.peer_addr(), "drain refused: sent by a page of another origin");
        return HttpResponse::Forbidden().json(json!({
            "error": "forbidden",
            "message": "POST /drain from a page of another origin is refused",
        }));
    }
    let allowed = match &node.cfg.admin.drain_token {
        Some(token) => req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes()))),
        None => req.peer_addr().is_some_and(|a| a.ip().is_loopback()),
    };
    if !allowed {
        tracing::warn!(peer = ?req.peer_addr(), "drain refused: no valid admin.drain_token, and not from loopback");
        return HttpResponse::Forbidden().json(json!({
            "error": "forbidden",
            "message": if node.cfg.admin.drain_token.is_some() {
                "POST /drain needs `Authorization: Bearer <admin.drain_token>`"
            } else {
                "POST /drain is accepted from loopback only (set admin.drain_token to drain over the network)"
            },
        }));
    }
    node.drain_requested.send_replace(true);
    HttpResponse::Accepted().json(json!({
        "draining": true,
        "node": node.node_id,
        "message": "checkpointing every session and closing clients with 1012; the process then exits",
    }))
}

/// Whether a request is not a browser's cross-origin one: no `Origin`
/// header (curl, scripts), or one naming the host the request was sent to.
fn same_origin(req: &HttpRequest) -> bool {
    let headers = req.headers();
    let Some(origin) = headers.get(actix_web::http::header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(actix_web::http::header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, h)| h.trim_end_matches('/'));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}
