//! What every session actor of a node shares: the application, the store,
//! the settings and the limits. The host ([`crate::host`]) makes it; the
//! actors ([`crate::session`]) read it. It names neither.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures_util::future::BoxFuture;

use crate::address::Address;
use crate::session::{Deliver, DeliverAck, DeliverError};
use std::time::Duration;

use crate::ids::SessionId;
use crate::runtime::Runtime;
use crate::state::Limits;
use crate::store::CheckpointStore;
use crate::users::UserIndex;

/// When a state change is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After its checkpoint is written (default): nothing acknowledged is lost.
    Sync,
    /// At once; checkpoints are written every `checkpoint_interval`. A node loss
    /// loses at most the acknowledged writes of the last interval (plus one
    /// store round trip) per session.
    Interval,
}

/// Settings of the host that do not change at run time.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// This node's id, reported in `welcome`.
    pub node_id: String,
    /// How long a session without a connection stays live before passivating.
    pub detach_timeout: Duration,
    /// The same for a session that never ran a state-changing op (it is not
    /// in the store, so passivating it just forgets it): short, so a flood of
    /// anonymous hellos does not hold actors for `detach_timeout`.
    pub unwritten_detach_timeout: Duration,
    /// When a state change is acknowledged.
    pub durability: Durability,
    /// Interval-mode checkpoint period.
    pub checkpoint_interval: Duration,
    /// A session whose last checkpoint is older than this rewrites it on a
    /// read, so the store's time to live follows activity, not only writes.
    pub touch_after: Duration,
    /// How long a confirmed epoch is trusted: after this, an attach (and a
    /// read) first checks that no newer activation exists elsewhere, so an
    /// actor that outlived a partition never serves stale state.
    pub lease: Duration,
    /// Longest a handler may run: past it the op answers `unavailable` and
    /// nothing it did is committed.
    pub handler_timeout: Duration,
}

/// Called by an actor when it stops: its id and generation.
pub(crate) type OnStop = Box<dyn Fn(&SessionId, u64) + Send + Sync>;

/// Carries a batch of messages to the actor at an address, wherever it
/// lives: this node's host (the default), or the owner node over a peer link
/// (the cluster's router installs itself with `Host::set_postman`).
pub trait Postman: Send + Sync + 'static {
    /// Delivers `batch` to `to`; answers the receiver's acknowledgement.
    fn deliver(
        &self,
        to: Address,
        batch: Deliver,
    ) -> BoxFuture<'static, Result<DeliverAck, DeliverError>>;
}

pub(crate) struct HostShared {
    pub(crate) app: Arc<dyn Runtime>,
    /// Entity kinds and their applications.
    pub(crate) entities: RwLock<HashMap<String, Arc<dyn Runtime>>>,
    /// Who carries this node's actors' messages.
    pub(crate) postman: RwLock<Option<Arc<dyn Postman>>>,
    pub(crate) store: Arc<dyn CheckpointStore>,
    pub(crate) cfg: HostConfig,
    pub(crate) limits: RwLock<Arc<Limits>>,
    pub(crate) on_stop: OnStop,
    /// This node's live sessions by user (the backend API's fan-out).
    pub(crate) users: UserIndex,
}

impl HostShared {
    pub(crate) fn limits(&self) -> Arc<Limits> {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The application of the actor `id`: the session application, or the
    /// entity kind's; `None` for an entity of a kind nobody registered.
    pub(crate) fn runtime_for(&self, id: &SessionId) -> Option<Arc<dyn Runtime>> {
        match Address::of_actor(id) {
            Address::Session(_) => Some(self.app.clone()),
            Address::Entity { kind, .. } => self
                .entities
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&kind)
                .cloned(),
        }
    }

    pub(crate) fn postman(&self) -> Option<Arc<dyn Postman>> {
        self.postman
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn remove(&self, id: &SessionId, gen: u64) {
        (self.on_stop)(id, gen);
    }
}
