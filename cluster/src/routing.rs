//! Ownership: which member owns a session now, as this node sees it.
//!
//! [`Ownership`] holds the current membership view and the ring built from
//! it, published together, plus this node's two reasons to leave itself out
//! of its own ring: it is *leaving* (a drain) or *isolated* (cut off from
//! Consul and its peers). A session id is only a key here (`&str`): this
//! module knows nothing of sessions, actors or connections.
//!
//! # Invariants
//! - The view and the ring are replaced together: a reader never sees a ring
//!   built from another view than the one beside it.
//! - While leaving or isolated, this node is not on its own ring: it owns
//!   nothing, and every key has another owner (if there is another member).
//! - A node that is not clustered owns every key (unless it is leaving or
//!   isolated, when it owns none).
//!
//! Views of different nodes need not agree for correctness: epochs in the
//! store fence a stale owner (see docs/architecture.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::membership::View;
use crate::ring::{MemberId, Ring};

/// A membership view and the ring this node places sessions by.
#[derive(Clone)]
pub struct Placement {
    /// The membership view.
    pub view: Arc<View>,
    /// The ring built from it (without this node while it is out of its ring).
    pub ring: Arc<Ring>,
}

/// See the module docs.
pub struct Ownership {
    me: MemberId,
    clustered: bool,
    vnodes: u32,
    /// The current placement; receivers are woken by every change (a new
    /// view, leaving, isolation), identical or not.
    current: watch::Sender<Placement>,
    leaving: AtomicBool,
    isolated: AtomicBool,
}

impl Ownership {
    /// This node `me`'s ownership, with a ring of `vnodes` virtual nodes per
    /// member starting from `view`. `clustered` is false for a cluster of
    /// one (no Consul, no other static member): it owns every key.
    pub fn new(me: MemberId, clustered: bool, vnodes: u32, view: Arc<View>) -> Ownership {
        let ring = Arc::new(Ring::new(view.ids().cloned(), vnodes));
        Ownership {
            me,
            clustered,
            vnodes,
            current: watch::Sender::new(Placement { view, ring }),
            leaving: AtomicBool::new(false),
            isolated: AtomicBool::new(false),
        }
    }

    /// This node.
    pub fn me(&self) -> &MemberId {
        &self.me
    }

    /// Whether this node is part of a cluster.
    pub fn clustered(&self) -> bool {
        self.clustered
    }

    /// The current membership view.
    pub fn view(&self) -> Arc<View> {
        self.current.borrow().view.clone()
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Ring> {
        self.current.borrow().ring.clone()
    }

    /// Watches the placement: `changed()` resolves at the next change (a
    /// new view, leaving, a change of isolation), so a wait for another
    /// member can give up and look for the owner again.
    pub fn subscribe(&self) -> watch::Receiver<Placement> {
        self.current.subscribe()
    }

    /// Who owns `key` when it is not this node: `None` means this node
    /// (also when the ring is empty, as before the first view or after
    /// leaving alone: there is nobody else to route to).
    pub fn owner_of(&self, key: &str) -> Option<MemberId> {
        if !self.clustered {
            return None;
        }
        let placement = self.current.borrow();
        match placement.ring.owner(key) {
            Some(m) if m != &self.me => Some(m.clone()),
            _ => None,
        }
    }

    /// Whether this node owns `key` now: on its ring, not leaving or isolated.
    pub fn owns(&self, key: &str) -> bool {
        !self.is_out_of_ring() && self.owner_of(key).is_none()
    }

    /// A new key this node owns, drawn from `draw` (fresh random keys; see
    /// [`Ring::draw_owned`]). `None` when this node is out of its ring or no
    /// draw landed on it; when it is not clustered, the first draw.
    pub fn draw_new_id<K: AsRef<str>>(&self, mut draw: impl FnMut() -> K) -> Option<K> {
        if self.is_out_of_ring() {
            return None;
        }
        if !self.clustered {
            return Some(draw());
        }
        self.ring().draw_owned(&self.me, draw)
    }

    /// Leaving (a drain) or isolated: this node's ring leaves it out.
    pub fn is_out_of_ring(&self) -> bool {
        self.leaving.load(Ordering::Relaxed) || self.isolated.load(Ordering::Relaxed)
    }

    /// Installs a new membership view and the ring built from it.
    pub fn apply_view(&self, view: Arc<View>) {
        let mut ids: Vec<MemberId> = view.ids().cloned().collect();
        if self.is_out_of_ring() {
            ids.retain(|m| m != &self.me);
        }
        // Built before it is published: readers never wait for a build.
        let ring = Arc::new(Ring::new(ids, self.vnodes));
        self.current.send_replace(Placement { view, ring });
    }

    /// Leaves: this node owns nothing from now on.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.apply_view(self.view());
    }

    /// Isolated (`true`): this node owns nothing; `false`: the view is used
    /// as it is again. Answers whether that changed anything (if not, the
    /// placement is not republished).
    pub fn set_isolated(&self, isolated: bool) -> bool {
        let changed = self.isolated.swap(isolated, Ordering::Relaxed) != isolated;
        if changed {
            self.apply_view(self.view());
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{static_membership, Member};

    fn view(ids: &[&str]) -> Arc<View> {
        static_membership(
            ids.iter()
                .map(|id| Member {
                    id: MemberId::new(*id),
                    peer: format!("{id}:7000"),
                    public: None,
                    version: None,
                })
                .collect(),
        )
        .view()
    }

    fn keys() -> impl Iterator<Item = String> {
        (0..2000).map(|i| format!("key-{i}"))
    }

    #[test]
    fn a_clustered_node_owns_what_its_ring_gives_it_and_names_the_other_owners() {
        let o = Ownership::new(MemberId::new("a"), true, 64, view(&["a", "b"]));
        let ring = o.ring();
        let (mut mine, mut theirs) = (0, 0);
        for k in keys() {
            let owner = ring.owner(&k).unwrap();
            if owner == o.me() {
                assert!(o.owns(&k));
                assert_eq!(o.owner_of(&k), None);
                mine += 1;
            } else {
                assert!(!o.owns(&k));
                assert_eq!(o.owner_of(&k), Some(MemberId::new("b")));
                theirs += 1;
            }
        }
        assert!(mine > 0 && theirs > 0);
    }

    #[test]
    fn leaving_or_isolated_owns_nothing_and_isolation_can_end() {
        let o = Ownership::new(MemberId::new("a"), true, 64, view(&["a", "b"]));
        let mut changes = o.subscribe();
        assert!(o.set_isolated(true));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert!(!o.set_isolated(true), "no change, no republish");
        assert!(!changes.has_changed().unwrap());
        assert!(o.is_out_of_ring());
        assert!(!o.ring().contains(o.me()));
        for k in keys() {
            assert!(!o.owns(&k));
            assert_eq!(o.owner_of(&k), Some(MemberId::new("b")));
        }
        assert_eq!(o.draw_new_id(|| "k".to_string()), None);
        // A new view while isolated still leaves this node out.
        o.apply_view(view(&["a", "b", "c"]));
        assert!(!o.ring().contains(o.me()));
        assert_eq!(o.view().members.len(), 3);
        assert!(o.set_isolated(false));
        assert!(o.ring().contains(o.me()));
        assert!(keys().any(|k| o.owns(&k)));

        o.leave();
        assert!(changes.has_changed().unwrap());
        assert!(o.is_out_of_ring());
        assert!(!keys().any(|k| o.owns(&k)));
        // Isolation ending does not undo leaving.
        o.set_isolated(true);
        o.set_isolated(false);
        assert!(!keys().any(|k| o.owns(&k)));
    }

    #[test]
    fn alone_on_the_ring_after_leaving_nobody_else_owns_anything() {
        let o = Ownership::new(MemberId::new("a"), true, 64, view(&["a"]));
        assert!(o.owns("x"));
        o.leave();
        assert!(o.ring().is_empty());
        assert_eq!(o.owner_of("x"), None);
        assert!(!o.owns("x"));
    }

    #[test]
    fn an_unclustered_node_owns_every_key_until_it_leaves() {
        let o = Ownership::new(MemberId::new("a"), false, 64, view(&["b"]));
        assert!(keys().all(|k| o.owns(&k) && o.owner_of(&k).is_none()));
        assert_eq!(o.draw_new_id(|| "any".to_string()).as_deref(), Some("any"));
        o.leave();
        assert!(!o.owns("x"));
        assert_eq!(o.draw_new_id(|| "any".to_string()), None);
    }

    #[test]
    fn drawn_ids_are_owned_here() {
        let o = Ownership::new(MemberId::new("b"), true, 64, view(&["a", "b", "c"]));
        let mut n = 0u32;
        for _ in 0..50 {
            let id = o
                .draw_new_id(|| {
                    n += 1;
                    format!("draw-{n}")
                })
                .unwrap();
            assert!(o.owns(&id));
        }
        // Not on the ring at all: nothing can be drawn.
        let stranger = Ownership::new(MemberId::new("z"), true, 64, view(&["a", "b"]));
        assert_eq!(stranger.draw_new_id(|| "k".to_string()), None);
    }

    #[test]
    fn a_new_view_wakes_subscribers_with_its_ring_beside_it() {
        let o = Ownership::new(MemberId::new("a"), true, 64, view(&["a"]));
        let mut changes = o.subscribe();
        o.apply_view(view(&["a", "b"]));
        assert!(changes.has_changed().unwrap());
        let p = changes.borrow_and_update().clone();
        assert_eq!(p.view.members.len(), 2);
        assert!(p.ring.contains(&MemberId::new("b")));
    }
}
