//! berth's cluster layer: who the members are, and which member owns which
//! session.
//!
//! This crate never touches a WebSocket or a session's state: it answers
//! "which node owns session X now?" ([`routing`]), tells the binary when the
//! answer changes, and carries opaque bodies between nodes ([`peer`],
//! [`pool`]). The binary (`src/`) wires it to the edge and the host, and
//! gives the bodies their meaning.
//!
//! It starts no processes: the Consul agents its tests run against come from
//! `berth-testkit`, a dev-dependency. (`tls::dev`, behind the `dev-certs`
//! feature, is a throwaway CA for tests and `berth-loadtest local`.)
//!
//! # Layout
//! - [`consul`]: a small typed client of Consul's HTTP API (registration, TTL
//!   check, blocking health queries).
//! - [`membership`]: the member view, from Consul or a static list, with the
//!   last known view kept on errors.
//! - [`peer`]: authenticated, multiplexed node-to-node links, with the ring
//!   contract checked in their handshake.
//! - [`pool`]: one link per member, dialled on demand, with a per-member dial
//!   gate and a backoff after a failed dial.
//! - [`ring`]: the consistent-hash ring, a pure function of the member set.
//! - [`routing`]: this node's ownership: the view and its ring, published
//!   together, and the leaving and isolated states that take this node out.
//! - [`tls`]: TLS for peer links (a cluster CA, mutual verification).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod consul;
pub mod membership;
pub mod peer;
pub mod pool;
pub mod ring;
pub mod routing;
pub mod tls;
