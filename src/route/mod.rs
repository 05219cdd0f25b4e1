//! The router: which node owns a session, and how an edge connection reaches
//! it — its own host, or another node's over a peer link.
//!
//! Edge side: [`Router::attach`] resolves the owner on the ring and attaches
//! the connection there, answering a [`Route`]; ops, acks, detach and bye go
//! along the route. Owner side: the router is the [`PeerHandler`] of peer
//! links; for each remote edge connection it attaches a local proxy
//! connection to the session actor and forwards the actor's events, closes and
//! "moved" notices back over the link.
//!
//! Ownership: the ring is rebuilt from every membership view; sessions live
//! here that the new ring gives to another member are released (final
//! checkpoint, "moved" to their connection, actor stopped), and the edges holding
//! them route again to the new owner without closing the client. An attach
//! that reaches a node that does not own the session by its own ring is
//! refused with "not owner" and retried by the edge: views converge within a
//! blocking query's round trip. Correctness never depends on views agreeing:
//! epochs in the store fence a stale owner (see docs/architecture.md).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use actix::Addr;
use berth_actors::conn::{conn_channel, ConnHandle, ConnMsg, ConnReceiver};
use berth_actors::host::Host;
use berth_actors::ids::SessionId;
use berth_actors::protocol::{CloseCode, Event, OpReply, Welcome};
use berth_actors::session::{
    Ack, Attach, AttachError, Bye, Claim, Detach, NotHere, Op, Origin, QueuedOp, SessionActor,
};
use berth_cluster::membership::View;
use berth_cluster::peer::{Link, PeerError, PeerHandler};
use berth_cluster::pool::Pool;
use berth_cluster::ring::{MemberId, Ring};
use berth_cluster::routing::Ownership;
use futures_util::future::{BoxFuture, FutureExt, LocalBoxFuture};
use serde_json::Value;

use self::wire::{dec, enc, AttachReq, PeerPush, PeerReq, PeerResp, Refusal};

mod wire;

/// Attempts to attach when the actor stopped between lookup and attach.
const ATTACH_ATTEMPTS: usize = 3;

/// Where an attached connection's session lives.
#[derive(Clone)]
pub enum Route {
    /// On this node.
    Local(Addr<SessionActor>),
    /// On another node, over this link, attached by this attempt.
    Remote {
        /// The link to the owner.
        link: Link,
        /// The attach attempt the owner's proxy belongs to.
        attempt: u64,
    },
}

/// What [`Router::attach`] answers: the welcome, the route and the
/// connection's claim, or why not.
pub type Attached = Result<(Welcome, Route, Claim), AttachFail>;

/// Why an attach did not succeed.
#[derive(Debug)]
pub enum AttachFail {
    /// A final answer for the client (bad token, unknown session, ...).
    Refused(AttachError),
    /// Transient (owner unreachable, views not converged yet): try again shortly.
    Retry(String),
    /// The session is moving between activations; a `create` that got this
    /// far reached an owner, so the retry must resume, not create.
    Moving,
}

/// A session hosted here for a connection on another node's edge.
struct Proxy {
    addr: Addr<SessionActor>,
    conn_id: u64,
    attempt: u64,
    /// The link the attach came on (its pushes go back on it).
    link: Link,
}

/// An edge connection of this node routed to another node.
struct EdgeConn {
    member: MemberId,
    attempt: u64,
    link: Link,
    handle: ConnHandle,
}

/// How long an owner remembers that an edge gave up on an attach attempt,
/// so the attempt, if it completes after that, detaches at once.
const ABANDONED_KEEP: Duration = Duration::from_secs(60);

/// Routing settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// This node.
    pub me: MemberId,
    /// Whether this node is part of a cluster (Consul or a static list of
    /// more than itself); a cluster of one routes everything locally.
    pub clustered: bool,
    /// Virtual nodes per member.
    pub vnodes: u32,
    /// Peer-link secrets (the one we sign with, and the ones we accept).
    pub auth: berth_cluster::peer::PeerAuth,
    /// Deadline of one peer request.
    pub peer_timeout: Duration,
    /// Deadline of a remote attach: above the owner's worst case (an
    /// activation or lease check waiting on the store), so a slow owner is
    /// not taken for a dead one. A membership change ends the wait sooner.
    pub attach_timeout: Duration,
    /// New sessions get ids this node owns (see [`Router::new_session_id`]).
    pub new_sessions_local: bool,
}

/// See the module docs.
pub struct Router {
    cfg: RouterConfig,
    host: Host,
    /// The view, the ring, leaving and isolated (src/isolation.rs). An
    /// attach waiting to reach an owner watches it, gives up when it changes
    /// and re-resolves the owner.
    ownership: Ownership,
    /// Links to the other members (their handler is this router's).
    pool: Pool,
    /// Edge connections of this node routed to another node: pushes reach them here.
    edge_conns: Mutex<HashMap<u64, EdgeConn>>,
    /// Sessions hosted here for other nodes' edge connections.
    proxies: Mutex<HashMap<(MemberId, Origin), Proxy>>,
    /// Attach attempts their edge gave up on (by `Detach`), with when: one
    /// that completes later detaches at once instead of staying attached.
    abandoned: Mutex<HashMap<(MemberId, Origin), (u64, std::time::Instant)>>,
    /// This process's nonce in [`Origin`]s: a node restarted under the same
    /// id is another edge, whose connection ids start again from 1.
    incarnation: u64,
    /// The next attach attempt (grows; orders attempts of one connection).
    next_attempt: std::sync::atomic::AtomicU64,
    me_weak: Weak<Router>,
    /// Arbiters that host sessions attached from other nodes (peer links run
    /// on plain tokio tasks, and session actors need an actix arbiter).
    arbiters: Vec<actix::ArbiterHandle>,
    next_arbiter: std::sync::atomic::AtomicUsize,
    handoffs_in_flight: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    /// A router whose ring starts from `view`.
    pub fn new(
        cfg: RouterConfig,
        host: Host,
        view: Arc<View>,
        arbiters: Vec<actix::ArbiterHandle>,
    ) -> Arc<Router> {
        Arc::new_cyclic(|me_weak| Router {
            ownership: Ownership::new(cfg.me.clone(), cfg.clustered, cfg.vnodes, view),
            pool: Pool::new(
                cfg.me.clone(),
                cfg.auth.clone(),
                Arc::new(Handler(me_weak.clone())),
            ),
            cfg,
            host,
            edge_conns: Mutex::default(),
            proxies: Mutex::default(),
            abandoned: Mutex::default(),
            incarnation: rand::random(),
            next_attempt: std::sync::atomic::AtomicU64::new(1),
            me_weak: me_weak.clone(),
            arbiters,
            next_arbiter: Default::default(),
            handoffs_in_flight: Default::default(),
        })
    }

    fn spawn_on_arbiter(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let i = self.next_arbiter.fetch_add(1, Ordering::Relaxed);
        match self.arbiters.get(i % self.arbiters.len().max(1)) {
            Some(a) => {
                a.spawn(fut);
            }
            None => {
                actix::spawn(fut);
            }
        }
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Ring> {
        self.ownership.ring()
    }

    /// The current membership view.
    pub fn view(&self) -> Arc<View> {
        self.ownership.view()
    }

    /// Whether this node is clustered.
    pub fn clustered(&self) -> bool {
        self.cfg.clustered
    }

    /// Number of sessions hosted here for other nodes' connections.
    pub fn proxied(&self) -> usize {
        lock(&self.proxies).len()
    }

    /// Number of this edge's connections routed to other nodes.
    pub fn forwarded_conns(&self) -> usize {
        lock(&self.edge_conns).len()
    }

    /// The handler to give to peer links.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn PeerHandler> {
        Arc::new(Handler(Arc::downgrade(self)))
    }

    /// Remembers an inbound link so requests to that peer reuse it.
    pub fn adopt_link(&self, link: Link) {
        self.pool.adopt(link);
    }

    /// The id of a new session created through this node: with
    /// `new_sessions_local`, one this node owns on the current ring (the
    /// session then lives where its client connected, and a proxy that routes
    /// resumes by the `node` hint keeps every op off the peer links); any
    /// random id when this node is not on the ring or is leaving.
    pub fn new_session_id(&self) -> SessionId {
        if self.cfg.new_sessions_local {
            if let Some(id) = self.ownership.draw_new_id(SessionId::random) {
                return id;
            }
        }
        SessionId::random()
    }

    /// Whether this node owns `id` now (on the ring, not leaving or isolated).
    pub fn owns(&self, id: &SessionId) -> bool {
        self.ownership.owns(id.as_str())
    }

    /// Installs a new membership view: rebuilds the ring and hands off the
    /// sessions it moves away from this node.
    pub async fn apply_view(&self, view: Arc<View>) {
        // Waiting attaches wake now and re-resolve the owner on the new ring.
        self.ownership.apply_view(view);
        self.after_placement_change().await;
    }

    /// Leaves: this node owns nothing from now on; every live session is handed off.
    pub async fn leave(&self) {
        self.ownership.leave();
        self.after_placement_change().await;
    }

    /// Isolated (`true`): this node owns nothing, and every live session is
    /// released as in a drain (the final checkpoint is refused by the epoch
    /// where another node took the session already). `false`: the view is
    /// used as it is again. Nothing happens if the state does not change.
    pub async fn set_isolated(&self, isolated: bool) {
        if self.ownership.set_isolated(isolated) {
            self.after_placement_change().await;
        }
    }

    /// Links to members that left are closed (their routes re-resolve), and
    /// the sessions the ring moved away from this node are handed off.
    async fn after_placement_change(&self) {
        let view = self.view();
        self.pool.retain(|m| view.get(m).is_some());
        self.release_moved().await;
    }

    /// Whether `member`'s membership view holds `whom` (asked over its peer
    /// link); `None` if it does not answer within `timeout`.
    pub async fn member_sees(
        &self,
        member: &MemberId,
        whom: &MemberId,
        timeout: Duration,
    ) -> Option<bool> {
        let ask = async {
            let link = self.link(member).await.ok()?;
            let req = PeerReq::Sees {
                member: whom.to_string(),
            };
            match dec::<PeerResp>(&link.request(enc(&req), timeout).await.ok()?) {
                Some(PeerResp::Sees { present }) => Some(present),
                _ => None,
            }
        };
        tokio::time::timeout(timeout, ask).await.ok().flatten()
    }

    async fn release_moved(&self) {
        let moving: Vec<SessionId> = self
            .host
            .live_ids()
            .into_iter()
            .filter(|id| !self.owns(id))
            .collect();
        if moving.is_empty() {
            return;
        }
        tracing::info!(
            sessions = moving.len(),
            "handing off sessions the ring moved to other members"
        );
        metrics::counter!("berth_handoffs_total").increment(moving.len() as u64);
        self.handoffs_in_flight
            .fetch_add(moving.len(), Ordering::Relaxed);
        // Bounded concurrency: checkpoints are group-committed anyway.
        for chunk in moving.chunks(256) {
            futures_util::future::join_all(chunk.iter().map(|id| self.host.release(id))).await;
            self.handoffs_in_flight
                .fetch_sub(chunk.len(), Ordering::Relaxed);
        }
    }

    /// The link to `member`, open or dialled now (see [`Pool::link`]).
    async fn link(&self, member: &MemberId) -> Result<Link, PeerError> {
        self.pool
            .link(member, || self.view().get(member).map(|m| m.peer.clone()))
            .await
    }

    /// Attaches `conn` to session `id` wherever it lives. `reattach` is
    /// `None` for a client's `hello` and the connection's claim when it routes
    /// again (see [`Attach`]). Answers the welcome, the route and the claim.
    ///
    /// If this future is dropped or fails after the attach may have reached
    /// an owner, the owner is told to detach that attempt (see
    /// [`Abandon`]): an attach nobody waits for never stays attached.
    pub async fn attach(
        &self,
        conn: &ConnHandle,
        id: &SessionId,
        token: &str,
        ack: u64,
        create: bool,
        reattach: Option<Claim>,
    ) -> Attached {
        lock(&self.edge_conns).remove(&conn.id());
        let origin = self.origin(conn.id());
        let attempt = self.next_attempt.fetch_add(1, Ordering::Relaxed);
        let Some(member) = self.ownership.owner_of(id.as_str()) else {
            return self
                .attach_local(
                    conn.clone(),
                    origin,
                    attempt,
                    id,
                    token,
                    ack,
                    create,
                    reattach,
                )
                .await
                .map(|(w, claim, a)| (w, Route::Local(a), claim));
        };
        // Connecting to a member that just died can take seconds (a vanished
        // address answers nothing); the next view usually names another owner,
        // so a view change ends the wait.
        let mut views = self.ownership.subscribe();
        let changed = |member: &MemberId| {
            AttachFail::Retry(format!("membership changed while attaching at {member}"))
        };
        let link = tokio::select! {
            link = self.link(&member) => link.map_err(|e| AttachFail::Retry(e.to_string()))?,
            _ = views.changed() => return Err(changed(&member)),
        };
        lock(&self.edge_conns).insert(
            conn.id(),
            EdgeConn {
                member: member.clone(),
                attempt,
                link: link.clone(),
                handle: conn.clone(),
            },
        );
        let req = PeerReq::Attach(AttachReq {
            session: id.to_string(),
            token: token.to_owned(),
            ack,
            origin,
            attempt,
            create,
            reattach,
        });
        let mut abandon = Abandon(Some(Undo::Remote {
            router: self,
            link: link.clone(),
            edge_conn: conn.id(),
            attempt,
        }));
        let resp = tokio::select! {
            r = link.request(enc(&req), self.cfg.attach_timeout) => r,
            _ = views.changed() => return Err(changed(&member)),
        };
        let resp = match resp {
            Ok(bytes) => dec::<PeerResp>(&bytes),
            Err(e) => return Err(AttachFail::Retry(e.to_string())),
        };
        match resp {
            Some(PeerResp::Welcome { json, claim }) => match serde_json::from_str::<Welcome>(&json)
            {
                Ok(w) => {
                    abandon.disarm();
                    metrics::counter!("berth_forwarded_attaches_total").increment(1);
                    Ok((w, Route::Remote { link, attempt }, claim))
                }
                Err(e) => Err(AttachFail::Retry(format!("bad welcome from {member}: {e}"))),
            },
            Some(PeerResp::AttachErr(refusal)) => {
                // Refused: nothing stays attached at the owner.
                abandon.disarm();
                lock(&self.edge_conns).remove(&conn.id());
                Err(match AttachError::from(refusal) {
                    AttachError::Unavailable(m) => AttachFail::Retry(m),
                    AttachError::Moved => AttachFail::Moving,
                    other => AttachFail::Refused(other),
                })
            }
            Some(PeerResp::NotOwner) => {
                abandon.disarm();
                lock(&self.edge_conns).remove(&conn.id());
                Err(AttachFail::Retry(format!(
                    "{member} does not own the session yet"
                )))
            }
            _ => Err(AttachFail::Retry(format!(
                "unexpected answer from {member}"
            ))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attach_local(
        &self,
        conn: ConnHandle,
        origin: Origin,
        attempt: u64,
        id: &SessionId,
        token: &str,
        ack: u64,
        create: bool,
        reattach: Option<Claim>,
    ) -> Result<(Welcome, Claim, Addr<SessionActor>), AttachFail> {
        if self.ownership.is_out_of_ring() {
            return Err(AttachFail::Retry("this node is leaving".into()));
        }
        if create && self.host.live_sessions() >= self.host.limits().max_live_sessions {
            metrics::counter!("berth_sessions_refused_total").increment(1);
            return Err(AttachFail::Refused(AttachError::Unavailable(
                "this node is at its live-session limit: try again later".into(),
            )));
        }
        for n in 0..ATTACH_ATTEMPTS {
            let addr = if create && n == 0 {
                self.host.create_session_with(id.clone(), token)
            } else {
                self.host.session(id)
            };
            let msg = Attach {
                conn: conn.clone(),
                token: token.to_owned(),
                ack,
                origin,
                attempt,
                reattach,
            };
            let mut abandon = Abandon(Some(Undo::Local {
                addr: addr.clone(),
                conn_id: conn.id(),
            }));
            match addr.send(msg).await {
                Ok(Ok((w, claim))) => {
                    abandon.disarm();
                    return Ok((w, claim, addr));
                }
                Ok(Err(e)) => {
                    abandon.disarm();
                    return Err(match e {
                        AttachError::Unavailable(m) => AttachFail::Retry(m),
                        AttachError::Moved => AttachFail::Moving,
                        e => AttachFail::Refused(e),
                    });
                }
                Err(_) => {
                    abandon.disarm();
                    continue; // the actor stopped between lookup and attach
                }
            }
        }
        Err(AttachFail::Retry("session is restarting".into()))
    }

    /// Sends an op along `route`. The op is queued before this returns (ops
    /// sent one after another are applied in that order, whatever the
    /// actor's mailbox holds: see [`QueuedOp`]); the future answers.
    pub fn op(
        &self,
        route: &Route,
        conn_id: u64,
        id: u64,
        op: String,
        args: Value,
    ) -> LocalBoxFuture<'static, Result<OpReply, NotHere>> {
        match route {
            Route::Local(addr) => {
                let reply = queue_op(
                    addr,
                    Op {
                        conn_id,
                        id,
                        op,
                        args,
                    },
                );
                async move { reply.await.unwrap_or(Err(NotHere)) }.boxed_local()
            }
            Route::Remote { link, .. } => {
                metrics::counter!("berth_forwarded_ops_total").increment(1);
                let body = enc(&PeerReq::Op {
                    origin: self.origin(conn_id),
                    id,
                    op,
                    args: args.to_string(),
                });
                let req = link.start_request(body, self.cfg.peer_timeout);
                async move {
                    match req.await.ok().and_then(|b| dec::<PeerResp>(&b)) {
                        Some(PeerResp::Reply(json)) => {
                            serde_json::from_str(&json).map_err(|_| NotHere)
                        }
                        _ => Err(NotHere),
                    }
                }
                .boxed_local()
            }
        }
    }

    /// Live sessions on `member` (asked over its peer link), if it answers in time.
    pub async fn member_sessions(&self, member: &MemberId, timeout: Duration) -> Option<u64> {
        if member == &self.cfg.me {
            return Some(self.host.live_sessions() as u64);
        }
        let link = tokio::time::timeout(timeout, self.link(member))
            .await
            .ok()?
            .ok()?;
        match link
            .request(enc(&PeerReq::Stats), timeout)
            .await
            .ok()
            .and_then(|b| dec::<PeerResp>(&b))
        {
            Some(PeerResp::Stats { sessions, .. }) => Some(sessions),
            _ => None,
        }
    }

    /// Sessions being handed off right now.
    pub fn handoffs_in_flight(&self) -> usize {
        self.handoffs_in_flight.load(Ordering::Relaxed)
    }

    /// This edge's connection `conn_id`, as owners know it.
    fn origin(&self, conn_id: u64) -> Origin {
        Origin {
            edge: self.incarnation,
            conn: conn_id,
        }
    }

    /// Forwards an ack.
    pub fn ack(&self, route: &Route, conn_id: u64, seq: u64) {
        match route {
            Route::Local(a) => a.do_send(Ack { conn_id, seq }),
            Route::Remote { link, .. } => {
                let _ = link.try_push(enc(&PeerPush::Ack {
                    origin: self.origin(conn_id),
                    seq,
                }));
            }
        }
    }

    /// The connection ended or moves elsewhere.
    pub fn detach(&self, route: &Route, conn_id: u64) {
        lock(&self.edge_conns).remove(&conn_id);
        match route {
            Route::Local(a) => a.do_send(Detach { conn_id }),
            Route::Remote { link, attempt } => push_detach(link, self.origin(conn_id), *attempt),
        }
    }

    /// `bye`: the owner deletes the session and closes the connection (1000).
    pub async fn bye(&self, route: &Route, conn_id: u64) -> bool {
        match route {
            Route::Local(a) => a.send(Bye { conn_id }).await.is_ok(),
            Route::Remote { link, .. } => link
                .push(enc(&PeerPush::Bye {
                    origin: self.origin(conn_id),
                }))
                .await
                .is_ok(),
        }
    }

    // ---- owner side ----

    fn serve_attach(
        &self,
        from: MemberId,
        link: Link,
        req: AttachReq,
    ) -> BoxFuture<'static, Vec<u8>> {
        let AttachReq {
            session,
            token,
            ack,
            origin,
            attempt,
            create,
            reattach,
        } = req;
        let edge_conn = origin.conn;
        let Some(id) = SessionId::parse(&session) else {
            let refusal = Refusal::from(&AttachError::NotFound);
            return futures_util::future::ready(enc(&PeerResp::AttachErr(refusal))).boxed();
        };
        if !self.owns(&id) {
            return futures_util::future::ready(enc(&PeerResp::NotOwner)).boxed();
        }
        let Some(me) = self.me_weak.upgrade() else {
            return futures_util::future::ready(enc(&PeerResp::NotOwner)).boxed();
        };
        // The actor lives on this node's actix arbiters: run the attach there.
        // Another attempt of the same edge connection (a retry after a
        // timeout, a re-route) needs no retiring here: the actor replaces a
        // handle of the same origin quietly and refuses an older attempt, and
        // `keep_proxy` keeps the newest attempt's proxy.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = async move {
            let (handle, recv) = conn_channel(2048);
            let conn_id = handle.id();
            let r = me
                .attach_local(handle, origin, attempt, &id, &token, ack, create, reattach)
                .await;
            let resp = match r {
                Ok((welcome, claim, addr)) => {
                    let proxy = Proxy {
                        addr: addr.clone(),
                        conn_id,
                        attempt,
                        link: link.clone(),
                    };
                    if me.keep_proxy((from.clone(), origin), proxy) {
                        actix::spawn(forward_to_edge(recv, link, edge_conn, attempt));
                        PeerResp::Welcome {
                            json: serde_json::to_string(&welcome).unwrap_or_default(),
                            claim,
                        }
                    } else {
                        // The edge gave up on this attempt, or a newer one of
                        // the same connection is attached already.
                        addr.do_send(Detach { conn_id });
                        PeerResp::AttachErr(Refusal::from(&AttachError::Superseded))
                    }
                }
                Err(AttachFail::Refused(e)) => PeerResp::AttachErr(Refusal::from(&e)),
                Err(AttachFail::Moving) => PeerResp::AttachErr(Refusal::from(&AttachError::Moved)),
                // Unavailable's text is its message: the edge retries with it.
                Err(AttachFail::Retry(m)) => {
                    PeerResp::AttachErr(Refusal::from(&AttachError::Unavailable(m)))
                }
            };
            let _ = tx.send(enc(&resp));
        };
        self.spawn_on_arbiter(work);
        async move { rx.await.unwrap_or_else(|_| enc(&PeerResp::NotOwner)) }.boxed()
    }

    /// Records the proxy of a completed remote attach, unless its edge has
    /// given up on that attempt or a newer attempt's proxy is recorded
    /// already (attaches of one connection can complete out of order on
    /// different arbiters). Answers whether it was kept.
    fn keep_proxy(&self, key: (MemberId, Origin), proxy: Proxy) -> bool {
        let mut proxies = lock(&self.proxies);
        let abandoned = lock(&self.abandoned)
            .get(&key)
            .is_some_and(|(a, _)| *a >= proxy.attempt);
        if abandoned || proxies.get(&key).is_some_and(|p| p.attempt > proxy.attempt) {
            return false;
        }
        proxies.insert(key, proxy);
        true
    }

    /// The edge connection `key` ended or gave up on `attempt`: detaches its
    /// proxy of that attempt or an earlier one; if none is recorded (the
    /// attach is still on its way), remembers the attempt so that it detaches
    /// when it completes.
    fn edge_detached(&self, key: (MemberId, Origin), attempt: u64) {
        let gone = {
            let mut proxies = lock(&self.proxies);
            match proxies.get(&key) {
                Some(p) if p.attempt == attempt => proxies.remove(&key),
                Some(p) if p.attempt > attempt => None,
                _ => {
                    let mut ab = lock(&self.abandoned);
                    if ab.len() >= 4096 {
                        ab.retain(|_, (_, at)| at.elapsed() < ABANDONED_KEEP);
                    }
                    let now = std::time::Instant::now();
                    let e = ab.entry(key.clone()).or_insert((attempt, now));
                    *e = (e.0.max(attempt), now);
                    proxies.remove(&key)
                }
            }
        };
        if let Some(p) = gone {
            p.addr.do_send(Detach { conn_id: p.conn_id });
        }
    }

    fn serve_op(
        &self,
        from: MemberId,
        origin: Origin,
        id: u64,
        op: String,
        args: String,
    ) -> BoxFuture<'static, Vec<u8>> {
        let proxy = lock(&self.proxies)
            .get(&(from, origin))
            .map(|p| (p.addr.clone(), p.conn_id));
        let Some((addr, conn_id)) = proxy else {
            return futures_util::future::ready(enc(&PeerResp::Moved)).boxed();
        };
        let args = match serde_json::from_str(&args) {
            Ok(a) => a,
            Err(e) => {
                // The edge re-encodes JSON it parsed: this is a bug or a
                // version skew, not the client's fault. Not applied.
                tracing::error!(error = %e, "undecodable op arguments from a peer");
                let reply = OpReply::err(
                    id,
                    berth_actors::protocol::ErrorCode::Internal,
                    "the op could not be forwarded to the session's owner",
                    0,
                );
                return futures_util::future::ready(enc(&PeerResp::Reply(
                    serde_json::to_string(&reply).unwrap_or_default(),
                )))
                .boxed();
            }
        };
        // Queued now, in the order the link delivered the requests.
        let reply = queue_op(
            &addr,
            Op {
                conn_id,
                id,
                op,
                args,
            },
        );
        async move {
            match reply.await {
                Ok(Ok(reply)) => enc(&PeerResp::Reply(
                    serde_json::to_string(&reply).unwrap_or_default(),
                )),
                _ => enc(&PeerResp::Moved),
            }
        }
        .boxed()
    }

    /// The edge connection `edge_conn` if `from`'s proxy of `attempt` is the
    /// one it is routed through (pushes of any other proxy are stale); with
    /// `take`, it is no longer routed.
    fn routed_conn(
        &self,
        from: &MemberId,
        edge_conn: u64,
        attempt: u64,
        take: bool,
    ) -> Option<ConnHandle> {
        let mut e = lock(&self.edge_conns);
        let c = e.get(&edge_conn)?;
        if &c.member != from || c.attempt != attempt {
            return None;
        }
        if take {
            e.remove(&edge_conn).map(|c| c.handle)
        } else {
            Some(c.handle.clone())
        }
    }

    fn serve_push(&self, from: MemberId, msg: PeerPush) {
        match msg {
            PeerPush::Ack { origin, seq } => {
                if let Some(p) = lock(&self.proxies).get(&(from, origin)) {
                    p.addr.do_send(Ack {
                        conn_id: p.conn_id,
                        seq,
                    });
                }
            }
            PeerPush::Detach { origin, attempt } => self.edge_detached((from, origin), attempt),
            PeerPush::Bye { origin } => {
                if let Some(p) = lock(&self.proxies).get(&(from, origin)) {
                    p.addr.do_send(Bye { conn_id: p.conn_id });
                }
            }
            PeerPush::Event {
                edge_conn,
                attempt,
                seq,
                body,
            } => {
                let Some(h) = self.routed_conn(&from, edge_conn, attempt, false) else {
                    return;
                };
                match serde_json::from_str(&body) {
                    Ok(body) => {
                        h.send_event(Event { seq, body });
                    }
                    Err(e) => {
                        // Never deliver a mangled event: the client resumes and
                        // the outbox replays it.
                        tracing::error!(error = %e, seq, "undecodable event from the session's owner");
                        h.force_close(CloseCode::Internal, "event could not be forwarded: resume");
                    }
                }
            }
            PeerPush::Close {
                edge_conn,
                attempt,
                code,
                reason,
            } => {
                if let Some(h) = self.routed_conn(&from, edge_conn, attempt, true) {
                    h.close(
                        CloseCode::from_code(code).unwrap_or(CloseCode::Internal),
                        reason,
                    );
                }
            }
            PeerPush::Moved { edge_conn, attempt } => {
                if let Some(h) = self.routed_conn(&from, edge_conn, attempt, true) {
                    h.moved();
                }
            }
        }
    }

    /// `link` closed: the proxies attached over it detach, and the edge
    /// connections routed over it route again. Another link to the same peer
    /// (a newer one, after a partition healed) keeps its own.
    fn link_closed(&self, peer: &MemberId, link: &Link) {
        let gone: Vec<Proxy> = {
            let mut p = lock(&self.proxies);
            let keys: Vec<_> = p
                .iter()
                .filter(|((m, _), x)| m == peer && x.link.same(link))
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter().filter_map(|k| p.remove(&k)).collect()
        };
        for p in gone {
            p.addr.do_send(Detach { conn_id: p.conn_id });
        }
        let moved: Vec<ConnHandle> = {
            let mut e = lock(&self.edge_conns);
            let keys: Vec<u64> = e
                .iter()
                .filter(|(_, c)| c.link.same(link))
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter()
                .filter_map(|k| e.remove(&k))
                .map(|c| c.handle)
                .collect()
        };
        for h in moved {
            h.moved();
        }
        self.pool.forget(link);
    }
}

/// Forwards what a proxy's actor says to the remote edge connection, tagged
/// with the attempt that attached it. Ends with a close or a "moved", when
/// the link fails, or when the actor drops the handle (another handle of the
/// same connection replaced it quietly).
async fn forward_to_edge(mut recv: ConnReceiver, link: Link, edge_conn: u64, attempt: u64) {
    while let Some(m) = recv.recv().await {
        let (push, last) = match m {
            ConnMsg::Event(e) => (
                PeerPush::Event {
                    edge_conn,
                    attempt,
                    seq: e.seq,
                    body: e.body.to_string(),
                },
                false,
            ),
            ConnMsg::Close(code, reason) => (
                PeerPush::Close {
                    edge_conn,
                    attempt,
                    code: code.code(),
                    reason: reason.into(),
                },
                true,
            ),
            ConnMsg::Moved => (PeerPush::Moved { edge_conn, attempt }, true),
        };
        if link.push(enc(&push)).await.is_err() || last {
            break;
        }
    }
}

/// Queues `op` on `addr` now (see [`QueuedOp`]); the receiver answers, or
/// fails if the actor stopped before running it.
fn queue_op(
    addr: &Addr<SessionActor>,
    op: Op,
) -> tokio::sync::oneshot::Receiver<Result<OpReply, NotHere>> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    addr.do_send(QueuedOp { op, reply });
    rx
}

/// Tells an owner that this edge connection gave up on `attempt`. Sent
/// without waiting when the link's queue has room, else by a task that
/// waits for room (a lost detach would leave the session attached forever).
fn push_detach(link: &Link, origin: Origin, attempt: u64) {
    let body = enc(&PeerPush::Detach { origin, attempt });
    if !link.try_push(body.clone()) && !link.is_closed() {
        let link = link.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DETACH_PUSH_TIMEOUT, link.push(body)).await;
        });
    }
}

/// Longest wait for room on a link to send a detach.
const DETACH_PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// An attach attempt in flight that may reach (or have reached) an actor:
/// dropped before [`Abandon::disarm`] (the attach failed, timed out, or its
/// connection ended while waiting), it detaches that attempt, so no actor
/// stays attached to a connection that no longer waits for it.
struct Abandon<'a>(Option<Undo<'a>>);

enum Undo<'a> {
    Local {
        addr: Addr<SessionActor>,
        conn_id: u64,
    },
    Remote {
        router: &'a Router,
        link: Link,
        edge_conn: u64,
        attempt: u64,
    },
}

impl Abandon<'_> {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        match self.0.take() {
            Some(Undo::Local { addr, conn_id }) => addr.do_send(Detach { conn_id }),
            Some(Undo::Remote {
                router,
                link,
                edge_conn,
                attempt,
            }) => {
                {
                    let mut e = lock(&router.edge_conns);
                    if e.get(&edge_conn).is_some_and(|c| c.attempt == attempt) {
                        e.remove(&edge_conn);
                    }
                }
                push_detach(&link, router.origin(edge_conn), attempt);
            }
            None => {}
        }
    }
}

/// The peer handler: a weak reference, so links do not keep the router alive.
struct Handler(Weak<Router>);

impl PeerHandler for Handler {
    fn request(&self, from: MemberId, link: Link, body: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        let Some(r) = self.0.upgrade() else {
            return futures_util::future::ready(enc(&PeerResp::NotOwner)).boxed();
        };
        match dec::<PeerReq>(&body) {
            Some(PeerReq::Attach(req)) => r.serve_attach(from, link, req),
            Some(PeerReq::Op {
                origin,
                id,
                op,
                args,
            }) => r.serve_op(from, origin, id, op, args),
            Some(PeerReq::Stats) => {
                let resp = PeerResp::Stats {
                    sessions: r.host.live_sessions() as u64,
                    proxied: r.proxied() as u64,
                };
                futures_util::future::ready(enc(&resp)).boxed()
            }
            Some(PeerReq::Sees { member }) => {
                let resp = PeerResp::Sees {
                    present: r.view().get(&MemberId(member)).is_some(),
                };
                futures_util::future::ready(enc(&resp)).boxed()
            }
            None => futures_util::future::ready(enc(&PeerResp::Moved)).boxed(),
        }
    }

    fn push(&self, from: MemberId, _link: Link, body: Vec<u8>) {
        if let (Some(r), Some(msg)) = (self.0.upgrade(), dec::<PeerPush>(&body)) {
            r.serve_push(from, msg);
        }
    }

    fn closed(&self, peer: MemberId, link: Link) {
        if let Some(r) = self.0.upgrade() {
            tracing::info!(%peer, "peer link closed");
            r.link_closed(&peer, &link);
        }
    }
}
