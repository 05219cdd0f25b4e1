//! Consul agents on free loopback ports: a `consul agent -dev` (one process
//! that is a whole Consul cluster: in memory, no DNS, no gRPC), plain or with
//! ACLs, and a raft of three servers. Consul 1.8.7, the last open-source
//! line, is what `scripts/install-deps.sh` installs into `.tools/bin`.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bin::require_bin;
use crate::net::{free_port, http};

/// How long a dev agent may take to elect itself leader.
const DEV_LEADER_WAIT: Duration = Duration::from_secs(15);

/// A Consul agent on loopback ports; killed on drop.
pub struct Consul {
    child: Child,
    /// Its HTTP port on 127.0.0.1.
    pub http: u16,
    /// Its raft (server RPC) port: [`Consul::leader`] names the leader by it.
    pub server_port: u16,
    /// The data directory of a server of [`Consul::start_three`], removed on
    /// drop (a dev agent keeps its state in memory).
    dir: Option<PathBuf>,
}

/// The ACL settings of [`Consul::spawn_dev`] with a management token (Consul
/// 1.8 syntax: the bootstrap token is `tokens.master`).
fn acl_hcl(master_token: &str) -> String {
    format!(
        "acl {{ enabled = true default_policy = \"deny\" enable_token_persistence = false tokens {{ master = \"{master_token}\" }} }}"
    )
}

impl Consul {
    /// A dev agent (`consul` found by [`crate::find_bin`]) that has elected itself
    /// leader; panics when it cannot start.
    pub fn start() -> Consul {
        Self::start_dev(None)
    }

    /// A dev agent with ACLs enabled, `default_policy = "deny"` and
    /// `master_token` as the management token, elected leader; panics when
    /// it cannot start. The leader creates the token a moment after its
    /// election: callers retry their first ACL call.
    pub fn start_acl(master_token: &str) -> Consul {
        Self::start_dev(Some(master_token))
    }

    fn start_dev(master_token: Option<&str>) -> Consul {
        let bin = require_bin("consul");
        let mut why = String::new();
        // A port drawn free can still be taken before the agent binds it:
        // an agent that exits is started again on other ports.
        for attempt in 1..=3 {
            let log = std::env::temp_dir().join(format!(
                "berth-testkit-consul-{}-{attempt}-{}.log",
                std::process::id(),
                free_port()
            ));
            let file = std::fs::File::create(&log).expect("consul log file");
            let err = file.try_clone().expect("consul log file");
            let mut c = Self::spawn_dev_to(&bin, Stdio::from(file), Stdio::from(err), master_token)
                .expect("spawn consul agent -dev");
            let elected = c.wait_leader(DEV_LEADER_WAIT);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            if elected {
                return c;
            }
            let exited = c.child.try_wait().ok().flatten();
            c.kill();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            why = format!(
                "attempt {attempt}: {}; its log ends with:\n{}",
                exited.map_or("still running".to_owned(), |s| format!("exited ({s})")),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            if exited.is_none() {
                break; // running but leaderless: another start would not help
            }
        }
        panic!("consul did not elect itself leader: {why}");
    }

    /// Starts `bin agent -dev` with every port on a free loopback port and
    /// its log going to `log`; with `master_token`, ACLs are on as
    /// [`Consul::start_acl`] says (the token must be letters, digits and `-`,
    /// such as a UUID). Does not wait: see [`Consul::wait_leader`].
    pub fn spawn_dev(bin: &Path, log: Stdio, master_token: Option<&str>) -> io::Result<Consul> {
        Self::spawn_dev_to(bin, Stdio::null(), log, master_token)
    }

    /// [`Consul::spawn_dev`] with its stdout (where Consul logs) to `out`.
    fn spawn_dev_to(
        bin: &Path,
        out: Stdio,
        log: Stdio,
        master_token: Option<&str>,
    ) -> io::Result<Consul> {
        if let Some(token) = master_token {
            let plain = !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !plain {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the master token must be letters, digits and '-' (a UUID)",
                ));
            }
        }
        let (http, server_port) = (free_port(), free_port());
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
        .args(["-server-port", &server_port.to_string()]);
        if let Some(token) = master_token {
            cmd.args(["-hcl", &acl_hcl(token)]);
        }
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(log).spawn()?;
        Ok(Consul {
            child,
            http,
            server_port,
            dir: None,
        })
    }

    /// Three Consul servers (a raft of three, production raft timing) on
    /// loopback ports, each with a leader in its view; panics when they do
    /// not elect one within 30 s.
    pub fn start_three() -> Vec<Consul> {
        let bin = require_bin("consul");
        let lan: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for (i, port) in lan.iter().enumerate() {
            let http_port = free_port();
            let server_port = free_port();
            let dir = std::env::temp_dir().join(format!(
                "berth-testkit-consul-{}-{http_port}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut cmd = Command::new(&bin);
            cmd.args([
                "agent",
                "-server",
                "-bootstrap-expect",
                "3",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            // Production raft timing (multiplier 1): elections in about a second.
            .args(["-hcl", "performance { raft_multiplier = 1 }"])
            .args(["-node", &format!("consul-{i}")])
            .arg("-data-dir")
            .arg(&dir)
            .args(["-dns-port", "-1", "-grpc-port", "-1"])
            .args(["-http-port", &http_port.to_string()])
            .args(["-serf-lan-port", &port.to_string()])
            .args(["-serf-wan-port", &free_port().to_string()])
            .args(["-server-port", &server_port.to_string()]);
            for (j, other) in lan.iter().enumerate() {
                if j != i {
                    cmd.arg(format!("-retry-join=127.0.0.1:{other}"));
                }
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn consul server");
            servers.push(Consul {
                child,
                http: http_port,
                server_port,
                dir: Some(dir),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if servers.iter().all(|c| c.leader().is_some()) {
                return servers;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the three consul servers did not elect a leader");
    }

    /// Waits until this agent knows a leader; whether it did within `within`.
    pub fn wait_leader(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.leader().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// `http://127.0.0.1:PORT`, its HTTP API.
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// The raft port of the current leader, as this agent sees it.
    pub fn leader(&self) -> Option<u16> {
        let (status, body) = http(
            SocketAddr::from(([127, 0, 0, 1], self.http)),
            "GET",
            "/v1/status/leader",
            &[],
        );
        if status != 200 {
            return None;
        }
        body.rsplit("\"127.0.0.1:")
            .next()?
            .split('"')
            .next()?
            .parse()
            .ok()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (nothing if it has exited already).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.kill();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
