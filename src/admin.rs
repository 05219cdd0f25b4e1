//! The operator endpoint (`admin.listen`, loopback by default): health,
//! Prometheus metrics, the cluster view and drain.

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::node::Node;

/// Registers the admin routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health/live", web::get().to(live))
        .route("/health/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics_text))
        .route("/cluster", web::get().to(cluster))
        .route("/drain", web::post().to(drain));
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
    let sessions = node.host.live_sessions();
    let store = node.host.store();
    HttpResponse::Ok().json(json!({
        "node": node.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "mode": "single",
        "members": [{
            "id": node.node_id,
            "self": true,
            "public": node.cfg.server.listen,
            "ring_share": 1.0,
            "sessions": sessions,
        }],
        "sessions_live": sessions,
        "connections": node.connections.load(Ordering::Relaxed),
        "store": { "kind": store.describe(), "durable": store.is_durable() },
        "stopping": node.is_stopping(),
    }))
}

async fn drain(node: web::Data<Node>) -> HttpResponse {
    node.drain_requested.send_replace(true);
    HttpResponse::Accepted().json(json!({
        "draining": true,
        "node": node.node_id,
        "message": "checkpointing every session and closing clients with 1012; the process then exits",
    }))
}
