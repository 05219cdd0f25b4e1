//! The session actor: the actix shell around one [`SessionState`].
//!
//! One actor per live session, on the arbiter of the connection that
//! activated it. It applies one op at a time: a state-changing op holds the
//! mailbox (`AtomicResponse` / `ctx.wait`) until its checkpoint is confirmed, so
//! the answer a client receives always describes durable state (default
//! `sync` durability). Phases: `Loading` (creating, or reading the checkpoint
//! and taking an epoch) -> `Live` -> `Gone`.
//!
//! What stops a session actor, and what happens then:
//! - detached longer than `detach_timeout`: final checkpoint, stop
//!   (passivation); the next resume re-activates it from the store;
//! - `bye`: the checkpoint is deleted, the connection closed with 1000;
//! - a fenced write (a newer epoch exists): stop at once, close the client
//!   with 1012 so it resumes where the session lives now;
//! - node shutdown ([`Shutdown`]): final checkpoint, close with the given code.
//!
//! Messages that were queued for a stopped actor fail with a mailbox error,
//! which the edge answers as `unavailable` (not applied, retry with same id).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use serde_json::Value;

use std::collections::HashSet;

use crate::address::{Address, Sender};
use crate::app::{AppError, Bounce, BounceReason, Invocation};
use crate::codec;
use crate::conn::ConnHandle;
use crate::ids::{SessionId, TokenHash};
use crate::mail::Seen;
use crate::protocol::{CloseCode, ErrorCode, OpReply, Welcome};
use crate::runtime::Runtime;
use crate::runtime::{Effects, HandlerFuture};
use crate::shared::{Durability, HostShared};
use crate::state::{Begin, Delivered, Limits, MsgId, Outcome, SessionState};
use crate::store::{Activation, StoreError, Wake};

/// Largest number of messages queued for one session before senders wait.
const MAILBOX: usize = 256;
/// How long a gone actor lingers to answer messages that were already queued.
const GONE_LINGER: Duration = Duration::from_millis(500);
/// A reload's answer: the activation (`None`: the session is gone from the
/// store), or the newer epoch another activation holds.
type Reloaded = Result<Result<Option<Activation>, u64>, StoreError>;

/// Longest wait between re-activations of a doubtful actor (see `doubtful`).
const MAX_RELOAD: Duration = Duration::from_secs(5);
/// Retry delay of a passivation or interval flush whose checkpoint failed.
const RETRY_SAVE: Duration = Duration::from_secs(2);

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How an actor begins.
#[derive(Debug)]
pub(crate) enum Init {
    /// A brand-new session with this token hash.
    New(TokenHash),
    /// An existing session, read from the store.
    Resume,
    /// The host is shutting down: answer `ShuttingDown` and stop.
    Refuse,
}

/// Why a session cannot be attached to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttachError {
    /// The token does not match.
    #[error("the resume token does not match this session")]
    BadToken,
    /// The session is unknown or expired.
    #[error("session unknown or expired")]
    NotFound,
    /// The store could not be reached: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// The session moved to a newer activation.
    #[error("the session moved")]
    Moved,
    /// The node is stopping.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The stored checkpoint could not be read.
    #[error("stored session is unreadable: {0}")]
    Corrupt(String),
    /// A connection whose `hello` came later holds the session (this attach
    /// re-routes an older one), or this is a late attempt of an attach the
    /// same connection already made again.
    #[error("a newer connection took this session over")]
    Superseded,
}

/// Which client connection an attach is for: the edge process it arrived at
/// (a random nonce drawn at start-up, so a restarted node under the same id is
/// another origin) and that edge's connection id. A re-route, a retried attach
/// and a new proxy of one client connection all have the same origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub struct Origin {
    /// The edge process's nonce.
    pub edge: u64,
    /// The connection's id at that edge.
    pub conn: u64,
}

/// The order of `hello`s of one session: the activation's epoch, then the
/// hello's rank within that activation. A connection's claim is drawn when its
/// `hello` attaches and carried by every re-route of that connection, so
/// "whose hello came later" is decided by the actor, not by which attach
/// reaches it last. Epochs grow with every activation, so a hello accepted by
/// a newer activation outranks every hello of an older one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, bincode::Encode, bincode::Decode,
)]
pub struct Claim {
    /// Epoch of the activation that accepted the hello.
    pub epoch: u64,
    /// Rank of the hello within that activation (from 1).
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Loading,
    Live,
    Gone(AttachError),
}

struct Attached {
    conn: ConnHandle,
    /// Highest event seq written to this connection (or acknowledged by it).
    sent_upto: u64,
    /// The client connection behind `conn`.
    origin: Origin,
    /// Its hello's rank.
    claim: Claim,
}

/// Attach a connection (after `hello`, or when a connection routes again).
/// Answers the `welcome` to send and the connection's [`Claim`]; replayed
/// events are queued on the connection behind it.
///
/// The rules, in [`SessionActor`]'s `attach_now`:
/// - the same origin as the attached connection (a re-route, a retried
///   attach, another proxy of the same client connection): the handle is
///   replaced quietly, unless this is an older attempt than the last one
///   seen from that origin (refused with [`AttachError::Superseded`]);
/// - a re-route (`reattach: Some(claim)`) whose claim is older than the
///   newest hello this actor accepted: refused with `Superseded`;
/// - otherwise the attached connection, if any, is closed with 4000 (taken
///   over) and this one attaches; a hello draws a new claim.
///
/// Identity (checked with the token, before those rules): the hello that
/// creates a session binds it to `user` (the verified subject of its
/// credential, or nobody), stored in its state and checkpointed; every later
/// attach must carry the same `user`, or is refused with
/// [`AttachError::BadToken`] (an anonymous attach to a bound session, or one
/// with a credential to an anonymous session, included). The rule lives
/// here, with the state, so it holds whichever node the hello reached.
#[derive(Message)]
#[rtype(result = "Result<(Welcome, Claim), AttachError>")]
pub struct Attach {
    /// The connection.
    pub conn: ConnHandle,
    /// The token the client presented.
    pub token: String,
    /// Highest event seq the client has received.
    pub ack: u64,
    /// The client connection this attach is for.
    pub origin: Origin,
    /// Grows with every attach an edge sends (per edge process): orders the
    /// attempts of one origin.
    pub attempt: u64,
    /// `None` for a client's `hello`; the connection's claim when its edge
    /// routes it again.
    pub reattach: Option<Claim>,
    /// The subject of the credential the edge verified, `None` for an
    /// anonymous hello (see the identity rule above).
    pub user: Option<String>,
}

/// The session is not (or no longer) held by this actor: the op was not
/// applied; find the session's owner again and resend it (same id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session not held here: route again")]
pub struct NotHere;

/// Run an op.
#[derive(Message)]
#[rtype(result = "Result<OpReply, NotHere>")]
pub struct Op {
    /// Connection that sent it (ops of a connection that was taken over are refused).
    pub conn_id: u64,
    /// Client op id.
    pub id: u64,
    /// Op name.
    pub op: String,
    /// Op arguments.
    pub args: Value,
}

/// An [`Op`] whose answer comes back on `reply`. Sent with `do_send`, it is
/// queued at the moment it is sent, whatever the mailbox holds: ops sent one
/// after another are applied in that order (a bounded mailbox would park a
/// sender and let a later op overtake it). The edge bounds ops in flight per
/// connection (`limits.max_inflight_ops`). If the actor stops before running
/// it, `reply` is dropped: the op was not applied, route again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct QueuedOp {
    /// The op.
    pub op: Op,
    /// Where its answer goes.
    pub reply: tokio::sync::oneshot::Sender<Result<OpReply, NotHere>>,
}

/// The client acknowledged events up to `seq`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ack {
    /// Connection that sent it.
    pub conn_id: u64,
    /// Highest seq received.
    pub seq: u64,
}

/// The connection ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach {
    /// Connection that ended.
    pub conn_id: u64,
}

/// `bye`: delete the session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Bye {
    /// Connection that sent it.
    pub conn_id: u64,
}

/// Hand the session off (its owner changed): final checkpoint, tell the
/// attached connection it moved, stop. Answers whether the checkpoint was written.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Release;

/// Node shutdown: checkpoint, close the client with `code`, stop. Answers
/// whether the final checkpoint was written (or nothing needed writing).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Shutdown {
    /// Close code for the attached client (1001 when the node goes away).
    pub code: CloseCode,
}

/// A batch of messages from one sender to one actor, in `seq` order: the
/// receiver applies them in order, skips those it applied before, and stops
/// at the first it cannot apply now.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<DeliverAck, DeliverError>")]
pub struct Deliver {
    /// Who sent them.
    pub from: Sender,
    /// The sender's incarnation.
    pub inc: u64,
    /// The messages: sequence number, body, and when the sender committed it
    /// (ms since the Unix epoch).
    pub msgs: Vec<(u64, Value, u64)>,
}

/// What a receiver did with a [`Deliver`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeliverAck {
    /// Every message up to this `seq` is done with: applied now or before,
    /// or refused (below). 0: none.
    pub upto: u64,
    /// Messages the receiver's handler refused for good, with its error.
    pub refused: Vec<(u64, AppError)>,
    /// Why the receiver stopped before the end of the batch, if it did
    /// (the rest is to be sent again later).
    pub stalled: Option<String>,
}

/// Why a batch could not be delivered at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliverError {
    /// The receiver is a session that ended, expired or never existed.
    #[error("the session ended or does not exist")]
    Gone,
    /// The receiver is an entity of a kind nobody registered.
    #[error("no such entity kind")]
    UnknownKind,
    /// Not now (moving, loading, store down, owner unreachable): send again later.
    #[error("not delivered, try again: {0}")]
    Retry(String),
}

/// Most messages sent to one destination in one batch.
const BATCH_MAX: usize = 64;
/// Longest wait between attempts to deliver to an unreachable actor.
const MAX_RESEND: Duration = Duration::from_secs(5);

/// One live session.
pub struct SessionActor {
    id: SessionId,
    /// The application running this actor (the session application, or its
    /// entity kind's).
    rt: Arc<dyn Runtime>,
    /// Destinations with a batch in flight (at most one each: the order rule).
    inflight: HashSet<Address>,
    /// Queued messages being handed back to `on_undeliverable`.
    bouncing: HashSet<u64>,
    /// The resend wake-up, and how many resends in a row failed.
    resend_timer: Option<SpawnHandle>,
    resend_fails: u32,
    /// The id, shared with every handler run.
    name: Arc<str>,
    gen: u64,
    host: Arc<HostShared>,
    init: Option<Init>,
    phase: Phase,
    state: SessionState,
    epoch: u64,
    /// Created by this activation and not yet welcomed.
    fresh: bool,
    conn: Option<Attached>,
    /// Hellos accepted by this activation (the next claim's `seq`).
    hellos: u64,
    /// The newest claim this activation accepted.
    newest: Option<Claim>,
    /// The last origin attached and its attempt (late attempts are refused
    /// even after that connection detached).
    last_origin: Option<(Origin, u64)>,
    passivate_timer: Option<SpawnHandle>,
    event_timer: Option<SpawnHandle>,
    flush_timer: Option<SpawnHandle>,
    /// The wake-up of the earliest timer.
    timer_handle: Option<SpawnHandle>,
    /// Failed attempts of the earliest timer's current firing.
    timer_attempts: u32,
    /// Extra wait before the next attempt of a failed firing.
    timer_backoff: Duration,
    /// Whether this session has had timers in this activation (its writes
    /// then keep the store's timer index up to date).
    timer_user: bool,
    /// Changes not in the store that may be lost (acks; interval-mode writes).
    dirty: bool,
    /// Interval mode: acknowledged writes not yet checkpointed.
    unsaved_writes: bool,
    /// Interval mode: the last flush failed, so writes are refused until one works.
    flush_failing: bool,
    /// Interval mode: a background checkpoint is in flight.
    flush_inflight: bool,
    /// Sync mode: a checkpoint write failed without saying whether it landed
    /// (no answer in time, a lost connection, too few replicas confirmed).
    /// Memory was rolled back, but the store may hold that write, and a
    /// write of this epoch still on its way may land later. Until the actor
    /// has re-activated itself from the store ([`SessionActor::reload`]: a
    /// new epoch, which fences any late write of the old one, and the state
    /// the store holds), it commits no write, fires no timer and sends no
    /// message; reads are answered from memory.
    doubtful: bool,
    /// Failed reloads in a row (their backoff).
    reload_fails: u32,
    /// A reload's store call is in flight.
    reloading: bool,
    /// The next reload after a failed one (cancelled when a write asks for
    /// one at once: see [`SessionActor::reload_now`]).
    reload_timer: Option<SpawnHandle>,
    last_saved: Instant,
    /// When the store last confirmed this activation's epoch (a write, the
    /// activation, or an explicit check).
    last_confirmed: Instant,
    /// The user this actor is listed under in the host's user index
    /// ([`crate::users`]), if any.
    indexed_user: Option<Arc<str>>,
}

impl SessionActor {
    pub(crate) fn new(id: SessionId, gen: u64, host: Arc<HostShared>, init: Init) -> Self {
        // The host starts an entity only when its kind is registered.
        let rt = host.runtime_for(&id).unwrap_or_else(|| host.app.clone());
        let state = SessionState::new(&*rt, TokenHash([0; 32]));
        SessionActor {
            rt,
            inflight: HashSet::new(),
            bouncing: HashSet::new(),
            resend_timer: None,
            resend_fails: 0,
            name: Arc::from(id.as_str()),
            id,
            gen,
            host,
            fresh: matches!(init, Init::New(_)),
            init: Some(init),
            phase: Phase::Loading,
            state,
            epoch: 0,
            conn: None,
            hellos: 0,
            newest: None,
            last_origin: None,
            passivate_timer: None,
            event_timer: None,
            flush_timer: None,
            timer_handle: None,
            timer_attempts: 0,
            timer_backoff: Duration::ZERO,
            timer_user: false,
            dirty: false,
            unsaved_writes: false,
            flush_failing: false,
            flush_inflight: false,
            doubtful: false,
            reload_fails: 0,
            reloading: false,
            reload_timer: None,
            last_saved: Instant::now(),
            last_confirmed: Instant::now(),
            indexed_user: None,
        }
    }

    /// Whether the session is in the store (it is once its first write
    /// created it; an activation from the store always is).
    fn stored(&self) -> bool {
        self.epoch > 0
    }

    /// Writes `bytes` under this activation's epoch; a session not in the
    /// store yet is created first, which takes its first epoch. Answers the
    /// epoch written under.
    fn write(
        &self,
        bytes: Vec<u8>,
    ) -> futures_util::future::BoxFuture<'static, Result<u64, StoreError>> {
        use futures_util::FutureExt;
        let (store, id, epoch) = (self.host.store.clone(), self.id.clone(), self.epoch);
        // Sessions that never had a timer leave the index alone (no cost on
        // the hot path); the others state their earliest due time each write.
        // An actor with messages to deliver is woken too, should its node
        // die: the new owner resends them.
        let resend = (self.state.post.queued() > 0).then(|| now_ms() + 2_000);
        let next = self
            .state
            .next_timer()
            .map(|(_, due)| due)
            .into_iter()
            .chain(resend)
            .min();
        let wake = match next {
            Some(at) => Wake::At(at),
            None if self.timer_user || !self.state.timers.is_empty() => Wake::Never,
            None => Wake::Keep,
        };
        async move {
            let epoch = if epoch > 0 {
                epoch
            } else {
                store.create(&id).await?
            };
            store.save_waking(&id, epoch, bytes, wake).await?;
            Ok(epoch)
        }
        .boxed()
    }

    fn checkpoint_bytes(&self) -> Vec<u8> {
        codec::encode(self.state.to_checkpoint(&*self.rt))
    }

    fn go_live(&mut self, epoch: u64, ctx: &mut Context<Self>) {
        self.epoch = epoch;
        self.phase = Phase::Live;
        self.last_saved = Instant::now();
        self.last_confirmed = Instant::now();
        metrics::gauge!("berth_sessions_live").increment(1.0);
        // Nobody attached yet: if nobody does, passivate like a detached session.
        self.schedule_passivation(ctx);
        self.timer_user = !self.state.timers.is_empty() || self.state.post.queued() > 0;
        self.schedule_timer(ctx);
        self.pump(ctx);
        self.index_user();
    }

    /// Keeps this actor's row in the host's user index: listed under its
    /// user while live, under none once it leaves service. Call it whenever
    /// the phase or `state.user` may have changed.
    fn index_user(&mut self) {
        let now = match self.phase {
            Phase::Live if !self.id.is_entity() => self.state.user.clone(),
            _ => None,
        };
        if now == self.indexed_user {
            return;
        }
        if let Some(old) = self.indexed_user.take() {
            self.host.users.remove(&old, &self.id);
        }
        if let Some(user) = &now {
            self.host.users.add(user, &self.id);
        }
        self.indexed_user = now;
    }

    /// Leaves service: answers everything still queued with `reason`, then stops.
    fn gone(&mut self, reason: AttachError, ctx: &mut Context<Self>) {
        if self.phase == Phase::Live {
            metrics::gauge!("berth_sessions_live").decrement(1.0);
        }
        self.phase = Phase::Gone(reason);
        self.index_user();
        self.host.remove(&self.id, self.gen);
        ctx.run_later(GONE_LINGER, |_, ctx| ctx.stop());
    }

    fn close_conn(&mut self, code: CloseCode, reason: &str) {
        if let Some(a) = self.conn.take() {
            a.conn.close(code, reason);
        }
    }

    fn superseded(&mut self, stored: u64, ctx: &mut Context<Self>) {
        tracing::warn!(session = %self.id, ours = self.epoch, stored, "checkpoint fenced: a newer activation owns this session; stopping");
        self.close_conn(CloseCode::Restart, "session moved: resume");
        self.gone(AttachError::Moved, ctx);
    }

    /// A sync-mode write under this epoch failed with `e` (not fenced): its
    /// outcome is unknown, so the actor doubts its memory until it has
    /// reloaded from the store (see `doubtful`). A session never stored has
    /// nothing to reload: its next write creates it, fenced if a create
    /// landed meanwhile.
    fn doubt(&mut self, e: &StoreError, ctx: &mut Context<Self>) {
        // Interval mode keeps acknowledged writes the store does not have
        // yet: a reload would drop them (its flush retries instead).
        let interval = self.host.cfg.durability == Durability::Interval;
        if interval || !self.stored() || self.doubtful || self.phase != Phase::Live {
            return;
        }
        tracing::info!(session = %self.id, epoch = self.epoch, error = %e, "checkpoint outcome unknown: re-activating from the store before the next write");
        metrics::counter!("berth_reloads_total").increment(1);
        self.doubtful = true;
        self.reload(ctx);
    }

    /// A write (a client's retry, a delivery) finds the actor doubtful:
    /// reload now rather than at the end of the backoff, so the retry after
    /// next finds the store's state as soon as the store answers again (the
    /// backoff alone added up to its 5 s to a Redis failover).
    fn reload_now(&mut self, ctx: &mut Context<Self>) {
        if !self.doubtful || self.reloading {
            return;
        }
        if let Some(h) = self.reload_timer.take() {
            ctx.cancel_future(h);
        }
        self.reload(ctx);
    }

    /// Re-activates this actor from the store: a new epoch and the stored
    /// state, then what that state has to send goes out. Retried with
    /// backoff (100 ms doubling to 5 s) while the store does not answer.
    fn reload(&mut self, ctx: &mut Context<Self>) {
        self.reload_timer = None;
        let fut = self.reactivation();
        ctx.spawn(
            fut.into_actor(self)
                .map(|res, act, ctx| act.reloaded(res, ctx)),
        );
    }

    /// The store call of a reload: first the stored epoch, unchanged (a
    /// newer activation elsewhere, say a handoff that raced the failed
    /// write, must not be fenced by this actor's reload), then the
    /// activation.
    fn reactivation(&mut self) -> futures_util::future::BoxFuture<'static, Reloaded> {
        use futures_util::FutureExt;
        self.reloading = true;
        let (store, id, ours) = (self.host.store.clone(), self.id.clone(), self.epoch);
        async move {
            match store.epoch(&id).await {
                Ok(stored) if stored > ours => Ok(Err(stored)),
                Ok(_) => store.activate(&id).await.map(Ok),
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    /// What came of a reload (see [`SessionActor::reload`]).
    fn reloaded(&mut self, res: Reloaded, ctx: &mut Context<Self>) {
        self.reloading = false;
        if self.phase != Phase::Live || !self.doubtful {
            return;
        }
        let ours = self.epoch;
        match res {
            // Another activation came first: this actor is stale.
            Ok(Err(stored)) => self.superseded(stored, ctx),
            // One came between the epoch check and the activation.
            Ok(Ok(Some(a))) if a.epoch > ours + 1 => self.superseded(a.epoch - 1, ctx),
            Ok(Ok(Some(a))) => {
                let decoded = codec::decode(&a.checkpoint)
                    .map_err(|e| e.to_string())
                    .and_then(|ck| SessionState::from_checkpoint(&*self.rt, ck));
                match decoded {
                    Ok(state) => {
                        tracing::info!(session = %self.id, epoch = a.epoch, version = state.version, "re-activated from the store");
                        self.state = state;
                        self.doubtful = false;
                        self.reload_fails = 0;
                        self.saved(a.epoch, ctx);
                    }
                    Err(e) => {
                        tracing::error!(session = %self.id, error = %e, "stored checkpoint is unreadable");
                        self.close_conn(CloseCode::Internal, "session unreadable");
                        self.gone(AttachError::Corrupt(e), ctx);
                    }
                }
            }
            // Deleted or expired meanwhile.
            Ok(Ok(None)) => {
                self.close_conn(CloseCode::SessionNotFound, "session not found");
                self.gone(AttachError::NotFound, ctx);
            }
            Err(e) => {
                self.reload_fails += 1;
                let wait = Duration::from_millis(100 << self.reload_fails.min(6)).min(MAX_RELOAD);
                tracing::debug!(session = %self.id, error = %e, ?wait, "re-activation failed; trying again");
                self.reload_timer = Some(ctx.run_later(wait, |act, ctx| act.reload(ctx)));
            }
        }
    }

    fn schedule_passivation(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.passivate_timer.take() {
            ctx.cancel_future(h);
        }
        let after = if self.stored() {
            self.host.cfg.detach_timeout
        } else {
            self.host.cfg.unwritten_detach_timeout
        };
        self.passivate_timer = Some(ctx.run_later(after, |act, ctx| {
            act.passivate_timer = None;
            if act.conn.is_none() && act.phase == Phase::Live {
                act.passivate(ctx);
            }
        }));
    }

    fn passivate(&mut self, ctx: &mut Context<Self>) {
        if self.state.post.queued() > 0 {
            // Messages still to deliver: stay live and keep sending.
            self.schedule_passivation(ctx);
            return;
        }
        if !self.stored() {
            // Never written: nothing in the store to keep, nothing to lose.
            tracing::debug!(session = %self.id, "passivated (never written)");
            self.gone(AttachError::NotFound, ctx);
            return;
        }
        let fut = self.write(self.checkpoint_bytes());
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok(_) => {
                tracing::debug!(session = %act.id, "passivated");
                act.gone(AttachError::NotFound, ctx);
            }
            Err(StoreError::Fenced { stored, .. }) => act.superseded(stored, ctx),
            Err(e) if act.unsaved_writes => {
                tracing::warn!(session = %act.id, error = %e, "final checkpoint failed; keeping the session live and retrying");
                act.passivate_timer = Some(ctx.run_later(RETRY_SAVE, |act, ctx| {
                    act.passivate_timer = None;
                    if act.conn.is_none() && act.phase == Phase::Live {
                        act.passivate(ctx);
                    }
                }));
            }
            Err(e) => {
                // Every acknowledged write is already durable; only acks are lost
                // (their events will be replayed and filtered by the client's ack).
                tracing::debug!(session = %act.id, error = %e, "final checkpoint failed; nothing acknowledged is lost");
                act.gone(AttachError::NotFound, ctx);
            }
        }));
    }

    /// Writes due events to the attached connection, and arms a timer for the
    /// next one that is not due yet.
    fn deliver(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.event_timer.take() {
            ctx.cancel_future(h);
        }
        let Some(att) = self.conn.as_mut() else {
            return;
        };
        let now = now_ms();
        for e in self.state.outbox.due_after(att.sent_upto, now) {
            let seq = e.seq;
            if !att.conn.send_event(e) {
                return;
            }
            att.sent_upto = seq;
        }
        if let Some(due) = self.state.outbox.next_due_after(att.sent_upto) {
            let wait = Duration::from_millis(due.saturating_sub(now).max(1));
            self.event_timer = Some(ctx.run_later(wait, |act, ctx| {
                act.event_timer = None;
                act.deliver(ctx);
            }));
        }
    }

    fn schedule_flush(&mut self, ctx: &mut Context<Self>, after: Duration) {
        if self.flush_timer.is_some() {
            return;
        }
        self.flush_timer = Some(ctx.run_later(after, |act, ctx| {
            act.flush_timer = None;
            act.flush(ctx);
        }));
    }

    /// Interval mode: writes the current state in the background.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if !self.unsaved_writes || self.phase != Phase::Live {
            return;
        }
        if self.flush_inflight {
            // One write per session in flight, so checkpoints land in order.
            self.schedule_flush(ctx, self.host.cfg.checkpoint_interval);
            return;
        }
        self.flush_inflight = true;
        self.unsaved_writes = false;
        let fut = self.write(self.checkpoint_bytes());
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok(epoch) => {
                act.epoch = epoch;
                act.flush_inflight = false;
                act.flush_failing = false;
                act.pump(ctx);
                act.last_saved = Instant::now();
                if !act.unsaved_writes {
                    act.dirty = false;
                }
            }
            Err(StoreError::Fenced { stored, .. }) => act.superseded(stored, ctx),
            Err(e) => {
                tracing::warn!(session = %act.id, error = %e, "interval checkpoint failed; refusing writes until one succeeds");
                act.flush_inflight = false;
                act.flush_failing = true;
                act.unsaved_writes = true;
                act.schedule_flush(ctx, RETRY_SAVE);
            }
        }));
    }

    fn unavailable(&self, id: u64, why: impl Into<String>) -> OpReply {
        OpReply::err(id, ErrorCode::Unavailable, why, self.state.version)
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
        let store = self.host.store.clone();
        let id = self.id.clone();
        match self.init.take() {
            Some(Init::New(hash)) => {
                self.state = SessionState::new(&*self.rt, hash);
                // A new session costs nothing in the store until its first
                // state-changing op (then it is created, takes its first
                // epoch, and is written before that op is answered): a flood
                // of anonymous hellos leaves no keys behind. The store must
                // answer, though: a node that could not write a session does
                // not start one.
                ctx.wait(
                    store
                        .ping()
                        .into_actor(self)
                        .map(|res, act, ctx| match res {
                            Ok(()) => act.go_live(0, ctx),
                            Err(e) => act.gone(AttachError::Unavailable(e.to_string()), ctx),
                        }),
                );
            }
            Some(Init::Refuse) => self.gone(AttachError::ShuttingDown, ctx),
            Some(Init::Resume) | None => {
                let fut = store.activate(&id);
                ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
                    Ok(Some(a)) => {
                        let decoded = codec::decode(&a.checkpoint)
                            .map_err(|e| e.to_string())
                            .and_then(|ck| SessionState::from_checkpoint(&*act.rt, ck));
                        match decoded {
                            Ok(state) => {
                                // Re-activation from the store: after passivation,
                                // a handoff or a failover.
                                metrics::counter!("berth_activations_total").increment(1);
                                act.state = state;
                                act.go_live(a.epoch, ctx);
                            }
                            Err(e) => {
                                tracing::error!(session = %act.id, error = %e, "stored checkpoint is unreadable");
                                act.gone(AttachError::Corrupt(e), ctx);
                            }
                        }
                    }
                    // An entity is made by the first message to it.
                    Ok(None) if act.id.is_entity() => act.go_live(0, ctx),
                    Ok(None) => act.gone(AttachError::NotFound, ctx),
                    Err(e) => act.gone(AttachError::Unavailable(e.to_string()), ctx),
                }));
            }
        }
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if self.phase == Phase::Live {
            metrics::gauge!("berth_sessions_live").decrement(1.0);
        }
        self.phase = Phase::Gone(AttachError::ShuttingDown);
        self.index_user();
        self.host.remove(&self.id, self.gen);
    }
}

impl SessionActor {
    /// Attaches `msg.conn` (token already checked) by the rules of
    /// [`Attach`]: answers the welcome and the connection's claim, replays events.
    fn attach_now(
        &mut self,
        msg: Attach,
        ctx: &mut Context<Self>,
    ) -> Result<(Welcome, Claim), AttachError> {
        if self
            .last_origin
            .is_some_and(|(o, attempt)| o == msg.origin && msg.attempt < attempt)
        {
            return Err(AttachError::Superseded);
        }
        let same_origin = self.conn.as_ref().is_some_and(|a| a.origin == msg.origin);
        let claim = match msg.reattach {
            Some(c) if same_origin => c,
            Some(c) => {
                let held = self.conn.as_ref().map(|a| a.claim);
                if held.into_iter().chain(self.newest).any(|n| c < n) {
                    return Err(AttachError::Superseded);
                }
                c
            }
            None => {
                self.hellos += 1;
                Claim {
                    epoch: self.epoch,
                    seq: self.hellos,
                }
            }
        };
        if let Some(old) = self.conn.take() {
            // Another handle of the same client connection is replaced quietly:
            // dropping it ends its forwarder, and its client hears nothing.
            if old.origin != msg.origin && old.conn.id() != msg.conn.id() {
                old.conn.close(
                    CloseCode::TakenOver,
                    "a newer connection took this session over",
                );
            }
        }
        self.newest = self.newest.max(Some(claim));
        self.last_origin = Some((msg.origin, msg.attempt));
        if let Some(h) = self.passivate_timer.take() {
            ctx.cancel_future(h);
        }
        if self.state.outbox.ack(msg.ack, now_ms()) {
            self.dirty = true;
        }
        let welcome = Welcome {
            session: self.id.to_string(),
            token: msg.token,
            resumed: !self.fresh,
            version: self.state.version,
            last_op: self.state.last_op,
            node: self.host.cfg.node_id.clone(),
        };
        self.fresh = false;
        self.conn = Some(Attached {
            conn: msg.conn,
            sent_upto: msg.ack.min(self.state.outbox.last_seq()),
            origin: msg.origin,
            claim,
        });
        self.index_user();
        self.deliver(ctx);
        Ok((welcome, claim))
    }

    /// Whether the epoch must be checked before serving: the lease ran out.
    fn lease_expired(&self) -> bool {
        // A session never written has no other activation to fear: one
        // can only be made from the store.
        !self.fresh && self.stored() && self.last_confirmed.elapsed() > self.host.cfg.lease
    }
}

impl Handler<Attach> for SessionActor {
    type Result = AtomicResponse<Self, Result<(Welcome, Claim), AttachError>>;

    fn handle(&mut self, msg: Attach, ctx: &mut Context<Self>) -> Self::Result {
        let now = |r| AtomicResponse::new(Box::pin(actix::fut::ready(r)));
        match &self.phase {
            Phase::Live => {}
            Phase::Gone(r) => return now(Err(r.clone())),
            Phase::Loading => {
                return now(Err(AttachError::Unavailable("session is loading".into())))
            }
        }
        if !self.state.token_hash.verify(&msg.token) {
            return now(Err(AttachError::BadToken));
        }
        if self.fresh {
            // The hello that created this session: nothing else can exist.
            // It binds the session to its user (written with the first
            // checkpoint, like the rest of a new session).
            self.state.user = msg.user.as_deref().map(Arc::from);
            return now(self.attach_now(msg, ctx));
        }
        if self.state.user.as_deref() != msg.user.as_deref() {
            // The same answer as a wrong resume token: the client learns
            // nothing about whose session it is.
            metrics::counter!("berth_auth_failures_total", "reason" => "subject").increment(1);
            tracing::debug!(session = %self.id, "attach refused: another user than the session's");
            return now(Err(AttachError::BadToken));
        }
        // Every other attach confirms the epoch first (one GET), lease or not:
        // during a handoff the new owner can activate while the old one's
        // lease is still fresh (views converge, not atomically), and a resume
        // that an edge with the older view sends to the old owner would
        // otherwise be welcomed with stale state. A session not written yet
        // may have a twin (a create retried at another node) that wrote
        // first: then this one is stale too. The same check covers an actor
        // that outlived a partition.
        let fut = self.host.store.epoch(&self.id);
        let attaching = msg.origin;
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(stored) if stored > act.epoch => {
                tracing::info!(session = %act.id, ours = act.epoch, stored, "a newer activation exists: re-activating from the store");
                if act.conn.as_ref().is_some_and(|a| a.origin == attaching) {
                    act.conn = None; // the connection that is attaching again: keep it open
                } else {
                    act.close_conn(CloseCode::Restart, "session moved: resume");
                }
                act.gone(AttachError::Moved, ctx);
                Err(AttachError::Moved)
            }
            Ok(_) => {
                act.last_confirmed = Instant::now();
                act.attach_now(msg, ctx)
            }
            Err(e) => Err(AttachError::Unavailable(e.to_string())),
        })))
    }
}

impl Handler<Op> for SessionActor {
    type Result = AtomicResponse<Self, Result<OpReply, NotHere>>;

    fn handle(&mut self, msg: Op, ctx: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.run_op(msg, ctx))
    }
}

impl Handler<QueuedOp> for SessionActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: QueuedOp, ctx: &mut Context<Self>) -> Self::Result {
        let QueuedOp { op, reply } = msg;
        AtomicResponse::new(Box::pin(self.run_op(op, ctx).map(move |r, _, _| {
            let _ = reply.send(r);
        })))
    }
}

/// Runs a handler future with a deadline, turning a panic into `internal`
/// and an overrun into `unavailable`: either way nothing is committed.
async fn guarded(
    fut: HandlerFuture,
    deadline: Duration,
    what: &'static str,
) -> Result<Effects, AppError> {
    use futures_util::FutureExt;
    match tokio::time::timeout(deadline, std::panic::AssertUnwindSafe(fut).catch_unwind()).await {
        Ok(Ok(r)) => r,
        Ok(Err(_panic)) => {
            metrics::counter!("berth_handler_failures_total", "kind" => what, "why" => "panic")
                .increment(1);
            Err(AppError::new(
                ErrorCode::Internal,
                "the handler panicked: nothing was applied",
            ))
        }
        Err(_) => {
            metrics::counter!("berth_handler_failures_total", "kind" => what, "why" => "deadline")
                .increment(1);
            Err(AppError::unavailable(format!(
                "the handler ran past its deadline of {} ms: nothing was applied, retry",
                deadline.as_millis()
            )))
        }
    }
}

/// An op's answer, ready now.
fn answered(r: OpReply) -> ResponseActFuture<SessionActor, Result<OpReply, NotHere>> {
    Box::pin(actix::fut::ready(Ok(r)))
}

/// A handler future after its first poll.
enum Started {
    /// It finished (most handlers never wait).
    Done(Result<Effects, AppError>),
    /// It waits for I/O: run it to the end under the deadline.
    Waiting(HandlerFuture),
}

/// Polls a handler future once, at once, with a no-op waker: a handler that
/// does not wait is done without a deadline timer or another future. One that
/// waits is polled again (with the real waker) by [`guarded`], which is all a
/// future asks of its caller.
fn poll_once(mut fut: HandlerFuture, what: &'static str) -> Started {
    use std::task::{Context, Poll, Waker};
    let mut cx = Context::from_waker(Waker::noop());
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(&mut cx))) {
        Ok(Poll::Ready(r)) => Started::Done(r),
        Ok(Poll::Pending) => Started::Waiting(fut),
        Err(_panic) => Started::Done(Err(panicked(what))),
    }
}

fn panicked(what: &'static str) -> AppError {
    metrics::counter!("berth_handler_failures_total", "kind" => what, "why" => "panic")
        .increment(1);
    AppError::new(
        ErrorCode::Internal,
        "the handler panicked: nothing was applied",
    )
}

/// Fire the earliest due timer (sent by the actor to itself, so a firing
/// waits its turn behind queued ops).
#[derive(Message)]
#[rtype(result = "()")]
struct FireTimer;

/// Most attempts of a failing timer handler before the firing is dropped.
const TIMER_ATTEMPTS: u32 = 5;

impl SessionActor {
    /// Applies one op (the body of [`Op`] and [`QueuedOp`]); the future holds
    /// the mailbox while the handler runs and until the op's checkpoint is
    /// confirmed.
    fn run_op(
        &mut self,
        msg: Op,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<OpReply, NotHere>> {
        if self.phase != Phase::Live {
            return Box::pin(actix::fut::ready(Err(NotHere)));
        }
        if self.doubtful && !self.reloading {
            // Doubtful (see `doubtful`): the op first tries the reload, so
            // the first one after the store is back is served, not answered
            // `unavailable` and left to the client's backoff. If the reload
            // fails, a read is answered from memory and a write `unavailable`.
            if let Some(h) = self.reload_timer.take() {
                ctx.cancel_future(h);
            }
            let fut = self.reactivation();
            return Box::pin(fut.into_actor(self).then(move |res, act, ctx| {
                act.reloaded(res, ctx);
                act.run_op_now(msg, ctx)
            }));
        }
        self.run_op_now(msg, ctx)
    }

    /// [`SessionActor::run_op`] without the reload.
    fn run_op_now(
        &mut self,
        msg: Op,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<OpReply, NotHere>> {
        if self.phase != Phase::Live {
            return Box::pin(actix::fut::ready(Err(NotHere)));
        }
        if self.conn.as_ref().map(|a| a.conn.id()) != Some(msg.conn_id) {
            return answered(
                self.unavailable(msg.id, "this connection no longer holds the session"),
            );
        }
        let retry = match self.state.begin(msg.id) {
            Begin::Answer(reply) => return answered(reply),
            Begin::Run { retry } => retry,
        };
        let limits = self.host.limits();
        let id = msg.id;
        let env = self
            .state
            .env(self.name.clone(), Invocation::Op(id), now_ms(), &limits);
        let fut = self.rt.clone().run_op(
            self.state.app_state(),
            env,
            self.state.timers.clone(),
            msg.op,
            msg.args,
        );
        let fut = match poll_once(fut, "op") {
            // The common case: a handler that does not wait commits at once,
            // with no deadline timer and no extra future.
            Started::Done(result) => return self.commit_op(id, retry, result, &limits, ctx),
            Started::Waiting(fut) => guarded(fut, self.host.cfg.handler_timeout, "op"),
        };
        Box::pin(fut.into_actor(self).then(move |result, act, ctx| {
            if act.phase != Phase::Live {
                return Box::pin(actix::fut::ready(Err(NotHere)))
                    as ResponseActFuture<Self, Result<OpReply, NotHere>>;
            }
            act.commit_op(id, retry, result, &limits, ctx)
        }))
    }

    /// Commits what op `id`'s handler did and makes it durable.
    fn commit_op(
        &mut self,
        id: u64,
        retry: bool,
        result: Result<Effects, AppError>,
        limits: &Limits,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<OpReply, NotHere>> {
        let interval = self.host.cfg.durability == Durability::Interval;
        if interval && self.flush_failing && result.as_ref().is_ok_and(|e| e.writes()) {
            return Box::pin(actix::fut::ready(Ok(
                self.unavailable(id, "checkpoint store unreachable: retry")
            )));
        }
        if self.doubtful && result.as_ref().is_ok_and(|e| e.writes()) {
            self.reload_now(ctx);
            return Box::pin(actix::fut::ready(Ok(self.unavailable(
                id,
                "the session is reloading from the store: retry with the same id",
            ))));
        }
        let outcome = self.state.commit_op(&*self.rt, id, retry, result, limits);
        self.after_commit(outcome, ctx)
    }

    /// Makes a committed op durable (per the durability mode) before its
    /// answer leaves; a read may refresh the lease or the store's time to live.
    fn after_commit(
        &mut self,
        outcome: Outcome,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<OpReply, NotHere>> {
        let interval = self.host.cfg.durability == Durability::Interval;
        let Some(undo) = outcome.undo else {
            let reply = outcome.reply;
            if self.lease_expired() && !interval {
                // A read after the lease ran out: confirm no newer activation
                // took the session over (a partition healing) before answering
                // from memory. If the store cannot say, the read is answered:
                // reads stay available while Redis is down.
                let fut = self.host.store.epoch(&self.id);
                return Box::pin(fut.into_actor(self).map(move |res, act, ctx| match res {
                    Ok(stored) if stored > act.epoch => {
                        tracing::info!(session = %act.id, ours = act.epoch, stored, "a newer activation exists: not answering from stale memory");
                        act.close_conn(CloseCode::Restart, "session moved: resume");
                        act.gone(AttachError::Moved, ctx);
                        Err(NotHere)
                    }
                    Ok(_) => {
                        act.last_confirmed = Instant::now();
                        Ok(reply)
                    }
                    Err(_) => Ok(reply),
                }));
            }
            // Reads keep a session alive in the store too: refresh its time to
            // live now and then.
            if !self.stored()
                || self.doubtful
                || self.last_saved.elapsed() <= self.host.cfg.touch_after
            {
                return answered(reply);
            }
            if interval {
                self.unsaved_writes = true;
                self.schedule_flush(ctx, Duration::ZERO);
                return answered(reply);
            }
            let fut = self.write(self.checkpoint_bytes());
            return Box::pin(fut.into_actor(self).map(move |res, act, ctx| {
                match res {
                    Ok(_) => {
                        act.dirty = false;
                        act.last_saved = Instant::now();
                    }
                    Err(StoreError::Fenced { stored, .. }) => act.superseded(stored, ctx),
                    Err(_) => {} // a read needs no checkpoint; the next write retries
                }
                Ok(reply)
            }));
        };
        if interval {
            self.dirty = true;
            self.unsaved_writes = true;
            self.schedule_flush(ctx, self.host.cfg.checkpoint_interval);
            self.deliver(ctx);
            self.schedule_timer(ctx);
            return answered(outcome.reply);
        }
        let reply = outcome.reply;
        let bytes = match outcome.app_bytes {
            Some(app) => codec::encode(self.state.to_checkpoint_with(&*self.rt, app)),
            None => self.checkpoint_bytes(),
        };
        let fut = self.write(bytes);
        Box::pin(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(epoch) => {
                act.saved(epoch, ctx);
                Ok(reply)
            }
            Err(StoreError::Fenced { stored, .. }) => {
                act.state.undo(undo);
                let r = act.unavailable(reply.id, "session moved: retry");
                act.superseded(stored, ctx);
                Ok(r)
            }
            Err(e) => {
                act.state.undo(undo);
                act.doubt(&e, ctx);
                Ok(act.unavailable(reply.id, format!("not applied, retry: {e}")))
            }
        }))
    }

    /// A checkpoint of everything committed in memory was written under
    /// `epoch`: the actor is clean and confirmed as the owner; what the
    /// commit released goes out (events to the client, the next timer,
    /// queued messages).
    fn saved(&mut self, epoch: u64, ctx: &mut Context<Self>) {
        self.epoch = epoch;
        self.dirty = false;
        self.last_saved = Instant::now();
        self.last_confirmed = self.last_saved;
        self.deliver(ctx);
        self.schedule_timer(ctx);
        self.pump(ctx);
    }

    /// Arms the wake-up for the earliest timer (after `timer_backoff` if its
    /// last firing failed).
    fn schedule_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.timer_handle.take() {
            ctx.cancel_future(h);
        }
        if self.phase != Phase::Live {
            return;
        }
        let Some((_, due)) = self.state.next_timer() else {
            return;
        };
        self.timer_user = true;
        let wait = Duration::from_millis(due.saturating_sub(now_ms())) + self.timer_backoff;
        self.timer_handle = Some(ctx.run_later(wait, |act, ctx| {
            act.timer_handle = None;
            ctx.notify(FireTimer);
        }));
    }

    /// A timer firing failed (handler, limits or checkpoint): try again later,
    /// or drop the firing after [`TIMER_ATTEMPTS`].
    fn timer_failed(&mut self, name: &str, due: u64, why: &str, ctx: &mut Context<Self>) {
        self.timer_attempts += 1;
        if self.timer_attempts >= TIMER_ATTEMPTS {
            tracing::warn!(session = %self.id, timer = name, why, attempts = self.timer_attempts, "timer handler keeps failing: dropping this firing");
            metrics::counter!("berth_timers_dropped_total").increment(1);
            // The firing is committed with no effects: the timer is gone.
            let nothing = Effects::none(now_ms());
            let limits = self.host.limits();
            let committed = (self.state.timers.get(name) == Some(&due))
                .then(|| {
                    self.state
                        .commit_timer(&*self.rt, name, due, nothing, &limits)
                })
                .and_then(Result::ok);
            if let Some((undo, bytes)) = committed {
                let bytes = codec::encode(self.state.to_checkpoint_with(&*self.rt, bytes));
                let fut = self.write(bytes);
                ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
                    match res {
                        Ok(epoch) => act.epoch = epoch,
                        Err(StoreError::Fenced { stored, .. }) => {
                            act.state.undo(undo);
                            act.superseded(stored, ctx);
                        }
                        Err(e) => {
                            act.state.undo(undo);
                            act.doubt(&e, ctx);
                        }
                    }
                    act.timer_attempts = 0;
                    act.timer_backoff = Duration::ZERO;
                    act.schedule_timer(ctx);
                }));
                return;
            }
            self.timer_attempts = 0;
            self.timer_backoff = Duration::ZERO;
        } else {
            tracing::info!(session = %self.id, timer = name, why, attempt = self.timer_attempts, "timer handler failed: trying again");
            self.timer_backoff = Duration::from_millis(500 << self.timer_attempts.min(6));
        }
        self.schedule_timer(ctx);
    }
}

impl Handler<FireTimer> for SessionActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: FireTimer, ctx: &mut Context<Self>) -> Self::Result {
        let nothing = || AtomicResponse::new(Box::pin(actix::fut::ready(())));
        if self.phase != Phase::Live {
            return nothing();
        }
        let now = now_ms();
        let Some((name, due)) = self.state.next_timer().map(|(n, d)| (n.to_owned(), d)) else {
            return nothing();
        };
        if due > now {
            self.schedule_timer(ctx); // moved later meanwhile
            return nothing();
        }
        if self.host.cfg.durability == Durability::Interval && self.flush_failing {
            self.timer_failed(&name, due, "checkpoint store unreachable", ctx);
            return nothing();
        }
        if self.doubtful {
            // Armed again when the reload is done.
            return nothing();
        }
        let limits = self.host.limits();
        let env = self.state.env(
            self.name.clone(),
            Invocation::Timer(name.clone(), due),
            now,
            &limits,
        );
        let fut = self.rt.clone().run_timer(
            self.state.app_state(),
            env,
            self.state.timers_without(&name),
            name.clone(),
        );
        let fut = guarded(fut, self.host.cfg.handler_timeout, "timer");
        AtomicResponse::new(Box::pin(fut.into_actor(self).then(
            move |result, act, ctx| {
                let committed = result
                    .and_then(|eff| act.state.commit_timer(&*act.rt, &name, due, eff, &limits));
                let (undo, bytes) = match committed {
                    Ok(c) => c,
                    Err(e) => {
                        act.timer_failed(&name, due, &e.to_string(), ctx);
                        return Box::pin(actix::fut::ready(())) as ResponseActFuture<Self, ()>;
                    }
                };
                let fired = move || {
                    metrics::counter!("berth_timers_fired_total").increment(1);
                    metrics::histogram!("berth_timer_lateness_seconds")
                        .record(now_ms().saturating_sub(due) as f64 / 1000.0);
                };
                if act.host.cfg.durability == Durability::Interval {
                    act.dirty = true;
                    act.unsaved_writes = true;
                    act.schedule_flush(ctx, act.host.cfg.checkpoint_interval);
                    fired();
                    act.timer_attempts = 0;
                    act.timer_backoff = Duration::ZERO;
                    act.deliver(ctx);
                    act.schedule_timer(ctx);
                    return Box::pin(actix::fut::ready(()));
                }
                let bytes = codec::encode(act.state.to_checkpoint_with(&*act.rt, bytes));
                let fut = act.write(bytes);
                Box::pin(fut.into_actor(act).map(move |res, act, ctx| match res {
                    Ok(epoch) => {
                        fired();
                        act.timer_attempts = 0;
                        act.timer_backoff = Duration::ZERO;
                        act.saved(epoch, ctx);
                    }
                    Err(StoreError::Fenced { stored, .. }) => {
                        act.state.undo(undo);
                        act.superseded(stored, ctx);
                    }
                    Err(e) => {
                        act.state.undo(undo);
                        act.doubt(&e, ctx);
                        act.timer_failed(&name, due, &e.to_string(), ctx);
                    }
                }))
            },
        )))
    }
}

impl Handler<Ack> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: Ack, _ctx: &mut Context<Self>) {
        let Some(att) = self.conn.as_mut().filter(|a| a.conn.id() == msg.conn_id) else {
            return;
        };
        // A client cannot have received what was never sent to it.
        let seq = msg.seq.min(att.sent_upto);
        if self.state.outbox.ack(seq, now_ms()) {
            self.dirty = true;
        }
    }
}

impl Handler<Detach> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: Detach, ctx: &mut Context<Self>) {
        if self.conn.as_ref().map(|a| a.conn.id()) == Some(msg.conn_id) {
            self.conn = None;
            if self.phase == Phase::Live {
                self.schedule_passivation(ctx);
            }
        }
    }
}

impl Handler<Bye> for SessionActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Bye, ctx: &mut Context<Self>) -> Self::Result {
        let attached = self.conn.as_ref().map(|a| a.conn.id()) == Some(msg.conn_id);
        if self.phase != Phase::Live || !attached {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        if !self.stored() {
            // Never written: there is nothing in the store to delete.
            self.close_conn(CloseCode::Normal, "bye");
            self.gone(AttachError::NotFound, ctx);
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let fut = self.host.store.delete(&self.id, self.epoch);
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            |res, act, ctx| match res {
                Ok(()) => {
                    act.close_conn(CloseCode::Normal, "bye");
                    act.gone(AttachError::NotFound, ctx);
                }
                Err(StoreError::Fenced { stored, .. }) => act.superseded(stored, ctx),
                Err(e) => {
                    tracing::warn!(session = %act.id, error = %e, "bye: delete failed");
                    act.close_conn(
                        CloseCode::Internal,
                        "could not end the session: resume and retry",
                    );
                }
            },
        )))
    }
}

impl SessionActor {
    /// Writes a final checkpoint, then runs `then` (tell or close the
    /// connection, leave service). Answers whether nothing acknowledged was
    /// left unsaved: a fenced write counts as saved (a newer owner has the
    /// session), and in sync mode every acknowledged write is already durable.
    fn final_checkpoint_then(
        &mut self,
        why: &'static str,
        then: impl FnOnce(&mut Self, &mut Context<Self>) + 'static,
    ) -> AtomicResponse<Self, bool> {
        if self.phase != Phase::Live {
            return AtomicResponse::new(Box::pin(actix::fut::ready(true)));
        }
        // A session never written is written now too (created in the store):
        // its client may come back to another node, or to this one after a
        // restart, within its detach timeout. Only passivation forgets an
        // unwritten session.
        let fut = self.write(self.checkpoint_bytes());
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |res, act, ctx| {
            let ok = match res {
                Ok(_) | Err(StoreError::Fenced { .. }) => true,
                Err(e) => {
                    tracing::warn!(session = %act.id, error = %e, unsaved_writes = act.unsaved_writes, "final checkpoint failed ({why})");
                    !act.unsaved_writes
                }
            };
            then(act, ctx);
            ok
        })))
    }
}

impl Handler<Release> for SessionActor {
    type Result = AtomicResponse<Self, bool>;

    fn handle(&mut self, _msg: Release, _ctx: &mut Context<Self>) -> Self::Result {
        self.final_checkpoint_then("handoff", |act, ctx| {
            if let Some(a) = act.conn.take() {
                a.conn.moved();
            }
            act.gone(AttachError::Moved, ctx);
        })
    }
}

impl Handler<Shutdown> for SessionActor {
    type Result = AtomicResponse<Self, bool>;

    fn handle(&mut self, msg: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        self.final_checkpoint_then("shutdown", move |act, ctx| {
            act.close_conn(msg.code, "node going away: resume");
            act.gone(AttachError::ShuttingDown, ctx);
        })
    }
}

/// Hand the queued message `seq` back to this actor's `on_undeliverable`
/// (sent by the actor to itself, so it waits its turn behind queued work).
#[derive(Message)]
#[rtype(result = "()")]
struct RunBounce {
    seq: u64,
    why: BounceReason,
}

impl SessionActor {
    /// Sends every destination with queued messages and no batch in flight
    /// its oldest messages (one batch in flight per destination).
    fn pump(&mut self, ctx: &mut Context<Self>) {
        // Called after every write: an actor that sends nothing pays one check.
        if self.state.post.queued() == 0
            || self.phase != Phase::Live
            || self.resend_timer.is_some()
            || self.doubtful
        {
            return;
        }
        for to in self.state.post.destinations() {
            self.pump_to(to, ctx);
        }
    }

    /// Sends `to` its oldest queued messages, unless a batch to it is in
    /// flight (after an acknowledgement only its destination is pumped: a
    /// fan-out to many receivers costs one batch per acknowledgement, not a
    /// pass over every destination).
    fn pump_to(&mut self, to: Address, ctx: &mut Context<Self>) {
        if self.phase != Phase::Live
            || self.resend_timer.is_some()
            || self.doubtful
            || self.inflight.contains(&to)
        {
            return;
        }
        let Some(postman) = self.host.postman() else {
            return;
        };
        let msgs: Vec<(u64, Value, u64)> = self
            .state
            .post
            .pending_for(&to, BATCH_MAX + self.bouncing.len())
            .into_iter()
            .take_while(|m| !self.bouncing.contains(&m.seq))
            .take(BATCH_MAX)
            .map(|m| (m.seq, m.body, m.at_ms))
            .collect();
        let Some(first) = msgs.first().map(|m| m.0) else {
            return;
        };
        self.inflight.insert(to.clone());
        let batch = Deliver {
            from: Sender::Actor(Address::of_actor(&self.id)),
            inc: self.state.post.inc(),
            msgs,
        };
        let fut = postman.deliver(to.clone(), batch);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.inflight.remove(&to);
            act.delivered(to, first, res, ctx);
        }));
    }

    /// What came of a batch to `to` whose first message was `first`.
    fn delivered(
        &mut self,
        to: Address,
        first: u64,
        res: Result<DeliverAck, DeliverError>,
        ctx: &mut Context<Self>,
    ) {
        if self.phase != Phase::Live {
            return;
        }
        match res {
            Ok(ack) => {
                let refused: HashSet<u64> = ack.refused.iter().map(|(s, _)| *s).collect();
                let now = now_ms();
                let done = self.state.post.ack_except(&to, ack.upto, &refused);
                if !done.is_empty() {
                    self.dirty = true;
                    metrics::counter!("berth_messages_delivered_total")
                        .increment(done.len() as u64);
                    for m in &done {
                        metrics::histogram!("berth_message_delivery_seconds")
                            .record(now.saturating_sub(m.at_ms) as f64 / 1000.0);
                    }
                }
                for (seq, err) in ack.refused {
                    self.bounce(seq, BounceReason::Refused(err), ctx);
                }
                if ack.upto < first || ack.stalled.is_some() {
                    self.resend_later(ctx);
                } else {
                    self.resend_fails = 0;
                    self.pump_to(to, ctx);
                }
            }
            Err(DeliverError::Gone) | Err(DeliverError::UnknownKind) => {
                let why = if matches!(res, Err(DeliverError::Gone)) {
                    BounceReason::Gone
                } else {
                    BounceReason::UnknownKind
                };
                for m in self.state.post.pending_for(&to, usize::MAX) {
                    self.bounce(m.seq, why.clone(), ctx);
                }
            }
            Err(DeliverError::Retry(why)) => {
                tracing::debug!(actor = %self.id, to = %to, why, "delivery failed; sending again later");
                self.resend_later(ctx);
            }
        }
    }

    /// Sends again after a backoff (100 ms, doubling, at most [`MAX_RESEND`]).
    fn resend_later(&mut self, ctx: &mut Context<Self>) {
        if self.resend_timer.is_some() {
            return;
        }
        self.resend_fails += 1;
        metrics::counter!("berth_messages_redelivered_total").increment(1);
        let wait = Duration::from_millis(100 << self.resend_fails.min(6)).min(MAX_RESEND);
        self.resend_timer = Some(ctx.run_later(wait, |act, ctx| {
            act.resend_timer = None;
            act.pump(ctx);
        }));
    }

    fn bounce(&mut self, seq: u64, why: BounceReason, ctx: &mut Context<Self>) {
        if self.bouncing.insert(seq) {
            metrics::counter!("berth_messages_undeliverable_total").increment(1);
            ctx.notify(RunBounce { seq, why });
        }
    }
}

impl Handler<RunBounce> for SessionActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: RunBounce, _ctx: &mut Context<Self>) -> Self::Result {
        let nothing = || AtomicResponse::new(Box::pin(actix::fut::ready(())));
        if self.phase != Phase::Live || self.doubtful {
            // Doubtful: the message is sent again after the reload, and
            // bounces again if it must.
            self.bouncing.remove(&msg.seq);
            return nothing();
        }
        let Some(m) = self.state.post.queued_msg(msg.seq).cloned() else {
            self.bouncing.remove(&msg.seq);
            return nothing();
        };
        let limits = self.host.limits();
        let now = now_ms();
        let env = self
            .state
            .env(self.name.clone(), Invocation::Bounce(msg.seq), now, &limits);
        let bounce = Bounce {
            to: m.to.clone(),
            message: m.body.clone(),
            why: msg.why.clone(),
        };
        let fut = self.rt.clone().run_bounce(
            self.state.app_state(),
            env,
            self.state.timers.clone(),
            bounce,
        );
        let fut = guarded(fut, self.host.cfg.handler_timeout, "bounce");
        let seq = msg.seq;
        AtomicResponse::new(Box::pin(fut.into_actor(self).then(
            move |result, act, _ctx| {
                let eff = result.unwrap_or_else(|e| {
                    // The bounce is dropped with its handler's effects: a
                    // handler that keeps failing must not hold the queue.
                    tracing::warn!(actor = %act.id, seq, error = %e, "on_undeliverable failed: the message is dropped");
                    crate::runtime::Effects::none(now)
                });
                let committed = act.state.commit_bounce(&*act.rt, seq, eff, &limits).or_else(|_| {
                    act.state
                        .commit_bounce(&*act.rt, seq, crate::runtime::Effects::none(now), &limits)
                });
                let Ok((undo, bytes)) = committed else {
                    act.bouncing.remove(&seq);
                    return Box::pin(actix::fut::ready(())) as ResponseActFuture<Self, ()>;
                };
                let bytes = codec::encode(act.state.to_checkpoint_with(&*act.rt, bytes));
                let fut = act.write(bytes);
                Box::pin(fut.into_actor(act).map(move |res, act, ctx| {
                    act.bouncing.remove(&seq);
                    match res {
                        Ok(epoch) => act.saved(epoch, ctx),
                        Err(StoreError::Fenced { stored, .. }) => {
                            act.state.undo(undo);
                            act.superseded(stored, ctx);
                        }
                        Err(e) => {
                            act.state.undo(undo);
                            act.doubt(&e, ctx);
                            let why = msg.why;
                            ctx.run_later(RETRY_SAVE, move |act, ctx| act.bounce(seq, why, ctx));
                        }
                    }
                }))
            },
        )))
    }
}

impl Handler<Deliver> for SessionActor {
    type Result = AtomicResponse<Self, Result<DeliverAck, DeliverError>>;

    /// Applies the batch's new messages in order, each handler committed in
    /// memory with its watermark, then one checkpoint for all of them before
    /// the acknowledgement. A handler that waits on I/O is run alone (first
    /// in its batch), under the deadline; behind others, it is left for the
    /// next batch.
    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) -> Self::Result {
        let now_r = |r| AtomicResponse::new(Box::pin(actix::fut::ready(r)));
        match &self.phase {
            Phase::Live => {}
            Phase::Gone(AttachError::NotFound) if !self.id.is_entity() => {
                return now_r(Err(DeliverError::Gone))
            }
            Phase::Gone(r) => return now_r(Err(DeliverError::Retry(r.to_string()))),
            Phase::Loading => return now_r(Err(DeliverError::Retry("loading".into()))),
        }
        if self.doubtful {
            self.reload_now(ctx);
            return now_r(Err(DeliverError::Retry("reloading from the store".into())));
        }
        let Deliver { from, inc, msgs } = msg;
        let limits = self.host.limits();
        let now = now_ms();
        let mut ack = DeliverAck::default();
        let mut applied: Vec<(u64, Delivered)> = Vec::new();
        for (seq, body, _at_ms) in msgs {
            if self.state.seen(&from, inc, seq) == Seen::Duplicate {
                metrics::counter!("berth_messages_duplicates_total").increment(1);
                ack.upto = seq;
                continue;
            }
            let id = MsgId {
                from: from.clone(),
                inc,
                seq,
            };
            let env = self.state.env(
                self.name.clone(),
                Invocation::Message(from.clone(), inc, seq),
                now,
                &limits,
            );
            let fut = self.rt.clone().run_message(
                self.state.app_state(),
                env,
                self.state.timers.clone(),
                from.clone(),
                body,
            );
            match poll_once(fut, "message") {
                Started::Done(result) => {
                    match self
                        .state
                        .commit_message(&*self.rt, &id, result, now, &limits)
                    {
                        Ok(d) => applied.push((seq, d)),
                        Err(e) => {
                            ack.stalled = Some(e.to_string());
                            break;
                        }
                    }
                }
                Started::Waiting(fut) if applied.is_empty() => {
                    let fut = guarded(fut, self.host.cfg.handler_timeout, "message");
                    return AtomicResponse::new(Box::pin(fut.into_actor(self).then(
                        move |result, act, ctx| {
                            if act.phase != Phase::Live {
                                return Box::pin(actix::fut::ready(Err(DeliverError::Retry(
                                    "moved".into(),
                                ))))
                                    as ResponseActFuture<Self, Result<DeliverAck, DeliverError>>;
                            }
                            let mut applied = Vec::new();
                            match act
                                .state
                                .commit_message(&*act.rt, &id, result, now, &limits)
                            {
                                Ok(d) => applied.push((seq, d)),
                                Err(e) => ack.stalled = Some(e.to_string()),
                            }
                            act.checkpoint_messages(applied, ack, ctx)
                        },
                    )));
                }
                // A handler that waits, behind others: the next batch runs it
                // (dropped after one poll: an outside call it began may run
                // again, as docs/applications.md says of any handler).
                Started::Waiting(_) => break,
            }
        }
        AtomicResponse::new(self.checkpoint_messages(applied, ack, ctx))
    }
}

impl SessionActor {
    /// Makes the messages committed in memory durable, in one checkpoint,
    /// before their acknowledgement leaves (whatever the durability mode: an
    /// acknowledged message is never applied twice). A failed checkpoint
    /// takes them all back.
    fn checkpoint_messages(
        &mut self,
        mut applied: Vec<(u64, Delivered)>,
        mut ack: DeliverAck,
        _ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<DeliverAck, DeliverError>> {
        let Some((_, last)) = applied.last_mut() else {
            return Box::pin(actix::fut::ready(Ok(ack)));
        };
        let app_bytes = std::mem::take(&mut last.app_bytes);
        let bytes = codec::encode(self.state.to_checkpoint_with(&*self.rt, app_bytes));
        let fut = self.write(bytes);
        Box::pin(fut.into_actor(self).map(move |res, act, ctx| {
            let take_back = |act: &mut Self, applied: Vec<(u64, Delivered)>| {
                for (_, d) in applied.into_iter().rev() {
                    act.state.undo(d.undo);
                }
            };
            match res {
                Ok(epoch) => {
                    for (seq, d) in applied {
                        ack.upto = seq;
                        if let Some(e) = d.refused {
                            metrics::counter!("berth_messages_refused_total").increment(1);
                            ack.refused.push((seq, e));
                        }
                    }
                    act.saved(epoch, ctx);
                    Ok(ack)
                }
                Err(StoreError::Fenced { stored, .. }) => {
                    take_back(act, applied);
                    act.superseded(stored, ctx);
                    Err(DeliverError::Retry("the actor moved".into()))
                }
                Err(e) => {
                    take_back(act, applied);
                    act.doubt(&e, ctx);
                    ack.stalled = Some(format!("not applied: {e}"));
                    Ok(ack)
                }
            }
        }))
    }
}

/// What a live actor says of itself (the backend API's status question).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveStatus {
    /// The state's version (one more per committed state change).
    pub version: u64,
    /// The activation's epoch (0: a session not written to the store yet).
    pub epoch: u64,
}

/// Asks a live actor for its [`LiveStatus`]; `None` when it is not in
/// service (loading, or leaving).
#[derive(Message)]
#[rtype(result = "Option<LiveStatus>")]
pub struct Status;

impl Handler<Status> for SessionActor {
    type Result = Option<LiveStatus>;

    fn handle(&mut self, _msg: Status, _ctx: &mut Context<Self>) -> Option<LiveStatus> {
        (self.phase == Phase::Live).then_some(LiveStatus {
            version: self.state.version,
            epoch: self.epoch,
        })
    }
}

/// End the session from the backend (the API's `DELETE`): as its client's
/// `bye` does, the checkpoint is deleted (fenced by the epoch, the epoch
/// left as a tombstone), but the client is closed with 4004 (session
/// ended: start a new one) and no attached connection is needed.
#[derive(Message)]
#[rtype(result = "Result<(), EndError>")]
pub struct End;

/// Why a session could not be ended.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EndError {
    /// There is no such session (never existed, expired, or ended already).
    #[error("the session ended or does not exist")]
    Gone,
    /// Not now (moving, loading, store down): try again.
    #[error("not ended, try again: {0}")]
    Retry(String),
}

impl Handler<End> for SessionActor {
    type Result = AtomicResponse<Self, Result<(), EndError>>;

    fn handle(&mut self, _msg: End, ctx: &mut Context<Self>) -> Self::Result {
        let now = |r| AtomicResponse::new(Box::pin(actix::fut::ready(r)));
        match &self.phase {
            _ if self.id.is_entity() => return now(Err(EndError::Gone)),
            Phase::Live => {}
            Phase::Gone(AttachError::NotFound) => return now(Err(EndError::Gone)),
            Phase::Gone(r) => return now(Err(EndError::Retry(r.to_string()))),
            Phase::Loading => return now(Err(EndError::Retry("loading".into()))),
        }
        const WHY: &str = "the session was ended by the backend";
        if !self.stored() {
            // Never written: there is nothing in the store to delete.
            self.close_conn(CloseCode::SessionNotFound, WHY);
            self.gone(AttachError::NotFound, ctx);
            return now(Ok(()));
        }
        let fut = self.host.store.delete(&self.id, self.epoch);
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            |res, act, ctx| match res {
                Ok(()) => {
                    act.close_conn(CloseCode::SessionNotFound, WHY);
                    act.gone(AttachError::NotFound, ctx);
                    Ok(())
                }
                Err(StoreError::Fenced { stored, .. }) => {
                    act.superseded(stored, ctx);
                    Err(EndError::Retry("the session moved".into()))
                }
                Err(e) => Err(EndError::Retry(e.to_string())),
            },
        )))
    }
}
