//! Logs (`tracing`, text or JSON, filter reloadable) and metrics (Prometheus).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

/// Changes the log filter at run time.
pub type LogHandle = reload::Handle<EnvFilter, Registry>;

/// Installs the global subscriber; logs go to stderr (stdout carries only the
/// start-up line that tools parse).
pub fn init_logging(cfg: &LogConfig) -> Result<LogHandle, String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(&cfg.filter).map_err(|e| format!("log.filter: {e}"))?,
    };
    let (filter, handle) = reload::Layer::new(filter);
    let json = cfg.format == LogFormat::Json;
    tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| fmt::layer().json().with_writer(std::io::stderr)))
        .with((!json).then(|| {
            fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
        }))
        .try_init()
        .map_err(|e| format!("installing the log subscriber: {e}"))?;
    metrics::describe_counter!(
        "berth_api_requests_total",
        "Backend API requests answered, by route (method and path pattern) and HTTP status"
    );
    metrics::describe_histogram!(
        "berth_api_request_duration_seconds",
        "Backend API request latency, by route"
    );
    Ok(handle)
}

/// Op latencies: 50 µs .. 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Installs the Prometheus recorder (rendered by the admin endpoint, no listener of its own).
pub fn init_metrics() -> Result<PrometheusHandle, String> {
    let bad = |e: metrics_exporter_prometheus::BuildError| format!("metrics: {e}");
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("berth_op_duration_seconds".into()),
            LATENCY_BUCKETS,
        )
        .map_err(bad)?
        .set_buckets_for_metric(
            Matcher::Full("berth_checkpoint_batch_seconds".into()),
            LATENCY_BUCKETS,
        )
        .map_err(bad)?
        .set_buckets_for_metric(
            Matcher::Full("berth_timer_lateness_seconds".into()),
            LATENCY_BUCKETS,
        )
        .map_err(bad)?
        .set_buckets_for_metric(
            Matcher::Full("berth_api_request_duration_seconds".into()),
            LATENCY_BUCKETS,
        )
        .map_err(bad)?
        .set_buckets_for_metric(
            Matcher::Full("berth_checkpoint_batch_size".into()),
            BATCH_BUCKETS,
        )
        .map_err(bad)?
        .install_recorder()
        .map_err(bad)?;
    metrics::describe_gauge!("berth_sessions_live", "Session actors live on this node");
    metrics::describe_gauge!("berth_connections", "Open client WebSocket connections");
    metrics::describe_counter!("berth_ops_total", "Ops answered, by op and result code");
    metrics::describe_histogram!(
        "berth_op_duration_seconds",
        "Op latency from frame received to result sent"
    );
    metrics::describe_histogram!(
        "berth_checkpoint_batch_size",
        "Checkpoint writes per Redis pipeline"
    );
    metrics::describe_histogram!(
        "berth_checkpoint_batch_seconds",
        "Duration of one checkpoint pipeline"
    );
    metrics::describe_counter!(
        "berth_store_errors_total",
        "Store operations that failed, by operation"
    );
    metrics::describe_counter!(
        "berth_fenced_writes_total",
        "Checkpoint writes refused because a newer epoch exists"
    );
    metrics::describe_gauge!("berth_store_up", "1 when the checkpoint store answers");
    metrics::describe_gauge!(
        "berth_ready",
        "1 while /health/ready answers 200 (updated every store.health_interval_ms)"
    );
    metrics::describe_gauge!(
        "berth_handoffs_in_flight",
        "Sessions being handed off to another member right now"
    );
    metrics::describe_counter!(
        "berth_handler_failures_total",
        "Application handlers that panicked or overran their deadline (nothing committed), by kind (op, timer) and why"
    );
    metrics::describe_counter!("berth_timers_fired_total", "Timer firings committed");
    metrics::describe_histogram!(
        "berth_timer_lateness_seconds",
        "How long after its due time a timer firing was committed"
    );
    metrics::describe_counter!(
        "berth_timers_dropped_total",
        "Timer firings dropped after their handler failed every attempt"
    );
    metrics::describe_counter!(
        "berth_timer_wakeups_total",
        "Passivated sessions activated because a timer fell due"
    );
    metrics::describe_gauge!(
        "berth_isolated",
        "1 while this node is isolated: its consul check lapsed and its peers do not confirm it"
    );
    metrics::describe_counter!(
        "berth_activations_total",
        "Sessions re-activated from their checkpoint (resume after passivation, handoff, failover)"
    );
    metrics::describe_counter!(
        "berth_handoffs_total",
        "Sessions handed off because the ring moved them to another member"
    );
    metrics::describe_counter!(
        "berth_reroutes_total",
        "Times a connection lost its session's route and routed again"
    );
    metrics::describe_counter!(
        "berth_forwarded_ops_total",
        "Ops sent to a session's owner on another node"
    );
    metrics::describe_counter!(
        "berth_forwarded_attaches_total",
        "Connections attached to a session on another node"
    );
    metrics::describe_counter!(
        "berth_peer_auth_failures_total",
        "Peer connections refused for failing the secret handshake"
    );
    metrics::describe_counter!(
        "berth_auth_failures_total",
        "Client hellos refused for their credential, by reason (required, expired, signature, audience, issuer, malformed, subject)"
    );
    Ok(handle)
}
