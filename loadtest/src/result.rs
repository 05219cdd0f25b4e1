//! The result of a run: what the summary, `--json`, `--report` and
//! `--threshold` are computed from. The JSON field names are a contract with
//! the people and scripts that read it: add fields, never rename them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::client::ConnEnd;

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
    /// Sessions whose client the server sent away during the run (a close
    /// code that says not to reconnect: 4000, 4004, 1008, 1000; or a resume
    /// refused as `session_not_found` / `bad_token`) although it was the
    /// session's only client. Their state is still checked, on a fresh
    /// connection: a phone told to stop is a failure even if nothing is lost.
    #[serde(default)]
    pub sessions_sent_away: u64,
    /// Ops whose effect appears more than once.
    pub duplicate_ops: u64,
    /// Events skipped (a seq jumped over one never received).
    pub event_gaps: u64,
    /// Events received twice.
    pub event_duplicates: u64,
    /// Sessions whose state differs from the expected one in another way
    /// (and, in `kv-churn`, re-sent ids answered as if they were new: without
    /// `duplicate: true`).
    pub state_mismatches: u64,
    /// Sessions that had acknowledged no state-changing op and were answered
    /// 4004 (`session_not_found`): by protocol.md a session is written by its
    /// first state-changing op, so one lost with its node before that held
    /// nothing and its client starts anew. Not a failure; reported so a
    /// change in how often it happens shows.
    #[serde(default)]
    pub empty_sessions_ended: u64,
    /// `chat`: deliveries of acknowledged lines and direct messages that
    /// never arrived at a member (or receiver) by the end of the drain, and
    /// lines a room numbered that a member skipped (a gap in its `seq`s),
    /// acknowledged or not.
    #[serde(default)]
    pub lost_messages: u64,
    /// `chat`: lines and direct messages that arrived twice (or more) at
    /// one member.
    #[serde(default)]
    pub duplicate_messages: u64,
    /// `chat`: lines and direct messages that arrived at a member before an
    /// earlier one of the same sender, or with a room `seq` not above the
    /// previous one (or another `seq` than other members saw).
    #[serde(default)]
    pub messages_out_of_order: u64,
}

impl Verify {
    /// Acknowledged data lost, applied twice, or otherwise not as expected:
    /// every counter but `sessions_sent_away` (and `sessions_checked`).
    pub fn data_problems(&self) -> u64 {
        self.lost_acked_ops
            + self.duplicate_ops
            + self.event_gaps
            + self.event_duplicates
            + self.state_mismatches
            + self.lost_messages
            + self.duplicate_messages
            + self.messages_out_of_order
    }

    /// Everything that must be 0 for a clean run: the data problems and the
    /// sessions sent away.
    pub fn problem_count(&self) -> u64 {
        self.data_problems() + self.sessions_sent_away
    }

    /// Adds `other`'s counters to these (sessions' figures into the run's).
    pub fn add(&mut self, other: &Verify) {
        self.sessions_checked += other.sessions_checked;
        self.lost_acked_ops += other.lost_acked_ops;
        self.sessions_sent_away += other.sessions_sent_away;
        self.duplicate_ops += other.duplicate_ops;
        self.event_gaps += other.event_gaps;
        self.event_duplicates += other.event_duplicates;
        self.state_mismatches += other.state_mismatches;
        self.empty_sessions_ended += other.empty_sessions_ended;
        self.lost_messages += other.lost_messages;
        self.duplicate_messages += other.duplicate_messages;
        self.messages_out_of_order += other.messages_out_of_order;
    }
}

/// What a fresh connection that resumed a session (its own client being
/// stopped, or unable to read the state) found when it read the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreshResume {
    /// The state was read (and verified like a live session's).
    StateRead,
    /// The server does not know the session (`session_not_found`, 4004).
    NotFound,
    /// The server refused the session's token (`bad_token`, 1008).
    BadToken,
    /// Closed with another code that says not to reconnect.
    Stopped {
        /// The close code.
        code: u16,
    },
    /// The `state` op was answered with an error.
    Error {
        /// Its error code.
        code: String,
    },
    /// No answer before the deadline (no connection, or no result).
    Unreachable,
}

impl std::fmt::Display for FreshResume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FreshResume::StateRead => f.write_str("state read"),
            FreshResume::NotFound => f.write_str("session not found"),
            FreshResume::BadToken => f.write_str("bad token"),
            FreshResume::Stopped { code } => write!(f, "stopped with close {code}"),
            FreshResume::Error { code } => write!(f, "state op failed: {code}"),
            FreshResume::Unreachable => f.write_str("unreachable until the deadline"),
        }
    }
}

/// One session with a problem (anything [`Verify`] counts, or a fresh resume
/// that could not read its state) and what its client saw, to tell "the
/// client was sent away" from "the state was lost".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// The virtual client's index in the run.
    pub client: u64,
    /// The session id (`None`: never welcomed).
    pub session: Option<String>,
    /// What the verifier found in this session alone.
    pub found: Verify,
    /// How the client's last connection (or attempt at one) ended.
    pub last_end: Option<ConnEnd>,
    /// The client's error answers by code (`client_*` for its own failures).
    pub errors: BTreeMap<String, u64>,
    /// Connections the client lost and made again.
    pub reconnects: u64,
    /// Resumes of the client that found the session.
    pub resumes_ok: u64,
    /// The node of its last `welcome` (the session's owner then).
    pub node: Option<String>,
    /// The session `version` in the last `welcome` or `result` it received.
    pub last_version: u64,
    /// What a fresh connection resuming the session found (`None`: not
    /// needed, the client read the state itself).
    pub fresh_resume: Option<FreshResume>,
    /// The last things that happened to the client's connections, each
    /// with its time in seconds from the start of the run
    /// (`"12.345s lost on 127.0.0.1:4321: close 4000 …"`).
    #[serde(default)]
    pub trail: Vec<String>,
    /// What the verifier found wrong, in words (`"append 17 is in the log 2
    /// times"`; at most 8).
    #[serde(default)]
    pub notes: Vec<String>,
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

/// A distribution over chaos events: the median, 99th percentile (nearest
/// rank) and largest of one figure of every event of a kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OverEvents {
    /// Median over the events.
    pub p50: f64,
    /// 99th percentile over the events.
    pub p99: f64,
    /// Largest over the events.
    pub max: f64,
}

impl OverEvents {
    /// The distribution of `values` (all 0 when there are none).
    pub fn of(mut values: Vec<f64>) -> OverEvents {
        values.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| {
            if values.is_empty() {
                0.0
            } else {
                values[((values.len() - 1) as f64 * p).round() as usize]
            }
        };
        OverEvents {
            p50: q(0.5),
            p99: q(0.99),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

/// The failover windows of every chaos event of one kind (a soak's 50 kills,
/// say), summed up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverKind {
    /// What the events did: `kill`, `restart`, `start`, `drain`,
    /// `restart-redis` (the event's name up to `:`, `@` or a space).
    pub kind: String,
    /// Events of this kind.
    pub events: u64,
    /// Over the events: sessions affected.
    pub sessions_affected: OverEvents,
    /// Over the events: each event's p99 window, ms.
    pub window_p99_ms: OverEvents,
    /// Over the events: each event's largest window, ms.
    pub window_max_ms: OverEvents,
}

/// The failover windows of `failover` by kind of event, kinds in the order
/// they first occur.
pub fn failover_by_kind(failover: &[Failover]) -> Vec<FailoverKind> {
    let kind = |f: &Failover| {
        f.event
            .split([':', '@', ' '])
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let mut kinds: Vec<String> = Vec::new();
    for f in failover {
        let k = kind(f);
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    kinds
        .into_iter()
        .map(|k| {
            let of: Vec<&Failover> = failover.iter().filter(|f| kind(f) == k).collect();
            let over = |g: fn(&Failover) -> f64| OverEvents::of(of.iter().map(|f| g(f)).collect());
            FailoverKind {
                events: of.len() as u64,
                sessions_affected: over(|f| f.sessions_affected as f64),
                window_p99_ms: over(|f| f.window_ms.p99),
                window_max_ms: over(|f| f.window_ms.max),
                kind: k,
            }
        })
        .collect()
}

/// What the clients did on purpose to their connections and op ids
/// (`churn`, `kv-churn`; all 0 in the other scenarios).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Churn {
    /// Connections let go of between two ops (`churn`: closed; `kv-churn`:
    /// dropped without a close frame); the next op resumes the session.
    pub drops: u64,
    /// Roams: the connection closed and the next op sent through the next
    /// node's URL.
    pub roams: u64,
    /// Ops whose connection was dropped (or roamed away from) right after
    /// they were sent, and that were re-sent with the same id on the resumed
    /// connection.
    pub cut_ops: u64,
    /// Ids of acknowledged writes sent again, each to be answered as a
    /// duplicate and not applied (the state check counts one applied twice).
    pub resent_ids: u64,
}

impl Churn {
    /// Adds `other`'s counters to these.
    pub fn add(&mut self, other: &Churn) {
        self.drops += other.drops;
        self.roams += other.roams;
        self.cut_ops += other.cut_ops;
        self.resent_ids += other.resent_ids;
    }

    /// Whether anything was done.
    pub fn any(&self) -> bool {
        self.drops + self.roams + self.cut_ops + self.resent_ids > 0
    }
}

/// `chat`: what was said, what arrived, and how fast (its counters of
/// problems are also in [`Verify`], where they fail the run).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Messages {
    /// Rooms.
    pub rooms: u64,
    /// Members per room (as planned; a member counts once its `join` is
    /// acknowledged).
    pub room_size: u64,
    /// `say` ops acknowledged.
    pub lines_acked: u64,
    /// `dm` ops acknowledged.
    pub dms_acked: u64,
    /// `say` and `dm` ops never answered (cut off by the end or by chaos):
    /// each may arrive or not, but at most once.
    pub unacked: u64,
    /// Deliveries the acknowledged messages owe: a line to every member of
    /// its room (its sender included), a direct message to its receiver and
    /// to its sender's device.
    pub deliveries_expected: u64,
    /// Of those, the deliveries that arrived.
    pub delivered: u64,
    /// Expected deliveries that did not arrive by the end of the drain, plus
    /// lines skipped in a member's `seq`s (see [`Verify::lost_messages`]).
    pub lost: u64,
    /// Deliveries that arrived more than once.
    pub duplicated: u64,
    /// Deliveries out of order.
    pub out_of_order: u64,
    /// Line and direct-message events that no client of the run sent, or
    /// sent elsewhere, or whose op was refused (counted in
    /// [`Verify::state_mismatches`]).
    pub unexpected: u64,
    /// How long lines were said (from the moment every member had joined to
    /// the end of the load), seconds.
    pub say_s: f64,
    /// Acknowledged lines per second of `say_s`.
    pub lines_per_s: f64,
    /// Deliveries per second, from the first line said to the last delivery.
    pub deliveries_per_s: f64,
    /// Delivery latency: from a `say` op's first send to its line's arrival
    /// at each other member (same process, monotonic clock).
    pub delivery_ms: Percentiles,
    /// What the verifier found wrong, in words (at most 16).
    #[serde(default)]
    pub notes: Vec<String>,
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
    /// Scenario name (`kv`, `echo`, `events`, `idle`, `churn`, `kv-churn`).
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
    /// The windows of `failover` by kind of event (over a soak's kills, say).
    #[serde(default)]
    pub failover_by_kind: Vec<FailoverKind>,
    /// What the clients did on purpose to their connections and op ids.
    #[serde(default)]
    pub churn: Churn,
    /// Nodes.
    pub nodes: Vec<NodeStat>,
    /// Per-second series for the charts.
    pub timeline: Vec<Sample>,
    /// Chart markers (chaos events).
    pub marks: Vec<Mark>,
    /// Every session with a problem, by client index.
    #[serde(default)]
    pub problems: Vec<Problem>,
    /// `chat`: the messages' figures (absent in the other scenarios).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Messages>,
}

impl RunResult {
    /// Total error answers.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}
