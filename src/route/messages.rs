//! Messages between actors across nodes: the router as the host's
//! [`Postman`]. A batch for an actor this node owns goes to the host; one for
//! an actor another member owns rides that member's peer link, where the
//! owner checks it still owns the actor and hands it to its host. Whoever
//! does not own the receiver answers "retry": the sender sends again once
//! views agree, and epochs fence any activation in the wrong place.

use std::sync::{Arc, Weak};

use berth_actors::address::{Address, Sender};
use berth_actors::app::AppError;
use berth_actors::host::Postman;
use berth_actors::session::{Deliver, DeliverAck, DeliverError};
use berth_cluster::ring::MemberId;
use futures_util::future::{BoxFuture, FutureExt};

use super::wire::{dec, enc, DeliverReq, PeerReq, PeerResp};
use super::Router;

/// The router, as the host's postman (weak: the host must not keep the
/// router alive).
pub struct RouterPost(pub(super) Weak<Router>);

fn retry(why: impl Into<String>) -> DeliverError {
    DeliverError::Retry(why.into())
}

impl Postman for RouterPost {
    fn deliver(
        &self,
        to: Address,
        batch: Deliver,
    ) -> BoxFuture<'static, Result<DeliverAck, DeliverError>> {
        let Some(r) = self.0.upgrade() else {
            return futures_util::future::ready(Err(retry("node stopping"))).boxed();
        };
        let id = to.actor_id();
        // `None`: this node (see `Ownership::owner_of`).
        match r.ownership.owner_of(id.as_str()) {
            None if r.owns(&id) => r.host.deliver(&to, batch),
            None => futures_util::future::ready(Err(retry("this node is leaving"))).boxed(),
            Some(owner) => remote(r, owner, to, batch).boxed(),
        }
    }
}

async fn remote(
    r: Arc<Router>,
    owner: MemberId,
    to: Address,
    batch: Deliver,
) -> Result<DeliverAck, DeliverError> {
    let req = PeerReq::Deliver(DeliverReq {
        to: to.to_string(),
        from: serde_json::to_string(&batch.from).unwrap_or_default(),
        inc: batch.inc,
        msgs: batch
            .msgs
            .into_iter()
            .map(|(seq, body, at)| (seq, body.to_string(), at))
            .collect(),
    });
    let timeout = r.cfg.attach_timeout;
    let link = tokio::time::timeout(timeout, r.link(&owner))
        .await
        .map_err(|_| retry(format!("{owner} unreachable")))?
        .map_err(|e| retry(format!("{owner}: {e}")))?;
    let body = link
        .request(enc(&req), timeout)
        .await
        .map_err(|e| retry(format!("{owner}: {e}")))?;
    match dec::<PeerResp>(&body) {
        Some(PeerResp::Delivered {
            upto,
            refused,
            stalled,
        }) => Ok(DeliverAck {
            upto,
            refused: refused
                .into_iter()
                .map(|(seq, code, message)| {
                    let code = serde_json::from_str(&code)
                        .unwrap_or(berth_actors::protocol::ErrorCode::Internal);
                    (seq, AppError::new(code, message))
                })
                .collect(),
            stalled,
        }),
        Some(PeerResp::Undelivered { kind: 0, .. }) => Err(DeliverError::Gone),
        Some(PeerResp::Undelivered { kind: 1, .. }) => Err(DeliverError::UnknownKind),
        Some(PeerResp::Undelivered { why, .. }) => Err(retry(why)),
        _ => Err(retry(format!("{owner} did not understand the delivery"))),
    }
}

impl Router {
    /// Serves another node's `Deliver`: to the host, if this node owns the
    /// receiver, on one of the arbiters (actors need one).
    pub(super) fn serve_deliver(self: Arc<Self>, req: DeliverReq) -> BoxFuture<'static, Vec<u8>> {
        let undelivered = |kind: u8, why: &str| {
            futures_util::future::ready(enc(&PeerResp::Undelivered {
                kind,
                why: why.to_owned(),
            }))
            .boxed()
        };
        let (Ok(to), Ok(from)) = (
            req.to.parse::<Address>(),
            serde_json::from_str::<Sender>(&req.from),
        ) else {
            return undelivered(1, "malformed address");
        };
        if !self.owns(&to.actor_id()) {
            return undelivered(2, "not the owner");
        }
        let msgs = req
            .msgs
            .into_iter()
            .map(|(seq, body, at)| (seq, serde_json::from_str(&body).unwrap_or_default(), at))
            .collect();
        let batch = Deliver {
            from,
            inc: req.inc,
            msgs,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = Arc::clone(&self);
        self.owner.spawn_on_arbiter(async move {
            let resp = match me.host.deliver(&to, batch).await {
                Ok(ack) => PeerResp::Delivered {
                    upto: ack.upto,
                    refused: ack
                        .refused
                        .into_iter()
                        .map(|(seq, e)| {
                            (
                                seq,
                                serde_json::to_string(&e.code).unwrap_or_default(),
                                e.message,
                            )
                        })
                        .collect(),
                    stalled: ack.stalled,
                },
                Err(DeliverError::Gone) => PeerResp::Undelivered {
                    kind: 0,
                    why: String::new(),
                },
                Err(DeliverError::UnknownKind) => PeerResp::Undelivered {
                    kind: 1,
                    why: String::new(),
                },
                Err(DeliverError::Retry(why)) => PeerResp::Undelivered { kind: 2, why },
            };
            let _ = tx.send(enc(&resp));
        });
        async move {
            rx.await.unwrap_or_else(|_| {
                enc(&PeerResp::Undelivered {
                    kind: 2,
                    why: "dropped".into(),
                })
            })
        }
        .boxed()
    }
}
