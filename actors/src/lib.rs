//! Sessions for berth: one actor per live session, the wire protocol, the
//! application API, and the checkpoint stores that let a session outlive its
//! node.
//!
//! This crate knows nothing of WebSockets, Consul or the ring: the edge (the
//! `berth` binary) feeds it protocol messages, and the cluster layer decides
//! which node hosts which session.
//!
//! # Layout
//! - [`protocol`]: client <-> server message types, error codes, close codes.
//! - [`address`]: actor addresses (a session, or an entity `kind/key`) and
//!   message senders.
//! - [`ids`]: session ids and resume tokens (random, hashed, constant-time compare).
//! - [`app`]: the application API: the [`app::Session`] trait (typed state
//!   and ops, async handlers, timers) and the handler's [`app::Cx`].
//! - [`ops`]: decoding a client's `op`/`args` into an application's op type.
//! - [`runtime`]: the application, type-erased for the actor and the host.
//! - [`kv`]: the built-in `kv` application, written on [`app`].
//! - [`outbox`]: a session's unacknowledged events.
//! - [`mail`]: messages between actors: the outgoing queue and the senders' watermarks (exactly once, in order).
//! - [`state`]: [`state::SessionState`], the pure rules of a session (dedupe,
//!   versions, commits and their undo, size limits), tested without actix.
//! - [`codec`]: the versioned checkpoint envelope (bincode 2.0.1).
//! - [`store`]: the [`store::CheckpointStore`] trait, the Redis and in-memory stores.
//! - [`conn`]: the channel between a session actor and a client connection.
//! - [`shared`]: what every session actor of a node shares (application,
//!   store, settings, limits).
//! - [`session`]: the session actor (actix), a thin shell around `SessionState`:
//!   runs handlers one at a time with a deadline, commits, fires timers.
//! - [`host`]: the registry of live session actors on this node; wakes
//!   sessions whose timer is due.
//! - [`users`]: this node's live sessions by user (for the backend API).
//!
//! # Supervision tree
//! ```text
//! actix System (berth binary)
//! ├── Redis store batcher task ── ends when the last store handle is dropped
//! └── HTTP worker arbiters (one per core)
//!     ├── connection tasks (edge) ── one per WebSocket; detach from their actor on exit
//!     └── SessionActor, one per live session, started on the arbiter of the
//!         connection that activated it; registered in the Host
//! ```
//! Nobody restarts a session actor: its state is in its checkpoint, so an actor
//! that stops for any reason (passivation, fencing, shutdown, a panic that takes
//! its arbiter) is re-activated from the store by the next `hello` for it.
//! [`host::Host::shutdown`] stops them all: final checkpoint, close the client,
//! within a deadline.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod app;
pub mod codec;
pub mod conn;
pub mod host;
pub mod ids;
pub mod kv;
pub mod mail;
pub mod ops;
pub mod outbox;
pub mod protocol;
pub mod runtime;
pub mod session;
pub mod shared;
pub mod state;
pub mod store;
pub mod users;
