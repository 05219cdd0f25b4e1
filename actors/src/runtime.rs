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

use crate::app::{AppError, Cx, Env, Session, StateError, Timers};
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
    /// The op's answer (`null` for a timer).
    pub(crate) reply: Value,
}

impl Effects {
    /// Whether anything must be checkpointed.
    pub(crate) fn writes(&self) -> bool {
        self.state.is_some() || !self.events.is_empty() || self.timers.is_some()
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
        match Arc::clone(state).downcast::<A::State>() {
            Ok(s) => s,
            // Every state the actor holds was made by this runtime.
            Err(_) => Arc::new(A::State::default()),
        }
    }

    fn finish(cx: Cx<A::State>, reply: Value) -> Result<Effects, AppError> {
        let (state, events, timers) = cx.into_parts();
        let state = match state {
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
            events,
            timers,
            reply,
        })
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
        let known = A::STATE_VERSION;
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
        let state: A::State = if version == known {
            serde_json::from_slice(bytes).map_err(decode_err)?
        } else {
            let old: Value = serde_json::from_slice(bytes).map_err(decode_err)?;
            self.app
                .migrate(version, old)
                .map_err(|e| StateError::Migration {
                    from: version,
                    reason: e.to_string(),
                })?
        };
        Ok(Arc::new(state))
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
            Self::finish(cx, reply)
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
            Self::finish(cx, Value::Null)
        })
    }
}
