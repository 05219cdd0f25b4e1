//! What a run looks like to people and scripts: the plain-text summary
//! printed at the end of a run, the `--json` document and the
//! self-contained `--report` HTML page.
//!
//! This module only formats a [`RunResult`] and the threshold [`Check`]s; it
//! measures and decides nothing itself, so the three outputs always agree
//! with each other. The HTML page has no script and loads nothing: its
//! charts are inline SVG drawn by the small helpers at the bottom of this
//! file, so that a report can be mailed, archived or opened offline years
//! later.

use std::collections::BTreeSet;

use crate::result::*;
use crate::threshold::Check;

/// The plain-text summary: aligned tables of the run, throughput, latency,
/// errors, sessions, the verification verdict (with the sessions that have
/// a problem, at most [`SUMMARY_PROBLEMS`]), failovers, nodes and
/// thresholds, in that order. Sections with nothing to show (no failover, no
/// node, no threshold) are left out.
pub fn summary(r: &RunResult, checks: &[Check]) -> String {
    let mut out = String::new();

    let model = match r.rate {
        Some(rate) if r.model == "open" => format!("open, {rate:.1} ops/s intended"),
        Some(rate) => format!("{}, {rate:.1} ops/s intended", r.model),
        None => r.model.clone(),
    };
    text_table(
        &mut out,
        Align::Left,
        &[
            row(["RUN"]),
            row(["  scenario", r.scenario.as_str()]),
            row(["  model", model.as_str()]),
            row(["  sessions".to_string(), r.sessions.to_string()]),
            row(["  duration".to_string(), format!("{:.1} s", r.duration_s)]),
        ],
    );

    text_table(
        &mut out,
        Align::Right,
        &[
            row(["THROUGHPUT"]),
            row(["  ops".to_string(), r.ops.to_string()]),
            row(["  ops/s".to_string(), format!("{:.1}", r.ops_per_s)]),
        ],
    );

    let latency = |label: &str, p: &Percentiles| {
        row([
            label.to_string(),
            ms(p.p50),
            ms(p.p90),
            ms(p.p99),
            ms(p.p999),
            ms(p.max),
        ])
    };
    text_table(
        &mut out,
        Align::Right,
        &[
            row(["LATENCY (ms)", "p50", "p90", "p99", "p99.9", "max"]),
            latency("  op", &r.latency_ms),
            latency("  connect", &r.connect_ms),
            latency("  resume", &r.resume_ms),
        ],
    );

    let mut errors = vec![row(["ERRORS", "count", "% of ops"])];
    for (code, n) in &r.errors {
        errors.push(row([
            format!("  {code}"),
            n.to_string(),
            percent_of_ops(*n, r.ops),
        ]));
    }
    let total = r.error_count();
    errors.push(row([
        "  total".to_string(),
        total.to_string(),
        percent_of_ops(total, r.ops),
    ]));
    text_table(&mut out, Align::Right, &errors);

    text_table(
        &mut out,
        Align::Right,
        &[
            row(["SESSIONS"]),
            row(["  reconnects".to_string(), r.reconnects.to_string()]),
            row(["  resumes ok".to_string(), r.resumes_ok.to_string()]),
            row(["  resumes failed".to_string(), r.resumes_failed.to_string()]),
        ],
    );

    if r.churn.any() {
        let c = &r.churn;
        text_table(
            &mut out,
            Align::Right,
            &[
                row(["CHURN (on purpose)"]),
                row(["  drops".to_string(), c.drops.to_string()]),
                row(["  roams".to_string(), c.roams.to_string()]),
                row(["  ops cut off, re-sent".to_string(), c.cut_ops.to_string()]),
                row(["  acked ids re-sent".to_string(), c.resent_ids.to_string()]),
            ],
        );
    }

    if let Some(m) = &r.messages {
        let n = |x: u64| x.to_string();
        text_table(
            &mut out,
            Align::Right,
            &[
                row(["MESSAGES (chat)"]),
                row([
                    "  rooms x members".to_string(),
                    format!("{} x {}", m.rooms, m.room_size),
                ]),
                row(["  lines acked".to_string(), n(m.lines_acked)]),
                row(["  direct messages acked".to_string(), n(m.dms_acked)]),
                row(["  unanswered (may arrive)".to_string(), n(m.unacked)]),
                row([
                    "  deliveries expected".to_string(),
                    n(m.deliveries_expected),
                ]),
                row(["  delivered".to_string(), n(m.delivered)]),
                row(["  lost".to_string(), n(m.lost)]),
                row(["  duplicated".to_string(), n(m.duplicated)]),
                row(["  out of order".to_string(), n(m.out_of_order)]),
                row(["  unexpected".to_string(), n(m.unexpected)]),
                row(["  lines/s".to_string(), format!("{:.1}", m.lines_per_s)]),
                row([
                    "  deliveries/s".to_string(),
                    format!("{:.1}", m.deliveries_per_s),
                ]),
            ],
        );
        text_table(
            &mut out,
            Align::Right,
            &[
                row(["DELIVERY (ms)", "p50", "p90", "p99", "p99.9", "max"]),
                row([
                    "  line".to_string(),
                    ms(m.delivery_ms.p50),
                    ms(m.delivery_ms.p90),
                    ms(m.delivery_ms.p99),
                    ms(m.delivery_ms.p999),
                    ms(m.delivery_ms.max),
                ]),
            ],
        );
        for note in &m.notes {
            out.push_str(&format!("  ! {note}\n"));
        }
    }

    let v = &r.verify;
    let mut verify_rows = vec![
        row(["VERIFY"]),
        row([
            "  sessions checked".to_string(),
            v.sessions_checked.to_string(),
        ]),
        row(["  lost acked ops".to_string(), v.lost_acked_ops.to_string()]),
        row([
            "  sessions sent away".to_string(),
            v.sessions_sent_away.to_string(),
        ]),
        row([
            "  (empty sessions ended, 4004)".to_string(),
            v.empty_sessions_ended.to_string(),
        ]),
        row(["  duplicate ops".to_string(), v.duplicate_ops.to_string()]),
        row(["  event gaps".to_string(), v.event_gaps.to_string()]),
        row([
            "  event duplicates".to_string(),
            v.event_duplicates.to_string(),
        ]),
        row([
            "  state mismatches".to_string(),
            v.state_mismatches.to_string(),
        ]),
    ];
    if r.messages.is_some() {
        verify_rows.extend([
            row(["  lost messages".to_string(), v.lost_messages.to_string()]),
            row([
                "  duplicate messages".to_string(),
                v.duplicate_messages.to_string(),
            ]),
            row([
                "  messages out of order".to_string(),
                v.messages_out_of_order.to_string(),
            ]),
        ]);
    }
    text_table(&mut out, Align::Right, &verify_rows);
    // The verdict goes on a line of its own, outside the table, so that it
    // stands out and does not widen the number column.
    out.pop();
    out.push_str(&format!("  verdict: {}\n", Verdict::of(v).text()));
    problem_summary(&mut out, &r.problems);
    out.push('\n');

    if !r.failover.is_empty() {
        let mut rows = vec![row([
            "FAILOVER", "at", "sessions", "p50 ms", "p99 ms", "max ms",
        ])];
        for f in &r.failover {
            rows.push(row([
                format!("  {}", f.event),
                format!("{:.1}s", f.at_s),
                f.sessions_affected.to_string(),
                ms(f.window_ms.p50),
                ms(f.window_ms.p99),
                ms(f.window_ms.max),
            ]));
        }
        text_table(&mut out, Align::Right, &rows);
    }

    let kinds = repeated_kinds(r);
    if !kinds.is_empty() {
        let mut rows = vec![row([
            "FAILOVER BY KIND",
            "events",
            "sessions p50",
            "p99 ms p50/p99/max",
            "max ms p50/p99/max",
        ])];
        for k in kinds {
            rows.push(row([
                format!("  {}", k.kind),
                k.events.to_string(),
                format!("{:.0}", k.sessions_affected.p50),
                over_events(&k.window_p99_ms),
                over_events(&k.window_max_ms),
            ]));
        }
        text_table(&mut out, Align::Right, &rows);
    }

    if !r.nodes.is_empty() {
        let mut rows = vec![row(["NODES", "sessions", "peak RSS MiB"])];
        for n in &r.nodes {
            rows.push(row([
                format!("  {}", n.id),
                n.sessions.to_string(),
                mib(n.peak_rss_bytes),
            ]));
        }
        text_table(&mut out, Align::Right, &rows);
    }

    if !checks.is_empty() {
        let mut rows = vec![row(["THRESHOLDS", "actual"])];
        for c in checks {
            let mark = if c.ok { '✓' } else { '✗' };
            rows.push(row([format!("  {mark} {}", c.expr), c.actual.clone()]));
        }
        text_table(&mut out, Align::Right, &rows);
        out.pop();
        let passed = checks.iter().filter(|c| c.ok).count();
        out.push_str(&format!("  {passed} of {} passed\n\n", checks.len()));
    }

    // One trailing newline, not a blank line.
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

/// Problem lines the text summary shows at most; the JSON has them all.
pub const SUMMARY_PROBLEMS: usize = 20;

/// Problems whose client's trail the text summary shows (the JSON has every
/// trail).
pub const SUMMARY_TRAILS: usize = 3;

/// Appends the problem sessions under the verdict: one line each, at most
/// [`SUMMARY_PROBLEMS`], then how many more there are.
fn problem_summary(out: &mut String, problems: &[Problem]) {
    if problems.is_empty() {
        return;
    }
    out.push_str(&format!("  problems: {} sessions\n", problems.len()));
    for (i, p) in problems.iter().take(SUMMARY_PROBLEMS).enumerate() {
        out.push_str(&format!("    {}\n", problem_line(p)));
        if i < SUMMARY_TRAILS {
            for n in &p.notes {
                out.push_str(&format!("      found: {n}\n"));
            }
            for t in &p.trail {
                out.push_str(&format!("      {t}\n"));
            }
        }
    }
    if problems.len() > SUMMARY_PROBLEMS {
        out.push_str(&format!(
            "    ... and {} more\n",
            problems.len() - SUMMARY_PROBLEMS
        ));
    }
}

/// One session's problem on one line: what was found, how its client's
/// last connection ended, its error counts, reconnects and resumes, its
/// last node and version, and what a fresh resume found.
pub fn problem_line(p: &Problem) -> String {
    let f = &p.found;
    let mut found: Vec<String> = [
        ("lost", f.lost_acked_ops),
        ("duplicate", f.duplicate_ops),
        ("mismatch", f.state_mismatches),
        ("event gaps", f.event_gaps),
        ("event duplicates", f.event_duplicates),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(what, n)| format!("{what} {n}"))
    .collect();
    if f.sessions_sent_away > 0 {
        found.push("sent away".into());
    }
    if found.is_empty() {
        found.push("state unreadable".into());
    }
    let errors = if p.errors.is_empty() {
        "none".to_string()
    } else {
        p.errors
            .iter()
            .map(|(code, n)| format!("{code}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "session {} (client {}): {}; last {}; errors {}; reconnects {}, resumes ok {}; node {}; version {}; fresh resume: {}",
        p.session.as_deref().unwrap_or("-"),
        p.client,
        found.join(", "),
        p.last_end
            .as_ref()
            .map_or_else(|| "connection still up".to_string(), ToString::to_string),
        errors,
        p.reconnects,
        p.resumes_ok,
        p.node.as_deref().unwrap_or("-"),
        p.last_version,
        p.fresh_resume
            .as_ref()
            .map_or_else(|| "not needed".to_string(), ToString::to_string),
    )
}

/// The run as pretty-printed JSON. The field names are those of
/// [`RunResult`], a contract with the scripts that read them.
pub fn json(r: &RunResult) -> String {
    // Cannot fail: every map key is a string and serde_json writes
    // non-finite floats as `null` instead of refusing them.
    serde_json::to_string_pretty(r).expect("a RunResult always serializes to JSON")
}

/// One self-contained HTML page: the summary numbers as tables, then
/// inline SVG charts of latency, throughput and live sessions per node over
/// time, with the chaos events of `r.marks` as dashed vertical markers.
/// No script, no external resource; every text taken from the run is
/// escaped.
pub fn html(r: &RunResult, checks: &[Check]) -> String {
    let mut out = String::with_capacity(32 * 1024);
    let title = format!("berth-loadtest: {}", r.scenario);
    out.push_str("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    out.push_str(&format!("<title>{}</title>\n", esc(&title)));
    out.push_str(STYLE);
    out.push_str("</head>\n<body>\n");

    out.push_str(&format!("<h1>{}</h1>\n", esc(&title)));
    let mut sub = format!("{} model", r.model);
    if let Some(rate) = r.rate {
        sub.push_str(&format!(" ({rate:.1} ops/s intended)"));
    }
    sub.push_str(&format!(
        " · {} sessions · {:.1} s · {} ops · {:.1} ops/s",
        r.sessions, r.duration_s, r.ops, r.ops_per_s
    ));
    out.push_str(&format!("<p class=\"sub\">{}</p>\n", esc(&sub)));

    let verdict = Verdict::of(&r.verify);
    out.push_str(&format!(
        "<p><span class=\"badge {}\">verify: {}</span>",
        verdict.class(),
        esc(verdict.text())
    ));
    if !checks.is_empty() {
        let passed = checks.iter().filter(|c| c.ok).count();
        let class = if passed == checks.len() { "ok" } else { "bad" };
        out.push_str(&format!(
            " <span class=\"badge {class}\">thresholds: {passed} of {} passed</span>",
            checks.len()
        ));
    }
    out.push_str("</p>\n");

    if !checks.is_empty() {
        let rows: Vec<Row> = checks
            .iter()
            .map(|c| {
                let (class, mark) = if c.ok { ("ok", "✓") } else { ("bad", "✗") };
                (class, vec![format!("{mark} {}", c.expr), c.actual.clone()])
            })
            .collect();
        html_table(&mut out, "Thresholds", &["threshold", "actual"], &rows);
    }

    out.push_str("<h2>Summary</h2>\n<div class=\"cards\">\n");
    html_table(
        &mut out,
        "Run",
        &[],
        &[
            ("", vec!["scenario".into(), r.scenario.clone()]),
            ("", vec!["model".into(), r.model.clone()]),
            (
                "",
                vec![
                    "intended rate".into(),
                    r.rate
                        .map_or_else(|| "-".into(), |x| format!("{x:.1} ops/s")),
                ],
            ),
            ("", vec!["sessions".into(), r.sessions.to_string()]),
            (
                "",
                vec!["duration".into(), format!("{:.1} s", r.duration_s)],
            ),
            ("", vec!["ops".into(), r.ops.to_string()]),
            ("", vec!["ops/s".into(), format!("{:.1}", r.ops_per_s)]),
        ],
    );
    html_table(
        &mut out,
        "Sessions",
        &[],
        &[
            ("", vec!["reconnects".into(), r.reconnects.to_string()]),
            ("", vec!["resumes ok".into(), r.resumes_ok.to_string()]),
            (
                if r.resumes_failed > 0 { "bad" } else { "" },
                vec!["resumes failed".into(), r.resumes_failed.to_string()],
            ),
        ],
    );
    if r.churn.any() {
        let c = &r.churn;
        html_table(
            &mut out,
            "Churn (on purpose)",
            &[],
            &[
                ("", vec!["drops".into(), c.drops.to_string()]),
                ("", vec!["roams".into(), c.roams.to_string()]),
                (
                    "",
                    vec!["ops cut off, re-sent".into(), c.cut_ops.to_string()],
                ),
                (
                    "",
                    vec!["acked ids re-sent".into(), c.resent_ids.to_string()],
                ),
            ],
        );
    }
    let mut errors: Vec<Row> = r
        .errors
        .iter()
        .map(|(code, n)| {
            (
                "",
                vec![code.clone(), n.to_string(), percent_of_ops(*n, r.ops)],
            )
        })
        .collect();
    let total = r.error_count();
    errors.push((
        if total > 0 { "bad total" } else { "total" },
        vec![
            "total".into(),
            total.to_string(),
            percent_of_ops(total, r.ops),
        ],
    ));
    html_table(&mut out, "Errors", &["code", "count", "% of ops"], &errors);
    let v = &r.verify;
    let counter = |name: &str, n: u64| -> Row {
        (
            if n > 0 { "bad" } else { "" },
            vec![name.to_string(), n.to_string()],
        )
    };
    html_table(
        &mut out,
        &format!("Verify: {}", verdict.text()),
        &[],
        &[
            (
                "",
                vec!["sessions checked".into(), v.sessions_checked.to_string()],
            ),
            counter("lost acked ops", v.lost_acked_ops),
            counter("sessions sent away", v.sessions_sent_away),
            counter("duplicate ops", v.duplicate_ops),
            counter("event gaps", v.event_gaps),
            counter("event duplicates", v.event_duplicates),
            counter("state mismatches", v.state_mismatches),
        ],
    );
    out.push_str("</div>\n");

    let latency = |name: &str, p: &Percentiles| -> Row {
        (
            "",
            vec![
                name.to_string(),
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.p999),
                ms(p.max),
            ],
        )
    };
    html_table(
        &mut out,
        "Latency (ms)",
        &["", "p50", "p90", "p99", "p99.9", "max"],
        &[
            latency("op", &r.latency_ms),
            latency("connect", &r.connect_ms),
            latency("resume", &r.resume_ms),
        ],
    );

    if !r.failover.is_empty() {
        let rows: Vec<Row> = r
            .failover
            .iter()
            .map(|f| {
                (
                    "",
                    vec![
                        f.event.clone(),
                        format!("{:.1} s", f.at_s),
                        f.sessions_affected.to_string(),
                        ms(f.window_ms.p50),
                        ms(f.window_ms.p99),
                        ms(f.window_ms.max),
                    ],
                )
            })
            .collect();
        html_table(
            &mut out,
            "Failover windows (ms)",
            &["event", "at", "sessions affected", "p50", "p99", "max"],
            &rows,
        );
    }
    let kinds = repeated_kinds(r);
    if !kinds.is_empty() {
        let rows: Vec<Row> = kinds
            .iter()
            .map(|k| {
                (
                    "",
                    vec![
                        k.kind.clone(),
                        k.events.to_string(),
                        format!("{:.0}", k.sessions_affected.p50),
                        over_events(&k.window_p99_ms),
                        over_events(&k.window_max_ms),
                    ],
                )
            })
            .collect();
        html_table(
            &mut out,
            "Failover windows by kind of event (ms, over the events)",
            &[
                "kind",
                "events",
                "sessions affected p50",
                "p99 window: p50/p99/max",
                "max window: p50/p99/max",
            ],
            &rows,
        );
    }
    if !r.nodes.is_empty() {
        let rows: Vec<Row> = r
            .nodes
            .iter()
            .map(|n| {
                (
                    "",
                    vec![n.id.clone(), n.sessions.to_string(), mib(n.peak_rss_bytes)],
                )
            })
            .collect();
        html_table(
            &mut out,
            "Nodes",
            &["node", "sessions", "peak RSS MiB"],
            &rows,
        );
    }

    out.push_str("<h2>Over time</h2>\n");
    let t = &r.timeline;
    let no_timeline = "No data: the run recorded no timeline samples.";
    let latency_chart = line_chart(
        "Latency",
        "ms",
        &[
            Series::new("p50", 0, t.iter().map(|s| (s.t_s, Some(s.p50_ms)))),
            Series::new("p99", 1, t.iter().map(|s| (s.t_s, Some(s.p99_ms)))),
        ],
        &r.marks,
    );
    chart_section(&mut out, "Latency p50 and p99", latency_chart, no_timeline);

    let throughput_chart = line_chart(
        "Throughput",
        "ops/s",
        &[Series::new(
            "ops/s",
            0,
            t.iter().map(|s| (s.t_s, Some(s.ops_per_s))),
        )],
        &r.marks,
    );
    chart_section(&mut out, "Throughput", throughput_chart, no_timeline);

    let node_ids: BTreeSet<&String> = t.iter().flat_map(|s| s.sessions_per_node.keys()).collect();
    let per_node: Vec<Series> = node_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            // A node missing from a sample (killed, not yet started) breaks
            // its line instead of drawing a fake drop to zero.
            let points = t
                .iter()
                .map(|s| (s.t_s, s.sessions_per_node.get(*id).map(|n| *n as f64)));
            Series::new(id, i, points)
        })
        .collect();
    let sessions_chart = line_chart("Live sessions per node", "sessions", &per_node, &r.marks);
    let no_nodes = if t.is_empty() {
        no_timeline
    } else {
        "No data: no sample has per-node session counts (the admin endpoints were not sampled)."
    };
    chart_section(&mut out, "Live sessions per node", sessions_chart, no_nodes);

    out.push_str("<footer>Generated by berth-loadtest. Dashed lines mark chaos events.</footer>\n");
    out.push_str("</body>\n</html>\n");
    out
}

/// The page's only style sheet, inline so the page stands alone.
const STYLE: &str = r#"<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;max-width:980px;margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 10px;padding-bottom:4px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:18px 0 6px}
.sub{color:#666;margin:0 0 12px}
.badge{display:inline-block;padding:4px 10px;border-radius:4px;font-weight:700;margin-right:8px}
.badge.ok{background:#e6f4ea;color:#1a7f37}
.badge.bad{background:#fde7e9;color:#b71c1c}
.badge.unknown{background:#eee;color:#555}
.cards{display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start}
table{border-collapse:collapse;margin:0 0 14px}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{color:#555;font-weight:600}
tr.ok td:first-child{color:#1a7f37}
tr.bad td{color:#b71c1c;font-weight:600}
tr.total td{border-top:1px solid #ccc}
.nodata{color:#777;font-style:italic}
svg{max-width:100%;height:auto;font:11px system-ui,sans-serif}
svg .axis{stroke:#444;stroke-width:1}
svg .gridline{stroke:#eee;stroke-width:1}
svg .tick{fill:#555}
svg .mark{stroke:#999;stroke-width:1;stroke-dasharray:4 3}
svg .mark-label{fill:#555}
footer{color:#888;font-size:12px;margin:32px 0 8px}
</style>
"#;

/// What the verification counters add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Sessions were checked and every counter is zero.
    NothingLost,
    /// At least one data counter (lost, duplicated, mismatched) is not zero.
    LostOrDuplicated,
    /// No data problem, but clients were sent away.
    SentAway,
    /// Every counter is zero, but no session was checked: zero proves nothing.
    NotVerified,
}

impl Verdict {
    fn of(v: &Verify) -> Verdict {
        if v.data_problems() > 0 {
            Verdict::LostOrDuplicated
        } else if v.problem_count() > 0 {
            Verdict::SentAway
        } else if v.sessions_checked == 0 {
            Verdict::NotVerified
        } else {
            Verdict::NothingLost
        }
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::NothingLost => "nothing lost",
            Verdict::LostOrDuplicated => "LOST OR DUPLICATED DATA",
            Verdict::SentAway => "SESSIONS SENT AWAY (data intact)",
            Verdict::NotVerified => "not verified (no session checked)",
        }
    }

    fn class(self) -> &'static str {
        match self {
            Verdict::NothingLost => "ok",
            Verdict::LostOrDuplicated | Verdict::SentAway => "bad",
            Verdict::NotVerified => "unknown",
        }
    }
}

/// The kinds of chaos event that occur 3 times or more (a soak's kills and
/// restarts): for one or two events, the failover table says it all.
fn repeated_kinds(r: &RunResult) -> Vec<&FailoverKind> {
    r.failover_by_kind
        .iter()
        .filter(|k| k.events >= 3)
        .collect()
}

/// `p50/p99/max` over events, in ms.
fn over_events(o: &OverEvents) -> String {
    format!("{}/{}/{}", ms(o.p50), ms(o.p99), ms(o.max))
}

fn ms(v: f64) -> String {
    format!("{v:.2}")
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn percent_of_ops(n: u64, ops: u64) -> String {
    if ops == 0 {
        return "-".into();
    }
    format!("{:.3}%", n as f64 * 100.0 / ops as f64)
}

// ---------------------------------------------------------------------------
// Plain-text tables.

/// How the columns after the first are aligned (the first, the labels, is
/// always left-aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// The label column is at least this wide, so that consecutive sections line
/// up with each other and not only within themselves.
const LABEL_WIDTH: usize = 20;

fn row<S: Into<String>, const N: usize>(cells: [S; N]) -> Vec<String> {
    cells.into_iter().map(Into::into).collect()
}

/// Appends `rows` padded into columns, then a blank line. Widths count
/// chars, not bytes, so `✓` and non-ASCII node ids do not skew them.
fn text_table(out: &mut String, align: Align, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    if let Some(w) = widths.first_mut() {
        *w = LABEL_WIDTH;
    }
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, (cell, w)) in r.iter().zip(&widths).enumerate() {
            let pad = " ".repeat(w - cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            if i == 0 || align == Align::Left {
                line.push_str(cell);
                line.push_str(&pad);
            } else {
                line.push_str(&pad);
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push('\n');
}

// ---------------------------------------------------------------------------
// HTML.

/// Escapes text for HTML content and quoted attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A table row: the `<tr>` class (empty for none) and its cells, as plain
/// text (escaped when written).
type Row = (&'static str, Vec<String>);

fn html_table(out: &mut String, caption: &str, head: &[&str], rows: &[Row]) {
    out.push_str("<table>\n");
    out.push_str(&format!("<caption>{}</caption>\n", esc(caption)));
    if !head.is_empty() {
        out.push_str("<thead><tr>");
        for h in head {
            out.push_str(&format!("<th>{}</th>", esc(h)));
        }
        out.push_str("</tr></thead>\n");
    }
    out.push_str("<tbody>\n");
    for (class, cells) in rows {
        if class.is_empty() {
            out.push_str("<tr>");
        } else {
            out.push_str(&format!("<tr class=\"{class}\">"));
        }
        for c in cells {
            out.push_str(&format!("<td>{}</td>", esc(c)));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
}

fn chart_section(out: &mut String, heading: &str, chart: Option<String>, no_data: &str) {
    out.push_str(&format!("<h3>{}</h3>\n", esc(heading)));
    match chart {
        Some(svg) => out.push_str(&svg),
        None => out.push_str(&format!("<p class=\"nodata\">{}</p>\n", esc(no_data))),
    }
}

// ---------------------------------------------------------------------------
// SVG charts.

/// Line colours, picked by series index (the Tableau 10 palette: distinct,
/// and readable by most colour-blind people).
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

const CHART_W: f64 = 860.0;
/// Height of the plot and its axes; the legend goes below.
const CHART_H: f64 = 280.0;
const PAD_LEFT: f64 = 64.0;
const PAD_RIGHT: f64 = 20.0;
const PAD_TOP: f64 = 14.0;
const PAD_BOTTOM: f64 = 38.0;

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    name: String,
    color: &'static str,
    /// Runs of consecutive points; a missing or non-finite value ends a run,
    /// so gaps in the data show as gaps in the line.
    segments: Vec<Vec<(f64, f64)>>,
}

impl Series {
    fn new(name: &str, index: usize, points: impl Iterator<Item = (f64, Option<f64>)>) -> Series {
        let mut segments = vec![];
        let mut current = vec![];
        for (x, y) in points {
            match y {
                Some(y) if x.is_finite() && y.is_finite() => current.push((x, y)),
                _ => {
                    if !current.is_empty() {
                        segments.push(std::mem::take(&mut current));
                    }
                }
            }
        }
        if !current.is_empty() {
            segments.push(current);
        }
        Series {
            name: name.to_string(),
            color: PALETTE[index % PALETTE.len()],
            segments,
        }
    }
}

/// A step of 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A tick label with as many decimals as the step needs, and no more.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    let s = format!("{v:.decimals$}");
    // `-0` and `-0.0` from a negative zero or rounding.
    if let Some(rest) = s.strip_prefix('-') {
        if rest.trim_matches(['0', '.']).is_empty() {
            return rest.to_string();
        }
    }
    s
}

fn coord(v: f64) -> String {
    format!("{v:.1}")
}

/// A line chart of `series` against time in seconds, with `marks` as dashed
/// vertical lines and labels; `None` when there is not a single point to
/// draw. The y axis starts at zero.
fn line_chart(title: &str, y_label: &str, series: &[Series], marks: &[Mark]) -> Option<String> {
    let points = || series.iter().flat_map(|s| s.segments.iter().flatten());
    points().next()?;

    let (mut x0, mut x1, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
    for &(x, y) in points() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y_max = y_max.max(y);
    }
    // Widen the time axis to the marks rather than drop a marker that falls
    // just before the first sample or after the last.
    for m in marks.iter().filter(|m| m.at_s.is_finite()) {
        x0 = x0.min(m.at_s);
        x1 = x1.max(m.at_s);
    }
    if x1 - x0 <= 0.0 {
        x1 = x0 + 1.0;
    }
    let y_step = nice_step(if y_max > 0.0 { y_max / 5.0 } else { 0.2 });
    let y1 = (y_max / y_step).ceil().max(1.0) * y_step;
    let x_step = nice_step((x1 - x0) / 8.0);

    let (plot_w, plot_h) = (
        CHART_W - PAD_LEFT - PAD_RIGHT,
        CHART_H - PAD_TOP - PAD_BOTTOM,
    );
    let (left, right, top, bottom) = (PAD_LEFT, CHART_W - PAD_RIGHT, PAD_TOP, PAD_TOP + plot_h);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * plot_w;
    let sy = |y: f64| bottom - y / y1 * plot_h;

    // Legend rows under the plot, wrapping when a row is full.
    let mut legend = String::new();
    let (mut lx, mut ly) = (left, CHART_H + 2.0);
    for s in series {
        let w = 24.0 + 6.5 * s.name.chars().count() as f64 + 18.0;
        if lx + w > right && lx > left {
            lx = left;
            ly += 18.0;
        }
        legend.push_str(&format!(
            "<rect x=\"{}\" y=\"{}\" width=\"16\" height=\"3\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            coord(lx),
            coord(ly + 5.0),
            s.color,
            coord(lx + 22.0),
            coord(ly + 10.0),
            esc(&s.name)
        ));
        lx += w;
    }
    let height = ly + 22.0;

    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\">\n<title>{t}</title>\n",
        w = coord(CHART_W),
        h = coord(height),
        t = esc(title)
    );

    // Horizontal grid lines and y ticks.
    let y_ticks = (y1 / y_step).round() as i64;
    for k in 0..=y_ticks {
        let v = k as f64 * y_step;
        let y = coord(sy(v));
        svg.push_str(&format!(
            "<line class=\"gridline\" x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\"/><text class=\"tick\" x=\"{}\" y=\"{y}\" dy=\"4\" text-anchor=\"end\">{}</text>\n",
            coord(left),
            coord(right),
            coord(left - 6.0),
            tick_label(v, y_step)
        ));
    }
    // X ticks at multiples of the step.
    let first = (x0 / x_step).ceil() as i64;
    let last = (x1 / x_step).floor() as i64;
    for k in first..=last {
        let v = k as f64 * x_step;
        let x = coord(sx(v));
        svg.push_str(&format!(
            "<line class=\"axis\" x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\"/><text class=\"tick\" x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            coord(bottom),
            coord(bottom + 4.0),
            coord(bottom + 16.0),
            tick_label(v, x_step)
        ));
    }
    // Axes and their titles.
    svg.push_str(&format!(
        "<line class=\"axis\" x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{b}\"/><line class=\"axis\" x1=\"{l}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\"/>\n",
        l = coord(left),
        t = coord(top),
        b = coord(bottom),
        r = coord(right)
    ));
    svg.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time (s)</text>\n<text transform=\"translate(14 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        coord(left + plot_w / 2.0),
        coord(bottom + 32.0),
        coord(top + plot_h / 2.0),
        esc(y_label)
    ));

    // The data.
    for s in series {
        for seg in &s.segments {
            if let [(x, y)] = seg.as_slice() {
                svg.push_str(&format!(
                    "<circle cx=\"{}\" cy=\"{}\" r=\"2.5\" fill=\"{}\"/>\n",
                    coord(sx(*x)),
                    coord(sy(*y)),
                    s.color
                ));
            } else {
                let pts: Vec<String> = seg
                    .iter()
                    .map(|&(x, y)| format!("{},{}", coord(sx(x)), coord(sy(y))))
                    .collect();
                svg.push_str(&format!(
                    "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\" stroke-linejoin=\"round\" points=\"{}\"/>\n",
                    s.color,
                    pts.join(" ")
                ));
            }
        }
    }

    // Markers last, so that their labels are drawn over the lines. Labels
    // are staggered over three rows so that close events stay readable.
    for (i, m) in marks.iter().filter(|m| m.at_s.is_finite()).enumerate() {
        let x = sx(m.at_s);
        let label_y = coord(top + 11.0 + 13.0 * (i % 3) as f64);
        let (label_x, anchor) = if x > right - 120.0 {
            (x - 4.0, "end")
        } else {
            (x + 4.0, "start")
        };
        svg.push_str(&format!(
            "<line class=\"mark\" x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\"/><text class=\"mark-label\" x=\"{}\" y=\"{label_y}\" text-anchor=\"{anchor}\"><title>{} at {:.1} s</title>{}</text>\n",
            coord(top),
            coord(bottom),
            coord(label_x),
            esc(&m.label),
            m.at_s,
            esc(&m.label),
            x = coord(x),
        ));
    }

    svg.push_str(&legend);
    svg.push_str("</svg>\n");
    Some(svg)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::client::ConnEnd;
    use crate::threshold::parse;

    fn run() -> RunResult {
        let timeline = (0..10)
            .map(|i| {
                let t = i as f64;
                let mut per_node = BTreeMap::new();
                per_node.insert("n1".to_string(), 50);
                // n2 is killed at 4 s and back at 7 s.
                if !(4..7).contains(&i) {
                    per_node.insert("n2".to_string(), 50);
                }
                Sample {
                    t_s: t,
                    ops_per_s: 1000.0 + t,
                    p50_ms: 1.5,
                    p99_ms: 12.0 + t,
                    errors: 1,
                    connected: 100,
                    sessions_per_node: per_node,
                }
            })
            .collect();
        let mut r = RunResult {
            scenario: "kv".into(),
            model: "open".into(),
            rate: Some(1000.0),
            sessions: 100,
            duration_s: 10.0,
            ops: 10_000,
            ops_per_s: 1000.0,
            latency_ms: Percentiles {
                p50: 1.5,
                p90: 4.25,
                p99: 12.75,
                p999: 30.5,
                max: 80.0,
            },
            connect_ms: Percentiles {
                p50: 3.0,
                p90: 5.0,
                p99: 25.5,
                p999: 26.0,
                max: 27.0,
            },
            resume_ms: Percentiles {
                p50: 6.0,
                p90: 9.0,
                p99: 40.25,
                p999: 41.0,
                max: 42.0,
            },
            reconnects: 7,
            resumes_ok: 6,
            resumes_failed: 1,
            verify: Verify {
                sessions_checked: 100,
                ..Default::default()
            },
            failover: vec![Failover {
                event: "kill:2".into(),
                at_s: 4.0,
                sessions_affected: 33,
                window_ms: Window {
                    p50: 120.0,
                    p99: 450.5,
                    max: 500.0,
                },
            }],
            nodes: vec![
                NodeStat {
                    id: "n1".into(),
                    peak_rss_bytes: 100 * 1024 * 1024,
                    sessions: 50,
                },
                NodeStat {
                    id: "n2".into(),
                    peak_rss_bytes: 96 * 1024 * 1024 + 512 * 1024,
                    sessions: 50,
                },
            ],
            timeline,
            marks: vec![
                Mark {
                    at_s: 4.0,
                    label: "kill n2".into(),
                },
                Mark {
                    at_s: 7.0,
                    label: "start n2".into(),
                },
            ],
            ..Default::default()
        };
        r.errors.insert("4004".into(), 8);
        r.errors.insert("client_timeout".into(), 2);
        r
    }

    fn checks(r: &RunResult) -> Vec<Check> {
        ["p99<20ms", "errors<0.05%"]
            .iter()
            .map(|e| parse(e).unwrap().check(r))
            .collect()
    }

    #[test]
    fn summary_has_the_key_numbers() {
        let r = run();
        let s = summary(&r, &checks(&r));
        for needle in [
            "kv",
            "open, 1000.0 ops/s intended",
            "100",
            "10.0 s",
            "10000",
            "1000.0",
            "1.50",
            "4.25",
            "12.75",
            "30.50",
            "80.00",
            "25.50",
            "40.25",
            "4004",
            "client_timeout",
            "0.080%",
            "0.100%",
            "reconnects",
            "resumes ok",
            "resumes failed",
            "kill:2",
            "4.0s",
            "33",
            "450.50",
            "100.0",
            "96.5",
            "✓ p99<20ms",
            "✗ errors<0.05%",
            "1 of 2 passed",
        ] {
            assert!(s.contains(needle), "missing {needle:?} in\n{s}");
        }
        assert!(s.contains("verdict: nothing lost"), "{s}");
        assert!(!s.contains("LOST"), "{s}");
        assert!(s.ends_with('\n') && !s.ends_with("\n\n"));
    }

    #[test]
    fn summary_names_every_verify_counter_and_the_bad_verdict() {
        let mut r = run();
        r.verify = Verify {
            sessions_checked: 100,
            lost_acked_ops: 1,
            sessions_sent_away: 6,
            duplicate_ops: 2,
            event_gaps: 3,
            event_duplicates: 4,
            state_mismatches: 5,
            empty_sessions_ended: 7,
            ..Verify::default()
        };
        let s = summary(&r, &[]);
        for (label, n) in [
            ("sessions checked", 100),
            ("lost acked ops", 1),
            ("sessions sent away", 6),
            ("duplicate ops", 2),
            ("event gaps", 3),
            ("event duplicates", 4),
            ("state mismatches", 5),
            ("(empty sessions ended, 4004)", 7),
        ] {
            let line = s
                .lines()
                .find(|l| l.trim_start().starts_with(label))
                .unwrap_or_else(|| panic!("no {label} line in\n{s}"));
            assert!(line.ends_with(&format!(" {n}")), "{line}");
        }
        assert!(s.contains("verdict: LOST OR DUPLICATED DATA"), "{s}");
        assert!(!s.contains("THRESHOLDS"), "no thresholds, no section:\n{s}");
    }

    fn sent_away(client: u64) -> Problem {
        let mut errors = BTreeMap::new();
        errors.insert("unavailable".to_string(), 2);
        Problem {
            client,
            session: Some(format!("s{client}")),
            found: Verify {
                sessions_checked: 1,
                sessions_sent_away: 1,
                ..Default::default()
            },
            last_end: Some(ConnEnd::Closed {
                code: 4000,
                reason: "taken over".into(),
            }),
            errors,
            reconnects: 3,
            resumes_ok: 2,
            node: Some("n2:8080".into()),
            last_version: 41,
            fresh_resume: Some(FreshResume::StateRead),
            notes: vec![format!("acknowledged append {client} is not in the log")],
            trail: vec![
                "1.000s welcome on 127.0.0.1:1 from n2:8080 (new, last_op 0)".to_string(),
                format!("2.500s lost on 127.0.0.1:1: close 4000 \"taken over\" ({client})"),
            ],
        }
    }

    #[test]
    fn a_problem_line_says_what_the_client_saw_and_what_a_fresh_resume_found() {
        let line = problem_line(&sent_away(7));
        for needle in [
            "session s7 (client 7)",
            "sent away",
            "close 4000 \"taken over\"",
            "errors unavailable=2",
            "reconnects 3, resumes ok 2",
            "node n2:8080",
            "version 41",
            "fresh resume: state read",
        ] {
            assert!(line.contains(needle), "missing {needle:?} in {line}");
        }
        assert!(!line.contains("lost"), "{line}");

        let mut lost = sent_away(1);
        lost.found.lost_acked_ops = 5;
        lost.found.sessions_sent_away = 0;
        lost.errors.clear();
        lost.last_end = None;
        lost.node = None;
        lost.fresh_resume = Some(FreshResume::NotFound);
        let line = problem_line(&lost);
        for needle in [
            ": lost 5;",
            "errors none",
            "last connection still up",
            "node -",
            "fresh resume: session not found",
        ] {
            assert!(line.contains(needle), "missing {needle:?} in {line}");
        }
        assert!(!line.contains("sent away"), "{line}");

        let mut unreadable = sent_away(2);
        unreadable.found = Verify::default();
        unreadable.fresh_resume = Some(FreshResume::Unreachable);
        let line = problem_line(&unreadable);
        assert!(line.contains(": state unreadable;"), "{line}");
    }

    #[test]
    fn the_summary_lists_at_most_twenty_problems_and_counts_the_rest() {
        let mut r = run();
        r.verify.sessions_sent_away = 23;
        r.problems = (0..23).map(sent_away).collect();
        let s = summary(&r, &[]);
        assert!(
            s.contains("verdict: SESSIONS SENT AWAY (data intact)"),
            "{s}"
        );
        assert!(s.contains("  problems: 23 sessions\n"), "{s}");
        let lines = s.lines().filter(|l| l.starts_with("    session ")).count();
        assert_eq!(lines, SUMMARY_PROBLEMS, "{s}");
        assert!(s.contains("    session s19 (client 19)"), "{s}");
        assert!(!s.contains("session s20 "), "{s}");
        assert!(s.contains("    ... and 3 more\n"), "{s}");
        // The first problems' trails, under their lines.
        let trails = s
            .lines()
            .filter(|l| l.starts_with("      2.500s lost"))
            .count();
        assert_eq!(trails, SUMMARY_TRAILS, "{s}");
        assert!(s.contains("    session s0 (client 0)"), "{s}");
        assert!(s.contains("      1.000s welcome on 127.0.0.1:1"), "{s}");
        assert!(
            s.contains("      found: acknowledged append 0 is not in the log\n"),
            "{s}"
        );
        // The JSON has every one.
        let back: RunResult = serde_json::from_str(&json(&r)).unwrap();
        assert_eq!(back.problems.len(), 23);
        assert_eq!(back, r);
        // The HTML marks the counter and the verdict.
        let page = html(&r, &[]);
        assert!(
            page.contains("<td>sessions sent away</td><td>23</td>"),
            "{page}"
        );
        assert!(page.contains("verify: SESSIONS SENT AWAY"));

        let clean = summary(&run(), &[]);
        assert!(!clean.contains("problems:"), "{clean}");
    }

    #[test]
    fn a_sent_away_session_fails_the_all_zero_rule_and_its_threshold() {
        let mut r = run();
        r.verify.sessions_sent_away = 1;
        assert_eq!(Verdict::of(&r.verify), Verdict::SentAway);
        assert_eq!(Verdict::of(&r.verify).class(), "bad");
        assert!(!parse("sessions_sent_away==0").unwrap().check(&r).ok);
        r.verify.lost_acked_ops = 1;
        assert_eq!(Verdict::of(&r.verify), Verdict::LostOrDuplicated);
    }

    #[test]
    fn json_of_an_older_run_without_the_new_fields_still_parses() {
        let mut value: serde_json::Value = serde_json::from_str(&json(&run())).unwrap();
        value.as_object_mut().unwrap().remove("problems");
        value["verify"]
            .as_object_mut()
            .unwrap()
            .remove("sessions_sent_away");
        let old: RunResult = serde_json::from_value(value).unwrap();
        assert_eq!(old, run());
    }

    #[test]
    fn summary_does_not_call_an_unchecked_run_clean() {
        let s = summary(&RunResult::default(), &[]);
        assert!(s.contains("verdict: not verified"), "{s}");
        assert!(!s.contains("nothing lost"), "{s}");
        assert!(!s.contains("FAILOVER") && !s.contains("NODES"), "{s}");
    }

    #[test]
    fn summary_columns_line_up() {
        let r = run();
        let s = summary(&r, &[]);
        let width = |prefix: &str| {
            s.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no line {prefix:?} in\n{s}"))
                .chars()
                .count()
        };
        // Right-aligned numbers end in the same column.
        assert_eq!(width("LATENCY (ms)"), width("  op "));
        assert_eq!(width("  op "), width("  connect "));
        assert_eq!(width("  connect "), width("  resume "));
        assert_eq!(width("  4004"), width("  client_timeout"));
        // Labels are padded to a common width across sections.
        let value_col = |prefix: &str| {
            let l = s.lines().find(|l| l.starts_with(prefix)).unwrap();
            l.len() - l[prefix.len()..].trim_start().len()
        };
        assert_eq!(value_col("  scenario"), value_col("  model"));
    }

    #[test]
    fn json_round_trips_with_the_contract_field_names() {
        let r = run();
        let text = json(&r);
        let back: RunResult = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        for field in CONTRACT_FIELDS {
            assert!(value.get(field).is_some(), "missing {field}");
        }
        assert!(
            text.contains("\n  \"ops\": 10000"),
            "pretty-printed:\n{text}"
        );
    }

    #[test]
    fn html_is_one_self_contained_page() {
        let r = run();
        let page = html(&r, &checks(&r));
        assert!(page.starts_with("<!doctype html>"), "{}", &page[..40]);
        assert!(page.trim_end().ends_with("</html>"));
        assert!(page.contains("<meta charset=\"utf-8\">"));
        assert_eq!(page.matches("<svg").count(), 3, "three charts");
        for tag in ["svg", "table", "tbody", "style", "head", "body", "text"] {
            assert_eq!(
                page.matches(&format!("<{tag}")).count(),
                page.matches(&format!("</{tag}>")).count(),
                "unbalanced <{tag}>"
            );
        }
        assert!(!page.contains("<script"));
        assert!(!page.contains("src=") && !page.contains("href=") && !page.contains("url("));
        assert!(page.contains("<polyline"));
        // Chaos events: dashed markers with their labels.
        assert_eq!(page.matches("class=\"mark\"").count(), 2 * 3);
        assert!(page.contains(">kill n2</text>"), "marker label");
        assert!(page.contains(">start n2</text>"), "marker label");
        // Key numbers and verdict.
        assert!(page.contains("verify: nothing lost"));
        assert!(page.contains("12.75") && page.contains("kill:2"));
        assert!(page.contains("✓ p99&lt;20ms"));
        assert!(page.contains("✗ errors&lt;0.05%"));
        assert!(page.contains("thresholds: 1 of 2 passed"));
    }

    #[test]
    fn html_escapes_text_from_the_run() {
        let mut r = run();
        let evil = "<script>alert('x')</script>";
        r.nodes[0].id = evil.into();
        for s in &mut r.timeline {
            s.sessions_per_node.insert(evil.into(), 1);
        }
        r.marks[0].label = "kill \"n2\" & <b>".into();
        r.scenario = "<i>kv</i>".into();
        let page = html(&r, &[]);
        assert!(!page.contains("<script"), "unescaped node id");
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(!page.contains("<b>") && !page.contains("<i>"));
        assert!(page.contains("kill &quot;n2&quot; &amp; &lt;b&gt;"));
    }

    #[test]
    fn html_says_no_data_instead_of_an_empty_chart() {
        let mut r = run();
        r.timeline.clear();
        let page = html(&r, &[]);
        assert!(!page.contains("<svg"));
        assert_eq!(page.matches("class=\"nodata\"").count(), 3);
        assert!(page.contains("no timeline samples"));

        // Samples without per-node counts: only the sessions chart is missing.
        let mut r = run();
        for s in &mut r.timeline {
            s.sessions_per_node.clear();
        }
        let page = html(&r, &[]);
        assert_eq!(page.matches("<svg").count(), 2);
        assert!(page.contains("admin endpoints were not sampled"));

        // Not even a model: still a page.
        let page = html(&RunResult::default(), &[]);
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("not verified"));
    }

    #[test]
    fn series_break_at_missing_samples() {
        let pts = [
            (0.0, Some(1.0)),
            (1.0, Some(2.0)),
            (2.0, None),
            (3.0, Some(f64::NAN)),
            (4.0, Some(5.0)),
        ];
        let s = Series::new("n2", 11, pts.into_iter());
        assert_eq!(
            s.segments,
            vec![vec![(0.0, 1.0), (1.0, 2.0)], vec![(4.0, 5.0)]]
        );
        assert_eq!(s.color, PALETTE[1]);
        let svg = line_chart("t", "y", &[s], &[]).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 1);
    }

    #[test]
    fn a_single_sample_still_draws() {
        let s = Series::new("p50", 0, [(5.0, Some(0.0))].into_iter());
        let svg = line_chart("t", "ms", &[s], &[]).unwrap();
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert!(line_chart("t", "ms", &[], &[]).is_none());
    }

    #[test]
    fn ticks_are_round_numbers() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        for (raw, step) in [
            (0.0, 1.0),
            (-3.0, 1.0),
            (0.07, 0.1),
            (0.7, 1.0),
            (1.3, 2.0),
            (3.0, 5.0),
            (7.0, 10.0),
            (230.0, 500.0),
        ] {
            assert!(close(nice_step(raw), step), "{raw} -> {}", nice_step(raw));
        }
        assert_eq!(tick_label(2.0, 0.5), "2.0");
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
        assert_eq!(tick_label(0.05, 0.05), "0.05");
        assert_eq!(tick_label(-0.0, 1.0), "0");
    }
}
