//! One node's dashboard sample: its health and its metrics' current values
//! (counters and histogram buckets as they are, cumulative). The page keeps
//! successive samples of each member and computes rates and percentiles
//! from their differences, as Prometheus would from two scrapes.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use berth_cluster::membership::Source;
use serde::Serialize;

use super::prom::{Histogram, Scrape};
use crate::node::Node;

/// Counters the page shows as totals and as increases over its window.
const COUNTERS: &[&str] = &[
    "berth_ops_total",
    "berth_store_errors_total",
    "berth_fenced_writes_total",
    "berth_peer_auth_failures_total",
    "berth_auth_failures_total",
    "berth_handoffs_total",
    "berth_activations_total",
    "berth_reroutes_total",
    "berth_forwarded_ops_total",
    "berth_connections_refused_total",
];

/// What a member answers about itself (as JSON, over its peer link).
#[derive(Debug, Serialize)]
pub struct Sample {
    /// Its node id.
    pub node: String,
    /// Its berth version.
    pub version: &'static str,
    /// Time since it started: the page divides counter differences by
    /// differences of this (no clock skew between members), and a smaller
    /// value than last time means a restart (counters began again).
    pub uptime_ms: u64,
    /// Its readiness, and why not.
    pub ready: bool,
    /// `/health/ready`'s reasons.
    pub reasons: Vec<String>,
    /// Draining or shutting down.
    pub stopping: bool,
    /// Isolated (src/isolation.rs).
    pub isolated: bool,
    /// Session actors live on it.
    pub sessions_live: u64,
    /// Of those, attached from other nodes' connections.
    pub sessions_for_other_edges: u64,
    /// Its client WebSocket connections.
    pub connections: u64,
    /// Of those, routed to a session on another node.
    pub connections_routed_elsewhere: u64,
    /// Sessions being handed off right now.
    pub handoffs_in_flight: u64,
    /// The checkpoint store.
    pub store: StoreHealth,
    /// Membership (Consul or static).
    pub membership: MembershipHealth,
    /// Totals of [`COUNTERS`] (0 for one that never moved).
    pub counters: BTreeMap<&'static str, f64>,
    /// `berth_ops_total` by result code.
    pub ops_by_result: BTreeMap<String, f64>,
    /// `berth_op_duration_seconds`, every op together.
    pub op_seconds: Histogram,
    /// `berth_checkpoint_batch_size`.
    pub checkpoint_batch_size: Histogram,
    /// `berth_checkpoint_batch_seconds`.
    pub checkpoint_batch_seconds: Histogram,
}

/// The store as the node sees it.
#[derive(Debug, Serialize)]
pub struct StoreHealth {
    /// `redis (...)` or `memory`.
    pub kind: String,
    /// Whether it survives the node.
    pub durable: bool,
    /// It answered the last health ping.
    pub up: bool,
    /// The last ping's error, while it fails.
    pub error: Option<String>,
}

/// Membership as the node sees it.
#[derive(Debug, Serialize)]
pub struct MembershipHealth {
    /// `consul`, `static` or `unknown` (nothing heard yet).
    pub source: &'static str,
    /// Registered in Consul (always false with static members).
    pub registered: bool,
    /// The last Consul error, while calls fail.
    pub last_error: Option<String>,
    /// How long calls have been failing.
    pub failing_ms: Option<u64>,
    /// Consul refused the token (HTTP 403).
    pub forbidden: bool,
}

/// The sample of `node` now, its metrics read from `metrics_text` (its own
/// `/metrics`).
pub fn take(node: &Node, metrics_text: &str) -> Sample {
    let scrape = Scrape::new(metrics_text);
    let reasons = node.not_ready_reasons();
    let readiness = node
        .readiness
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let store = node.host.store();
    let health = node.membership.health();
    let router = &node.router;
    Sample {
        node: node.node_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_ms: node.started.elapsed().as_millis() as u64,
        ready: reasons.is_empty(),
        reasons,
        stopping: node.is_stopping(),
        isolated: node.is_isolated(),
        sessions_live: node.host.live_sessions() as u64,
        sessions_for_other_edges: router.proxied() as u64,
        connections: node.connections.load(Ordering::Relaxed) as u64,
        connections_routed_elsewhere: router.forwarded_conns() as u64,
        handoffs_in_flight: router.handoffs_in_flight() as u64,
        store: StoreHealth {
            kind: store.describe(),
            durable: store.is_durable(),
            up: readiness.store_seen && readiness.store_error.is_none(),
            error: readiness.store_error,
        },
        membership: MembershipHealth {
            source: match router.view().source {
                Source::Consul { .. } => "consul",
                Source::Static => "static",
                Source::Unknown => "unknown",
            },
            registered: health.registered,
            last_error: health.last_error,
            failing_ms: health.failing_since.map(|t| t.elapsed().as_millis() as u64),
            forbidden: health.forbidden,
        },
        counters: COUNTERS.iter().map(|&c| (c, scrape.sum(c))).collect(),
        ops_by_result: scrape.sum_by("berth_ops_total", "result"),
        op_seconds: scrape.histogram("berth_op_duration_seconds"),
        checkpoint_batch_size: scrape.histogram("berth_checkpoint_batch_size"),
        checkpoint_batch_seconds: scrape.histogram("berth_checkpoint_batch_seconds"),
    }
}
