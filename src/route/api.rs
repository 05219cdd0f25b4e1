//! The backend API's questions to the cluster (`src/api/` asks them): a
//! delivery from a backend to an actor's owner, the live sessions of a user
//! on every member, an actor's liveness on its owner, and ending a session
//! on its owner. Each goes to this node's host when the ring names this
//! node, or over the owner's peer link as a [`PeerReq::Api`] (or
//! [`PeerReq::Deliver`] for messages, the path actors' messages take).
//!
//! Work on this node's host runs on the router's arbiters, like a remote
//! node's request would: actors started for the API live there, not on the
//! API listener's single worker.

use std::sync::Arc;
use std::time::Duration;

use berth_actors::address::Address;
use berth_actors::host::Postman;
use berth_actors::ids::SessionId;
use berth_actors::session::{Deliver, DeliverAck, DeliverError, EndError, LiveStatus};
use berth_cluster::ring::MemberId;
use futures_util::future::{BoxFuture, FutureExt};

use super::messages::RouterPost;
use super::wire::{dec, enc, ApiReq, ApiResp, PeerReq, PeerResp};
use super::Router;

/// Why a question to another member got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{member}: {why}")]
pub struct Unanswered {
    /// The member asked.
    pub member: MemberId,
    /// What went wrong (unreachable, timed out, did not understand).
    pub why: String,
}

/// The live sessions of a user across the cluster.
#[derive(Debug, Default)]
pub struct UserSessions {
    /// Every live session found, with the member that holds it.
    pub sessions: Vec<(SessionId, MemberId)>,
    /// Members that did not answer (their sessions are not in the list).
    pub unanswered: Vec<Unanswered>,
}

impl Router {
    /// Runs `fut` on one of the router's arbiters and answers its output
    /// (`None` if the arbiter dropped it: the node is stopping).
    async fn on_arbiter<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.owner.spawn_on_arbiter(async move {
            let _ = tx.send(fut.await);
        });
        rx.await.ok()
    }

    /// The member the ring names the owner of actor `id` (this node when
    /// it is not clustered).
    pub fn owner_name(&self, id: &SessionId) -> MemberId {
        self.ownership
            .owner_of(id.as_str())
            .unwrap_or_else(|| self.cfg.me.clone())
    }

    /// Delivers a backend's `batch` to `to`'s owner, as an actor's message
    /// travels (the owner checks it owns `to`; whoever does not answers
    /// "retry"). One attempt: the API retries.
    pub async fn api_deliver(
        self: &Arc<Self>,
        to: Address,
        batch: Deliver,
    ) -> Result<DeliverAck, DeliverError> {
        let post = RouterPost(Arc::downgrade(self));
        self.on_arbiter(async move { post.deliver(to, batch).await })
            .await
            .unwrap_or_else(|| Err(DeliverError::Retry("node stopping".into())))
    }

    /// Asks `member` an API question, within `timeout`.
    async fn ask(
        &self,
        member: &MemberId,
        req: ApiReq,
        timeout: Duration,
    ) -> Result<ApiResp, Unanswered> {
        let fail = |why: String| Unanswered {
            member: member.clone(),
            why,
        };
        let ask = async {
            let link = self.link(member).await.map_err(|e| fail(e.to_string()))?;
            let body = link
                .request(enc(&PeerReq::Api(req)), timeout)
                .await
                .map_err(|e| fail(e.to_string()))?;
            match dec::<PeerResp>(&body) {
                Some(PeerResp::Api(resp)) => Ok(resp),
                _ => Err(fail(
                    "did not understand the question (an older release?)".into(),
                )),
            }
        };
        tokio::time::timeout(timeout, ask)
            .await
            .unwrap_or_else(|_| Err(fail("no answer in time".into())))
    }

    /// The live sessions of `user` on every member of the view, each asked
    /// within `timeout`, all at once.
    pub async fn api_user_sessions(&self, user: &str, timeout: Duration) -> UserSessions {
        let view = self.view();
        let mut members: Vec<MemberId> = view.ids().cloned().collect();
        if !members.contains(&self.cfg.me) {
            members.push(self.cfg.me.clone());
        }
        let answers = futures_util::future::join_all(members.iter().map(|m| async move {
            if m == &self.cfg.me {
                return Ok(self.host.user_sessions(user));
            }
            let req = ApiReq::UserSessions {
                user: user.to_owned(),
            };
            match self.ask(m, req, timeout).await? {
                ApiResp::Sessions(ids) => {
                    Ok(ids.iter().filter_map(|s| SessionId::parse(s)).collect())
                }
                other => Err(Unanswered {
                    member: m.clone(),
                    why: format!("unexpected answer {other:?}"),
                }),
            }
        }))
        .await;
        let mut out = UserSessions::default();
        for (m, a) in members.into_iter().zip(answers) {
            match a {
                Ok(ids) => out
                    .sessions
                    .extend(ids.into_iter().map(|id| (id, m.clone()))),
                Err(u) => out.unanswered.push(u),
            }
        }
        // A session listed by two members (one releasing it, one that
        // activated it) is delivered to once: its owner decides.
        out.sessions.sort();
        out.sessions.dedup_by(|a, b| a.0 == b.0);
        out
    }

    /// Whether actor `id` is live on its owner, and its version there
    /// (`Ok(None)`: not live).
    pub async fn api_status(
        &self,
        id: &SessionId,
        timeout: Duration,
    ) -> Result<Option<LiveStatus>, Unanswered> {
        match self.ownership.owner_of(id.as_str()) {
            None => Ok(self.host.status(id).await),
            Some(owner) => {
                let req = ApiReq::Status {
                    actor: id.to_string(),
                };
                match self.ask(&owner, req, timeout).await? {
                    ApiResp::Live { version, epoch } => Ok(Some(LiveStatus { version, epoch })),
                    ApiResp::NotLive => Ok(None),
                    other => Err(Unanswered {
                        member: owner,
                        why: format!("unexpected answer {other:?}"),
                    }),
                }
            }
        }
    }

    /// Ends session `id` on its owner (see `berth_actors::session::End`).
    pub async fn api_end(self: &Arc<Self>, id: SessionId) -> Result<(), EndError> {
        match self.ownership.owner_of(id.as_str()) {
            None if self.owns(&id) => {
                let host = self.host.clone();
                self.on_arbiter(async move { host.end(&id).await })
                    .await
                    .unwrap_or_else(|| Err(EndError::Retry("node stopping".into())))
            }
            None => Err(EndError::Retry("this node is leaving".into())),
            Some(owner) => {
                let req = ApiReq::End {
                    session: id.to_string(),
                };
                match self.ask(&owner, req, self.cfg.attach_timeout).await {
                    Ok(ApiResp::Ended) => Ok(()),
                    Ok(ApiResp::Gone) => Err(EndError::Gone),
                    Ok(ApiResp::Retry(why)) => Err(EndError::Retry(why)),
                    Ok(other) => Err(EndError::Retry(format!("unexpected answer {other:?}"))),
                    Err(u) => Err(EndError::Retry(u.to_string())),
                }
            }
        }
    }

    /// Serves another member's [`ApiReq`].
    pub(super) fn serve_api(self: Arc<Self>, req: ApiReq) -> BoxFuture<'static, Vec<u8>> {
        let answer = |r: ApiResp| enc(&PeerResp::Api(r));
        match req {
            ApiReq::UserSessions { user } => {
                let ids = self
                    .host
                    .user_sessions(&user)
                    .into_iter()
                    .map(|id| id.to_string())
                    .collect();
                futures_util::future::ready(answer(ApiResp::Sessions(ids))).boxed()
            }
            ApiReq::Status { actor } => {
                let Some(id) = SessionId::parse_actor(&actor) else {
                    return futures_util::future::ready(answer(ApiResp::NotLive)).boxed();
                };
                let status = self.host.status(&id);
                async move {
                    answer(match status.await {
                        Some(s) => ApiResp::Live {
                            version: s.version,
                            epoch: s.epoch,
                        },
                        None => ApiResp::NotLive,
                    })
                }
                .boxed()
            }
            ApiReq::End { session } => {
                let Some(id) = SessionId::parse(&session) else {
                    return futures_util::future::ready(answer(ApiResp::Gone)).boxed();
                };
                if !self.owns(&id) {
                    return futures_util::future::ready(answer(ApiResp::Retry(
                        "not the owner".into(),
                    )))
                    .boxed();
                }
                async move {
                    answer(match self.api_end(id).await {
                        Ok(()) => ApiResp::Ended,
                        Err(EndError::Gone) => ApiResp::Gone,
                        Err(EndError::Retry(why)) => ApiResp::Retry(why),
                    })
                }
                .boxed()
            }
        }
    }
}
