//! A `consul agent -dev` on free loopback ports: one process that is a whole
//! Consul cluster, for the integration tests and `berth-loadtest local`. It
//! binds only 127.0.0.1, serves no DNS and no gRPC, and keeps its state in
//! memory; the caller owns the child and stops it.
//!
//! [`spawn_with_acl`] starts the same agent with ACLs enabled and a
//! default-deny policy, bootstrapped with a management token the caller picks.

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
    spawn_hcl(bin, log, None)
}

/// The ACL settings [`spawn_with_acl`] gives the agent (Consul 1.8 syntax:
/// the bootstrap token is `tokens.master`).
fn acl_hcl(master_token: &str) -> String {
    format!(
        "acl {{ enabled = true default_policy = \"deny\" enable_token_persistence = false tokens {{ master = \"{master_token}\" }} }}"
    )
}

/// Like [`spawn`], with ACLs enabled, `default_policy = "deny"` and
/// `master_token` as the management token (a call without a token may
/// write nothing, and its reads answer lists filtered to nothing). The token
/// must be a UUID or another string of letters, digits and `-`. The leader
/// creates the token a moment after it is elected: callers retry their first
/// ACL call.
pub fn spawn_with_acl(bin: &Path, log: Stdio, master_token: &str) -> std::io::Result<(Child, u16)> {
    let plain = !master_token.is_empty()
        && master_token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !plain {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the master token must be letters, digits and '-' (a UUID)",
        ));
    }
    spawn_hcl(bin, log, Some(&acl_hcl(master_token)))
}

fn spawn_hcl(bin: &Path, log: Stdio, hcl: Option<&str>) -> std::io::Result<(Child, u16)> {
    let http = free_port();
    let mut cmd = Command::new(bin);
    cmd.args([
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
    .args(["-server-port", &free_port().to_string()]);
    if let Some(hcl) = hcl {
        cmd.args(["-hcl", hcl]);
    }
    let child = cmd.stdout(Stdio::null()).stderr(log).spawn()?;
    Ok((child, http))
}
