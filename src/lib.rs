//! berth: a stateful session cluster for mobile clients, as a library.
//!
//! An application team writes its session logic as a [`Session`] (typed
//! state and ops, async handlers, durable timers) and runs it with
//! [`Server`]: every node of the cluster runs the same binary, holds each
//! session as one actor on exactly one node (consistent hashing over the live
//! members), checkpoints it before it acknowledges a change, and re-activates
//! it on another node when its owner dies. The `berth` binary is this
//! library running the built-in [`KvApp`]. docs/applications.md is the guide.
//!
//! ```no_run
//! use berth::{AppError, Cx, Server, Session};
//! use serde::{Deserialize, Serialize};
//! use serde_json::{json, Value};
//!
//! struct Notes;
//!
//! #[derive(Clone, Default, Serialize, Deserialize)]
//! struct State {
//!     notes: Vec<String>,
//! }
//!
//! #[derive(Deserialize)]
//! #[serde(rename_all = "snake_case")]
//! enum Op {
//!     Add { text: String },
//!     List,
//! }
//!
//! impl Session for Notes {
//!     type State = State;
//!     type Op = Op;
//!     type Message = berth::NoMessages;
//!
//!     async fn on_op(&self, cx: &mut Cx<State>, op: Op) -> Result<Value, AppError> {
//!         match op {
//!             Op::Add { text } => {
//!                 cx.state_mut().notes.push(text);
//!                 Ok(json!(cx.state().notes.len()))
//!             }
//!             Op::List => Ok(json!(cx.state().notes)),
//!         }
//!     }
//! }
//!
//! fn main() {
//!     Server::new(Notes).main()
//! }
//! ```
//!
//! This crate is the node's glue: it knows WebSockets (the edge), HTTP (the
//! admin endpoint), configuration and the process lifecycle. It does not know
//! any application: no module here names one (the built-in `kv` lives in
//! `berth-actors` and is only re-exported).
//!
//! # Layout
//! - [`server`]: [`Server`], the builder, and the node's lifecycle (start,
//!   readiness, SIGHUP reloads, the timer wake-up loop, drain, shutdown).
//! - `config`: configuration sections, sources and validation.
//! - `edge`: client WebSocket connections.
//! - `auth`: client credentials (the JWT of `hello.credential`), verified at
//!   the edge.
//! - `demo`: the application's page at `GET /` (the `kv` demo page) and the
//!   JavaScript client at `GET /berth.js`.
//! - `admin`: health, metrics, cluster view, drain.
//! - `dashboard`: the operator dashboard on the admin listener (`GET /`,
//!   `GET /dashboard.json`: every member's sample over the peer links).
//! - `api`: the backend HTTP API (`api.listen`): messages to sessions,
//!   entities and users, status, ending a session, with bearer keys.
//! - `admission`: per-source connection rate at the edge.
//! - `node`: state shared by the handlers.
//! - `route`: how a connection reaches its session's owner: the `Router`
//!   (handoff when the ring changes), `route::edge_side` (attach, ops, acks,
//!   detach and bye sent to an owner), `route::owner_side` (the proxies that
//!   serve other nodes' connections) and `route::wire` (the peer bodies).
//!   Placement and the link pool are `berth_cluster`'s (`routing`, `pool`).
//! - `isolation`: a node cut off from Consul (and its peers) excludes itself.
//! - `telemetry`: logs and metrics set-up.
//!
//! # Lifecycle
//! Start: bind both listeners (port 0 allowed), print one line
//! `berth listening public=ADDR admin=ADDR node=ID` on stdout, serve.
//! SIGHUP: reload the configuration; apply `[limits]` and `log.filter`, log
//! every other change as needing a restart. SIGINT/SIGTERM (or `POST /drain`,
//! which closes clients with 1012 instead of 1001): readiness turns 503, new
//! connections are refused, every live session is checkpointed and its client
//! closed, the listeners stop, the process exits, all within
//! `shutdown.deadline_ms`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod admission;
mod api;
mod auth;
mod config;
mod dashboard;
mod demo;
mod edge;
mod isolation;
mod node;
mod route;
pub mod server;
mod telemetry;

pub use berth_actors::address::{Address, AddressError, Sender};
pub use berth_actors::app::{
    AppError, Bounce, BounceReason, Cx, Entity, ErrorCode, MigrateError, NoMessages, Session,
    StateError,
};
pub use berth_actors::kv::KvApp;
pub use demo::KV_DEMO_PAGE;
pub use server::{Server, ServerError};
