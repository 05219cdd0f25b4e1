//! berth-loadtest: a load-test harness that plays real mobile clients against
//! berth, measures latency without coordinated omission, and proves session by
//! session that nothing acknowledged was lost or applied twice — also while
//! nodes are killed, added and drained.
//!
//! # Layout
//! - [`client`]: a well-behaved mobile client (resume, backoff, retries with the same id).
//! - [`chat`]: the `chat` scenario (berth's chat example): users, rooms,
//!   signed credentials, and the verifier of every message's deliveries.
//! - [`run`]: scenarios, closed and open models, verification, per-second series.
//! - [`local`]: a real local cluster (Redis, Consul, N berth nodes) and chaos events.
//! - [`ceiling`]: a minimal actix-ws server, the raw WebSocket ceiling for ratios.
//! - [`result`]: the run's data model (the `--json` contract).
//! - [`report`]: summary table, JSON, self-contained HTML report.
//! - [`threshold`]: `--threshold` expressions, k6 style.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ceiling;
pub mod chat;
pub mod client;
pub mod local;
pub mod report;
pub mod result;
pub mod run;
pub mod threshold;
