//! A pool of peer links: at most one in use per member, dialled on demand.
//!
//! [`Pool::link`] answers the open link to a member, or dials one. Dials to
//! one member are serialised by a per-member gate: callers that arrive while
//! a dial is under way wait for it and share its link. A failed dial is
//! remembered for [`DIAL_BACKOFF`] and answered again to every caller in that
//! time, so a dead member is not dialled by each waiting request (their
//! retries come every 50 ms). Links the listener accepts join the pool with
//! [`Pool::adopt`], so both directions of a pair of nodes share one link.
//!
//! Bodies are opaque here, as on the links themselves ([`crate::peer`]):
//! the pool does not know what is sent over them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::peer::{connect, Link, PeerAuth, PeerError, PeerHandler};
use crate::ring::MemberId;

/// After a failed dial to a member, callers get that failure again for this
/// long instead of dialling it again.
pub const DIAL_BACKOFF: Duration = Duration::from_millis(250);

/// Serialises dials to one member; holds the last failed dial and its time.
/// An async mutex: it is held across the dial on purpose (that is the gate),
/// and no synchronous lock is held with it.
type DialGate = Arc<tokio::sync::Mutex<Option<(Instant, PeerError)>>>;

/// See the module docs.
pub struct Pool {
    me: MemberId,
    auth: PeerAuth,
    /// The handler of the links this pool dials.
    handler: Arc<dyn PeerHandler>,
    links: Mutex<HashMap<MemberId, Link>>,
    dials: Mutex<HashMap<MemberId, DialGate>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// A pool that dials as `me` with `auth`, and gives the links it dials
    /// to `handler`.
    pub fn new(me: MemberId, auth: PeerAuth, handler: Arc<dyn PeerHandler>) -> Pool {
        Pool {
            me,
            auth,
            handler,
            links: Mutex::default(),
            dials: Mutex::default(),
        }
    }

    /// Remembers a link (an inbound one, from the listener), unless an open
    /// link to that peer is held already.
    pub fn adopt(&self, link: Link) {
        let mut links = lock(&self.links);
        let keep = links.get(link.peer()).is_some_and(|l| !l.is_closed());
        if !keep {
            links.insert(link.peer().clone(), link);
        }
    }

    fn open(&self, member: &MemberId) -> Option<Link> {
        lock(&self.links)
            .get(member)
            .filter(|l| !l.is_closed())
            .cloned()
    }

    /// The open link to `member`, or a new one dialled to the address
    /// `addr` answers (its peer address in the current view; asked only when
    /// a dial is due, `None` if it is not a member). See the module docs for
    /// the gate and the backoff.
    pub async fn link(
        &self,
        member: &MemberId,
        addr: impl FnOnce() -> Option<String>,
    ) -> Result<Link, PeerError> {
        if let Some(l) = self.open(member) {
            return Ok(l);
        }
        let gate = lock(&self.dials).entry(member.clone()).or_default().clone();
        let mut last_failure = gate.lock().await;
        // Another caller may have opened it while this one waited.
        if let Some(l) = self.open(member) {
            return Ok(l);
        }
        if let Some((at, e)) = last_failure.as_ref() {
            if at.elapsed() < DIAL_BACKOFF {
                return Err(e.clone());
            }
        }
        let addr = addr().ok_or_else(|| PeerError::Connect(format!("{member} is not a member")))?;
        let started = Instant::now();
        let link = connect(&addr, &self.me, self.auth.clone(), self.handler.clone())
            .await
            .inspect_err(|e| {
                // A refusal by configuration needs the operator (once per
                // DIAL_BACKOFF at most); an unreachable peer is routine.
                match e {
                    PeerError::Contract { .. } => tracing::error!(peer = %member, %addr, error = %e, "peer link refused"),
                    PeerError::Tls(_) | PeerError::Auth(_) => tracing::warn!(peer = %member, %addr, error = %e, "peer link refused"),
                    _ => tracing::debug!(peer = %member, %addr, error = %e, ms = started.elapsed().as_millis() as u64, "peer link could not be opened"),
                }
                *last_failure = Some((Instant::now(), e.clone()));
            })?;
        *last_failure = None;
        tracing::debug!(peer = %member, %addr, ms = started.elapsed().as_millis() as u64, "peer link opened");
        self.adopt(link.clone());
        Ok(self.open(member).unwrap_or(link))
    }

    /// Keeps the links and dial gates of the members `is_member` keeps;
    /// closes the others' links (their users find out and route again) and
    /// drops links that closed.
    pub fn retain(&self, is_member: impl Fn(&MemberId) -> bool) {
        lock(&self.links).retain(|m, l| {
            let keep = is_member(m) && !l.is_closed();
            if !keep {
                l.close();
            }
            keep
        });
        lock(&self.dials).retain(|m, _| is_member(m));
    }

    /// `link` closed: it is no longer handed out (another link to the same
    /// peer, a newer one, stays).
    pub fn forget(&self, link: &Link) {
        let mut links = lock(&self.links);
        if links.get(link.peer()).is_some_and(|l| l.same(link)) {
            links.remove(link.peer());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{spawn_listener, ListenerHandle};
    use futures_util::future::{BoxFuture, FutureExt};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Quiet;

    impl PeerHandler for Quiet {
        fn request(&self, _: MemberId, _: Link, body: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
            futures_util::future::ready(body).boxed()
        }
        fn push(&self, _: MemberId, _: Link, _: Vec<u8>) {}
    }

    const SECRET: &[u8] = b"pool-secret";

    fn pool(me: &str) -> Pool {
        Pool::new(
            MemberId::new(me),
            PeerAuth::from(SECRET.to_vec()),
            Arc::new(Quiet),
        )
    }

    /// A peer `id` on loopback, with the number of links it accepted.
    async fn peer(id: &str) -> (ListenerHandle, Arc<AtomicUsize>) {
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let l = spawn_listener(
            "127.0.0.1:0",
            MemberId::new(id),
            PeerAuth::from(SECRET.to_vec()),
            Arc::new(Quiet),
            move |_| {
                count.fetch_add(1, Ordering::Relaxed);
            },
        )
        .await
        .unwrap();
        (l, accepted)
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_dial_and_its_link() {
        let (l, accepted) = peer("b").await;
        let p = pool("a");
        let b = MemberId::new("b");
        let addr = l.local_addr.to_string();
        let links =
            futures_util::future::join_all((0..20).map(|_| p.link(&b, || Some(addr.clone()))))
                .await;
        let first = links[0].as_ref().unwrap().clone();
        assert!(links.iter().all(|l| l.as_ref().unwrap().same(&first)));
        assert_eq!(first.peer(), &b);
        tokio::time::sleep(Duration::from_millis(100)).await; // the listener's side ends later
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        // Held and open: no address needed.
        assert!(p.link(&b, || None).await.unwrap().same(&first));
    }

    #[tokio::test]
    async fn a_failed_dial_is_answered_again_until_the_backoff_ends() {
        // A port nothing listens on (bound, then released).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let p = pool("a");
        let b = MemberId::new("b");
        let asked = AtomicUsize::new(0);
        let resolve = || {
            asked.fetch_add(1, Ordering::Relaxed);
            Some(addr.clone())
        };
        let e = p.link(&b, resolve).await.unwrap_err();
        assert!(matches!(e, PeerError::Connect(_)), "{e:?}");
        for _ in 0..5 {
            assert_eq!(p.link(&b, resolve).await.unwrap_err(), e);
        }
        assert_eq!(
            asked.load(Ordering::Relaxed),
            1,
            "no dial within the backoff"
        );
        tokio::time::sleep(DIAL_BACKOFF).await;
        assert!(p.link(&b, resolve).await.is_err());
        assert_eq!(asked.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_stranger_is_not_dialled() {
        let e = pool("a").link(&MemberId::new("x"), || None).await;
        assert_eq!(
            e.unwrap_err(),
            PeerError::Connect("x is not a member".into())
        );
    }

    #[tokio::test]
    async fn links_of_members_that_left_are_closed_and_forgotten_links_are_dialled_anew() {
        let (l, accepted) = peer("b").await;
        let p = pool("a");
        let b = MemberId::new("b");
        let addr = l.local_addr.to_string();
        let first = p.link(&b, || Some(addr.clone())).await.unwrap();
        p.retain(|m| m == &b);
        assert!(!first.is_closed(), "a member's link stays");
        p.retain(|_| false);
        assert!(first.is_closed(), "a departed member's link closes");
        let second = p.link(&b, || Some(addr.clone())).await.unwrap();
        assert!(!second.same(&first));
        // Forgetting an old link leaves the newer one in place.
        p.forget(&first);
        assert!(p.link(&b, || None).await.unwrap().same(&second));
        p.forget(&second);
        assert!(p.link(&b, || None).await.is_err());
        tokio::time::sleep(Duration::from_millis(100)).await; // the listener's side ends later
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }
}
