//! `chat`: the scenario of berth's chat example (`examples/chat`): every
//! virtual client is a user with one device (session), signed in by a JWT
//! it signs itself; users are spread over rooms, join them, then say lines
//! and now and then send a direct message to another user. Every line and
//! direct message carries its sender and the sender's counter, so the
//! verifier can check, member by member, that each acknowledged message
//! arrived exactly once and in order per sender.
//!
//! A client's life: connect, `start`, `join` each of its rooms and wait for
//! their `joined` events; wait until every client of the run has done so
//! (or [`JOIN_WAIT`] passes), so every member is in its rooms before the
//! first line; say lines until the end of the load (reading events while it
//! waits for its next op); then keep reading events until every message
//! owed to it has arrived, or `--drain` ([`DRAIN`]) passes. Members never leave.
//!
//! What is pure (the plan, the text and token formats, [`verify`]) is
//! unit-tested here; the client loop ([`client`]) runs against real nodes
//! (tests/it/loadtest.rs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{json, Value};

use crate::client::{histogram, MobileClient};

/// The chat example's demo signing secret (`examples/chat/chat.toml`).
pub const DEMO_SECRET: &str = "berth-chat-demo-secret-do-not-use-in-production";

/// Most members of one room (`MAX_MEMBERS` in `examples/chat/room.rs`).
pub const MAX_ROOM_MEMBERS: usize = 1000;

/// Most rooms one user may be in (`MAX_ROOMS_PER_USER` in
/// `examples/chat/msg.rs`).
pub const MAX_ROOMS_PER_USER: usize = 50;

/// Longest a client waits, after the ramp, for its own `joined` events and
/// then for every other client's: past it, lines start anyway (a member
/// whose `joined` came later is only owed the lines numbered after it).
pub const JOIN_WAIT: Duration = Duration::from_secs(30);

/// Longest a client keeps reading events after the load, for messages owed
/// to it that have not arrived yet (the default of `--drain`).
pub const DRAIN: Duration = Duration::from_secs(30);

/// Notes the verifier keeps at most.
const NOTES: usize = 16;

/// The chat scenario's settings.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Rooms.
    pub rooms: usize,
    /// Members per room; `None`: sessions / rooms, rounded up (every user
    /// in one room).
    pub room_size: Option<usize>,
    /// Percent of a client's messages that are direct messages to a random
    /// other user (the rest are lines in one of its rooms).
    pub dm_percent: u32,
    /// The HS256 secret the clients sign their credentials with (the nodes'
    /// `auth.hs256_secret`).
    pub jwt_secret: String,
    /// Longest a client keeps reading events after the load for messages
    /// owed to it: one that has not arrived by then is lost.
    pub drain: Duration,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            rooms: 10,
            room_size: None,
            dm_percent: 10,
            jwt_secret: DEMO_SECRET.to_owned(),
            drain: DRAIN,
        }
    }
}

/// The environment of nodes running the chat example for `sessions`
/// clients with `cfg`: every hello signed in with `cfg.jwt_secret`
/// (`auth.required`), and an outgoing queue (`limits.max_outgoing`) that
/// holds a few lines to every member of a room (a line is one message per
/// member, queued in the room until delivered).
pub fn node_env(cfg: &ChatConfig, sessions: usize) -> Vec<(String, String)> {
    let size = cfg.room_size.unwrap_or(sessions.div_ceil(cfg.rooms.max(1)));
    let max_outgoing = (8 * size).max(5000);
    [
        ("BERTH__AUTH__REQUIRED", "true".to_owned()),
        ("BERTH__AUTH__HS256_SECRET", cfg.jwt_secret.clone()),
        ("BERTH__LIMITS__MAX_OUTGOING", max_outgoing.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A chat plan that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `--rooms 0`, or no sessions.
    #[error("the chat scenario needs at least one room and one session")]
    Empty,
    /// More members per room than the example takes, or than there are users.
    #[error("{size} members per room: at most {max} (the example's limit, and the sessions)")]
    RoomSize {
        /// Asked for.
        size: usize,
        /// The most possible.
        max: usize,
    },
    /// Users would be in more rooms than the example allows.
    #[error("{rooms} rooms of {size} over {sessions} users puts a user in {per_user} rooms: at most {MAX_ROOMS_PER_USER}")]
    RoomsPerUser {
        /// Rooms.
        rooms: usize,
        /// Members per room.
        size: usize,
        /// Users.
        sessions: usize,
        /// Rooms per user that makes.
        per_user: usize,
    },
}

/// Who is in which room, and the names of this run's users and rooms.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPlan {
    /// Added to every user and room name, so runs against the same nodes
    /// (`run --url`) do not meet each other's users and rooms.
    pub tag: String,
    /// Room `r`'s members, by client index: the `size` users from `r * size`
    /// on (modulo the users), so every user is in about the same number of
    /// rooms.
    pub members: Vec<Vec<u32>>,
    /// Each user's rooms.
    pub rooms_of: Vec<Vec<u32>>,
}

impl ChatPlan {
    /// The plan of `sessions` users in `cfg.rooms` rooms; `tag` goes into
    /// every name.
    pub fn new(sessions: usize, cfg: &ChatConfig, tag: &str) -> Result<ChatPlan, PlanError> {
        if cfg.rooms == 0 || sessions == 0 {
            return Err(PlanError::Empty);
        }
        let size = cfg.room_size.unwrap_or(sessions.div_ceil(cfg.rooms));
        let max = MAX_ROOM_MEMBERS.min(sessions);
        if size == 0 || size > max {
            return Err(PlanError::RoomSize { size, max });
        }
        let per_user = (cfg.rooms * size).div_ceil(sessions);
        if per_user > MAX_ROOMS_PER_USER {
            return Err(PlanError::RoomsPerUser {
                rooms: cfg.rooms,
                size,
                sessions,
                per_user,
            });
        }
        let mut members = vec![Vec::new(); cfg.rooms];
        let mut rooms_of = vec![Vec::new(); sessions];
        for (r, m) in members.iter_mut().enumerate() {
            for j in 0..size {
                let u = (r * size + j) % sessions;
                m.push(u as u32);
                rooms_of[u].push(r as u32);
            }
        }
        Ok(ChatPlan {
            tag: tag.to_owned(),
            members,
            rooms_of,
        })
    }

    /// A tag for a run: the time, in base 36 (distinct between runs).
    pub fn new_tag() -> String {
        let mut n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut s = Vec::new();
        while n > 0 {
            s.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
            n /= 36;
        }
        s.reverse();
        String::from_utf8(s).unwrap_or_default()
    }

    /// User `i`'s name (the subject of its credential).
    pub fn user(&self, i: u32) -> String {
        format!("u{i}-{}", self.tag)
    }

    /// Room `r`'s name.
    pub fn room(&self, r: u32) -> String {
        format!("r{r}-{}", self.tag)
    }

    /// The index of user `name`, if it is one of this run's.
    pub fn user_index(&self, name: &str) -> Option<u32> {
        self.index_of(name, 'u')
    }

    /// The index of room `name`, if it is one of this run's.
    pub fn room_index(&self, name: &str) -> Option<u32> {
        self.index_of(name, 'r')
    }

    fn index_of(&self, name: &str, prefix: char) -> Option<u32> {
        let (i, tag) = name.strip_prefix(prefix)?.split_once('-')?;
        (tag == self.tag).then(|| i.parse().ok()).flatten()
    }
}

/// A line's or direct message's text: `SENDER.COUNTER.SENT_US PAYLOAD`, its
/// sender's index, the sender's message counter, and when it was first
/// sent (µs from the run's base instant).
pub fn text(sender: u32, counter: u64, sent_us: u64, payload: &str) -> String {
    format!("{sender}.{counter}.{sent_us} {payload}")
}

/// What [`text`] put in a text: (sender, counter, sent µs).
pub fn parse_text(text: &str) -> Option<(u32, u64, u64)> {
    let head = text.split(' ').next()?;
    let mut it = head.split('.');
    let sender = it.next()?.parse().ok()?;
    let counter = it.next()?.parse().ok()?;
    let sent = it.next()?.parse().ok()?;
    it.next().is_none().then_some((sender, counter, sent))
}

/// An HS256 JWT for `user`, valid for a day, signed with `secret`.
pub fn credential(secret: &str, user: &str) -> Result<String, jsonwebtoken::errors::Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "iat": now, "exp": now + 24 * 3600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?,
    )
}

/// Where a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// A line in room N.
    Room(u32),
    /// A direct message to user N.
    User(u32),
}

/// What became of a message's op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered `ok`: it must arrive, exactly once, at everyone it is for.
    Acked,
    /// Never answered: it may arrive or not, but at most once.
    Unsure,
}

/// A message a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// The sender's counter (from 1, one per message, lines and direct
    /// messages alike).
    pub counter: u64,
    /// Where it went.
    pub dest: Dest,
    /// Answered or not.
    pub outcome: Outcome,
}

/// A line as a member received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GotLine {
    /// The room.
    pub room: u32,
    /// The room's number for it.
    pub seq: u64,
    /// Who said it (client index).
    pub sender: u32,
    /// The sender's counter.
    pub counter: u64,
}

/// A direct message as a device received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GotDm {
    /// The sender (client index).
    pub sender: u32,
    /// Its receiver (client index).
    pub to: u32,
    /// The sender's counter.
    pub counter: u64,
}

/// What one client did and saw: the verifier's input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatLog {
    /// The client's index (its user).
    pub client: u32,
    /// Rooms whose `join` op was acknowledged.
    pub joins_acked: Vec<u32>,
    /// Rooms whose `joined` event arrived, and the room's last `seq` then
    /// (the lines before it come as history, not as line events).
    pub join_seq: BTreeMap<u32, u64>,
    /// Messages sent, in order.
    pub sent: Vec<Sent>,
    /// Lines received, in order of arrival.
    pub lines: Vec<GotLine>,
    /// Direct messages received, in order of arrival.
    pub dms: Vec<GotDm>,
    /// Line and direct-message events of no client of this run (another
    /// run's, or a text not in [`text`]'s format).
    pub foreign: u64,
    /// `error` events (a room or user that refused a message).
    pub errors: u64,
}

/// What [`verify`] found over every client.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageCheck {
    /// Acknowledged lines.
    pub lines_acked: u64,
    /// Acknowledged direct messages.
    pub dms_acked: u64,
    /// Messages whose op was never answered.
    pub unacked: u64,
    /// Deliveries the acknowledged messages owe.
    pub deliveries_expected: u64,
    /// Of those, the ones that arrived.
    pub delivered: u64,
    /// Owed deliveries that did not arrive, plus lines skipped in a
    /// member's `seq`s.
    pub lost: u64,
    /// Deliveries that arrived again.
    pub duplicated: u64,
    /// Deliveries out of order (per sender, or by room `seq`).
    pub out_of_order: u64,
    /// Deliveries of messages nobody sent there.
    pub unexpected: u64,
    /// In words, the first 16 problems.
    pub notes: Vec<String>,
}

impl MessageCheck {
    fn note(&mut self, what: impl FnOnce() -> String) {
        if self.notes.len() < NOTES {
            self.notes.push(what());
        }
    }
}

/// Checks every client's messages against every other's: each
/// acknowledged line arrived exactly once at every member of its room (a
/// member whose `joined` showed a room `seq` at or past the line's is owed
/// nothing: the line was in its history) and each acknowledged direct
/// message at its receiver and its sender's device; nothing arrived twice;
/// per receiver, each sender's messages arrived in the order sent (and a
/// room's lines in `seq` order, without a gap from the member's join to the
/// last line it saw); and nothing arrived that was not sent. A message
/// whose op was never answered may be missing everywhere, but if it
/// arrived it counts like the others (at most once, in order, and a line
/// at every member or none: a gap in `seq` counts as lost).
///
/// `members`: each room's planned members; a member is owed lines once its
/// `join` was acknowledged.
pub fn verify(members: &[Vec<u32>], logs: &[ChatLog]) -> MessageCheck {
    let mut k = MessageCheck::default();
    let sent: HashMap<(u32, u64), Sent> = logs
        .iter()
        .flat_map(|l| l.sent.iter().map(move |s| ((l.client, s.counter), *s)))
        .collect();
    for s in sent.values() {
        match (s.outcome, s.dest) {
            (Outcome::Acked, Dest::Room(_)) => k.lines_acked += 1,
            (Outcome::Acked, Dest::User(_)) => k.dms_acked += 1,
            (Outcome::Unsure, _) => k.unacked += 1,
        }
    }
    let by_client: HashMap<u32, &ChatLog> = logs.iter().map(|l| (l.client, l)).collect();
    let joined = |client: u32, room: u32| {
        by_client
            .get(&client)
            .is_some_and(|l| l.joins_acked.contains(&room))
    };
    // The seq every member should have seen for a line, and the line of
    // every (room, seq): the first one seen; another is out of order.
    let mut line_seq: HashMap<(u32, u64), u64> = HashMap::new();
    let mut seq_line: HashMap<(u32, u64), (u32, u64)> = HashMap::new();
    for log in logs {
        for l in &log.lines {
            let first = *line_seq.entry((l.sender, l.counter)).or_insert(l.seq);
            let owner = *seq_line
                .entry((l.room, l.seq))
                .or_insert((l.sender, l.counter));
            if first != l.seq || owner != (l.sender, l.counter) {
                k.out_of_order += 1;
                k.note(|| {
                    format!(
                        "u{}: line {}.{} numbered {} in room {}, elsewhere {first} \
                         (seq {} is {}.{} elsewhere)",
                        log.client, l.sender, l.counter, l.seq, l.room, l.seq, owner.0, owner.1
                    )
                });
            }
        }
    }
    let mut seen: HashMap<u32, HashSet<(u32, u64)>> = HashMap::new();
    for log in logs {
        let me = log.client;
        let mine = seen.entry(me).or_default();
        let mut last: HashMap<(Dest, u32), u64> = HashMap::new();
        let mut last_seq: HashMap<u32, u64> = HashMap::new();
        let mut seqs: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
        let arrivals = log
            .lines
            .iter()
            .map(|l| (l.sender, l.counter, Dest::Room(l.room), Some(l.seq)))
            .chain(
                log.dms
                    .iter()
                    .map(|d| (d.sender, d.counter, Dest::User(d.to), None)),
            );
        for (sender, counter, dest, seq) in arrivals {
            if !mine.insert((sender, counter)) {
                k.duplicated += 1;
                k.note(|| format!("u{me}: {sender}.{counter} arrived again"));
                continue;
            }
            let for_me = match dest {
                Dest::Room(_) => true,
                Dest::User(to) => to == me || sender == me,
            };
            if sent.get(&(sender, counter)).map(|s| s.dest) != Some(dest) || !for_me {
                k.unexpected += 1;
                k.note(|| format!("u{me}: {sender}.{counter} to {dest:?} was not sent there"));
                continue;
            }
            // One channel per sender and destination: the room, or the
            // direct messages (whoever they are to).
            let channel = match dest {
                Dest::Room(r) => (Dest::Room(r), sender),
                Dest::User(_) => (Dest::User(0), sender),
            };
            let prev = last.entry(channel).or_default();
            let mut disorder = counter <= *prev;
            *prev = (*prev).max(counter);
            if let (Dest::Room(r), Some(seq)) = (dest, seq) {
                let p = last_seq.entry(r).or_default();
                disorder |= seq <= *p;
                *p = (*p).max(seq);
                seqs.entry(r).or_default().insert(seq);
            }
            if disorder {
                k.out_of_order += 1;
                k.note(|| format!("u{me}: {sender}.{counter} ({dest:?}) arrived out of order"));
            }
        }
        // Gaps in a room's seqs: a line the room numbered (and told every
        // member) that this member skipped. An acknowledged line is
        // counted below, with the deliveries it owes.
        for (r, got) in &seqs {
            let from = log
                .join_seq
                .get(r)
                .copied()
                .unwrap_or_else(|| got.iter().min().copied().unwrap_or(1) - 1);
            let to = got.iter().max().copied().unwrap_or(0);
            for q in from + 1..=to {
                if got.contains(&q) {
                    continue;
                }
                let acked = seq_line
                    .get(&(*r, q))
                    .is_some_and(|id| sent.get(id).is_some_and(|s| s.outcome == Outcome::Acked));
                if !(acked && joined(me, *r)) {
                    k.lost += 1;
                    k.note(|| format!("u{me}: room {r}'s line {q} was skipped"));
                }
            }
        }
    }
    let mut ids: Vec<(&(u32, u64), &Sent)> = sent.iter().collect();
    ids.sort_by_key(|(id, _)| **id);
    for (&(sender, counter), s) in ids {
        if s.outcome != Outcome::Acked {
            continue;
        }
        let owed: Vec<u32> = match s.dest {
            Dest::Room(r) => members
                .get(r as usize)
                .map(|m| {
                    m.iter()
                        .copied()
                        .filter(|m| joined(*m, r))
                        .filter(|m| {
                            let js = by_client.get(m).and_then(|l| l.join_seq.get(&r));
                            match (line_seq.get(&(sender, counter)), js) {
                                (Some(q), Some(js)) => q > js,
                                _ => true,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Dest::User(t) if t == sender => vec![t],
            Dest::User(t) => vec![t, sender],
        };
        for m in owed {
            k.deliveries_expected += 1;
            if seen.get(&m).is_some_and(|s| s.contains(&(sender, counter))) {
                k.delivered += 1;
            } else {
                k.lost += 1;
                k.note(|| format!("u{m}: {sender}.{counter} ({:?}) never arrived", s.dest));
            }
        }
    }
    k
}

/// What the clients of a chat run share.
pub struct ChatRun {
    /// The plan.
    pub plan: ChatPlan,
    /// The settings.
    pub cfg: ChatConfig,
    /// Clients in all.
    sessions: usize,
    /// Clients done joining (or given up on it).
    ready: AtomicUsize,
    /// When lines started: set by the first client that saw every client
    /// ready (or [`JOIN_WAIT`] pass).
    say_start: OnceLock<Instant>,
    /// Acknowledged messages, in order of their acknowledgement: what the
    /// draining clients wait for.
    acked: Mutex<Vec<(u32, u64, Dest)>>,
    /// Clients done sending.
    done: AtomicUsize,
}

impl ChatRun {
    /// The shared state of `sessions` clients following `plan`.
    pub fn new(plan: ChatPlan, cfg: ChatConfig, sessions: usize) -> ChatRun {
        ChatRun {
            plan,
            cfg,
            sessions,
            ready: AtomicUsize::new(0),
            say_start: OnceLock::new(),
            acked: Mutex::new(Vec::new()),
            done: AtomicUsize::new(0),
        }
    }

    /// When lines started (`None`: not yet).
    pub fn say_start(&self) -> Option<Instant> {
        self.say_start.get().copied()
    }
}

/// What one client brings back besides its [`MobileClient`].
pub struct ChatPart {
    /// What it did and saw.
    pub log: ChatLog,
    /// Delivery latencies of the lines of others it received, µs.
    pub latency: Histogram<u64>,
    /// When its last line or direct message arrived.
    pub last_delivery: Option<Instant>,
}

/// A client's receiving side: it files the events as they are taken from
/// the [`MobileClient`].
struct Inbox {
    me: u32,
    base: Instant,
    part: ChatPart,
    seen: HashSet<(u32, u64)>,
}

impl Inbox {
    /// Takes the events the client has received and files them.
    fn take(&mut self, c: &mut MobileClient, plan: &ChatPlan) {
        for ev in c.received.drain(..) {
            let b = &ev.body;
            let log = &mut self.part.log;
            match b["kind"].as_str() {
                Some("joined") => {
                    let Some(r) = b["room"].as_str().and_then(|r| plan.room_index(r)) else {
                        continue;
                    };
                    let seq = b["history"]
                        .as_array()
                        .and_then(|h| h.last())
                        .and_then(|l| l["seq"].as_u64())
                        .unwrap_or(0);
                    log.join_seq.entry(r).or_insert(seq);
                }
                Some("line") => {
                    let room = b["room"].as_str().and_then(|r| plan.room_index(r));
                    let parsed = b["text"].as_str().and_then(parse_text);
                    let (Some(room), Some((sender, counter, sent_us)), Some(seq)) =
                        (room, parsed, b["seq"].as_u64())
                    else {
                        log.foreign += 1;
                        continue;
                    };
                    log.lines.push(GotLine {
                        room,
                        seq,
                        sender,
                        counter,
                    });
                    self.seen.insert((sender, counter));
                    self.part.last_delivery = Some(ev.at);
                    if sender != self.me {
                        let sent = self.base + Duration::from_micros(sent_us);
                        let us = ev.at.saturating_duration_since(sent).as_micros().max(1);
                        let _ = self.part.latency.record(us as u64);
                    }
                }
                Some("dm") => {
                    let to = b["to"].as_str().and_then(|u| plan.user_index(u));
                    let parsed = b["text"].as_str().and_then(parse_text);
                    let (Some(to), Some((sender, counter, _))) = (to, parsed) else {
                        log.foreign += 1;
                        continue;
                    };
                    log.dms.push(GotDm {
                        sender,
                        to,
                        counter,
                    });
                    self.seen.insert((sender, counter));
                    self.part.last_delivery = Some(ev.at);
                }
                Some("error") => log.errors += 1,
                _ => {}
            }
        }
    }

    /// Whether message `dest` of `sender` is owed to this client.
    fn owed(&self, sender: u32, dest: Dest) -> bool {
        match dest {
            Dest::Room(r) => self.part.log.joins_acked.contains(&r),
            Dest::User(t) => t == self.me || sender == self.me,
        }
    }
}

/// Reads events for `for_` (connecting first if the connection is down,
/// until `deadline`), then files them.
async fn pump(
    c: &mut MobileClient,
    inbox: &mut Inbox,
    plan: &ChatPlan,
    for_: Duration,
    deadline: Instant,
) {
    if !c.connected() && c.stopped.is_none() {
        let _ = c.ensure_connected(deadline).await;
    }
    if c.connected() {
        c.drain_events(for_).await;
    } else {
        tokio::time::sleep(for_.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
    inbox.take(c, plan);
}

/// Reads events until `t`.
async fn pump_until(
    c: &mut MobileClient,
    inbox: &mut Inbox,
    plan: &ChatPlan,
    t: Instant,
    deadline: Instant,
) {
    while Instant::now() < t && c.stopped.is_none() {
        let left = t.saturating_duration_since(Instant::now());
        pump(
            c,
            inbox,
            plan,
            left.min(Duration::from_millis(100)),
            deadline,
        )
        .await;
    }
}

/// Connects, `start`s, joins the client's rooms and waits for their
/// `joined` events, until `deadline`. Answers whether all went well.
async fn join_rooms(
    c: &mut MobileClient,
    run: &ChatRun,
    inbox: &mut Inbox,
    grace: Instant,
    deadline: Instant,
) -> bool {
    if c.ensure_connected(deadline).await.is_err() {
        return false;
    }
    let plan = &run.plan;
    let ok = |r: &Result<Value, _>| matches!(r, Ok(v) if v["ok"] == true);
    let start = c.call("start", Value::Null, grace).await;
    inbox.take(c, plan);
    if !ok(&start) {
        return false;
    }
    for &r in &plan.rooms_of[inbox.me as usize] {
        let joined = c.call("join", json!({"room": plan.room(r)}), grace).await;
        inbox.take(c, plan);
        if !ok(&joined) {
            return false;
        }
        inbox.part.log.joins_acked.push(r);
    }
    while Instant::now() < deadline && c.stopped.is_none() {
        let log = &inbox.part.log;
        if log.joins_acked.iter().all(|r| log.join_seq.contains_key(r)) {
            return true;
        }
        pump(c, inbox, plan, Duration::from_millis(100), deadline).await;
    }
    false
}

/// One chat client (index `i`): joins, says lines and direct messages from
/// when every client has joined until `end` (at `rate`, the run's total
/// ops/s, or as fast as answers come), then drains. `base`: the instant
/// that line texts' send times count from. `record`: called for each
/// `say`/`dm` answer with its latency and whether it was an error.
#[allow(clippy::too_many_arguments)]
pub async fn client(
    i: usize,
    run: Arc<ChatRun>,
    mut c: MobileClient,
    rate: Option<f64>,
    payload: &str,
    base: Instant,
    ramp_end: Instant,
    end: Instant,
    record: impl Fn(Duration, bool),
) -> (MobileClient, ChatPart) {
    let me = i as u32;
    let plan = &run.plan;
    let grace = end + Duration::from_secs(20);
    let mut inbox = Inbox {
        me,
        base,
        part: ChatPart {
            log: ChatLog {
                client: me,
                ..ChatLog::default()
            },
            latency: histogram(),
            last_delivery: None,
        },
        seen: HashSet::new(),
    };
    let join_by = (ramp_end + JOIN_WAIT).min(end);
    let joined = join_rooms(&mut c, &run, &mut inbox, grace, join_by).await;
    run.ready.fetch_add(1, Ordering::SeqCst);
    // Every member in its rooms before the first line.
    while run.ready.load(Ordering::SeqCst) < run.sessions
        && Instant::now() < join_by
        && run.say_start.get().is_none()
    {
        pump(&mut c, &mut inbox, plan, Duration::from_millis(50), grace).await;
    }
    let say_start = *run.say_start.get_or_init(Instant::now);
    let mut k = 0u64;
    let mut counter = 0u64;
    let users = run.sessions as u32;
    while joined && Instant::now() < end && c.stopped.is_none() {
        let planned = match rate {
            Some(rate) => {
                let t = crate::run::intended(say_start, i, run.sessions, rate, k);
                if t >= end {
                    break;
                }
                pump_until(&mut c, &mut inbox, plan, t, grace).await;
                t
            }
            None => Instant::now(),
        };
        k += 1;
        let rooms = &plan.rooms_of[i];
        let dm = users > 1
            && (rooms.is_empty() || rand::rng().random_range(0..100) < run.cfg.dm_percent);
        if rooms.is_empty() && !dm {
            break; // alone, in no room: nothing to say
        }
        counter += 1;
        let sent_us = base.elapsed().as_micros() as u64;
        let body = text(me, counter, sent_us, payload);
        let (op, args, dest) = if dm {
            let mut to = rand::rng().random_range(0..users - 1);
            if to >= me {
                to += 1;
            }
            let args = json!({"to": plan.user(to), "text": body});
            ("dm", args, Dest::User(to))
        } else {
            let r = rooms[rand::rng().random_range(0..rooms.len())];
            (
                "say",
                json!({"room": plan.room(r), "text": body}),
                Dest::Room(r),
            )
        };
        inbox.part.log.sent.push(Sent {
            counter,
            dest,
            outcome: Outcome::Unsure,
        });
        let answer = c.call(op, args, grace).await;
        inbox.take(&mut c, plan);
        match answer {
            Ok(v) => {
                let error = v["ok"] != true;
                let took = planned.elapsed();
                record(took, error);
                if error {
                    // Refused: not applied, so it must never arrive.
                    inbox.part.log.sent.pop();
                } else {
                    if let Some(s) = inbox.part.log.sent.last_mut() {
                        s.outcome = Outcome::Acked;
                    }
                    c.last_acked_write = c.next_id - 1;
                    run.acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((me, counter, dest));
                }
            }
            // No answer before the deadline, or stopped: applied or not.
            Err(_) => break,
        }
    }
    run.done.fetch_add(1, Ordering::SeqCst);
    // Drain: until every message owed to this client has arrived (once
    // every client is done sending), or `drain` after the end.
    let drain_by = end.max(Instant::now()) + run.cfg.drain;
    let mut cursor = 0;
    let mut pending: HashSet<(u32, u64)> = HashSet::new();
    while c.stopped.is_none() {
        {
            let acked = run.acked.lock().unwrap_or_else(|p| p.into_inner());
            for &(s, n, dest) in &acked[cursor..] {
                if inbox.owed(s, dest) {
                    pending.insert((s, n));
                }
            }
            cursor = acked.len();
        }
        pending.retain(|id| !inbox.seen.contains(id));
        let all_done = run.done.load(Ordering::SeqCst) >= run.sessions;
        if (all_done && pending.is_empty()) || Instant::now() >= drain_by {
            break;
        }
        pump(
            &mut c,
            &mut inbox,
            plan,
            Duration::from_millis(100),
            drain_by,
        )
        .await;
    }
    c.ack().await;
    (c, inbox.part)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(sessions: usize, rooms: usize, size: Option<usize>) -> ChatPlan {
        let cfg = ChatConfig {
            rooms,
            room_size: size,
            ..ChatConfig::default()
        };
        ChatPlan::new(sessions, &cfg, "t").unwrap()
    }

    #[test]
    fn users_are_spread_over_rooms() {
        let p = plan(30, 3, None);
        assert_eq!(p.members[0], (0..10).collect::<Vec<_>>());
        assert_eq!(p.members[2], (20..30).collect::<Vec<_>>());
        assert!(p.rooms_of.iter().all(|r| r.len() == 1));
        // Rooms of 20 over 30 users: some users in two rooms.
        let p = plan(30, 3, Some(20));
        assert_eq!(p.members[1][0], 20);
        assert_eq!(p.members[1][10], 0, "wraps around");
        assert_eq!(p.rooms_of[0], [0, 1]);
        assert_eq!(p.rooms_of.iter().map(Vec::len).sum::<usize>(), 60);
        let cfg = |rooms, room_size| ChatConfig {
            rooms,
            room_size,
            ..ChatConfig::default()
        };
        assert!(matches!(
            ChatPlan::new(2000, &cfg(1, None), "t"),
            Err(PlanError::RoomSize { size: 2000, .. })
        ));
        assert!(matches!(
            ChatPlan::new(10, &cfg(60, Some(10)), "t"),
            Err(PlanError::RoomsPerUser { per_user: 60, .. })
        ));
        assert_eq!(ChatPlan::new(10, &cfg(0, None), "t"), Err(PlanError::Empty));
    }

    #[test]
    fn names_and_texts_round_trip() {
        let p = plan(4, 2, None);
        assert_eq!(p.user(3), "u3-t");
        assert_eq!(p.user_index("u3-t"), Some(3));
        assert_eq!(p.user_index("u3-other"), None, "another run's user");
        assert_eq!(p.room_index(&p.room(1)), Some(1));
        assert_eq!(p.room_index("u1-t"), None);
        let t = text(7, 42, 123_456, "xxxx");
        assert_eq!(t, "7.42.123456 xxxx");
        assert_eq!(parse_text(&t), Some((7, 42, 123_456)));
        assert_eq!(parse_text("7.42 hello"), None);
        assert_eq!(parse_text("hello there"), None);
    }

    #[test]
    fn a_credential_is_an_hs256_jwt_for_the_user() {
        let token = credential(DEMO_SECRET, "u1-t").unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(DEMO_SECRET.as_bytes()).unwrap(),
            &v,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "u1-t");
    }

    /// Two members (0 and 1) of room 0; member 0 said lines 1 and 2 (seq 1
    /// and 2) and sent DM 3 to user 1, all acknowledged, and line 4 was
    /// never answered.
    fn clean() -> (Vec<Vec<u32>>, Vec<ChatLog>) {
        let line = |seq, counter| GotLine {
            room: 0,
            seq,
            sender: 0,
            counter,
        };
        let sent = |counter, dest, outcome| Sent {
            counter,
            dest,
            outcome,
        };
        let dm = GotDm {
            sender: 0,
            to: 1,
            counter: 3,
        };
        let zero = ChatLog {
            client: 0,
            joins_acked: vec![0],
            join_seq: [(0, 0)].into(),
            sent: vec![
                sent(1, Dest::Room(0), Outcome::Acked),
                sent(2, Dest::Room(0), Outcome::Acked),
                sent(3, Dest::User(1), Outcome::Acked),
                sent(4, Dest::Room(0), Outcome::Unsure),
            ],
            lines: vec![line(1, 1), line(2, 2)],
            dms: vec![dm],
            ..ChatLog::default()
        };
        let one = ChatLog {
            client: 1,
            joins_acked: vec![0],
            join_seq: [(0, 0)].into(),
            lines: vec![line(1, 1), line(2, 2)],
            dms: vec![dm],
            ..ChatLog::default()
        };
        (vec![vec![0, 1]], vec![zero, one])
    }

    fn counts(k: &MessageCheck) -> [u64; 4] {
        [k.lost, k.duplicated, k.out_of_order, k.unexpected]
    }

    #[test]
    fn a_clean_run_verifies_clean() {
        let (members, logs) = clean();
        let k = verify(&members, &logs);
        assert_eq!(counts(&k), [0; 4], "{:?}", k.notes);
        assert_eq!((k.lines_acked, k.dms_acked, k.unacked), (2, 1, 1));
        // 2 lines x 2 members + the DM at its receiver and its sender.
        assert_eq!((k.deliveries_expected, k.delivered), (6, 6));
    }

    #[test]
    fn a_missing_delivery_is_lost() {
        let (members, mut logs) = clean();
        logs[1].lines.remove(0);
        logs[1].dms.clear();
        let k = verify(&members, &logs);
        assert_eq!(counts(&k), [2, 0, 0, 0], "{:?}", k.notes);
        assert_eq!((k.deliveries_expected, k.delivered), (6, 4));
        assert!(k
            .notes
            .iter()
            .any(|n| n == "u1: 0.1 (Room(0)) never arrived"));
    }

    #[test]
    fn a_delivery_seen_twice_is_a_duplicate() {
        let (members, mut logs) = clean();
        let again = logs[1].lines[1];
        logs[1].lines.push(again);
        let k = verify(&members, &logs);
        assert_eq!(counts(&k), [0, 1, 0, 0], "{:?}", k.notes);
    }

    #[test]
    fn deliveries_out_of_order_are_caught() {
        let (members, mut logs) = clean();
        logs[1].lines.swap(0, 1);
        let k = verify(&members, &logs);
        assert_eq!(counts(&k), [0, 0, 1, 0], "{:?}", k.notes);
        // The same line numbered differently at two members.
        let (members, mut logs) = clean();
        logs[1].lines[1].seq = 3;
        let k = verify(&members, &logs);
        assert!(k.out_of_order >= 1, "{:?}", k.notes);
    }

    #[test]
    fn an_unacked_line_may_arrive_once_but_not_twice() {
        let (members, mut logs) = clean();
        let unsure = GotLine {
            room: 0,
            seq: 3,
            sender: 0,
            counter: 4,
        };
        for l in &mut logs {
            l.lines.push(unsure);
        }
        let k = verify(&members, &logs);
        assert_eq!(counts(&k), [0; 4], "once is fine: {:?}", k.notes);
        assert_eq!(k.deliveries_expected, 6, "an unacked line is owed nothing");
        logs[1].lines.push(unsure);
        let k = verify(&members, &logs);
        assert_eq!(
            counts(&k),
            [0, 1, 0, 0],
            "twice is a duplicate: {:?}",
            k.notes
        );
    }

    #[test]
    fn an_unacked_line_one_member_skipped_is_lost() {
        // Member 0 saw line 4 (seq 3) and a later acked line 5 (seq 4);
        // member 1 saw line 5 only: the room numbered 3, so it was told.
        let (members, mut logs) = clean();
        logs[0].sent.push(Sent {
            counter: 5,
            dest: Dest::Room(0),
            outcome: Outcome::Acked,
        });
        let line = |seq, counter| GotLine {
            room: 0,
            seq,
            sender: 0,
            counter,
        };
        logs[0].lines.extend([line(3, 4), line(4, 5)]);
        logs[1].lines.push(line(4, 5));
        let k = verify(&members, &logs);
        assert_eq!(counts(&k), [1, 0, 0, 0], "{:?}", k.notes);
        assert!(k.notes[0].contains("line 3 was skipped"), "{:?}", k.notes);
    }

    #[test]
    fn a_message_nobody_sent_is_unexpected() {
        let (members, mut logs) = clean();
        logs[1].lines.push(GotLine {
            room: 0,
            seq: 3,
            sender: 1,
            counter: 9,
        });
        // And a DM never sent.
        logs[1].dms.push(GotDm {
            sender: 0,
            to: 1,
            counter: 7,
        });
        let k = verify(&members, &logs);
        assert_eq!(counts(&k), [0, 0, 0, 2], "{:?}", k.notes);
    }

    #[test]
    fn a_member_that_joined_late_is_owed_only_later_lines() {
        let (members, mut logs) = clean();
        // Member 1 joined when the room was at seq 1: line 1 was history.
        logs[1].join_seq.insert(0, 1);
        logs[1].lines.remove(0);
        let k = verify(&members, &logs);
        assert_eq!(counts(&k), [0; 4], "{:?}", k.notes);
        assert_eq!(k.deliveries_expected, 5);
        // A member whose join was never acknowledged is owed nothing.
        let (members, mut logs) = clean();
        logs[1].joins_acked.clear();
        logs[1].lines.clear();
        logs[1].join_seq.clear();
        let k = verify(&members, &logs);
        assert_eq!(counts(&k), [0; 4], "{:?}", k.notes);
        assert_eq!(k.deliveries_expected, 4);
    }
}
