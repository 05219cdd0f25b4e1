//! Membership: who is in the cluster right now.
//!
//! A [`MembershipHandle`] publishes the current [`View`] on a `watch` channel.
//! Two sources:
//! - **static**: a fixed member list from configuration (a single node with no
//!   configuration at all is a cluster of one);
//! - **Consul**: the node registers itself as an instance of the service with a
//!   TTL check that it passes several times per TTL, and watches the passing
//!   instances with blocking queries.
//!
//! A node is in the passing set only while it can serve: the registrar passes
//! its check only while the caller's `serving` signal is true (a node whose
//! store is not reachable yet registers as critical and joins when it is), and
//! marks it critical when the signal turns false.
//!
//! A Consul error never empties the view: it is logged and the last known view
//! is kept (garage's `discovery_loop` rule), while [`MembershipHandle::health`]
//! reports since when Consul has been failing so readiness can say so after a
//! grace period. Every loop stops on [`MembershipHandle::shutdown`], which
//! deregisters first, within a deadline.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::consul::{duration_text, ConsulClient, ConsulError, Registration, TtlCheck};
use crate::ring::MemberId;

/// Metadata key of a member's peer address.
pub const META_PEER: &str = "peer";
/// Metadata key of a member's public (client) address.
pub const META_PUBLIC: &str = "public";
/// Metadata key of a member's berth version.
pub const META_VERSION: &str = "version";

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// Member id (the node id).
    pub id: MemberId,
    /// Where its peer listener is reached.
    pub peer: String,
    /// Its public endpoint, if known.
    pub public: Option<String>,
    /// Its berth version, if known.
    pub version: Option<String>,
}

/// Where a view came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Configuration.
    Static,
    /// Consul, at this raft index.
    Consul {
        /// `X-Consul-Index` of the answer.
        index: u64,
    },
    /// Nothing heard yet.
    Unknown,
}

/// The members, sorted by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Members, sorted by id, without duplicates.
    pub members: Vec<Member>,
    /// Where the view came from.
    pub source: Source,
}

impl View {
    fn new(mut members: Vec<Member>, source: Source) -> Self {
        members.sort();
        members.dedup_by(|a, b| a.id == b.id);
        View { members, source }
    }

    /// The member ids.
    pub fn ids(&self) -> impl Iterator<Item = &MemberId> {
        self.members.iter().map(|m| &m.id)
    }

    /// A member by id.
    pub fn get(&self, id: &MemberId) -> Option<&Member> {
        self.members.iter().find(|m| &m.id == id)
    }
}

/// How membership is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The last error, while failing.
    pub last_error: Option<String>,
    /// Since when calls have been failing.
    pub failing_since: Option<Instant>,
    /// Whether this node is currently registered (Consul).
    pub registered: bool,
}

/// Settings of Consul membership.
#[derive(Debug, Clone)]
pub struct ConsulConfig {
    /// Agent HTTP address, e.g. `http://127.0.0.1:8500`.
    pub addr: String,
    /// Service name all nodes register under.
    pub service: String,
    /// TTL of the node's check: a node that stops passing leaves the passing
    /// set about this long after its last pass.
    pub ttl: Duration,
    /// How many times per TTL the check is passed.
    pub passes_per_ttl: u32,
    /// Consul removes a critical instance after this (Consul's floor is 1 min).
    pub deregister_after: Duration,
    /// Longest wait of a blocking query.
    pub wait: Duration,
    /// Bound on every non-blocking call.
    pub call_timeout: Duration,
}

impl ConsulConfig {
    /// Defaults for `addr` and `service`: TTL 1 s passed 4 times per TTL,
    /// deregistration after 1 min, 10 s blocking waits, 1 s call timeout.
    pub fn new(addr: impl Into<String>, service: impl Into<String>) -> Self {
        ConsulConfig {
            addr: addr.into(),
            service: service.into(),
            ttl: Duration::from_secs(1),
            passes_per_ttl: 4,
            deregister_after: Duration::from_secs(60),
            wait: Duration::from_secs(10),
            call_timeout: Duration::from_secs(1),
        }
    }
}

struct Shared {
    health: Mutex<Health>,
}

impl Shared {
    fn ok(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.last_error = None;
        h.failing_since = None;
    }

    fn failed(&self, e: &ConsulError) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.last_error = Some(e.to_string());
        h.failing_since.get_or_insert_with(Instant::now);
    }

    fn set_registered(&self, r: bool) {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .registered = r;
    }
}

/// A running membership source.
pub struct MembershipHandle {
    view: watch::Receiver<Arc<View>>,
    shared: Arc<Shared>,
    stop: watch::Sender<Stop>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    /// Deregister but keep watching (drain).
    Leave,
    /// Deregister and stop every loop.
    Halt,
}

impl MembershipHandle {
    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// A receiver of every new view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    /// How membership is doing.
    pub fn health(&self) -> Health {
        self.shared
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Leaves the cluster (deregisters) but keeps watching the others: the first
    /// step of a drain.
    pub fn leave(&self) {
        let _ = self.stop.send(Stop::Leave);
    }

    /// Deregisters and stops every loop, within `deadline`.
    pub async fn shutdown(&self, deadline: Duration) {
        let _ = self.stop.send(Stop::Halt);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let all = futures_join(tasks);
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!("membership did not stop within {deadline:?}");
        }
    }
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

impl Drop for MembershipHandle {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

/// A fixed member list (never changes).
pub fn static_membership(members: Vec<Member>) -> MembershipHandle {
    let (_tx, view) = watch::channel(Arc::new(View::new(members, Source::Static)));
    let (stop, _) = watch::channel(Stop::Run);
    MembershipHandle {
        view,
        shared: Arc::new(Shared {
            health: Mutex::new(Health {
                registered: true,
                ..Health::default()
            }),
        }),
        stop,
        tasks: Mutex::new(Vec::new()),
    }
}

fn member_of(i: crate::consul::Instance) -> Member {
    let meta = i.meta.unwrap_or_default();
    Member {
        id: MemberId(i.id),
        peer: meta
            .get(META_PEER)
            .cloned()
            .unwrap_or_else(|| format!("{}:{}", i.address, i.port)),
        public: meta.get(META_PUBLIC).cloned(),
        version: meta.get(META_VERSION).cloned(),
    }
}

/// Registers `me` in Consul, keeps its TTL check passing while `serving` is
/// true (critical while it is false: the others do not route to a node that
/// cannot activate sessions), and watches the service's passing instances.
/// Must be called inside a tokio runtime.
pub fn spawn_consul(
    cfg: ConsulConfig,
    me: Member,
    serving: watch::Receiver<bool>,
) -> Result<MembershipHandle, ConsulError> {
    let client = ConsulClient::new(&cfg.addr, cfg.call_timeout)?;
    let (tx, view) = watch::channel(Arc::new(View::new(Vec::new(), Source::Unknown)));
    let (stop, stop_rx) = watch::channel(Stop::Run);
    let shared = Arc::new(Shared {
        health: Mutex::new(Health::default()),
    });
    let registrar = tokio::spawn(run_registrar(
        client.clone(),
        cfg.clone(),
        me,
        shared.clone(),
        stop_rx.clone(),
        serving,
    ));
    let watcher = tokio::spawn(run_watcher(client, cfg, tx, shared.clone(), stop_rx));
    Ok(MembershipHandle {
        view,
        shared,
        stop,
        tasks: Mutex::new(vec![registrar, watcher]),
    })
}

fn check_id(me: &Member) -> String {
    format!("berth-ttl-{}", me.id)
}

async fn run_registrar(
    client: ConsulClient,
    cfg: ConsulConfig,
    me: Member,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Stop>,
    mut serving: watch::Receiver<bool>,
) {
    let (host, port) = match me.peer.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().unwrap_or(0)),
        None => (me.peer.clone(), 0),
    };
    let mut meta = BTreeMap::new();
    meta.insert(META_PEER.to_owned(), me.peer.clone());
    if let Some(p) = &me.public {
        meta.insert(META_PUBLIC.to_owned(), p.clone());
    }
    if let Some(v) = &me.version {
        meta.insert(META_VERSION.to_owned(), v.clone());
    }
    let mut reg = Registration {
        id: me.id.to_string(),
        name: cfg.service.clone(),
        address: host,
        port,
        meta,
        check: TtlCheck {
            check_id: check_id(&me),
            ttl: duration_text(cfg.ttl),
            deregister_critical_service_after: duration_text(cfg.deregister_after),
            status: "passing".into(),
        },
    };
    let every = cfg.ttl / cfg.passes_per_ttl.max(1);
    let mut registered = false;
    // What the check last said: `Some(true)` passing, `Some(false)` critical.
    let mut said: Option<bool> = None;
    client.pin().await;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let state = *stop.borrow();
        if state != Stop::Run {
            break;
        }
        let ready = *serving.borrow_and_update();
        let agent = client.pinned();
        let r = if !registered {
            reg.check.status = if ready { "passing" } else { "critical" }.into();
            client.register(&reg, cfg.call_timeout).await
        } else if ready {
            client.pass(&check_id(&me), cfg.call_timeout).await
        } else if said != Some(false) {
            client.fail(&check_id(&me), cfg.call_timeout).await
        } else {
            Ok(()) // critical already: nothing to say until it can serve
        };
        match r {
            Ok(()) => {
                if !registered {
                    tracing::info!(member = %me.id, service = %cfg.service, serving = ready, "registered in consul");
                }
                if registered && said != Some(ready) {
                    if ready {
                        tracing::info!(member = %me.id, "ready to serve: passing the consul check, joining the ring");
                    } else {
                        tracing::warn!(member = %me.id, "cannot serve: consul check marked critical, leaving the ring until ready");
                    }
                }
                registered = true;
                said = Some(ready);
                shared.set_registered(true);
                shared.ok();
            }
            Err(e) => {
                // A failed pass may mean the agent lost the registration (restart):
                // register again next time.
                tracing::warn!(member = %me.id, error = %e, "consul registration/TTL pass failed; keeping the last known view");
                registered = false;
                said = None;
                if matches!(e, ConsulError::Unreachable(_)) {
                    // That agent is gone: register with another one.
                    client.repin(agent).await;
                }
                shared.set_registered(false);
                shared.failed(&e);
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
            // A change of readiness is said at once, not at the next tick.
            r = serving.changed() => {
                if r.is_err() {
                    // The signal's owner is gone: keep the last value.
                    tick.tick().await;
                }
            }
        }
    }
    // Leave or halt: deregister first so the others drop us at once.
    match client
        .deregister(&me.id.to_string(), cfg.call_timeout)
        .await
    {
        Ok(()) => tracing::info!(member = %me.id, "deregistered from consul"),
        Err(e) => {
            tracing::warn!(member = %me.id, error = %e, "consul deregistration failed; the TTL check will lapse")
        }
    }
    shared.set_registered(false);
}

async fn run_watcher(
    client: ConsulClient,
    cfg: ConsulConfig,
    tx: watch::Sender<Arc<View>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Stop>,
) {
    let mut index = 0u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() == Stop::Halt {
            return;
        }
        let agent = client.pinned();
        let query = client.passing(&cfg.service, index, cfg.wait, cfg.call_timeout);
        let r = tokio::select! {
            r = query => r,
            _ = stop.wait_for(|s| *s == Stop::Halt) => return,
        };
        match r {
            Ok((new_index, instances)) => {
                backoff = Duration::from_millis(100);
                shared.ok();
                // Consul's rule: an index that goes backwards resets the watch.
                index = if new_index < index { 0 } else { new_index };
                let view = View::new(
                    instances.into_iter().map(member_of).collect(),
                    Source::Consul { index: new_index },
                );
                if tx.borrow().members != view.members {
                    tracing::info!(members = ?view.members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), index = new_index, "membership changed");
                    tx.send_replace(Arc::new(view));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "consul watch failed; keeping the last known view");
                shared.failed(&e);
                if matches!(e, ConsulError::Unreachable(_)) {
                    client.repin(agent).await;
                }
                index = 0;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s == Stop::Halt) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
