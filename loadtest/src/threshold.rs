//! Pass/fail thresholds over a [`RunResult`], in the style of k6:
//! `p99<20ms`, `errors<0.1%`, `lost_acked_ops==0`.
//!
//! This module owns the grammar (`<metric><op><value>`, spaces allowed
//! anywhere between the three parts), the units a value may carry and the
//! comparison. It does not decide what a failed threshold does to the exit
//! status; the binary does that with the [`Check`]s it gets back.
//!
//! Values are normalised when parsed: durations to milliseconds (the unit of
//! every latency field of [`RunResult`]), sizes to bytes. A bare number on a
//! latency metric means milliseconds, on `peak_rss_bytes` bytes.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::result::*;

/// Every metric name a threshold accepts, for error messages and `--help`.
pub const KNOWN_METRICS: &str = "p50, p90, p99, p999, max, connect_p99, resume_p99, \
     ops_per_s, ops, errors, errors.<code>, reconnects, resumes_failed, lost_acked_ops, \
     sessions_sent_away, duplicate_ops, event_gaps, event_duplicates, state_mismatches, failover_p99, \
     failover_max, peak_rss_bytes";

/// Every comparison operator a threshold accepts, for error messages.
const KNOWN_OPS: &str = "<, <=, >, >=, ==, !=";

/// Why a threshold expression was refused. Every variant carries the
/// expression as written so that a list of `--threshold` flags points at the
/// one that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ThresholdError {
    /// No comparison operator anywhere in the expression.
    #[error("threshold `{expr}`: missing operator (expected `<metric><op><value>` with one of {KNOWN_OPS})")]
    MissingOperator {
        /// The expression as written.
        expr: String,
    },
    /// Operator characters that do not form a known operator (`=`, `=<`, `<>`).
    #[error("threshold `{expr}`: unknown operator `{op}` (known: {KNOWN_OPS})")]
    UnknownOperator {
        /// The expression as written.
        expr: String,
        /// The operator characters found.
        op: String,
    },
    /// Nothing before the operator.
    #[error("threshold `{expr}`: missing metric before the operator (known: {KNOWN_METRICS})")]
    MissingMetric {
        /// The expression as written.
        expr: String,
    },
    /// A metric name this module does not know.
    #[error("threshold `{expr}`: unknown metric `{metric}` (known: {KNOWN_METRICS})")]
    UnknownMetric {
        /// The expression as written.
        expr: String,
        /// The metric name found.
        metric: String,
    },
    /// `errors.` without a code after the dot.
    #[error("threshold `{expr}`: `errors.` needs an error code, e.g. `errors.4004` or `errors.client_timeout`")]
    MissingErrorCode {
        /// The expression as written.
        expr: String,
    },
    /// Nothing after the operator.
    #[error("threshold `{expr}`: missing value after the operator")]
    MissingValue {
        /// The expression as written.
        expr: String,
    },
    /// The value is not a finite number.
    #[error("threshold `{expr}`: `{value}` is not a number")]
    BadNumber {
        /// The expression as written.
        expr: String,
        /// The value part, without its unit.
        value: String,
    },
    /// A `%` on a metric other than `errors`.
    #[error(
        "threshold `{expr}`: `%` only applies to `errors` (a share of ops), not to `{metric}`"
    )]
    PercentNotAllowed {
        /// The expression as written.
        expr: String,
        /// The metric the `%` was put on.
        metric: String,
    },
    /// A unit the metric does not take (`ops<5ms`, `p99<20min`).
    #[error("threshold `{expr}`: unit `{unit}` does not apply to `{metric}` ({expected})")]
    BadUnit {
        /// The expression as written.
        expr: String,
        /// The metric.
        metric: String,
        /// The unit found.
        unit: String,
        /// What the metric takes instead.
        expected: &'static str,
    },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Op {
    /// The operator as written in an expression.
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }

    fn from_symbol(s: &str) -> Option<Op> {
        Some(match s {
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            "==" => Op::Eq,
            "!=" => Op::Ne,
            _ => return None,
        })
    }

    /// Whether `actual <op> limit` holds. Values within a relative 1e-9 of
    /// each other compare equal, so that `p99==0.1s` (0.1 * 1000 in floating
    /// point) matches a p99 of 100 ms, and `<` stays the negation of `>=`.
    fn holds(self, actual: f64, limit: f64) -> bool {
        if actual.is_nan() {
            return false;
        }
        let scale = actual.abs().max(limit.abs()).max(1.0);
        let ord = if (actual - limit).abs() <= 1e-9 * scale {
            Ordering::Equal
        } else if actual < limit {
            Ordering::Less
        } else {
            Ordering::Greater
        };
        match self {
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
            Op::Eq => ord == Ordering::Equal,
            Op::Ne => ord != Ordering::Equal,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

/// What a threshold measures: one number of a [`RunResult`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Metric {
    /// `p50`: median op latency, ms.
    P50,
    /// `p90`: 90th percentile op latency, ms.
    P90,
    /// `p99`: 99th percentile op latency, ms.
    P99,
    /// `p999`: 99.9th percentile op latency, ms.
    P999,
    /// `max`: largest op latency, ms.
    Max,
    /// `connect_p99`: 99th percentile time to connect, ms.
    ConnectP99,
    /// `resume_p99`: 99th percentile time to resume, ms.
    ResumeP99,
    /// `ops_per_s`: ops answered per second.
    OpsPerS,
    /// `ops`: ops answered.
    Ops,
    /// `errors`: error answers, all codes (a count, or a share of ops with `%`).
    Errors,
    /// `errors.<code>`: error answers with one code.
    ErrorCode(String),
    /// `reconnects`: connections lost and made again.
    Reconnects,
    /// `resumes_failed`: resumes refused or never successful.
    ResumesFailed,
    /// `lost_acked_ops`: acknowledged ops missing from the server's state.
    LostAckedOps,
    /// `sessions_sent_away`: sessions whose only client the server told to stop.
    SessionsSentAway,
    /// `duplicate_ops`: ops applied more than once.
    DuplicateOps,
    /// `event_gaps`: events skipped.
    EventGaps,
    /// `event_duplicates`: events received twice.
    EventDuplicates,
    /// `state_mismatches`: sessions whose state differs otherwise.
    StateMismatches,
    /// `failover_p99`: largest p99 window over all chaos events, ms (0 if none).
    FailoverP99,
    /// `failover_max`: largest max window over all chaos events, ms (0 if none).
    FailoverMax,
    /// `peak_rss_bytes`: largest peak RSS over all nodes, bytes (0 if none).
    PeakRssBytes,
}

/// How a metric's value is written and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Milliseconds; `us`, `ms`, `s` accepted.
    Duration,
    /// Bytes; `B`, `KB`, `MB`, `GB` (powers of 1024) accepted.
    Bytes,
    /// A whole count; no unit.
    Count,
    /// A rate; no unit.
    Rate,
}

impl Kind {
    /// The factor that turns a number written with `unit` into this kind's
    /// base unit (ms, bytes), or `None` if the kind does not take the unit.
    fn scale(self, unit: &str) -> Option<f64> {
        let unit = unit.to_ascii_lowercase();
        match (self, unit.as_str()) {
            (_, "") => Some(1.0),
            (Kind::Duration, "ms") => Some(1.0),
            (Kind::Duration, "us" | "µs") => Some(0.001),
            (Kind::Duration, "s") => Some(1000.0),
            (Kind::Bytes, "b") => Some(1.0),
            (Kind::Bytes, "kb" | "kib") => Some(1024.0),
            (Kind::Bytes, "mb" | "mib") => Some(1024.0 * 1024.0),
            (Kind::Bytes, "gb" | "gib") => Some(1024.0 * 1024.0 * 1024.0),
            _ => None,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Duration => {
                "expected a duration: a bare number of ms, or a number with us, ms or s"
            }
            Kind::Bytes => "expected a size: a bare number of bytes, or a number with KB, MB or GB",
            Kind::Count | Kind::Rate => "expected a plain number",
        }
    }
}

impl Metric {
    fn from_name(name: &str) -> Option<Metric> {
        if let Some(code) = name.strip_prefix("errors.") {
            return Some(Metric::ErrorCode(code.to_string()));
        }
        Some(match name {
            "p50" => Metric::P50,
            "p90" => Metric::P90,
            "p99" => Metric::P99,
            "p999" => Metric::P999,
            "max" => Metric::Max,
            "connect_p99" => Metric::ConnectP99,
            "resume_p99" => Metric::ResumeP99,
            "ops_per_s" => Metric::OpsPerS,
            "ops" => Metric::Ops,
            "errors" => Metric::Errors,
            "reconnects" => Metric::Reconnects,
            "resumes_failed" => Metric::ResumesFailed,
            "lost_acked_ops" => Metric::LostAckedOps,
            "sessions_sent_away" => Metric::SessionsSentAway,
            "duplicate_ops" => Metric::DuplicateOps,
            "event_gaps" => Metric::EventGaps,
            "event_duplicates" => Metric::EventDuplicates,
            "state_mismatches" => Metric::StateMismatches,
            "failover_p99" => Metric::FailoverP99,
            "failover_max" => Metric::FailoverMax,
            "peak_rss_bytes" => Metric::PeakRssBytes,
            _ => return None,
        })
    }

    fn kind(&self) -> Kind {
        match self {
            Metric::P50
            | Metric::P90
            | Metric::P99
            | Metric::P999
            | Metric::Max
            | Metric::ConnectP99
            | Metric::ResumeP99
            | Metric::FailoverP99
            | Metric::FailoverMax => Kind::Duration,
            Metric::PeakRssBytes => Kind::Bytes,
            Metric::OpsPerS => Kind::Rate,
            Metric::Ops
            | Metric::Errors
            | Metric::ErrorCode(_)
            | Metric::Reconnects
            | Metric::ResumesFailed
            | Metric::LostAckedOps
            | Metric::SessionsSentAway
            | Metric::DuplicateOps
            | Metric::EventGaps
            | Metric::EventDuplicates
            | Metric::StateMismatches => Kind::Count,
        }
    }

    /// The metric's value in `r`, in its base unit (ms, bytes, count, ops/s).
    fn value(&self, r: &RunResult) -> f64 {
        let v = &r.verify;
        match self {
            Metric::P50 => r.latency_ms.p50,
            Metric::P90 => r.latency_ms.p90,
            Metric::P99 => r.latency_ms.p99,
            Metric::P999 => r.latency_ms.p999,
            Metric::Max => r.latency_ms.max,
            Metric::ConnectP99 => r.connect_ms.p99,
            Metric::ResumeP99 => r.resume_ms.p99,
            Metric::OpsPerS => r.ops_per_s,
            Metric::Ops => r.ops as f64,
            Metric::Errors => r.error_count() as f64,
            Metric::ErrorCode(code) => r.errors.get(code).copied().unwrap_or(0) as f64,
            Metric::Reconnects => r.reconnects as f64,
            Metric::ResumesFailed => r.resumes_failed as f64,
            Metric::LostAckedOps => v.lost_acked_ops as f64,
            Metric::SessionsSentAway => v.sessions_sent_away as f64,
            Metric::DuplicateOps => v.duplicate_ops as f64,
            Metric::EventGaps => v.event_gaps as f64,
            Metric::EventDuplicates => v.event_duplicates as f64,
            Metric::StateMismatches => v.state_mismatches as f64,
            Metric::FailoverP99 => r
                .failover
                .iter()
                .map(|f| f.window_ms.p99)
                .fold(0.0, f64::max),
            Metric::FailoverMax => r
                .failover
                .iter()
                .map(|f| f.window_ms.max)
                .fold(0.0, f64::max),
            Metric::PeakRssBytes => {
                r.nodes.iter().map(|n| n.peak_rss_bytes).max().unwrap_or(0) as f64
            }
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Metric::P50 => "p50",
            Metric::P90 => "p90",
            Metric::P99 => "p99",
            Metric::P999 => "p999",
            Metric::Max => "max",
            Metric::ConnectP99 => "connect_p99",
            Metric::ResumeP99 => "resume_p99",
            Metric::OpsPerS => "ops_per_s",
            Metric::Ops => "ops",
            Metric::Errors => "errors",
            Metric::ErrorCode(code) => return write!(f, "errors.{code}"),
            Metric::Reconnects => "reconnects",
            Metric::ResumesFailed => "resumes_failed",
            Metric::LostAckedOps => "lost_acked_ops",
            Metric::SessionsSentAway => "sessions_sent_away",
            Metric::DuplicateOps => "duplicate_ops",
            Metric::EventGaps => "event_gaps",
            Metric::EventDuplicates => "event_duplicates",
            Metric::StateMismatches => "state_mismatches",
            Metric::FailoverP99 => "failover_p99",
            Metric::FailoverMax => "failover_max",
            Metric::PeakRssBytes => "peak_rss_bytes",
        };
        f.write_str(name)
    }
}

/// A parsed threshold: a metric, an operator and a limit in the metric's
/// base unit. Built by [`parse`] (or `str::parse`, for clap).
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    expr: String,
    metric: Metric,
    op: Op,
    value: f64,
    percent: bool,
}

/// The outcome of one threshold against one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The threshold as written (trimmed).
    pub expr: String,
    /// The value measured, with its unit (`12.5ms`, `0.02%`, `3`).
    pub actual: String,
    /// Whether the threshold held.
    pub ok: bool,
}

/// Parses `<metric><op><value>`, e.g. `p99<20ms`, `errors < 0.1%`,
/// `peak_rss_bytes<=512MB`, `lost_acked_ops==0`.
pub fn parse(expr: &str) -> Result<Threshold, ThresholdError> {
    let expr = expr.trim();
    let owned = || expr.to_string();

    let op_at = expr
        .find(['<', '>', '=', '!'])
        .ok_or_else(|| ThresholdError::MissingOperator { expr: owned() })?;
    // Take the whole run of operator characters, so that `=<` or `<>` is
    // reported as an unknown operator rather than as a strange value.
    let op_len = expr[op_at..]
        .bytes()
        .take_while(|b| b"<>=!".contains(b))
        .count();
    let op_str = &expr[op_at..op_at + op_len];
    let op = Op::from_symbol(op_str).ok_or_else(|| ThresholdError::UnknownOperator {
        expr: owned(),
        op: op_str.to_string(),
    })?;

    let name = expr[..op_at].trim();
    if name.is_empty() {
        return Err(ThresholdError::MissingMetric { expr: owned() });
    }
    let metric = Metric::from_name(name).ok_or_else(|| ThresholdError::UnknownMetric {
        expr: owned(),
        metric: name.to_string(),
    })?;
    if metric == Metric::ErrorCode(String::new()) {
        return Err(ThresholdError::MissingErrorCode { expr: owned() });
    }

    let raw = expr[op_at + op_len..].trim();
    if raw.is_empty() {
        return Err(ThresholdError::MissingValue { expr: owned() });
    }
    let (raw, percent) = match raw.strip_suffix('%') {
        Some(rest) => (rest.trim_end(), true),
        None => (raw, false),
    };
    if percent && metric != Metric::Errors {
        return Err(ThresholdError::PercentNotAllowed {
            expr: owned(),
            metric: metric.to_string(),
        });
    }

    // The unit is the trailing run of letters; exponents (`1e3`) end in a
    // digit, so they stay with the number.
    let number_len = raw.trim_end_matches(char::is_alphabetic).len();
    let (number, unit) = (raw[..number_len].trim_end(), &raw[number_len..]);
    let bad_number = || ThresholdError::BadNumber {
        expr: owned(),
        value: (if number.is_empty() { raw } else { number }).to_string(),
    };
    let n: f64 = number.parse().map_err(|_| bad_number())?;
    if !n.is_finite() {
        return Err(bad_number());
    }
    let kind = metric.kind();
    let scale = kind.scale(unit).ok_or_else(|| ThresholdError::BadUnit {
        expr: owned(),
        metric: metric.to_string(),
        unit: unit.to_string(),
        expected: kind.expected(),
    })?;

    Ok(Threshold {
        expr: expr.to_string(),
        metric,
        op,
        value: n * scale,
        percent,
    })
}

impl FromStr for Threshold {
    type Err = ThresholdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expr)
    }
}

impl Threshold {
    /// The expression as written (trimmed).
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The metric compared.
    pub fn metric(&self) -> &Metric {
        &self.metric
    }

    /// The operator.
    pub fn op(&self) -> Op {
        self.op
    }

    /// The limit, in the metric's base unit: ms for latencies, bytes for
    /// `peak_rss_bytes`, a percentage when [`Threshold::is_percent`].
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Whether the limit is a percentage of ops (only for `errors`).
    pub fn is_percent(&self) -> bool {
        self.percent
    }

    /// Compares the run against the threshold.
    pub fn check(&self, r: &RunResult) -> Check {
        let (actual, shown) = if self.percent {
            // A run without ops has no error rate to speak of: 0%, so that an
            // empty run fails on `ops>0`, not on a division by zero.
            let pct = if r.ops == 0 {
                0.0
            } else {
                r.error_count() as f64 * 100.0 / r.ops as f64
            };
            (pct, format!("{}%", fmt_number(pct)))
        } else {
            let v = self.metric.value(r);
            let shown = match self.metric.kind() {
                Kind::Duration => format!("{}ms", fmt_number(v)),
                Kind::Bytes => fmt_bytes(v),
                Kind::Count | Kind::Rate => fmt_number(v),
            };
            (v, shown)
        };
        Check {
            expr: self.expr.clone(),
            actual: shown,
            ok: self.op.holds(actual, self.value),
        }
    }
}

/// Checks every threshold against the run, in order.
pub fn check_all(thresholds: &[Threshold], r: &RunResult) -> Vec<Check> {
    thresholds.iter().map(|t| t.check(r)).collect()
}

/// A number without needless zeros: whole numbers as integers, others with
/// three decimals, or enough to show two significant digits of a small value
/// (an error rate of 0.0001% must not print as 0).
fn fmt_number(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let a = v.abs();
    let decimals = if a >= 1.0 {
        3
    } else {
        ((-a.log10()).ceil() as usize + 1).clamp(3, 12)
    };
    let s = format!("{v:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Bytes in the largest power-of-1024 unit that keeps the number >= 1.
fn fmt_bytes(v: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
    let mut x = v;
    let mut unit = 0;
    while x.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{}B", fmt_number(x))
    } else {
        format!("{x:.2}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunResult {
        let mut r = RunResult {
            scenario: "kv".into(),
            model: "closed".into(),
            sessions: 100,
            duration_s: 10.0,
            ops: 10_000,
            ops_per_s: 1000.0,
            latency_ms: Percentiles {
                p50: 1.5,
                p90: 4.0,
                p99: 12.0,
                p999: 30.0,
                max: 80.0,
            },
            connect_ms: Percentiles {
                p99: 25.0,
                ..Default::default()
            },
            resume_ms: Percentiles {
                p99: 40.0,
                ..Default::default()
            },
            reconnects: 7,
            resumes_ok: 6,
            resumes_failed: 1,
            verify: Verify {
                sessions_checked: 100,
                lost_acked_ops: 2,
                sessions_sent_away: 9,
                duplicate_ops: 3,
                event_gaps: 4,
                event_duplicates: 5,
                state_mismatches: 6,
                empty_sessions_ended: 0,
                ..Verify::default()
            },
            failover: vec![
                Failover {
                    event: "kill:2".into(),
                    at_s: 3.0,
                    sessions_affected: 30,
                    window_ms: Window {
                        p50: 100.0,
                        p99: 450.0,
                        max: 500.0,
                    },
                },
                Failover {
                    event: "start".into(),
                    at_s: 6.0,
                    sessions_affected: 10,
                    window_ms: Window {
                        p50: 50.0,
                        p99: 900.0,
                        max: 950.0,
                    },
                },
            ],
            nodes: vec![
                NodeStat {
                    id: "n1".into(),
                    peak_rss_bytes: 100 * 1024 * 1024,
                    sessions: 50,
                },
                NodeStat {
                    id: "n2".into(),
                    peak_rss_bytes: 300 * 1024 * 1024,
                    sessions: 50,
                },
            ],
            ..Default::default()
        };
        r.errors.insert("4004".into(), 8);
        r.errors.insert("client_timeout".into(), 2);
        r
    }

    fn check(expr: &str) -> Check {
        parse(expr).unwrap().check(&run())
    }

    #[test]
    fn parses_metric_op_and_value() {
        let t = parse("p99<20ms").unwrap();
        assert_eq!(t.metric(), &Metric::P99);
        assert_eq!(t.op(), Op::Lt);
        assert_eq!(t.value(), 20.0);
        assert!(!t.is_percent());
        assert_eq!(t.expr(), "p99<20ms");
    }

    #[test]
    fn spaces_are_allowed_around_every_part() {
        let t = parse("  p99  <=  20 ms ").unwrap();
        assert_eq!(t.metric(), &Metric::P99);
        assert_eq!(t.op(), Op::Le);
        assert_eq!(t.value(), 20.0);
        assert_eq!(t.expr(), "p99  <=  20 ms");
        let t = parse("errors < 0.1 %").unwrap();
        assert!(t.is_percent());
        assert_eq!(t.value(), 0.1);
    }

    #[test]
    fn parses_every_operator() {
        for (s, op) in [
            ("<", Op::Lt),
            ("<=", Op::Le),
            (">", Op::Gt),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("!=", Op::Ne),
        ] {
            let t = parse(&format!("ops{s}5")).unwrap();
            assert_eq!(t.op(), op, "{s}");
            assert_eq!(op.symbol(), s);
            assert_eq!(t.value(), 5.0);
        }
    }

    #[test]
    fn parses_every_metric_name() {
        for name in KNOWN_METRICS.split(", ") {
            let name = name.replace("<code>", "4004");
            let t = parse(&format!("{name}>=0")).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(t.metric().to_string(), name);
        }
        assert_eq!(
            parse("errors.client_timeout<1").unwrap().metric(),
            &Metric::ErrorCode("client_timeout".into())
        );
    }

    #[test]
    fn durations_are_normalised_to_ms() {
        assert_eq!(parse("p99<20").unwrap().value(), 20.0);
        assert_eq!(parse("p99<20ms").unwrap().value(), 20.0);
        assert_eq!(parse("p99<0.5s").unwrap().value(), 500.0);
        assert_eq!(parse("p99<2s").unwrap().value(), 2000.0);
        assert_eq!(parse("p99<1500us").unwrap().value(), 1.5);
        assert_eq!(parse("p99<1500µs").unwrap().value(), 1.5);
        assert_eq!(parse("connect_p99<1s").unwrap().value(), 1000.0);
        assert_eq!(parse("failover_max<3s").unwrap().value(), 3000.0);
        assert_eq!(parse("max < 1e3").unwrap().value(), 1000.0);
    }

    #[test]
    fn sizes_are_powers_of_1024() {
        assert_eq!(parse("peak_rss_bytes<1000").unwrap().value(), 1000.0);
        assert_eq!(parse("peak_rss_bytes<1000B").unwrap().value(), 1000.0);
        assert_eq!(parse("peak_rss_bytes<2KB").unwrap().value(), 2048.0);
        assert_eq!(
            parse("peak_rss_bytes<512MB").unwrap().value(),
            512.0 * 1024.0 * 1024.0
        );
        assert_eq!(
            parse("peak_rss_bytes<1.5GB").unwrap().value(),
            1.5 * 1024.0 * 1024.0 * 1024.0
        );
        assert_eq!(
            parse("peak_rss_bytes<1mb").unwrap().value(),
            1024.0 * 1024.0
        );
    }

    #[test]
    fn missing_operator_is_named() {
        let e = parse("p99 20ms").unwrap_err();
        assert_eq!(
            e,
            ThresholdError::MissingOperator {
                expr: "p99 20ms".into()
            }
        );
        assert!(e.to_string().contains("missing operator"), "{e}");
    }

    #[test]
    fn unknown_operator_is_named() {
        for (expr, op) in [
            ("p99=20", "="),
            ("p99=<20", "=<"),
            ("p99<>20", "<>"),
            ("p99!20", "!"),
        ] {
            match parse(expr) {
                Err(ThresholdError::UnknownOperator { op: found, .. }) => assert_eq!(found, op),
                other => panic!("{expr}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_metric_lists_the_known_ones() {
        let e = parse("p95<20ms").unwrap_err();
        assert!(matches!(&e, ThresholdError::UnknownMetric { metric, .. } if metric == "p95"));
        let msg = e.to_string();
        assert!(msg.contains("`p95`"), "{msg}");
        assert!(
            msg.contains("p99") && msg.contains("peak_rss_bytes"),
            "{msg}"
        );
    }

    #[test]
    fn missing_parts_are_named() {
        assert!(matches!(
            parse("<20"),
            Err(ThresholdError::MissingMetric { .. })
        ));
        assert!(matches!(
            parse("p99<"),
            Err(ThresholdError::MissingValue { .. })
        ));
        assert!(matches!(
            parse("p99 <   "),
            Err(ThresholdError::MissingValue { .. })
        ));
        assert!(matches!(
            parse("errors.<1"),
            Err(ThresholdError::MissingErrorCode { .. })
        ));
    }

    #[test]
    fn bad_numbers_are_named() {
        for (expr, value) in [
            ("p99<abc", "abc"),
            ("p99<1.2.3ms", "1.2.3"),
            ("ops>-", "-"),
            ("ops>NaN", "NaN"),
            ("ops>1e999", "1e999"),
            ("errors<%", ""),
        ] {
            match parse(expr) {
                Err(ThresholdError::BadNumber { value: found, .. }) => {
                    assert_eq!(found, value, "{expr}")
                }
                other => panic!("{expr}: {other:?}"),
            }
        }
        let e = parse("p99<abc").unwrap_err();
        assert!(e.to_string().contains("`abc` is not a number"), "{e}");
    }

    #[test]
    fn percent_only_on_errors() {
        assert!(parse("errors<0.1%").unwrap().is_percent());
        for expr in ["p99<1%", "ops>50%", "errors.4004<1%", "reconnects<5%"] {
            let e = parse(expr).unwrap_err();
            assert!(
                matches!(e, ThresholdError::PercentNotAllowed { .. }),
                "{expr}: {e:?}"
            );
            assert!(e.to_string().contains("only applies to `errors`"), "{e}");
        }
    }

    #[test]
    fn units_only_where_they_mean_something() {
        for expr in [
            "ops<5ms",
            "errors<1s",
            "p99<20MB",
            "peak_rss_bytes<5ms",
            "p99<20min",
            "ops_per_s>1k",
        ] {
            let e = parse(expr).unwrap_err();
            assert!(matches!(e, ThresholdError::BadUnit { .. }), "{expr}: {e:?}");
        }
        let e = parse("p99<20min").unwrap_err();
        assert!(e.to_string().contains("unit `min`"), "{e}");
    }

    #[test]
    fn every_comparison() {
        // p99 is 12 ms.
        let cases = [
            ("p99<20", true),
            ("p99<12", false),
            ("p99<=12", true),
            ("p99<=11.9", false),
            ("p99>10", true),
            ("p99>12", false),
            ("p99>=12", true),
            ("p99>=12.1", false),
            ("p99==12", true),
            ("p99==13", false),
            ("p99!=13", true),
            ("p99!=12", false),
        ];
        for (expr, ok) in cases {
            assert_eq!(check(expr).ok, ok, "{expr}");
        }
    }

    #[test]
    fn converted_units_compare_equal() {
        // 0.012 * 1000 is not exactly 12 in floating point.
        assert!(check("p99==0.012s").ok);
        assert!(check("p99<=0.012s").ok);
        assert!(!check("p99<0.012s").ok);
        assert!(check("p99==12000us").ok);
    }

    #[test]
    fn reads_every_metric_from_the_run() {
        let cases = [
            ("p50==1.5", "1.5ms"),
            ("p90==4", "4ms"),
            ("p99==12", "12ms"),
            ("p999==30", "30ms"),
            ("max==80", "80ms"),
            ("connect_p99==25", "25ms"),
            ("resume_p99==40", "40ms"),
            ("ops_per_s==1000", "1000"),
            ("ops==10000", "10000"),
            ("errors==10", "10"),
            ("errors.4004==8", "8"),
            ("errors.client_timeout==2", "2"),
            ("errors.4001==0", "0"),
            ("reconnects==7", "7"),
            ("resumes_failed==1", "1"),
            ("lost_acked_ops==2", "2"),
            ("sessions_sent_away==9", "9"),
            ("duplicate_ops==3", "3"),
            ("event_gaps==4", "4"),
            ("event_duplicates==5", "5"),
            ("state_mismatches==6", "6"),
            ("failover_p99==900", "900ms"),
            ("failover_max==950", "950ms"),
            ("peak_rss_bytes==300MB", "300.00MB"),
        ];
        for (expr, actual) in cases {
            let c = check(expr);
            assert!(c.ok, "{expr}: {c:?}");
            assert_eq!(c.actual, actual, "{expr}");
            assert_eq!(c.expr, expr);
        }
    }

    #[test]
    fn failover_and_rss_are_zero_without_events_or_nodes() {
        let r = RunResult::default();
        for expr in ["failover_p99==0", "failover_max==0", "peak_rss_bytes==0"] {
            assert!(parse(expr).unwrap().check(&r).ok, "{expr}");
        }
    }

    #[test]
    fn errors_as_a_percentage_of_ops() {
        // 10 errors in 10000 ops is 0.1%.
        let c = check("errors<0.1%");
        assert!(!c.ok);
        assert_eq!(c.actual, "0.1%");
        assert!(check("errors<=0.1%").ok);
        assert!(check("errors<0.2%").ok);
        assert!(!check("errors>0.1%").ok);

        let mut r = run();
        r.errors.clear();
        r.errors.insert("4004".into(), 1);
        r.ops = 1_000_000;
        let c = parse("errors<0.001%").unwrap().check(&r);
        assert!(c.ok);
        assert_eq!(c.actual, "0.0001%");
    }

    #[test]
    fn percentage_of_zero_ops_is_zero() {
        let mut r = RunResult::default();
        r.errors.insert("client_connect".into(), 5);
        let c = parse("errors<0.1%").unwrap().check(&r);
        assert!(c.ok);
        assert_eq!(c.actual, "0%");
        // ...while the count still sees them.
        assert!(!parse("errors==0").unwrap().check(&r).ok);
    }

    #[test]
    fn from_str_and_display_agree_with_parse() {
        let t: Threshold = " lost_acked_ops == 0 ".parse().unwrap();
        assert_eq!(t, parse("lost_acked_ops == 0").unwrap());
        assert_eq!(t.to_string(), "lost_acked_ops == 0");
        assert!("nope".parse::<Threshold>().is_err());
    }

    #[test]
    fn check_all_keeps_the_order() {
        let ts = [parse("ops>0").unwrap(), parse("lost_acked_ops==0").unwrap()];
        let checks = check_all(&ts, &run());
        assert_eq!(checks.len(), 2);
        assert_eq!(checks[0].expr, "ops>0");
        assert!(checks[0].ok);
        assert!(!checks[1].ok);
    }

    #[test]
    fn numbers_are_shown_without_noise() {
        assert_eq!(fmt_number(12.0), "12");
        assert_eq!(fmt_number(12.3456), "12.346");
        assert_eq!(fmt_number(0.5), "0.5");
        assert_eq!(fmt_number(0.012345), "0.012");
        assert_eq!(fmt_number(0.000123), "0.00012");
        assert_eq!(fmt_bytes(512.0), "512B");
        assert_eq!(fmt_bytes(1536.0), "1.50KB");
        assert_eq!(fmt_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.00GB");
    }
}
