//! Actor-level rules of attaching and of op order, on the actix test runtime
//! with the in-memory store (wrapped in a store that delays on demand). Two
//! [`Host`]s sharing one store play two nodes: each activation takes a newer
//! epoch, as on a real cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use berth_actors::conn::{conn_channel, ConnHandle, ConnMsg, ConnReceiver};
use berth_actors::host::{Durability, Host, HostConfig};
use berth_actors::ids::SessionId;
use berth_actors::kv::KvApp;
use berth_actors::protocol::{CloseCode, OpReply};
use berth_actors::session::{
    Attach, AttachError, Claim, NotHere, Op, Origin, QueuedOp, SessionActor,
};
use berth_actors::state::Limits;
use berth_actors::store::memory::MemoryStore;
use berth_actors::store::{Activation, CheckpointStore, StoreError, Wake};
use futures_util::future::{BoxFuture, FutureExt};
use serde_json::json;

/// The in-memory store, with every call delayed by `delay_ms` (settable).
struct SlowStore {
    inner: MemoryStore,
    delay_ms: AtomicU64,
}

impl SlowStore {
    fn new() -> Arc<Self> {
        Arc::new(SlowStore {
            inner: MemoryStore::new(Duration::from_secs(3600)),
            delay_ms: AtomicU64::new(0),
        })
    }

    fn delayed<T: Send + 'static>(
        &self,
        f: BoxFuture<'static, Result<T, StoreError>>,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let d = Duration::from_millis(self.delay_ms.load(Ordering::Relaxed));
        async move {
            tokio::time::sleep(d).await;
            f.await
        }
        .boxed()
    }
}

impl CheckpointStore for SlowStore {
    fn activate(
        &self,
        id: &SessionId,
    ) -> BoxFuture<'static, Result<Option<Activation>, StoreError>> {
        self.delayed(self.inner.activate(id))
    }
    fn create(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>> {
        self.delayed(self.inner.create(id))
    }
    fn save_waking(
        &self,
        id: &SessionId,
        epoch: u64,
        bytes: Vec<u8>,
        wake: Wake,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        self.delayed(self.inner.save_waking(id, epoch, bytes, wake))
    }
    fn due_wakes(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<SessionId>, StoreError>> {
        self.inner.due_wakes(now_ms, limit)
    }
    fn delete(&self, id: &SessionId, epoch: u64) -> BoxFuture<'static, Result<(), StoreError>> {
        self.delayed(self.inner.delete(id, epoch))
    }
    fn epoch(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>> {
        self.delayed(self.inner.epoch(id))
    }
    fn peek(&self, id: &SessionId) -> BoxFuture<'static, Result<Option<Vec<u8>>, StoreError>> {
        self.delayed(self.inner.peek(id))
    }
    fn ping(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.ping()
    }
    fn is_durable(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        "slow memory".into()
    }
}

fn host(name: &str, store: Arc<dyn CheckpointStore>) -> Host {
    Host::new(
        KvApp,
        store,
        HostConfig {
            node_id: name.into(),
            detach_timeout: Duration::from_secs(60),
            unwritten_detach_timeout: Duration::from_secs(60),
            durability: Durability::Sync,
            checkpoint_interval: Duration::from_secs(1),
            touch_after: Duration::from_secs(3600),
            lease: Duration::from_secs(60),
            handler_timeout: Duration::from_secs(10),
        },
        Limits::default(),
    )
}

/// One client connection at one edge: its origin and its attach attempts.
struct Client {
    origin: Origin,
    attempts: u64,
}

impl Client {
    fn new(edge: u64, conn: u64) -> Self {
        Client {
            origin: Origin { edge, conn },
            attempts: 0,
        }
    }

    /// An attach of this connection through a new handle (a new proxy).
    fn attach(
        &mut self,
        token: &str,
        reattach: Option<Claim>,
    ) -> (Attach, ConnHandle, ConnReceiver) {
        self.attempts += 1;
        let (h, rx) = conn_channel(64);
        let msg = Attach {
            conn: h.clone(),
            token: token.into(),
            ack: 0,
            origin: self.origin,
            attempt: self.attempts,
            reattach,
            user: None,
        };
        (msg, h, rx)
    }
}

async fn incr(addr: &Addr<SessionActor>, conn: &ConnHandle, id: u64) -> OpReply {
    addr.send(Op {
        conn_id: conn.id(),
        id,
        op: "incr".into(),
        args: json!({"key": "n"}),
    })
    .await
    .expect("actor alive")
    .expect("session held")
}

/// What the connection has been told so far, without waiting.
fn told(rx: &mut ConnReceiver) -> Option<ConnMsg> {
    rx.recv().now_or_never().flatten()
}

#[actix_rt::test]
async fn the_hello_that_creates_a_session_binds_its_user_and_every_later_attach_must_match() {
    let store = SlowStore::new();
    let (a, b) = (host("a", store.clone()), host("b", store.clone()));
    let (id, token, addr_a) = a.create_session();
    let mut alice = Client::new(1, 1);
    let (mut m, h, _rx) = alice.attach(&token, None);
    m.user = Some("alice".into());
    addr_a.send(m).await.unwrap().expect("the creating hello");
    assert!(incr(&addr_a, &h, 1).await.ok, "checkpointed with its user");
    // Another subject, or none, with the right resume token: refused as a
    // wrong token would be.
    for (conn, user) in [(2, Some("bob")), (3, None)] {
        let (mut m, _h, _rx) = Client::new(2, conn).attach(&token, None);
        m.user = user.map(Into::into);
        assert_eq!(
            addr_a.send(m).await.unwrap().unwrap_err(),
            AttachError::BadToken,
            "{user:?}"
        );
    }
    // The user came back from the checkpoint: another activation (a
    // failover) keeps the rule.
    let addr_b = b.session(&id);
    let (mut m, _h, _rx) = Client::new(3, 1).attach(&token, None);
    m.user = Some("bob".into());
    assert_eq!(
        addr_b.send(m).await.unwrap().unwrap_err(),
        AttachError::BadToken
    );
    let (mut m, h, _rx) = Client::new(3, 2).attach(&token, None);
    m.user = Some("alice".into());
    let (w, _) = addr_b.send(m).await.unwrap().expect("alice resumes");
    assert!(w.resumed);
    assert_eq!(incr(&addr_b, &h, 2).await.value, Some(json!(2)));

    // An anonymous session stays anonymous: a credential does not claim it.
    let (_, token, addr) = a.create_session();
    let (m, _h, _rx) = Client::new(4, 1).attach(&token, None);
    addr.send(m).await.unwrap().expect("anonymous hello");
    let (mut m, _h, _rx) = Client::new(4, 2).attach(&token, None);
    m.user = Some("mallory".into());
    assert_eq!(
        addr.send(m).await.unwrap().unwrap_err(),
        AttachError::BadToken
    );
}

#[actix_rt::test]
async fn a_later_hello_takes_over_and_the_older_connection_cannot_take_it_back() {
    let h = host("a", SlowStore::new());
    let (_, token, addr) = h.create_session();
    let (mut c1, mut c2) = (Client::new(1, 1), Client::new(1, 2));

    let (m, h1, mut rx1) = c1.attach(&token, None);
    let (_, claim1) = addr.send(m).await.unwrap().expect("first hello");
    let (m, h2, mut rx2) = c2.attach(&token, None);
    let (_, claim2) = addr.send(m).await.unwrap().expect("second hello");
    assert!(claim2 > claim1, "{claim2:?} > {claim1:?}");
    assert!(
        matches!(
            told(&mut rx1),
            Some(ConnMsg::Close(CloseCode::TakenOver, _))
        ),
        "the older connection is told 4000"
    );
    drop(h1);

    // The older connection's edge routes it again (it has not seen the 4000
    // yet): refused, and the newer one hears nothing of it.
    let (m, _h1b, mut rx1b) = c1.attach(&token, Some(claim1));
    assert_eq!(
        addr.send(m).await.unwrap().unwrap_err(),
        AttachError::Superseded
    );
    assert!(told(&mut rx1b).is_none());
    assert!(
        told(&mut rx2).is_none(),
        "the newer connection keeps the session"
    );
    assert!(incr(&addr, &h2, 1).await.ok);
}

#[actix_rt::test]
async fn a_reroute_of_an_older_hello_never_takes_a_newer_activation_from_its_client() {
    // Path A of the 4000 defect: a zombie connection on a node that was cut
    // off re-routes after the partition heals, to the activation on which the
    // client's new connection said hello.
    let store = SlowStore::new();
    let (a, b) = (host("a", store.clone()), host("b", store.clone()));
    let (id, token, addr_a) = a.create_session();
    let mut zombie = Client::new(10, 7);
    let (m, hz, _rxz) = zombie.attach(&token, None);
    let (_, zombie_claim) = addr_a.send(m).await.unwrap().expect("hello on a");
    assert!(
        incr(&addr_a, &hz, 1).await.ok,
        "written: in the store from now on"
    );

    let addr_b = b.session(&id); // the failover: a newer epoch
    let mut current = Client::new(20, 3);
    let (m, hc, mut rxc) = current.attach(&token, None);
    let (w, claim) = addr_b.send(m).await.unwrap().expect("hello on b");
    assert!(w.resumed);
    assert!(claim.epoch > zombie_claim.epoch);

    let (m, _hz2, _rxz2) = zombie.attach(&token, Some(zombie_claim));
    assert_eq!(
        addr_b.send(m).await.unwrap().unwrap_err(),
        AttachError::Superseded
    );
    assert!(
        told(&mut rxc).is_none(),
        "the client's connection is never told 4000"
    );
    assert_eq!(incr(&addr_b, &hc, 2).await.value, Some(json!(2)));
}

#[actix_rt::test]
async fn whichever_re_route_lands_first_the_newer_hello_ends_up_holding_the_session() {
    // The session moves again (a third activation) while both the zombie and
    // the client's connection route to it; the zombie lands first.
    let store = SlowStore::new();
    let (a, b, c) = (
        host("a", store.clone()),
        host("b", store.clone()),
        host("c", store.clone()),
    );
    let (id, token, addr_a) = a.create_session();
    let mut zombie = Client::new(10, 7);
    let (m, hz, _rxz) = zombie.attach(&token, None);
    let (_, zombie_claim) = addr_a.send(m).await.unwrap().unwrap();
    assert!(incr(&addr_a, &hz, 1).await.ok);
    let mut current = Client::new(20, 3);
    let (m, _hc, _rxc) = current.attach(&token, None);
    let (_, claim) = b.session(&id).send(m).await.unwrap().unwrap();

    let addr_c = c.session(&id);
    let (m, _hz2, mut rxz2) = zombie.attach(&token, Some(zombie_claim));
    addr_c
        .send(m)
        .await
        .unwrap()
        .expect("nothing newer is attached yet");
    let (m, hc2, mut rxc2) = current.attach(&token, Some(claim));
    addr_c
        .send(m)
        .await
        .unwrap()
        .expect("the newer hello takes over");
    assert!(matches!(
        told(&mut rxz2),
        Some(ConnMsg::Close(CloseCode::TakenOver, _))
    ));
    let (m, _hz3, _rxz3) = zombie.attach(&token, Some(zombie_claim));
    assert_eq!(
        addr_c.send(m).await.unwrap().unwrap_err(),
        AttachError::Superseded
    );
    assert!(told(&mut rxc2).is_none());
    assert_eq!(incr(&addr_c, &hc2, 2).await.value, Some(json!(2)));
}

#[actix_rt::test]
async fn attempts_of_one_connection_replace_each_other_quietly_in_either_order() {
    // Path B of the 4000 defect: an edge whose attach timed out sends it
    // again; both reach the actor, in either order.
    let h = host("a", SlowStore::new());
    let (_, token, addr) = h.create_session();
    let mut c = Client::new(5, 42);

    let (first, h1, mut rx1) = c.attach(&token, None);
    let (second, h2, mut rx2) = c.attach(&token, None);
    addr.send(first).await.unwrap().expect("first attempt");
    addr.send(second).await.unwrap().expect("second attempt");
    drop(h1);
    // The first handle is dropped by the actor without a word: its forwarder
    // ends, and no 4000 reaches the client.
    assert!(rx1.recv().await.is_none(), "no close for a replaced handle");
    assert!(told(&mut rx2).is_none());
    assert!(incr(&addr, &h2, 1).await.ok);

    // The other order: the later attempt lands first, the earlier one late.
    let (early, _h3, _rx3) = c.attach(&token, None);
    let (later, h4, mut rx4) = c.attach(&token, None);
    addr.send(later).await.unwrap().expect("later attempt");
    assert_eq!(
        addr.send(early).await.unwrap().unwrap_err(),
        AttachError::Superseded
    );
    assert!(told(&mut rx4).is_none());
    assert_eq!(incr(&addr, &h4, 2).await.value, Some(json!(2)));
}

#[actix_rt::test]
async fn a_late_attempt_is_refused_even_after_its_connection_detached() {
    let h = host("a", SlowStore::new());
    let (_, token, addr) = h.create_session();
    let mut c = Client::new(5, 9);
    let (early, _h1, _rx1) = c.attach(&token, None);
    let (later, h2, _rx2) = c.attach(&token, None);
    addr.send(later).await.unwrap().expect("later attempt");
    addr.send(berth_actors::session::Detach { conn_id: h2.id() })
        .await
        .unwrap();
    // An orphan attempt arriving now must not leave the session attached.
    assert_eq!(
        addr.send(early).await.unwrap().unwrap_err(),
        AttachError::Superseded
    );
}

#[actix_rt::test]
async fn queued_ops_apply_in_the_order_they_were_sent_past_a_full_mailbox() {
    // More ops than the mailbox holds (256), sent alternately through two
    // clones of the address while each checkpoint takes 2 ms: every op is
    // applied once, in the order sent.
    let store = SlowStore::new();
    let h = host("a", store.clone());
    let (_, token, addr) = h.create_session();
    let mut c = Client::new(1, 1);
    let (m, conn, _rx) = c.attach(&token, None);
    addr.send(m).await.unwrap().expect("hello");
    store.delay_ms.store(2, Ordering::Relaxed);

    let clones = [addr.clone(), addr.clone()];
    let n = 600u64;
    let replies: Vec<_> = (1..=n)
        .map(|id| {
            let (reply, rx) = tokio::sync::oneshot::channel::<Result<OpReply, NotHere>>();
            clones[(id % 2) as usize].do_send(QueuedOp {
                op: Op {
                    conn_id: conn.id(),
                    id,
                    op: "incr".into(),
                    args: json!({"key": "n"}),
                },
                reply,
            });
            rx
        })
        .collect();
    for (i, rx) in replies.into_iter().enumerate() {
        let r = rx.await.expect("answered").expect("held");
        assert!(r.ok && !r.duplicate, "op {} answered {r:?}", i + 1);
        assert_eq!(
            r.value,
            Some(json!(i as u64 + 1)),
            "op {} applied in order",
            i + 1
        );
    }
}

#[actix_rt::test]
async fn a_session_costs_nothing_in_the_store_until_its_first_write() {
    let store = SlowStore::new();
    let h = host("a", store.clone());
    let (id, token, addr) = h.create_session();
    let mut c = Client::new(1, 1);
    let (m, conn, _rx) = c.attach(&token, None);
    addr.send(m).await.unwrap().expect("hello");
    assert_eq!(
        store.epoch(&id).await.unwrap(),
        0,
        "nothing stored at hello"
    );
    let read = addr
        .send(Op {
            conn_id: conn.id(),
            id: 1,
            op: "get".into(),
            args: json!({"key": "n"}),
        })
        .await
        .unwrap()
        .unwrap();
    assert!(read.ok);
    assert_eq!(store.epoch(&id).await.unwrap(), 0, "a read stores nothing");
    assert_eq!(incr(&addr, &conn, 2).await.value, Some(json!(1)));
    let e = store.epoch(&id).await.unwrap();
    assert!(e > 0, "the first write created it");
    // And it is there for another node.
    let b = host("b", store.clone());
    let mut other = Client::new(2, 1);
    let (m, _h, _rx2) = other.attach(&token, None);
    let (w, _) = b
        .session(&id)
        .send(m)
        .await
        .unwrap()
        .expect("resumed elsewhere");
    assert_eq!((w.resumed, w.last_op, w.version), (true, 2, 1));
}

const TWIN_TOKEN: &str = "twin-token-0123456789";

/// One new id created on two hosts sharing `store` (an edge's create that
/// timed out and was sent again to another owner), each welcomed by its own
/// creating hello.
struct Twins {
    id: SessionId,
    a: Addr<SessionActor>,
    ha: ConnHandle,
    _rxa: ConnReceiver,
    b: Addr<SessionActor>,
    hb: ConnHandle,
    rxb: ConnReceiver,
}

async fn twins(store: &Arc<SlowStore>) -> Twins {
    let (ha_host, hb_host) = (host("a", store.clone()), host("b", store.clone()));
    let id = SessionId::random();
    let a = ha_host.create_session_with(id.clone(), TWIN_TOKEN);
    let b = hb_host.create_session_with(id.clone(), TWIN_TOKEN);
    let (m, ha, rxa) = Client::new(1, 1).attach(TWIN_TOKEN, None);
    a.send(m).await.unwrap().expect("hello at a");
    let (m, hb, rxb) = Client::new(2, 1).attach(TWIN_TOKEN, None);
    b.send(m).await.unwrap().expect("the twin's hello at b");
    Twins {
        id,
        a,
        ha,
        _rxa: rxa,
        b,
        hb,
        rxb,
    }
}

#[actix_rt::test]
async fn twin_creations_of_one_new_id_never_overwrite_each_other() {
    // The first to write creates the session; the other is refused (fenced),
    // and a resume never welcomes with its empty state.
    let store = SlowStore::new();
    let mut t = twins(&store).await;
    assert_eq!(incr(&t.a, &t.ha, 1).await.value, Some(json!(1)));
    // The twin's first write is refused: not applied, its client told 1012.
    let r = incr(&t.b, &t.hb, 1).await;
    assert!(!r.ok, "{r:?}");
    assert!(matches!(
        told(&mut t.rxb),
        Some(ConnMsg::Close(CloseCode::Restart, _))
    ));
    // The stored session is a's.
    let (m, _h3, _rx3) = Client::new(3, 1).attach(TWIN_TOKEN, None);
    let (w, _) = host("c", store.clone())
        .session(&t.id)
        .send(m)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((w.last_op, w.version), (1, 1));
}

#[actix_rt::test]
async fn a_resume_at_an_unwritten_twin_is_sent_to_the_written_one() {
    let store = SlowStore::new();
    let t = twins(&store).await;
    assert!(incr(&t.a, &t.ha, 1).await.ok);
    // A later resume reaching the twin at b: not welcomed with version 0.
    let (m, _h3, _rx3) = Client::new(3, 1).attach(TWIN_TOKEN, None);
    assert_eq!(t.b.send(m).await.unwrap().unwrap_err(), AttachError::Moved);
}
