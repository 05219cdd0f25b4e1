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
use rand::Rng;
use serde_json::{json, Value};

use crate::chat::{ChatConfig, ChatPart, ChatPlan, ChatRun};
use crate::client::{
    histogram, ClientConfig, ClientError, ClientStats, MobileClient, Stop, TlsTrust,
};
use crate::result::{
    failover_by_kind, Churn, Failover, FreshResume, Mark, Messages, NodeStat, Percentiles, Problem,
    RunResult, Sample, Verify, Window,
};

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
    /// `kv`'s verified ops from clients that churn at random: before an op
    /// a client may drop its connection without a close frame (and stay
    /// offline up to 100 ms) or roam to the next node's URL; an op may be cut
    /// off in flight (sent, then the connection dropped or roamed away from,
    /// then re-sent with the same id on the resumed connection); and after an
    /// op a client may re-send the id of an acknowledged `incr` or `append`,
    /// which must be answered `duplicate` and not applied. See
    /// [`KV_CHURN_PERCENT`].
    KvChurn,
    /// berth's chat example (`--berth target/release/examples/chat`): users
    /// signed in by JWT, in rooms, saying lines and sending direct messages;
    /// every acknowledged message verified to arrive exactly once, in order
    /// per sender, at every member (see [`crate::chat`]).
    Chat,
}

/// `kv-churn`: in percent of ops, how often a client drops its connection
/// before the op, roams before it, has the op cut off in flight, and
/// re-sends an acknowledged id after it (in that order; at most one per op).
pub const KV_CHURN_PERCENT: [u32; 4] = [4, 3, 3, 3];

/// What a `kv-churn` client does around one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChurnStep {
    None,
    Drop,
    Roam,
    Cut,
    Resend,
}

impl ChurnStep {
    /// The step a roll in `0..100` picks (see [`KV_CHURN_PERCENT`]).
    fn of_roll(roll: u32) -> ChurnStep {
        let [d, r, c, s] = KV_CHURN_PERCENT;
        match roll {
            x if x < d => ChurnStep::Drop,
            x if x < d + r => ChurnStep::Roam,
            x if x < d + r + c => ChurnStep::Cut,
            x if x < d + r + c + s => ChurnStep::Resend,
            _ => ChurnStep::None,
        }
    }
}

impl Scenario {
    /// The name on the command line (`kv-churn`).
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_owned())
    }
}

/// The op of `kv`'s mix that op id `id` is (a re-sent id is the same op).
fn kv_op(id: u64, payload: &str) -> (&'static str, Value) {
    match id % 4 {
        0 => ("incr", json!({"key":"n"})),
        1 => ("append", json!({"key":"log","value":id})),
        2 => ("set", json!({"key":"p","value": payload})),
        _ => ("get", json!({"key":"n"})),
    }
}

/// Acknowledged `incr`/`append` ids a `kv-churn` client keeps to re-send.
const RESEND_KEEP: usize = 16;

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
    /// The `chat` scenario's settings (unused by the others).
    pub chat: ChatConfig,
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
    /// Re-sent ids answered as if new (without `duplicate: true`).
    resend_not_duplicate: u64,
    /// What went wrong, in words, for the problem report (at most
    /// [`NOTES`]).
    notes: Vec<String>,
}

/// Notes one session's problem report keeps at most.
const NOTES: usize = 8;

/// Adds `note` to `notes` unless it holds [`NOTES`] already.
fn note(notes: &mut Vec<String>, note: impl FnOnce() -> String) {
    if notes.len() < NOTES {
        notes.push(note());
    }
}

impl Expected {
    /// Acknowledged state-changing ops whose effect the state must show.
    fn acked_writes(&self) -> u64 {
        self.incr + self.log.len() as u64
    }

    /// Ops named `name` whose answer never came.
    fn unsure(&self, name: &str) -> u64 {
        self.uncertain.iter().filter(|(op, _)| op == name).count() as u64
    }
}

/// The longest a fresh connection is given to read a session's state, past
/// the run's own grace period if that is over already.
const FRESH_RESUME_WINDOW: Duration = Duration::from_secs(10);

/// What verifying one session found.
struct SessionCheck {
    verify: Verify,
    /// Why, in words.
    notes: Vec<String>,
    /// What a fresh resume found, when one was needed.
    fresh: Option<FreshResume>,
}

struct ClientOutcome {
    stats: ClientStats,
    verify: Verify,
    problem: Option<Problem>,
    churn: Churn,
    /// `chat`: what the client said and saw.
    chat: Option<ChatPart>,
}

impl ClientOutcome {
    /// The outcome of client `index`, done, whose session `check` verified,
    /// in a run that started at `start`.
    fn of(
        index: usize,
        c: MobileClient,
        check: SessionCheck,
        churn: Churn,
        start: Instant,
    ) -> ClientOutcome {
        ClientOutcome {
            problem: problem(index, &c, &check, start),
            stats: c.stats,
            verify: check.verify,
            churn,
            chat: None,
        }
    }
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

/// A `chat` client (see [`crate::chat::client`]); its session's check is
/// its events' (no gap, no duplicate) and whether it was sent away, its
/// messages are checked with every other client's at the end of the run.
async fn one_chat_client(
    i: usize,
    cfg: Arc<RunConfig>,
    chat: Arc<ChatRun>,
    live: Arc<Live>,
    begin: Instant,
    end: Instant,
) -> ClientOutcome {
    let mut ccfg = ClientConfig::new(cfg.urls.clone());
    ccfg.tls = cfg.tls.clone();
    if !cfg.source_ips.is_empty() {
        ccfg.source = Some(cfg.source_ips[i % cfg.source_ips.len()]);
    }
    ccfg.credential = crate::chat::credential(&chat.cfg.jwt_secret, &chat.plan.user(i as u32)).ok();
    let c = MobileClient::new(ccfg, i);
    let ramp_at = begin + cfg.ramp.mul_f64(i as f64 / cfg.sessions.max(1) as f64);
    tokio::time::sleep_until(ramp_at.into()).await;
    live.connected.fetch_add(1, Ordering::Relaxed);
    let payload = "x".repeat(cfg.payload.min(1900));
    let record = |took: Duration, error: bool| live.record(took, error);
    let (mut c, part) = crate::chat::client(
        i,
        chat,
        c,
        cfg.rate,
        &payload,
        begin,
        begin + cfg.ramp,
        end,
        record,
    )
    .await;
    live.connected.fetch_sub(1, Ordering::Relaxed);
    c.disconnect().await;
    let acked = part.log.sent.len() as u64 + part.log.joins_acked.len() as u64;
    let mut verify = stop_verdict(c.stopped, acked);
    verify.sessions_checked = u64::from(c.session.is_some());
    verify.event_gaps = c.stats.event_gaps;
    verify.event_duplicates = c.stats.event_duplicates;
    let check = SessionCheck {
        verify,
        notes: Vec::new(),
        fresh: None,
    };
    let mut o = ClientOutcome::of(i, c, check, Churn::default(), live.start);
    o.chat = Some(part);
    o
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
        // Never welcomed: no session to check, but it may have been sent away.
        let check = SessionCheck {
            verify: stop_verdict(c.stopped, 0),
            fresh: None,
            notes: Vec::new(),
        };
        return ClientOutcome::of(i, c, check, Churn::default(), live.start);
    }
    live.connected.fetch_add(1, Ordering::Relaxed);
    let payload = "x".repeat(cfg.payload);
    let mut k = 0u64;
    let mut churn_step = 0u32;
    let mut churn = Churn::default();
    // kv-churn: acknowledged incr/append ids to re-send, the latest last.
    let mut resendable: std::collections::VecDeque<u64> = Default::default();
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
        let step = if cfg.scenario == Scenario::KvChurn {
            ChurnStep::of_roll(rand::rng().random_range(0..100))
        } else {
            ChurnStep::None
        };
        match step {
            ChurnStep::Drop => {
                churn.drops += 1;
                c.drop_connection();
                let offline = rand::rng().random_range(0..=100);
                tokio::time::sleep(Duration::from_millis(offline)).await;
            }
            ChurnStep::Roam => {
                churn.roams += 1;
                c.roam().await;
            }
            _ => {}
        }
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
            Scenario::Kv | Scenario::Churn | Scenario::KvChurn => kv_op(id, &payload),
            Scenario::Chat => unreachable!("chat clients run one_chat_client"),
        };
        let planned = if step == ChurnStep::Drop {
            // The time offline is the client's own, not the op's latency.
            planned.max(Instant::now())
        } else {
            planned
        };
        let r = if step == ChurnStep::Cut {
            churn.cut_ops += 1;
            let roam = rand::rng().random_bool(0.5);
            c.call_cut(op, args, roam, grace).await
        } else {
            c.call(op, args, grace).await
        };
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
                    if matches!(op, "incr" | "append") && cfg.scenario == Scenario::KvChurn {
                        if resendable.len() == RESEND_KEEP {
                            resendable.pop_front();
                        }
                        resendable.push_back(id);
                    }
                }
            }
            Err(_) => {
                // No answer before the deadline, or stopped after sending it:
                // applied or not.
                exp.uncertain.push((op.to_owned(), id));
                break;
            }
        }
        if step == ChurnStep::Resend && !resendable.is_empty() {
            let again = resendable[rand::rng().random_range(0..resendable.len())];
            let (op, args) = kv_op(again, &payload);
            churn.resent_ids += 1;
            let t = Instant::now();
            match c.resend(again, op, args, grace).await {
                Ok(v) => {
                    live.record(t.elapsed(), v["ok"] != true);
                    if v["ok"] == true && v["duplicate"] != true {
                        exp.resend_not_duplicate += 1;
                        note(&mut exp.notes, || {
                            format!("re-sent {op} {again} answered as new: {v}")
                        });
                    }
                }
                // It was applied (acknowledged) before: nothing is unsure.
                Err(_) => break,
            }
        }
        if cfg.scenario == Scenario::Events && k.is_multiple_of(16) {
            c.drain_events(Duration::ZERO).await;
        }
        if cfg.scenario == Scenario::Churn {
            churn_step += 1;
            if churn_step.is_multiple_of(3) {
                churn.drops += 1;
                c.disconnect().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    live.connected.fetch_sub(1, Ordering::Relaxed);
    let verify_by = grace.max(Instant::now() + FRESH_RESUME_WINDOW);
    let check = verify_session(&mut c, &exp, cfg.scenario, verify_by).await;
    c.disconnect().await;
    ClientOutcome::of(i, c, check, churn, live.start)
}

/// Checks the server's state of this client's session against what the
/// client was acknowledged, and whether the server sent the client away.
/// The state is read on the client's own connection or, if that fails (the
/// client was stopped, or cannot get an answer), on a fresh one that
/// resumes the session; only if that fails too is every acknowledged op
/// counted as lost.
async fn verify_session(
    c: &mut MobileClient,
    exp: &Expected,
    scenario: Scenario,
    deadline: Instant,
) -> SessionCheck {
    let mut v = Verify {
        sessions_checked: 1,
        // Checked on every resume: the session's last applied op went backwards;
        // and every echo must come back as sent.
        state_mismatches: c.stats.resume_regressions
            + exp.echo_mismatches
            + exp.resend_not_duplicate,
        ..Verify::default()
    };
    let mut fresh = None;
    let mut notes = exp.notes.clone();
    if c.stats.resume_regressions > 0 {
        note(&mut notes, || {
            format!(
                "{} resumes whose welcome's last_op was below the last acknowledged write",
                c.stats.resume_regressions
            )
        });
    }
    match scenario {
        Scenario::Kv | Scenario::Churn | Scenario::KvChurn => {
            let (state, found) = read_state(c, deadline, &mut notes).await;
            fresh = found;
            match state {
                Some(state) => v.add(&compare_state_noting(&state, exp, &mut notes)),
                // Gone (or unreachable to the end): everything acknowledged is lost.
                None => v.lost_acked_ops += exp.acked_writes(),
            }
        }
        Scenario::Events => {
            c.drain_events(Duration::from_millis(500)).await;
            let got = c.received.len() as u64;
            if got < exp.emits {
                v.event_gaps += exp.emits - got;
            }
            v.event_gaps += c.stats.event_gaps;
            v.event_duplicates += c.stats.event_duplicates;
        }
        Scenario::Echo | Scenario::Idle | Scenario::Chat => {}
    }
    // After the reads above: a stop while verifying counts too.
    let stop = stop_verdict(c.stopped, exp.acked_writes());
    v.sessions_sent_away = stop.sessions_sent_away;
    v.empty_sessions_ended = stop.empty_sessions_ended;
    SessionCheck {
        verify: v,
        fresh,
        notes,
    }
}

/// Whether a client's end state says the server sent it away: it recorded a
/// stop (a close code that says not to reconnect, or a refused resume).
/// Every session of a run has exactly one client, so no takeover, no
/// "unknown session" and no refused token is ever deserved.
///
/// A session told 4004 that had acknowledged nothing is not sent away: it was
/// never written (protocol.md), so its client rightly starts a new one. It is
/// counted in `empty_sessions_ended`.
fn stop_verdict(stopped: Option<Stop>, acked_writes: u64) -> Verify {
    let not_found = matches!(
        stopped,
        Some(Stop::SessionNotFound) | Some(Stop::Close(4004))
    );
    match stopped {
        None => Verify::default(),
        Some(_) if not_found && acked_writes == 0 => Verify {
            empty_sessions_ended: 1,
            ..Verify::default()
        },
        Some(_) => Verify {
            sessions_sent_away: 1,
            ..Verify::default()
        },
    }
}

/// Reads the session's state with the `state` op: on the client's own
/// connection, else on a fresh one that resumes the session. Answers the
/// state (`None`: neither could read it) and what the fresh resume found
/// (`None`: none was needed, or there was no session to resume).
///
/// A fresh resume that is refused (or stopped) on one node is tried on the
/// next, once on each node until one reads the state: a session one node
/// will not hand over is not lost if another reads it. What every failed
/// try found goes to `notes`; the answer is the first failure's finding if
/// no try read the state.
async fn read_state(
    c: &mut MobileClient,
    deadline: Instant,
    notes: &mut Vec<String>,
) -> (Option<Value>, Option<FreshResume>) {
    if let Some(state) = state_in(&c.call("state", Value::Null, deadline).await) {
        return (Some(state), None);
    }
    // Let go of the old connection, if any, so the resume is no takeover.
    c.disconnect().await;
    let mut first_failure = None;
    for k in 0..c.url_count() {
        let Some(mut fresh) = c.fresh_resume() else {
            return (None, None);
        };
        fresh.skip_urls(k);
        let at = fresh.next_authority().to_owned();
        let answer = fresh.call("state", Value::Null, deadline).await;
        fresh.disconnect().await;
        let found = fresh_resume_found(&answer);
        if let Some(state) = state_in(&answer) {
            return (Some(state), Some(found));
        }
        note(notes, || format!("a fresh resume on {at}: {found}"));
        let out_of_time = found == FreshResume::Unreachable;
        first_failure.get_or_insert(found);
        if out_of_time {
            break;
        }
    }
    (None, first_failure)
}

/// The state in the answer to a `state` op, if it is a successful one.
fn state_in(answer: &Result<Value, ClientError>) -> Option<Value> {
    match answer {
        Ok(r) if r["ok"] == true => Some(r["value"].clone()),
        _ => None,
    }
}

/// What the answer to a fresh resume's `state` op says about the session.
fn fresh_resume_found(answer: &Result<Value, ClientError>) -> FreshResume {
    match answer {
        Ok(r) if r["ok"] == true => FreshResume::StateRead,
        Ok(r) => FreshResume::Error {
            code: r["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
        },
        Err(ClientError::Terminal(Stop::SessionNotFound | Stop::Close(4004))) => {
            FreshResume::NotFound
        }
        Err(ClientError::Terminal(Stop::BadToken | Stop::Close(1008))) => FreshResume::BadToken,
        Err(ClientError::Terminal(Stop::Close(code))) => FreshResume::Stopped { code: *code },
        Err(ClientError::Deadline) => FreshResume::Unreachable,
    }
}

/// Compares a session's state (the value of `state`) with what its client
/// was acknowledged: `n` counts the acknowledged `incr`s, `log` holds every
/// acknowledged `append` once and in order. Ops whose answer never came may
/// or may not be there.
#[cfg(test)]
fn compare_state(state: &Value, exp: &Expected) -> Verify {
    compare_state_noting(state, exp, &mut Vec::new())
}

/// [`compare_state`], saying in `notes` what differs.
fn compare_state_noting(state: &Value, exp: &Expected, notes: &mut Vec<String>) -> Verify {
    let mut v = Verify::default();
    let n = state["n"].as_u64().unwrap_or(0);
    let unsure = exp.unsure("incr");
    if n < exp.incr {
        v.lost_acked_ops += exp.incr - n;
        note(notes, || {
            format!("n is {n}, {} incr acknowledged", exp.incr)
        });
    } else if n > exp.incr + unsure {
        v.duplicate_ops += n - exp.incr - unsure;
        note(notes, || {
            format!(
                "n is {n}, {} incr acknowledged and {unsure} unsure",
                exp.incr
            )
        });
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
            None => {
                v.lost_acked_ops += 1;
                note(notes, || {
                    format!("acknowledged append {id} is not in the log")
                });
            }
            Some(k) if *k > 1 => {
                v.duplicate_ops += k - 1;
                note(notes, || format!("append {id} is in the log {k} times"));
            }
            _ => {}
        }
    }
    let acked: std::collections::BTreeSet<u64> = exp.log.iter().copied().collect();
    let unsure_ids: std::collections::BTreeSet<u64> =
        exp.uncertain.iter().map(|(_, id)| *id).collect();
    for id in seen.keys() {
        if !acked.contains(id) && !unsure_ids.contains(id) {
            v.state_mismatches += 1;
            note(notes, || {
                format!("the log holds {id}, an append neither acknowledged nor unsure")
            });
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
    if let Some(w) = dedup.windows(2).find(|w| w[0] > w[1]) {
        v.state_mismatches += 1;
        note(notes, || {
            format!(
                "acknowledged appends out of order: {} before {}",
                w[0], w[1]
            )
        });
    }
    v
}

/// The report of client `index`'s session if it has a problem (anything
/// counted, or a fresh resume that could not read the state); `None` for a
/// clean session.
/// `start`: the start of the run, for the times of the client's trail.
fn problem(
    index: usize,
    c: &MobileClient,
    check: &SessionCheck,
    start: Instant,
) -> Option<Problem> {
    let resume_failed = check
        .fresh
        .as_ref()
        .is_some_and(|f| *f != FreshResume::StateRead);
    if check.verify.problem_count() == 0 && !resume_failed {
        return None;
    }
    Some(Problem {
        client: index as u64,
        session: c.session.clone(),
        found: check.verify.clone(),
        last_end: c.last_end.clone(),
        errors: c.stats.errors.clone(),
        reconnects: c.stats.reconnects,
        resumes_ok: c.stats.resumes_ok,
        node: c.owner().map(str::to_owned),
        last_version: c.last_version,
        fresh_resume: check.fresh.clone(),
        notes: c
            .stats
            .regressions
            .iter()
            .map(|(t, what)| {
                let s = t.saturating_duration_since(start).as_secs_f64();
                format!("{s:.3}s {what}")
            })
            .chain(check.notes.iter().cloned())
            .collect(),
        trail: c
            .trail
            .iter()
            .map(|(t, what)| {
                let s = t.saturating_duration_since(start).as_secs_f64();
                format!("{s:.3}s {what}")
            })
            .collect(),
    })
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
    let chat = match cfg.scenario {
        Scenario::Chat => {
            match ChatPlan::new(cfg.sessions, &cfg.chat, &ChatPlan::new_tag()) {
                Ok(plan) => Some(Arc::new(ChatRun::new(plan, cfg.chat.clone(), cfg.sessions))),
                Err(e) => {
                    // The command line checks the plan first: only a
                    // caller of the library gets here.
                    eprintln!("berth-loadtest: chat: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    let tasks: Vec<_> = (0..cfg.sessions)
        .filter(|_| cfg.scenario != Scenario::Chat || chat.is_some())
        .map(|i| match &chat {
            Some(chat) => tokio::spawn(one_chat_client(
                i,
                cfg.clone(),
                chat.clone(),
                live.clone(),
                begin,
                end,
            )),
            None => tokio::spawn(one_client(i, cfg.clone(), live.clone(), begin, end)),
        })
        .collect();
    let mut result = RunResult {
        scenario: cfg.scenario.name(),
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
    let mut chat_parts = Vec::new();
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
        result.verify.add(&o.verify);
        result.churn.add(&o.churn);
        result.problems.extend(o.problem);
        stalls.push(o.stats.stalls);
        chat_parts.extend(o.chat);
    }
    if let Some(chat) = &chat {
        let m = chat_messages(chat, chat_parts, end);
        result.verify.lost_messages += m.lost;
        result.verify.duplicate_messages += m.duplicated;
        result.verify.messages_out_of_order += m.out_of_order;
        result.verify.state_mismatches += m.unexpected;
        result.messages = Some(m);
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
            // A restarted node's process has its own peak; the samples
            // saw the earlier ones.
            peak_rss_bytes: pids
                .get(&id)
                .and_then(|pid| peak_rss(*pid))
                .map_or(peak, |p| p.max(peak)),
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
    result.failover_by_kind = failover_by_kind(&result.failover);
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

/// Verifies the messages of a chat run's clients (`parts`) and sums up
/// their figures; the load ended at `end`.
fn chat_messages(chat: &ChatRun, parts: Vec<ChatPart>, end: Instant) -> Messages {
    let logs: Vec<_> = parts.iter().map(|p| p.log.clone()).collect();
    let k = crate::chat::verify(&chat.plan.members, &logs);
    let mut latency = histogram();
    for p in &parts {
        let _ = latency.add(&p.latency);
    }
    let say_start = chat.say_start().unwrap_or(end);
    let say_s = end.saturating_duration_since(say_start).as_secs_f64();
    let last = parts
        .iter()
        .filter_map(|p| p.last_delivery)
        .max()
        .unwrap_or(say_start);
    let deliver_s = last.saturating_duration_since(say_start).as_secs_f64();
    Messages {
        rooms: chat.plan.members.len() as u64,
        room_size: chat.plan.members.first().map_or(0, Vec::len) as u64,
        lines_acked: k.lines_acked,
        dms_acked: k.dms_acked,
        unacked: k.unacked,
        deliveries_expected: k.deliveries_expected,
        delivered: k.delivered,
        lost: k.lost,
        duplicated: k.duplicated,
        out_of_order: k.out_of_order,
        unexpected: k.unexpected,
        say_s,
        lines_per_s: k.lines_acked as f64 / say_s.max(0.001),
        deliveries_per_s: k.delivered as f64 / deliver_s.max(0.001),
        delivery_ms: pct(&latency),
        notes: k.notes,
    }
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

    #[test]
    fn a_4004_is_a_failure_only_for_a_session_that_had_acknowledged_something() {
        use crate::client::Stop;
        let v = stop_verdict(Some(Stop::Close(4004)), 0);
        assert_eq!((v.sessions_sent_away, v.empty_sessions_ended), (0, 1));
        let v = stop_verdict(Some(Stop::SessionNotFound), 0);
        assert_eq!((v.sessions_sent_away, v.empty_sessions_ended), (0, 1));
        let v = stop_verdict(Some(Stop::Close(4004)), 3);
        assert_eq!((v.sessions_sent_away, v.empty_sessions_ended), (1, 0));
        let v = stop_verdict(Some(Stop::Close(4000)), 0);
        assert_eq!(
            (v.sessions_sent_away, v.empty_sessions_ended),
            (1, 0),
            "4000 always is"
        );
        assert_eq!(stop_verdict(None, 5), Verify::default());
    }

    use super::*;
    use crate::client::ConnEnd;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;

    fn expected(incr: u64, log: &[u64], uncertain: &[(&str, u64)]) -> Expected {
        Expected {
            incr,
            log: log.to_vec(),
            uncertain: uncertain
                .iter()
                .map(|(op, id)| (op.to_string(), *id))
                .collect(),
            ..Expected::default()
        }
    }

    #[test]
    fn the_state_is_compared_with_what_was_acknowledged() {
        let exp = expected(2, &[1, 5], &[("incr", 8), ("append", 9)]);
        let clean = compare_state(&json!({"n": 2, "log": [1, 5]}), &exp);
        assert_eq!(clean.problem_count(), 0, "{clean:?}");
        // Unanswered ops may or may not be there.
        let unsure = compare_state(&json!({"n": 3, "log": [1, 5, 9]}), &exp);
        assert_eq!(unsure.problem_count(), 0, "{unsure:?}");
        let lost = compare_state(&json!({"n": 1, "log": [5]}), &exp);
        assert_eq!(lost.lost_acked_ops, 2, "{lost:?}");
        let twice = compare_state(&json!({"n": 4, "log": [1, 1, 5]}), &exp);
        assert_eq!(twice.duplicate_ops, 2, "{twice:?}");
        let foreign = compare_state(&json!({"n": 2, "log": [1, 5, 7]}), &exp);
        assert_eq!(foreign.state_mismatches, 1, "{foreign:?}");
        let reordered = compare_state(&json!({"n": 2, "log": [5, 1]}), &exp);
        assert_eq!(reordered.state_mismatches, 1, "{reordered:?}");
        let mut notes = Vec::new();
        compare_state_noting(&json!({"n": 4, "log": [1, 1, 7]}), &exp, &mut notes);
        assert_eq!(
            notes,
            [
                "n is 4, 2 incr acknowledged and 1 unsure",
                "append 1 is in the log 2 times",
                "acknowledged append 5 is not in the log",
                "the log holds 7, an append neither acknowledged nor unsure",
            ]
        );
        let gone = compare_state(&Value::Null, &exp);
        assert_eq!(gone.lost_acked_ops, exp.acked_writes());
    }

    #[test]
    fn a_fresh_resume_is_classified_by_close_code_and_stop() {
        let cases = [
            (Ok(json!({"ok": true, "value": {}})), FreshResume::StateRead),
            (
                Ok(json!({"ok": false, "error": {"code": "internal"}})),
                FreshResume::Error {
                    code: "internal".into(),
                },
            ),
            (
                Err(ClientError::Terminal(Stop::SessionNotFound)),
                FreshResume::NotFound,
            ),
            (
                Err(ClientError::Terminal(Stop::Close(4004))),
                FreshResume::NotFound,
            ),
            (
                Err(ClientError::Terminal(Stop::BadToken)),
                FreshResume::BadToken,
            ),
            (
                Err(ClientError::Terminal(Stop::Close(1008))),
                FreshResume::BadToken,
            ),
            (
                Err(ClientError::Terminal(Stop::Close(4000))),
                FreshResume::Stopped { code: 4000 },
            ),
            (Err(ClientError::Deadline), FreshResume::Unreachable),
        ];
        for (answer, found) in cases {
            assert_eq!(fresh_resume_found(&answer), found, "{answer:?}");
            assert_eq!(
                state_in(&answer).is_some(),
                found == FreshResume::StateRead,
                "{answer:?}"
            );
        }
    }

    fn client(url: &str) -> MobileClient {
        MobileClient::new(ClientConfig::new(vec![url.into()]), 0)
    }

    #[tokio::test]
    async fn a_stopped_client_counts_as_sent_away_in_every_scenario() {
        for scenario in [Scenario::Echo, Scenario::Idle, Scenario::Events] {
            let mut c = client("ws://127.0.0.1:1/ws");
            let deadline = Instant::now();
            let check = verify_session(&mut c, &Expected::default(), scenario, deadline).await;
            assert_eq!(check.verify.sessions_sent_away, 0, "{scenario:?}");
            assert!(problem(0, &c, &check, deadline).is_none(), "{scenario:?}");
            c.stopped = Some(Stop::Close(4000));
            let check = verify_session(&mut c, &Expected::default(), scenario, deadline).await;
            assert_eq!(check.verify.sessions_sent_away, 1, "{scenario:?}");
            assert_eq!(check.verify.data_problems(), 0, "{scenario:?}");
            assert!(problem(0, &c, &check, deadline).is_some(), "{scenario:?}");
        }
    }

    #[tokio::test]
    async fn a_session_no_fresh_connection_can_reach_loses_what_was_acknowledged() {
        // Nothing listens on port 1: neither the client nor a fresh resume
        // can read the state before the deadline.
        let mut c = client("ws://127.0.0.1:1/ws");
        c.session = Some("s1".into());
        c.stopped = Some(Stop::Close(4000));
        c.last_end = Some(ConnEnd::Closed {
            code: 4000,
            reason: "taken over".into(),
        });
        let exp = expected(2, &[1], &[]);
        let deadline = Instant::now() + Duration::from_millis(300);
        let check = verify_session(&mut c, &exp, Scenario::Kv, deadline).await;
        assert_eq!(check.fresh, Some(FreshResume::Unreachable));
        assert_eq!(
            (check.verify.lost_acked_ops, check.verify.sessions_sent_away),
            (3, 1)
        );
        let p = problem(4, &c, &check, Instant::now()).unwrap();
        assert_eq!(p.client, 4);
        assert_eq!(p.session.as_deref(), Some("s1"));
        assert_eq!(p.last_end, c.last_end);
        assert_eq!(p.fresh_resume, Some(FreshResume::Unreachable));
    }

    /// One session on a berth stand-in: what it holds, and every hello it got
    /// (with the URL it came on).
    #[derive(Default)]
    struct FakeSession {
        state: serde_json::Map<String, Value>,
        last_op: u64,
        version: u64,
        hellos: Vec<(String, Value)>,
        /// A broken server: a retried id is applied again.
        applies_twice: bool,
    }

    impl FakeSession {
        /// Runs op frame `op` on the session and answers its `result` frame
        /// (a repeated id is not applied again, as on berth).
        fn apply(&mut self, op: &Value) -> Value {
            let id = op["id"].as_u64().unwrap_or(0);
            if id <= self.last_op && !self.applies_twice {
                return json!({"type":"result","id":id,"ok":true,"duplicate":true,"version":self.version});
            }
            self.last_op = self.last_op.max(id);
            let args = &op["args"];
            let key = args["key"].as_str().unwrap_or_default().to_owned();
            let value = match op["op"].as_str().unwrap_or_default() {
                "incr" => {
                    let n = self.state.get(&key).and_then(Value::as_u64).unwrap_or(0) + 1;
                    self.state.insert(key, json!(n));
                    json!(n)
                }
                "append" => {
                    let list = self.state.entry(key).or_insert_with(|| json!([]));
                    let list = list.as_array_mut().expect("a list");
                    list.push(args["value"].clone());
                    json!(list.len())
                }
                "set" => self
                    .state
                    .insert(key, args["value"].clone())
                    .unwrap_or_default(),
                "get" => self.state.get(&key).cloned().unwrap_or_default(),
                "state" => Value::Object(self.state.clone()),
                other => panic!("unexpected op {other}"),
            };
            if !matches!(op["op"].as_str(), Some("get" | "state")) {
                self.version += 1;
            }
            json!({"type":"result","id":id,"ok":true,"value":value,"version":self.version})
        }
    }

    /// A berth stand-in for a single session (`s1`, token `t1`, owner
    /// `n1`). The connection that created it gets op `takeover_after + 1`
    /// applied and then, instead of its answer, a 4000 close (as if another
    /// connection had taken the session over). With `forget`, no resume
    /// finds the session. Answers its URL and the session.
    async fn fake_berth(
        takeover_after: Option<u64>,
        forget: bool,
    ) -> (String, Arc<Mutex<FakeSession>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let session = Arc::new(Mutex::new(FakeSession::default()));
        let shared = session.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let session = shared.clone();
                tokio::spawn(async move {
                    let mut uri = String::new();
                    // The error type is the one tungstenite's handshake callback requires.
                    #[allow(clippy::result_large_err)]
                    let keep_uri = |req: &Request, resp: Response| {
                        uri = req.uri().to_string();
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, keep_uri).await
                    else {
                        return;
                    };
                    let Some(Ok(Message::Text(t))) = ws.next().await else {
                        return;
                    };
                    let hello: Value = serde_json::from_str(&t).unwrap();
                    let resuming = !hello["session"].is_null();
                    let known = hello["session"] == "s1" && hello["token"] == "t1";
                    let welcome = {
                        let mut s = session.lock().unwrap();
                        s.hellos.push((uri, hello));
                        json!({"type":"welcome","session":"s1","token":"t1","resumed":resuming,
                               "version":s.version,"last_op":s.last_op,"node":"n1"})
                    };
                    if resuming && (forget || !known) {
                        let error =
                            json!({"type":"error","code":"session_not_found","message":"unknown"});
                        let _ = ws.send(Message::text(error.to_string())).await;
                        let _ = ws
                            .close(Some(CloseFrame {
                                code: CloseCode::from(4004),
                                reason: "session unknown".into(),
                            }))
                            .await;
                        return;
                    }
                    let _ = ws.send(Message::text(welcome.to_string())).await;
                    let mut ops = 0;
                    while let Some(Ok(m)) = ws.next().await {
                        let Message::Text(t) = m else { continue };
                        let op: Value = serde_json::from_str(&t).unwrap();
                        if op["type"] != "op" {
                            continue;
                        }
                        let answer = session.lock().unwrap().apply(&op);
                        ops += 1;
                        if !resuming && takeover_after.is_some_and(|n| ops > n) {
                            let _ = ws
                                .close(Some(CloseFrame {
                                    code: CloseCode::from(4000),
                                    reason: "taken over".into(),
                                }))
                                .await;
                            return;
                        }
                        let _ = ws.send(Message::text(answer.to_string())).await;
                    }
                });
            }
        });
        (url, session)
    }

    /// A short closed-model `kv` run of one session against `url`.
    async fn run_one(url: String) -> RunResult {
        run_one_of(url, Scenario::Kv, Duration::from_millis(300)).await
    }

    /// A closed-model run of one session against `url`.
    async fn run_one_of(url: String, scenario: Scenario, duration: Duration) -> RunResult {
        let cfg = RunConfig {
            urls: vec![url],
            admin: Arc::default(),
            sessions: 1,
            duration,
            ramp: Duration::ZERO,
            scenario,
            rate: None,
            payload: 4,
            source_ips: Vec::new(),
            progress: false,
            pids: Arc::default(),
            tls: TlsTrust::default(),
            chat: ChatConfig::default(),
        };
        run(cfg, live()).await
    }

    #[tokio::test]
    async fn a_live_session_is_read_on_its_own_connection() {
        let (url, session) = fake_berth(None, false).await;
        let r = run_one(url).await;
        assert!(r.ops > 10, "{} ops", r.ops);
        assert_eq!(r.verify.sessions_checked, 1);
        assert_eq!(r.verify.problem_count(), 0, "{:?}", r.verify);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(session.lock().unwrap().hellos.len(), 1, "no fresh resume");
    }

    #[tokio::test]
    async fn a_client_sent_away_is_verified_on_a_fresh_connection() {
        // Ops 1-3 (append, set, get) are answered; op 4 (incr) is applied,
        // then the connection is closed 4000 instead of answering.
        let (url, session) = fake_berth(Some(3), false).await;
        let r = run_one(url).await;
        let v = &r.verify;
        assert_eq!(
            (v.sessions_checked, v.sessions_sent_away, v.data_problems()),
            (1, 1, 0),
            "sent away, but nothing lost or applied twice: {v:?}"
        );
        let [p] = r.problems.as_slice() else {
            panic!("one problem: {:?}", r.problems)
        };
        assert_eq!(p.session.as_deref(), Some("s1"));
        assert_eq!(
            p.last_end,
            Some(ConnEnd::Closed {
                code: 4000,
                reason: "taken over".into()
            })
        );
        assert_eq!(p.fresh_resume, Some(FreshResume::StateRead));
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(p.last_version, 2, "the version in op 3's answer");
        assert_eq!((p.reconnects, p.resumes_ok), (1, 0));
        let s = session.lock().unwrap();
        let [_, (uri, hello)] = s.hellos.as_slice() else {
            panic!("a create and one fresh resume: {:?}", s.hellos)
        };
        assert_eq!(uri, "/ws?session=s1&node=n1", "the resume hints");
        assert_eq!(
            (&hello["session"], &hello["token"]),
            (&json!("s1"), &json!("t1"))
        );
    }

    #[tokio::test]
    async fn a_client_sent_away_before_its_welcome_is_counted() {
        // Every hello is closed with 1008: do not retry these credentials.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    continue;
                };
                let _ = ws.next().await;
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::Policy,
                        reason: "bad origin".into(),
                    }))
                    .await;
            }
        });
        let r = run_one(url).await;
        let v = &r.verify;
        assert_eq!((v.sessions_checked, v.sessions_sent_away), (0, 1), "{v:?}");
        let [p] = r.problems.as_slice() else {
            panic!("one problem: {:?}", r.problems)
        };
        assert_eq!(p.session, None);
        assert_eq!(
            p.last_end,
            Some(ConnEnd::Closed {
                code: 1008,
                reason: "bad origin".into()
            })
        );
    }

    #[tokio::test]
    async fn a_session_a_fresh_resume_cannot_find_is_lost() {
        let (url, _session) = fake_berth(Some(3), true).await;
        let r = run_one(url).await;
        let v = &r.verify;
        // Append 1 was acknowledged; the incr of op 4 was never answered.
        assert_eq!((v.lost_acked_ops, v.sessions_sent_away), (1, 1), "{v:?}");
        let [p] = r.problems.as_slice() else {
            panic!("one problem: {:?}", r.problems)
        };
        assert_eq!(p.fresh_resume, Some(FreshResume::NotFound));
    }

    /// A server that closes every `hello` with `code`; answers its URL.
    async fn closing_server(code: u16) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    continue;
                };
                let _ = ws.next().await;
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: "a newer connection took this session over".into(),
                    }))
                    .await;
            }
        });
        url
    }

    #[tokio::test]
    async fn a_fresh_resume_refused_on_one_node_is_tried_on_the_next() {
        let (good, _session) = fake_berth(None, false).await;
        let bad = closing_server(4000).await;
        let mut c = MobileClient::new(ClientConfig::new(vec![good, bad]), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let r = c.call("incr", json!({"key":"n"}), deadline).await.unwrap();
        assert_eq!(r["ok"], true, "{r}");
        // Stopped, and the next connect goes to the node that refuses.
        c.disconnect().await;
        c.stopped = Some(Stop::Close(4000));
        c.skip_urls(1);
        let exp = Expected {
            incr: 1,
            ..Expected::default()
        };
        let check = verify_session(&mut c, &exp, Scenario::Kv, deadline).await;
        assert_eq!(
            (check.verify.lost_acked_ops, check.verify.sessions_sent_away),
            (0, 1),
            "read on the second node: {:?}",
            check.notes
        );
        assert_eq!(check.fresh, Some(FreshResume::StateRead));
        assert!(
            check.notes[0].ends_with(": stopped with close 4000"),
            "{:?}",
            check.notes
        );
    }

    #[test]
    fn kv_churn_steps_follow_their_percentages() {
        let steps: Vec<ChurnStep> = (0..100).map(ChurnStep::of_roll).collect();
        let count = |s: ChurnStep| steps.iter().filter(|x| **x == s).count() as u32;
        assert_eq!(
            [
                count(ChurnStep::Drop),
                count(ChurnStep::Roam),
                count(ChurnStep::Cut),
                count(ChurnStep::Resend)
            ],
            KV_CHURN_PERCENT
        );
        assert_eq!(
            count(ChurnStep::None),
            100 - KV_CHURN_PERCENT.iter().sum::<u32>()
        );
        assert_eq!(Scenario::KvChurn.name(), "kv-churn");
        assert_eq!(Scenario::Kv.name(), "kv");
        // A re-sent id is the same op with the same arguments.
        assert_eq!(kv_op(5, "x"), kv_op(5, "x"));
        assert_eq!(kv_op(5, "x").0, "append");
    }

    #[tokio::test]
    async fn kv_churn_drops_roams_cuts_and_resends_and_verifies_clean() {
        let (url, session) = fake_berth(None, false).await;
        let r = run_one_of(url, Scenario::KvChurn, Duration::from_millis(1_500)).await;
        assert_eq!(r.scenario, "kv-churn");
        assert_eq!(
            r.verify.problem_count(),
            0,
            "{:?} {:?}",
            r.verify,
            r.problems
        );
        let c = &r.churn;
        assert!(
            c.drops > 0 && c.roams > 0 && c.cut_ops > 0 && c.resent_ids > 0,
            "{} ops: {c:?}",
            r.ops
        );
        assert!(r.resumes_ok >= c.drops + c.roams, "{r:?}");
        let s = session.lock().unwrap();
        assert!(s.hellos.len() as u64 > c.drops, "every drop resumed");
    }

    #[tokio::test]
    async fn kv_churn_catches_a_server_that_applies_a_retried_id_again() {
        let (url, session) = fake_berth(None, false).await;
        session.lock().unwrap().applies_twice = true;
        let r = run_one_of(url, Scenario::KvChurn, Duration::from_millis(1_500)).await;
        let v = &r.verify;
        assert!(r.churn.resent_ids > 0, "{:?}", r.churn);
        assert!(v.duplicate_ops > 0, "applied twice: {v:?}");
        assert!(v.state_mismatches > 0, "answered as new: {v:?}");
    }

    #[test]
    fn failover_windows_are_summed_up_by_kind() {
        let f = |event: &str, affected: u64, p99: f64, max: f64| Failover {
            event: event.into(),
            at_s: 1.0,
            sessions_affected: affected,
            window_ms: Window { p50: 0.0, p99, max },
        };
        let all = [
            f("kill:2 (soak 1/3)", 10, 800.0, 900.0),
            f("restart:2 (soak 1/3)", 0, 0.0, 0.0),
            f("kill:1 (soak 2/3)", 30, 1000.0, 1200.0),
            f("kill:3 (soak 3/3)", 20, 900.0, 950.0),
            f("start@5s", 1, 5.0, 5.0),
        ];
        let kinds = failover_by_kind(&all);
        let names: Vec<_> = kinds.iter().map(|k| (k.kind.as_str(), k.events)).collect();
        assert_eq!(names, [("kill", 3), ("restart", 1), ("start", 1)]);
        let kill = &kinds[0];
        assert_eq!(kill.sessions_affected.p50, 20.0);
        assert_eq!(
            (
                kill.window_p99_ms.p50,
                kill.window_p99_ms.p99,
                kill.window_p99_ms.max
            ),
            (900.0, 1000.0, 1000.0)
        );
        assert_eq!(kill.window_max_ms.max, 1200.0);
    }

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
