//! The application trait: what ops mean and how a session's state is stored.
//!
//! berth runs any [`Application`]; the built-in one is [`crate::kv::KvApp`]. An
//! application is pure: it changes its state in place and may schedule events
//! through [`OpCtx`], and never does I/O. Everything around it (ordering,
//! dedupe of retried ids, checkpoints, delivery) is the session's business.

use serde_json::Value;

use crate::protocol::ErrorCode;
use crate::state::Outbox;

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

    /// `bad_args` with a message.
    pub fn bad_args(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadArgs, message)
    }
}

/// What an op did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The value returned to the client.
    pub value: Value,
    /// Whether the op changed the state (or scheduled an event): only then is a
    /// checkpoint written before the answer.
    pub changed: bool,
}

impl Applied {
    /// A read: nothing changed.
    pub fn read(value: Value) -> Self {
        Applied {
            value,
            changed: false,
        }
    }

    /// A write.
    pub fn write(value: Value) -> Self {
        Applied {
            value,
            changed: true,
        }
    }
}

/// What an op may touch besides the application state.
pub struct OpCtx<'a> {
    pub(crate) outbox: &'a mut Outbox,
    pub(crate) now_ms: u64,
    pub(crate) outbox_max: usize,
    pub(crate) max_delay_ms: u64,
}

impl OpCtx<'_> {
    /// Schedules an event to this session, `delay_ms` from now; returns its `seq`.
    ///
    /// Events are delivered in `seq` order, so an event waits for every earlier
    /// one to fall due. Refused with `rate_limited` while the outbox holds its
    /// maximum of unacknowledged events (the client must `ack` first).
    pub fn emit(&mut self, body: Value, delay_ms: u64) -> Result<u64, AppError> {
        if delay_ms > self.max_delay_ms {
            return Err(AppError::bad_args(format!(
                "delay_ms must be at most {}",
                self.max_delay_ms
            )));
        }
        if self.outbox.len() >= self.outbox_max {
            return Err(AppError::new(
                ErrorCode::RateLimited,
                format!(
                    "the session holds {} unacknowledged events: ack some, then retry",
                    self.outbox.len()
                ),
            ));
        }
        Ok(self.outbox.push(body, self.now_ms.saturating_add(delay_ms)))
    }

    /// Milliseconds since the Unix epoch, as seen by this op.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }
}

/// An application: the meaning of ops and the encoding of state.
pub trait Application: Send + Sync + 'static {
    /// One session's state.
    type State: Clone + Default + Send + Unpin + 'static;

    /// Whether `op` never changes state. Reads skip the snapshot taken before an
    /// op and are never checkpointed.
    fn is_read_only(&self, op: &str) -> bool;

    /// Applies one op to `state`. On error the state must be left as it was.
    fn apply(
        &self,
        state: &mut Self::State,
        op: &str,
        args: &Value,
        ctx: &mut OpCtx<'_>,
    ) -> Result<Applied, AppError>;

    /// A bounded label for metrics: known op names as themselves, anything else
    /// as `"other"` (client-chosen names must not explode label cardinality).
    fn op_label(&self, op: &str) -> &'static str;

    /// Serializes the state for checkpoints; its length is what the state size
    /// limit measures.
    fn encode_state(&self, state: &Self::State) -> Vec<u8>;

    /// Reverses [`Application::encode_state`].
    fn decode_state(&self, bytes: &[u8]) -> Result<Self::State, String>;
}
