//! The result of a run: what the summary, `--json`, `--report` and
//! `--threshold` are computed from. The JSON field names are a contract with
//! the people and scripts that read it: add fields, never rename them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
}

/// What the verifier found, over every session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verify {
    /// Sessions whose state was checked against the expected state.
    pub sessions_checked: u64,
    /// Acknowledged ops whose effect is missing from the server's state.
    pub lost_acked_ops: u64,
    /// Ops whose effect appears more than once.
    pub duplicate_ops: u64,
    /// Events skipped (a seq jumped over one never received).
    pub event_gaps: u64,
    /// Events received twice.
    pub event_duplicates: u64,
    /// Sessions whose state differs from the expected one in another way.
    pub state_mismatches: u64,
}

/// Windows of a failover, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// One chaos event and how long the sessions it affected could not be served.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    /// The event as given (`kill:2`, `start`, `drain:1`, `restart-redis`).
    pub event: String,
    /// When it happened, seconds from the start of the run.
    pub at_s: f64,
    /// Sessions that had an op (or a connection) stall across it.
    pub sessions_affected: u64,
    /// How long they stalled.
    pub window_ms: Window,
}

/// One node as the admin endpoints report it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStat {
    /// Node id.
    pub id: String,
    /// Peak resident memory, bytes (`VmHWM`, when the process is local).
    pub peak_rss_bytes: u64,
    /// Live sessions at the end of the run (or at its last sample).
    pub sessions: u64,
}

/// One second of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds from the start.
    pub t_s: f64,
    /// Ops answered in that second.
    pub ops_per_s: f64,
    /// Median latency of that second, ms.
    pub p50_ms: f64,
    /// 99th percentile latency of that second, ms.
    pub p99_ms: f64,
    /// Error answers in that second.
    pub errors: u64,
    /// Connected sessions at the end of that second.
    pub connected: u64,
    /// Live sessions per node id (sampled from the admin endpoints; may be empty).
    pub sessions_per_node: BTreeMap<String, u64>,
}

/// A marker on the charts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// Seconds from the start.
    pub at_s: f64,
    /// What happened.
    pub label: String,
}

/// Top-level fields of the `--json` output that other tools rely on (the
/// issue's contract); tests check that every one is present.
pub const CONTRACT_FIELDS: [&str; 8] = [
    "ops",
    "ops_per_s",
    "latency_ms",
    "errors",
    "reconnects",
    "verify",
    "failover",
    "nodes",
];

/// A whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Scenario name (`kv`, `echo`, `events`, `idle`, `churn`).
    pub scenario: String,
    /// `closed` or `open`.
    pub model: String,
    /// Open model: intended ops per second, overall.
    pub rate: Option<f64>,
    /// Virtual clients.
    pub sessions: u64,
    /// Measured duration, seconds.
    pub duration_s: f64,
    /// Ops answered.
    pub ops: u64,
    /// Ops answered per second.
    pub ops_per_s: f64,
    /// Op latency (open model: from the intended send time).
    pub latency_ms: Percentiles,
    /// Time to connect and receive `welcome` for a new session.
    pub connect_ms: Percentiles,
    /// Time to reconnect and receive `welcome` for a resumed session.
    pub resume_ms: Percentiles,
    /// Error answers by code (and client-side failures as `client_*`).
    pub errors: BTreeMap<String, u64>,
    /// Connections lost and made again.
    pub reconnects: u64,
    /// Resumes that found the session.
    pub resumes_ok: u64,
    /// Resumes refused (4004, bad token) or that never succeeded.
    pub resumes_failed: u64,
    /// Verification.
    pub verify: Verify,
    /// Chaos events and their windows.
    pub failover: Vec<Failover>,
    /// Nodes.
    pub nodes: Vec<NodeStat>,
    /// Per-second series for the charts.
    pub timeline: Vec<Sample>,
    /// Chart markers (chaos events).
    pub marks: Vec<Mark>,
}

impl RunResult {
    /// Total error answers.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}
