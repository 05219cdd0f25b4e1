//! `SessionState`: one session's state and the rules for applying ops to it,
//! with no actix, no clock and no I/O (the actor in [`crate::session`] is a thin
//! shell around it).
//!
//! Rules kept here:
//! - op ids: an id at or below the watermark `last_op` is never applied again;
//!   the latest op's stored result is returned for it, older ids get
//!   `{ok: true, duplicate: true}`;
//! - failures that mean "not applied" (`unavailable`, `rate_limited`) leave the
//!   watermark alone so the client can retry with the same id; deterministic
//!   failures (`bad_args`, `type_mismatch`, ...) consume the id like a success;
//! - a write that would grow the encoded state past the limit is undone and
//!   answered `too_large`, and so is one that would grow the whole checkpoint
//!   (state, unacknowledged events, the stored reply) past its own limit;
//! - events get increasing `seq`s, wait in a bounded outbox until acknowledged,
//!   and are delivered in `seq` order once due.

use std::collections::VecDeque;

use serde_json::Value;

use crate::app::{AppError, Application, OpCtx};
use crate::codec::{Checkpoint, StoredEvent};
use crate::ids::TokenHash;
use crate::protocol::{ErrorCode, Event, OpReply};

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
            max_live_sessions: 100_000,
        }
    }
}

/// Bytes a checkpoint spends on each event besides its body (seq, due time,
/// length prefix: an upper bound of their varint encoding).
const EVENT_OVERHEAD: usize = 24;
/// Bytes a checkpoint spends besides the state, the events and the reply.
const CHECKPOINT_OVERHEAD: usize = 96;

fn reply_len(reply: &OpReply) -> usize {
    serde_json::to_vec(reply).map_or(0, |b| b.len())
}

fn body_len(body: &Value) -> usize {
    // A Value always serializes; this is the length the checkpoint stores.
    serde_json::to_vec(body).map_or(0, |b| b.len())
}

/// Unacknowledged events, in `seq` order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outbox {
    events: VecDeque<StoredEvent>,
    /// The `seq` the next event gets (sequences start at 1).
    next_seq: u64,
    /// Encoded bytes of the held events' bodies.
    body_bytes: usize,
}

impl Outbox {
    /// Number of events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// What the held events take in a checkpoint, in bytes.
    pub fn checkpoint_bytes(&self) -> usize {
        self.body_bytes + EVENT_OVERHEAD * self.events.len()
    }

    /// Highest `seq` handed out so far (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.max(1) - 1
    }

    pub(crate) fn push(&mut self, body: Value, due_ms: u64) -> u64 {
        let seq = self.next_seq.max(1);
        self.next_seq = seq + 1;
        // Delivery is in seq order: an event is never due before the one ahead of it.
        let due_ms = self
            .events
            .back()
            .map_or(due_ms, |prev| due_ms.max(prev.due_ms));
        self.body_bytes += body_len(&body);
        self.events.push_back(StoredEvent { seq, due_ms, body });
        seq
    }

    /// Forgets events up to `seq` that are due (an event not yet delivered cannot
    /// have been received, whatever the client says).
    pub fn ack(&mut self, seq: u64, now_ms: u64) -> bool {
        let before = self.events.len();
        while self
            .events
            .front()
            .is_some_and(|e| e.seq <= seq && e.due_ms <= now_ms)
        {
            if let Some(e) = self.events.pop_front() {
                self.body_bytes = self.body_bytes.saturating_sub(body_len(&e.body));
            }
        }
        before != self.events.len()
    }

    /// Events with `seq > after` that are due at `now_ms`, in order.
    pub fn due_after(&self, after: u64, now_ms: u64) -> impl Iterator<Item = Event> + '_ {
        self.events
            .iter()
            .skip_while(move |e| e.seq <= after)
            .take_while(move |e| e.due_ms <= now_ms)
            .map(|e| Event {
                seq: e.seq,
                body: e.body.clone(),
            })
    }

    /// When the first event with `seq > after` falls due, if one is held.
    pub fn next_due_after(&self, after: u64) -> Option<u64> {
        self.events.iter().find(|e| e.seq > after).map(|e| e.due_ms)
    }
}

/// The result of [`SessionState::apply`].
#[derive(Debug)]
pub struct Outcome<S> {
    /// The answer to send once the change (if any) is durable.
    pub reply: OpReply,
    /// `Some` when the op changed the session: the state to restore if the
    /// checkpoint fails. Such a reply may only be sent after the checkpoint.
    pub undo: Option<Box<SessionState<S>>>,
    /// The encoded application state after a change (measured for the size
    /// limit; handed on so the checkpoint does not encode it again).
    pub app_bytes: Option<Vec<u8>>,
}

/// One session: application state, version, op-id watermark, outbox, token hash.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState<S> {
    /// Application state.
    pub app: S,
    /// Bumped by every op that changes the session.
    pub version: u64,
    /// Highest op id applied.
    pub last_op: u64,
    /// The answer to `last_op`, kept for a retry of that id. `None` after a read
    /// (a retried read is simply read again).
    pub last_reply: Option<OpReply>,
    /// Unacknowledged events.
    pub outbox: Outbox,
    /// Hash of the resume token.
    pub token_hash: TokenHash,
}

impl<S: Clone + Default> SessionState<S> {
    /// A new, empty session.
    pub fn new(token_hash: TokenHash) -> Self {
        SessionState {
            app: S::default(),
            version: 0,
            last_op: 0,
            last_reply: None,
            outbox: Outbox::default(),
            token_hash,
        }
    }

    /// Applies op `id` (see the module docs for the rules).
    pub fn apply<A: Application<State = S>>(
        &mut self,
        app: &A,
        id: u64,
        op: &str,
        args: &Value,
        now_ms: u64,
        limits: &Limits,
    ) -> Outcome<S> {
        if id <= self.last_op {
            let reply = match (&self.last_reply, id == self.last_op) {
                (Some(stored), true) => stored.clone(),
                (None, true) if app.is_read_only(op) => {
                    // A retried read: read again; nothing changes.
                    let mut reply = self.run(app, id, op, args, now_ms, limits, true).reply;
                    reply.duplicate = true;
                    return Outcome {
                        reply,
                        undo: None,
                        app_bytes: None,
                    };
                }
                _ => OpReply {
                    id,
                    ok: true,
                    value: None,
                    version: self.version,
                    error: None,
                    duplicate: true,
                },
            };
            return Outcome {
                reply: OpReply {
                    duplicate: true,
                    ..reply
                },
                undo: None,
                app_bytes: None,
            };
        }
        self.run(app, id, op, args, now_ms, limits, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn run<A: Application<State = S>>(
        &mut self,
        app: &A,
        id: u64,
        op: &str,
        args: &Value,
        now_ms: u64,
        limits: &Limits,
        retry: bool,
    ) -> Outcome<S> {
        let read_only = app.is_read_only(op);
        let undo = (!read_only).then(|| Box::new(self.clone()));
        let mut ctx = OpCtx {
            outbox: &mut self.outbox,
            now_ms,
            outbox_max: limits.outbox_max,
            max_delay_ms: limits.max_emit_delay_ms,
        };
        let result = app.apply(&mut self.app, op, args, &mut ctx);
        let mut app_bytes = None;
        let result = match result {
            Ok(applied) if applied.changed => {
                let bytes = app.encode_state(&self.app);
                let size = bytes.len();
                app_bytes = Some(bytes);
                let checkpoint = self.checkpoint_estimate(size);
                if size > limits.max_state_bytes {
                    Err(AppError::new(
                        ErrorCode::TooLarge,
                        format!(
                            "state would be {size} bytes, over the limit of {}",
                            limits.max_state_bytes
                        ),
                    ))
                } else if checkpoint > limits.max_checkpoint_bytes {
                    Err(AppError::new(
                        ErrorCode::TooLarge,
                        format!(
                            "the session's checkpoint would be about {checkpoint} bytes \
                             (state and unacknowledged events), over the limit of {}: \
                             acknowledge events or shrink the state",
                            limits.max_checkpoint_bytes
                        ),
                    ))
                } else {
                    self.version += 1;
                    Ok(applied)
                }
            }
            other => other,
        };
        match result {
            Ok(applied) => {
                let reply = OpReply::ok(id, applied.value, self.version);
                if retry {
                    return Outcome {
                        reply,
                        undo: None,
                        app_bytes: None,
                    };
                }
                self.last_op = id;
                if applied.changed {
                    self.last_reply = Some(reply.clone());
                    Outcome {
                        reply,
                        undo,
                        app_bytes,
                    }
                } else {
                    self.last_reply = None;
                    Outcome {
                        reply,
                        undo: None,
                        app_bytes: None,
                    }
                }
            }
            Err(e) => {
                if let Some(before) = undo {
                    // Applications promise to leave state untouched on error, but
                    // `too_large` is found after the change: restore to be sure.
                    *self = *before;
                }
                let reply = OpReply::err(id, e.code, e.message, self.version);
                if e.code.consumes_op_id() && !retry {
                    self.last_op = id;
                    self.last_reply = Some(reply.clone());
                }
                Outcome {
                    reply,
                    undo: None,
                    app_bytes: None,
                }
            }
        }
    }

    /// Rough size of this state's checkpoint, given the encoded application
    /// state's length (what the checkpoint bound is checked against).
    pub fn checkpoint_estimate(&self, app_len: usize) -> usize {
        app_len
            + self.outbox.checkpoint_bytes()
            + self.last_reply.as_ref().map_or(0, reply_len)
            + CHECKPOINT_OVERHEAD
    }

    /// The checkpoint of this state.
    pub fn to_checkpoint<A: Application<State = S>>(&self, app: &A) -> Checkpoint {
        self.to_checkpoint_with(app.encode_state(&self.app))
    }

    /// The checkpoint of this state, given its already encoded application state.
    pub fn to_checkpoint_with(&self, app_bytes: Vec<u8>) -> Checkpoint {
        Checkpoint {
            app: app_bytes,
            version: self.version,
            last_op: self.last_op,
            last_reply: self
                .last_reply
                .as_ref()
                .map(|r| serde_json::to_vec(r).unwrap_or_default()),
            token_hash: self.token_hash.0,
            next_seq: self.outbox.next_seq,
            events: self.outbox.events.iter().cloned().collect(),
        }
    }

    /// Rebuilds a state from its checkpoint.
    pub fn from_checkpoint<A: Application<State = S>>(
        app: &A,
        ck: Checkpoint,
    ) -> Result<Self, String> {
        let last_reply = match ck.last_reply {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(SessionState {
            app: app.decode_state(&ck.app)?,
            version: ck.version,
            last_op: ck.last_op,
            last_reply,
            outbox: Outbox {
                body_bytes: ck.events.iter().map(|e| body_len(&e.body)).sum(),
                events: ck.events.into(),
                next_seq: ck.next_seq,
            },
            token_hash: TokenHash(ck.token_hash),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::new_token;
    use crate::kv::KvApp;
    use proptest::prelude::*;
    use serde_json::{json, Map};

    type Kv = SessionState<Map<String, Value>>;

    fn fresh() -> Kv {
        SessionState::new(new_token().1)
    }

    fn op(s: &mut Kv, id: u64, name: &str, args: Value) -> Outcome<Map<String, Value>> {
        s.apply(&KvApp, id, name, &args, 1_000, &Limits::default())
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
        let before = s.app.clone();
        let code = |o: Outcome<_>| o.reply.error.unwrap().code;
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
        s.app.remove("big");
        assert_eq!(s.app, before);
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
        let ok = s.apply(
            &KvApp,
            1,
            "set",
            &json!({"key":"a","value":"x"}),
            0,
            &limits,
        );
        assert!(ok.reply.ok);
        let big = "y".repeat(100);
        let o = s.apply(
            &KvApp,
            2,
            "set",
            &json!({"key":"b","value":big}),
            0,
            &limits,
        );
        assert_eq!(o.reply.error.unwrap().code, ErrorCode::TooLarge);
        assert!(o.undo.is_none());
        assert_eq!(s.app.len(), 1);
        assert_eq!(s.version, 1);
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
        assert_eq!(s.app["c"], json!(2));
        // A retried read is read again.
        op(&mut s, 3, "get", json!({"key":"c"}));
        let r = op(&mut s, 3, "get", json!({"key":"c"})).reply;
        assert_eq!((r.value, r.duplicate), (Some(json!(2)), true));
    }

    #[test]
    fn events_wait_their_turn_and_ack_trims() {
        let mut s = fresh();
        let limits = Limits::default();
        let a = s.apply(
            &KvApp,
            1,
            "emit",
            &json!({"body":"late","delay_ms":500}),
            1_000,
            &limits,
        );
        assert_eq!(a.reply.value, Some(json!(1)));
        let b = s.apply(&KvApp, 2, "emit", &json!({"body":"now"}), 1_000, &limits);
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
            let out = s.apply(&KvApp, id, "emit", &json!({ "body": big }), 0, &limits);
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
        let ck = crate::codec::encode(s.to_checkpoint(&KvApp));
        assert!(ck.len() <= limits.max_checkpoint_bytes, "{}", ck.len());
        assert!(
            s.checkpoint_estimate(KvApp.encode_state(&s.app).len()) >= ck.len(),
            "the estimate bounds the real checkpoint"
        );
        // Acknowledging events makes room again.
        assert!(s.outbox.ack(2, 0));
        id += 1;
        let out = s.apply(&KvApp, id, "emit", &json!({ "body": big }), 0, &limits);
        assert!(out.reply.ok, "{:?}", out.reply);
        // The byte count survives a checkpoint round trip.
        let back = SessionState::from_checkpoint(&KvApp, s.to_checkpoint(&KvApp)).unwrap();
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
                s.apply(&KvApp, id, "emit", &json!({"body":id}), 0, &limits)
                    .reply
                    .ok
            );
        }
        let r = s
            .apply(&KvApp, 3, "emit", &json!({"body":3}), 0, &limits)
            .reply;
        assert_eq!(r.error.unwrap().code, ErrorCode::RateLimited);
        assert_eq!(s.last_op, 2);
        s.outbox.ack(2, 0);
        let r = s
            .apply(&KvApp, 3, "emit", &json!({"body":3}), 0, &limits)
            .reply;
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
                s.apply(&KvApp, i as u64 + 1, name, args, 0, &Limits::default());
            }
            let settled = s.clone();
            for (i, (name, args)) in ops.iter().enumerate() {
                let o = s.apply(&KvApp, i as u64 + 1, name, args, 0, &Limits::default());
                prop_assert!(o.undo.is_none());
                prop_assert!(o.reply.duplicate);
            }
            prop_assert_eq!(&s.app, &settled.app);
            prop_assert_eq!(s.version, settled.version);
            let bytes = crate::codec::encode(s.to_checkpoint(&KvApp));
            let back = SessionState::from_checkpoint(&KvApp, crate::codec::decode(&bytes).unwrap()).unwrap();
            prop_assert_eq!(back, s);
        }
    }
}
