//! berth-cluster against a real Consul 1.8.7 agent (`consul agent -dev` on free
//! loopback ports, killed on drop).

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use berth_cluster::consul::ConsulClient;
use berth_cluster::dev_agent::free_port;
use berth_cluster::membership::{spawn_consul, ConsulConfig, Member, MembershipHandle};
use berth_cluster::ring::MemberId;

fn consul_bin() -> PathBuf {
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/consul");
    if local.is_file() {
        return local;
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("consul")).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("consul is not installed: run `scripts/install-deps.sh` (Consul 1.8.7 from Debian 11, into .tools/bin)"))
}

/// A `consul agent -dev` on free loopback ports.
struct Consul {
    child: Child,
    http: u16,
}

impl Consul {
    fn start() -> Consul {
        let (child, http) =
            berth_cluster::dev_agent::spawn(&consul_bin(), Stdio::null()).expect("spawn consul");
        let c = Consul { child, http };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if c.has_leader() {
                return c;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("consul did not elect itself leader");
    }

    /// `GET /v1/status/leader` answers a non-empty address.
    fn has_leader(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.http)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = "GET /v1/status/leader HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.starts_with("HTTP/1.1 200") && body.trim_end().ends_with(":\"")
            || body.contains("\"127.0.0.1:")
    }

    fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let _ = consul.child.kill();
    let _ = consul.child.wait();
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
