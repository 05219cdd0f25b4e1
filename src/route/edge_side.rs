//! This node as the edge: its client connections, attached to their session
//! wherever it lives.
//!
//! [`Router::attach`] resolves the session's owner and attaches the
//! connection there (or on this node's host); [`Router::op`],
//! [`Router::ack`], [`Router::detach`] and [`Router::bye`] go along the
//! [`Route`] it answers. A connection routed to another node is recorded in
//! [`EdgeSide`] with the attach attempt that routed it: the owner's pushes
//! (events, closes, "moved") reach the connection only from the proxy of
//! that attempt, and a push from any other is stale.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use berth_actors::conn::ConnHandle;
use berth_actors::ids::SessionId;
use berth_actors::protocol::{CloseCode, Event, OpReply, Welcome};
use berth_actors::session::{Ack, AttachError, Bye, Claim, Detach, NotHere, Op, Origin};
use berth_cluster::peer::Link;
use berth_cluster::ring::MemberId;
use futures_util::future::{FutureExt, LocalBoxFuture};
use serde_json::Value;

use super::wire::{dec, enc, AttachReq, PeerPush, PeerReq, PeerResp};
use super::{lock, queue_op, Abandon, AttachFail, Attached, Route, Router, Undo};

/// Longest wait for room on a link to send a detach.
const DETACH_PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// This node's connections routed to other nodes, and the numbering of
/// attach attempts.
pub(super) struct EdgeSide {
    /// Edge connections of this node routed to another node, by connection
    /// id: pushes reach them here.
    conns: Mutex<HashMap<u64, EdgeConn>>,
    /// This process's nonce in [`Origin`]s: a node restarted under the same
    /// id is another edge, whose connection ids start again from 1.
    incarnation: u64,
    /// The next attach attempt (grows; orders attempts of one connection).
    next_attempt: AtomicU64,
}

/// An edge connection of this node routed to another node.
struct EdgeConn {
    member: MemberId,
    attempt: u64,
    link: Link,
    handle: ConnHandle,
}

impl EdgeSide {
    pub(super) fn new() -> EdgeSide {
        EdgeSide {
            conns: Mutex::default(),
            incarnation: rand::random(),
            next_attempt: AtomicU64::new(1),
        }
    }

    /// Number of this edge's connections routed to other nodes.
    pub(super) fn count(&self) -> usize {
        lock(&self.conns).len()
    }

    /// This edge's connection `conn_id`, as owners know it.
    pub(super) fn origin(&self, conn_id: u64) -> Origin {
        Origin {
            edge: self.incarnation,
            conn: conn_id,
        }
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
        let mut e = lock(&self.conns);
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

    /// An event from the owner's proxy.
    pub(super) fn event(
        &self,
        from: &MemberId,
        edge_conn: u64,
        attempt: u64,
        seq: u64,
        body: &str,
    ) {
        let Some(h) = self.routed_conn(from, edge_conn, attempt, false) else {
            return;
        };
        match serde_json::from_str(body) {
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

    /// The owner's proxy closes the connection with close code number `code`.
    pub(super) fn close(
        &self,
        from: &MemberId,
        edge_conn: u64,
        attempt: u64,
        code: u16,
        reason: String,
    ) {
        if let Some(h) = self.routed_conn(from, edge_conn, attempt, true) {
            h.close(
                CloseCode::from_code(code).unwrap_or(CloseCode::Internal),
                reason,
            );
        }
    }

    /// The session moved away from the owner: the connection routes again.
    pub(super) fn moved(&self, from: &MemberId, edge_conn: u64, attempt: u64) {
        if let Some(h) = self.routed_conn(from, edge_conn, attempt, true) {
            h.moved();
        }
    }

    /// `link` closed: the connections routed over it route again.
    pub(super) fn link_closed(&self, link: &Link) {
        let moved: Vec<ConnHandle> = {
            let mut e = lock(&self.conns);
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
    }

    /// An attach attempt over `link` that nobody waits for any more: the
    /// connection is no longer routed by it, and the owner is told.
    pub(super) fn give_up(&self, link: &Link, edge_conn: u64, attempt: u64) {
        {
            let mut e = lock(&self.conns);
            if e.get(&edge_conn).is_some_and(|c| c.attempt == attempt) {
                e.remove(&edge_conn);
            }
        }
        push_detach(link, self.origin(edge_conn), attempt);
    }
}

impl Router {
    /// Attaches `conn` to session `id` wherever it lives. `reattach` is
    /// `None` for a client's `hello` and the connection's claim when it routes
    /// again (see [`Attach`](berth_actors::session::Attach)); `user` is the
    /// verified subject of the hello's credential, which the owner's actor
    /// binds or checks. Answers the welcome, the route and the claim.
    ///
    /// If this future is dropped or fails after the attach may have reached
    /// an owner, the owner is told to detach that attempt (see
    /// [`Abandon`]): an attach nobody waits for never stays attached.
    #[allow(clippy::too_many_arguments)]
    pub async fn attach(
        &self,
        conn: &ConnHandle,
        id: &SessionId,
        token: &str,
        ack: u64,
        create: bool,
        reattach: Option<Claim>,
        user: Option<&str>,
    ) -> Attached {
        lock(&self.edge.conns).remove(&conn.id());
        let origin = self.edge.origin(conn.id());
        let attempt = self.edge.next_attempt.fetch_add(1, Ordering::Relaxed);
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
                    user,
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
        lock(&self.edge.conns).insert(
            conn.id(),
            EdgeConn {
                member: member.clone(),
                attempt,
                link: link.clone(),
                handle: conn.clone(),
            },
        );
        let req = AttachReq {
            session: id.to_string(),
            token: token.to_owned(),
            ack,
            origin,
            attempt,
            create,
            reattach,
        };
        let req = match user {
            None => PeerReq::Attach(req),
            Some(user) => PeerReq::AttachAs {
                req,
                user: user.to_owned(),
            },
        };
        let mut abandon = Abandon(Some(Undo::Remote {
            edge: &self.edge,
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
                lock(&self.edge.conns).remove(&conn.id());
                Err(match AttachError::from(refusal) {
                    AttachError::Unavailable(m) => AttachFail::Retry(m),
                    AttachError::Moved => AttachFail::Moving,
                    other => AttachFail::Refused(other),
                })
            }
            Some(PeerResp::NotOwner) => {
                abandon.disarm();
                lock(&self.edge.conns).remove(&conn.id());
                Err(AttachFail::Retry(format!(
                    "{member} does not own the session yet"
                )))
            }
            _ => Err(AttachFail::Retry(format!(
                "unexpected answer from {member}"
            ))),
        }
    }

    /// Sends an op along `route`. The op is queued before this returns (ops
    /// sent one after another are applied in that order, whatever the
    /// actor's mailbox holds: see [`QueuedOp`](berth_actors::session::QueuedOp));
    /// the future answers.
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
                    origin: self.edge.origin(conn_id),
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

    /// Forwards an ack.
    pub fn ack(&self, route: &Route, conn_id: u64, seq: u64) {
        match route {
            Route::Local(a) => a.do_send(Ack { conn_id, seq }),
            Route::Remote { link, .. } => {
                let _ = link.try_push(enc(&PeerPush::Ack {
                    origin: self.edge.origin(conn_id),
                    seq,
                }));
            }
        }
    }

    /// The connection ended or moves elsewhere.
    pub fn detach(&self, route: &Route, conn_id: u64) {
        lock(&self.edge.conns).remove(&conn_id);
        match route {
            Route::Local(a) => a.do_send(Detach { conn_id }),
            Route::Remote { link, attempt } => {
                push_detach(link, self.edge.origin(conn_id), *attempt)
            }
        }
    }

    /// `bye`: the owner deletes the session and closes the connection (1000).
    pub async fn bye(&self, route: &Route, conn_id: u64) -> bool {
        match route {
            Route::Local(a) => a.send(Bye { conn_id }).await.is_ok(),
            Route::Remote { link, .. } => link
                .push(enc(&PeerPush::Bye {
                    origin: self.edge.origin(conn_id),
                }))
                .await
                .is_ok(),
        }
    }
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
