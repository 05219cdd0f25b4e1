//! `run`: drive virtual mobile clients against berth nodes and verify, session
//! by session, that nothing acknowledged was lost or applied twice.
//!
//! Closed model: each client sends its next op when the previous one is
//! answered. Open model (`--rate`): ops are due at a constant overall arrival
//! rate and latency is measured from the *intended* send time, so a stall
//! shows up in the percentiles instead of silently lowering the load (wrk2's
//! correction for coordinated omission).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::client::{histogram, ClientConfig, ClientError, ClientStats, MobileClient, TlsTrust};
use crate::result::{Failover, Mark, NodeStat, Percentiles, RunResult, Sample, Verify, Window};

/// What the virtual clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Mixed state-changing and reading ops on a JSON object, verified.
    Kv,
    /// `echo` only: no state, no checkpoint.
    Echo,
    /// Server pushes: `emit` events, verified for gaps and duplicates.
    Events,
    /// Connect and hold (capacity).
    Idle,
    /// Connect, a few ops, disconnect, resume, again.
    Churn,
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// WebSocket URLs; sessions are spread over them.
    pub urls: Vec<String>,
    /// Admin base URLs (`http://127.0.0.1:9090`) sampled for per-node figures
    /// (shared: `local` adds the nodes it starts during the run).
    pub admin: Arc<Mutex<Vec<String>>>,
    /// Virtual clients.
    pub sessions: usize,
    /// How long ops are sent.
    pub duration: Duration,
    /// Clients start spread over this.
    pub ramp: Duration,
    /// What they do.
    pub scenario: Scenario,
    /// Open model: total intended ops per second. `None`: closed model.
    pub rate: Option<f64>,
    /// Bytes of payload in writes and echoes.
    pub payload: usize,
    /// Source addresses to spread client sockets over.
    pub source_ips: Vec<IpAddr>,
    /// Show a live progress line.
    pub progress: bool,
    /// Local PIDs by node id, for peak RSS (set by `local`).
    pub pids: Arc<Mutex<BTreeMap<String, u32>>>,
    /// `wss://`: how the server's certificate is checked.
    pub tls: TlsTrust,
}

#[derive(Default)]
struct Second {
    ops: u64,
    errors: u64,
    hist: Option<Histogram<u64>>,
    connected: u64,
    sessions_per_node: BTreeMap<String, u64>,
}

/// Shared live counters.
pub struct Live {
    start: Instant,
    ops: AtomicU64,
    errors: AtomicU64,
    connected: AtomicU64,
    seconds: Mutex<Vec<Second>>,
    /// Chaos markers (pushed by `local`).
    pub marks: Mutex<Vec<Mark>>,
}

impl Live {
    fn new() -> Self {
        Live {
            start: Instant::now(),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            seconds: Mutex::new(Vec::new()),
            marks: Mutex::new(Vec::new()),
        }
    }

    fn second(&self) -> usize {
        self.start.elapsed().as_secs() as usize
    }

    fn with_second<T>(&self, f: impl FnOnce(&mut Second) -> T) -> T {
        let i = self.second();
        let mut s = self.seconds.lock().unwrap_or_else(|p| p.into_inner());
        while s.len() <= i {
            s.push(Second::default());
        }
        f(&mut s[i])
    }

    fn record(&self, latency: Duration, error: bool) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = latency.as_micros().max(1) as u64;
        self.with_second(|s| {
            s.ops += 1;
            s.errors += error as u64;
            let _ = s.hist.get_or_insert_with(histogram).record(us);
        });
    }

    /// Seconds since the run started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Adds a chart marker now.
    pub fn mark(&self, label: impl Into<String>) -> f64 {
        let at_s = self.start.elapsed().as_secs_f64();
        self.marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Mark {
                at_s,
                label: label.into(),
            });
        at_s
    }
}

/// What one client expects its session to hold.
#[derive(Debug, Default)]
struct Expected {
    incr: u64,
    log: Vec<u64>,
    /// Ops whose answer never came (the run ended): applied or not.
    uncertain: Vec<(String, u64)>,
    emits: u64,
    /// Echoes that came back different from what was sent.
    echo_mismatches: u64,
}

struct ClientOutcome {
    stats: ClientStats,
    verify: Verify,
}

fn pct(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |v: u64| v as f64 / 1000.0;
    Percentiles {
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// The intended send time of op `k` of a client in the open model: client `i`
/// of `n` sends every `n / rate` seconds, offset so the clients interleave.
pub fn intended(start: Instant, i: usize, n: usize, rate: f64, k: u64) -> Instant {
    let interval = n as f64 / rate;
    let offset = interval * (i as f64 / n as f64);
    start + Duration::from_secs_f64(offset + interval * k as f64)
}

async fn one_client(
    i: usize,
    cfg: Arc<RunConfig>,
    live: Arc<Live>,
    begin: Instant,
    end: Instant,
) -> ClientOutcome {
    let mut ccfg = ClientConfig::new(cfg.urls.clone());
    ccfg.tls = cfg.tls.clone();
    if !cfg.source_ips.is_empty() {
        ccfg.source = Some(cfg.source_ips[i % cfg.source_ips.len()]);
    }
    let mut c = MobileClient::new(ccfg, i);
    let mut exp = Expected::default();
    let grace = end + Duration::from_secs(20);
    let ramp_at = begin + cfg.ramp.mul_f64(i as f64 / cfg.sessions.max(1) as f64);
    tokio::time::sleep_until(ramp_at.into()).await;
    if c.ensure_connected(grace).await.is_err() {
        return ClientOutcome {
            stats: c.stats,
            verify: Verify::default(),
        };
    }
    live.connected.fetch_add(1, Ordering::Relaxed);
    let payload = "x".repeat(cfg.payload);
    let mut k = 0u64;
    let mut churn_step = 0u32;
    while Instant::now() < end && c.stopped.is_none() {
        let planned = match cfg.rate {
            Some(rate) => {
                // The schedule starts once every client has had its ramp slot,
                // so connecting is not counted as op latency.
                let t = intended(begin + cfg.ramp, i, cfg.sessions, rate, k);
                if t >= end {
                    break;
                }
                tokio::time::sleep_until(t.into()).await;
                t
            }
            None => Instant::now(),
        };
        k += 1;
        let id = c.next_id;
        let (op, args) = match cfg.scenario {
            Scenario::Idle => {
                let _ = c
                    .hold(end.saturating_duration_since(Instant::now()), grace)
                    .await;
                break;
            }
            Scenario::Echo => ("echo", json!({"value": payload})),
            Scenario::Events => ("emit", json!({"body": {"i": id}})),
            Scenario::Kv | Scenario::Churn => match id % 4 {
                0 => ("incr", json!({"key":"n"})),
                1 => ("append", json!({"key":"log","value":id})),
                2 => ("set", json!({"key":"p","value": payload})),
                _ => ("get", json!({"key":"n"})),
            },
        };
        let r = c.call(op, args, grace).await;
        let took = planned.elapsed();
        match r {
            Ok(v) => {
                let error = v["ok"] != true;
                live.record(took, error);
                if !error {
                    match op {
                        "incr" => exp.incr += 1,
                        "append" => exp.log.push(id),
                        "emit" => exp.emits += 1,
                        "echo" if v["value"] != json!(payload) => exp.echo_mismatches += 1,
                        _ => {}
                    }
                    if op != "get" && op != "echo" {
                        c.last_acked_write = id;
                    }
                }
            }
            Err(ClientError::Deadline) => {
                exp.uncertain.push((op.to_owned(), id));
                break;
            }
            Err(ClientError::Terminal(_)) => break,
        }
        if cfg.scenario == Scenario::Events && k % 16 == 0 {
            c.drain_events(Duration::ZERO).await;
        }
        if cfg.scenario == Scenario::Churn {
            churn_step += 1;
            if churn_step % 3 == 0 {
                c.disconnect().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    live.connected.fetch_sub(1, Ordering::Relaxed);
    let verify = verify_session(&mut c, &exp, cfg.scenario, grace).await;
    c.disconnect().await;
    ClientOutcome {
        stats: c.stats,
        verify,
    }
}

/// Checks the server's state of this client's session against what the
/// client was acknowledged.
async fn verify_session(
    c: &mut MobileClient,
    exp: &Expected,
    scenario: Scenario,
    deadline: Instant,
) -> Verify {
    let v = Verify {
        // Checked on every resume: the session's last applied op went backwards;
        // and every echo must come back as sent.
        state_mismatches: c.stats.resume_regressions + exp.echo_mismatches,
        ..Verify::default()
    };
    let mut v = v;
    match scenario {
        Scenario::Kv | Scenario::Churn => {}
        Scenario::Events => {
            c.drain_events(Duration::from_millis(500)).await;
            let got = c.received.len() as u64;
            if got < exp.emits {
                v.event_gaps += exp.emits - got;
            }
            v.event_gaps += c.stats.event_gaps;
            v.event_duplicates += c.stats.event_duplicates;
            v.sessions_checked = 1;
            return v;
        }
        Scenario::Echo | Scenario::Idle => {
            v.sessions_checked = 1;
            return v;
        }
    }
    let unsure = |name: &str| exp.uncertain.iter().filter(|(op, _)| op == name).count() as u64;
    let state = match c.call("state", Value::Null, deadline).await {
        Ok(r) if r["ok"] == true => r["value"].clone(),
        _ => {
            // The session is gone (or unreachable to the end): everything acknowledged is lost.
            v.lost_acked_ops += exp.incr + exp.log.len() as u64;
            v.sessions_checked = 1;
            return v;
        }
    };
    v.sessions_checked = 1;
    let n = state["n"].as_u64().unwrap_or(0);
    if n < exp.incr {
        v.lost_acked_ops += exp.incr - n;
    } else if n > exp.incr + unsure("incr") {
        v.duplicate_ops += n - exp.incr - unsure("incr");
    }
    let log: Vec<u64> = state["log"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for id in &log {
        *seen.entry(*id).or_default() += 1;
    }
    for id in &exp.log {
        match seen.get(id) {
            None => v.lost_acked_ops += 1,
            Some(k) if *k > 1 => v.duplicate_ops += k - 1,
            _ => {}
        }
    }
    let acked: std::collections::BTreeSet<u64> = exp.log.iter().copied().collect();
    let unsure_ids: std::collections::BTreeSet<u64> =
        exp.uncertain.iter().map(|(_, id)| *id).collect();
    for id in seen.keys() {
        if !acked.contains(id) && !unsure_ids.contains(id) {
            v.state_mismatches += 1;
        }
    }
    // Order: the acknowledged appends appear in the order they were sent.
    let order: Vec<u64> = log
        .iter()
        .copied()
        .filter(|id| acked.contains(id))
        .collect();
    let mut dedup = order.clone();
    dedup.dedup();
    if dedup.windows(2).any(|w| w[0] > w[1]) {
        v.state_mismatches += 1;
    }
    v
}

async fn sample_nodes(
    admin: &[String],
    http: &reqwest_lite::Client,
) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for base in admin {
        if let Some(v) = http.get_json(&format!("{base}/cluster")).await {
            let id = v["node"].as_str().unwrap_or(base).to_owned();
            let sessions = v["sessions_live"].as_u64().unwrap_or(0);
            let peak = v["process"]["peak_rss_bytes"].as_u64().unwrap_or(0);
            out.insert(id, (sessions, peak));
        }
    }
    out
}

/// Runs the load; `live` lets a caller (the chaos driver) mark events.
pub async fn run(cfg: RunConfig, live: Arc<Live>) -> RunResult {
    let cfg = Arc::new(cfg);
    let begin = Instant::now() + Duration::from_millis(50);
    let end = begin + cfg.ramp + cfg.duration;
    let bar = if cfg.progress {
        let b = indicatif::ProgressBar::new(cfg.duration.as_secs() + cfg.ramp.as_secs());
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    // Sampler: per-second figures, node stats, the progress line.
    let sampler = {
        let (live, cfg, bar) = (live.clone(), cfg.clone(), bar.clone());
        tokio::spawn(async move {
            let http = reqwest_lite::Client;
            let mut peaks: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            let mut last_ops = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let admin = cfg.admin.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let nodes = sample_nodes(&admin, &http).await;
                let connected = live.connected.load(Ordering::Relaxed);
                live.with_second(|s| {
                    s.connected = connected;
                    s.sessions_per_node = nodes.iter().map(|(k, v)| (k.clone(), v.0)).collect();
                });
                for (k, (sessions, peak)) in nodes {
                    let e = peaks.entry(k).or_default();
                    e.0 = sessions;
                    e.1 = e.1.max(peak);
                }
                let ops = live.ops.load(Ordering::Relaxed);
                if let Some(b) = &bar {
                    let p99 = {
                        let s = live.seconds.lock().unwrap_or_else(|p| p.into_inner());
                        s.iter()
                            .rev()
                            .nth(1)
                            .and_then(|s| s.hist.as_ref())
                            .map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0)
                    };
                    b.set_position(live.elapsed().as_secs());
                    b.set_message(format!(
                        "{} ops/s  p99 {:.1} ms  errors {}  connected {}",
                        ops - last_ops,
                        p99,
                        live.errors.load(Ordering::Relaxed),
                        connected
                    ));
                }
                last_ops = ops;
                if Instant::now() > end + Duration::from_secs(25) {
                    return peaks;
                }
                if live.sampler_stop() {
                    return peaks;
                }
            }
        })
    };
    let tasks: Vec<_> = (0..cfg.sessions)
        .map(|i| tokio::spawn(one_client(i, cfg.clone(), live.clone(), begin, end)))
        .collect();
    let mut result = RunResult {
        scenario: format!("{:?}", cfg.scenario).to_lowercase(),
        model: if cfg.rate.is_some() {
            "open".into()
        } else {
            "closed".into()
        },
        rate: cfg.rate,
        sessions: cfg.sessions as u64,
        ..RunResult::default()
    };
    let mut lat = histogram();
    let mut connect = histogram();
    let mut resume = histogram();
    let mut stalls = Vec::new();
    for t in tasks {
        let Ok(o) = t.await else {
            *result.errors.entry("client_panic".into()).or_default() += 1;
            continue;
        };
        for us in &o.stats.connect_us {
            let _ = connect.record(*us);
        }
        for us in &o.stats.resume_us {
            let _ = resume.record(*us);
        }
        result.reconnects += o.stats.reconnects;
        result.resumes_ok += o.stats.resumes_ok;
        result.resumes_failed += o.stats.resumes_failed;
        for (k, n) in o.stats.errors {
            *result.errors.entry(k).or_default() += n;
        }
        let v = &mut result.verify;
        v.sessions_checked += o.verify.sessions_checked;
        v.lost_acked_ops += o.verify.lost_acked_ops;
        v.duplicate_ops += o.verify.duplicate_ops;
        v.event_gaps += o.verify.event_gaps;
        v.event_duplicates += o.verify.event_duplicates;
        v.state_mismatches += o.verify.state_mismatches;
        stalls.push(o.stats.stalls);
    }
    live.stop_sampler();
    let peaks = sampler.await.unwrap_or_default();
    // The run's latency: every op was recorded in its second's histogram.
    for sec in live
        .seconds
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        if let Some(h) = &sec.hist {
            let _ = lat.add(h);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let measured = end.saturating_duration_since(begin).as_secs_f64();
    result.duration_s = measured;
    result.ops = lat.len();
    result.ops_per_s = lat.len() as f64 / measured.max(0.001);
    result.latency_ms = pct(&lat);
    result.connect_ms = pct(&connect);
    result.resume_ms = pct(&resume);
    let pids = cfg.pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
    result.nodes = peaks
        .into_iter()
        .map(|(id, (sessions, peak))| NodeStat {
            peak_rss_bytes: pids.get(&id).and_then(|pid| peak_rss(*pid)).unwrap_or(peak),
            id,
            sessions,
        })
        .collect();
    result.marks = live.marks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    result.failover = result
        .marks
        .iter()
        .map(|m| failover_window(&m.label, m.at_s, live.start, &stalls))
        .collect();
    result.timeline = live
        .seconds
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .enumerate()
        .map(|(i, s)| Sample {
            t_s: i as f64,
            ops_per_s: s.ops as f64,
            p50_ms: s
                .hist
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(0.5) as f64 / 1000.0),
            p99_ms: s
                .hist
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0),
            errors: s.errors,
            connected: s.connected,
            sessions_per_node: s.sessions_per_node.clone(),
        })
        .collect();
    result
}

/// How long the sessions around one event could not be served: every stall
/// (a slow op or reconnect) that was under way at the event or began within
/// 3 s after it counts, from the event (or its own start) to its end.
pub fn failover_window(
    label: &str,
    at_s: f64,
    start: Instant,
    stalls: &[Vec<(Instant, Instant)>],
) -> Failover {
    let t = start + Duration::from_secs_f64(at_s);
    let horizon = t + Duration::from_secs(3);
    let mut windows: Vec<f64> = Vec::new();
    for client in stalls {
        let worst = client
            .iter()
            .filter(|(s, e)| *e >= t && *s <= horizon)
            .map(|(s, e)| e.duration_since((*s).max(t)).as_secs_f64() * 1000.0)
            .fold(None, |m: Option<f64>, w| Some(m.map_or(w, |m| m.max(w))));
        if let Some(w) = worst {
            windows.push(w);
        }
    }
    windows.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        if windows.is_empty() {
            0.0
        } else {
            windows[((windows.len() - 1) as f64 * p).round() as usize]
        }
    };
    Failover {
        event: label.to_owned(),
        at_s,
        sessions_affected: windows.len() as u64,
        window_ms: Window {
            p50: q(0.5),
            p99: q(0.99),
            max: windows.last().copied().unwrap_or(0.0),
        },
    }
}

/// Peak resident memory of a local process, from `/proc/PID/status` (`VmHWM`).
pub fn peak_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Live {
    fn sampler_stop(&self) -> bool {
        self.ops.load(Ordering::Relaxed) == u64::MAX
    }

    fn stop_sampler(&self) {
        self.ops.store(u64::MAX, Ordering::Relaxed);
    }
}

/// Creates the live counters of a run (start time = now).
pub fn live() -> Arc<Live> {
    Arc::new(Live::new())
}

/// A tiny HTTP/1.1 GET client for loopback admin endpoints (no TLS, no
/// keep-alive): enough for sampling `/cluster` once a second.
pub mod reqwest_lite {
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Stateless client.
    #[derive(Debug, Default, Clone)]
    pub struct Client;

    impl Client {
        /// GETs `url` (`http://host:port/path`) and parses the body as JSON.
        pub async fn get_json(&self, url: &str) -> Option<Value> {
            let rest = url.strip_prefix("http://")?;
            let (host, path) = rest
                .split_once('/')
                .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
            let fut = async {
                let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
                s.write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .ok()?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.ok()?;
                let text = String::from_utf8_lossy(&buf);
                let body = text.split("\r\n\r\n").nth(1)?;
                serde_json::from_str(body).ok()
            };
            tokio::time::timeout(std::time::Duration::from_secs(2), fut)
                .await
                .ok()?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_model_schedules_from_intended_times() {
        let start = Instant::now();
        // 4 clients at 100 ops/s overall: each every 40 ms, offset by 10 ms.
        assert_eq!(intended(start, 0, 4, 100.0, 0), start);
        assert_eq!(
            intended(start, 1, 4, 100.0, 0) - start,
            Duration::from_millis(10)
        );
        assert_eq!(
            intended(start, 1, 4, 100.0, 3) - start,
            Duration::from_millis(130)
        );
    }

    #[test]
    fn latency_from_the_intended_time_includes_the_stall() {
        // Coordinated-omission correction: an op due at t=0 that could only be
        // sent at t=900ms (the previous op stalled) and took 5 ms counts 905 ms.
        let start = Instant::now();
        let due = intended(start, 0, 1, 10.0, 0);
        let answered = due + Duration::from_millis(905);
        let mut h = histogram();
        h.record(answered.duration_since(due).as_micros() as u64)
            .unwrap();
        assert!(pct(&h).max >= 904.0);
    }

    #[test]
    fn failover_windows_count_only_stalls_around_the_event() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let stalls = vec![
            vec![(at(900), at(2_100))], // under way at the event (1 s): 1.1 s after it
            vec![(at(1_500), at(1_800))], // began after it: 0.3 s
            vec![(at(100), at(400))],   // before: not affected
            vec![],
        ];
        let f = failover_window("kill:1", 1.0, start, &stalls);
        assert_eq!(f.sessions_affected, 2);
        assert!((f.window_ms.max - 1100.0).abs() < 1.0, "{f:?}");
    }
}
