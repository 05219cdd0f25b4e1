//! This node's index of live sessions by user: which session actors live
//! here are bound to which user (`SessionState::user`, the subject of the
//! credential the session was opened with).
//!
//! The backend API's "every session of a user" asks every member for its
//! part of this index. It holds every live session actor of the node that
//! has a user, attached to a connection or not (a detached session still
//! takes messages: their events wait in its outbox for the client's
//! resume); a passivated session is not live and is not in it. Entities
//! have no user and are never in it.
//!
//! The actor keeps its own row up to date: it adds itself when it goes live
//! or when its user changes, and removes itself when it leaves service. The
//! lock is a std mutex held for map operations only, never across an await.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ids::SessionId;

/// Live sessions by user. See the module docs.
#[derive(Debug, Default)]
pub struct UserIndex {
    by_user: Mutex<HashMap<Arc<str>, HashSet<SessionId>>>,
}

impl UserIndex {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, HashSet<SessionId>>> {
        self.by_user.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that session `id`, bound to `user`, is live here.
    pub fn add(&self, user: &Arc<str>, id: &SessionId) {
        self.lock()
            .entry(user.clone())
            .or_default()
            .insert(id.clone());
    }

    /// Session `id` of `user` is no longer live here.
    pub fn remove(&self, user: &str, id: &SessionId) {
        let mut map = self.lock();
        if let Some(set) = map.get_mut(user) {
            set.remove(id);
            if set.is_empty() {
                map.remove(user);
            }
        }
    }

    /// The live sessions of `user` on this node.
    pub fn sessions(&self, user: &str) -> Vec<SessionId> {
        self.lock()
            .get(user)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Users with at least one live session here.
    pub fn users(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_and_go_with_their_sessions() {
        let ix = UserIndex::default();
        let (alice, bob): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
        let (s1, s2, s3) = (
            SessionId::random(),
            SessionId::random(),
            SessionId::random(),
        );
        ix.add(&alice, &s1);
        ix.add(&alice, &s2);
        ix.add(&alice, &s2);
        ix.add(&bob, &s3);
        let mut got = ix.sessions("alice");
        got.sort();
        let mut want = vec![s1.clone(), s2.clone()];
        want.sort();
        assert_eq!(got, want);
        ix.remove("alice", &s1);
        ix.remove("alice", &s3); // not alice's: nothing happens
        assert_eq!(ix.sessions("alice"), vec![s2.clone()]);
        ix.remove("alice", &s2);
        assert!(ix.sessions("alice").is_empty());
        assert_eq!(ix.users(), 1, "an empty row is dropped");
        assert!(ix.sessions("nobody").is_empty());
    }
}
