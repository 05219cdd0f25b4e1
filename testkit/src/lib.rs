//! berth-testkit: the real processes berth is tested with, on free loopback
//! ports — `redis-server` (standalone, persistent, a primary with replicas
//! and Sentinels), Consul agents (a dev agent, with or without ACLs, or a
//! raft of three servers) and berth nodes (the `berth` binary or any
//! application binary built on the berth library) — each behind a guard that
//! kills its process (by its pid, through [`std::process::Child`]) when it
//! drops.
//!
//! It is used by the integration tests of the workspace's crates and by
//! `berth-loadtest local`. No production crate (berth, berth-actors,
//! berth-cluster) depends on it except as a dev-dependency.
//!
//! What it knows: processes, ports, where the binaries are, the line a node
//! prints on stdout once it listens (`berth listening public=ADDR admin=ADDR
//! node=ID peer=ADDR`), the `BERTH__*` settings that put a test node on
//! loopback ports, and the admin port's plain HTTP reads (`/metrics` as
//! Prometheus text, `/cluster` as JSON). What it must not know: the client
//! protocol (the tests' WebSocket client lives beside the tests), actix, or
//! any berth crate's types — it starts binaries, it never links them.
//!
//! Nothing here skips a test: a missing `redis-server` or `consul` panics (or,
//! in the fallible constructors, errs) with how to install it
//! (`scripts/install-deps.sh`). Every process it starts binds 127.0.0.1 only.
//!
//! # Layout
//! - [`bin`]: finding a binary next to the running executable, in the
//!   project's `.tools/bin` or on `PATH` ([`find_bin`], [`require_bin`]).
//! - [`net`]: [`free_port`], a minimal loopback HTTP/1.1 request ([`http`]),
//!   and [`WAIT`], the bound of a single wait.
//! - [`redis`]: [`Redis`] (standalone or persistent; stop, restart) and
//!   [`SentinelSet`] (a primary, two replicas, three Sentinels).
//! - [`consul`]: [`Consul`], a dev agent (plain or with ACLs) or one of a
//!   raft of three servers.
//! - [`node`]: [`Berth`], any berth node binary as a process (env, args, its
//!   listening line, captured log, signals, kill -9, exit), started directly
//!   or through a [`BerthCommand`].
//! - [`node_env`]: the `BERTH__*` environment of a test node ([`base_env`],
//!   [`env_with`], [`cluster_env`]).
//! - [`metrics`]: sums of samples in a Prometheus text exposition.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bin;
pub mod consul;
pub mod metrics;
pub mod net;
pub mod node;
pub mod node_env;
pub mod redis;

pub use bin::{find_bin, require_bin, MissingBin};
pub use consul::Consul;
pub use metrics::{metric_labeled, metric_sum};
pub use net::{free_port, http, WAIT};
pub use node::{Berth, BerthCommand, Listening};
pub use node_env::{base_env, cluster_env, env_with, SECRET};
pub use redis::{Redis, RedisOptions, SentinelSet};
