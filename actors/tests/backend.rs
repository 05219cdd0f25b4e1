//! What the backend API asks of a node's actors, on the actix test runtime
//! with the in-memory store: the index of live sessions by user, an actor's
//! status, and ending a session. Two [`Host`]s sharing one store play two
//! nodes.

use std::sync::Arc;
use std::time::Duration;

use berth_actors::codec;
use berth_actors::conn::{conn_channel, ConnMsg};
use berth_actors::host::{Durability, Host, HostConfig};
use berth_actors::kv::KvApp;
use berth_actors::protocol::CloseCode;
use berth_actors::session::{Attach, EndError, Op, Origin, Status};
use berth_actors::state::Limits;
use berth_actors::store::memory::MemoryStore;
use berth_actors::store::CheckpointStore;
use serde_json::json;

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

#[actix_rt::test]
async fn a_users_live_sessions_are_indexed_and_ending_one_closes_its_client_with_4004() {
    let store: Arc<dyn CheckpointStore> = Arc::new(MemoryStore::new(Duration::from_secs(3600)));
    let a = host("a", store.clone());
    let (id, token, addr) = a.create_session();
    let (conn, _rx) = conn_channel(64);
    let attach = |conn, attempt, user: Option<&str>| Attach {
        conn,
        token: token.clone(),
        ack: 0,
        origin: Origin { edge: 1, conn: 1 },
        attempt,
        reattach: None,
        user: user.map(str::to_owned),
    };
    addr.send(attach(conn.clone(), 1, None))
        .await
        .unwrap()
        .unwrap();
    let r = addr
        .send(Op {
            conn_id: conn.id(),
            id: 1,
            op: "incr".into(),
            args: json!({"key": "n"}),
        })
        .await
        .unwrap()
        .unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(a.status(&id).await.map(|s| s.version), Some(1));
    assert!(a.user_sessions("alice").is_empty(), "no user yet");

    // The session bound to alice in its checkpoint (as the identity layer
    // binds it), then activated on node b: b lists it under alice.
    let epoch = store.epoch(&id).await.unwrap();
    let mut ck = codec::decode(&store.peek(&id).await.unwrap().unwrap()).unwrap();
    ck.user = Some("alice".into());
    store.save(&id, epoch, codec::encode(ck)).await.unwrap();
    let b = host("b", store.clone());
    assert!(b.status(&id).await.is_none(), "a status never activates");
    let live = b.session(&id);
    let (conn_b, mut rx_b) = conn_channel(64);
    live.send(attach(conn_b, 2, Some("alice")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(live.send(Status).await.unwrap().map(|s| s.version), Some(1));
    assert_eq!(b.user_sessions("alice"), vec![id.clone()]);
    assert!(b.user_sessions("bob").is_empty());

    // Ended from the backend: the client hears 4004, the checkpoint and the
    // index row are gone, and a second end finds nothing.
    b.end(&id).await.unwrap();
    match rx_b.recv().await {
        Some(ConnMsg::Close(code, _)) => assert_eq!(code, CloseCode::SessionNotFound),
        other => panic!("{other:?}"),
    }
    assert!(b.user_sessions("alice").is_empty());
    assert_eq!(store.peek(&id).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(600)).await; // the ended actor leaves
    assert_eq!(b.end(&id).await, Err(EndError::Gone));
}
