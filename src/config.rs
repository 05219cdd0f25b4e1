//! Configuration: one serde struct per section, a doc comment and a named
//! default on every field (garage's `util/config.rs` pattern).
//!
//! Sources, later winning: compiled defaults <- TOML file (`--config PATH`,
//! `BERTH_CONFIG`, else `config/berth.toml` when present) <- the same TOML
//! base64-encoded in `BERTH_CONFIG_BASE64` <- `BERTH__SECTION__KEY` environment
//! variables. A bad value stops start-up with a message naming the key and the
//! source it came from. `config/berth.toml` lists every key with its default,
//! and a test checks that it matches [`Config::default`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Environment variable naming the config file.
pub const ENV_FILE: &str = "BERTH_CONFIG";
/// Environment variable holding the config file's content, base64-encoded.
pub const ENV_BASE64: &str = "BERTH_CONFIG_BASE64";
/// Prefix of per-key environment variables (`BERTH__SERVER__LISTEN`).
pub const ENV_PREFIX: &str = "BERTH";
/// Config file read when present and no other is named.
pub const DEFAULT_FILE: &str = "config/berth.toml";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Public WebSocket endpoint.
    pub server: ServerConfig,
    /// Operator HTTP endpoint.
    pub admin: AdminConfig,
    /// Checkpoint store.
    pub store: StoreConfig,
    /// Session lifecycle.
    pub session: SessionConfig,
    /// Per-connection and per-session limits (reloaded on SIGHUP).
    pub limits: LimitsConfig,
    /// Cluster membership (used by the cluster layer; a node without it is a cluster of one).
    pub cluster: ClusterConfig,
    /// Client credentials: the JWT a `hello` may carry (src/auth.rs).
    pub auth: AuthConfig,
    /// Logging (the filter is reloaded on SIGHUP).
    pub log: LogConfig,
    /// Shutdown.
    pub shutdown: ShutdownConfig,
    /// Backend HTTP API (off unless `api.listen` is set).
    pub api: crate::api::ApiConfig,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the public endpoint: `/ws` and the demo page `/`.
    pub listen: String,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Largest accepted WebSocket frame (and message), in bytes; larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Server ping period, in ms; a connection silent for two periods is dropped.
    pub ping_interval_ms: u64,
    /// Allowed `Origin` values (exact match, e.g. `https://app.example.com`);
    /// empty allows any. Requests without an `Origin` (native apps) always pass.
    pub origins: Vec<String>,
    /// Most client connections at once; above it new ones are closed with 1013.
    pub max_connections: usize,
    /// Proxies (addresses or CIDR prefixes) whose `X-Forwarded-For` names a
    /// connection's source for `limits.connections_per_sec_per_source`; empty:
    /// the TCP peer is the source.
    pub trusted_proxies: Vec<String>,
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}
fn default_max_frame_bytes() -> usize {
    64 * 1024
}
fn default_ping_interval_ms() -> u64 {
    20_000
}
fn default_max_connections() -> usize {
    100_000
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            workers: 0,
            max_frame_bytes: default_max_frame_bytes(),
            ping_interval_ms: default_ping_interval_ms(),
            origins: Vec::new(),
            max_connections: default_max_connections(),
            trusted_proxies: Vec::new(),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the operator endpoint (health, metrics, cluster, drain). Keep it private.
    pub listen: String,
    /// Bearer token `POST /drain` needs when set; unset, only callers on
    /// loopback may drain (the reads stay open to the private network).
    pub drain_token: Option<String>,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            drain_token: None,
        }
    }
}

/// When a state change is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// After its checkpoint is written: nothing acknowledged is lost.
    Sync,
    /// At once; checkpoints every `checkpoint_interval_ms` (bounded loss window).
    Interval,
}

/// `[store]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Redis URL for checkpoints (`redis://host:port/db`). Unset: the in-memory
    /// store (single node only, not durable).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// A session expires from the store this many seconds after its last activity.
    pub session_ttl_s: u64,
    /// Longest wait for a store answer, in ms; past it the op answers `unavailable`.
    pub op_timeout_ms: u64,
    /// Most checkpoint writes in one pipelined batch.
    pub batch_max: usize,
    /// How long a batch that is not full waits for more writes, in microseconds
    /// (0: send at once; batches still grow under load).
    pub batch_delay_us: u64,
    /// Most checkpoint batches in flight at once.
    pub max_inflight_batches: usize,
    /// `sync` (checkpoint before ack) or `interval` (ack at once, checkpoint
    /// every `checkpoint_interval_ms`: a node loss loses up to that window).
    pub durability: DurabilityMode,
    /// Checkpoint period of `interval` durability, in ms.
    pub checkpoint_interval_ms: u64,
    /// How often readiness checks the store, in ms.
    pub health_interval_ms: u64,
    /// Replicas that must confirm each checkpoint batch (Redis `WAIT`) before
    /// its ops are acknowledged; 0 = do not wait. Set it to 1+ with a
    /// replicated Redis (Sentinel) so an acknowledged op survives a failover.
    pub wait_replicas: u32,
}

fn default_key_prefix() -> String {
    "berth".into()
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            redis_url: None,
            key_prefix: default_key_prefix(),
            session_ttl_s: 24 * 3600,
            op_timeout_ms: 2_000,
            batch_max: 256,
            batch_delay_us: 0,
            max_inflight_batches: 4,
            durability: DurabilityMode::Sync,
            checkpoint_interval_ms: 1_000,
            health_interval_ms: 1_000,
            wait_replicas: 0,
        }
    }
}

/// `[session]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// How long a session without a connection stays in memory, in seconds,
    /// before it is checkpointed and passivated.
    pub detach_timeout_s: u64,
    /// The same for a session that never ran a state-changing op (it is not
    /// in the store yet, so it is simply forgotten), in seconds.
    pub unwritten_detach_timeout_s: u64,
    /// Longest an application handler (an op or a timer firing) may run, in
    /// milliseconds: past it the op answers `unavailable` and nothing it did
    /// is committed.
    pub handler_timeout_ms: u64,
    /// How often the node looks for passivated sessions whose timer is due
    /// (one store query per period), in milliseconds: the extra lateness of a
    /// timer on a passivated session is at most about this.
    pub timer_scan_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            detach_timeout_s: 120,
            unwritten_detach_timeout_s: 10,
            handler_timeout_ms: 10_000,
            timer_scan_ms: 100,
        }
    }
}

/// `[limits]`: reloaded on SIGHUP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Frames per second a connection may send, sustained (token bucket); ops
    /// over it answer `rate_limited`.
    pub frames_per_sec: u32,
    /// Burst size of the frame bucket.
    pub frames_burst: u32,
    /// Ops of one connection in flight at once; past it the connection is not
    /// read until answers go out (TCP back-pressure).
    pub max_inflight_ops: usize,
    /// Largest encoded session state, in bytes; writes past it answer `too_large`.
    pub max_state_bytes: usize,
    /// Most unacknowledged events per session; `emit` past it answers `rate_limited`.
    pub outbox_max: usize,
    /// Longest `emit` delay, in ms.
    pub max_emit_delay_ms: u64,
    /// Largest checkpoint of a session (state, unacknowledged events, stored
    /// reply), in bytes; writes past it answer `too_large`.
    pub max_checkpoint_bytes: usize,
    /// Most timers one session may hold at once; setting one more answers
    /// `too_large`.
    pub max_timers: usize,
    /// Most unacknowledged outgoing messages one actor holds; a handler's
    /// `send` past it fails with `rate_limited`.
    pub max_outgoing: usize,
    /// Largest message between actors (JSON), in bytes; a larger `send`
    /// fails with `too_large`.
    pub max_message_bytes: usize,
    /// Most senders' watermarks one actor keeps (the exactly-once table);
    /// past it the least recently used are forgotten.
    pub max_watermarks: usize,
    /// Most live sessions on this node; past it new sessions are refused
    /// (`unavailable`, close 1013).
    pub max_live_sessions: usize,
    /// New connections per second from one source address, sustained; past
    /// it (and its burst) they are refused with HTTP 429. 0: no limit. Many
    /// phones can share one address (carrier NAT): keep it generous.
    pub connections_per_sec_per_source: u32,
    /// Burst of that limit.
    pub connections_burst_per_source: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            frames_per_sec: 500,
            frames_burst: 1000,
            max_inflight_ops: 64,
            max_state_bytes: 64 * 1024,
            outbox_max: 1000,
            max_emit_delay_ms: 24 * 3600 * 1000,
            max_checkpoint_bytes: 1024 * 1024,
            max_timers: 64,
            max_outgoing: 1000,
            max_message_bytes: 64 * 1024,
            max_watermarks: 10_000,
            max_live_sessions: 100_000,
            connections_per_sec_per_source: 1000,
            connections_burst_per_source: 2000,
        }
    }
}

/// `[cluster]`: read by the cluster layer (not in this build yet, except `node_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's member id; unset: `<host name>:<public port>`.
    pub node_id: Option<String>,
    /// Consul HTTP address (`http://127.0.0.1:8500`); unset: no Consul.
    pub consul_addr: Option<String>,
    /// Consul ACL token sent with every Consul call (`X-Consul-Token`); a
    /// secret, masked in `--print-config`. Unset: no token (the agent's
    /// anonymous token applies). Set this or `consul_token_file`, not both.
    pub consul_token: Option<String>,
    /// A file whose content (surrounding whitespace trimmed) is the Consul ACL
    /// token, read at start-up; a missing, unreadable or empty file stops
    /// start-up. Set this or `consul_token`, not both.
    pub consul_token_file: Option<PathBuf>,
    /// Consul service name.
    pub service: String,
    /// Node-to-node listener.
    pub peer_listen: String,
    /// Address other nodes use to reach this node's peer port; unset: derived.
    pub advertise: Option<String>,
    /// Shared secret that authenticates peer links (required when clustered).
    pub secret: Option<String>,
    /// More secrets accepted from peers (never sent): for rotating `secret`
    /// without a cluster-wide stop (docs/operations.md).
    pub accept_secrets: Vec<String>,
    /// TLS of peer links (`[cluster.tls]`); unset: plain TCP.
    pub tls: PeerTlsConfig,
    /// Static members, `id=host:peer_port` each, used when `consul_addr` is
    /// unset; empty (and no Consul) means a cluster of one.
    pub members: Vec<String>,
    /// Virtual nodes per member on the ring (every node must use the same value).
    pub vnodes: u32,
    /// TTL of this node's Consul check, in ms; a killed node leaves the ring
    /// about this long after its last pass.
    pub ttl_ms: u64,
    /// Readiness turns 503 after Consul has been failing this long, in ms (the
    /// last known members stay in use meanwhile).
    pub consul_grace_ms: u64,
    /// A node whose store has been unreachable this long, in ms, marks its
    /// Consul check critical and leaves the ring until the store answers
    /// again (its sessions move to nodes that can serve them). A node never
    /// joins before its store has answered once.
    pub unready_leave_ms: u64,
    /// How long a connection holds ops while its session moves to another
    /// owner, in ms; past it they answer `unavailable`.
    pub hold_ms: u64,
    /// Most ops a connection holds while its session moves.
    pub hold_max: usize,
    /// Deadline of one request to another node, in ms.
    pub peer_timeout_ms: u64,
    /// A new session gets an id this node owns on the ring, so it lives where
    /// its client connected and its ops take no peer hop. Off: ids are
    /// uniformly random and a new session lives wherever the ring puts it.
    pub new_sessions_local: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: None,
            consul_addr: None,
            consul_token: None,
            consul_token_file: None,
            service: "berth".into(),
            peer_listen: "0.0.0.0:7070".into(),
            advertise: None,
            secret: None,
            accept_secrets: Vec::new(),
            tls: PeerTlsConfig::default(),
            members: Vec::new(),
            vnodes: 4096,
            ttl_ms: 1_000,
            consul_grace_ms: 10_000,
            unready_leave_ms: 10_000,
            hold_ms: 5_000,
            hold_max: 64,
            peer_timeout_ms: 2_000,
            new_sessions_local: true,
        }
    }
}

impl ClusterConfig {
    /// The Consul ACL token: `consul_token`, or the trimmed content of
    /// `consul_token_file` (read now); `None` when neither is set. An error
    /// names the key at fault and never contains the token.
    pub fn consul_token(&self) -> Result<Option<String>, (&'static str, String)> {
        let (key, token) = match (&self.consul_token, &self.consul_token_file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err((
                    "cluster.consul_token_file",
                    "set either cluster.consul_token or cluster.consul_token_file, not both"
                        .to_owned(),
                ))
            }
            (Some(t), None) => ("cluster.consul_token", t.trim().to_owned()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    (
                        "cluster.consul_token_file",
                        format!("cannot read the token file {}: {e}", path.display()),
                    )
                })?;
                ("cluster.consul_token_file", text.trim().to_owned())
            }
        };
        if token.is_empty() {
            return Err((
                key,
                "the token is empty; leave the key unset for no token".into(),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((
                key,
                "the token must be visible ASCII characters (a Consul token is a UUID)".into(),
            ));
        }
        Ok(Some(token))
    }
}

/// `[cluster.tls]`: TLS 1.3 on peer links, both sides verified against the
/// cluster CA. Each PEM input is given by file path (`*_file`) or as base64 of
/// the PEM text (`*_base64`, for container environments), not both. Set all
/// three of CA, certificate and key, or none (plain TCP, which the node
/// announces with a warning at start-up).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerTlsConfig {
    /// The cluster CA certificate(s), PEM file.
    pub ca_file: Option<PathBuf>,
    /// The cluster CA certificate(s), base64 of the PEM text.
    pub ca_base64: Option<String>,
    /// This node's certificate chain (leaf first), PEM file.
    pub cert_file: Option<PathBuf>,
    /// This node's certificate chain, base64 of the PEM text.
    pub cert_base64: Option<String>,
    /// This node's private key, PEM file.
    pub key_file: Option<PathBuf>,
    /// This node's private key, base64 of the PEM text (a secret, masked in
    /// `--print-config`).
    pub key_base64: Option<String>,
    /// The DNS name every node's certificate carries and every dialer checks.
    pub server_name: String,
}

impl Default for PeerTlsConfig {
    fn default() -> Self {
        PeerTlsConfig {
            ca_file: None,
            ca_base64: None,
            cert_file: None,
            cert_base64: None,
            key_file: None,
            key_base64: None,
            server_name: berth_cluster::tls::DEFAULT_SERVER_NAME.into(),
        }
    }
}

/// One PEM input of `[cluster.tls]`: the file's bytes or the decoded base64.
fn pem_input(
    file_key: &'static str,
    file: &Option<PathBuf>,
    b64_key: &'static str,
    b64: &Option<String>,
) -> Result<Option<Vec<u8>>, (&'static str, String)> {
    match (
        file,
        b64.as_deref().map(str::trim).filter(|t| !t.is_empty()),
    ) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err((
            b64_key,
            format!("set either {file_key} or {b64_key}, not both"),
        )),
        (Some(path), None) => std::fs::read(path)
            .map(Some)
            .map_err(|e| (file_key, format!("cannot read {}: {e}", path.display()))),
        (None, Some(text)) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Some)
            .map_err(|e| (b64_key, format!("not base64: {e}"))),
    }
}

impl PeerTlsConfig {
    /// The peer-link TLS configuration (files read now); `None` when nothing
    /// is set. An error names the key at fault.
    pub fn load(&self) -> Result<Option<berth_cluster::tls::PeerTls>, (&'static str, String)> {
        let ca = pem_input(
            "cluster.tls.ca_file",
            &self.ca_file,
            "cluster.tls.ca_base64",
            &self.ca_base64,
        )?;
        let cert = pem_input(
            "cluster.tls.cert_file",
            &self.cert_file,
            "cluster.tls.cert_base64",
            &self.cert_base64,
        )?;
        let key = pem_input(
            "cluster.tls.key_file",
            &self.key_file,
            "cluster.tls.key_base64",
            &self.key_base64,
        )?;
        let (ca, cert, key) = match (ca, cert, key) {
            (None, None, None) => return Ok(None),
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            (ca, cert, _) => {
                let missing = if ca.is_none() {
                    "cluster.tls.ca_file"
                } else if cert.is_none() {
                    "cluster.tls.cert_file"
                } else {
                    "cluster.tls.key_file"
                };
                return Err((
                    missing,
                    "peer TLS needs the cluster CA, this node's certificate and its key \
                     (each as *_file or *_base64); set all three or none"
                        .into(),
                ));
            }
        };
        berth_cluster::tls::PeerTls::from_pem(&ca, &cert, &key, &self.server_name)
            .map(Some)
            .map_err(|e| ("cluster.tls", e.to_string()))
    }
}

/// `[auth]`: client credentials (`hello.credential`, a JWT) and who may
/// connect. Keys are read at start-up (a change needs a restart). The HS256
/// secret is given one way: `hs256_secret`, `hs256_secret_file` or
/// `hs256_secret_base64`; the public keys by `public_keys_file` or
/// `public_keys_base64`. Both kinds may be configured at once: a token's
/// `alg` picks the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Refuse a `hello` without a credential (`bad_token`, close 1008).
    /// Needs a key.
    pub required: bool,
    /// HS256 shared secret (32+ bytes; a secret, masked in `--print-config`).
    pub hs256_secret: Option<String>,
    /// A file holding the HS256 secret (surrounding whitespace trimmed).
    pub hs256_secret_file: Option<PathBuf>,
    /// The HS256 secret's bytes, base64 (a secret, masked).
    pub hs256_secret_base64: Option<String>,
    /// PEM file of the public keys tokens are verified with: RSA keys verify
    /// RS256, P-256 keys ES256; several keys may follow each other (rotation:
    /// a token verified by any of them is accepted).
    pub public_keys_file: Option<PathBuf>,
    /// The same PEM text, base64.
    pub public_keys_base64: Option<String>,
    /// The audience a token's `aud` must name; unset: `aud` is not checked.
    pub audience: Option<String>,
    /// The issuer a token's `iss` must be; unset: `iss` is not checked.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// Longest credential read, in bytes (checked before it is parsed).
    pub max_token_bytes: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            required: false,
            hs256_secret: None,
            hs256_secret_file: None,
            hs256_secret_base64: None,
            public_keys_file: None,
            public_keys_base64: None,
            audience: None,
            issuer: None,
            leeway_s: 30,
            max_token_bytes: 8 * 1024,
        }
    }
}

impl AuthConfig {
    /// The credential verifier (key files read now). An error names the key
    /// at fault and never contains a secret.
    pub fn verifier(&self) -> Result<crate::auth::Verifier, (&'static str, String)> {
        let secret_key = match (
            &self.hs256_secret,
            &self.hs256_secret_file,
            &self.hs256_secret_base64,
        ) {
            (None, None, None) => None,
            (Some(_), None, None) => Some("auth.hs256_secret"),
            (None, Some(_), None) => Some("auth.hs256_secret_file"),
            (None, None, Some(_)) => Some("auth.hs256_secret_base64"),
            _ => {
                return Err((
                    "auth.hs256_secret",
                    "set one of auth.hs256_secret, auth.hs256_secret_file and \
                     auth.hs256_secret_base64, not several"
                        .into(),
                ))
            }
        };
        let hs256_secret = match (&self.hs256_secret, &self.hs256_secret_file) {
            (Some(s), _) => Some(s.as_bytes().to_vec()),
            (None, Some(path)) => {
                let text = std::fs::read(path).map_err(|e| {
                    (
                        "auth.hs256_secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(text.trim_ascii().to_vec())
            }
            (None, None) => pem_input(
                "auth.hs256_secret_file",
                &None,
                "auth.hs256_secret_base64",
                &self.hs256_secret_base64,
            )?,
        };
        let public_keys_pem = pem_input(
            "auth.public_keys_file",
            &self.public_keys_file,
            "auth.public_keys_base64",
            &self.public_keys_base64,
        )?;
        let public_key = if self.public_keys_file.is_some() {
            "auth.public_keys_file"
        } else {
            "auth.public_keys_base64"
        };
        if self.required && hs256_secret.is_none() && public_keys_pem.is_none() {
            return Err((
                "auth.required",
                "credentials cannot be required without a key to verify them: set \
                 auth.hs256_secret (or _file, _base64) or auth.public_keys_file (or _base64)"
                    .into(),
            ));
        }
        let settings = crate::auth::AuthSettings {
            required: self.required,
            hs256_secret,
            public_keys_pem,
            audience: self.audience.clone(),
            issuer: self.issuer.clone(),
            leeway_s: self.leeway_s,
            max_token_bytes: self.max_token_bytes,
        };
        crate::auth::Verifier::new(&settings).map_err(|e| match e {
            crate::auth::KeyError::ShortSecret(_) => {
                (secret_key.unwrap_or("auth.hs256_secret"), e.to_string())
            }
            crate::auth::KeyError::NoPem | crate::auth::KeyError::BadKey { .. } => {
                (public_key, e.to_string())
            }
        })
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter (`info`, `berth=debug,info`); `RUST_LOG` overrides it at start-up.
    pub filter: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// The whole shutdown (checkpoint every session, close every client) ends
    /// within this many ms.
    pub deadline_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            deadline_ms: 10_000,
        }
    }
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Compiled default.
    Default,
    /// The TOML file at this path.
    File(PathBuf),
    /// `BERTH_CONFIG_BASE64`.
    Base64,
    /// This environment variable.
    Env(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("the compiled defaults"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Base64 => write!(f, "{ENV_BASE64}"),
            Source::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read at all.
    #[error("cannot read {origin}: {message}")]
    Unreadable {
        /// The source.
        origin: Source,
        /// Why.
        message: String,
    },
    /// A key has a bad value.
    #[error("invalid value for `{key}` (from {origin}): {message}")]
    Invalid {
        /// Dotted key, e.g. `server.listen`.
        key: String,
        /// The source that set it.
        origin: Source,
        /// What is wrong.
        message: String,
    },
}

/// The loaded configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The file used, if any.
    pub file: Option<PathBuf>,
}

/// The layers, as plain TOML/JSON trees, lowest precedence first.
struct Layers {
    file: Option<(PathBuf, Value)>,
    base64: Option<Value>,
    env: Vec<(String, String, String)>, // (variable, dotted key, value)
}

impl Layers {
    fn source_of(&self, key: &str) -> Source {
        // A key, or a table that an env var sets a key inside of.
        let inside = format!("{key}.");
        if let Some((var, _, _)) = self
            .env
            .iter()
            .rev()
            .find(|(_, k, _)| k == key || k.starts_with(&inside))
        {
            return Source::Env(var.clone());
        }
        if self
            .base64
            .as_ref()
            .is_some_and(|v| lookup(v, key).is_some())
        {
            return Source::Base64;
        }
        if let Some((p, v)) = &self.file {
            if lookup(v, key).is_some() {
                return Source::File(p.clone());
            }
        }
        Source::Default
    }
}

/// A trusted proxy: an address (`10.0.0.5`) or a CIDR prefix (`10.0.0.0/8`).
fn parse_proxy(p: &str) -> Result<ipnet::IpNet, String> {
    p.parse::<ipnet::IpNet>()
        .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{p:?} is not an address or a CIDR prefix like 10.0.0.0/8"))
}

fn lookup<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(v, |v, k| v.get(k))
}

fn parse_toml(text: &str, source: &Source) -> Result<Value, ConfigError> {
    let v: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Unreadable {
        origin: source.clone(),
        message: e.to_string(),
    })?;
    serde_json::to_value(v).map_err(|e| ConfigError::Unreadable {
        origin: source.clone(),
        message: e.to_string(),
    })
}

/// Loads the configuration from the file named by `--config` (`cli_file`),
/// `BERTH_CONFIG`, or the default path, and from the environment `env`.
pub fn load(
    cli_file: Option<&Path>,
    env: &BTreeMap<String, String>,
) -> Result<Loaded, ConfigError> {
    let named = cli_file
        .map(Path::to_path_buf)
        .or_else(|| env.get(ENV_FILE).map(PathBuf::from));
    let path = match named {
        Some(p) => Some(p),
        None => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.exists()),
    };
    let file = match &path {
        Some(p) => {
            let src = Source::File(p.clone());
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Unreadable {
                origin: src.clone(),
                message: e.to_string(),
            })?;
            Some((p.clone(), parse_toml(&text, &src)?))
        }
        None => None,
    };
    let base64_text = match env.get(ENV_BASE64).filter(|s| !s.trim().is_empty()) {
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| ConfigError::Unreadable {
                    origin: Source::Base64,
                    message: format!("not base64: {e}"),
                })?;
            let text = String::from_utf8(bytes).map_err(|_| ConfigError::Unreadable {
                origin: Source::Base64,
                message: "not UTF-8 text".into(),
            })?;
            Some(text)
        }
        None => None,
    };
    let base64 = match &base64_text {
        Some(text) => Some(parse_toml(text, &Source::Base64)?),
        None => None,
    };
    let prefix = format!("{ENV_PREFIX}__");
    let env_layer: Vec<_> = env
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix(&prefix)?;
            Some((k.clone(), rest.to_lowercase().replace("__", "."), v.clone()))
        })
        .collect();
    let layers = Layers {
        file,
        base64,
        env: env_layer,
    };

    // The layering itself is the `config` crate's; the plain trees above only
    // serve to say which source set a key that turns out to be bad.
    let unreadable = |source: Source| {
        move |e: config::ConfigError| ConfigError::Unreadable {
            origin: source.clone(),
            message: e.to_string(),
        }
    };
    let defaults =
        config::Config::try_from(&Config::default()).map_err(unreadable(Source::Default))?;
    let mut builder = config::Config::builder().add_source(defaults);
    if let Some((p, _)) = &layers.file {
        builder =
            builder.add_source(config::File::from(p.as_path()).format(config::FileFormat::Toml));
    }
    if let Some(text) = &base64_text {
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
    }
    let env_map: config::Map<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("server.origins")
            .with_list_parse_key("server.trusted_proxies")
            .with_list_parse_key("cluster.members")
            .with_list_parse_key("cluster.accept_secrets")
            .with_list_parse_key("api.keys")
            .source(Some(env_map)),
    );
    let file_source = layers.file.as_ref().map(|(p, _)| Source::File(p.clone()));
    let merged = builder.build().map_err(|e| match (&e, file_source) {
        (config::ConfigError::NotFound(_), Some(f)) => unreadable(f)(e),
        (config::ConfigError::FileParse { uri: Some(_), .. }, Some(f)) => unreadable(f)(e),
        (config::ConfigError::FileParse { .. }, _) => unreadable(Source::Base64)(e),
        // The file source reports a missing or unsupported file as an I/O error.
        (config::ConfigError::Foreign(inner), Some(f))
            if inner.downcast_ref::<std::io::Error>().is_some() =>
        {
            unreadable(f)(e)
        }
        _ => unreadable(Source::Default)(e),
    })?;
    let config: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().to_string();
        // An unknown key is reported by its parent; name the key itself.
        // (From the environment the path already ends with the field.)
        let key = match inner.strip_prefix("unknown field `") {
            Some(rest) => {
                let field = rest.split('`').next().unwrap_or_default();
                if key == "." || key.is_empty() || key == field {
                    field.to_owned()
                } else if key.ends_with(&format!(".{field}")) {
                    key
                } else {
                    format!("{key}.{field}")
                }
            }
            None => key,
        };
        ConfigError::Invalid {
            origin: layers.source_of(&key),
            key,
            message: inner,
        }
    })?;
    config
        .validate()
        .map_err(|(key, message)| ConfigError::Invalid {
            origin: layers.source_of(key),
            key: key.to_owned(),
            message,
        })?;
    Ok(Loaded { config, file: path })
}

impl Config {
    /// Checks what types alone cannot; answers the key at fault and why.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let addr = |key: &'static str, v: &str| {
            v.parse::<SocketAddr>().map(drop).map_err(|e| {
                (
                    key,
                    format!("{v:?} is not an address like 127.0.0.1:8080: {e}"),
                )
            })
        };
        addr("server.listen", &self.server.listen)?;
        addr("admin.listen", &self.admin.listen)?;
        addr("cluster.peer_listen", &self.cluster.peer_listen)?;
        let positive = |key: &'static str, v: u64| {
            if v == 0 {
                Err((key, "must be greater than 0".to_owned()))
            } else {
                Ok(())
            }
        };
        positive("server.max_frame_bytes", self.server.max_frame_bytes as u64)?;
        positive("server.ping_interval_ms", self.server.ping_interval_ms)?;
        positive("server.max_connections", self.server.max_connections as u64)?;
        positive("store.session_ttl_s", self.store.session_ttl_s)?;
        positive("store.op_timeout_ms", self.store.op_timeout_ms)?;
        positive("store.batch_max", self.store.batch_max as u64)?;
        positive(
            "store.max_inflight_batches",
            self.store.max_inflight_batches as u64,
        )?;
        positive(
            "store.checkpoint_interval_ms",
            self.store.checkpoint_interval_ms,
        )?;
        positive("store.health_interval_ms", self.store.health_interval_ms)?;
        positive("limits.frames_per_sec", self.limits.frames_per_sec as u64)?;
        positive("limits.frames_burst", self.limits.frames_burst as u64)?;
        positive(
            "limits.max_inflight_ops",
            self.limits.max_inflight_ops as u64,
        )?;
        positive("limits.max_state_bytes", self.limits.max_state_bytes as u64)?;
        positive("limits.outbox_max", self.limits.outbox_max as u64)?;
        positive("limits.max_outgoing", self.limits.max_outgoing as u64)?;
        positive(
            "limits.max_message_bytes",
            self.limits.max_message_bytes as u64,
        )?;
        positive("limits.max_watermarks", self.limits.max_watermarks as u64)?;
        positive(
            "limits.max_checkpoint_bytes",
            self.limits.max_checkpoint_bytes as u64,
        )?;
        if self.limits.max_checkpoint_bytes > berth_actors::codec::MAX_DECODE_BYTES / 4 {
            return Err((
                "limits.max_checkpoint_bytes",
                format!(
                    "{} is above {} (a quarter of what a checkpoint may claim while it is decoded)",
                    self.limits.max_checkpoint_bytes,
                    berth_actors::codec::MAX_DECODE_BYTES / 4
                ),
            ));
        }
        positive(
            "limits.max_live_sessions",
            self.limits.max_live_sessions as u64,
        )?;
        positive(
            "session.handler_timeout_ms",
            self.session.handler_timeout_ms,
        )?;
        positive("session.timer_scan_ms", self.session.timer_scan_ms)?;
        for p in &self.server.trusted_proxies {
            parse_proxy(p).map_err(|e| ("server.trusted_proxies", e))?;
        }
        if self.cluster.hold_max > self.limits.max_inflight_ops {
            return Err((
                "cluster.hold_max",
                format!(
                    "{} is above limits.max_inflight_ops ({}): a connection holds at most \
                     its ops in flight, so the limit could never be reached",
                    self.cluster.hold_max, self.limits.max_inflight_ops
                ),
            ));
        }
        positive("shutdown.deadline_ms", self.shutdown.deadline_ms)?;
        positive("cluster.vnodes", self.cluster.vnodes as u64)?;
        positive("cluster.ttl_ms", self.cluster.ttl_ms)?;
        positive("cluster.hold_ms", self.cluster.hold_ms)?;
        positive("cluster.peer_timeout_ms", self.cluster.peer_timeout_ms)?;
        for m in &self.cluster.members {
            let ok = m
                .split_once('=')
                .is_some_and(|(id, addr)| !id.is_empty() && addr.parse::<SocketAddr>().is_ok());
            if !ok {
                return Err((
                    "cluster.members",
                    format!("{m:?} is not `id=host:port` (e.g. node-a=127.0.0.1:7070)"),
                ));
            }
        }
        if let Some(a) = &self.cluster.advertise {
            addr("cluster.advertise", a)?;
        }
        let clustered = self.cluster.consul_addr.is_some() || self.cluster.members.len() > 1;
        if clustered && self.cluster.secret.as_deref().unwrap_or("").len() < 16 {
            return Err((
                "cluster.secret",
                "a cluster needs a shared secret of at least 16 characters".to_owned(),
            ));
        }
        if clustered && self.store.redis_url.is_none() {
            return Err((
                "store.redis_url",
                "a cluster needs a shared Redis: the in-memory store is single-node only"
                    .to_owned(),
            ));
        }
        if let Some(url) = &self.store.redis_url {
            let schemes = [
                "redis://",
                "rediss://",
                "redis+unix://",
                "unix://",
                "redis+sentinel://",
            ];
            if !schemes.iter().any(|s| url.starts_with(s)) {
                return Err((
                    "store.redis_url",
                    format!(
                        "{url:?} is not a redis:// or redis+sentinel://host:port,.../service URL"
                    ),
                ));
            }
        }
        self.cluster.consul_token()?;
        self.cluster.tls.load()?;
        self.api.validate()?;
        if self.api.enabled()
            && [&self.server.listen, &self.admin.listen].contains(&&self.api.listen)
        {
            return Err((
                "api.listen",
                "the backend API needs its own address (never the public or admin one)".into(),
            ));
        }
        positive("auth.max_token_bytes", self.auth.max_token_bytes as u64)?;
        self.auth.verifier()?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(("log.filter", e.to_string()));
        }
        Ok(())
    }

    /// The ping period.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.server.ping_interval_ms)
    }

    /// The per-session limits of the actors crate.
    pub fn session_limits(&self) -> berth_actors::state::Limits {
        berth_actors::state::Limits {
            max_state_bytes: self.limits.max_state_bytes,
            outbox_max: self.limits.outbox_max,
            max_emit_delay_ms: self.limits.max_emit_delay_ms,
            max_checkpoint_bytes: self.limits.max_checkpoint_bytes,
            max_timers: self.limits.max_timers,
            max_outgoing: self.limits.max_outgoing,
            max_message_bytes: self.limits.max_message_bytes,
            max_watermarks: self.limits.max_watermarks,
            watermark_ttl_ms: self.store.session_ttl_s.saturating_mul(1000),
            max_live_sessions: self.limits.max_live_sessions,
        }
    }

    /// The admission settings of the edge (per-source connection rate).
    pub fn admission(&self) -> crate::admission::AdmissionConfig {
        crate::admission::AdmissionConfig {
            per_sec: self.limits.connections_per_sec_per_source as f64,
            burst: self.limits.connections_burst_per_source as f64,
            trusted_proxies: self
                .server
                .trusted_proxies
                .iter()
                .filter_map(|p| parse_proxy(p).ok())
                .collect(),
        }
    }

    /// This configuration as dotted keys, with secrets masked, for diffs and logs.
    pub fn flatten(&self) -> BTreeMap<String, String> {
        fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
            match v {
                Value::Object(m) => {
                    for (k, v) in m {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                other => {
                    out.insert(prefix.to_owned(), other.to_string());
                }
            }
        }
        let mut v = serde_json::to_value(self).expect("config serializes");
        for secret in [
            "/cluster/secret",
            "/cluster/consul_token",
            "/cluster/tls/key_base64",
            "/admin/drain_token",
            "/api/keys_base64",
            "/auth/hs256_secret",
            "/auth/hs256_secret_base64",
        ] {
            if let Some(s) = v.pointer_mut(secret) {
                if !s.is_null() {
                    *s = Value::String("***".into());
                }
            }
        }
        for secrets in ["/cluster/accept_secrets", "/api/keys"] {
            if let Some(Value::Array(list)) = v.pointer_mut(secrets) {
                for s in list.iter_mut() {
                    *s = Value::String("***".into());
                }
            }
        }
        if let Some(Value::String(url)) = v.pointer_mut("/store/redis_url") {
            // Mask a password in redis://user:pass@host.
            if let Some((scheme_user, rest)) = url.split_once('@') {
                if let Some((head, _pass)) = scheme_user.rsplit_once(':') {
                    if !head.ends_with('/') {
                        *url = format!("{head}:***@{rest}");
                    }
                }
            }
        }
        let mut out = BTreeMap::new();
        walk("", &v, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn shipped_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_FILE);
        let loaded = load(Some(&path), &BTreeMap::new()).unwrap();
        assert_eq!(loaded.config, Config::default());
        // Every key of the struct appears in the file (commented-out keys are
        // the unset options).
        let text = std::fs::read_to_string(&path).unwrap();
        for key in Config::default().flatten().keys() {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(
                text.lines().any(|l| l
                    .trim_start_matches(['#', ' '])
                    .starts_with(&format!("{leaf} ="))),
                "config/berth.toml does not show `{key}`"
            );
        }
    }

    #[test]
    fn peer_tls_needs_all_three_inputs_one_way_each_and_masks_the_key() {
        let ca = berth_cluster::tls::dev::DevCa::new("test CA");
        let n = ca.issue(&[berth_cluster::tls::DEFAULT_SERVER_NAME]);
        let dir = std::env::temp_dir().join(format!("berth-cfg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.ca_pem()).unwrap();
        let base = env(&[
            ("BERTH__CLUSTER__TLS__CA_FILE", ca_file.to_str().unwrap()),
            ("BERTH__CLUSTER__TLS__CERT_BASE64", &b64(&n.cert_pem)),
            ("BERTH__CLUSTER__TLS__KEY_BASE64", &b64(&n.key_pem)),
        ]);
        // A file and base64 mixed: fine, and the key is masked.
        let c = load(None, &base).unwrap().config;
        assert!(c.cluster.tls.load().unwrap().is_some());
        assert_eq!(c.flatten()["cluster.tls.key_base64"], "\"***\"");
        assert!(Config::default().cluster.tls.load().unwrap().is_none());
        // The key missing: start-up stops, naming it.
        let mut e = base.clone();
        e.remove("BERTH__CLUSTER__TLS__KEY_BASE64");
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(msg.contains("cluster.tls.key_file"), "{msg}");
        // The same input twice.
        let mut e = base.clone();
        e.insert("BERTH__CLUSTER__TLS__CA_BASE64".into(), b64(&ca.ca_pem()));
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(msg.contains("not both"), "{msg}");
        // A key that is not this certificate's.
        let mut e = base.clone();
        e.insert(
            "BERTH__CLUSTER__TLS__KEY_BASE64".into(),
            b64(&ca.issue(&["x"]).key_pem),
        );
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(msg.contains("cluster.tls"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn auth_keys_one_way_each_required_needs_a_key_and_secrets_are_masked() {
        let secret = "0123456789abcdef0123456789abcdef";
        // Required without a key: start-up stops, naming the key.
        let e = env(&[("BERTH__AUTH__REQUIRED", "true")]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("auth.required") && msg.contains("BERTH__AUTH__REQUIRED"),
            "{msg}"
        );
        // With a secret: fine, and masked.
        let e = env(&[
            ("BERTH__AUTH__REQUIRED", "true"),
            ("BERTH__AUTH__HS256_SECRET", secret),
        ]);
        let c = load(None, &e).unwrap().config;
        assert!(c.auth.verifier().unwrap().has_keys());
        assert!(!format!("{:?}", c.flatten()).contains(secret));
        // The same secret as base64: masked too.
        let e = env(&[("BERTH__AUTH__HS256_SECRET_BASE64", &b64(secret))]);
        let c = load(None, &e).unwrap().config;
        assert_eq!(c.flatten()["auth.hs256_secret_base64"], "\"***\"");
        // Two ways at once, or a short secret: named, never repeated.
        let e = env(&[
            ("BERTH__AUTH__HS256_SECRET", secret),
            ("BERTH__AUTH__HS256_SECRET_BASE64", &b64(secret)),
        ]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("not several") && !msg.contains(secret),
            "{msg}"
        );
        let e = env(&[("BERTH__AUTH__HS256_SECRET", "short-secret")]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("auth.hs256_secret") && !msg.contains("short-secret"),
            "{msg}"
        );
        // A public keys file that is missing, or holds no key.
        let e = env(&[("BERTH__AUTH__PUBLIC_KEYS_FILE", "/nonexistent/keys.pem")]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(msg.contains("auth.public_keys_file"), "{msg}");
        let e = env(&[("BERTH__AUTH__PUBLIC_KEYS_BASE64", &b64("no pem here"))]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(msg.contains("auth.public_keys_base64"), "{msg}");
    }

    #[test]
    fn readme_table_lists_every_key() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        for key in Config::default().flatten().keys() {
            assert!(
                readme.contains(&format!("| `{key}` |")),
                "README's configuration table lacks `{key}`"
            );
        }
    }

    #[test]
    fn precedence_file_then_base64_then_env() {
        let dir = std::env::temp_dir().join(format!("berth-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.toml");
        std::fs::write(&file, "[server]\nping_interval_ms = 1\nmax_frame_bytes = 10\n[store]\nkey_prefix = \"file\"\n").unwrap();
        let b = b64("[server]\nping_interval_ms = 2\n[store]\nkey_prefix = \"b64\"\n");
        let e = env(&[
            (ENV_BASE64, &b),
            ("BERTH__STORE__KEY_PREFIX", "env"),
            ("BERTH__SERVER__ORIGINS", "https://a,https://b"),
        ]);
        let c = load(Some(&file), &e).unwrap().config;
        assert_eq!(c.server.max_frame_bytes, 10, "file beats defaults");
        assert_eq!(c.server.ping_interval_ms, 2, "base64 beats file");
        assert_eq!(c.store.key_prefix, "env", "env beats base64");
        assert_eq!(
            c.server.origins,
            vec!["https://a".to_string(), "https://b".to_string()]
        );
        assert_eq!(c.admin, AdminConfig::default());
        let e = env(&[(ENV_FILE, file.to_str().unwrap())]);
        assert_eq!(load(None, &e).unwrap().config.store.key_prefix, "file");
    }

    #[test]
    fn bad_values_name_key_and_source() {
        let e = env(&[("BERTH__SERVER__PING_INTERVAL_MS", "soon")]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("server.ping_interval_ms")
                && msg.contains("BERTH__SERVER__PING_INTERVAL_MS"),
            "{msg}"
        );

        let e = env(&[(ENV_BASE64, &b64("[admin]\nlisten = \"nowhere\"\n"))]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("admin.listen") && msg.contains(ENV_BASE64),
            "{msg}"
        );

        let e = env(&[("BERTH__STORE__DURABILITY", "sometimes")]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("store.durability") && msg.contains("BERTH__STORE__DURABILITY"),
            "{msg}"
        );

        // An unknown key from the environment names the key once and the
        // variable it came from (it said "server.listn.listn (from the
        // compiled defaults)").
        let e = env(&[("BERTH__SERVER__LISTN", "x")]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("`server.listn`")
                && msg.contains("unknown field")
                && msg.contains("BERTH__SERVER__LISTN"),
            "{msg}"
        );
        let e = env(&[("BERTH__BOGUS__X", "1")]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("`bogus`") && !msg.contains("compiled defaults"),
            "{msg}"
        );

        let e = env(&[(ENV_BASE64, "%%%")]);
        assert!(load(None, &e).unwrap_err().to_string().contains(ENV_BASE64));
    }

    #[test]
    fn secrets_are_masked_in_flattened_view() {
        let mut c = Config::default();
        c.cluster.secret = Some("s3cret".into());
        c.cluster.consul_token = Some("c0nsul-t0ken".into());
        c.store.redis_url = Some("redis://u:pw@h:1/0".into());
        let f = c.flatten();
        assert!(!format!("{f:?}").contains("s3cret"));
        assert!(!format!("{f:?}").contains("c0nsul-t0ken"));
        assert_eq!(f["cluster.consul_token"], "\"***\"");
        assert!(!format!("{f:?}").contains("pw@"));
        c.api.keys = vec!["api-key-0123456789".into()];
        c.api.keys_base64 = Some("YXBpLWtleS0wMTIzNDU2Nzg5".into());
        let f = c.flatten();
        assert!(!format!("{f:?}").contains("api-key-0123456789"));
        assert_eq!(f["api.keys_base64"], "\"***\"");
        // Unset stays visibly unset.
        assert_eq!(Config::default().flatten()["cluster.consul_token"], "null");
    }

    #[test]
    fn consul_token_from_env_base64_or_a_file_and_masked() {
        let token = "6f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b";
        // Env.
        let e = env(&[("BERTH__CLUSTER__CONSUL_TOKEN", token)]);
        let c = load(None, &e).unwrap().config;
        assert_eq!(c.cluster.consul_token(), Ok(Some(token.to_owned())));
        assert!(!format!("{:?}", c.flatten()).contains(token));
        // Base64 config.
        let e = env(&[(
            ENV_BASE64,
            &b64(&format!("[cluster]\nconsul_token = \"{token}\"\n")),
        )]);
        let c = load(None, &e).unwrap().config;
        assert_eq!(c.cluster.consul_token(), Ok(Some(token.to_owned())));
        // A file (trimmed), named by env.
        let dir = std::env::temp_dir().join(format!("berth-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("consul-token");
        std::fs::write(&file, format!("  {token}\n")).unwrap();
        let e = env(&[("BERTH__CLUSTER__CONSUL_TOKEN_FILE", file.to_str().unwrap())]);
        let c = load(None, &e).unwrap().config;
        assert_eq!(c.cluster.consul_token(), Ok(Some(token.to_owned())));
        let flat = format!("{:?}", c.flatten());
        assert!(
            !flat.contains(token) && flat.contains("consul-token"),
            "{flat}"
        );
        // Neither: no token.
        assert_eq!(Config::default().cluster.consul_token(), Ok(None));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_consul_token_stops_start_up_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("berth-token-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("no-such-file");
        let e = env(&[(
            "BERTH__CLUSTER__CONSUL_TOKEN_FILE",
            missing.to_str().unwrap(),
        )]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("cluster.consul_token_file")
                && msg.contains("BERTH__CLUSTER__CONSUL_TOKEN_FILE")
                && msg.contains("no-such-file"),
            "{msg}"
        );
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let e = env(&[("BERTH__CLUSTER__CONSUL_TOKEN_FILE", empty.to_str().unwrap())]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("cluster.consul_token_file") && msg.contains("empty"),
            "{msg}"
        );
        // Both set: an error, whichever sources set them.
        let secret = "the-token-itself";
        let e = env(&[
            (
                ENV_BASE64,
                &b64(&format!("[cluster]\nconsul_token = \"{secret}\"\n")),
            ),
            ("BERTH__CLUSTER__CONSUL_TOKEN_FILE", empty.to_str().unwrap()),
        ]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(msg.contains("not both") && !msg.contains(secret), "{msg}");
        // A token that cannot be a header value; the message does not repeat it.
        let e = env(&[("BERTH__CLUSTER__CONSUL_TOKEN", "two words")]);
        let msg = load(None, &e).unwrap_err().to_string();
        assert!(
            msg.contains("cluster.consul_token") && !msg.contains("two words"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
