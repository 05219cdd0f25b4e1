//! One backend message to one actor, applied once per `Idempotency-Key`.
//!
//! The message goes as a one-message batch from `Sender::Backend(key)`,
//! incarnation [`INC`], sequence 1: the receiver applies it and records the
//! watermark `api:<key>` (seq 1) in the checkpoint that commits the
//! handler's effects, and answers only after that write. A second request
//! with the same key finds the watermark and is acknowledged without
//! running anything: however many times a backend retries (after a
//! timeout, a 503, a node's death), the receiver applies the message once.
//!
//! Transient failures (the owner unreachable or moving, the store down, a
//! handler answering `unavailable`) are retried here with a backoff, within
//! `api.retry_deadline_ms`; past it the answer is 503.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_actors::address::{Address, Sender};
use berth_actors::session::{Deliver, DeliverError};
use serde_json::Value;

use super::error::ApiError;
use crate::route::Router;

/// The incarnation of every backend sender: a key is one stream of one
/// message, so there is nothing to tell apart.
pub const INC: u64 = 1;
/// First wait before a retry; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Delivers `body` to `to` from the backend key `key`, retrying transient
/// failures until `deadline` has passed. `Ok` once the receiver committed
/// it (now or before).
pub async fn once(
    router: &Arc<Router>,
    to: &Address,
    key: &str,
    body: &Value,
    deadline: Duration,
) -> Result<(), ApiError> {
    let until = Instant::now() + deadline;
    let batch = Deliver {
        from: Sender::Backend(key.to_owned()),
        inc: INC,
        msgs: vec![(1, body.clone(), crate::api::now_ms())],
    };
    let mut wait = FIRST_BACKOFF;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let why =
            match tokio::time::timeout(left, router.api_deliver(to.clone(), batch.clone())).await {
                Err(_) => "the receiver's owner did not answer in time".to_owned(),
                Ok(Ok(ack)) => {
                    if let Some((_, e)) = ack.refused.into_iter().next() {
                        return Err(ApiError::Refused {
                            code: e.code.as_str().to_owned(),
                            message: e.message,
                        });
                    }
                    if ack.upto >= 1 {
                        return Ok(());
                    }
                    ack.stalled
                        .unwrap_or_else(|| "the receiver did not apply the message".into())
                }
                Ok(Err(DeliverError::Gone)) => return Err(ApiError::SessionNotFound),
                Ok(Err(DeliverError::UnknownKind)) => {
                    return Err(ApiError::UnknownKind(
                        to.kind().unwrap_or_default().to_owned(),
                    ))
                }
                Ok(Err(DeliverError::Retry(why))) => why,
            };
        if Instant::now() + wait >= until {
            return Err(ApiError::Unavailable(format!(
                "not delivered within api.retry_deadline_ms: {why}"
            )));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_BACKOFF);
    }
}
