//! This node as the owner of sessions whose client connected to another
//! node's edge.
//!
//! A remote attach ([`Router::serve_attach`]) is served by a *proxy*: a
//! connection of this node, attached to the session actor like a local
//! client's, whose events, closes and "moved" go back over the link tagged
//! with the edge's attach attempt ([`forward_to_edge`]). [`OwnerSide`] keeps
//! the proxies by (edge member, origin) and passes the edge's ops, acks,
//! detaches and byes to them. Attaches of one connection can complete out of
//! order: only the newest attempt's proxy is kept, and an attempt the edge
//! gave up on (by `Detach`) is remembered, so that it detaches at once if it
//! completes later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Addr, ArbiterHandle};
use berth_actors::conn::{conn_channel, ConnMsg, ConnReceiver};
use berth_actors::ids::SessionId;
use berth_actors::protocol::{ErrorCode, OpReply};
use berth_actors::session::{Ack, AttachError, Bye, Detach, Op, Origin, SessionActor};
use berth_cluster::peer::Link;
use berth_cluster::ring::MemberId;
use futures_util::future::{BoxFuture, FutureExt};

use super::wire::{enc, AttachReq, PeerPush, PeerResp, Refusal};
use super::{lock, queue_op, AttachFail, Router};

/// How long an owner remembers that an edge gave up on an attach attempt,
/// so the attempt, if it completes after that, detaches at once.
const ABANDONED_KEEP: Duration = Duration::from_secs(60);

/// Which edge connection a proxy serves: the edge's member id and the
/// connection's origin there.
type EdgeKey = (MemberId, Origin);

/// Sessions hosted here for other nodes' edge connections.
pub(super) struct OwnerSide {
    proxies: Mutex<HashMap<EdgeKey, Proxy>>,
    /// Attach attempts their edge gave up on (by `Detach`), with when: one
    /// that completes later detaches at once instead of staying attached.
    abandoned: Mutex<HashMap<EdgeKey, (u64, Instant)>>,
    /// Arbiters that host sessions attached from other nodes (peer links run
    /// on plain tokio tasks, and session actors need an actix arbiter).
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: AtomicUsize,
}

/// A session hosted here for a connection on another node's edge.
struct Proxy {
    addr: Addr<SessionActor>,
    conn_id: u64,
    attempt: u64,
    /// The link the attach came on (its pushes go back on it).
    link: Link,
}

impl OwnerSide {
    pub(super) fn new(arbiters: Vec<ArbiterHandle>) -> OwnerSide {
        OwnerSide {
            proxies: Mutex::default(),
            abandoned: Mutex::default(),
            arbiters,
            next_arbiter: AtomicUsize::new(0),
        }
    }

    /// Number of sessions hosted here for other nodes' connections.
    pub(super) fn count(&self) -> usize {
        lock(&self.proxies).len()
    }

    pub(super) fn spawn_on_arbiter(
        &self,
        fut: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
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

    /// Records the proxy of a completed remote attach, unless its edge has
    /// given up on that attempt or a newer attempt's proxy is recorded
    /// already (attaches of one connection can complete out of order on
    /// different arbiters). Answers whether it was kept.
    fn keep_proxy(&self, key: EdgeKey, proxy: Proxy) -> bool {
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
    pub(super) fn edge_detached(&self, key: EdgeKey, attempt: u64) {
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
                    let now = Instant::now();
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

    /// The edge acked events up to `seq`.
    pub(super) fn ack(&self, key: EdgeKey, seq: u64) {
        if let Some(p) = lock(&self.proxies).get(&key) {
            p.addr.do_send(Ack {
                conn_id: p.conn_id,
                seq,
            });
        }
    }

    /// The edge's client said `bye`.
    pub(super) fn bye(&self, key: EdgeKey) {
        if let Some(p) = lock(&self.proxies).get(&key) {
            p.addr.do_send(Bye { conn_id: p.conn_id });
        }
    }

    /// An op of the edge connection `key`, queued on its proxy's actor now
    /// (in the order the link delivered the requests); answers its reply,
    /// or `Moved` if there is no proxy or the actor stopped.
    pub(super) fn serve_op(
        &self,
        key: EdgeKey,
        id: u64,
        op: String,
        args: String,
    ) -> BoxFuture<'static, Vec<u8>> {
        let proxy = lock(&self.proxies)
            .get(&key)
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
                    ErrorCode::Internal,
                    "the op could not be forwarded to the session's owner",
                    0,
                );
                return futures_util::future::ready(enc(&PeerResp::Reply(
                    serde_json::to_string(&reply).unwrap_or_default(),
                )))
                .boxed();
            }
        };
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

    /// `link` to `peer` closed: the proxies attached over it detach. Another
    /// link to the same peer (a newer one, after a partition healed) keeps
    /// its own.
    pub(super) fn link_closed(&self, peer: &MemberId, link: &Link) {
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
    }
}

impl Router {
    /// A remote attach from `from`'s edge, over `link`: attaches a proxy
    /// connection here and answers the welcome, or why not (`NotOwner` when
    /// this node does not own the session by its own ring). `user` is the
    /// subject the edge verified (`PeerReq::AttachAs`), checked by the actor.
    pub(super) fn serve_attach(
        self: Arc<Self>,
        from: MemberId,
        link: Link,
        req: AttachReq,
        user: Option<String>,
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
        // The actor lives on this node's actix arbiters: run the attach there.
        // Another attempt of the same edge connection (a retry after a
        // timeout, a re-route) needs no retiring here: the actor replaces a
        // handle of the same origin quietly and refuses an older attempt, and
        // `keep_proxy` keeps the newest attempt's proxy.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = Arc::clone(&self);
        let work = async move {
            let (handle, recv) = conn_channel(2048);
            let conn_id = handle.id();
            let r = me
                .attach_local(
                    handle,
                    origin,
                    attempt,
                    &id,
                    &token,
                    ack,
                    create,
                    reattach,
                    user.as_deref(),
                )
                .await;
            let resp = match r {
                Ok((welcome, claim, addr)) => {
                    let proxy = Proxy {
                        addr: addr.clone(),
                        conn_id,
                        attempt,
                        link: link.clone(),
                    };
                    if me.owner.keep_proxy((from.clone(), origin), proxy) {
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
        self.owner.spawn_on_arbiter(work);
        async move { rx.await.unwrap_or_else(|_| enc(&PeerResp::NotOwner)) }.boxed()
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
