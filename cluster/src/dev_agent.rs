//! A `consul agent -dev` on free loopback ports: one process that is a whole
//! Consul cluster, for the integration tests and `berth-loadtest local`. It
//! binds only 127.0.0.1, serves no DNS and no gRPC, and keeps its state in
//! memory; the caller owns the child and stops it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A port that was free a moment ago on 127.0.0.1 (0 if none could be bound).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Starts `bin agent -dev` with every port on a free loopback port; answers
/// the child and its HTTP port. Its log goes to `log`.
pub fn spawn(bin: &Path, log: Stdio) -> std::io::Result<(Child, u16)> {
    let http = free_port();
    let child = Command::new(bin)
        .args([
            "agent",
            "-dev",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
        ])
        .args(["-dns-port", "-1", "-grpc-port", "-1"])
        .args(["-http-port", &http.to_string()])
        .args(["-serf-lan-port", &free_port().to_string()])
        .args(["-serf-wan-port", &free_port().to_string()])
        .args(["-server-port", &free_port().to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok((child, http))
}
