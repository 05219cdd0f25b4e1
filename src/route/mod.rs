//! Routing: how an edge connection reaches its session — on this node's
//! host, or on another node's over a peer link.
//!
//! [`Router::attach`] resolves the session's owner and attaches the
//! connection there, answering a [`Route`]; ops, acks, detach and bye go
//! along the route. A remote owner attaches a local *proxy* connection to the
//! session actor and forwards the actor's events, closes and "moved" notices
//! back over the link.
//!
//! Handoff: every membership view rebuilds the ring; sessions live here that
//! the new ring gives to another member are released (final checkpoint,
//! "moved" to their connection, actor stopped), and the edges holding them
//! route again to the new owner without closing the client. An attach that
//! reaches a node that does not own the session by its own ring is refused
//! with "not owner" and retried by the edge: views converge within a
//! blocking query's round trip. Correctness never depends on views agreeing:
//! epochs in the store fence a stale owner (see docs/architecture.md).
//!
//! # Layout
//! - here: the [`Router`] (placement changes and handoff, questions to other
//!   members), [`Route`], [`AttachFail`], attaching on this node's host (both
//!   sides do), and [`LinkHandler`], the links' [`PeerHandler`], which hands
//!   each request and push to the side it is for.
//! - [`wire`]: the bodies of requests, answers and pushes.
//! - [`edge_side`]: this node as the edge: attach, op, ack, detach and bye
//!   sent to an owner, and the owner's pushes back to the connection.
//! - [`messages`]: messages between actors across nodes (the router is the
//!   host's postman).
//! - [`owner_side`]: this node as the owner: remote attaches served by
//!   proxies, and the edge's ops, acks, detaches and byes for them.
//! - [`api`]: the backend API's questions to the cluster (deliveries, a
//!   user's live sessions, an actor's status, ending a session).
//! - In `berth_cluster`: placement (`routing::Ownership`: the view, its ring,
//!   leaving, isolated) and the links (`pool::Pool`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use actix::Addr;
use berth_actors::conn::ConnHandle;
use berth_actors::host::Host;
use berth_actors::ids::SessionId;
use berth_actors::protocol::{OpReply, Welcome};
use berth_actors::session::{
    Attach, AttachError, Claim, Detach, NotHere, Op, Origin, QueuedOp, SessionActor,
};
use berth_cluster::membership::View;
use berth_cluster::peer::{Link, PeerAuth, PeerError, PeerHandler};
use berth_cluster::pool::Pool;
use berth_cluster::ring::{MemberId, Ring};
use berth_cluster::routing::Ownership;
use futures_util::future::{BoxFuture, FutureExt};

use self::edge_side::EdgeSide;
use self::owner_side::OwnerSide;
use self::wire::{dec, enc, PeerPush, PeerReq, PeerResp};

mod api;
mod edge_side;
mod messages;
mod owner_side;
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
    pub auth: PeerAuth,
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
    /// This node's connections routed to other nodes.
    edge: EdgeSide,
    /// Sessions hosted here for other nodes' connections.
    owner: OwnerSide,
    handoffs_in_flight: AtomicUsize,
    /// Answers [`PeerReq::Sample`]: set by the node once it exists (it is
    /// made after the router), so that members' dashboards can read this one.
    sampler: OnceLock<Sampler>,
}

/// Makes this node's dashboard sample as JSON text (`src/dashboard`).
pub type Sampler = Box<dyn Fn() -> String + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    /// A router whose ring starts from `view`; sessions attached from other
    /// nodes run on `arbiters`.
    pub fn new(
        cfg: RouterConfig,
        host: Host,
        view: Arc<View>,
        arbiters: Vec<actix::ArbiterHandle>,
    ) -> Arc<Router> {
        let router = Arc::new_cyclic(|me| Router {
            ownership: Ownership::new(cfg.me.clone(), cfg.clustered, cfg.vnodes, view),
            pool: Pool::new(
                cfg.me.clone(),
                cfg.auth.clone(),
                Arc::new(LinkHandler(me.clone())),
            ),
            cfg,
            host,
            edge: EdgeSide::new(),
            owner: OwnerSide::new(arbiters),
            handoffs_in_flight: AtomicUsize::new(0),
            sampler: OnceLock::new(),
        });
        // Messages between actors go where the ring says.
        router
            .host
            .set_postman(Arc::new(messages::RouterPost(Arc::downgrade(&router))));
        router
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
        self.owner.count()
    }

    /// Number of this edge's connections routed to other nodes.
    pub fn forwarded_conns(&self) -> usize {
        self.edge.count()
    }

    /// Sessions being handed off right now.
    pub fn handoffs_in_flight(&self) -> usize {
        self.handoffs_in_flight.load(Ordering::Relaxed)
    }

    /// The handler to give to peer links.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn PeerHandler> {
        Arc::new(LinkHandler(Arc::downgrade(self)))
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
        metrics::gauge!("berth_handoffs_in_flight").increment(moving.len() as f64);
        // Bounded concurrency: checkpoints are group-committed anyway.
        for chunk in moving.chunks(256) {
            futures_util::future::join_all(chunk.iter().map(|id| self.host.release(id))).await;
            self.handoffs_in_flight
                .fetch_sub(chunk.len(), Ordering::Relaxed);
            metrics::gauge!("berth_handoffs_in_flight").decrement(chunk.len() as f64);
        }
    }

    /// The link to `member`, open or dialled now (see [`Pool::link`]).
    async fn link(&self, member: &MemberId) -> Result<Link, PeerError> {
        self.pool
            .link(member, || self.view().get(member).map(|m| m.peer.clone()))
            .await
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

    /// `member`'s dashboard sample as JSON text (this node's from its
    /// sampler, another member's over its peer link); why not, when it
    /// cannot be had within `timeout`.
    pub async fn member_sample(
        &self,
        member: &MemberId,
        timeout: Duration,
    ) -> Result<String, &'static str> {
        if member == &self.cfg.me {
            return Ok(self.sample_json());
        }
        let ask = async {
            let link = self.link(member).await.map_err(|_| "no peer link")?;
            let body = link
                .request(enc(&PeerReq::Sample), timeout)
                .await
                .map_err(|_| "no answer")?;
            match dec::<PeerResp>(&body) {
                Some(PeerResp::Sample { json }) if !json.is_empty() => Ok(json),
                Some(PeerResp::Sample { .. }) => Err("not started yet"),
                // An older release does not know the question.
                _ => Err("no sample (an older release?)"),
            }
        };
        tokio::time::timeout(timeout, ask)
            .await
            .unwrap_or(Err("no answer in time"))
    }

    /// Sets what answers [`PeerReq::Sample`] (the node sets it once it
    /// exists; the router is made before it).
    pub fn set_sampler(&self, sampler: Sampler) {
        let _ = self.sampler.set(sampler);
    }

    /// This node's sample, or an empty string before the sampler is set.
    fn sample_json(&self) -> String {
        self.sampler.get().map(|s| s()).unwrap_or_default()
    }

    /// Attaches `conn` to session `id` on this node's host: for a client of
    /// this edge, or for a proxy of another node's edge.
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
        user: Option<&str>,
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
                user: user.map(str::to_owned),
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

/// An attach attempt in flight that may reach (or have reached) an actor:
/// dropped before [`Abandon::disarm`] (the attach failed, timed out, or its
/// connection ended while waiting), it detaches that attempt, so no actor
/// stays attached to a connection that no longer waits for it.
struct Abandon<'a>(Option<Undo<'a>>);

enum Undo<'a> {
    /// Detach the connection from the local actor.
    Local {
        addr: Addr<SessionActor>,
        conn_id: u64,
    },
    /// Unroute the edge connection and tell the owner (see
    /// [`EdgeSide::give_up`]).
    Remote {
        edge: &'a EdgeSide,
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
                edge,
                link,
                edge_conn,
                attempt,
            }) => edge.give_up(&link, edge_conn, attempt),
            None => {}
        }
    }
}

/// The [`PeerHandler`] of this node's links: hands each request and push to
/// the side it is for. A weak reference, so links do not keep the router
/// alive.
struct LinkHandler(Weak<Router>);

impl PeerHandler for LinkHandler {
    fn request(&self, from: MemberId, link: Link, body: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        let Some(r) = self.0.upgrade() else {
            return futures_util::future::ready(enc(&PeerResp::NotOwner)).boxed();
        };
        match dec::<PeerReq>(&body) {
            Some(PeerReq::Attach(req)) => r.serve_attach(from, link, req, None),
            Some(PeerReq::AttachAs { req, user }) => r.serve_attach(from, link, req, Some(user)),
            Some(PeerReq::Op {
                origin,
                id,
                op,
                args,
            }) => r.owner.serve_op((from, origin), id, op, args),
            Some(PeerReq::Stats) => {
                let resp = PeerResp::Stats {
                    sessions: r.host.live_sessions() as u64,
                    proxied: r.proxied() as u64,
                };
                futures_util::future::ready(enc(&resp)).boxed()
            }
            Some(PeerReq::Sample) => {
                let resp = PeerResp::Sample {
                    json: r.sample_json(),
                };
                futures_util::future::ready(enc(&resp)).boxed()
            }
            Some(PeerReq::Deliver(req)) => r.serve_deliver(req),
            Some(PeerReq::Api(req)) => r.serve_api(req),
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
        let (Some(r), Some(msg)) = (self.0.upgrade(), dec::<PeerPush>(&body)) else {
            return;
        };
        match msg {
            // edge -> owner
            PeerPush::Ack { origin, seq } => r.owner.ack((from, origin), seq),
            PeerPush::Detach { origin, attempt } => r.owner.edge_detached((from, origin), attempt),
            PeerPush::Bye { origin } => r.owner.bye((from, origin)),
            // owner -> edge
            PeerPush::Event {
                edge_conn,
                attempt,
                seq,
                body,
            } => r.edge.event(&from, edge_conn, attempt, seq, &body),
            PeerPush::Close {
                edge_conn,
                attempt,
                code,
                reason,
            } => r.edge.close(&from, edge_conn, attempt, code, reason),
            PeerPush::Moved { edge_conn, attempt } => r.edge.moved(&from, edge_conn, attempt),
        }
    }

    /// The proxies attached over `link` detach, and the edge connections
    /// routed over it route again. Another link to the same peer (a newer
    /// one, after a partition healed) keeps its own.
    fn closed(&self, peer: MemberId, link: Link) {
        if let Some(r) = self.0.upgrade() {
            tracing::info!(%peer, "peer link closed");
            r.owner.link_closed(&peer, &link);
            r.edge.link_closed(&link);
            r.pool.forget(&link);
        }
    }
}
