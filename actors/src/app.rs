//! The application API: what an application team writes to run its own
//! session logic on berth.
//!
//! An application is a type implementing [`Session`]: a typed state (serde,
//! with a schema version and a migration hook), typed ops decoded from the
//! client's `op`/`args`, and `async` handlers that get a [`Cx`]. The platform
//! guarantees, for every handler run (an op or a timer firing):
//! - **one at a time**: handlers of one session never interleave, even while
//!   one awaits I/O; other sessions keep running meanwhile;
//! - **all or nothing**: the state change, the events emitted and the timers
//!   set or cancelled are committed in one checkpoint before the answer leaves;
//!   a handler that returns an error, panics or overruns its deadline commits
//!   nothing (a panic answers `internal`, a deadline `unavailable`);
//! - **writes are detected**: a handler that did not take [`Cx::state_mut`],
//!   emit, or touch a timer writes no checkpoint.
//!
//! This module knows nothing of actix, sockets or stores: [`crate::runtime`]
//! adapts a [`Session`] to the session actor.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

pub use crate::address::{Address, Sender};
use crate::ops;
pub use crate::protocol::ErrorCode;

/// A failure answered to the client in a `result`.
#[derive(Debug, Clone, PartialEq)]
pub struct AppError {
    /// Protocol error code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

impl AppError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        AppError {
            code,
            message: message.into(),
        }
    }

    /// `bad_args` with a message: the op's arguments are wrong (the op id is
    /// consumed; a retry gets the same answer).
    pub fn bad_args(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadArgs, message)
    }

    /// `unavailable`: not applied, the client may retry with the same id (use
    /// it when an outside service the handler needs is down).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for AppError {}

/// Why a stored state could not be read by this build of the application.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The checkpoint was written by a newer schema version than this build
    /// knows: it is refused and left untouched (a rolling upgrade must not
    /// silently drop state).
    #[error("stored state has schema version {found}, newer than this build's {known}")]
    Newer {
        /// Version found in the checkpoint.
        found: u32,
        /// [`Session::STATE_VERSION`] of this build.
        known: u32,
    },
    /// The state (or the migration's result) does not decode.
    #[error("stored state (schema version {version}) does not decode: {reason}")]
    Decode {
        /// Version found in the checkpoint.
        version: u32,
        /// The decoder's message.
        reason: String,
    },
    /// The application's [`Session::migrate`] refused the old state.
    #[error("migrating stored state from schema version {from} failed: {reason}")]
    Migration {
        /// Version found in the checkpoint.
        from: u32,
        /// The migration's message.
        reason: String,
    },
}

/// The error a migration returns: anything that is an error.
pub type MigrateError = Box<dyn std::error::Error + Send + Sync>;

/// A session application: its state, its ops and its handlers.
///
/// Handlers are `async` and run on the session's worker thread (an actix
/// arbiter): their futures need not be `Send`, may await any I/O, and hold the
/// session exclusively until they return. See the module docs for the rules.
///
/// ```
/// use berth_actors::app::{AppError, Cx, Session};
/// use serde::{Deserialize, Serialize};
/// use serde_json::{json, Value};
///
/// /// A counter per session, with a reminder.
/// struct Counter;
///
/// #[derive(Clone, Default, Serialize, Deserialize)]
/// struct State {
///     count: i64,
/// }
///
/// #[derive(Deserialize)]
/// #[serde(rename_all = "snake_case")]
/// enum Op {
///     Add { by: i64 },
///     Get,
///     RemindIn { ms: u64 },
/// }
///
/// impl Session for Counter {
///     type State = State;
///     type Op = Op;
///     type Message = berth_actors::app::NoMessages;
///
///     async fn on_op(&self, cx: &mut Cx<State>, op: Op) -> Result<Value, AppError> {
///         match op {
///             Op::Add { by } => {
///                 cx.state_mut().count += by; // a write: checkpointed before the answer
///                 Ok(json!(cx.state().count))
///             }
///             Op::Get => Ok(json!(cx.state().count)), // a read: no checkpoint
///             Op::RemindIn { ms } => {
///                 cx.set_timer_in("remind", std::time::Duration::from_millis(ms))?;
///                 Ok(Value::Null)
///             }
///         }
///     }
///
///     async fn on_timer(&self, cx: &mut Cx<State>, _name: &str) -> Result<(), AppError> {
///         let count = cx.state().count;
///         cx.emit(json!({ "reminder": count }))?;
///         Ok(())
///     }
/// }
/// ```
#[allow(async_fn_in_trait)] // the futures run on one thread by design: no Send bound
pub trait Session: Send + Sync + Sized + 'static {
    /// One session's state. Stored as JSON (serde) in its checkpoint.
    type State: Serialize + DeserializeOwned + Clone + Default + Send + Sync + 'static;

    /// The ops a client may send, decoded from `{"op": name, "args": args}` by
    /// [`Session::decode_op`]: by default an externally tagged serde enum
    /// (`name` is the variant, `args` its content).
    type Op: DeserializeOwned + 'static;

    /// The messages other actors (and backends, through the backend API) may
    /// send this session, decoded with serde from the sender's JSON. A
    /// session that takes none says [`NoMessages`].
    type Message: DeserializeOwned + 'static;

    /// The schema version of [`Session::State`], stored with every checkpoint.
    /// Raise it when the state's layout changes, and teach
    /// [`Session::migrate`] the older versions.
    const STATE_VERSION: u32 = 1;

    /// Runs one op. Its `Ok` value is the `result`'s `value`; its `Err` is
    /// answered as the `result`'s error and commits nothing.
    async fn on_op(&self, cx: &mut Cx<Self::State>, op: Self::Op) -> Result<Value, AppError>;

    /// Runs when the timer `name` falls due (never before; once per setting:
    /// the firing is committed with the handler's effects). An error, panic or
    /// deadline overrun leaves the timer set: it is tried again a little later.
    async fn on_timer(&self, cx: &mut Cx<Self::State>, name: &str) -> Result<(), AppError> {
        let _ = (cx, name);
        Ok(())
    }

    /// Runs for a message from `from`: exactly once per committed send, in
    /// order per sender. Its effects and the message's receipt are committed
    /// together. A "not applied" error (`unavailable`, `rate_limited`,
    /// `internal`, a panic, a deadline overrun) commits nothing and the
    /// sender delivers the message again later; any other error consumes the
    /// message and is told to the sender's [`Session::on_undeliverable`].
    async fn on_message(
        &self,
        cx: &mut Cx<Self::State>,
        from: Sender,
        msg: Self::Message,
    ) -> Result<(), AppError> {
        let _ = (cx, from, msg);
        Err(AppError::new(
            ErrorCode::UnknownOp,
            "this actor takes no messages",
        ))
    }

    /// Runs when a message this session sent cannot be delivered: its
    /// receiver is a session that ended or expired, or it refused the
    /// message. Committed with the message's removal from the outgoing
    /// queue, so it runs once per message.
    async fn on_undeliverable(
        &self,
        cx: &mut Cx<Self::State>,
        bounce: Bounce,
    ) -> Result<(), AppError> {
        let _ = (cx, bounce);
        Ok(())
    }

    /// Turns a state stored by an older schema version (`from`, below
    /// [`Session::STATE_VERSION`]) into the current state. `old` is the stored
    /// state as JSON. The default refuses: an application that raises its
    /// version must migrate.
    fn migrate(&self, from: u32, old: Value) -> Result<Self::State, MigrateError> {
        let _ = old;
        Err(format!(
            "no migration from schema version {from} to {}",
            Self::STATE_VERSION
        )
        .into())
    }

    /// Decodes a client's op. The default decodes `{name: args}` as an
    /// externally tagged enum: a name that is no variant answers
    /// `unknown_op`, arguments that do not decode answer `bad_args` with
    /// serde's message (absent `args` are `null`; a unit variant also takes
    /// `{}`).
    fn decode_op(&self, name: &str, args: Value) -> Result<Self::Op, AppError> {
        ops::decode(name, args)
    }
}

/// An entity: a server-side actor addressed by `(kind, key)`, with no client
/// of its own. It is placed on the ring, checkpointed, passivated, handed off
/// and failed over exactly like a session, and made by the first message to
/// it. Register it with the server under its kind.
#[allow(async_fn_in_trait)] // the futures run on one thread by design: no Send bound
pub trait Entity: Send + Sync + Sized + 'static {
    /// One entity's state (a new entity starts from `Default`).
    type State: Serialize + DeserializeOwned + Clone + Default + Send + Sync + 'static;

    /// The messages it takes.
    type Message: DeserializeOwned + 'static;

    /// The schema version of [`Entity::State`].
    const STATE_VERSION: u32 = 1;

    /// Runs for a message; see [`Session::on_message`].
    async fn on_message(
        &self,
        cx: &mut Cx<Self::State>,
        from: Sender,
        msg: Self::Message,
    ) -> Result<(), AppError>;

    /// Runs when the timer `name` falls due; see [`Session::on_timer`].
    async fn on_timer(&self, cx: &mut Cx<Self::State>, name: &str) -> Result<(), AppError> {
        let _ = (cx, name);
        Ok(())
    }

    /// Runs when a message it sent cannot be delivered; see
    /// [`Session::on_undeliverable`].
    async fn on_undeliverable(
        &self,
        cx: &mut Cx<Self::State>,
        bounce: Bounce,
    ) -> Result<(), AppError> {
        let _ = (cx, bounce);
        Ok(())
    }

    /// Migrates an older stored state; see [`Session::migrate`].
    fn migrate(&self, from: u32, old: Value) -> Result<Self::State, MigrateError> {
        let _ = old;
        Err(format!(
            "no migration from schema version {from} to {}",
            Self::STATE_VERSION
        )
        .into())
    }
}

/// The message type of an actor that takes no messages: nothing decodes
/// into it, so every message to it is refused (`unknown_op`) and bounces to
/// its sender.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub enum NoMessages {}

/// A message that could not be delivered, handed back to its sender.
#[derive(Debug, Clone)]
pub struct Bounce {
    /// Where it was going.
    pub to: Address,
    /// The message, as sent.
    pub message: Value,
    /// Why it came back.
    pub why: BounceReason,
}

/// Why a message came back.
#[derive(Debug, Clone, PartialEq)]
pub enum BounceReason {
    /// The receiver is a session that ended, expired or never existed.
    Gone,
    /// The receiver is an entity of a kind this application did not register.
    UnknownKind,
    /// The receiver's handler refused it with this final error (or the
    /// message does not decode as the receiver's message type: `bad_args`).
    Refused(AppError),
}

/// What a handler may touch: the session's state, its client's events, its
/// timers. Everything done through it is committed together when the handler
/// returns `Ok`, or forgotten.
pub struct Cx<S> {
    base: Arc<S>,
    working: Option<S>,
    env: Env,
    events: Vec<(Value, u64)>,
    timers: Timers,
    timers_changed: bool,
    sends: Vec<(Address, Value)>,
}

/// What the session hands a handler besides its state (made by the session
/// actor; opaque to everyone else).
#[derive(Debug, Clone)]
pub struct Env {
    pub(crate) session: Arc<str>,
    pub(crate) user: Option<Arc<str>>,
    pub(crate) run: Invocation,
    pub(crate) out_room: usize,
    pub(crate) max_message_bytes: usize,
    pub(crate) now_ms: u64,
    pub(crate) next_seq: u64,
    pub(crate) outbox_len: usize,
    pub(crate) outbox_room: usize,
    pub(crate) max_delay_ms: u64,
    pub(crate) max_timers: usize,
}

/// What a handler run is for: its idempotency key is made from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// The op with this client op id.
    Op(u64),
    /// A firing of the timer with this name, due at this time.
    Timer(String, u64),
    /// The message from this sender, of this incarnation and sequence number.
    Message(Sender, u64, u64),
    /// The bounce of this actor's own message with this sequence number.
    Bounce(u64),
}

/// A session's timers: name -> due time (ms since the Unix epoch).
pub type Timers = BTreeMap<String, u64>;

/// Longest timer name, in bytes.
pub const MAX_TIMER_NAME: usize = 128;

impl<S: Clone> Cx<S> {
    pub(crate) fn new(base: Arc<S>, env: Env, timers: Timers) -> Self {
        Cx {
            base,
            working: None,
            env,
            events: Vec::new(),
            timers,
            timers_changed: false,
            sends: Vec::new(),
        }
    }

    /// The session's state as this handler sees it.
    pub fn state(&self) -> &S {
        self.working.as_ref().unwrap_or(&self.base)
    }

    /// The state, to change: taking it makes this handler a write (its
    /// changes are checkpointed before the answer). The first call copies
    /// the state; a handler that fails leaves the session's state untouched.
    pub fn state_mut(&mut self) -> &mut S {
        let base = &self.base;
        self.working.get_or_insert_with(|| S::clone(base))
    }

    /// Whether this handler has taken the state to change it.
    pub fn wrote_state(&self) -> bool {
        self.working.is_some()
    }

    /// The handler's effects: the changed state, the events, the timers if
    /// changed, the messages sent, and the time it ran at.
    pub(crate) fn into_parts(self) -> Parts<S> {
        let timers = self.timers_changed.then_some(self.timers);
        Parts {
            state: self.working,
            events: self.events,
            timers,
            sends: self.sends,
            now_ms: self.env.now_ms,
        }
    }

    /// Sends `msg` to the actor at `to`: delivered to its `on_message`
    /// exactly once, after this handler's commit, in order with this actor's
    /// other messages to `to`. Fails (and sends nothing) when the message
    /// does not encode, is larger than `limits.max_message_bytes`
    /// (`too_large`), or when this actor already holds
    /// `limits.max_outgoing` unacknowledged messages (`rate_limited`: the
    /// handler may give up, or return the error so the op is retried).
    pub fn send(&mut self, to: &Address, msg: &impl Serialize) -> Result<(), AppError> {
        let body = serde_json::to_value(msg).map_err(|e| {
            AppError::new(
                ErrorCode::Internal,
                format!("the message does not serialize: {e}"),
            )
        })?;
        let len = crate::outbox::body_len(&body);
        if len > self.env.max_message_bytes {
            return Err(AppError::new(
                ErrorCode::TooLarge,
                format!(
                    "the message is {len} bytes, over the limit of {}",
                    self.env.max_message_bytes
                ),
            ));
        }
        if self.sends.len() >= self.env.out_room {
            return Err(AppError::new(
                ErrorCode::RateLimited,
                "the outgoing queue is full (limits.max_outgoing unacknowledged messages): retry later",
            ));
        }
        self.sends.push((to.clone(), body));
        Ok(())
    }

    /// The authenticated user (the subject of the credential the session
    /// was created with), if any. Always `None` for an entity.
    pub fn user(&self) -> Option<&str> {
        self.env.user.as_deref()
    }

    /// This actor's address.
    pub fn address(&self) -> Address {
        Address::of_actor(&crate::ids::SessionId::from_checked(
            self.env.session.to_string(),
        ))
    }

    /// Schedules an event to the session's client now; returns its `seq`.
    /// Delivered after the commit, in `seq` order, until acknowledged.
    pub fn emit(&mut self, body: Value) -> Result<u64, AppError> {
        self.emit_in(body, Duration::ZERO)
    }

    /// Schedules an event `delay` from now; returns its `seq`. Events are
    /// delivered in `seq` order, so an event waits for every earlier one.
    /// Refused with `rate_limited` while the session holds its maximum of
    /// unacknowledged events, and with `bad_args` past the longest delay.
    pub fn emit_in(&mut self, body: Value, delay: Duration) -> Result<u64, AppError> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if delay_ms > self.env.max_delay_ms {
            return Err(AppError::bad_args(format!(
                "delay_ms must be at most {}",
                self.env.max_delay_ms
            )));
        }
        if self.events.len() >= self.env.outbox_room {
            return Err(AppError::new(
                ErrorCode::RateLimited,
                format!(
                    "the session holds {} unacknowledged events: ack some, then retry",
                    self.env.outbox_len + self.events.len()
                ),
            ));
        }
        self.events
            .push((body, self.env.now_ms.saturating_add(delay_ms)));
        Ok(self.env.next_seq + self.events.len() as u64 - 1)
    }

    /// Sets (or moves) the timer `name` to fire at `at`. Committed with the
    /// handler's other effects; survives passivation and failover.
    pub fn set_timer(&mut self, name: &str, at: SystemTime) -> Result<(), AppError> {
        let at_ms = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.set_timer_ms(name, at_ms)
    }

    /// Sets the timer `name` to fire `after` from now.
    pub fn set_timer_in(&mut self, name: &str, after: Duration) -> Result<(), AppError> {
        let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.set_timer_ms(name, self.env.now_ms.saturating_add(after_ms))
    }

    fn set_timer_ms(&mut self, name: &str, at_ms: u64) -> Result<(), AppError> {
        if name.is_empty() || name.len() > MAX_TIMER_NAME {
            return Err(AppError::bad_args(format!(
                "a timer name is 1 to {MAX_TIMER_NAME} bytes"
            )));
        }
        if !self.timers.contains_key(name) && self.timers.len() >= self.env.max_timers {
            return Err(AppError::new(
                ErrorCode::TooLarge,
                format!(
                    "the session has {} timers set, the most it may hold",
                    self.timers.len()
                ),
            ));
        }
        self.timers.insert(name.to_owned(), at_ms);
        self.timers_changed = true;
        Ok(())
    }

    /// Cancels the timer `name`; answers whether it was set.
    pub fn cancel_timer(&mut self, name: &str) -> bool {
        let was = self.timers.remove(name).is_some();
        self.timers_changed |= was;
        was
    }

    /// When the timer `name` is due, if it is set.
    pub fn timer(&self, name: &str) -> Option<SystemTime> {
        self.timers
            .get(name)
            .map(|ms| UNIX_EPOCH + Duration::from_millis(*ms))
    }

    /// The time this handler runs at, as the session sees it.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.env.now_ms)
    }

    /// [`Cx::now`] in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.env.now_ms
    }

    /// The session's id (for an entity: `kind/key`).
    pub fn session_id(&self) -> &str {
        &self.env.session
    }

    /// A key that is the same on every run of this op (session id and op id)
    /// or timer firing (session id, timer name and due time), and differs
    /// between them: give it to an outside service as its idempotency key.
    /// A handler's outside call can run again if the node dies before the
    /// handler's commit; berth cannot make someone else's API exactly once.
    pub fn idempotency_key(&self) -> String {
        let me = &self.env.session;
        match &self.env.run {
            Invocation::Op(id) => format!("{me}:op:{id}"),
            Invocation::Timer(name, due) => format!("{me}:timer:{name}:{due}"),
            Invocation::Message(from, inc, seq) => format!("{me}:msg:{from}:{inc}:{seq}"),
            Invocation::Bounce(seq) => format!("{me}:bounce:{seq}"),
        }
    }
}

/// A committed handler's effects, still typed.
pub(crate) struct Parts<S> {
    pub(crate) state: Option<S>,
    pub(crate) events: Vec<(Value, u64)>,
    pub(crate) timers: Option<Timers>,
    pub(crate) sends: Vec<(Address, Value)>,
    pub(crate) now_ms: u64,
}
