//! berth's integration tests: the real `berth` binary, a real `redis-server`
//! on free loopback ports, and a real WebSocket client.
//!
//! # Layout
//! - `common`: process guards (Redis, Consul, berth; from berth-testkit) and
//!   the test client.
//! - `protocol`: every message, error and close code of protocol.md.
//! - `durability`: kill -9, Redis outages, fencing between activations.
//! - `lifecycle`: configuration sources, SIGHUP, SIGTERM, drain.
//! - `abuse`: what one anonymous client can cost (session cap, lazy store,
//!   per-source connection rate, checkpoint bound).
//! - `cluster`, `loadtest`: several nodes, Consul, berth-loadtest.
//! - `messages`: messages between actors, exactly once, in order, across kills.
//! - `chat`: the chat example's page in headless Chromium (`browser`: the
//!   DevTools driver) against a three-node cluster.
//! - `dashboard`: the operator dashboard (admin `GET /`) in headless
//!   Chromium against a loaded three-node cluster, a member killed, a drain.
//! - `monitoring`: docker/prometheus (promtool checks and unit tests of the
//!   alerts) and docker/grafana: every metric they query is one berth
//!   registers.
//! - `api`: the backend HTTP API (keys, idempotency across a SIGKILL, every
//!   error answer, schemathesis against its OpenAPI document).
//! - `auth`: identity: `hello.credential` (JWT) verified at the edge, the
//!   session bound to its subject by its owner, on one node and across two.
//! - `js_client`: the JavaScript client (`clients/js`): its Node tests
//!   (`node --test`, real nodes) and the client in headless Chromium across a
//!   node kill and a reload.
//! - `app`: the application API (async handlers, all-or-nothing commits,
//!   deadlines, timers, state migrations) through `tests/apps/probe.rs`.

mod abuse;
mod api;
mod app;
mod auth;
mod browser;
mod chat;
mod cluster;
mod common;
mod dashboard;
mod durability;
mod js_client;
mod lifecycle;
mod loadtest;
mod messages;
mod monitoring;
mod protocol;
