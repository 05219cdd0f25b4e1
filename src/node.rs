//! The running node's shared state: configuration, the host, readiness.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use berth_actors::host::Host;
use berth_actors::protocol::CloseCode;
use berth_cluster::membership::MembershipHandle;

use crate::route::Router;
use tokio::sync::watch;

use crate::config::{Config, LimitsConfig};

/// Why the node is not ready, if it is not.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    /// Last store error, while the store is unreachable.
    pub store_error: Option<String>,
    /// Whether the store has answered at least once.
    pub store_seen: bool,
}

/// Everything the HTTP handlers share.
pub struct Node {
    /// This node's id.
    pub node_id: String,
    /// Configuration at start-up (`limits` and `log` may change, see below).
    pub cfg: Config,
    /// Current limits (replaced on SIGHUP).
    limits: RwLock<Arc<LimitsConfig>>,
    /// The session host.
    pub host: Host,
    /// Who owns which session, and how to reach it.
    pub router: Arc<Router>,
    /// Cluster membership.
    pub membership: Arc<MembershipHandle>,
    /// Close code for this node's clients when it stops (1001, or 1012 when
    /// draining or clustered: resume elsewhere now).
    shutdown_code: AtomicU16,
    /// Open client connections.
    pub connections: AtomicUsize,
    /// Set once shutdown or drain began.
    pub stopping: watch::Sender<bool>,
    /// Set by `POST /drain`.
    pub drain_requested: watch::Sender<bool>,
    /// Set while this node is isolated (src/isolation.rs): out of its own
    /// ring, its clients closed with 1012, upgrades answered 503.
    pub isolated: watch::Sender<bool>,
    /// Store reachability.
    pub readiness: Mutex<Readiness>,
    /// Whether this node can serve sessions (its store answered, and has not
    /// been failing for `cluster.unready_leave_ms`): membership passes the
    /// Consul check only while it is true.
    pub serving: watch::Sender<bool>,
    /// New connections per source address.
    pub admission: crate::admission::Admission,
    /// When the node started.
    pub started: Instant,
    /// The backend API's bearer keys (replaced on SIGHUP).
    pub api_keys: crate::api::auth::Keys,
    /// Verifies `hello.credential` (keys loaded at start-up).
    pub auth: crate::auth::Verifier,
}

impl Node {
    /// A node in its initial state.
    pub fn new(
        node_id: String,
        cfg: Config,
        host: Host,
        router: Arc<Router>,
        membership: Arc<MembershipHandle>,
        serving: watch::Sender<bool>,
        auth: crate::auth::Verifier,
    ) -> Self {
        let admission = crate::admission::Admission::new(cfg.admission());
        // Checked when the configuration was loaded.
        let api_keys = crate::api::auth::Keys::new(&cfg.api.load_keys().unwrap_or_default());
        Node {
            node_id,
            router,
            membership,
            shutdown_code: AtomicU16::new(CloseCode::GoingAway.code()),
            limits: RwLock::new(Arc::new(cfg.limits.clone())),
            cfg,
            host,
            connections: AtomicUsize::new(0),
            stopping: watch::Sender::new(false),
            drain_requested: watch::Sender::new(false),
            isolated: watch::Sender::new(false),
            readiness: Mutex::new(Readiness::default()),
            serving,
            auth,
            admission,
            started: Instant::now(),
            api_keys,
        }
    }

    /// The current limits.
    pub fn limits(&self) -> Arc<LimitsConfig> {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the limits (SIGHUP).
    pub fn set_limits(&self, l: LimitsConfig) {
        *self.limits.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(l);
    }

    /// Sets the close code for clients when the node stops.
    pub fn set_shutdown_code(&self, code: CloseCode) {
        self.shutdown_code.store(code.code(), Ordering::Relaxed);
    }

    /// The close code for clients when the node stops.
    pub fn shutdown_code(&self) -> CloseCode {
        if self.shutdown_code.load(Ordering::Relaxed) == CloseCode::Restart.code() {
            CloseCode::Restart
        } else {
            CloseCode::GoingAway
        }
    }

    /// Whether shutdown or drain has begun.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Whether this node is isolated from the cluster (src/isolation.rs).
    pub fn is_isolated(&self) -> bool {
        *self.isolated.borrow()
    }

    /// Why the node is not ready (empty when ready).
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.is_stopping() {
            why.push("node is shutting down".to_owned());
        }
        let r = self
            .readiness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match (r.store_error, r.store_seen) {
            (Some(e), _) => why.push(format!("store unreachable: {e}")),
            (None, false) => why.push("store not checked yet".to_owned()),
            (None, true) => {}
        }
        if self.is_isolated() {
            why.push(
                "isolated: the consul check lapsed and the peers do not confirm this node (sessions released, clients sent to the others)".to_owned(),
            );
        }
        if self.router.clustered() {
            let h = self.membership.health();
            let grace = Duration::from_millis(self.cfg.cluster.consul_grace_ms);
            if let (Some(since), Some(e)) = (h.failing_since, &h.last_error) {
                if since.elapsed() >= grace {
                    why.push(format!(
                        "membership failing for {:?} (last known members still in use): {e}",
                        since.elapsed()
                    ));
                }
            }
            if !self.router.view().ids().any(|m| m.as_str() == self.node_id) && !self.is_stopping()
            {
                why.push("not (yet) in the cluster's member view".to_owned());
            }
        }
        why
    }
}
