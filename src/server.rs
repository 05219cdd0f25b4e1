//! Running a node: the server builder and the node's lifecycle (start,
//! readiness, SIGHUP reloads, timers, drain, shutdown).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpServer};
use berth_actors::app::{Entity, Session};
use berth_actors::host::{Durability, Host, HostConfig};
use berth_actors::protocol::CloseCode;
use berth_actors::store::memory::MemoryStore;
use berth_actors::store::redis::{RedisStore, RedisStoreConfig};
use berth_actors::store::CheckpointStore;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use berth_cluster::membership::{spawn_consul, static_membership, ConsulConfig, Member};
use berth_cluster::ring::MemberId;

use crate::config::{self, Config, DurabilityMode};
use crate::node::Node;
use crate::route::{Router, RouterConfig};
use crate::{admin, demo, edge, isolation, telemetry};

/// Why a node could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid (the key at fault and why).
    #[error("configuration error: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("binding {key} {addr}: {source}")]
    Bind {
        /// The configuration key of the address.
        key: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The checkpoint store could not be set up.
    #[error("{0}")]
    Store(String),
    /// Membership or the peer listener could not be set up.
    #[error("{0}")]
    Cluster(String),
    /// Logs or metrics could not be set up.
    #[error("telemetry: {0}")]
    Telemetry(String),
    /// Any other I/O failure (signals, sockets).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Command line of a berth node (the `berth` binary and any application
/// binary built on [`Server::main`]).
#[derive(Debug, Parser)]
#[command(version, about = "One node of a berth session cluster.")]
struct Args {
    /// Configuration file (TOML). Default: $BERTH_CONFIG, else config/berth.toml when present.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
}

/// A berth node running the application `A`: the same node as the `berth`
/// binary (public WebSocket edge, admin endpoint, cluster membership and peer
/// links, checkpoint store, configuration layering, signals, drain).
///
/// ```no_run
/// // The whole `berth` binary: the built-in kv application and its demo page.
/// berth::Server::new(berth::KvApp)
///     .page(berth::KV_DEMO_PAGE)
///     .main()
/// ```
pub struct Server<A: Session> {
    app: A,
    config: Option<PathBuf>,
    page: Option<&'static str>,
    entities: Vec<Registration>,
}

/// Registers one entity kind on a node's host.
type Registration = Box<dyn FnOnce(&Host) + Send>;

impl<A: Session> Server<A> {
    /// A node for `app`, configured as the binary is: defaults, then the
    /// file (`$BERTH_CONFIG`, else `config/berth.toml` when present), then
    /// `BERTH_CONFIG_BASE64`, then `BERTH_*` variables (docs/operations.md).
    pub fn new(app: A) -> Self {
        Server {
            app,
            config: None,
            page: None,
            entities: Vec::new(),
        }
    }

    /// Serves `html` at `GET /` and `/index.html` of the public listener
    /// (the `berth` binary serves the `kv` demo page, [`crate::KV_DEMO_PAGE`]).
    /// Without it, those paths answer 404.
    pub fn page(mut self, html: &'static str) -> Self {
        self.page = Some(html);
        self
    }

    /// Registers the entity `kind`, run by `app`: actors addressed
    /// `kind/key`, made by the first message to them.
    ///
    /// # Panics
    /// When `kind` is not 1 to 32 bytes of `[a-z0-9_-]` (a programming
    /// error, found at start-up).
    pub fn entity<E: Entity>(mut self, kind: &str, app: E) -> Self {
        assert!(
            berth_actors::address::valid_kind(kind),
            "entity kind {kind:?}: {}",
            berth_actors::address::AddressError::BadKind
        );
        let kind = kind.to_owned();
        self.entities.push(Box::new(move |host: &Host| {
            // Checked above.
            let _ = host.register_entity(&kind, app);
        }));
        self
    }

    /// Reads the configuration file at `path` instead of the default one.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = Some(path.into());
        self
    }

    /// Runs the node as a program: parses the command line (`--config`,
    /// `--print-config`), runs until SIGINT/SIGTERM or a drain, and exits
    /// the process (status 2 on a configuration error, 1 on another error).
    pub fn main(mut self) {
        let args = Args::parse();
        if args.config.is_some() {
            self.config = args.config;
        }
        if args.print_config {
            match self.load() {
                Ok(l) => {
                    for (k, v) in l.config.flatten() {
                        println!("{k} = {v}");
                    }
                    return;
                }
                Err(e) => {
                    eprintln!("berth: {e}");
                    std::process::exit(2);
                }
            }
        }
        match self.run() {
            Ok(()) => {}
            Err(e @ ServerError::Config(_)) => {
                eprintln!("berth: {e}");
                std::process::exit(2);
            }
            Err(e) => {
                eprintln!("berth: {e}");
                std::process::exit(1);
            }
        }
    }

    /// Runs the node on its own actix system until SIGINT/SIGTERM or a
    /// drain; answers once it has shut down.
    pub fn run(self) -> Result<(), ServerError> {
        let loaded = self.load()?;
        let Server {
            app,
            config,
            page,
            entities,
        } = self;
        actix_web::rt::System::new().block_on(run(app, entities, config, page, loaded))
    }

    fn load(&self) -> Result<config::Loaded, ServerError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        config::load(self.config.as_deref(), &env).map_err(|e| ServerError::Config(e.to_string()))
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn bind(key: &'static str, addr: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).map_err(|source| ServerError::Bind {
        key,
        addr: addr.to_owned(),
        source,
    })
}

fn build_store(cfg: &Config) -> Result<Arc<dyn CheckpointStore>, ServerError> {
    let ttl = Duration::from_secs(cfg.store.session_ttl_s);
    Ok(match &cfg.store.redis_url {
        Some(url) => Arc::new(
            RedisStore::new(RedisStoreConfig {
                url: url.clone(),
                key_prefix: cfg.store.key_prefix.clone(),
                session_ttl: ttl,
                op_timeout: Duration::from_millis(cfg.store.op_timeout_ms),
                batch_max: cfg.store.batch_max,
                batch_delay: Duration::from_micros(cfg.store.batch_delay_us),
                max_inflight: cfg.store.max_inflight_batches,
                wait_replicas: cfg.store.wait_replicas,
            })
            .map_err(|e| ServerError::Store(format!("store.redis_url: {e}")))?,
        ),
        None => {
            tracing::warn!("store.redis_url is not set: sessions are kept in memory only and are NOT durable (single node only)");
            Arc::new(MemoryStore::new(ttl))
        }
    })
}

/// Runs one node of `app` until SIGINT/SIGTERM or a drain, then shuts down
/// within the deadline.
pub(crate) async fn run<A: Session>(
    app: A,
    entities: Vec<Registration>,
    config_path: Option<PathBuf>,
    page: Option<&'static str>,
    loaded: config::Loaded,
) -> Result<(), ServerError> {
    let page = page.map(demo::Page::new);
    let cfg = loaded.config.clone();
    let log_handle = telemetry::init_logging(&cfg.log).map_err(ServerError::Telemetry)?;
    let prom = telemetry::init_metrics().map_err(ServerError::Telemetry)?;

    let public = bind("server.listen", &cfg.server.listen)?;
    let admin = bind("admin.listen", &cfg.admin.listen)?;
    let api = match cfg.api.enabled() {
        true => Some(bind("api.listen", &cfg.api.listen)?),
        false => None,
    };
    let public_addr = public.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let node_id = cfg
        .cluster
        .node_id
        .clone()
        .unwrap_or_else(|| format!("{}:{}", host_name(), public_addr.port()));

    let store = build_store(&cfg)?;
    let host = Host::new(
        app,
        store.clone(),
        HostConfig {
            node_id: node_id.clone(),
            detach_timeout: Duration::from_secs(cfg.session.detach_timeout_s),
            unwritten_detach_timeout: Duration::from_secs(cfg.session.unwritten_detach_timeout_s),
            durability: match cfg.store.durability {
                DurabilityMode::Sync => Durability::Sync,
                DurabilityMode::Interval => Durability::Interval,
            },
            checkpoint_interval: Duration::from_millis(cfg.store.checkpoint_interval_ms),
            touch_after: Duration::from_secs(cfg.store.session_ttl_s / 4),
            lease: Duration::from_millis(cfg.cluster.ttl_ms),
            handler_timeout: Duration::from_millis(cfg.session.handler_timeout_ms),
        },
        cfg.session_limits(),
    );
    for register in entities {
        register(&host);
    }
    let workers = if cfg.server.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.server.workers
    };

    // Cluster: membership, ring, peer links.
    let me = MemberId(node_id.clone());
    let clustered = cfg.cluster.consul_addr.is_some() || cfg.cluster.members.len() > 1;
    let peer_listener = if clustered {
        Some(bind("cluster.peer_listen", &cfg.cluster.peer_listen)?)
    } else {
        None
    };
    let peer_addr = match (&cfg.cluster.advertise, &peer_listener) {
        (Some(a), _) => a.clone(),
        (None, Some(l)) => {
            let a = l.local_addr()?;
            if a.ip().is_unspecified() {
                format!("{}:{}", host_name(), a.port())
            } else {
                a.to_string()
            }
        }
        (None, None) => cfg.cluster.peer_listen.clone(),
    };
    let self_member = Member {
        id: me.clone(),
        peer: peer_addr.clone(),
        public: Some(public_addr.to_string()),
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    };
    // Set by the health loop once the store answers: the node joins the
    // ring only when it can activate sessions.
    let (serving, serving_rx) = tokio::sync::watch::channel(false);
    let membership = Arc::new(match &cfg.cluster.consul_addr {
        Some(addr) => {
            let mut c = ConsulConfig::new(addr.clone(), cfg.cluster.service.clone());
            c.ttl = Duration::from_millis(cfg.cluster.ttl_ms);
            c.token = cfg
                .cluster
                .consul_token()
                .map_err(|(key, why)| ServerError::Config(format!("{key}: {why}")))?;
            spawn_consul(c, self_member.clone(), serving_rx)
                .map_err(|e| ServerError::Cluster(format!("cluster.consul_addr: {e}")))?
        }
        None if cfg.cluster.members.is_empty() => static_membership(vec![self_member.clone()]),
        None => static_membership(
            cfg.cluster
                .members
                .iter()
                .filter_map(|m| m.split_once('='))
                .map(|(id, addr)| Member {
                    id: MemberId(id.to_owned()),
                    peer: addr.to_owned(),
                    public: None,
                    version: None,
                })
                .collect(),
        ),
    });
    let credentials = cfg
        .auth
        .verifier()
        .map_err(|(key, why)| ServerError::Config(format!("{key}: {why}")))?;
    if credentials.has_keys() {
        tracing::info!(
            required = cfg.auth.required,
            "client credentials: hello.credential is verified (JWT)"
        );
    }
    let peer_tls = cfg
        .cluster
        .tls
        .load()
        .map_err(|(key, why)| ServerError::Config(format!("{key}: {why}")))?;
    if clustered {
        match &peer_tls {
            Some(_) => tracing::info!(
                server_name = %cfg.cluster.tls.server_name,
                "peer links: TLS 1.3, both sides verified against the cluster CA"
            ),
            None => tracing::warn!(
                "peer links are NOT encrypted (cluster.tls unset): session traffic crosses \
                 the network in clear text, authenticated only by cluster.secret; fine on \
                 loopback, set cluster.tls on any real network (docs/operations.md)"
            ),
        }
    }
    let auth = berth_cluster::peer::PeerAuth::new(
        cfg.cluster.secret.clone().unwrap_or_default().into_bytes(),
        cfg.cluster
            .accept_secrets
            .iter()
            .map(|s| s.clone().into_bytes()),
    )
    .with_contract(berth_cluster::ring::RingContract::new(cfg.cluster.vnodes))
    .with_tls(peer_tls);
    let arbiters: Vec<_> = (0..workers)
        .map(|_| actix::Arbiter::new().handle())
        .collect();
    let router = Router::new(
        RouterConfig {
            me: me.clone(),
            clustered,
            vnodes: cfg.cluster.vnodes,
            auth: auth.clone(),
            peer_timeout: Duration::from_millis(cfg.cluster.peer_timeout_ms),
            // The owner may wait on the store twice (activation, then the
            // lease check), each up to store.op_timeout_ms.
            attach_timeout: Duration::from_millis(
                cfg.cluster.peer_timeout_ms + 2 * cfg.store.op_timeout_ms,
            ),
            new_sessions_local: cfg.cluster.new_sessions_local,
        },
        host.clone(),
        membership.view(),
        arbiters,
    );
    let peer_handle = match peer_listener {
        Some(l) => {
            l.set_nonblocking(true)?;
            let r = router.clone();
            Some(
                berth_cluster::peer::spawn_listener_on(
                    tokio::net::TcpListener::from_std(l)?,
                    me.clone(),
                    auth.clone(),
                    router.handler(),
                    move |link| r.adopt_link(link),
                )
                .await
                .map_err(|e| ServerError::Cluster(format!("peer listener: {e}")))?,
            )
        }
        None => None,
    };
    let views = {
        let router = router.clone();
        let mut rx = membership.subscribe();
        actix_web::rt::spawn(async move {
            loop {
                let view = rx.borrow_and_update().clone();
                router.apply_view(view).await;
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let node = web::Data::new(Node::new(
        node_id.clone(),
        cfg.clone(),
        host.clone(),
        router.clone(),
        membership.clone(),
        serving,
        credentials,
    ));
    router.set_sampler(crate::dashboard::sampler(&node, prom.clone()));
    let deadline = Duration::from_millis(cfg.shutdown.deadline_ms);
    let n = node.clone();
    let script = web::Data::new(demo::ClientScript::default());
    let public_server = HttpServer::new(move || {
        App::new()
            .app_data(n.clone())
            .app_data(script.clone())
            .route("/ws", web::get().to(edge::ws_route))
            .route("/berth.js", web::get().to(demo::client_script))
            .configure(|c| {
                if let Some(p) = &page {
                    c.app_data(web::Data::new(p.clone()))
                        .route("/", web::get().to(demo::page))
                        .route("/index.html", web::get().to(demo::page));
                }
            })
    })
    .workers(workers)
    .disable_signals()
    .backlog(4096)
    .max_connections(cfg.server.max_connections.saturating_add(1024) / workers)
    .shutdown_timeout(deadline.as_secs().max(1))
    .listen(public)?
    .run();
    let (n, p) = (node.clone(), web::Data::new(prom.clone()));
    let admin_server = HttpServer::new(move || {
        App::new()
            .app_data(n.clone())
            .app_data(p.clone())
            .configure(admin::routes)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(admin)?
    .run();
    let api_addr = api.as_ref().map(|l| l.local_addr()).transpose()?;
    let api_server = match api {
        Some(l) => Some(crate::api::server(node.clone(), l, 1)?),
        None => None,
    };
    let public_handle = public_server.handle();
    let admin_handle = admin_server.handle();
    let api_handle = api_server.as_ref().map(|s| s.handle());
    let servers = actix_web::rt::spawn(async move {
        let api = async move {
            if let Some(s) = api_server {
                let _ = s.await;
            }
        };
        futures_util::future::join3(public_server, admin_server, api).await
    });

    tracing::info!(
        node = %node_id,
        public = %public_addr,
        admin = %admin_addr,
        api = ?api_addr,
        store = %store.describe(),
        durability = ?cfg.store.durability,
        config_file = ?loaded.file,
        "berth node started"
    );
    // One machine-readable line for scripts and tests.
    println!(
        "berth listening public={public_addr} admin={admin_addr} node={node_id} peer={peer_addr}"
    );
    let _ = std::io::stdout().flush();

    let health = actix_web::rt::spawn(health_loop(node.clone().into_inner()));
    let isolation = actix_web::rt::spawn(isolation::run(node.clone().into_inner()));
    let timers = actix_web::rt::spawn(timer_loop(node.clone().into_inner()));
    let upkeep = {
        let prom = prom.clone();
        actix_web::rt::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(5));
            loop {
                t.tick().await;
                prom.run_upkeep();
            }
        })
    };

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut drain = node.drain_requested.subscribe();
    let close_code = loop {
        tokio::select! {
            _ = hup.recv() => reload(config_path.as_deref(), &node, &log_handle),
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break CloseCode::GoingAway; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break CloseCode::GoingAway; }
            _ = drain.wait_for(|d| *d) => { tracing::info!("drain requested: handing off and leaving"); break CloseCode::Restart; }
        }
    };

    // Shutdown: refuse new work, leave the cluster and hand sessions off,
    // checkpoint and close what is left, stop.
    // Every step below is bounded by what is left of the deadline, and the
    // last steps (deregistering, closing peer links) keep a reserve, so the
    // whole shutdown ends within `shutdown.deadline_ms`.
    let started = Instant::now();
    let end = started + deadline;
    let left = || end.saturating_duration_since(Instant::now());
    let reserve = (deadline / 10).min(Duration::from_secs(1));
    let close_code = if clustered {
        CloseCode::Restart
    } else {
        close_code
    };
    node.set_shutdown_code(close_code);
    // New WebSocket upgrades are answered 503 from here on (src/edge.rs);
    // the listener is not paused: a paused one leaves connections in its
    // backlog unanswered until it closes, and a proxy's resume waits on them.
    node.stopping.send_replace(true);
    if clustered {
        membership.leave();
        if tokio::time::timeout(deadline / 2, router.leave())
            .await
            .is_err()
        {
            tracing::warn!("handing sessions off took longer than half the shutdown deadline");
        }
    }
    let report = host
        .shutdown(
            close_code,
            deadline.mul_f32(0.4).min(left().saturating_sub(reserve)),
        )
        .await;
    tracing::info!(
        checkpointed = report.checkpointed,
        failed = report.failed,
        timed_out = report.timed_out,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "sessions checkpointed"
    );
    let stop = async {
        public_handle.stop(true).await;
        admin_handle.stop(true).await;
        if let Some(h) = api_handle {
            h.stop(true).await;
        }
    };
    if tokio::time::timeout(left().saturating_sub(reserve), stop)
        .await
        .is_err()
    {
        tracing::warn!("listeners did not stop within the shutdown deadline");
    }
    membership
        .shutdown(left().min(Duration::from_secs(1)))
        .await;
    if let Some(p) = peer_handle {
        if tokio::time::timeout(left(), p.shutdown()).await.is_err() {
            tracing::warn!("peer links did not close within the shutdown deadline");
        }
    }
    views.abort();
    health.abort();
    isolation.abort();
    timers.abort();
    upkeep.abort();
    servers.abort();
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "berth node stopped"
    );
    Ok(())
}

/// Checks the store now and then; readiness follows it, and so does
/// `node.serving` (ring membership): true from the first answer, false once
/// the store has failed for `cluster.unready_leave_ms`.
async fn health_loop(node: Arc<Node>) {
    let every = Duration::from_millis(node.cfg.store.health_interval_ms);
    let leave_after = Duration::from_millis(node.cfg.cluster.unready_leave_ms);
    let store = node.host.store().clone();
    let mut was_ok: Option<bool> = None;
    let mut failing_since: Option<Instant> = None;
    loop {
        let r = store.ping().await;
        let ok = r.is_ok();
        let serving = if ok {
            failing_since = None;
            true
        } else {
            let since = *failing_since.get_or_insert_with(Instant::now);
            *node.serving.borrow() && since.elapsed() < leave_after
        };
        node.serving
            .send_if_modified(|s| std::mem::replace(s, serving) != serving);
        {
            let mut rd = node.readiness.lock().unwrap_or_else(|p| p.into_inner());
            rd.store_seen = true;
            rd.store_error = r.as_ref().err().map(|e| e.to_string());
        }
        metrics::gauge!("berth_store_up").set(if ok { 1.0 } else { 0.0 });
        let ready = node.not_ready_reasons().is_empty();
        metrics::gauge!("berth_ready").set(if ready { 1.0 } else { 0.0 });
        if was_ok != Some(ok) {
            match &r {
                Ok(()) => tracing::info!(store = %store.describe(), "store reachable"),
                Err(e) => {
                    tracing::warn!(store = %store.describe(), error = %e, "store unreachable: state-changing ops answer `unavailable` until it returns")
                }
            }
            was_ok = Some(ok);
        }
        tokio::time::sleep(every).await;
    }
}

/// Wakes passivated sessions this node owns whose timer is due (one store
/// query per `session.timer_scan_ms`); live sessions fire their own timers.
async fn timer_loop(node: Arc<Node>) {
    let mut every = tokio::time::interval(Duration::from_millis(node.cfg.session.timer_scan_ms));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if *node.stopping.borrow() {
            return;
        }
        let router = node.router.clone();
        node.host.wake_due(|id| router.owns(id), 256).await;
    }
}

/// SIGHUP: re-read every source; apply what can change at run time.
fn reload(config_path: Option<&Path>, node: &Node, log: &telemetry::LogHandle) {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let new = match config::load(config_path, &env) {
        Ok(l) => l.config,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration rejected; keeping the running one");
            return;
        }
    };
    let current = Config {
        limits: (*node.limits()).clone(),
        log: config::LogConfig {
            filter: node_log_filter(log).unwrap_or_else(|| node.cfg.log.filter.clone()),
            ..node.cfg.log.clone()
        },
        ..node.cfg.clone()
    };
    let (old, fresh) = (current.flatten(), new.flatten());
    let mut applied = Vec::new();
    let mut restart = Vec::new();
    for (k, v) in &fresh {
        if old.get(k) == Some(v) {
            continue;
        }
        let change = format!("{k}: {} -> {v}", old.get(k).map_or("unset", String::as_str));
        if k.starts_with("limits.") || k == "log.filter" || k.starts_with("api.keys") {
            applied.push(change);
        } else {
            restart.push(change);
        }
    }
    if new.log.filter != current.log.filter {
        match tracing_subscriber::EnvFilter::try_new(&new.log.filter) {
            Ok(f) => {
                let _ = log.reload(f);
            }
            Err(e) => tracing::error!(error = %e, "SIGHUP: bad log.filter"),
        }
    }
    node.set_limits(new.limits.clone());
    node.host.set_limits(new.session_limits());
    // The backend API's keys (rotation): every source read again.
    match new.api.load_keys() {
        Ok(keys) if node.cfg.api.enabled() => {
            node.api_keys.replace(&keys);
            tracing::info!(keys = keys.len(), "SIGHUP: backend API keys reloaded");
        }
        Ok(_) => {}
        Err((key, why)) => tracing::error!(
            key,
            why,
            "SIGHUP: backend API keys rejected; keeping the current ones"
        ),
    }
    let adm = new.admission();
    node.admission.set_rate(adm.per_sec, adm.burst);
    if applied.is_empty() && restart.is_empty() {
        tracing::info!("SIGHUP: configuration reloaded, nothing changed");
    }
    for c in &applied {
        tracing::info!(change = %c, "SIGHUP: applied");
    }
    for c in &restart {
        tracing::warn!(change = %c, "SIGHUP: changed, takes effect after a restart");
    }
}

fn node_log_filter(log: &telemetry::LogHandle) -> Option<String> {
    log.with_current(|f| f.to_string()).ok()
}
