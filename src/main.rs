//! `berth`: one node of the berth session cluster.
//!
//! This binary is glue: it loads the configuration, builds the checkpoint
//! store and the session host (crate `berth-actors`), serves the public
//! WebSocket endpoint (`edge`) and the operator endpoint (`admin`), and runs
//! the node's lifecycle: readiness checks, SIGHUP reloads, drain and shutdown.
//!
//! # Layout
//! - `config`: configuration sections, sources and validation.
//! - `edge`: client WebSocket connections and the demo page.
//! - `admin`: health, metrics, cluster view, drain.
//! - `node`: state shared by the handlers.
//! - `isolation`: a node cut off from Consul (and its peers) excludes itself.
//! - `telemetry`: logs and metrics set-up.
//!
//! # Lifecycle
//! Start: bind both listeners (port 0 allowed), print one line
//! `berth listening public=ADDR admin=ADDR node=ID` on stdout, serve.
//! SIGHUP: reload the configuration; apply `[limits]` and `log.filter`, log
//! every other change as needing a restart. SIGINT/SIGTERM (or `POST /drain`,
//! which closes clients with 1012 instead of 1001): readiness turns 503, new
//! connections are refused, every live session is checkpointed and its client
//! closed, the listeners stop, the process exits, all within
//! `shutdown.deadline_ms`.

#![forbid(unsafe_code)]

mod admin;
mod admission;
mod config;
mod edge;
mod isolation;
mod node;
mod router;
mod telemetry;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpServer};
use anyhow::Context;
use berth_actors::host::{Durability, Host, HostConfig};
use berth_actors::kv::KvApp;
use berth_actors::protocol::CloseCode;
use berth_actors::store::memory::MemoryStore;
use berth_actors::store::redis::{RedisStore, RedisStoreConfig};
use berth_actors::store::CheckpointStore;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use berth_cluster::membership::{spawn_consul, static_membership, ConsulConfig, Member};
use berth_cluster::ring::MemberId;

use crate::config::{Config, DurabilityMode};
use crate::node::Node;
use crate::router::{Router, RouterConfig};

/// One node of the berth session cluster.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Default: $BERTH_CONFIG, else config/berth.toml when present.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() {
    let args = Args::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let loaded = match config::load(args.config.as_deref(), &env) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("berth: configuration error: {e}");
            std::process::exit(2);
        }
    };
    if args.print_config {
        for (k, v) in loaded.config.flatten() {
            println!("{k} = {v}");
        }
        return;
    }
    if let Err(e) = actix_web::rt::System::new().block_on(run(args, loaded)) {
        eprintln!("berth: {e:#}");
        std::process::exit(1);
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

fn build_store(cfg: &Config) -> anyhow::Result<Arc<dyn CheckpointStore>> {
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
            .context("store.redis_url")?,
        ),
        None => {
            tracing::warn!("store.redis_url is not set: sessions are kept in memory only and are NOT durable (single node only)");
            Arc::new(MemoryStore::new(ttl))
        }
    })
}

async fn run(args: Args, loaded: config::Loaded) -> anyhow::Result<()> {
    let cfg = loaded.config.clone();
    let log_handle = telemetry::init_logging(&cfg.log)?;
    let prom = telemetry::init_metrics()?;

    let public = TcpListener::bind(&cfg.server.listen)
        .with_context(|| format!("binding server.listen {}", cfg.server.listen))?;
    let admin = TcpListener::bind(&cfg.admin.listen)
        .with_context(|| format!("binding admin.listen {}", cfg.admin.listen))?;
    let public_addr = public.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let node_id = cfg
        .cluster
        .node_id
        .clone()
        .unwrap_or_else(|| format!("{}:{}", host_name(), public_addr.port()));

    let store = build_store(&cfg)?;
    let host = Host::new(
        KvApp,
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
        },
        cfg.session_limits(),
    );
    let workers = if cfg.server.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.server.workers
    };

    // Cluster: membership, ring, peer links.
    let me = MemberId(node_id.clone());
    let clustered = cfg.cluster.consul_addr.is_some() || cfg.cluster.members.len() > 1;
    let peer_listener = if clustered {
        Some(
            std::net::TcpListener::bind(&cfg.cluster.peer_listen).with_context(|| {
                format!("binding cluster.peer_listen {}", cfg.cluster.peer_listen)
            })?,
        )
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
                .map_err(|(key, why)| anyhow::anyhow!("{key}: {why}"))?;
            spawn_consul(c, self_member.clone(), serving_rx).context("cluster.consul_addr")?
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
    let peer_tls = cfg
        .cluster
        .tls
        .load()
        .map_err(|(key, why)| anyhow::anyhow!("{key}: {why}"))?;
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
                .await?,
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
    ));
    let deadline = Duration::from_millis(cfg.shutdown.deadline_ms);
    let n = node.clone();
    let public_server = HttpServer::new(move || {
        App::new()
            .app_data(n.clone())
            .route("/ws", web::get().to(edge::ws_route))
            .route("/", web::get().to(edge::demo_page))
            .route("/index.html", web::get().to(edge::demo_page))
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
    let public_handle = public_server.handle();
    let admin_handle = admin_server.handle();
    let servers = actix_web::rt::spawn(async move {
        futures_util::future::join(public_server, admin_server).await
    });

    tracing::info!(
        node = %node_id,
        public = %public_addr,
        admin = %admin_addr,
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
            _ = hup.recv() => reload(&args, &node, &log_handle),
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
    node.stopping.send_replace(true);
    if tokio::time::timeout(left(), public_handle.pause())
        .await
        .is_err()
    {
        tracing::warn!("the public listener did not pause within the shutdown deadline");
    }
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

/// SIGHUP: re-read every source; apply what can change at run time.
fn reload(args: &Args, node: &Node, log: &telemetry::LogHandle) {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let new = match config::load(args.config.as_deref(), &env) {
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
        if k.starts_with("limits.") || k == "log.filter" {
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
