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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::join_all;

use crate::app::Application;
use crate::ids::{new_token, SessionId};
use crate::protocol::CloseCode;
use crate::session::{Init, SessionActor, Shutdown};
use crate::state::Limits;
use crate::store::CheckpointStore;

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
}

/// Live actors by session id, with the generation that registered each.
type Registry<A> = HashMap<SessionId, (u64, Addr<SessionActor<A>>)>;

pub(crate) struct HostShared<A: Application> {
    pub(crate) app: A,
    pub(crate) store: Arc<dyn CheckpointStore>,
    pub(crate) cfg: HostConfig,
    limits: RwLock<Arc<Limits>>,
    sessions: Mutex<Registry<A>>,
    next_gen: AtomicU64,
    /// Set when [`Host::shutdown`] begins: no actor starts after its snapshot
    /// of the live ones (it would never get its final checkpoint).
    closing: std::sync::atomic::AtomicBool,
}

impl<A: Application> HostShared<A> {
    pub(crate) fn limits(&self) -> Arc<Limits> {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn remove(&self, id: &SessionId, gen: u64) {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(id).is_some_and(|(g, _)| *g == gen) {
            map.remove(id);
        }
    }
}

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
pub struct Host<A: Application> {
    shared: Arc<HostShared<A>>,
}

impl<A: Application> Clone for Host<A> {
    fn clone(&self) -> Self {
        Host {
            shared: self.shared.clone(),
        }
    }
}

impl<A: Application> Host<A> {
    /// A host running `app`, keeping checkpoints in `store`.
    pub fn new(app: A, store: Arc<dyn CheckpointStore>, cfg: HostConfig, limits: Limits) -> Self {
        Host {
            shared: Arc::new(HostShared {
                app,
                store,
                cfg,
                limits: RwLock::new(Arc::new(limits)),
                sessions: Mutex::default(),
                next_gen: AtomicU64::new(1),
                closing: Default::default(),
            }),
        }
    }

    /// Starts a brand-new session; returns its id, its token (never stored in
    /// clear) and its actor. Must be called inside an actix system.
    pub fn create_session(&self) -> (SessionId, String, Addr<SessionActor<A>>) {
        let (token, hash) = new_token();
        let id = SessionId::random();
        let addr = self.start(id.clone(), Init::New(hash));
        (id, token, addr)
    }

    /// Starts a brand-new session under an id and token chosen by the caller
    /// (an edge on another node, which picked the id to route it here).
    pub fn create_session_with(&self, id: SessionId, token: &str) -> Addr<SessionActor<A>> {
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
    pub fn session(&self, id: &SessionId) -> Addr<SessionActor<A>> {
        if let Some((_, addr)) = self.lock().get(id) {
            if addr.connected() {
                return addr.clone();
            }
        }
        self.start(id.clone(), Init::Resume)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry<A>> {
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self, id: SessionId, init: Init) -> Addr<SessionActor<A>> {
        let mut map = self.lock();
        // Re-check under the lock: two connections may activate the same id at once.
        if let Some((_, addr)) = map.get(&id) {
            if addr.connected() {
                return addr.clone();
            }
        }
        let gen = self.shared.next_gen.fetch_add(1, Ordering::Relaxed);
        // Checked under the registry lock that `shutdown` takes its snapshot
        // under: an actor either is in the snapshot or refuses to start.
        let init = if self.shared.closing.load(Ordering::SeqCst) {
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

    /// The application.
    pub fn app(&self) -> &A {
        &self.shared.app
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
            self.shared.closing.store(true, Ordering::SeqCst);
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
