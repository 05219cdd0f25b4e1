//! `SessionState`: one session's state and the rules for committing what its
//! handlers did, with no actix, no clock and no I/O (the actor in
//! [`crate::session`] is a thin shell around it; the handlers themselves run
//! through [`crate::runtime`]).
//!
//! Rules kept here:
//! - op ids: an id at or below the watermark `last_op` is never applied again;
//!   the latest op's stored result is returned for it, older ids get
//!   `{ok: true, duplicate: true}`; the latest id after a handler that wrote
//!   nothing (a read) is run again as a read;
//! - failures that mean "not applied" (`unavailable`, `rate_limited`,
//!   `internal`) leave the watermark alone so the client can retry with the
//!   same id; deterministic failures (`bad_args`, `type_mismatch`, ...) consume
//!   the id like a success;
//! - a handler that wrote nothing (no state change, event or timer) changes
//!   nothing and needs no checkpoint;
//! - a write that would grow the encoded state past the limit is undone and
//!   answered `too_large`, and so is one that would grow the whole checkpoint
//!   (state, unacknowledged events, the stored reply) past its own limit;
//! - a commit can be taken back ([`Undo`]) when its checkpoint fails.

use std::sync::Arc;

use crate::address::Sender;
use crate::app::{AppError, Env, Invocation, Timers};
use crate::codec::Checkpoint;
use crate::ids::TokenHash;
use crate::mail::{Post, PostUndo, Seen};
use crate::outbox::Outbox;
use crate::protocol::{ErrorCode, OpReply};
use crate::runtime::{AnyState, Effects, Runtime};

/// Per-session limits; reloadable at run time (SIGHUP).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest encoded application state, in bytes (`too_large` above it).
    pub max_state_bytes: usize,
    /// Most unacknowledged events a session holds (`emit` is refused above it).
    pub outbox_max: usize,
    /// Longest `emit` delay, in milliseconds.
    pub max_emit_delay_ms: u64,
    /// Largest checkpoint, in bytes: the state, every unacknowledged event and
    /// the stored reply together (`too_large` above it). Without it, 1000
    /// unacknowledged 64 KiB events would make a 62 MiB checkpoint that every
    /// later write ships.
    pub max_checkpoint_bytes: usize,
    /// Most timers one session may hold at once.
    pub max_timers: usize,
    /// Most unacknowledged outgoing messages one actor holds (a handler's
    /// `send` beyond it fails).
    pub max_outgoing: usize,
    /// Largest message body, in bytes of JSON.
    pub max_message_bytes: usize,
    /// Most senders' watermarks one actor keeps (the oldest are forgotten
    /// first beyond it).
    pub max_watermarks: usize,
    /// Watermarks unused this long are forgotten (the store's time to live).
    pub watermark_ttl_ms: u64,
    /// Most live sessions on one node: above it new sessions are refused
    /// (`unavailable`, close 1013); resumes of existing ones are not.
    pub max_live_sessions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_state_bytes: 64 * 1024,
            outbox_max: 1000,
            max_emit_delay_ms: 24 * 3600 * 1000,
            max_checkpoint_bytes: 1024 * 1024,
            max_timers: 64,
            max_outgoing: 1000,
            max_message_bytes: 64 * 1024,
            max_watermarks: 10_000,
            watermark_ttl_ms: 24 * 3600 * 1000,
            max_live_sessions: 100_000,
        }
    }
}

/// Bytes a checkpoint spends besides the state, the events and the reply.
const CHECKPOINT_OVERHEAD: usize = 96;

fn reply_len(reply: &OpReply) -> usize {
    serde_json::to_vec(reply).map_or(0, |b| b.len())
}

/// What to do with an op id, before running anything.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// Answer this at once: the id was applied before.
    Answer(OpReply),
    /// Run the handler. `retry`: the id is the latest one and its handler
    /// wrote nothing, so it runs again as a read (a write is not applied twice).
    Run {
        /// Whether this is a retry of the latest id.
        retry: bool,
    },
}

/// What a commit changed, to take it back if its checkpoint fails.
#[derive(Debug)]
pub struct Undo {
    app: AnyState,
    version: u64,
    last_op: u64,
    last_reply: Option<OpReply>,
    seq_from: u64,
    timers: Option<Timers>,
    post: PostUndo,
}

/// The result of [`SessionState::commit_op`].
#[derive(Debug)]
pub struct Outcome {
    /// The answer to send once the change (if any) is durable.
    pub reply: OpReply,
    /// `Some` when the op changed the session: how to take it back if the
    /// checkpoint fails. Such a reply may only be sent after the checkpoint.
    pub undo: Option<Undo>,
    /// The encoded application state after a change (measured for the size
    /// limit; handed on so the checkpoint does not encode it again).
    pub app_bytes: Option<Vec<u8>>,
}

/// Which message: its sender, the sender's incarnation and sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgId {
    /// Who sent it.
    pub from: Sender,
    /// The sender's incarnation.
    pub inc: u64,
    /// The sender's sequence number.
    pub seq: u64,
}

/// A committed message: how to take it back, the encoded state, and the
/// final error the handler answered (committed as applied, with no effects).
#[derive(Debug)]
pub struct Delivered {
    /// How to take the commit back if its checkpoint fails.
    pub undo: Undo,
    /// The encoded application state, for the checkpoint.
    pub app_bytes: Vec<u8>,
    /// The handler's final error, told to the sender.
    pub refused: Option<AppError>,
}

/// One session: application state, version, op-id watermark, outbox, timers,
/// token hash.
#[derive(Clone)]
pub struct SessionState {
    /// Application state (owned by the application's runtime).
    pub(crate) app: AnyState,
    /// Bumped by every op (or timer firing) that changes the session.
    pub version: u64,
    /// Highest op id applied.
    pub last_op: u64,
    /// The answer to `last_op`, kept for a retry of that id. `None` after a read
    /// (a retried read is simply read again).
    pub last_reply: Option<OpReply>,
    /// Unacknowledged events.
    pub outbox: Outbox,
    /// Durable timers: name -> due time (ms since the Unix epoch).
    pub timers: Timers,
    /// Hash of the resume token.
    pub token_hash: TokenHash,
    /// The subject of the credential the session was created with.
    pub user: Option<Arc<str>>,
    /// Outgoing messages and senders' watermarks.
    pub post: Post,
}

impl std::fmt::Debug for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionState")
            .field("version", &self.version)
            .field("last_op", &self.last_op)
            .field("outbox", &self.outbox.len())
            .field("timers", &self.timers)
            .field("outgoing", &self.post.queued())
            .finish_non_exhaustive()
    }
}

impl SessionState {
    /// A new, empty session.
    pub fn new(rt: &dyn Runtime, token_hash: TokenHash) -> Self {
        SessionState {
            app: rt.new_state(),
            version: 0,
            last_op: 0,
            last_reply: None,
            outbox: Outbox::default(),
            timers: Timers::new(),
            token_hash,
            user: None,
            post: Post::default(),
        }
    }

    /// The application state, for a handler.
    pub fn app_state(&self) -> AnyState {
        self.app.clone()
    }

    /// Decides what op `id` needs (see the module docs).
    pub fn begin(&self, id: u64) -> Begin {
        if id > self.last_op {
            return Begin::Run { retry: false };
        }
        match (&self.last_reply, id == self.last_op) {
            (Some(stored), true) => Begin::Answer(OpReply {
                duplicate: true,
                ..stored.clone()
            }),
            (None, true) => Begin::Run { retry: true },
            _ => Begin::Answer(OpReply::duplicate(id, self.version)),
        }
    }

    /// What a handler running now gets besides the state.
    pub fn env(&self, session: Arc<str>, run: Invocation, now_ms: u64, limits: &Limits) -> Env {
        Env {
            session,
            user: self.user.clone(),
            run,
            out_room: limits.max_outgoing.saturating_sub(self.post.queued()),
            max_message_bytes: limits.max_message_bytes,
            now_ms,
            next_seq: self.outbox.next_seq(),
            outbox_len: self.outbox.len(),
            outbox_room: limits.outbox_max.saturating_sub(self.outbox.len()),
            max_delay_ms: limits.max_emit_delay_ms,
            max_timers: limits.max_timers,
        }
    }

    /// Commits what op `id`'s handler did (or its failure); see the module docs.
    pub fn commit_op(
        &mut self,
        rt: &dyn Runtime,
        id: u64,
        retry: bool,
        result: Result<Effects, AppError>,
        limits: &Limits,
    ) -> Outcome {
        let answer = |reply| Outcome {
            reply,
            undo: None,
            app_bytes: None,
        };
        if retry {
            let mut reply = match result {
                Ok(eff) if eff.writes() => OpReply::duplicate(id, self.version),
                Ok(eff) => OpReply::ok(id, eff.reply, self.version),
                Err(e) => OpReply::err(id, e.code, e.message, self.version),
            };
            reply.duplicate = true;
            return answer(reply);
        }
        let result = result.and_then(|eff| {
            if !eff.writes() {
                return Ok((eff.reply, None));
            }
            let reply = eff.reply.clone();
            self.apply_effects(rt, eff, limits)
                .map(|(undo, bytes)| (reply, Some((undo, bytes))))
        });
        match result {
            Ok((value, None)) => {
                self.last_op = id;
                self.last_reply = None;
                answer(OpReply::ok(id, value, self.version))
            }
            Ok((value, Some((undo, bytes)))) => {
                let reply = OpReply::ok(id, value, self.version);
                self.last_op = id;
                self.last_reply = Some(reply.clone());
                Outcome {
                    reply,
                    undo: Some(undo),
                    app_bytes: Some(bytes),
                }
            }
            Err(e) => {
                let reply = OpReply::err(id, e.code, e.message, self.version);
                if e.code.consumes_op_id() {
                    self.last_op = id;
                    self.last_reply = Some(reply.clone());
                }
                answer(reply)
            }
        }
    }

    /// Commits a firing of timer `name` due at `due_ms`: the timer is gone
    /// (unless the handler set it again) and the handler's effects apply.
    /// Answers how to take it back and the encoded state for the checkpoint;
    /// an error changes nothing.
    pub fn commit_timer(
        &mut self,
        rt: &dyn Runtime,
        name: &str,
        due_ms: u64,
        mut eff: Effects,
        limits: &Limits,
    ) -> Result<(Undo, Vec<u8>), AppError> {
        if eff.timers.is_none() {
            let mut left = self.timers.clone();
            if left.get(name) == Some(&due_ms) {
                left.remove(name);
            }
            eff.timers = Some(left);
        }
        self.apply_effects(rt, eff, limits)
    }

    /// Whether message `seq` of incarnation `inc` from `from` was applied.
    pub fn seen(&self, from: &Sender, inc: u64, seq: u64) -> Seen {
        self.post.seen(&from.mark_key(), inc, seq)
    }

    /// Commits what the handler of message `seq` (incarnation `inc`) from
    /// `from` did, with the sender's new watermark. A handler that failed
    /// with a final error (one that consumes an op id) is committed as
    /// applied with no effects, and the error is answered to the sender; one
    /// that failed with a "not applied" error changes nothing and is
    /// answered so (the sender retries).
    pub fn commit_message(
        &mut self,
        rt: &dyn Runtime,
        msg: &MsgId,
        result: Result<Effects, AppError>,
        now_ms: u64,
        limits: &Limits,
    ) -> Result<Delivered, AppError> {
        let (eff, refused) = match result {
            Ok(eff) => (eff, None),
            Err(e) if e.code.consumes_op_id() => (Effects::none(now_ms), Some(e)),
            Err(e) => return Err(e),
        };
        // The watermark bounds (docs/applications.md): rows unused for the
        // store's time to live go, then the least recently used beyond
        // `max_watermarks` (one place kept for the row recorded below).
        // Not taken back by an undo: a row expired now would be expired by
        // the next commit anyway.
        self.post.expire(
            now_ms,
            limits.watermark_ttl_ms,
            limits.max_watermarks.saturating_sub(1),
        );
        // Over a limit: not applied (the sender retries later).
        let (mut undo, bytes) = self.apply_effects(rt, eff, limits)?;
        self.post.record(
            msg.from.mark_key(),
            msg.inc,
            msg.seq,
            now_ms,
            &mut undo.post,
        );
        Ok(Delivered {
            undo,
            app_bytes: bytes,
            refused,
        })
    }

    /// Commits what `on_undeliverable` did for the bounced message `seq`: the
    /// message leaves the outgoing queue in the same commit.
    pub fn commit_bounce(
        &mut self,
        rt: &dyn Runtime,
        seq: u64,
        eff: Effects,
        limits: &Limits,
    ) -> Result<(Undo, Vec<u8>), AppError> {
        let (mut undo, bytes) = self.apply_effects(rt, eff, limits)?;
        self.post.remove(seq, &mut undo.post);
        Ok((undo, bytes))
    }

    /// The timers a handler of a firing of `name` starts from (without it).
    pub fn timers_without(&self, name: &str) -> Timers {
        let mut t = self.timers.clone();
        t.remove(name);
        t
    }

    /// Applies a writing handler's effects, bounded by `limits`; bumps the
    /// version. On a limit, nothing is changed.
    fn apply_effects(
        &mut self,
        rt: &dyn Runtime,
        eff: Effects,
        limits: &Limits,
    ) -> Result<(Undo, Vec<u8>), AppError> {
        if self.post.queued() + eff.sends.len() > limits.max_outgoing {
            return Err(AppError::new(
                ErrorCode::RateLimited,
                format!(
                    "the actor holds {} unacknowledged outgoing messages: retry later",
                    self.post.queued()
                ),
            ));
        }
        if self.outbox.len() + eff.events.len() > limits.outbox_max {
            return Err(AppError::new(
                ErrorCode::RateLimited,
                format!(
                    "the session holds {} unacknowledged events: ack some, then retry",
                    self.outbox.len()
                ),
            ));
        }
        let undo = Undo {
            app: self.app.clone(),
            version: self.version,
            last_op: self.last_op,
            last_reply: self.last_reply.clone(),
            seq_from: self.outbox.next_seq(),
            timers: eff.timers.as_ref().map(|_| self.timers.clone()),
            post: self.post.begin(),
        };
        let (bytes, state_changed) = match eff.state {
            Some((state, bytes)) => {
                self.app = state;
                (bytes, true)
            }
            None => (rt.encode_state(&self.app), false),
        };
        for (body, due) in eff.events {
            self.outbox.push(body, due);
        }
        if let Some(t) = eff.timers {
            self.timers = t;
        }
        // Messages queued before this commit leave the checkpoint as they are
        // delivered: a checkpoint over its bound only because of them is a
        // wait (`rate_limited`: not applied, tried again), not a refusal.
        let queued_before = self.post.checkpoint_bytes();
        for (to, body) in eff.sends {
            self.post.enqueue(to, body, eff.now_ms);
        }
        let size = bytes.len();
        let checkpoint = self.checkpoint_estimate(size);
        let refused = if state_changed && size > limits.max_state_bytes {
            Some(format!(
                "state would be {size} bytes, over the limit of {}",
                limits.max_state_bytes
            ))
        } else if checkpoint > limits.max_checkpoint_bytes {
            Some(format!(
                "the session's checkpoint would be about {checkpoint} bytes \
                 (state and unacknowledged events), over the limit of {}: \
                 acknowledge events or shrink the state",
                limits.max_checkpoint_bytes
            ))
        } else {
            None
        };
        if let Some(why) = refused {
            let code = if !(state_changed && size > limits.max_state_bytes)
                && checkpoint - queued_before <= limits.max_checkpoint_bytes
            {
                ErrorCode::RateLimited
            } else {
                ErrorCode::TooLarge
            };
            self.undo(undo);
            let why = match code {
                ErrorCode::RateLimited => format!(
                    "{why}; {queued_before} bytes of it are messages still being \
                     delivered: retry when they are"
                ),
                _ => why,
            };
            return Err(AppError::new(code, why));
        }
        self.version += 1;
        Ok((undo, bytes))
    }

    /// Takes back a commit whose checkpoint failed.
    pub fn undo(&mut self, undo: Undo) {
        self.app = undo.app;
        self.version = undo.version;
        self.last_op = undo.last_op;
        self.last_reply = undo.last_reply;
        self.outbox.take_back(undo.seq_from);
        if let Some(t) = undo.timers {
            self.timers = t;
        }
        self.post.undo(undo.post);
    }

    /// When the earliest timer falls due, and its name.
    pub fn next_timer(&self) -> Option<(&str, u64)> {
        self.timers
            .iter()
            .min_by_key(|(_, due)| **due)
            .map(|(n, d)| (n.as_str(), *d))
    }

    /// Rough size of this state's checkpoint, given the encoded application
    /// state's length (what the checkpoint bound is checked against).
    pub fn checkpoint_estimate(&self, app_len: usize) -> usize {
        app_len
            + self.outbox.checkpoint_bytes()
            + self.last_reply.as_ref().map_or(0, reply_len)
            + self.timers.keys().map(|k| k.len() + 16).sum::<usize>()
            + self.post.checkpoint_bytes()
            + self.user.as_ref().map_or(0, |u| u.len())
            + CHECKPOINT_OVERHEAD
    }

    /// The checkpoint of this state.
    pub fn to_checkpoint(&self, rt: &dyn Runtime) -> Checkpoint {
        let bytes = rt.encode_state(&self.app);
        self.to_checkpoint_with(rt, bytes)
    }

    /// The checkpoint of this state, given its already encoded application state.
    pub fn to_checkpoint_with(&self, rt: &dyn Runtime, app_bytes: Vec<u8>) -> Checkpoint {
        Checkpoint {
            app: app_bytes,
            app_version: rt.state_version(),
            version: self.version,
            last_op: self.last_op,
            last_reply: self
                .last_reply
                .as_ref()
                .map(|r| serde_json::to_vec(r).unwrap_or_default()),
            token_hash: self.token_hash.0,
            next_seq: self.outbox.next_seq,
            events: self.outbox.events.iter().cloned().collect(),
            timers: self.timers.iter().map(|(n, d)| (n.clone(), *d)).collect(),
            user: self.user.as_deref().map(str::to_owned),
            mail_inc: self.post.inc,
            mail_seq: self.post.last_seq,
            outgoing: self.post.queue().cloned().collect(),
            marks: self
                .post
                .marks
                .iter()
                .map(|(k, m)| (k.clone(), *m))
                .collect(),
        }
    }

    /// Rebuilds a state from its checkpoint (migrating an older application
    /// state; refusing a newer one).
    pub fn from_checkpoint(rt: &dyn Runtime, ck: Checkpoint) -> Result<Self, String> {
        let last_reply = match ck.last_reply {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(SessionState {
            app: rt
                .decode_state(ck.app_version, &ck.app)
                .map_err(|e| e.to_string())?,
            version: ck.version,
            last_op: ck.last_op,
            last_reply,
            outbox: Outbox::from_parts(ck.events, ck.next_seq),
            timers: ck.timers.into_iter().collect(),
            token_hash: TokenHash(ck.token_hash),
            user: ck.user.map(Arc::from),
            post: Post::from_parts(ck.mail_inc, ck.mail_seq, ck.outgoing, ck.marks),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;
    use crate::ids::new_token;
    use crate::kv::{KvApp, KvState};
    use crate::runtime::Typed;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    type Kv = SessionState;

    fn rt() -> Arc<dyn Runtime> {
        Arc::new(Typed::new(KvApp))
    }

    fn fresh() -> Kv {
        SessionState::new(&*rt(), new_token().1)
    }

    /// The kv state of `s`.
    fn kv(s: &Kv) -> KvState {
        s.app.downcast_ref::<KvState>().cloned().unwrap()
    }

    /// Runs a handler future that never waits (kv's never do).
    fn now<T>(fut: impl Future<Output = T>) -> T {
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("a kv handler waited"),
        }
    }

    /// What the session actor does for one op, without the actor.
    fn apply(
        s: &mut Kv,
        id: u64,
        name: &str,
        args: &Value,
        now_ms: u64,
        limits: &Limits,
    ) -> Outcome {
        let rt = rt();
        let retry = match s.begin(id) {
            Begin::Answer(reply) => {
                return Outcome {
                    reply,
                    undo: None,
                    app_bytes: None,
                }
            }
            Begin::Run { retry } => retry,
        };
        let env = s.env("s".into(), Invocation::Op(id), now_ms, limits);
        let fut = rt.clone().run_op(
            s.app_state(),
            env,
            s.timers.clone(),
            name.into(),
            args.clone(),
        );
        let result = now(fut);
        s.commit_op(&*rt, id, retry, result, limits)
    }

    fn op(s: &mut Kv, id: u64, name: &str, args: Value) -> Outcome {
        apply(s, id, name, &args, 1_000, &Limits::default())
    }

    #[test]
    fn every_kv_op() {
        let mut s = fresh();
        assert_eq!(
            op(&mut s, 1, "get", json!({"key":"a"})).reply.value,
            Some(Value::Null)
        );
        let o = op(&mut s, 2, "set", json!({"key":"a","value":"x"}));
        assert!(o.undo.is_some());
        assert_eq!(o.reply.value, Some(Value::Null));
        assert_eq!(o.reply.version, 1);
        assert_eq!(
            op(&mut s, 3, "set", json!({"key":"a","value":5}))
                .reply
                .value,
            Some(json!("x"))
        );
        assert_eq!(
            op(&mut s, 4, "incr", json!({"key":"a","by":-7}))
                .reply
                .value,
            Some(json!(-2))
        );
        assert_eq!(
            op(&mut s, 5, "incr", json!({"key":"n"})).reply.value,
            Some(json!(1))
        );
        assert_eq!(
            op(&mut s, 6, "append", json!({"key":"l","value":1}))
                .reply
                .value,
            Some(json!(1))
        );
        assert_eq!(
            op(&mut s, 7, "append", json!({"key":"l","value":[2]}))
                .reply
                .value,
            Some(json!(2))
        );
        assert_eq!(
            op(&mut s, 8, "del", json!({"key":"n"})).reply.value,
            Some(json!(1))
        );
        let st = op(&mut s, 9, "state", Value::Null);
        assert_eq!(st.reply.value, Some(json!({"a":-2,"l":[1,[2]]})));
        assert!(st.undo.is_none());
        let e = op(&mut s, 10, "echo", json!({"value":{"z":1}}));
        assert_eq!(e.reply.value, Some(json!({"z":1})));
        assert!(e.undo.is_none());
        assert_eq!(s.version, 7);
        assert_eq!(s.last_op, 10);
    }

    #[test]
    fn errors_leave_state_and_answer_codes() {
        let mut s = fresh();
        op(&mut s, 1, "set", json!({"key":"s","value":"str"}));
        let before = kv(&s);
        let code = |o: Outcome| o.reply.error.unwrap().code;
        assert_eq!(
            code(op(&mut s, 2, "incr", json!({"key":"s"}))),
            ErrorCode::TypeMismatch
        );
        assert_eq!(
            code(op(&mut s, 3, "append", json!({"key":"s","value":1}))),
            ErrorCode::TypeMismatch
        );
        assert_eq!(code(op(&mut s, 4, "nope", json!({}))), ErrorCode::UnknownOp);
        assert_eq!(
            code(op(&mut s, 5, "set", json!({"key":1}))),
            ErrorCode::BadArgs
        );
        assert_eq!(code(op(&mut s, 6, "set", json!("x"))), ErrorCode::BadArgs);
        assert_eq!(
            code(op(&mut s, 7, "incr", json!({"key":"n","by":"x"}))),
            ErrorCode::BadArgs
        );
        op(&mut s, 8, "set", json!({"key":"big","value":i64::MAX}));
        assert_eq!(
            code(op(&mut s, 9, "incr", json!({"key":"big"}))),
            ErrorCode::TypeMismatch
        );
        let mut m = kv(&s);
        m.remove("big");
        s.app = Arc::new(m);
        assert_eq!(kv(&s), before);
        // Deterministic failures consume the id; the retry gets the same answer.
        let again = op(&mut s, 9, "incr", json!({"key":"big"}));
        assert!(again.reply.duplicate);
        assert_eq!(again.reply.error.unwrap().code, ErrorCode::TypeMismatch);
    }

    #[test]
    fn too_large_is_undone() {
        let mut s = fresh();
        let limits = Limits {
            max_state_bytes: 50,
            ..Limits::default()
        };
        let ok = apply(
            &mut s,
            1,
            "set",
            &json!({"key":"a","value":"x"}),
            0,
            &limits,
        );
        assert!(ok.reply.ok);
        let big = "y".repeat(100);
        let o = apply(
            &mut s,
            2,
            "set",
            &json!({"key":"b","value":big}),
            0,
            &limits,
        );
        assert_eq!(o.reply.error.unwrap().code, ErrorCode::TooLarge);
        assert!(o.undo.is_none());
        assert_eq!(kv(&s).len(), 1);
        assert_eq!(s.version, 1);
    }

    /// Effects of a handler that only sends `body` to `room/a`.
    fn sending(body: &str) -> Result<Effects, AppError> {
        Ok(Effects {
            state: None,
            events: Vec::new(),
            timers: None,
            sends: vec![(
                crate::address::Address::entity("room", "a").unwrap(),
                json!(body),
            )],
            now_ms: 0,
            reply: Value::Null,
        })
    }

    #[test]
    fn a_checkpoint_over_its_bound_because_of_queued_messages_is_a_wait() {
        let (mut s, rt) = (fresh(), rt());
        let limits = Limits {
            max_checkpoint_bytes: 4000,
            ..Limits::default()
        };
        let body = "m".repeat(2500);
        let first = s.commit_op(&*rt, 1, false, sending(&body), &limits);
        assert!(first.reply.ok, "{:?}", first.reply);
        // Over the bound only with the first message still queued: not
        // applied, the op id not consumed.
        let second = s.commit_op(&*rt, 2, false, sending(&body), &limits);
        let e = second.reply.error.unwrap();
        assert_eq!(e.code, ErrorCode::RateLimited, "{}", e.message);
        assert_eq!((s.last_op, s.post.queued()), (1, 1));
        // Over the bound by itself: refused for good.
        let huge = s.commit_op(&*rt, 3, false, sending(&"m".repeat(5000)), &limits);
        assert_eq!(huge.reply.error.unwrap().code, ErrorCode::TooLarge);
    }

    /// Every backend API request brings a new sender (its idempotency key):
    /// without expiry the table grew until the checkpoint hit its size
    /// limit (`Post::expire` was never called).
    #[test]
    fn watermarks_expire_by_age_and_by_count_when_messages_commit() {
        let rt = rt();
        let mut s = fresh();
        let limits = Limits {
            max_watermarks: 3,
            watermark_ttl_ms: 1_000,
            ..Limits::default()
        };
        let msg = |k: &str| MsgId {
            from: Sender::Backend(k.to_owned()),
            inc: 1,
            seq: 1,
        };
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            let at = 10_000 + i as u64;
            s.commit_message(&*rt, &msg(k), Ok(Effects::none(at)), at, &limits)
                .unwrap();
        }
        // At most 3 rows: the least recently used ("a") went first.
        assert_eq!(s.seen(&msg("a").from, 1, 1), Seen::Fresh);
        for k in ["b", "c", "d"] {
            assert_eq!(s.seen(&msg(k).from, 1, 1), Seen::Duplicate, "{k}");
        }
        // A commit past the time to live forgets the rows unused that long.
        let late = 10_003 + 1_001;
        s.commit_message(&*rt, &msg("e"), Ok(Effects::none(late)), late, &limits)
            .unwrap();
        assert_eq!(s.post.marks.len(), 1);
        assert_eq!(s.seen(&msg("e").from, 1, 1), Seen::Duplicate);
    }

    #[test]
    fn retried_ids_are_not_applied_twice() {
        let mut s = fresh();
        op(&mut s, 1, "incr", json!({"key":"c"}));
        let first = op(&mut s, 2, "incr", json!({"key":"c"})).reply;
        let retry = op(&mut s, 2, "incr", json!({"key":"c"}));
        assert!(retry.undo.is_none());
        assert_eq!(retry.reply.value, first.value);
        assert!(retry.reply.duplicate);
        let older = op(&mut s, 1, "incr", json!({"key":"c"})).reply;
        assert!(older.ok && older.duplicate && older.value.is_none());
        assert_eq!(kv(&s)["c"], json!(2));
        // A retried read is read again.
        op(&mut s, 3, "get", json!({"key":"c"}));
        let r = op(&mut s, 3, "get", json!({"key":"c"})).reply;
        assert_eq!((r.value, r.duplicate), (Some(json!(2)), true));
    }

    #[test]
    fn events_wait_their_turn_and_ack_trims() {
        let mut s = fresh();
        let limits = Limits::default();
        let a = apply(
            &mut s,
            1,
            "emit",
            &json!({"body":"late","delay_ms":500}),
            1_000,
            &limits,
        );
        assert_eq!(a.reply.value, Some(json!(1)));
        let b = apply(&mut s, 2, "emit", &json!({"body":"now"}), 1_000, &limits);
        assert_eq!(b.reply.value, Some(json!(2)));
        assert_eq!(
            s.outbox.due_after(0, 1_000).count(),
            0,
            "seq 2 waits for seq 1"
        );
        assert_eq!(s.outbox.next_due_after(0), Some(1_500));
        let due: Vec<u64> = s.outbox.due_after(0, 1_500).map(|e| e.seq).collect();
        assert_eq!(due, vec![1, 2]);
        assert!(
            !s.outbox.ack(2, 1_200),
            "undelivered events cannot be acked"
        );
        assert!(s.outbox.ack(1, 1_600));
        assert_eq!(s.outbox.len(), 1);
        assert_eq!(
            s.outbox.due_after(1, 1_600).next().unwrap().body,
            json!("now")
        );
    }

    #[test]
    fn the_whole_checkpoint_is_bounded_in_bytes_and_acks_free_room() {
        // 64 KiB event bodies: each emit fits the state limit (the state is
        // tiny) but the checkpoint, with every unacknowledged event in it, is
        // bounded by max_checkpoint_bytes.
        let mut s = fresh();
        let limits = Limits {
            max_checkpoint_bytes: 300 * 1024,
            ..Limits::default()
        };
        let big = "x".repeat(64 * 1024);
        let mut id = 0;
        let refused = loop {
            id += 1;
            let out = apply(&mut s, id, "emit", &json!({ "body": big }), 0, &limits);
            if !out.reply.ok {
                break out.reply;
            }
            assert!(id < 10, "never refused");
        };
        assert_eq!(refused.error.unwrap().code, ErrorCode::TooLarge);
        assert_eq!(
            s.outbox.len(),
            4,
            "4 x 64 KiB fit in 300 KiB, a fifth does not"
        );
        let ck = crate::codec::encode(s.to_checkpoint(&*rt()));
        assert!(ck.len() <= limits.max_checkpoint_bytes, "{}", ck.len());
        assert!(
            s.checkpoint_estimate(rt().encode_state(&s.app).len()) >= ck.len(),
            "the estimate bounds the real checkpoint"
        );
        // Acknowledging events makes room again.
        assert!(s.outbox.ack(2, 0));
        id += 1;
        let out = apply(&mut s, id, "emit", &json!({ "body": big }), 0, &limits);
        assert!(out.reply.ok, "{:?}", out.reply);
        // The byte count survives a checkpoint round trip.
        let back = SessionState::from_checkpoint(&*rt(), s.to_checkpoint(&*rt())).unwrap();
        assert_eq!(back.outbox.checkpoint_bytes(), s.outbox.checkpoint_bytes());
    }

    #[test]
    fn full_outbox_refuses_emit_without_consuming_the_id() {
        let mut s = fresh();
        let limits = Limits {
            outbox_max: 2,
            ..Limits::default()
        };
        for id in 1..=2 {
            assert!(
                apply(&mut s, id, "emit", &json!({"body":id}), 0, &limits)
                    .reply
                    .ok
            );
        }
        let r = apply(&mut s, 3, "emit", &json!({"body":3}), 0, &limits).reply;
        assert_eq!(r.error.unwrap().code, ErrorCode::RateLimited);
        assert_eq!(s.last_op, 2);
        s.outbox.ack(2, 0);
        let r = apply(&mut s, 3, "emit", &json!({"body":3}), 0, &limits).reply;
        assert_eq!(r.value, Some(json!(3)));
    }

    fn arb_op() -> impl Strategy<Value = (String, Value)> {
        let key = prop::sample::select(vec!["a", "b", "c"]);
        prop_oneof![
            (key.clone(), any::<i32>())
                .prop_map(|(k, v)| ("set".into(), json!({"key":k,"value":v}))),
            (key.clone(), -5i64..5).prop_map(|(k, by)| ("incr".into(), json!({"key":k,"by":by}))),
            key.clone().prop_map(|k| ("del".into(), json!({"key":k}))),
            key.clone().prop_map(|k| ("get".into(), json!({"key":k}))),
            (key, any::<bool>()).prop_map(|(k, v)| ("append".into(), json!({"key":k,"value":v}))),
            any::<u8>().prop_map(|b| ("emit".into(), json!({"body":b}))),
        ]
    }

    proptest! {
        /// Replaying any prefix of ids again changes nothing, and the state
        /// survives a checkpoint round trip.
        #[test]
        fn retries_are_idempotent_and_checkpoints_round_trip(ops in prop::collection::vec(arb_op(), 1..40)) {
            let mut s = fresh();
            for (i, (name, args)) in ops.iter().enumerate() {
                apply(&mut s, i as u64 + 1, name, args, 0, &Limits::default());
            }
            let settled = s.clone();
            for (i, (name, args)) in ops.iter().enumerate() {
                let o = apply(&mut s, i as u64 + 1, name, args, 0, &Limits::default());
                prop_assert!(o.undo.is_none());
                prop_assert!(o.reply.duplicate);
            }
            prop_assert_eq!(kv(&s), kv(&settled));
            prop_assert_eq!(s.version, settled.version);
            let bytes = crate::codec::encode(s.to_checkpoint(&*rt()));
            let back = SessionState::from_checkpoint(&*rt(), crate::codec::decode(&bytes).unwrap()).unwrap();
            prop_assert_eq!(back.to_checkpoint(&*rt()), s.to_checkpoint(&*rt()));
        }
    }
}
