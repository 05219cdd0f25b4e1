//! The monitoring files of the reference deployment: docker/prometheus
//! (scrape configuration, alert rules and their unit tests, checked by
//! promtool from Debian's `prometheus` package) and docker/grafana (a
//! dashboard). Every metric the rules and the dashboard query must be one
//! berth registers.
//!
//! Which metrics berth registers is read from the source, not scraped: a
//! node registers a metric only when it first moves (a fenced write, a
//! refused peer), and alerts are mostly about those. Every
//! `counter!("…")`, `gauge!("…")` and `histogram!("…")` of the production
//! crates (src/, actors/src/, cluster/src/) is one; a histogram also
//! exports `_bucket`, `_sum` and `_count`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool() -> PathBuf {
    berth_testkit::require_bin("promtool")
}

/// Runs promtool in docker/prometheus; panics with its output unless it
/// succeeds.
fn promtool_ok(args: &[&str]) {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(root().join("docker/prometheus"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_scrape_config_and_rules_and_the_alerts_pass_their_unit_tests() {
    promtool_ok(&["check", "config", "prometheus.yml"]);
    promtool_ok(&["check", "rules", "berth.rules.yml"]);
    promtool_ok(&["test", "rules", "berth.test.yml"]);
}

/// What kind of metric a registered name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric the production crates register, by name.
fn registered() -> BTreeMap<String, Kind> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    for dir in ["src", "actors/src", "cluster/src"] {
        walk(&root().join(dir), &mut files);
    }
    let mut names = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (mac, kind) in [
            ("counter!(", Kind::Counter),
            ("gauge!(", Kind::Gauge),
            ("histogram!(", Kind::Histogram),
        ] {
            for (at, _) in text.match_indices(mac) {
                // `describe_counter!(` describes, it does not register.
                if text[..at].ends_with('_') {
                    continue;
                }
                let rest = text[at + mac.len()..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else {
                    continue;
                };
                let name: String = rest.chars().take_while(|&c| c != '"').collect();
                names.insert(name, kind);
            }
        }
    }
    names
}

/// Whether `name` is a series berth exports (or Prometheus's own `up`).
fn exported(name: &str, registered: &BTreeMap<String, Kind>) -> bool {
    if name == "up" || registered.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| registered.get(base) == Some(&Kind::Histogram))
    })
}

/// The metric names a PromQL expression selects: identifiers outside
/// strings, label matchers (`{…}`) and ranges (`[…]`), that are not a
/// function or aggregation (followed by `(`), a keyword, a grouping's
/// label list (`by (…)`, `on (…)`, …) or a Grafana variable (`$name`).
fn metric_names(expr: &str) -> Vec<String> {
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
    let c: Vec<char> = expr.chars().collect();
    let skip_to = |mut i: usize, close: char| {
        while i < c.len() && c[i] != close {
            if c[i] == '"' || c[i] == '\'' {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    let ident = |i: usize| {
        let mut j = i;
        while j < c.len() && (c[j].is_ascii_alphanumeric() || c[j] == '_' || c[j] == ':') {
            j += 1;
        }
        j
    };
    let next_non_space = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    // `by` or `without` starts at `i` (an aggregation's modifier before
    // its parenthesis).
    let aggregation_modifier = |i: usize| {
        let word: String = c[i..ident(i)].iter().collect();
        word == "by" || word == "without"
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' => i = skip_to(i, '}'),
            '[' => i = skip_to(i, ']'),
            '$' => i = ident(i + 1),
            ch if ch.is_ascii_digit() || ch == '.' => i = ident(i + 1),
            ch if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                let end = ident(i);
                let word: String = c[i..end].iter().collect();
                let after = next_non_space(end);
                let lower = word.to_ascii_lowercase();
                if GROUPING.contains(&lower.as_str()) {
                    i = if c.get(after) == Some(&'(') {
                        skip_to(after, ')')
                    } else {
                        end
                    };
                } else if KEYWORDS.contains(&lower.as_str()) {
                    i = end;
                } else if c.get(after) == Some(&'(') || aggregation_modifier(after) {
                    i = end; // a function, or an aggregation (`sum by (…) (…)`)
                } else {
                    out.push(word);
                    i = end;
                }
            }
            _ => i += 1,
        }
    }
    out
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (instance, le) (rate(berth_x_bucket{instance=~"$instance", a="b}c"}[$__rate_interval]))) / ignoring(op) group_left berth_y offset 5m > bool 1e3"#
        ),
        ["berth_x_bucket", "berth_y"]
    );
    assert_eq!(
        metric_names(r#"count(up{job="berth"} == 1) and on() vector(1)"#),
        ["up"]
    );
}

#[test]
fn the_source_scan_finds_what_berth_registers() {
    let reg = registered();
    assert!(reg.len() >= 30, "{reg:?}");
    assert_eq!(reg.get("berth_ops_total"), Some(&Kind::Counter));
    assert_eq!(reg.get("berth_ready"), Some(&Kind::Gauge));
    assert_eq!(
        reg.get("berth_checkpoint_batch_seconds"),
        Some(&Kind::Histogram)
    );
    assert!(exported("berth_op_duration_seconds_bucket", &reg));
    assert!(!exported("berth_ops_total_bucket", &reg));
    assert!(!exported("berth_no_such_metric", &reg));
}

/// Every PromQL expression of the Grafana dashboard: panel targets and
/// template variable queries (`label_values(metric, label)`).
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    ("definition", Value::String(d)) => {
                        let inner = d
                            .strip_prefix("label_values(")
                            .and_then(|r| r.split(',').next())
                            .unwrap_or(d);
                        out.push(inner.to_owned());
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_berth_exports() {
    let text = std::fs::read_to_string(root().join("docker/grafana/berth.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("docker/grafana/berth.json is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dash, &mut queries);
    assert!(queries.len() >= 20, "{queries:?}");
    let reg = registered();
    let mut used = Vec::new();
    for q in &queries {
        let names = metric_names(q);
        assert!(!names.is_empty(), "no metric in {q:?}");
        for n in names {
            assert!(
                exported(&n, &reg),
                "the dashboard queries {n} ({q}), which berth does not export"
            );
            used.push(n);
        }
    }
    // The panels an incident needs are there.
    for want in [
        "berth_ops_total",
        "berth_op_duration_seconds_bucket",
        "berth_checkpoint_batch_seconds_bucket",
        "berth_store_up",
        "berth_fenced_writes_total",
        "berth_handoffs_in_flight",
        "berth_peer_auth_failures_total",
    ] {
        assert!(used.iter().any(|n| n == want), "no panel queries {want}");
    }
}

#[test]
fn the_alert_rules_query_only_metrics_berth_exports() {
    let text = std::fs::read_to_string(root().join("docker/prometheus/berth.rules.yml")).unwrap();
    let reg = registered();
    let exprs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(str::trim)
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for e in exprs {
        assert!(
            !e.is_empty() && !e.starts_with('|') && !e.starts_with('>'),
            "keep each expr on its line (this test reads them line by line): {e:?}"
        );
        for n in metric_names(e) {
            assert!(
                exported(&n, &reg),
                "an alert queries {n} ({e}), which berth does not export"
            );
        }
    }
    // Each alert has its runbook in docs/operations.md.
    let ops = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    for name in text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
    {
        assert!(
            ops.contains(&format!("#### {name}")),
            "docs/operations.md has no runbook heading `#### {name}`"
        );
    }
}
