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
//! grace period. The registrar and the watcher fail separately (under a
//! default-deny ACL policy a node without a usable token cannot register, yet
//! its health queries succeed with an empty, filtered answer), so health is
//! failing while either is. A refused token ([`ConsulError::Forbidden`]) is
//! logged as such and flagged in [`Health::forbidden`]. Every loop stops on [`MembershipHandle::shutdown`], which
//! deregisters first, within a deadline.
//!
//! **Lapsed check.** Keeping the last view is right while nobody can change
//! it, but a node cut off from Consul alone is dropped by the others once its
//! check has not been passed for a TTL, and they take its sessions. The
//! registrar keeps the instant its last successful call *started*
//! (registration, pass or fail: Consul heard this node); once a full TTL has
//! gone by without one, [`MembershipHandle::check_lapsed`] is true (rule:
//! [`lapsed`]): the others may have dropped this node by now. Whether they
//! did is the caller's question to its peers (berth's isolation rule).

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
    /// Whether Consul refused the token (HTTP 403: unknown token, or a policy
    /// that does not allow registration or the health query) on the last
    /// failed call of the registrar or the watcher.
    pub forbidden: bool,
}

/// Settings of Consul membership.
#[derive(Clone)]
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
    /// ACL token sent with every call (`X-Consul-Token`); `None`: none (the
    /// agent's anonymous token applies). A secret: `Debug` masks it.
    pub token: Option<String>,
}

impl std::fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("addr", &self.addr)
            .field("service", &self.service)
            .field("ttl", &self.ttl)
            .field("passes_per_ttl", &self.passes_per_ttl)
            .field("deregister_after", &self.deregister_after)
            .field("wait", &self.wait)
            .field("call_timeout", &self.call_timeout)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
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
            token: None,
        }
    }
}

/// Which loop a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Registrar,
    Watcher,
}

/// One loop's failure, while it lasts.
#[derive(Debug, Default)]
struct Failure {
    error: Option<ConsulError>,
    since: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    registrar: Failure,
    watcher: Failure,
    registered: bool,
    /// When the registrar's last successful call started.
    last_contact: Option<Instant>,
}

/// Whether this node's check may have lapsed in Consul: a node that has been
/// in contact (`last_contact`: when its last successful registration, pass or
/// fail started) and has not been for a full `ttl` since. Timed from the
/// call's start, so it turns true no later than Consul's own TTL runs out.
/// A node never in contact has nothing to lapse (it is in nobody's view).
pub fn lapsed(last_contact: Option<Instant>, now: Instant, ttl: Duration) -> bool {
    last_contact.is_some_and(|t| now.saturating_duration_since(t) >= ttl)
}

impl State {
    fn part(&mut self, part: Part) -> &mut Failure {
        match part {
            Part::Registrar => &mut self.registrar,
            Part::Watcher => &mut self.watcher,
        }
    }

    fn health(&self) -> Health {
        let errors = [&self.registrar.error, &self.watcher.error];
        Health {
            // The registrar's error first: it is the one that keeps this
            // node out of the passing set.
            last_error: errors
                .iter()
                .find_map(|e| e.as_ref().map(|e| e.to_string())),
            failing_since: [self.registrar.since, self.watcher.since]
                .into_iter()
                .flatten()
                .min(),
            registered: self.registered,
            forbidden: errors
                .iter()
                .any(|e| matches!(e, Some(ConsulError::Forbidden { .. }))),
        }
    }
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn new(registered: bool) -> Self {
        Shared {
            state: Mutex::new(State {
                registered,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ok(&self, part: Part) {
        *self.lock().part(part) = Failure::default();
    }

    fn failed(&self, part: Part, e: &ConsulError) {
        let mut s = self.lock();
        let f = s.part(part);
        f.error = Some(e.clone());
        f.since.get_or_insert_with(Instant::now);
    }

    fn set_registered(&self, r: bool) {
        self.lock().registered = r;
    }

    fn contact(&self, started: Instant) {
        let mut s = self.lock();
        if s.last_contact.is_none_or(|t| t < started) {
            s.last_contact = Some(started);
        }
    }
}

/// Says that Consul refused the token at once, then at most every 30 s while
/// it goes on (the registrar retries four times per TTL).
#[derive(Debug, Default)]
struct RefusedLog {
    last: Option<Instant>,
}

impl RefusedLog {
    const EVERY: Duration = Duration::from_secs(30);

    fn due(&mut self) -> bool {
        let due = self.last.is_none_or(|t| t.elapsed() >= Self::EVERY);
        if due {
            self.last = Some(Instant::now());
        }
        due
    }

    fn reset(&mut self) {
        self.last = None;
    }
}

/// What a refused token needs, for the log.
fn refused_hint(client: &ConsulClient) -> &'static str {
    if client.has_token() {
        "check cluster.consul_token: it must exist and its policy must allow service:write on the service and node:read"
    } else {
        "no token is configured and the anonymous token may not do this: set cluster.consul_token or cluster.consul_token_file"
    }
}

/// A running membership source.
pub struct MembershipHandle {
    view: watch::Receiver<Arc<View>>,
    shared: Arc<Shared>,
    /// The check's TTL (Consul); `None`: static membership, which never lapses.
    ttl: Option<Duration>,
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
        self.shared.lock().health()
    }

    /// Whether this node's Consul check may have lapsed: no registration or
    /// pass has succeeded for a full TTL (see [`lapsed`]). Never with static
    /// membership, nor after [`MembershipHandle::leave`].
    pub fn check_lapsed(&self) -> bool {
        self.ttl.is_some_and(|ttl| {
            *self.stop.borrow() == Stop::Run
                && lapsed(self.shared.lock().last_contact, Instant::now(), ttl)
        })
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
        shared: Arc::new(Shared::new(true)),
        ttl: None,
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
    let client =
        ConsulClient::new(&cfg.addr, cfg.call_timeout)?.with_token(cfg.token.as_deref())?;
    let (tx, view) = watch::channel(Arc::new(View::new(Vec::new(), Source::Unknown)));
    let (stop, stop_rx) = watch::channel(Stop::Run);
    let shared = Arc::new(Shared::new(false));
    let registrar = tokio::spawn(run_registrar(
        client.clone(),
        cfg.clone(),
        me,
        shared.clone(),
        stop_rx.clone(),
        serving,
    ));
    let ttl = cfg.ttl;
    let watcher = tokio::spawn(run_watcher(client, cfg, tx, shared.clone(), stop_rx));
    Ok(MembershipHandle {
        view,
        shared,
        ttl: Some(ttl),
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
    let mut refused = RefusedLog::default();
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
        let started = Instant::now();
        let r = if !registered {
            reg.check.status = if ready { "passing" } else { "critical" }.into();
            client.register(&reg, cfg.call_timeout).await
        } else if ready {
            client.pass(&check_id(&me), cfg.call_timeout).await
        } else {
            // Said again on every tick (cheap): a success is also what tells
            // this node that Consul still hears it (see `lapsed`).
            client.fail(&check_id(&me), cfg.call_timeout).await
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
                refused.reset();
                shared.contact(started);
                shared.set_registered(true);
                shared.ok(Part::Registrar);
            }
            Err(e) => {
                // A failed pass may mean the agent lost the registration (restart):
                // register again next time.
                match &e {
                    ConsulError::Forbidden { .. } if refused.due() => {
                        tracing::error!(member = %me.id, service = %cfg.service, "{e} (registration/TTL pass; this node stays out of the passing set): {}", refused_hint(&client));
                    }
                    ConsulError::Forbidden { .. } => {
                        tracing::debug!(member = %me.id, error = %e, "consul registration/TTL pass refused again");
                    }
                    _ => {
                        tracing::warn!(member = %me.id, error = %e, "consul registration/TTL pass failed; keeping the last known view");
                    }
                }
                registered = false;
                said = None;
                if matches!(e, ConsulError::Unreachable(_)) {
                    // That agent is gone: register with another one.
                    client.repin(agent).await;
                }
                shared.set_registered(false);
                shared.failed(Part::Registrar, &e);
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
        Err(e @ ConsulError::Forbidden { .. }) => {
            tracing::warn!(member = %me.id, "{e} (deregistration; the TTL check will lapse): {}", refused_hint(&client))
        }
        Err(e) => {
            tracing::warn!(member = %me.id, error = %e, "consul deregistration failed; the TTL check will lapse")
        }
    }
    // Not registering any more: the registrar has nothing left to fail.
    shared.ok(Part::Registrar);
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
    let mut refused = RefusedLog::default();
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
                refused.reset();
                shared.ok(Part::Watcher);
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
                match &e {
                    ConsulError::Forbidden { .. } if refused.due() => {
                        tracing::error!(service = %cfg.service, "{e} (health query; keeping the last known view): {}", refused_hint(&client));
                    }
                    ConsulError::Forbidden { .. } => {
                        tracing::debug!(error = %e, "consul watch refused again");
                    }
                    _ => {
                        tracing::warn!(error = %e, "consul watch failed; keeping the last known view");
                    }
                }
                shared.failed(Part::Watcher, &e);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consul_token_is_not_in_the_debug_output() {
        let secret = "0b5e7f0c-1c2d-4e3f-9a8b-7c6d5e4f3a2b";
        let cfg = ConsulConfig {
            token: Some(secret.into()),
            ..ConsulConfig::new("http://127.0.0.1:8500", "berth")
        };
        let debug = format!("{cfg:?}");
        assert!(!debug.contains(secret), "{debug}");
        assert!(debug.contains("token: Some(\"***\")"), "{debug}");
    }

    #[test]
    fn health_fails_while_either_loop_fails_and_flags_a_refused_token() {
        let shared = Shared::new(false);
        let refused = ConsulError::Forbidden {
            body: "Permission denied".into(),
        };
        shared.failed(Part::Registrar, &refused);
        // The watcher's (filtered, empty) answers succeed meanwhile: still failing.
        shared.ok(Part::Watcher);
        let h = shared.lock().health();
        assert!(h.failing_since.is_some() && h.forbidden && !h.registered);
        assert_eq!(
            h.last_error.as_deref(),
            Some("consul refused the token: Permission denied")
        );

        shared.failed(Part::Watcher, &ConsulError::Unreachable("down".into()));
        shared.ok(Part::Registrar);
        let h = shared.lock().health();
        assert!(h.failing_since.is_some() && !h.forbidden);
        shared.ok(Part::Watcher);
        assert_eq!(shared.lock().health(), Health::default());
    }

    #[test]
    fn a_check_lapses_a_full_ttl_after_the_last_contact_started() {
        let ttl = Duration::from_secs(1);
        let t0 = Instant::now();
        // Never in contact: in nobody's view, nothing to lapse.
        assert!(!lapsed(None, t0 + ttl * 10, ttl));
        assert!(!lapsed(Some(t0), t0, ttl));
        assert!(!lapsed(Some(t0), t0 + ttl - Duration::from_millis(1), ttl));
        assert!(lapsed(Some(t0), t0 + ttl, ttl));
        assert!(lapsed(Some(t0), t0 + ttl * 3, ttl));
        // A clock read before the contact (another thread) is not lapsed.
        assert!(!lapsed(Some(t0 + ttl), t0, ttl));

        // The newest contact counts, whatever order the calls end in.
        let shared = Shared::new(false);
        shared.contact(t0 + ttl);
        shared.contact(t0);
        assert_eq!(shared.lock().last_contact, Some(t0 + ttl));
    }

    #[tokio::test]
    async fn static_membership_never_lapses() {
        let m = static_membership(vec![Member {
            id: MemberId("a".into()),
            peer: "127.0.0.1:1".into(),
            public: None,
            version: None,
        }]);
        m.shared.contact(Instant::now() - Duration::from_secs(60));
        assert!(!m.check_lapsed());
    }
}
