//! berth-cluster against a real Consul 1.8.7 agent (`consul agent -dev` on free
//! loopback ports, killed on drop), with and without ACLs.

use std::time::{Duration, Instant};

use berth_cluster::consul::{ConsulClient, ConsulError};
use berth_cluster::membership::{spawn_consul, ConsulConfig, Member, MembershipHandle};
use berth_cluster::ring::MemberId;
use berth_testkit::free_port;

/// A `consul agent -dev` on free loopback ports (berth-testkit's guard,
/// killed on drop), with its management token when ACLs are on.
struct Consul {
    agent: berth_testkit::Consul,
    /// The management token, when ACLs are on.
    master: Option<String>,
}

impl Consul {
    fn start() -> Consul {
        Consul {
            agent: berth_testkit::Consul::start(),
            master: None,
        }
    }

    /// An agent with ACLs on, `default_policy = "deny"`, and a fresh random
    /// management token.
    fn start_acl() -> Consul {
        let master = uuid();
        Consul {
            agent: berth_testkit::Consul::start_acl(&master),
            master: Some(master),
        }
    }

    fn addr(&self) -> String {
        self.agent.addr()
    }

    /// A client with the management token.
    fn master_client(&self) -> ConsulClient {
        ConsulClient::new(&self.addr(), Duration::from_secs(2))
            .unwrap()
            .with_token(self.master.as_deref())
            .unwrap()
    }

    /// `PUT /v1/acl/...` with the management token; answers the JSON body.
    /// Retried while the leader is still setting up its ACLs.
    async fn acl_put(&self, what: &str, body: serde_json::Value) -> serde_json::Value {
        let master = self.master.as_deref().expect("an agent with ACLs");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = http
                .put(format!("{}/v1/acl/{what}", self.addr()))
                .header("X-Consul-Token", master)
                .json(&body)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let last = match r {
                Ok(resp) if resp.status().is_success() => return resp.json().await.unwrap(),
                Ok(resp) => format!(
                    "{}: {}",
                    resp.status(),
                    resp.text().await.unwrap_or_default()
                ),
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "PUT /v1/acl/{what} kept failing: {last}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A new policy named `name` with `rules` and a token holding it;
    /// answers the token's secret.
    async fn token_with_policy(&self, name: &str, rules: &str) -> String {
        self.acl_put(
            "policy",
            serde_json::json!({ "Name": name, "Rules": rules }),
        )
        .await;
        self.token_for(name).await.0
    }

    /// Another token holding the existing policy `policy`; answers its
    /// secret and its accessor id.
    async fn token_for(&self, policy: &str) -> (String, String) {
        let token = self
            .acl_put(
                "token",
                serde_json::json!({ "Description": policy, "Policies": [{ "Name": policy }] }),
            )
            .await;
        let field = |k: &str| token[k].as_str().expect(k).to_owned();
        (field("SecretID"), field("AccessorID"))
    }

    /// Deletes a token (`DELETE /v1/acl/token/:accessor`).
    async fn delete_token(&self, accessor: &str) {
        let resp = reqwest::Client::new()
            .delete(format!("{}/v1/acl/token/{accessor}", self.addr()))
            .header("X-Consul-Token", self.master.as_deref().unwrap())
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    }

    /// The ids of the passing instances of `service`, as the management
    /// token sees them (what is really registered, unfiltered by ACLs).
    async fn passing_ids(&self, service: &str) -> Vec<String> {
        let t = Duration::from_secs(2);
        let (_, instances) = self
            .master_client()
            .passing(service, 0, t, t)
            .await
            .unwrap();
        let mut ids: Vec<String> = instances.into_iter().map(|i| i.id).collect();
        ids.sort();
        ids
    }
}

/// The policy berth needs (docs/operations.md): write its service instances
/// (register, pass and fail the check, deregister), read the nodes the
/// health query joins.
const BERTH_RULES: &str = r#"
service_prefix "" { policy = "write" }
node_prefix "" { policy = "read" }
"#;

/// A random UUID (Consul's token format).
fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn member(id: &str) -> Member {
    Member {
        id: MemberId(id.into()),
        peer: format!("127.0.0.1:{}", free_port()),
        public: Some("127.0.0.1:8080".into()),
        version: Some("test".into()),
    }
}

/// A node that can serve from the start.
fn serving() -> tokio::sync::watch::Receiver<bool> {
    tokio::sync::watch::channel(true).1
}

fn cfg(consul: &Consul) -> ConsulConfig {
    ConsulConfig {
        wait: Duration::from_secs(5),
        ..ConsulConfig::new(consul.addr(), "berth-test")
    }
}

async fn wait_members(h: &MembershipHandle, want: &[&str], within: Duration) -> Duration {
    let start = Instant::now();
    let mut rx = h.subscribe();
    loop {
        let ids: Vec<String> = rx.borrow().ids().map(|m| m.to_string()).collect();
        if ids == want {
            return start.elapsed();
        }
        let left = within
            .checked_sub(start.elapsed())
            .unwrap_or_else(|| panic!("members never became {want:?}; last {ids:?}"));
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

#[tokio::test]
async fn members_register_see_each_other_and_deregister_on_shutdown() {
    let consul = Consul::start();
    let a = spawn_consul(cfg(&consul), member("a"), serving()).unwrap();
    let b = spawn_consul(cfg(&consul), member("b"), serving()).unwrap();
    wait_members(&a, &["a", "b"], Duration::from_secs(10)).await;
    wait_members(&b, &["a", "b"], Duration::from_secs(10)).await;
    let view = a.view();
    let mb = view.get(&MemberId("b".into())).unwrap();
    assert_eq!(
        mb.public.as_deref(),
        Some("127.0.0.1:8080"),
        "metadata travels"
    );
    assert!(a.health().registered);

    b.shutdown(Duration::from_secs(3)).await;
    let took = wait_members(&a, &["a"], Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(1),
        "deregistration is seen at once (blocking query), took {took:?}"
    );
}

#[tokio::test]
async fn a_member_joins_only_once_it_can_serve_and_leaves_while_it_cannot() {
    let consul = Consul::start();
    let a = spawn_consul(cfg(&consul), member("a"), serving()).unwrap();
    let (ready, ready_rx) = tokio::sync::watch::channel(false);
    let b = spawn_consul(cfg(&consul), member("b"), ready_rx).unwrap();
    wait_members(&a, &["a"], Duration::from_secs(10)).await;
    // b is registered (critical) but never in the passing set while unready.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.health().registered {
        assert!(Instant::now() < deadline, "b never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // over two TTLs
    let ids: Vec<String> = a.view().ids().map(|m| m.to_string()).collect();
    assert_eq!(
        ids,
        vec!["a".to_string()],
        "an unready node is not a member"
    );

    ready.send_replace(true);
    let took = wait_members(&a, &["a", "b"], Duration::from_secs(5)).await;
    eprintln!("b joined {took:?} after it became ready");

    ready.send_replace(false);
    let took = wait_members(&a, &["a"], Duration::from_secs(5)).await;
    eprintln!("b left {took:?} after it stopped being ready (its check marked critical)");
    ready.send_replace(true);
    wait_members(&a, &["a", "b"], Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_member_that_stops_passing_leaves_after_its_ttl() {
    let consul = Consul::start();
    let a = spawn_consul(cfg(&consul), member("a"), serving()).unwrap();
    let b = spawn_consul(cfg(&consul), member("b"), serving()).unwrap();
    wait_members(&a, &["a", "b"], Duration::from_secs(10)).await;
    // Dropping the handle aborts its loops without deregistering: like SIGKILL.
    drop(b);
    let took = wait_members(&a, &["a"], Duration::from_secs(10)).await;
    eprintln!("member left the passing set {took:?} after its last TTL pass stopped (TTL 1 s)");
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[tokio::test]
async fn consul_outage_keeps_the_last_view_and_reports_it() {
    let mut consul = Consul::start();
    let a = spawn_consul(cfg(&consul), member("a"), serving()).unwrap();
    wait_members(&a, &["a"], Duration::from_secs(10)).await;
    consul.agent.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.health().failing_since.is_none() {
        assert!(Instant::now() < deadline, "failure never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.health().last_error.is_some());
    let ids: Vec<String> = a.view().ids().map(|m| m.to_string()).collect();
    assert_eq!(ids, vec!["a".to_string()], "last known view kept");
}

#[tokio::test]
async fn client_reports_consul_errors() {
    let consul = Consul::start();
    let c = ConsulClient::new(&consul.addr(), Duration::from_secs(1)).unwrap();
    let err = c
        .pass("no-such-check", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("consul answered"), "{err}");
    let (index, instances) = c
        .passing(
            "nothing-here",
            0,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert!(index > 0);
    assert!(instances.is_empty());
    let down = ConsulClient::new("http://127.0.0.1:1", Duration::from_millis(200)).unwrap();
    assert!(matches!(
        down.pass("x", Duration::from_millis(200)).await,
        Err(berth_cluster::consul::ConsulError::Unreachable(_))
    ));
}

fn registration(id: &str) -> berth_cluster::consul::Registration {
    berth_cluster::consul::Registration {
        id: id.into(),
        name: "berth-test".into(),
        address: "127.0.0.1".into(),
        port: free_port(),
        meta: Default::default(),
        check: berth_cluster::consul::TtlCheck {
            check_id: format!("berth-ttl-{id}"),
            ttl: "10s".into(),
            deregister_critical_service_after: "1m".into(),
            status: "passing".into(),
        },
    }
}

/// Waits until `h`'s health says Consul refused the token and the node is
/// not registered (the watcher may be refused a moment before the registrar).
async fn wait_refused(h: &MembershipHandle, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let health = h.health();
        if health.forbidden && health.failing_since.is_some() && !health.registered {
            let e = health.last_error.unwrap_or_default();
            eprintln!("membership health reports: {e}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "refusal never reported: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_acls_and_no_token_registration_is_forbidden_and_the_node_is_not_passing() {
    let consul = Consul::start_acl();
    let t = Duration::from_secs(2);
    // The client alone: a typed refusal, whatever the text.
    let anonymous = ConsulClient::new(&consul.addr(), t).unwrap();
    // (Retried while the leader is still setting up its ACLs.)
    consul
        .token_with_policy("unused", "key_prefix \"unused/\" { policy = \"deny\" }")
        .await;
    let err = anonymous.register(&registration("x"), t).await.unwrap_err();
    eprintln!("403 body without a token (register): {err}");
    assert!(matches!(err, ConsulError::Forbidden { .. }), "{err:?}");
    // An instance the management token registered: no pass, fail or
    // deregistration of it without a token either.
    let master = consul.master_client();
    master.register(&registration("m"), t).await.unwrap();
    for err in [
        anonymous.pass("berth-ttl-m", t).await.unwrap_err(),
        anonymous.fail("berth-ttl-m", t).await.unwrap_err(),
        anonymous.deregister("m", t).await.unwrap_err(),
    ] {
        assert!(matches!(err, ConsulError::Forbidden { .. }), "{err:?}");
    }
    assert_eq!(consul.passing_ids("berth-test").await, vec!["m"]);
    master.deregister("m", t).await.unwrap();
    // A read is not refused: under default deny it answers an empty list.
    let (_, seen) = anonymous.passing("berth-test", 0, t, t).await.unwrap();
    assert!(seen.is_empty());

    // Membership without a token: refused, reported, never in the passing set.
    let a = spawn_consul(cfg(&consul), member("a"), serving()).unwrap();
    wait_refused(&a, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // several registrar ticks
    let health = a.health();
    assert!(
        health.forbidden && !health.registered && health.failing_since.is_some(),
        "{health:?}"
    );
    assert!(
        consul.passing_ids("berth-test").await.is_empty(),
        "nothing registered"
    );
    assert!(a.view().members.is_empty());

    // A token whose policy only reads is refused the same way.
    let reader = consul
        .token_with_policy(
            "read-only",
            "service_prefix \"\" { policy = \"read\" }\nnode_prefix \"\" { policy = \"read\" }",
        )
        .await;
    let err = ConsulClient::new(&consul.addr(), t)
        .unwrap()
        .with_token(Some(&reader))
        .unwrap()
        .register(&registration("y"), t)
        .await
        .unwrap_err();
    eprintln!("403 body with a read-only token (register): {err}");
    assert!(matches!(err, ConsulError::Forbidden { .. }), "{err:?}");
    a.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test]
async fn with_acls_a_token_allowed_to_write_the_service_registers_two_members_that_see_each_other_and_deregister(
) {
    let consul = Consul::start_acl();
    let token = consul.token_with_policy("berth", BERTH_RULES).await;
    let with_token = || ConsulConfig {
        token: Some(token.clone()),
        ..cfg(&consul)
    };
    let a = spawn_consul(with_token(), member("a"), serving()).unwrap();
    let b = spawn_consul(with_token(), member("b"), serving()).unwrap();
    wait_members(&a, &["a", "b"], Duration::from_secs(10)).await;
    wait_members(&b, &["a", "b"], Duration::from_secs(10)).await;
    for h in [&a, &b] {
        let health = h.health();
        assert!(
            health.registered && !health.forbidden && health.last_error.is_none(),
            "{health:?}"
        );
    }
    assert_eq!(consul.passing_ids("berth-test").await, vec!["a", "b"]);

    b.shutdown(Duration::from_secs(3)).await;
    let took = wait_members(&a, &["a"], Duration::from_secs(5)).await;
    eprintln!("with ACLs, b's deregistration was seen by a after {took:?}");
    a.shutdown(Duration::from_secs(3)).await;
    assert!(
        consul.passing_ids("berth-test").await.is_empty(),
        "both deregistered on shutdown"
    );
}

#[tokio::test]
async fn with_acls_a_wrong_token_is_refused_with_a_typed_error() {
    let consul = Consul::start_acl();
    // A real token exists too, so the ACL system is up before the checks.
    consul.token_with_policy("berth", BERTH_RULES).await;
    let t = Duration::from_secs(2);
    let wrong = ConsulClient::new(&consul.addr(), t)
        .unwrap()
        .with_token(Some(&uuid()))
        .unwrap();
    let err = wrong.register(&registration("x"), t).await.unwrap_err();
    eprintln!("403 body for an unknown token (register): {err}");
    assert!(matches!(err, ConsulError::Forbidden { .. }), "{err:?}");
    let err = wrong.passing("berth-test", 0, t, t).await.unwrap_err();
    eprintln!("403 body for an unknown token (health query): {err}");
    assert!(matches!(err, ConsulError::Forbidden { .. }), "{err:?}");
    let err = wrong.deregister("x", t).await.unwrap_err();
    assert!(matches!(err, ConsulError::Forbidden { .. }), "{err:?}");

    let a = spawn_consul(
        ConsulConfig {
            token: Some(uuid()),
            ..cfg(&consul)
        },
        member("a"),
        serving(),
    )
    .unwrap();
    wait_refused(&a, Duration::from_secs(10)).await;
    assert!(consul.passing_ids("berth-test").await.is_empty());
    assert!(a.view().members.is_empty());
    a.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test]
async fn with_acls_a_deleted_token_is_reported_and_freezes_the_nodes_catalog_entry_until_it_registers_again(
) {
    let consul = Consul::start_acl();
    let token_a = consul.token_with_policy("berth", BERTH_RULES).await;
    let (token_b, accessor_b) = consul.token_for("berth").await;
    let with = |token: &str| ConsulConfig {
        token: Some(token.to_owned()),
        ..cfg(&consul)
    };
    let a = spawn_consul(with(&token_a), member("a"), serving()).unwrap();
    let b = spawn_consul(with(&token_b), member("b"), serving()).unwrap();
    wait_members(&a, &["a", "b"], Duration::from_secs(10)).await;
    wait_members(&b, &["a", "b"], Duration::from_secs(10)).await;

    // A token deleted while its node runs (a rotation that deleted the old
    // token too early): b's passes are refused and b says so...
    consul.delete_token(&accessor_b).await;
    wait_refused(&b, Duration::from_secs(5)).await;
    // ...but its check does not leave the passing set when the TTL lapses:
    // the agent marks it critical locally and cannot tell the catalog,
    // because it syncs a service with the token that registered it ("Check
    // registration blocked by ACLs" in the agent's log). Consul 1.8.7's
    // behaviour, and why docs/operations.md says to delete an old token only
    // after every node was restarted with the new one.
    tokio::time::sleep(Duration::from_secs(3)).await; // three TTLs
    assert_eq!(
        consul.passing_ids("berth-test").await,
        vec!["a", "b"],
        "Consul changed: a deleted token's instance no longer stays passing; update docs/operations.md"
    );
    let ids: Vec<String> = b.view().ids().map(|m| m.to_string()).collect();
    assert_eq!(ids, vec!["a", "b"], "b keeps its last known view");

    // What clears it: the node registering again with a valid token (a
    // restart after the rotation), which then also deregisters on shutdown.
    drop(b); // like SIGKILL
    let (token_new, _) = consul.token_for("berth").await;
    let b = spawn_consul(with(&token_new), member("b"), serving()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.health().registered {
        assert!(Instant::now() < deadline, "b never registered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.shutdown(Duration::from_secs(3)).await;
    let took = wait_members(&a, &["a"], Duration::from_secs(5)).await;
    eprintln!("restarted with a new token, b deregistered; a saw it after {took:?}");
    a.shutdown(Duration::from_secs(3)).await;
    assert!(consul.passing_ids("berth-test").await.is_empty());
}
