//! The in-memory store: the embedded single-node default and the store of unit
//! tests. Same semantics as the Redis store (epochs, fencing, time to live), none
//! of its durability: everything is gone with the process.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{self, BoxFuture, FutureExt};

use super::{Activation, CheckpointStore, StoreError, Wake};
use crate::ids::SessionId;

#[derive(Debug)]
struct Entry {
    epoch: u64,
    /// `None`: a tombstone (deleted session) or an id that was created but never saved.
    bytes: Option<Vec<u8>>,
    expires: Instant,
}

/// The timer index: (due, session) in due order, and each session's due.
type WakeIndex = (BTreeSet<(u64, SessionId)>, HashMap<SessionId, u64>);

/// An in-process checkpoint store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    // A std mutex: every critical section is a map operation, never an await.
    map: Arc<Mutex<HashMap<SessionId, Entry>>>,
    /// The timer index: (due, session) and each session's due.
    wakes: Arc<Mutex<WakeIndex>>,
    ttl: Duration,
}

impl MemoryStore {
    /// A store whose sessions expire `ttl` after their last write.
    pub fn new(ttl: Duration) -> Self {
        MemoryStore {
            map: Arc::default(),
            wakes: Arc::default(),
            ttl,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<SessionId, Entry>, Instant) -> T) -> T {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Expire lazily, like Redis does on access; a sweep keeps memory bounded.
        if map.len().is_multiple_of(1024) {
            map.retain(|_, e| e.expires > now);
        }
        f(&mut map, now)
    }

    fn set_wake(&self, id: &SessionId, wake: Option<u64>) {
        let mut w = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        let (by_due, by_id) = &mut *w;
        if let Some(old) = by_id.remove(id) {
            by_due.remove(&(old, id.clone()));
        }
        if let Some(at) = wake {
            by_id.insert(id.clone(), at);
            by_due.insert((at, id.clone()));
        }
    }

    fn live<'m>(
        map: &'m mut HashMap<SessionId, Entry>,
        id: &SessionId,
        now: Instant,
    ) -> Option<&'m mut Entry> {
        map.get_mut(id).filter(|e| e.expires > now)
    }
}

impl CheckpointStore for MemoryStore {
    fn activate(
        &self,
        id: &SessionId,
    ) -> BoxFuture<'static, Result<Option<Activation>, StoreError>> {
        let ttl = self.ttl;
        let r = self.with(|map, now| {
            let e = Self::live(map, id, now)?;
            let bytes = e.bytes.clone()?;
            e.epoch += 1;
            e.expires = now + ttl;
            Some(Activation {
                epoch: e.epoch,
                checkpoint: bytes,
            })
        });
        if r.is_none() {
            self.set_wake(id, None); // a gone session wakes no more
        }
        future::ready(Ok(r)).boxed()
    }

    fn create(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>> {
        let ttl = self.ttl;
        let r = self.with(|map, now| {
            if let Some(e) = Self::live(map, id, now) {
                // Another activation created it first.
                return Err(StoreError::Fenced {
                    stored: e.epoch,
                    ours: 0,
                });
            }
            map.insert(
                id.clone(),
                Entry {
                    epoch: 1,
                    bytes: None,
                    expires: now + ttl,
                },
            );
            Ok(1)
        });
        future::ready(r).boxed()
    }

    fn save_waking(
        &self,
        id: &SessionId,
        epoch: u64,
        bytes: Vec<u8>,
        wake: Wake,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let ttl = self.ttl;
        let r = self.with(|map, now| {
            let stored = Self::live(map, id, now).map_or(0, |e| e.epoch);
            if epoch < stored {
                return Err(StoreError::Fenced {
                    stored,
                    ours: epoch,
                });
            }
            map.insert(
                id.clone(),
                Entry {
                    epoch,
                    bytes: Some(bytes),
                    expires: now + ttl,
                },
            );
            Ok(())
        });
        if r.is_ok() {
            match wake {
                Wake::Keep => {}
                Wake::At(at) => self.set_wake(id, Some(at)),
                Wake::Never => self.set_wake(id, None),
            }
        }
        future::ready(r).boxed()
    }

    fn due_wakes(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<SessionId>, StoreError>> {
        let w = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        let due =
            w.0.iter()
                .take_while(|(at, _)| *at <= now_ms)
                .take(limit)
                .map(|(_, id)| id.clone())
                .collect();
        future::ready(Ok(due)).boxed()
    }

    fn delete(&self, id: &SessionId, epoch: u64) -> BoxFuture<'static, Result<(), StoreError>> {
        let ttl = self.ttl;
        let r = self.with(|map, now| {
            let stored = Self::live(map, id, now).map_or(0, |e| e.epoch);
            if epoch < stored {
                return Err(StoreError::Fenced {
                    stored,
                    ours: epoch,
                });
            }
            map.insert(
                id.clone(),
                Entry {
                    epoch: epoch + 1,
                    bytes: None,
                    expires: now + ttl,
                },
            );
            Ok(())
        });
        if r.is_ok() {
            self.set_wake(id, None);
        }
        future::ready(r).boxed()
    }

    fn epoch(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>> {
        let e = self.with(|map, now| Self::live(map, id, now).map_or(0, |e| e.epoch));
        future::ready(Ok(e)).boxed()
    }

    fn peek(&self, id: &SessionId) -> BoxFuture<'static, Result<Option<Vec<u8>>, StoreError>> {
        let b = self.with(|map, now| Self::live(map, id, now).and_then(|e| e.bytes.clone()));
        future::ready(Ok(b)).boxed()
    }

    fn ping(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        future::ready(Ok(())).boxed()
    }

    fn is_durable(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        "memory (not durable)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn epochs_fence_and_delete_tombstones() {
        let s = MemoryStore::new(Duration::from_secs(60));
        let id = SessionId::random();
        assert_eq!(s.activate(&id).await.unwrap(), None);
        let e1 = s.create(&id).await.unwrap();
        assert_eq!(
            s.activate(&id).await.unwrap(),
            None,
            "created but never saved"
        );
        s.save(&id, e1, b"one".to_vec()).await.unwrap();
        let a = s.activate(&id).await.unwrap().unwrap();
        assert!(a.epoch > e1);
        assert_eq!(a.checkpoint, b"one");
        assert!(matches!(
            s.save(&id, e1, b"stale".to_vec()).await,
            Err(StoreError::Fenced { .. })
        ));
        s.save(&id, a.epoch, b"two".to_vec()).await.unwrap();
        // A peek reads the checkpoint and takes no epoch.
        assert_eq!(s.peek(&id).await.unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(s.epoch(&id).await.unwrap(), a.epoch);
        assert!(matches!(
            s.delete(&id, e1).await,
            Err(StoreError::Fenced { .. })
        ));
        s.delete(&id, a.epoch).await.unwrap();
        assert_eq!(s.activate(&id).await.unwrap(), None);
        assert_eq!(s.peek(&id).await.unwrap(), None);
        assert!(matches!(
            s.save(&id, a.epoch, b"zombie".to_vec()).await,
            Err(StoreError::Fenced { .. })
        ));
    }

    #[tokio::test]
    async fn sessions_expire() {
        let s = MemoryStore::new(Duration::from_millis(20));
        let id = SessionId::random();
        let e = s.create(&id).await.unwrap();
        s.save(&id, e, b"x".to_vec()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(s.activate(&id).await.unwrap(), None);
    }
}
