//! Self-exclusion of a node that the cluster may have dropped ("isolated").
//!
//! A node cut off from Consul keeps its last known view (a Consul outage must
//! not stop the cluster), but if the *others* still reach Consul they drop
//! it from their ring once its TTL check lapses, and take its sessions over.
//! Epochs keep that safe (the stale node's writes are refused), yet its
//! clients would keep being served, and resumed, by a node that no longer
//! owns their sessions. So a node excludes itself when both:
//! - its check may have lapsed: no registration or pass has succeeded for a
//!   full `cluster.ttl_ms` ([`berth_cluster::membership::lapsed`]), and
//! - some other member of its last view answers, over the peer link, that
//!   it no longer holds this node, or none answers that it does (a peer that
//!   does not answer in time is either dead or cut off: it decides nothing
//!   on its own).
//!
//! In a Consul outage every node's check "lapses", but every peer still
//! holds every node (nobody's view can change): nobody isolates. A node cut
//! from Consul alone hears "not in my view" from its peers; a node cut from
//! Consul and from its peers hears nothing: both isolate.
//!
//! Isolated, a node behaves like a temporary drain: readiness 503 with the
//! reason, its own ring leaves it out (so the router releases every live
//! session: final checkpoint, which the epoch refuses where another node has
//! taken the session already), its clients are closed with 1012 (resume
//! elsewhere now), new WebSocket upgrades are answered HTTP 503 (a proxy tries
//! the next upstream). When a registration or pass succeeds again it stops
//! being isolated and uses its view again. Static membership never isolates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_cluster::ring::MemberId;

use crate::node::Node;

/// The rule: isolated when the check may have lapsed and, of the other
/// members of the last view, one answered that it no longer holds this node
/// or none answered that it does (`None`: no answer in time). A silent peer
/// alone does not isolate: during a Consul outage a dead peer must not make
/// every survivor close its clients.
pub fn isolated(lapsed: bool, answers: &[Option<bool>]) -> bool {
    let denied = answers.contains(&Some(false));
    let vouched = answers.contains(&Some(true));
    lapsed && !answers.is_empty() && (denied || !vouched)
}

/// Applies the rule every quarter TTL until the node stops.
pub async fn run(node: Arc<Node>) {
    let ttl = Duration::from_millis(node.cfg.cluster.ttl_ms);
    let every = (ttl / 4).max(Duration::from_millis(10));
    let ask_within = (ttl / 2)
        .min(Duration::from_millis(node.cfg.cluster.peer_timeout_ms))
        .max(Duration::from_millis(10));
    let me = MemberId(node.node_id.clone());
    let mut stopping = node.stopping.subscribe();
    let mut since: Option<Instant> = None;
    metrics::gauge!("berth_isolated").set(0.0);
    loop {
        if node.is_stopping() {
            return;
        }
        let lapsed = node.membership.check_lapsed();
        let (peers, answers) = if lapsed {
            let view = node.router.view();
            let peers: Vec<MemberId> = view.ids().filter(|m| **m != me).cloned().collect();
            let asks = peers
                .iter()
                .map(|m| node.router.member_sees(m, &me, ask_within));
            let answers = tokio::select! {
                a = futures_util::future::join_all(asks) => a,
                _ = stopping.wait_for(|s| *s) => return,
            };
            (peers, answers)
        } else {
            (Vec::new(), Vec::new())
        };
        let now = isolated(lapsed, &answers);
        if now != node.is_isolated() {
            if now {
                let dropped = answers.iter().filter(|a| **a == Some(false)).count();
                let silent = answers.iter().filter(|a| a.is_none()).count();
                tracing::warn!(
                    ttl_ms = ttl.as_millis() as u64,
                    peers = peers.len(),
                    peers_without_this_node = dropped,
                    peers_not_answering = silent,
                    "isolated: no consul check pass for a TTL and the peers do not confirm this node; \
                     releasing every session, closing clients with 1012, answering upgrades 503 until consul hears this node again"
                );
                since = Some(Instant::now());
                node.isolated.send_replace(true);
                metrics::gauge!("berth_isolated").set(1.0);
                node.router.set_isolated(true).await;
            } else {
                tracing::info!(
                    isolated_ms = since.take().map_or(0, |t| t.elapsed().as_millis() as u64),
                    "no longer isolated: consul hears this node again; rejoining the ring"
                );
                node.router.set_isolated(false).await;
                node.isolated.send_replace(false);
                metrics::gauge!("berth_isolated").set(0.0);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::isolated;

    #[test]
    fn a_node_isolates_only_when_its_check_lapsed_and_no_peer_vouches_for_it() {
        // Consul hears the node: never isolated, whatever the peers say.
        assert!(!isolated(false, &[]));
        assert!(!isolated(false, &[None, Some(false)]));
        // Consul outage: every peer still holds this node.
        assert!(!isolated(true, &[Some(true), Some(true)]));
        // Alone in its view: nobody who could take its sessions.
        assert!(!isolated(true, &[]));
        // Cut from Consul only: the peers dropped it.
        assert!(isolated(true, &[Some(false), Some(false)]));
        // Cut from Consul and from the peers: nobody answers.
        assert!(isolated(true, &[None, None]));
        // Views disagree: one that dropped this node may have taken its
        // sessions over, which is enough.
        assert!(isolated(true, &[Some(true), Some(false)]));
        assert!(isolated(true, &[None, Some(false)]));
        // Consul outage and a dead peer: the live peer still vouches, so the
        // survivors keep serving (an isolation here would close every client
        // of the cluster until Consul returns).
        assert!(!isolated(true, &[Some(true), None]));
    }
}
