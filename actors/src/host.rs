//! The host: this node's registry of live session actors.
//!
//! It creates session actors, finds the live one for an id or activates it
//! from the store, and stops them all at shutdown. At most one actor per
//! session id is registered on a node; an actor removes itself when it stops
//! (matched by a generation number, so a late removal never evicts a newer
//! actor for the same id).
//!
//! The registry lock is a std mutex held only for map operations, never across
//! an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::{join_all, BoxFuture};

use crate::address::{Address, AddressError};
use crate::app::{Entity, Session};
use crate::ids::{new_token, SessionId};
use crate::protocol::CloseCode;
use crate::runtime::{Runtime, Typed, TypedEntity};
use crate::session::{
    Deliver, DeliverAck, DeliverError, End, EndError, Init, LiveStatus, SessionActor, Shutdown,
    Status,
};
use crate::shared::HostShared;
pub use crate::shared::Postman;
pub use crate::shared::{Durability, HostConfig};
use crate::state::Limits;
use crate::store::CheckpointStore;

/// A [`Host`] that does not keep it alive.
#[derive(Clone)]
pub struct WeakHost {
    shared: Weak<HostShared>,
    sessions: Weak<Mutex<Registry>>,
    next_gen: Weak<AtomicU64>,
    closing: Weak<AtomicBool>,
}

impl WeakHost {
    /// The host, if it still exists.
    pub fn upgrade(&self) -> Option<Host> {
        Some(Host {
            shared: self.shared.upgrade()?,
            sessions: self.sessions.upgrade()?,
            next_gen: self.next_gen.upgrade()?,
            closing: self.closing.upgrade()?,
        })
    }
}

/// The postman of a node alone: every actor is on this host.
struct LocalPost(WeakHost);

impl Postman for LocalPost {
    fn deliver(
        &self,
        to: Address,
        batch: Deliver,
    ) -> BoxFuture<'static, Result<DeliverAck, DeliverError>> {
        match self.0.upgrade() {
            Some(host) => host.deliver(&to, batch),
            None => Box::pin(async { Err(DeliverError::Retry("node stopped".into())) }),
        }
    }
}

/// Live actors by session id, with the generation that registered each.
type Registry = HashMap<SessionId, (u64, Addr<SessionActor>)>;

/// What [`Host::shutdown`] achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Sessions checkpointed and stopped.
    pub checkpointed: usize,
    /// Sessions whose final checkpoint failed with unsaved writes.
    pub failed: usize,
    /// Sessions that did not answer before the deadline.
    pub timed_out: usize,
}

/// Handle to the host; cheap to clone.
#[derive(Clone)]
pub struct Host {
    shared: Arc<HostShared>,
    sessions: Arc<Mutex<Registry>>,
    next_gen: Arc<AtomicU64>,
    /// Set when [`Host::shutdown`] begins: no actor starts after its snapshot
    /// of the live ones (it would never get its final checkpoint).
    closing: Arc<AtomicBool>,
}

impl Host {
    /// A host running the application `app`, keeping checkpoints in `store`.
    pub fn new<A: Session>(
        app: A,
        store: Arc<dyn CheckpointStore>,
        cfg: HostConfig,
        limits: Limits,
    ) -> Self {
        Self::with_runtime(Arc::new(Typed::new(app)), store, cfg, limits)
    }

    /// A host running an already erased application.
    pub fn with_runtime(
        app: Arc<dyn Runtime>,
        store: Arc<dyn CheckpointStore>,
        cfg: HostConfig,
        limits: Limits,
    ) -> Self {
        let sessions: Arc<Mutex<Registry>> = Arc::default();
        let weak = Arc::downgrade(&sessions);
        let on_stop = Box::new(move |id: &SessionId, gen: u64| {
            if let Some(sessions) = weak.upgrade() {
                let mut map = sessions.lock().unwrap_or_else(|p| p.into_inner());
                if map.get(id).is_some_and(|(g, _)| *g == gen) {
                    map.remove(id);
                }
            }
        });
        let host = Host {
            shared: Arc::new(HostShared {
                app,
                entities: RwLock::default(),
                postman: RwLock::default(),
                store,
                cfg,
                limits: RwLock::new(Arc::new(limits)),
                on_stop,
                users: crate::users::UserIndex::default(),
            }),
            sessions,
            next_gen: Arc::new(AtomicU64::new(1)),
            closing: Arc::default(),
        };
        host.set_postman(Arc::new(LocalPost(host.downgrade())));
        host
    }

    /// Registers the entity `kind`, run by `app`.
    pub fn register_entity<E: Entity>(&self, kind: &str, app: E) -> Result<(), AddressError> {
        if !crate::address::valid_kind(kind) {
            return Err(AddressError::BadKind);
        }
        self.shared
            .entities
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kind.to_owned(), Arc::new(TypedEntity::new(app)));
        Ok(())
    }

    /// Who carries this node's actors' messages from now on (the router of
    /// a cluster; by default, this host alone).
    pub fn set_postman(&self, postman: Arc<dyn Postman>) {
        *self
            .shared
            .postman
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(postman);
    }

    /// A handle that does not keep the host alive.
    pub fn downgrade(&self) -> WeakHost {
        WeakHost {
            shared: Arc::downgrade(&self.shared),
            sessions: Arc::downgrade(&self.sessions),
            next_gen: Arc::downgrade(&self.next_gen),
            closing: Arc::downgrade(&self.closing),
        }
    }

    /// Delivers `batch` to the actor at `to` on this node, activating it
    /// (an entity that does not exist yet is made). Must be called inside
    /// an actix system.
    pub fn deliver(
        &self,
        to: &Address,
        batch: Deliver,
    ) -> BoxFuture<'static, Result<DeliverAck, DeliverError>> {
        let id = to.actor_id();
        if self.shared.runtime_for(&id).is_none() {
            return Box::pin(async { Err(DeliverError::UnknownKind) });
        }
        if self.closing.load(Ordering::SeqCst) {
            return Box::pin(async { Err(DeliverError::Retry("node shutting down".into())) });
        }
        let addr = self.session(&id);
        Box::pin(async move {
            match addr.send(batch).await {
                Ok(r) => r,
                Err(_) => Err(DeliverError::Retry("the actor stopped".into())),
            }
        })
    }

    /// The live actor of `id` on this node, if there is one (never
    /// activates it).
    pub fn live_actor(&self, id: &SessionId) -> Option<Addr<SessionActor>> {
        self.lock()
            .get(id)
            .map(|(_, a)| a.clone())
            .filter(|a| a.connected())
    }

    /// What the live actor of `id` on this node says of itself; `None`
    /// when no actor of `id` is live here (never activates it).
    pub fn status(&self, id: &SessionId) -> BoxFuture<'static, Option<LiveStatus>> {
        let addr = self.live_actor(id);
        Box::pin(async move { addr?.send(Status).await.ok().flatten() })
    }

    /// Whether this node runs the actor at `to`: a session, or an entity
    /// of a registered kind.
    pub fn knows(&self, to: &Address) -> bool {
        self.shared.runtime_for(&to.actor_id()).is_some()
    }

    /// The live sessions of `user` on this node (see [`crate::users`]).
    pub fn user_sessions(&self, user: &str) -> Vec<SessionId> {
        self.shared.users.sessions(user)
    }

    /// Ends session `id` as its client's `bye` does (its checkpoint deleted,
    /// fenced), closing its client with 4004: activated from the store if
    /// it is not live here. Must be called inside an actix system.
    pub fn end(&self, id: &SessionId) -> BoxFuture<'static, Result<(), EndError>> {
        if id.is_entity() {
            return Box::pin(async { Err(EndError::Gone) });
        }
        if self.closing.load(Ordering::SeqCst) {
            return Box::pin(async { Err(EndError::Retry("node shutting down".into())) });
        }
        let addr = self.session(id);
        Box::pin(async move {
            match addr.send(End).await {
                Ok(r) => r,
                Err(_) => Err(EndError::Retry("the actor stopped".into())),
            }
        })
    }

    /// Starts a brand-new session; returns its id, its token (never stored in
    /// clear) and its actor. Must be called inside an actix system.
    pub fn create_session(&self) -> (SessionId, String, Addr<SessionActor>) {
        let (token, hash) = new_token();
        let id = SessionId::random();
        let addr = self.start(id.clone(), Init::New(hash));
        (id, token, addr)
    }

    /// Starts a brand-new session under an id and token chosen by the caller
    /// (an edge on another node, which picked the id to route it here).
    pub fn create_session_with(&self, id: SessionId, token: &str) -> Addr<SessionActor> {
        self.start(id, Init::New(crate::ids::TokenHash::of(token)))
    }

    /// Ids of every live session on this node.
    pub fn live_ids(&self) -> Vec<SessionId> {
        self.lock().keys().cloned().collect()
    }

    /// Hands off `id` if it is live here (final checkpoint, connection told it
    /// moved, actor stopped); answers whether it was live.
    pub async fn release(&self, id: &SessionId) -> bool {
        let addr = self.lock().get(id).map(|(_, a)| a.clone());
        match addr {
            Some(a) => {
                let _ = a.send(crate::session::Release).await;
                true
            }
            None => false,
        }
    }

    /// The live actor of `id`, activating it from the store if needed. The
    /// actor answers `NotFound` to its first `Attach` if the store has no
    /// such session. Must be called inside an actix system.
    pub fn session(&self, id: &SessionId) -> Addr<SessionActor> {
        if let Some((_, addr)) = self.lock().get(id) {
            if addr.connected() {
                return addr.clone();
            }
        }
        self.start(id.clone(), Init::Resume)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self, id: SessionId, init: Init) -> Addr<SessionActor> {
        let mut map = self.lock();
        // Re-check under the lock: two connections may activate the same id at once.
        if let Some((_, addr)) = map.get(&id) {
            if addr.connected() {
                return addr.clone();
            }
        }
        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        // Checked under the registry lock that `shutdown` takes its snapshot
        // under: an actor either is in the snapshot or refuses to start.
        let init = if self.closing.load(Ordering::SeqCst) {
            Init::Refuse
        } else {
            init
        };
        let addr = SessionActor::new(id.clone(), gen, self.shared.clone(), init).start();
        map.insert(id, (gen, addr.clone()));
        addr
    }

    /// Number of live session actors on this node.
    pub fn live_sessions(&self) -> usize {
        self.lock().len()
    }

    /// The current per-session limits.
    pub fn limits(&self) -> Arc<Limits> {
        self.shared.limits()
    }

    /// Replaces the per-session limits (SIGHUP); ops see them from their next op.
    pub fn set_limits(&self, limits: Limits) {
        *self
            .shared
            .limits
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(limits);
    }

    /// A bounded metric label for an op name (`"other"` for unknown names).
    pub fn op_label(&self, op: &str) -> &'static str {
        self.shared.app.op_label(op)
    }

    /// Wakes the sessions whose timer is due and that `owned` says live on
    /// this node: each is activated from the store (if it is not live here
    /// already) and fires its due timers. Answers how many were activated.
    pub async fn wake_due(&self, owned: impl Fn(&SessionId) -> bool, limit: usize) -> usize {
        if self.closing.load(Ordering::SeqCst) {
            return 0;
        }
        let now = crate::session::now_ms();
        let Ok(due) = self.shared.store.due_wakes(now, limit).await else {
            return 0;
        };
        let mut woken = 0;
        for id in due {
            if !owned(&id) || self.lock().get(&id).is_some_and(|(_, a)| a.connected()) {
                continue;
            }
            let _ = self.session(&id);
            woken += 1;
        }
        if woken > 0 {
            metrics::counter!("berth_timer_wakeups_total").increment(woken as u64);
        }
        woken
    }

    /// The checkpoint store.
    pub fn store(&self) -> &Arc<dyn CheckpointStore> {
        &self.shared.store
    }

    /// Host settings.
    pub fn config(&self) -> &HostConfig {
        &self.shared.cfg
    }

    /// Checkpoints and stops every live session, closing their clients with
    /// `code`, within `deadline`.
    pub async fn shutdown(&self, code: CloseCode, deadline: Duration) -> ShutdownReport {
        let addrs: Vec<_> = {
            let map = self.lock();
            self.closing.store(true, Ordering::SeqCst);
            map.values().map(|(_, a)| a.clone()).collect()
        };
        let mut report = ShutdownReport::default();
        let all = join_all(addrs.iter().map(|a| a.send(Shutdown { code })));
        match tokio::time::timeout(deadline, all).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(true) => report.checkpointed += 1,
                        Ok(false) => report.failed += 1,
                        // The actor stopped on its own meanwhile (passivated, bye).
                        Err(_) => report.checkpointed += 1,
                    }
                }
            }
            Err(_) => report.timed_out = addrs.len(),
        }
        report
    }
}
