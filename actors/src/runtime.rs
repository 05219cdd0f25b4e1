//! The application, erased: what the session actor calls, whatever the
//! application's types are.
//!
//! [`Runtime`] is implemented once, for [`Typed`] (any [`Session`]); the actor,
//! the host and everything above them hold an `Arc<dyn Runtime>`, so no module
//! above this one names an application or carries its type parameters. States
//! travel as [`AnyState`] (an `Arc` of the application's state), which this
//! module alone downcasts.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::address::{Address, Sender};
use crate::app::{AppError, Bounce, Cx, Entity, Env, MigrateError, Session, StateError, Timers};
use crate::protocol::ErrorCode;

/// An application's state, type-erased.
pub type AnyState = Arc<dyn Any + Send + Sync>;

/// What a committed handler did.
pub struct Effects {
    /// The new state and its encoding, when the handler changed it.
    pub(crate) state: Option<(AnyState, Vec<u8>)>,
    /// Events to append to the outbox: body and due time.
    pub(crate) events: Vec<(Value, u64)>,
    /// The session's timers after the handler, when it changed them.
    pub(crate) timers: Option<Timers>,
    /// Messages sent, in order.
    pub(crate) sends: Vec<(Address, Value)>,
    /// When the handler ran (ms since the Unix epoch).
    pub(crate) now_ms: u64,
    /// The op's answer (`null` for a timer).
    pub(crate) reply: Value,
}

impl Effects {
    /// Whether anything must be checkpointed.
    pub(crate) fn writes(&self) -> bool {
        self.state.is_some()
            || !self.events.is_empty()
            || self.timers.is_some()
            || !self.sends.is_empty()
    }

    /// A handler run that did nothing.
    pub(crate) fn none(now_ms: u64) -> Self {
        Effects {
            state: None,
            events: Vec::new(),
            timers: None,
            sends: Vec::new(),
            now_ms,
            reply: Value::Null,
        }
    }
}

/// A handler run, boxed. Not `Send`: it runs on the session's arbiter.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Effects, AppError>>>>;

/// What the session actor needs of an application.
pub trait Runtime: Send + Sync + 'static {
    /// A new session's state.
    fn new_state(&self) -> AnyState;
    /// The application's [`Session::STATE_VERSION`].
    fn state_version(&self) -> u32;
    /// Encodes a state for its checkpoint.
    fn encode_state(&self, state: &AnyState) -> Vec<u8>;
    /// Decodes a stored state of schema `version`, migrating older ones.
    fn decode_state(&self, version: u32, bytes: &[u8]) -> Result<AnyState, StateError>;
    /// A bounded metric label for an op name: a known op as itself, else `"other"`.
    fn op_label(&self, op: &str) -> &'static str;
    #[doc(hidden)]
    fn run_op(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        op: String,
        args: Value,
    ) -> HandlerFuture;
    #[doc(hidden)]
    fn run_timer(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        name: String,
    ) -> HandlerFuture;
    #[doc(hidden)]
    fn run_message(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        from: Sender,
        body: Value,
    ) -> HandlerFuture;
    #[doc(hidden)]
    fn run_bounce(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        bounce: Bounce,
    ) -> HandlerFuture;
}

/// The typed state inside an [`AnyState`].
fn typed<S: Default + Send + Sync + 'static>(state: &AnyState) -> Arc<S> {
    match Arc::clone(state).downcast::<S>() {
        Ok(s) => s,
        // Every state an actor holds was made by its runtime.
        Err(_) => Arc::new(S::default()),
    }
}

/// A handler's context, ended: its effects, the state encoded.
fn finish<S: Serialize + Clone + Send + Sync + 'static>(
    cx: Cx<S>,
    reply: Value,
) -> Result<Effects, AppError> {
    let parts = cx.into_parts();
    let state = match parts.state {
        Some(s) => {
            let bytes = serde_json::to_vec(&s).map_err(|e| {
                AppError::new(
                    ErrorCode::Internal,
                    format!("the state does not serialize: {e}"),
                )
            })?;
            Some((Arc::new(s) as AnyState, bytes))
        }
        None => None,
    };
    Ok(Effects {
        state,
        events: parts.events,
        timers: parts.timers,
        sends: parts.sends,
        now_ms: parts.now_ms,
        reply,
    })
}

/// Decodes a stored state of schema `version` for a build at `known`,
/// migrating older ones with `migrate`.
fn decode_versioned<S: DeserializeOwned + Send + Sync + 'static>(
    version: u32,
    known: u32,
    bytes: &[u8],
    migrate: impl FnOnce(u32, Value) -> Result<S, MigrateError>,
) -> Result<AnyState, StateError> {
    if version > known {
        return Err(StateError::Newer {
            found: version,
            known,
        });
    }
    let decode_err = |e: serde_json::Error| StateError::Decode {
        version,
        reason: e.to_string(),
    };
    let state: S = if version == known {
        serde_json::from_slice(bytes).map_err(decode_err)?
    } else {
        let old: Value = serde_json::from_slice(bytes).map_err(decode_err)?;
        migrate(version, old).map_err(|e| StateError::Migration {
            from: version,
            reason: e.to_string(),
        })?
    };
    Ok(Arc::new(state))
}

/// A message's body as the receiver's type: a body that does not decode is
/// refused for good (`bad_args`), and bounces to its sender.
fn decode_message<M: DeserializeOwned>(body: Value) -> Result<M, AppError> {
    serde_json::from_value(body)
        .map_err(|e| AppError::bad_args(format!("the message does not decode: {e}")))
}

/// A [`Session`] as a [`Runtime`].
pub struct Typed<A: Session> {
    app: A,
    ops: &'static [&'static str],
}

impl<A: Session> Typed<A> {
    /// Wraps an application.
    pub fn new(app: A) -> Self {
        Typed {
            app,
            ops: crate::ops::names::<A::Op>().unwrap_or(&[]),
        }
    }

    fn state(state: &AnyState) -> Arc<A::State> {
        typed(state)
    }
}

impl<A: Session> Runtime for Typed<A> {
    fn new_state(&self) -> AnyState {
        Arc::new(A::State::default())
    }

    fn state_version(&self) -> u32 {
        A::STATE_VERSION
    }

    fn encode_state(&self, state: &AnyState) -> Vec<u8> {
        // Checked when the state was committed (`finish`): it serializes.
        serde_json::to_vec(&*Self::state(state)).unwrap_or_default()
    }

    fn decode_state(&self, version: u32, bytes: &[u8]) -> Result<AnyState, StateError> {
        decode_versioned(version, A::STATE_VERSION, bytes, |from, old| {
            self.app.migrate(from, old)
        })
    }

    fn op_label(&self, op: &str) -> &'static str {
        self.ops
            .iter()
            .find(|o| **o == op)
            .copied()
            .unwrap_or("other")
    }

    fn run_op(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        op: String,
        args: Value,
    ) -> HandlerFuture {
        Box::pin(async move {
            let op = self.app.decode_op(&op, args)?;
            let mut cx = Cx::new(Self::state(&state), env, timers);
            let reply = self.app.on_op(&mut cx, op).await?;
            finish(cx, reply)
        })
    }

    fn run_timer(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        name: String,
    ) -> HandlerFuture {
        Box::pin(async move {
            let mut cx = Cx::new(Self::state(&state), env, timers);
            self.app.on_timer(&mut cx, &name).await?;
            finish(cx, Value::Null)
        })
    }

    fn run_message(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        from: Sender,
        body: Value,
    ) -> HandlerFuture {
        Box::pin(async move {
            let msg = decode_message::<A::Message>(body)?;
            let mut cx = Cx::new(Self::state(&state), env, timers);
            self.app.on_message(&mut cx, from, msg).await?;
            finish(cx, Value::Null)
        })
    }

    fn run_bounce(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        bounce: Bounce,
    ) -> HandlerFuture {
        Box::pin(async move {
            let mut cx = Cx::new(Self::state(&state), env, timers);
            self.app.on_undeliverable(&mut cx, bounce).await?;
            finish(cx, Value::Null)
        })
    }
}

/// An [`Entity`] as a [`Runtime`] (it takes no ops).
pub struct TypedEntity<E: Entity> {
    app: E,
}

impl<E: Entity> TypedEntity<E> {
    /// Wraps an entity type.
    pub fn new(app: E) -> Self {
        TypedEntity { app }
    }
}

impl<E: Entity> Runtime for TypedEntity<E> {
    fn new_state(&self) -> AnyState {
        Arc::new(E::State::default())
    }

    fn state_version(&self) -> u32 {
        E::STATE_VERSION
    }

    fn encode_state(&self, state: &AnyState) -> Vec<u8> {
        serde_json::to_vec(&*typed::<E::State>(state)).unwrap_or_default()
    }

    fn decode_state(&self, version: u32, bytes: &[u8]) -> Result<AnyState, StateError> {
        decode_versioned(version, E::STATE_VERSION, bytes, |from, old| {
            self.app.migrate(from, old)
        })
    }

    fn op_label(&self, _op: &str) -> &'static str {
        "other"
    }

    fn run_op(
        self: Arc<Self>,
        _state: AnyState,
        _env: Env,
        _timers: Timers,
        _op: String,
        _args: Value,
    ) -> HandlerFuture {
        Box::pin(async {
            Err(AppError::new(
                ErrorCode::UnknownOp,
                "an entity takes no ops",
            ))
        })
    }

    fn run_timer(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        name: String,
    ) -> HandlerFuture {
        Box::pin(async move {
            let mut cx = Cx::new(typed::<E::State>(&state), env, timers);
            self.app.on_timer(&mut cx, &name).await?;
            finish(cx, Value::Null)
        })
    }

    fn run_message(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        from: Sender,
        body: Value,
    ) -> HandlerFuture {
        Box::pin(async move {
            let msg = decode_message::<E::Message>(body)?;
            let mut cx = Cx::new(typed::<E::State>(&state), env, timers);
            self.app.on_message(&mut cx, from, msg).await?;
            finish(cx, Value::Null)
        })
    }

    fn run_bounce(
        self: Arc<Self>,
        state: AnyState,
        env: Env,
        timers: Timers,
        bounce: Bounce,
    ) -> HandlerFuture {
        Box::pin(async move {
            let mut cx = Cx::new(typed::<E::State>(&state), env, timers);
            self.app.on_undeliverable(&mut cx, bounce).await?;
            finish(cx, Value::Null)
        })
    }
}
